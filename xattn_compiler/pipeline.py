"""``optimize``: the default pipeline, run on a model, with its report.

The default pipeline grows as passes land; it is always the built-in passes in the order that
makes each one's input canonical for the next. ``optimize`` returns the new model and the
report the CLI writes with ``--report``; it never modifies the model it is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx

from .io import default_opset
from .ir import count_nodes, op_histogram
from .passmanager import Listener, Pass, Pipeline, PipelineResult
from .weights import (
    DETACH_MODEL_BYTES,
    WeightStore,
    detach,
    detachable_bytes,
    has_stubs,
    materialize,
)

#: The built-in passes in the order the default pipeline runs them.
DEFAULT_PIPELINE = "canonicalize,remove-layout-clutter"


class OptimizeResult:
    """The optimized model and the pipeline's report.

    On a model with large weights the passes ran with the weights detached
    (:mod:`xattn_compiler.weights`); ``model`` then puts them back on first use (one copy),
    while :meth:`save` writes them straight from where they are, which is what the CLI does.
    """

    def __init__(self, detached: onnx.ModelProto, pipeline: PipelineResult,
                 store: WeightStore | None = None):
        self.detached = detached
        self.pipeline = pipeline
        self._store = store  # keeps the detached weights readable while this result lives
        self._model: onnx.ModelProto | None = None

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = materialize(self.detached) if has_stubs(self.detached) else self.detached
        return self._model

    @property
    def report(self) -> dict[str, Any]:
        return self.pipeline.report()

    def save(self, path: str | Path, **options: Any) -> Path:
        """``xattn_compiler.save`` of the result, streaming detached weights."""
        from .io import save

        return save(self.detached, path, **options)


def build_pipeline(
    passes: str | Sequence[Pass] | None = None,
    *,
    fixpoint: bool = False,
    max_iterations: int = 8,
    debug: bool = False,
    reproducer: str | Path | None = None,
) -> Pipeline:
    """A pipeline from text, a list of passes, or the default when ``passes`` is None."""
    options = dict(fixpoint=fixpoint, max_iterations=max_iterations, debug=debug,
                   reproducer=reproducer)
    if passes is None or isinstance(passes, str):
        return Pipeline.parse(passes or DEFAULT_PIPELINE, **options)
    return Pipeline(list(passes), **options)


def optimize(
    model: onnx.ModelProto,
    passes: str | Sequence[Pass] | None = None,
    *,
    fixpoint: bool = False,
    debug: bool = False,
    reproducer: str | Path | None = None,
    listener: Listener | None = None,
) -> OptimizeResult:
    """Run ``passes`` (pipeline text, pass objects, or the default pipeline) on ``model``."""
    pipeline = build_pipeline(passes, fixpoint=fixpoint, debug=debug, reproducer=reproducer)
    store = None
    if detachable_bytes(model) >= DETACH_MODEL_BYTES:
        # Every pass's export would copy the weights; they travel as stubs instead.
        model, store = detach(model)
    result = pipeline.run(model, listener)
    return OptimizeResult(result.model, result, store)


def model_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Opset, node count and op histogram: the before/after lines of a report."""
    return {"opset": default_opset(model), "num_nodes": count_nodes(model),
            "ops": op_histogram(model)}
