"""``optimize``: the default pipeline, run on a model, with its report.

The default pipeline grows as passes land; it is always the built-in passes in the order that
makes each one's input canonical for the next. ``optimize`` returns the new model and the
report the CLI writes with ``--report``; it never modifies the model it is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from .io import default_opset
from .ir import count_nodes, op_histogram
from .passmanager import Listener, Pass, Pipeline, PipelineError, PipelineResult
from .weights import (
    DETACH_MODEL_BYTES,
    WeightStore,
    collecting,
    detach,
    detachable_bytes,
    has_stubs,
    materialize,
)

#: The built-in passes in the order the default pipeline runs them.
DEFAULT_PIPELINE = ("canonicalize,normalize-spellings,unroll-control-flow,remove-layout-clutter,"
                    "fuse-attention")
#: Fusion targets (``fuse-attention{target=...}``); the first is the default.
TARGETS = ("onnx-attention", "canonical", "trt-plugin", "ort-mha")
#: ``optimize --precision`` choices (``convert-precision{precision=...}``).
PRECISIONS = ("fp16", "bf16")
#: Q/K/V layouts of ``onnx-attention`` (``fuse-attention{qkv-layout=...}``); the first is the default.
QKV_LAYOUTS = ("4d", "3d")


def default_pipeline(
    target: str | None = None,
    specialize: Mapping[str, Any] | None = None,
    plugin_spec: str | Path | None = None,
    guard_precision: bool = False,
    qkv_layout: str | None = None,
    precision: str | None = None,
    audit: bool = True,
    precision_inputs: str | Path | None = None,
    convert_io: bool = False,
) -> str:
    """The default pipeline's text for a fusion target, input values to specialise on, a
    plugin spec (``trt-plugin``), the Q/K/V layout (``onnx-attention``: ``4d`` or ``3d``) and,
    when asked, ``guard-precision`` or ``convert-precision`` (``precision``: fp16 or bf16; with
    the audit on ``precision_inputs`` or drawn inputs unless ``audit`` is False) at the end."""
    target = target or TARGETS[0]
    if target not in TARGETS:
        raise PipelineError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if plugin_spec and target != "trt-plugin":
        raise PipelineError("a plugin spec applies to --target trt-plugin only")
    if qkv_layout and target != "onnx-attention":
        raise PipelineError("a Q/K/V layout applies to --target onnx-attention only")
    if qkv_layout and qkv_layout not in QKV_LAYOUTS:
        raise PipelineError(f"unknown Q/K/V layout {qkv_layout!r}; choose one of "
                            f"{', '.join(QKV_LAYOUTS)}")
    unroll = "unroll-control-flow"
    if specialize:
        values = ",".join(f"{name}={_value_text(value)}" for name, value in specialize.items())
        unroll += f"{{values={values}}}"
    fuse = f"fuse-attention{{target={target}"
    fuse += f" plugin-spec={plugin_spec}" if plugin_spec else ""
    fuse += f" qkv-layout={qkv_layout}}}" if qkv_layout else "}"
    passes = ["canonicalize", "normalize-spellings", unroll, "remove-layout-clutter", fuse]
    if guard_precision:
        passes.append("guard-precision")
    if precision:
        passes.append(_convert_text(precision, audit, precision_inputs, convert_io, guard_precision))
    return ",".join(passes)


def _convert_text(precision: str, audit: bool, inputs: str | Path | None, convert_io: bool,
                  guard_precision: bool) -> str:
    # After fusion: each block converts whole, one Attention node with half Q/K/V.
    if precision not in PRECISIONS:
        raise PipelineError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if guard_precision:
        raise PipelineError("guard_precision is for TensorRT 10 builds of fp32 models with "
                            "--fp16; a converted model (precision) carries its own types")
    text = f"convert-precision{{precision={precision}"
    text += f" audit={str(bool(audit)).lower()}"
    text += f" inputs={_value_text(str(inputs))}" if inputs and audit else ""
    text += " convert-io=true" if convert_io else ""
    return text + "}"


def _value_text(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    if any(c.isspace() for c in text) or "," in text or "}" in text:
        raise PipelineError(f"cannot write the value {value!r} into a pipeline")
    return text


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
    target: str | None = None,
    specialize: Mapping[str, Any] | None = None,
    plugin_spec: str | Path | None = None,
    guard_precision: bool = False,
    qkv_layout: str | None = None,
    precision: str | None = None,
    audit: bool = True,
    precision_inputs: str | Path | None = None,
    convert_io: bool = False,
) -> OptimizeResult:
    """Run ``passes`` (pipeline text, pass objects, or the default pipeline) on ``model``.

    ``target``, ``specialize`` (graph input -> value), ``plugin_spec``, ``guard_precision``,
    ``qkv_layout`` and ``precision`` (fp16 or bf16: ``convert-precision`` after fusion, with
    ``audit``, ``precision_inputs`` and ``convert_io``) shape the default pipeline
    (:func:`default_pipeline`); with explicit ``passes`` say the same in the text, e.g.
    ``fuse-attention{target=canonical}``.
    """
    shaped = (target is not None or specialize or plugin_spec or guard_precision or qkv_layout
              or precision)
    if shaped and passes is not None:
        raise PipelineError("target, specialize, plugin_spec, guard_precision, qkv_layout and "
                            "precision shape the default pipeline; with explicit passes, give "
                            "them as pass options")
    if passes is None:
        passes = default_pipeline(target, specialize, plugin_spec, guard_precision, qkv_layout,
                                  precision, audit, precision_inputs, convert_io)
    pipeline = build_pipeline(passes, fixpoint=fixpoint, debug=debug, reproducer=reproducer)
    store = None
    if detachable_bytes(model) >= DETACH_MODEL_BYTES:
        # Every pass's export would copy the weights; they travel as stubs instead.
        model, store = detach(model)
    elif has_stubs(model):
        store = WeightStore()  # weights read lazily from files: computed ones join them
    with collecting(store):
        result = pipeline.run(model, listener)
    return OptimizeResult(result.model, result, store)


def model_summary(model: onnx.ModelProto) -> dict[str, Any]:
    """Opset, node count and op histogram: the before/after lines of a report."""
    return {"opset": default_opset(model), "num_nodes": count_nodes(model),
            "ops": op_histogram(model)}
