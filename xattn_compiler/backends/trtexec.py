"""The trtexec command that reproduces a build, and a Polygraphy command that checks it.

``build --emit-trtexec`` prints both, shell-quoted, so a user on a TensorRT machine rebuilds
exactly what :func:`~.tensorrt.build_engine` would (same shapes, precision, Softmax
constraints, plugins and timing cache) and compares TensorRT with ONNX Runtime on the same
model. Flags are those of trtexec and Polygraphy for TensorRT 10 (``--staticPlugins`` replaced
``--plugins`` there; TensorRT 11 drops ``--fp16``/``--bf16`` for strongly typed networks).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from ..errors import InputError
from . import trt_ops
from .profiles import Profile

_TRTEXEC_PRECISION = {"fp32": [], "fp16": ["--fp16"], "bf16": ["--bf16"], "int8": ["--int8"]}
_POLYGRAPHY_PRECISION = _TRTEXEC_PRECISION


@dataclass
class BuildPlan:
    """What one engine build needs; the CLI makes one per model (two for a split model)."""

    model: Path
    engine: Path
    profile: Profile | None
    precision: str = "fp32"
    plugins: Sequence[Path] = ()
    timing_cache: Path | None = None
    fp32_layers: Sequence[str] = field(default_factory=list)
    trt_version: tuple[int, int] = trt_ops.DEFAULT_VERSION
    #: Attention node names the build may decompose when no fused kernel fits.
    decomposable: Sequence[str] = field(default_factory=list)

    @property
    def precision_flags(self) -> bool:
        """Whether this TensorRT takes precision flags (10.x) or the model's types (11.x)."""
        return not trt_ops.strongly_typed_only(self.trt_version)


#: Where the guard-precision pass lists the score MatMul, Softmax and Attention nodes to keep
#: in fp32.
FP32_LAYERS_KEY = "xattn_compiler.fp32_layers"
#: Where ``optimize --decomposable`` lists the Attention nodes TensorRT may decompose.
DECOMPOSABLE_KEY = "xattn_compiler.decomposable_attentions"
_HALF_TYPES = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}


def decomposable_names(model: onnx.ModelProto) -> list[str]:
    """The Attention node names ``optimize --decomposable`` recorded (empty when none)."""
    recorded = {e.key: e.value for e in model.metadata_props}.get(DECOMPOSABLE_KEY, "")
    return [name for name in recorded.split(",") if name]


def mark_decomposable(model: onnx.ModelProto) -> list[str]:
    """Record every ONNX Attention node of ``model`` (bodies included) as decomposable, in its
    metadata under :data:`DECOMPOSABLE_KEY`, and return the names.

    The file stays standard ONNX (ONNX Runtime and onnx.checker reject the parser's own
    ``TRT_decomposable`` node attribute); ``build`` sets ``IAttention.decomposable`` on the
    IAttention each name gives after parsing, and ``--emit-trtexec`` writes
    ``--decomposableAttentions``. The parser names an IAttention after its node, so the names
    are the fusion's deterministic ``<block id>_attention/attention``.
    """
    from ..ir import iter_nodes

    names = [n.name for n in iter_nodes(model.graph)
             if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]
    unnamed = sum(1 for name in names if not name)
    if unnamed:
        raise InputError(f"{unnamed} Attention node(s) have no name; TensorRT finds a "
                         "decomposable attention by its node's name")
    check_trtexec_names(names, "--decomposableAttentions")
    kept = [e for e in model.metadata_props if e.key != DECOMPOSABLE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if names:
        model.metadata_props.add(key=DECOMPOSABLE_KEY, value=",".join(names))
    return names


def model_precision(model: onnx.ModelProto) -> str:
    """``fp16``/``bf16`` when most float weights and inputs are that type, else ``fp32``: what a
    TensorRT 11 engine of the model computes in (it takes the graph's types)."""
    counts: dict[str, int] = {}
    elems = [t.data_type for t in model.graph.initializer] + \
        [v.type.tensor_type.elem_type for v in model.graph.input]
    for elem in elems:
        if elem in (onnx.TensorProto.FLOAT, *_HALF_TYPES):
            name = _HALF_TYPES.get(elem, "fp32")
            counts[name] = counts.get(name, 0) + 1
    return max(counts, key=lambda k: (counts[k], k != "fp32")) if counts else "fp32"


def check_trtexec_names(names: Sequence[str], option: str) -> None:
    """trtexec splits its name lists at ','; a name with one cannot be written."""
    for name in names:
        if "," in name:
            raise InputError(f"node '{name}': a ',' in its name cannot be written in trtexec's "
                             f"{option}; rename the node")


def fp32_layer_names(model: onnx.ModelProto) -> list[str]:
    """The layers to keep in fp32: guard-precision's list when the model carries one, else the
    top-level Softmax nodes (the parser names each layer after its node)."""
    recorded = {e.key: e.value for e in model.metadata_props}.get(FP32_LAYERS_KEY)
    if recorded is not None:
        names = [name for name in recorded.split(",") if name]
    else:
        names = [n.name for n in model.graph.node if n.op_type == "Softmax" and n.name]
    check_trtexec_names(names, "--layerPrecisions")
    return names


def trtexec_command(plan: BuildPlan) -> list[str]:
    """trtexec's argv for ``plan`` (join with :func:`shell_join`)."""
    argv = ["trtexec", f"--onnx={plan.model}", f"--saveEngine={plan.engine}"]
    if plan.profile is not None and plan.profile.inputs:
        argv += [f"--{which}Shapes={plan.profile.spec(which)}" for which in ("min", "opt", "max")]
    if plan.precision_flags:
        argv += _TRTEXEC_PRECISION[plan.precision]
        if plan.fp32_layers:
            layers = ",".join(f"{_quote_layer(name)}:fp32" for name in plan.fp32_layers)
            argv += ["--precisionConstraints=obey", f"--layerPrecisions={layers}"]
    if plan.decomposable:
        check_trtexec_names(plan.decomposable, "--decomposableAttentions")
        argv.append("--decomposableAttentions=" + ",".join(plan.decomposable))
    argv += [f"--staticPlugins={path}" for path in plan.plugins]
    if plan.timing_cache is not None:
        argv.append(f"--timingCacheFile={plan.timing_cache}")
    argv += ["--profilingVerbosity=detailed", f"--exportLayerInfo={plan.engine}.layers.json",
             "--skipInference"]
    return argv


def polygraphy_command(plan: BuildPlan, rtol: float | None = None,
                       atol: float | None = None) -> list[str]:
    """``polygraphy run``: build with TensorRT as in ``plan``, run ONNX Runtime, compare."""
    argv = ["polygraphy", "run", str(plan.model), "--trt", "--onnxrt"]
    if plan.profile is not None and plan.profile.inputs:
        for which in ("min", "opt", "max"):
            argv += [f"--trt-{which}-shapes", *_polygraphy_shapes(plan.profile, which)]
        argv += ["--input-shapes", *_polygraphy_shapes(plan.profile, "opt")]
    if plan.precision_flags:
        argv += _POLYGRAPHY_PRECISION[plan.precision]
    if plan.fp32_layers and plan.precision_flags:
        argv += ["--precision-constraints", "obey", "--layer-precisions",
                 *(f"{name}:float32" for name in plan.fp32_layers)]
    if plan.plugins:
        argv += ["--plugins", *(str(p) for p in plan.plugins)]
    if plan.timing_cache is not None:
        argv += ["--load-timing-cache", str(plan.timing_cache)]
    rtol, atol = _tolerances(plan.precision, rtol, atol)
    argv += ["--rtol", f"{rtol:g}", "--atol", f"{atol:g}"]
    return argv


def shell_join(argv: Iterable[str]) -> str:
    """``argv`` as one shell line, every argument quoted where it needs to be.

    An argument with a control character (a tensor name from a hostile model) is written in
    ANSI-C quotes (``$'a\\x1bb'``, bash, zsh and ksh): the printed line stays one line, does
    not drive the terminal, and still runs the same command.
    """
    return " ".join(_ansi_c_quote(arg) if not arg.isprintable() else shlex.quote(arg)
                    for arg in argv)


def _ansi_c_quote(arg: str) -> str:
    out = []
    for char in arg:
        if char in "\\'":
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.append("".join(f"\\x{byte:02x}" for byte in char.encode("utf-8")))
    return "$'" + "".join(out) + "'"


def _polygraphy_shapes(profile: Profile, which: str) -> list[str]:
    return [f"{name}:[{','.join(str(d) for d in getattr(shapes, which))}]"
            for name, shapes in profile.inputs.items()]


def _quote_layer(name: str) -> str:
    # trtexec splits a spec at its last ':' and strips single quotes around the layer name.
    return f"'{name}'" if ":" in name else name


def _tolerances(precision: str, rtol: float | None, atol: float | None) -> tuple[float, float]:
    # Half precision differs from fp32 ONNX Runtime by design; these are the tolerances the
    # project's own verification uses per dtype.
    half = precision in ("fp16", "bf16", "int8")
    return (rtol if rtol is not None else (2e-2 if half else 1e-3),
            atol if atol is not None else (2e-2 if half else 1e-4))
