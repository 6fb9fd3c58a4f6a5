"""Numerical proof of a rewrite: run both models in ONNX Runtime and compare every output.

``verify(reference, candidate)`` feeds both models exactly the same arrays, runs them on the
CPU with ONNX Runtime's graph optimizations switched off, and compares the outputs with
dtype-aware tolerances. Without given inputs it draws several input sets, each at its own
binding of the symbolic dims (every dim distinct and above 1; a decode step with batch and
length 1; distinct sizes in reverse order with spread values), so that a rewrite which is right
only at one size, one batch or below a threshold fails; see
:mod:`xattn_compiler.verification_inputs`. The result lists every set with its dims.

A candidate that does not load or run is a failed check, not a crash; a reference that does
not load, or runs on none of the sets, is the user's problem and raises :class:`InputError`
(a set the reference cannot run is replaced by a safer one, or skipped, and reported).

Optimizations are off because the check must judge the graph as written: ORT's own fusions
have failed correct graphs (and could equally hide a broken one behind a rewrite of their own).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16/float8 with numpy, so np.dtype("bfloat16") works)
import numpy as np
import onnx
import onnxruntime as ort

from . import io as xio
from .errors import InputError, ReferenceRunError, first_line
from .ir import iter_tensors
from .verification_inputs import (  # noqa: F401  (re-exported: the inputs are part of this API)
    ANONYMOUS_DIM,
    DEFAULT_BATCH,
    DEFAULT_DIM,
    DEFAULT_INT_HIGH,
    PROFILES,
    InputSet,
    _is_float,
    _model_proto,
    binding_plan,
    check_given,
    draw_set,
    input_sets,
    load_inputs,
    random_inputs,
)
from .weights import has_stubs, materialize, stubs

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike
#: A candidate that is not one model: inputs by name -> outputs by name; raises
#: :class:`CandidateError` with the reason when it cannot produce them.
Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]

# Denominator floor of the relative error where the reference is 0. float32's smallest normal
# rather than float64's: float64's turns any difference above ~4 into inf, which is no number.
_REL_FLOOR = float(np.finfo(np.float32).tiny)


class _OrtFailure(Exception):
    """ONNX Runtime refused a model or failed to run it; the message is the error's first line."""


# --- results -------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputCheck:
    """The comparison of one output. Errors are None when no elementwise comparison was made
    (dtype or shape differ, or the output is missing). ``input_set`` names the input set the
    figures come from (the first that failed, else the one with the largest error)."""

    name: str
    dtype: str
    shape: tuple
    max_abs_error: float | None
    max_rel_error: float | None
    rtol: float
    atol: float
    ok: bool
    reason: str | None = None
    input_set: str | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the shape as a list)."""
        return {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "rtol": self.rtol, "atol": self.atol, "ok": self.ok, "reason": self.reason,
            "input_set": self.input_set,
        }


@dataclass(frozen=True)
class InputSetReport:
    """What became of one input set: ``status`` is ``passed``, ``failed`` or ``skipped``
    (the reference could not run it; ``reason`` says why). ``dims`` is the binding of the
    symbolic dims (empty for given inputs); ``replaces`` names the set this one stands in for."""

    name: str
    dims: dict[str, int]
    input_shapes: dict[str, tuple]
    status: str
    reason: str | None = None
    replaces: str | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return {
            "name": self.name, "dims": dict(self.dims), "status": self.status,
            "reason": self.reason, "replaces": self.replaces,
            "input_shapes": {n: list(shape) for n, shape in self.input_shapes.items()},
        }

    def line(self) -> str:
        """One line for :meth:`VerifyResult.summary`."""
        dims = " ".join(f"{name}={size}" for name, size in self.dims.items())
        instead = f" (in place of '{self.replaces}')" if self.replaces else ""
        status = {"passed": "PASS", "failed": "FAIL"}.get(self.status, self.status)
        return (f"input set '{self.name}'{instead}{': ' + dims if dims else ''}: {status}"
                + (f" ({self.reason})" if self.reason else ""))


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`.

    ``reason`` explains a failure that concerns the model as a whole (the candidate did not
    load or run, its inputs or output count differ); per-output failures are in ``outputs``,
    the worst over the input sets. ``input_shapes`` are the first set's; ``input_sets`` says
    which sets ran, at which dims, and which were skipped and why.
    """

    ok: bool
    outputs: list[OutputCheck]
    input_shapes: dict[str, tuple]
    reason: str | None = None
    input_sets: list[InputSetReport] = field(default_factory=list)

    @property
    def num_input_sets(self) -> int:
        """How many input sets both models ran on."""
        return sum(report.status != "skipped" for report in self.input_sets)

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return {
            "ok": self.ok,
            "reason": self.reason,
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
            "num_input_sets": self.num_input_sets,
            "input_sets": [report.to_dict() for report in self.input_sets],
            "outputs": [check.to_dict() for check in self.outputs],
        }

    def summary(self) -> str:
        """A human-readable table: a verdict line, the input sets with their dims, the first
        set's input shapes, one line per output."""
        verdict = "PASS" if self.ok else "FAIL"
        lines = [f"verify: {verdict}" + (f": {self.reason}" if self.reason else "")]
        if len(self.input_sets) > 1 or any(r.dims for r in self.input_sets):
            lines += [report.line() for report in self.input_sets]
        if self.input_shapes:
            shapes = ", ".join(f"{n} {_fmt_shape(s)}" for n, s in self.input_shapes.items())
            ran = [r.name for r in self.input_sets if r.status != "skipped"]
            lines.append(f"inputs{f' of {ran[0]!r}' if len(ran) > 1 else ''}: {shapes}")
        if self.outputs:
            several = self.num_input_sets > 1
            header = ("output", "dtype", "shape", "max abs err", "max rel err", "tolerance",
                      *(("input set",) if several else ()), "result")
            rows = [header] + [_summary_row(check, several) for check in self.outputs]
            widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
            for row in rows:
                # The last column (result) is not padded: it has no column to its right.
                cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
                lines.append("  ".join(cells + [row[-1]]).rstrip())
        return "\n".join(lines)


def _summary_row(check: OutputCheck, with_set: bool = False) -> tuple[str, ...]:
    tolerance = "exact" if check.rtol == 0 and check.atol == 0 else (
        f"rtol={check.rtol:.1e} atol={check.atol:.1e}")
    result = "PASS" if check.ok else "FAIL"
    if check.reason:
        result += f" ({check.reason})"
    where = (check.input_set or "-",) if with_set else ()
    return (check.name, check.dtype, _fmt_shape(check.shape), _fmt_err(check.max_abs_error),
            _fmt_err(check.max_rel_error), tolerance, *where, result)


def _fmt_shape(shape: tuple) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _fmt_err(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# --- tolerances ----------------------------------------------------------------------------

def default_tolerances(dtype) -> tuple[float, float]:
    """``(rtol, atol_factor)`` for outputs of ``dtype``; the absolute tolerance is
    ``atol_factor * max(1, max|reference|)`` so it follows the output's magnitude.

    Integers and bools compare exactly: ``(0.0, 0.0)``. ``dtype`` may be anything
    ``numpy.dtype`` accepts (bfloat16 included) or an ONNX ``TensorProto`` data type.
    """
    name = _np_dtype(dtype).name
    if name in ("float32", "float64"):
        return 1e-3, 1e-4
    if name in ("float16", "bfloat16"):
        return 2e-2, 2e-2
    if _is_float(_np_dtype(dtype)):
        # float8 and smaller keep 2-3 mantissa bits: one rounding step is 12-25 %.
        return 0.25, 0.25
    return 0.0, 0.0


def _np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
    return np.dtype(dtype)


def _computed_precision(model: ModelLike) -> dict[str, np.dtype]:
    """Float outputs computed from a float16 or bfloat16 value -> that narrower type.

    Such an output cannot be more exact than the half-precision value it depends on: a rewrite
    that changes that computation by one half-precision rounding moves it by that much, whatever
    the output's own type. One pass over the (topologically sorted) nodes: a tensor depends on
    a half value when it is one or any input of its producer does.
    """
    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(
            str(model), load_external_data=False)
    except Exception:  # not readable here: ONNX Runtime already ran it; keep output dtypes
        return {}
    from .ir import _skeleton

    try:  # value types of intermediate tensors, from the weightless skeleton
        graph = onnx.shape_inference.infer_shapes(_skeleton(proto)).graph
    except Exception:
        graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    narrow = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    half: dict[str, int] = {name: t for name, t in types.items() if t in narrow}
    for node in graph.node:
        inherited = next((half[i] for i in node.input if i in half), None)
        for out in node.output:
            if out not in half and inherited is not None:
                half[out] = inherited
    return {value.name: _np_dtype(half[value.name]) for value in graph.output
            if value.name in half and types.get(value.name) not in narrow}


# --- running models ------------------------------------------------------------------------

def run_model(model: ModelLike, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` (a ModelProto or a path) once in ONNX Runtime on the CPU, optimizations off.

    Keys of ``inputs`` that are not inputs of the model are ignored. Returns the outputs by
    name, in graph-output order. Raises :class:`InputError` naming the model when an input is
    missing or ONNX Runtime cannot load or run it.
    """
    try:
        with _session(model) as session:
            names = [value.name for value in session.get_inputs()]
            return _run(session, _select_inputs(inputs, names))
    except _OrtFailure as exc:
        raise InputError(f"model {_describe(model)}: {exc}") from exc


@contextlib.contextmanager
def model_runner(model: ModelLike) -> Iterator[Runner]:
    """One ONNX Runtime session for ``model``, kept open while inside: ``run(feeds)`` as
    :func:`run_model`, without loading the model again for every call (a split's projector
    and decoder run once per input set)."""
    try:
        with _session(model) as session:
            names = [value.name for value in session.get_inputs()]

            def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                try:
                    return _run(session, _select_inputs(inputs, names))
                except _OrtFailure as exc:
                    raise InputError(f"model {_describe(model)}: {exc}") from exc

            yield run
    except _OrtFailure as exc:
        raise InputError(f"model {_describe(model)}: {exc}") from exc


def as_stored(model: onnx.ModelProto, path: str | os.PathLike) -> ModelLike:
    """What ONNX Runtime should open for ``model`` loaded lazily from ``path``: the file itself
    when every externally stored tensor was left there (ORT reads the weights from disk, no
    copy in memory), else the loaded model (ORT cannot open a file whose shape constants are
    stored externally, which the loader reads in)."""
    if not has_stubs(model):
        return model
    on_disk = onnx.load_model(str(path), load_external_data=False)
    external = sum(1 for t in iter_tensors(on_disk)
                   if t.data_location == onnx.TensorProto.EXTERNAL)
    return Path(path) if external == sum(1 for _ in stubs(model)) else model


@contextlib.contextmanager
def _session(model: ModelLike) -> Iterator[ort.InferenceSession]:
    """An ORT CPU session with optimizations off; temporary files live as long as the session."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # fatal only: a failure comes back as our one-line error
    if isinstance(model, onnx.ModelProto) and has_stubs(model):
        model = materialize(model)  # ONNX Runtime needs the detached weights' bytes
    with contextlib.ExitStack() as stack:
        try:
            runnable = _without_plugins(model)
        except InputError as exc:  # a plugin node without a spec: this model cannot run here
            raise _OrtFailure(str(exc)) from exc
        source = _session_source(runnable, stack)
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several unrelated pybind exception types
            raise _OrtFailure(first_line(exc)) from exc
        yield session


def _without_plugins(model: ModelLike) -> ModelLike:
    """``model`` with TensorRT plugin nodes spelled in standard ops (ORT cannot load plugins;
    see ``xattn_compiler.plugins.decompose``); any other model unchanged."""
    from .plugins import decompose_plugins, has_plugin_nodes

    proto = model
    if not isinstance(model, onnx.ModelProto):
        if not Path(model).is_file():
            return model
        try:  # the nodes are enough to decide; the weights only when it has plugin nodes
            proto = onnx.load(str(model), load_external_data=False)
        except Exception:  # not loadable: ORT reports it in its own words
            return model
        if not has_plugin_nodes(proto):
            return model
        proto = onnx.load(str(model))
    elif not has_plugin_nodes(model):
        return model
    return decompose_plugins(proto)


def _session_source(model: ModelLike, stack: contextlib.ExitStack) -> str | bytes:
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise _OrtFailure(f"{path}: no such file")
        return str(path)
    # Looked up on the module at call time so that the limit can be lowered in tests.
    if xio.weight_bytes(model) < xio.PROTOBUF_LIMIT:
        return model.SerializeToString()
    # Too big for one protobuf message: ORT must read the weights from an external data file.
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xattn-verify-")))
    path = xio.save(model, tmp / "model.onnx", external_data=True)
    log.debug("verify: wrote a model with external data to %s for ONNX Runtime", path)
    return str(path)


def _run(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # np.asarray, not np.ascontiguousarray: the latter makes a 0-d input 1-d (a scalar input
    # then ran as shape [1], and a correct fold of Shape(scalar) looked like a mismatch).
    arrays = {name: np.asarray(value, order="C") for name, value in inputs.items()}
    try:
        # OrtValues (not session.run) because ORT's numpy bridge rejects bfloat16 and float8.
        feeds = {name: _to_ort_value(array) for name, array in arrays.items()}
        values = session.run_with_ort_values(None, feeds)
    except Exception as exc:  # ORT raises several unrelated pybind exception types
        raise _OrtFailure(first_line(exc)) from exc
    names = [output.name for output in session.get_outputs()]
    return {name: _from_ort_value(name, value) for name, value in zip(names, values, strict=True)}


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype.kind == "V":  # an ml_dtypes type: hand ORT the bits and the ONNX type
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        bits = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, elem_type)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_ort_value(name: str, value: ort.OrtValue) -> np.ndarray:
    if not value.is_tensor():
        raise _OrtFailure(f"output '{name}' is not a tensor; only tensor outputs can be compared")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.element_type()))
    if dtype.kind != "V":
        return np.array(value.numpy(), copy=True)
    # ORT cannot convert bfloat16/float8 to numpy, so copy the raw bytes out of its buffer.
    shape = tuple(value.shape())
    size = value.tensor_size_in_bytes()
    if size == 0:
        return np.empty(shape, dtype)
    raw = ctypes.string_at(value.data_ptr(), size)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _describe(model: ModelLike) -> str:
    if isinstance(model, onnx.ModelProto):
        return f"'{model.graph.name or 'unnamed'}' (in memory)"
    return str(model)


# --- inputs --------------------------------------------------------------------------------

def _given_inputs(inputs, reference: ModelLike, names: list[str]) -> dict[str, np.ndarray]:
    """The arrays both models get when the caller gives them, checked against the
    reference's declared inputs and keyed by its input names."""
    if isinstance(inputs, (str, os.PathLike)):
        return check_given(load_inputs(inputs, reference), reference, names, str(inputs))
    if isinstance(inputs, Mapping):
        return check_given(inputs, reference, names)
    raise InputError(f"inputs must be None, a dict or an .npz path, not {type(inputs).__name__}")


def _select_inputs(given: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    missing = [name for name in names if name not in given]
    if missing:
        raise InputError(
            "inputs lack " + ", ".join(f"'{n}'" for n in missing)
            + f" (the model needs {', '.join(names)})")
    # Extra keys (such as 'ref:logits' beside the inputs in an .npz) are not inputs: drop them.
    return {name: np.asarray(given[name]) for name in names}


def check_tolerances(rtol: float | None, atol: float | None) -> tuple[float | None, float | None]:
    """``(rtol, atol)`` as floats (None stays None: the dtype's default), or an
    :class:`InputError`: a NaN tolerance would pass any candidate (every comparison with NaN
    is false, so nothing is ever out of tolerance), and a negative one fails every candidate."""
    checked = []
    for name, value in (("rtol", rtol), ("atol", atol)):
        if value is None:
            checked.append(None)
            continue
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name} must be a number, not {value!r}") from exc
        if isinstance(value, bool) or not math.isfinite(number) or number < 0:
            raise InputError(f"{name}={value!r}: a tolerance must be a finite number >= 0")
        checked.append(number)
    return checked[0], checked[1]


# --- verification --------------------------------------------------------------------------

class CandidateError(Exception):
    """Raised by a :data:`Runner` given to :func:`verify_with`: the candidate cannot produce
    outputs for these inputs; the message is the reason the result reports."""


@dataclass
class _ReferenceRun:
    inputs: InputSet
    outputs: dict[str, np.ndarray]


def verify(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    inputs=None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    profile: str = "thorough",
) -> VerifyResult:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output.

    ``inputs`` is None (seeded random input sets, see :mod:`~xattn_compiler.verification_inputs`:
    ``profile`` picks them, ``thorough`` three bindings and ``quick`` one; ``seed`` and ``dims``
    apply, ``dims`` pinning sizes in every set), a dict of arrays, or the path of an ``.npz``
    (keys that are not inputs of the reference are ignored; the others must have the input's
    element type and rank). Floats pass when ``|cand - ref| <= atol + rtol * |ref|``
    elementwise, with :func:`default_tolerances` unless ``rtol``/``atol`` are given (a given
    ``atol`` is absolute); NaNs must sit at the same places and infinities must match.
    Integers and bools compare exactly. Outputs pair up by name, or by position when the names
    differ but the counts agree. The check passes when every set that ran passes.

    A candidate that ONNX Runtime cannot load or run, or whose inputs differ from the
    reference's, gives ``ok=False`` with the reason. Raises :class:`InputError` when a
    tolerance is NaN, infinite or negative, the reference cannot be loaded or runs on no
    input set, or the inputs are unusable.
    """
    rtol, atol = check_tolerances(rtol, atol)
    events = _reference_runs(reference, inputs, seed, dims, profile)
    feeds = [event.inputs.feeds for event in events if isinstance(event, _ReferenceRun)]
    # One session at a time: on a multi-gigabyte model two live sessions double the peak.
    with contextlib.ExitStack() as stack:
        produced = _candidate_outputs(candidate, feeds, stack)
    result = _judge(reference, events, produced, rtol, atol)
    log.info("verify %s against %s on %d input set(s): %s", _describe(candidate),
             _describe(reference), result.num_input_sets, "PASS" if result.ok else "FAIL")
    return result


def verify_with(
    reference: ModelLike,
    run: Runner,
    *,
    inputs=None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
    profile: str = "thorough",
) -> VerifyResult:
    """:func:`verify` for a candidate that is not one model (a projector feeding a decoder,
    say): ``run(feeds)`` returns its outputs by name, or raises :class:`CandidateError` with
    the reason it cannot. Inputs, tolerances, seed, dims and profile as for :func:`verify`."""
    rtol, atol = check_tolerances(rtol, atol)
    events = _reference_runs(reference, inputs, seed, dims, profile)
    produced = []
    for event in events:
        if isinstance(event, _ReferenceRun):
            try:
                produced.append((dict(run(event.inputs.feeds)), None))
            except CandidateError as exc:
                produced.append((None, str(exc)))
    result = _judge(reference, events, produced, rtol, atol)
    log.info("verify against %s on %d input set(s): %s", _describe(reference),
             result.num_input_sets, "PASS" if result.ok else "FAIL")
    return result


def _reference_runs(reference: ModelLike, inputs, seed: int, dims: Mapping[str, int] | None,
                    profile: str) -> list[_ReferenceRun | InputSetReport]:
    """The reference's outputs on each input set it runs, and a skipped report for each set
    it cannot run, in order. Raises :class:`InputError` when it runs none."""
    with contextlib.ExitStack() as stack:
        try:
            session = stack.enter_context(_session(reference))
        except _OrtFailure as exc:
            raise ReferenceRunError(_describe(reference), str(exc)) from exc
        names = [value.name for value in session.get_inputs()]
        if inputs is not None:
            given = InputSet("given", {}, _given_inputs(inputs, reference, names))
            try:
                return [_ReferenceRun(given, _run(session, given.feeds))]
            except _OrtFailure as exc:
                raise InputError(f"reference model {_describe(reference)} fails in ONNX "
                                 f"Runtime: {exc}") from exc
        events = _drawn_runs(session, reference, names, seed, dims, profile)
    if not any(isinstance(event, _ReferenceRun) for event in events):
        tried = "; ".join(f"'{event.name}': {event.reason}" for event in events)
        raise InputError(f"reference model {_describe(reference)} fails in ONNX Runtime on "
                         f"every input set drawn ({tried}); pass inputs (--inputs NPZ)")
    return events


def _drawn_runs(session: ort.InferenceSession, reference: ModelLike, names: list[str],
                seed: int, dims: Mapping[str, int] | None, profile: str
                ) -> list[_ReferenceRun | InputSetReport]:
    """Each set of ``profile`` at its first binding the reference runs; the bindings it
    cannot run become skipped reports. Fallbacks are drawn only when needed."""
    proto = _model_proto(reference)
    events: list[_ReferenceRun | InputSetReport] = []
    for index, choices in enumerate(binding_plan(proto, dims, profile)):
        for attempt, binding in enumerate(choices):
            if binding.problem is not None:
                events.append(InputSetReport(binding.name, binding.dims, {}, "skipped",
                                             binding.problem, binding.replaces))
                continue
            drawn = draw_set(proto, binding, seed, index, attempt)
            try:
                outputs = _run(session, _select_inputs(drawn.feeds, names))
            except _OrtFailure as exc:
                log.info("verify: the reference fails on input set '%s': %s", binding.name, exc)
                events.append(InputSetReport(binding.name, binding.dims, drawn.input_shapes,
                                             "skipped", f"the reference fails: {exc}",
                                             binding.replaces))
                continue
            events.append(_ReferenceRun(drawn, outputs))
            break
    return events


def _candidate_outputs(candidate: ModelLike, feeds: list[dict[str, np.ndarray]],
                       stack: contextlib.ExitStack
                       ) -> list[tuple[dict[str, np.ndarray] | None, str | None]]:
    """The candidate's outputs on each set of ``feeds`` (one session for all), or None and
    the reason it could not produce them."""
    try:
        session = stack.enter_context(_session(candidate))
    except _OrtFailure as exc:
        return [(None, f"candidate does not load in ONNX Runtime: {exc}")] * len(feeds)
    wanted = [value.name for value in session.get_inputs()]
    given = list(feeds[0]) if feeds else []
    if set(wanted) != set(given):
        extra = [name for name in wanted if name not in given]
        lacking = [name for name in given if name not in wanted]
        parts = []
        if extra:
            parts.append("candidate adds input(s) " + ", ".join(f"'{n}'" for n in extra))
        if lacking:
            parts.append("candidate lacks input(s) " + ", ".join(f"'{n}'" for n in lacking))
        return [(None, "inputs differ from the reference's: " + "; ".join(parts))] * len(feeds)
    results: list[tuple[dict[str, np.ndarray] | None, str | None]] = []
    for feed in feeds:
        try:
            results.append((_run(session, feed), None))
        except _OrtFailure as exc:
            results.append((None, f"candidate fails in ONNX Runtime: {exc}"))
    return results


def _judge(reference: ModelLike, events: list[_ReferenceRun | InputSetReport],
           produced: list[tuple[dict[str, np.ndarray] | None, str | None]],
           rtol: float | None, atol: float | None) -> VerifyResult:
    """The verdict over every input set: each run set compared, the worst check per output."""
    precision = _computed_precision(reference)
    outcomes = iter(produced)
    reports: list[InputSetReport] = []
    checks: list[OutputCheck] = []
    problems: list[tuple[str, str]] = []
    first_shapes: dict[str, tuple] | None = None
    for event in events:
        if isinstance(event, InputSetReport):
            reports.append(event)
            continue
        drawn = event.inputs
        first_shapes = drawn.input_shapes if first_shapes is None else first_shapes
        outputs, problem = next(outcomes)
        set_checks: list[OutputCheck] = []
        if problem is None:
            set_checks, problem = _compare_outputs(event.outputs, outputs, rtol, atol, precision)
            set_checks = [dataclasses.replace(c, input_set=drawn.name) for c in set_checks]
        ok = problem is None and all(check.ok for check in set_checks)
        if problem is not None:
            problems.append((drawn.name, problem))
        reason = problem or _first_failure(set_checks)
        reports.append(InputSetReport(drawn.name, drawn.dims, drawn.input_shapes,
                                      "passed" if ok else "failed", None if ok else reason,
                                      drawn.replaces))
        checks = _worst(checks, set_checks)
    ok = bool(reports) and all(r.status != "failed" for r in reports) and any(
        r.status == "passed" for r in reports)
    return VerifyResult(ok, checks, first_shapes or {}, _model_reason(problems), reports)


def _first_failure(checks: list[OutputCheck]) -> str | None:
    failed = [check.name for check in checks if not check.ok]
    if not failed:
        return None
    return f"{len(failed)} output(s) differ: " + ", ".join(f"'{n}'" for n in failed[:5])


def _model_reason(problems: list[tuple[str, str]]) -> str | None:
    """The model-level failure: the first set's reason, naming the set unless every failing
    set gives the same reason (a candidate that does not load fails them all alike)."""
    if not problems:
        return None
    name, reason = problems[0]
    if all(other == reason for _, other in problems) or name == "given":
        return reason
    return f"{reason} (input set '{name}')"


def _worst(kept: list[OutputCheck], new: list[OutputCheck]) -> list[OutputCheck]:
    """Per output, the check to show: the first failure, else the largest absolute error."""
    if not kept:
        return list(new)
    by_name = {check.name: check for check in kept}
    for check in new:
        old = by_name.get(check.name)
        if old is None:
            by_name[check.name] = check
        elif old.ok and (not check.ok or (check.max_abs_error or 0.0) > (old.max_abs_error or 0.0)):
            by_name[check.name] = check
    return list(by_name.values())


def _compare_outputs(
    ref: dict[str, np.ndarray], cand: dict[str, np.ndarray],
    rtol: float | None, atol: float | None, precision: dict[str, np.dtype] | None = None,
) -> tuple[list[OutputCheck], str | None]:
    """One check per reference output, and a model-level reason if the output sets differ.

    ``precision`` names outputs computed in a narrower float type than they are returned in
    (see :func:`_computed_precision`); their tolerances are that type's."""
    precision = precision or {}
    if set(ref) == set(cand):
        return [_compare(name, ref[name], cand[name], rtol, atol,
                         precision=precision.get(name)) for name in ref], None
    if len(ref) == len(cand):
        # A rewrite may rename outputs; with equal counts, position is the faithful pairing.
        checks = []
        for ref_name, cand_name in zip(ref, cand, strict=True):
            note = None if ref_name == cand_name else (
                f"matched by position to candidate output '{cand_name}'")
            checks.append(_compare(ref_name, ref[ref_name], cand[cand_name], rtol, atol, note,
                                   precision=precision.get(ref_name)))
        return checks, None
    reason = (f"output count differs: reference has {len(ref)} ({', '.join(ref)}), "
              f"candidate has {len(cand)} ({', '.join(cand)})")
    checks = []
    for name, array in ref.items():
        if name in cand:
            checks.append(_compare(name, array, cand[name], rtol, atol))
        else:
            r, a = _tolerance(array, rtol, atol)
            checks.append(OutputCheck(name, array.dtype.name, tuple(array.shape), None, None,
                                      r, a, False, "missing from the candidate"))
    return checks, reason


def _compare(name: str, ref: np.ndarray, cand: np.ndarray, rtol: float | None,
             atol: float | None, note: str | None = None, precision: np.dtype | None = None
             ) -> OutputCheck:
    r_tol, a_tol = _tolerance(ref, rtol, atol, precision)
    dtype, shape = ref.dtype.name, tuple(ref.shape)
    problem = None
    if cand.dtype != ref.dtype:
        problem = f"dtype differs: reference {ref.dtype.name}, candidate {cand.dtype.name}"
    elif cand.shape != ref.shape:
        problem = (f"shape differs: reference {_fmt_shape(ref.shape)}, "
                   f"candidate {_fmt_shape(cand.shape)}")
    if problem is not None:
        return OutputCheck(name, dtype, shape, None, None, r_tol, a_tol, False,
                           _join(note, problem))
    if _is_float(ref.dtype):
        max_abs, max_rel, problem = _float_errors(ref, cand, r_tol, a_tol)
    else:
        max_abs, max_rel, problem = _exact_errors(ref, cand)
    return OutputCheck(name, dtype, shape, max_abs, max_rel, r_tol, a_tol, problem is None,
                       _join(note, problem))


def _tolerance(ref: np.ndarray, rtol: float | None, atol: float | None,
               precision: np.dtype | None = None) -> tuple[float, float]:
    """Effective ``(rtol, atol)`` for one output: zero for exact types, else the defaults
    (atol scaled by the output's magnitude) overridden by what the user gave. ``precision``:
    the float type the output was computed in, when narrower than its own."""
    if not _is_float(ref.dtype):
        return 0.0, 0.0
    default_rtol, atol_factor = default_tolerances(precision if precision is not None else ref.dtype)
    if atol is None:
        values = np.abs(ref.astype(np.float64))
        finite = values[np.isfinite(values)]
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        atol = atol_factor * scale
    return float(default_rtol if rtol is None else rtol), float(atol)


def _float_errors(ref: np.ndarray, cand: np.ndarray, rtol: float, atol: float
                  ) -> tuple[float, float, str | None]:
    """Max abs/rel error over positions finite in both, and the reason the output fails."""
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    nan_mismatch = np.isnan(r) != np.isnan(c)
    # Equal infinities compare equal; any other pairing with an infinity is a mismatch.
    inf_mismatch = (np.isinf(r) | np.isinf(c)) & ~(np.isnan(r) | np.isnan(c)) & (r != c)
    finite = np.isfinite(r) & np.isfinite(c)
    diff = np.zeros_like(r)
    diff[finite] = np.abs(c[finite] - r[finite])
    rel = diff / np.maximum(np.abs(np.where(finite, r, 0.0)), _REL_FLOOR)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    outside = finite & (diff > atol + rtol * np.abs(np.where(finite, r, 0.0)))
    problems = []
    if nan_mismatch.any():
        problems.append(f"NaN mismatch at {_count(nan_mismatch)}, "
                        f"first at {_first_index(nan_mismatch)}")
    if inf_mismatch.any():
        problems.append(f"inf mismatch at {_count(inf_mismatch)}, "
                        f"first at {_first_index(inf_mismatch)}")
    if outside.any():
        worst = tuple(int(i) for i in
                      np.unravel_index(int(np.argmax(np.where(outside, diff, -1.0))), r.shape))
        problems.append(f"{_count(outside)} out of tolerance, worst at {list(worst)}: "
                        f"reference {r[worst]:.6g}, candidate {c[worst]:.6g}")
    return max_abs, max_rel, "; ".join(problems) or None


def _exact_errors(ref: np.ndarray, cand: np.ndarray) -> tuple[float | None, float | None,
                                                                 str | None]:
    unequal = ref != cand
    problem = None
    if np.any(unequal):
        where = tuple(_first_index(unequal))
        problem = (f"{_count(unequal)} differ (exact comparison), first at {list(where)}: "
                   f"reference {ref[where].item()!r}, candidate {cand[where].item()!r}")
    if ref.dtype.kind not in "biu":
        return None, None, problem  # strings and the like have no numeric error
    diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
    rel = diff / np.maximum(np.abs(ref.astype(np.float64)), _REL_FLOOR)
    return (float(diff.max()) if diff.size else 0.0,
            float(rel.max()) if rel.size else 0.0, problem)


def _count(mask: np.ndarray) -> str:
    return f"{int(np.count_nonzero(mask))} of {mask.size} elements"


def _first_index(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape)]


def _join(*parts: str | None) -> str | None:
    text = "; ".join(part for part in parts if part)
    return text or None
