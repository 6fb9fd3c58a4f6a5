"""Passes and pipelines.

A pass is a pure function of a model and its options: ``Pass.run(model) -> PassResult``. It
never mutates its input, declares its kebab-case ``name``, a one-line ``description``, typed
``options`` and the passes it must run after, and reports what it did as named counts.

A :class:`Pipeline` runs passes in order, optionally to a fixpoint, times each one and records
nodes before and after. Pipelines are text and print back the same way::

    canonicalize,remove-layout-clutter{max-iterations=4}

In debug mode the graph is checked after every pass (``onnx.checker`` and strict shape
inference), so the report names the pass that broke it; with a reproducer directory the model
that went into a failing pass is saved next to the pipeline that was left to run.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import onnx

from .errors import InputError, PassError, UnknownPassError, XattnError
from .ir import count_nodes

log = logging.getLogger(__name__)

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with Python's cyclic garbage collector off (nested uses are no-ops).

    A pass on a large model creates millions of graph objects that all stay alive; each
    collection the allocations trigger walks all of them and finds nothing, which was a
    quarter of a 100k-node clean-up. Reference counting still frees acyclic garbage at once;
    the graphs a pass drops (nodes and tensors refer to each other) wait for the next
    collection after the block.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class PipelineError(InputError):
    """A pipeline is malformed: bad text, or passes in an order their constraints forbid."""


# --- options ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """A typed pass option. ``kind`` is bool, int, float, str or tuple (a comma-separated list)."""

    name: str
    kind: type
    default: Any
    help: str

    def parse(self, text: str) -> Any:
        """The value written as ``text`` in a pipeline string."""
        try:
            if self.kind is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0"):
                    raise ValueError("expected true or false")
                return lowered in ("true", "1")
            if self.kind is tuple:
                return tuple(item for item in text.split(",") if item)
            return self.kind(text)
        except ValueError as exc:
            raise UnknownPassError(
                f"option '{self.name}': cannot read {text!r} as {self.kind.__name__} ({exc})"
            ) from exc

    def coerce(self, value: Any) -> Any:
        """A value given from Python, checked against the option's type."""
        if isinstance(value, str) and self.kind is not str:
            return self.parse(value)
        if self.kind is tuple and isinstance(value, (list, tuple)):
            return tuple(str(item) for item in value)
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if value is not None and not isinstance(value, self.kind):
            raise UnknownPassError(
                f"option '{self.name}' takes {self.kind.__name__}, got {type(value).__name__}"
            )
        return value

    def format(self, value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return ",".join(value)
        return str(value)


# --- passes ------------------------------------------------------------------------------------

@dataclass
class PassResult:
    """What a pass returns: the new model, whether it changed, and what it did."""

    model: onnx.ModelProto
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base of every pass. Subclasses set the class attributes and implement :meth:`run`.

    ``run_after`` names passes that must come earlier when both are in a pipeline; the
    pipeline checks it when it is built.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    run_after: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **values: Any):
        known = {opt.name.replace("-", "_"): opt for opt in self.options}
        unknown = [key for key in values if key.replace("-", "_") not in known]
        if unknown:
            raise UnknownPassError(
                f"pass '{self.name}' has no option {', '.join(repr(u) for u in unknown)} "
                f"(options: {', '.join(o.name for o in self.options) or 'none'})"
            )
        self.values = {opt.name: opt.default for opt in self.options}
        for key, value in values.items():
            opt = known[key.replace("-", "_")]
            self.values[opt.name] = opt.coerce(value)

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        if cls.name and not _KEBAB.match(cls.name):
            raise TypeError(f"pass name {cls.name!r} of {cls.__qualname__} is not kebab-case")

    def option(self, name: str) -> Any:
        return self.values[name]

    def run(self, model: onnx.ModelProto) -> PassResult:
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        return self.run(model)

    def spec(self) -> str:
        """The pass as pipeline text: its name and the options that differ from the default."""
        changed = [
            f"{opt.name}={opt.format(self.values[opt.name])}"
            for opt in self.options
            if self.values[opt.name] != opt.default
        ]
        return f"{self.name}{{{' '.join(changed)}}}" if changed else self.name

    def __repr__(self) -> str:
        return f"<pass {self.spec()}>"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.values == other.values  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.spec()))


# --- pipeline text ----------------------------------------------------------------------------

def split_pipeline_text(text: str) -> list[tuple[str, dict[str, str]]]:
    """``"a,b{x=1 y=p,q}"`` -> ``[("a", {}), ("b", {"x": "1", "y": "p,q"})]``."""
    items: list[tuple[str, dict[str, str]]] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        match = re.compile(r"\s*([A-Za-z0-9_-]+)\s*").match(text, pos)
        if not match:
            raise PipelineError(f"pipeline {text!r}: expected a pass name at position {pos}")
        name, pos = match.group(1), match.end()
        options: dict[str, str] = {}
        if pos < len(text) and text[pos] == "{":
            close = text.find("}", pos)
            if close < 0:
                raise PipelineError(f"pipeline {text!r}: '{{' after '{name}' is never closed")
            options = _split_options(name, text[pos + 1:close])
            pos = close + 1
        items.append((name, options))
        rest = re.compile(r"\s*(,|$)").match(text, pos)
        if not rest:
            raise PipelineError(f"pipeline {text!r}: expected ',' after '{name}' at {pos}")
        pos = rest.end()
    return items


def _split_options(pass_name: str, body: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for word in body.split():
        key, eq, value = word.partition("=")
        if not eq or not key:
            raise PipelineError(f"pass '{pass_name}': option {word!r} is not written key=value")
        options[key] = value
    return options


# --- running ------------------------------------------------------------------------------------

@dataclass
class PassRecord:
    """One run of one pass, as the report shows it."""

    name: str
    spec: str
    iteration: int
    changed: bool
    nodes_before: int
    nodes_after: int
    seconds: float
    counts: dict[str, int]
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "spec": self.spec, "iteration": self.iteration,
            "changed": self.changed, "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after, "seconds": round(self.seconds, 6),
            "details": {"counts": self.counts, **self.details},
        }


@dataclass
class PipelineResult:
    model: onnx.ModelProto
    pipeline: str
    records: list[PassRecord]
    iterations: int

    @property
    def changed(self) -> bool:
        return any(record.changed for record in self.records)

    def report(self) -> dict[str, Any]:
        nodes_before = self.records[0].nodes_before if self.records else count_nodes(self.model)
        return {
            "pipeline": self.pipeline,
            "iterations": self.iterations,
            "changed": self.changed,
            "nodes_before": nodes_before,
            "nodes_after": count_nodes(self.model),
            "seconds": round(sum(r.seconds for r in self.records), 6),
            "passes": [record.to_dict() for record in self.records],
        }


class Listener:
    """Receives progress events; the CLI draws a progress line, tests record the order."""

    def pass_started(self, index: int, total: int, pass_: Pass) -> None:  # noqa: B027
        pass

    def pass_finished(self, index: int, total: int, record: PassRecord) -> None:  # noqa: B027
        pass


class Pipeline:
    """An ordered list of passes, run once or repeated until none changes the model."""

    def __init__(
        self,
        passes: Sequence[Pass],
        *,
        fixpoint: bool = False,
        max_iterations: int = 8,
        debug: bool = False,
        reproducer: str | Path | None = None,
    ):
        self.passes = list(passes)
        self.fixpoint = fixpoint
        self.max_iterations = max(1, max_iterations)
        self.debug = debug
        self.reproducer = Path(reproducer) if reproducer else None
        check_order(self.passes)

    @classmethod
    def parse(cls, text: str, registry: Any = None, **kwargs: Any) -> Pipeline:
        """Build a pipeline from text such as ``"canonicalize,remove-layout-clutter"``."""
        if registry is None:
            from .registry import default_registry

            registry = default_registry()
        passes = [registry.create(name, options) for name, options in split_pipeline_text(text)]
        if not passes:
            raise PipelineError("the pipeline is empty")
        return cls(passes, **kwargs)

    def __str__(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, model: onnx.ModelProto, listener: Listener | None = None) -> PipelineResult:
        listener = listener or Listener()
        records: list[PassRecord] = []
        iteration = 0
        while True:
            iteration += 1
            changed_this_round = False
            for index, pass_ in enumerate(self.passes):
                listener.pass_started(index, len(self.passes), pass_)
                model, record = self._run_one(pass_, model, iteration, records, index)
                records.append(record)
                changed_this_round |= record.changed
                listener.pass_finished(index, len(self.passes), record)
            if not (self.fixpoint and changed_this_round):
                break
            if iteration >= self.max_iterations:
                log.warning("pipeline '%s' still changed the model after %d iterations; "
                            "stopping at the cap", self, iteration)
                break
        return PipelineResult(model, str(self), records, iteration)

    def _run_one(self, pass_: Pass, model: onnx.ModelProto, iteration: int,
                 records: list[PassRecord], index: int) -> tuple[onnx.ModelProto, PassRecord]:
        ran_before = [r.spec for r in records]
        nodes_before = count_nodes(model)
        start = time.perf_counter()
        try:
            with paused_gc():
                result = pass_.run(model)
        except XattnError:
            self._save_reproducer(model, index)
            raise
        except Exception as exc:
            self._save_reproducer(model, index)
            raise PassError(pass_.name, f"{type(exc).__name__}: {exc}", ran_before=ran_before) from exc
        seconds = time.perf_counter() - start
        if self.debug:
            problem = graph_problem(result.model)
            if problem:
                self._save_reproducer(model, index)
                raise PassError(pass_.name, f"left an invalid graph: {problem}", ran_before=ran_before)
        record = PassRecord(
            name=pass_.name, spec=pass_.spec(), iteration=iteration, changed=result.changed,
            nodes_before=nodes_before, nodes_after=count_nodes(result.model), seconds=seconds,
            counts=dict(result.counts), details=dict(result.details),
        )
        log.info("%s: %s (%d -> %d nodes, %.3f s)", pass_.name,
                 "changed" if result.changed else "no change", nodes_before,
                 record.nodes_after, seconds)
        return result.model, record

    def _save_reproducer(self, model: onnx.ModelProto, index: int) -> None:
        if self.reproducer is None:
            return
        from .errors import OutputError
        from .io import save
        from .outputs import write_text

        rest = ",".join(p.spec() for p in self.passes[index:])
        try:  # through the output guard: the input model is never a reproducer's target
            save(model, self.reproducer / "input.onnx")
            write_text(self.reproducer / "pipeline.txt", rest + "\n")
        except OutputError as exc:
            # The pass failure is what the user must see; a reproducer is a courtesy.
            log.error("could not write the reproducer: %s", exc)
            return
        log.error("reproducer written to %s (input.onnx + pipeline.txt)", self.reproducer)


def check_order(passes: Iterable[Pass]) -> None:
    """Raise :class:`PipelineError` when a pass comes before one it declares to run after."""
    position: dict[str, int] = {}
    for index, pass_ in enumerate(passes):
        position.setdefault(pass_.name, index)
    for index, pass_ in enumerate(passes):
        for earlier in pass_.run_after:
            if earlier in position and position[earlier] > index:
                raise PipelineError(
                    f"pass '{pass_.name}' must run after '{earlier}', but the pipeline puts "
                    f"'{earlier}' later"
                )


def graph_problem(model: onnx.ModelProto) -> str | None:
    """Why ``model`` is not a valid graph (checker or strict shape inference), or None."""
    from .io import PROTOBUF_LIMIT, checker_view, weight_bytes
    from .ir import infer_shapes
    from .weights import has_stubs

    try:
        if has_stubs(model):
            onnx.checker.check_model(checker_view(model))
        elif weight_bytes(model) < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        infer_shapes(model, strict=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        lines = str(exc).strip().splitlines()
        return lines[0] if lines else type(exc).__name__
    return None

