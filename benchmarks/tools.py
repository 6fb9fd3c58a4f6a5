"""The tools users run today before TensorRT, each as ``name -> fn(ModelProto) -> ModelProto``.

Each runs in-process on a copy; a tool that fails on a model is reported as failed for that
model (its error's first line), never silently skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx

log = logging.getLogger(__name__)


def _onnxsim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim could not validate its result")
    return simplified


def _onnxslim(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _onnxscript_optimizer(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxscript.optimizer
    import onnxscript.rewriter

    optimized = onnxscript.optimizer.optimize(model)
    return onnxscript.rewriter.rewrite(optimized)  # its default rewrite rules


def _onnxscript_ort_fusions(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter import ort_fusions

    ir_model = ir.serde.deserialize_model(model)
    onnxscript.optimizer.optimize(ir_model)
    fused, _counts = ort_fusions.optimize_for_ort(ir_model)
    return ir.serde.serialize_model(fused)


TOOLS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "onnxsim": _onnxsim,
    "onnxslim": _onnxslim,
    "onnxscript optimizer": _onnxscript_optimizer,
    "onnxscript ort_fusions": _onnxscript_ort_fusions,
}


def run_tool(name: str, model: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str | None]:
    """The tool's output, or None and the first line of its error."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    try:
        return TOOLS[name](copy), None
    except Exception as exc:  # a third-party tool failing is a data point, not a crash
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        log.warning("%s failed: %s", name, first)
        return None, f"{type(exc).__name__}: {first[:160]}"
