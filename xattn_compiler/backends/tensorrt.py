"""Build a TensorRT engine from an ONNX model (TensorRT >= 10 Python API, imported lazily).

:func:`build_engine` parses the model with ``OnnxParser`` (every parser error is reported with
its node), marks the named Attention nodes decomposable, adds one optimization profile per
:class:`~.profiles.Profile`, sets the precision flags (TensorRT 10.x; 11.x has none and takes
the model's types), optionally keeps Softmax layers in fp32 (precision constraints, obeyed;
10.x only), loads plugin libraries, reads and updates a timing cache, writes the engine
atomically and summarizes it with the engine inspector (the 10.x and the 11.x JSON). Importing this module never imports TensorRT; calling into it
without TensorRT raises :class:`TensorRTMissing`, which the CLI turns into exit code 2 with
:data:`INSTALL_HINT`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from .. import outputs
from ..errors import InputError
from . import trt_ops
from .profiles import InputShapes, Profile, derive_profile
from .trtexec import fp32_layer_names

log = logging.getLogger(__name__)

MIN_VERSION = (10, 0)
PRECISIONS = ("fp32", "fp16", "bf16", "int8")

INSTALL_HINT = (
    "install TensorRT >= 10 on a machine with an NVIDIA GPU: `pip install tensorrt` "
    "(NVIDIA's wheels, from pypi.nvidia.com) or run inside the nvcr.io/nvidia/tensorrt "
    "container; without it, `xattn-compiler build MODEL --engine OUT.plan --emit-trtexec` prints "
    "the equivalent trtexec and Polygraphy commands to run where TensorRT is installed")


class TensorRTMissing(InputError):
    """TensorRT cannot be imported (or is older than 10)."""


class TensorRTBuildError(InputError):
    """The parser rejected the model or the builder failed; names the nodes when it can."""


@dataclass
class ParserIssue:
    """One ``OnnxParser`` error, with the node it is about."""

    node_index: int
    node_name: str
    op: str
    description: str
    code: str

    def __str__(self) -> str:
        where = f"node '{self.node_name}' ({self.op})" if self.node_name else \
            f"node #{self.node_index}" if self.node_index >= 0 else "the model"
        return f"{where}: {self.description} [{self.code}]"


@dataclass
class BuildResult:
    engine: Path
    seconds: float
    precision: str
    profiles: list[Profile]
    fp32_layers: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    timing_cache: Path | None = None


def import_tensorrt() -> Any:
    """The ``tensorrt`` module; :class:`TensorRTMissing` naming the remedy when it is absent."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTMissing(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from None
    version = tuple(int(p) for p in trt.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_VERSION:
        raise TensorRTMissing(f"TensorRT {trt.__version__} is too old (need >= 10); {INSTALL_HINT}")
    return trt


def build_engine(
    model: onnx.ModelProto | str | os.PathLike,
    profiles: Profile | Sequence[Profile] | None = None,
    precision: str = "fp32",
    plugins: Iterable[str | os.PathLike] = (),
    *,
    engine_path: str | os.PathLike,
    timing_cache: str | os.PathLike | None = None,
    fp32_softmax: bool = False,
    workspace_bytes: int | None = None,
    optimization_level: int | None = None,
    strongly_typed: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    decomposable: Sequence[str] = (),
    trt_version: tuple[int, int] | None = None,
) -> BuildResult:
    """Build ``model`` into a serialized engine at ``engine_path`` (written atomically).

    ``profiles`` default to :func:`~.profiles.derive_profile` of the model. ``precision`` is
    one of :data:`PRECISIONS`; with ``fp32_softmax`` every Softmax layer is constrained to fp32
    (``OBEY_PRECISION_CONSTRAINTS``), and so is every layer guard-precision listed in the
    model's metadata. ``plugins`` are shared libraries loaded into the plugin
    registry. ``timing_cache`` is read when it exists and written back after the build.
    ``decomposable`` names Attention nodes TensorRT may split into several kernels when no
    fused one fits (``IAttention.decomposable``). ``trt_version`` is the version the caller
    targets; precision flags on 11.x (asked, or installed) are refused before the build.
    """
    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if trt_version is not None:
        _refuse_flags_on_11(trt_version, precision, fp32_softmax)
    engine_path = Path(engine_path)
    guarded = [*protect, *([model] if isinstance(model, (str, os.PathLike)) else [])]
    outputs.check(engine_path, guarded)  # before a build of minutes, not after it
    trt = import_tensorrt()
    installed = installed_version(trt)
    _refuse_flags_on_11(installed, precision, fp32_softmax)
    if trt_version is not None and trt_version[0] != installed[0]:
        log.warning("building with TensorRT %s, not the %s asked for", trt.__version__,
                    trt_ops.format_version(trt_version))
    started = time.perf_counter()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    trt.init_libnvinfer_plugins(logger, "")
    _libraries = _load_plugins(plugins)   # handles must outlive the build
    # 11 is always strongly typed (the flag is a deprecated no-op there).
    typed = strongly_typed and not trt_ops.strongly_typed_only(installed)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = builder.create_network(flags)
    proto = _parse(trt, network, logger, model)
    _set_decomposable(trt, network, decomposable)
    if profiles is None:
        profiles = derive_profile(proto)
    profiles = [profiles] if isinstance(profiles, Profile) else list(profiles)
    config = builder.create_builder_config()
    _add_profiles(builder, config, network, profiles)
    _set_precision(trt, config, precision, strongly_typed)
    # In an fp32 build Softmax already runs in fp32: constraints would only cost tactics.
    fp32_layers = (_constrain_fp32(trt, config, network, fp32_layer_names(proto))
                   if fp32_softmax and precision != "fp32" else [])
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    cache = _attach_timing_cache(config, timing_cache)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        errors = "; ".join(logger.errors[-5:]) or "no error was logged"
        raise TensorRTBuildError(f"TensorRT could not build an engine from the model: {errors}")
    outputs.write_bytes(engine_path, bytes(plan), guarded)
    if cache is not None and timing_cache is not None:
        outputs.write_bytes(Path(timing_cache), bytes(config.get_timing_cache().serialize()),
                            guarded)
    summary = inspect_engine(trt, logger, bytes(plan))
    return BuildResult(engine_path, time.perf_counter() - started, precision, profiles,
                       fp32_layers, summary, Path(timing_cache) if timing_cache else None)


# --- steps -----------------------------------------------------------------------------------

def installed_version(trt: Any) -> tuple[int, int]:
    parts = [int(p) for p in trt.__version__.split(".")[:2] if p.isdigit()]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def _refuse_flags_on_11(version: tuple[int, int], precision: str, fp32_softmax: bool) -> None:
    if not trt_ops.strongly_typed_only(version):
        return
    label = trt_ops.format_version(version)
    if precision != "fp32":
        raise InputError(f"--{precision}: TensorRT {label} has no precision flags (the model's "
                         "own types decide); convert the model with `xattn-compiler optimize "
                         f"MODEL -o OUT --precision {precision}` and build that")
    if fp32_softmax:
        raise InputError(f"--fp32-softmax: TensorRT {label} has no per-layer precision "
                         "constraints; keep the Softmax in fp32 in the graph (optimize --precision)")


def _set_decomposable(trt: Any, network: Any, names: Sequence[str]) -> list[str]:
    """Mark the IAttention named after each node in ``names`` decomposable, as trtexec's
    --decomposableAttentions does: through the ATTENTION_INPUT boundary layers."""
    wanted, marked = set(names), []
    if not wanted:
        return marked
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if kind is None:
        raise TensorRTBuildError(f"TensorRT {trt.__version__} has no IAttention (10.14+): "
                                 "decomposable attention cannot be set")
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type != kind:
            continue
        layer.__class__ = trt.IAttentionInputLayer   # get_layer returns the ILayer base
        attention = layer.attention
        if attention.name in wanted and attention.name not in marked:
            attention.decomposable = True
            marked.append(attention.name)
    missing = sorted(wanted - set(marked))
    if missing:
        log.warning("no IAttention named %s in the parsed network", ", ".join(missing))
    return marked


def _make_logger(trt: Any) -> Any:
    class Logger(trt.ILogger):
        """Forwards TensorRT's log to ours and keeps the errors for the failure message."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.WARNING:
                log.warning("TensorRT: %s", msg)
            else:
                log.debug("TensorRT: %s", msg)

    return Logger()


def _load_plugins(plugins: Iterable[str | os.PathLike]) -> list[Any]:
    # Loading the library runs its static plugin registrations (REGISTER_TENSORRT_PLUGIN), as
    # trtexec --staticPlugins and Polygraphy --plugins do; the handles must outlive the build.
    import ctypes

    handles = []
    for path in plugins:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: plugin library not found")
        try:
            handles.append(ctypes.CDLL(str(path.resolve()), mode=ctypes.RTLD_GLOBAL))
        except OSError as exc:
            raise TensorRTBuildError(f"{path}: the plugin library does not load: {exc}") from None
    return handles


def _parse(trt: Any, network: Any, logger: Any, model: Any) -> onnx.ModelProto:
    parser = trt.OnnxParser(network, logger)
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        # From the file, so external data next to it is found.
        ok = parser.parse_from_file(str(path))
        proto = onnx.load(str(path), load_external_data=False)
    else:
        proto = model
        ok = parser.parse(proto.SerializeToString())
    if not ok or parser.num_errors:
        issues = parser_issues(parser)
        raise TensorRTBuildError(
            f"TensorRT's ONNX parser rejected the model ({len(issues)} error(s)): "
            + "; ".join(str(i) for i in issues) + " -- run `xattn-compiler lint-trt` for fixes")
    return proto


def parser_issues(parser: Any) -> list[ParserIssue]:
    """Every error of an ``OnnxParser`` after ``parse``, with node index, name and op."""
    issues = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        issues.append(ParserIssue(
            node_index=int(error.node()), node_name=_call(error, "node_name"),
            op=_call(error, "node_operator"), description=str(error.desc()),
            code=str(error.code()).rsplit(".", 1)[-1]))
    return issues


def _call(error: Any, method: str) -> str:
    # node_name/node_operator arrived in TensorRT 10; keep older-looking errors readable.
    fn = getattr(error, method, None)
    return str(fn()) if fn is not None else ""


def _add_profiles(builder: Any, config: Any, network: Any, profiles: list[Profile]) -> None:
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    dynamic = {name for name, t in inputs.items() if any(d < 0 for d in t.shape)}
    for index, profile in enumerate(profiles):
        unknown = set(profile.inputs) - set(inputs)
        if unknown:
            raise InputError(f"profile {index} names {sorted(unknown)}, which are not inputs of "
                             f"the network ({', '.join(inputs)})")
        missing = dynamic - set(profile.inputs)
        if missing:
            raise InputError(f"profile {index} has no shapes for dynamic input(s) "
                             f"{sorted(missing)}; add --profile NAME:MIN:OPT:MAX")
        trt_profile = builder.create_optimization_profile()
        for name, shapes in profile.inputs.items():
            _set_shape(trt_profile, inputs[name], shapes)
        config.add_optimization_profile(trt_profile)


def _set_shape(trt_profile: Any, tensor: Any, shapes: InputShapes) -> None:
    if getattr(tensor, "is_shape_tensor", False):
        raise InputError(f"input '{tensor.name}' is a shape tensor: its profile needs values, "
                         "which xattn-compiler does not derive; build it with trtexec")
    trt_profile.set_shape(tensor.name, *shapes.as_tuple())


def _set_precision(trt: Any, config: Any, precision: str, strongly_typed: bool) -> None:
    # Weak typing (these flags, per-layer precision) is deprecated since TensorRT 10.12 and gone
    # in 11, which builds strongly typed networks only.
    if precision == "fp32":
        return
    if strongly_typed:
        raise InputError(f"--{precision} with a strongly typed network: the model's own types "
                         "decide precision; convert the model instead")
    flag = getattr(trt.BuilderFlag, precision.upper(), None)
    if flag is None:
        raise TensorRTBuildError(f"TensorRT {trt.__version__} has no BuilderFlag.{precision.upper()}"
                                 " (newer TensorRT builds strongly typed networks only): convert "
                                 f"the model to {precision} before building")
    config.set_flag(flag)


def _constrain_fp32(trt: Any, config: Any, network: Any, names: list[str]) -> list[str]:
    wanted = set(names)
    constrained = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.SOFTMAX or layer.name in wanted:
            layer.precision = trt.float32
            for output in range(layer.num_outputs):
                layer.set_output_type(output, trt.float32)
            constrained.append(layer.name)
    if constrained:
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    return constrained


def _attach_timing_cache(config: Any, path: str | os.PathLike | None) -> Any:
    if path is None:
        return None
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise TensorRTBuildError(f"{path}: the timing cache does not match this GPU or TensorRT; "
                                 "delete it to start a new one")
    return cache


def inspect_engine(trt: Any, logger: Any, plan: bytes) -> dict[str, Any]:
    """The engine inspector's layer information, summarized (see :func:`summarize_layers`)."""
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        return {"error": "the engine could not be deserialized for inspection"}
    inspector = engine.create_engine_inspector()
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return summarize_layers(info)


def summarize_layers(info: dict[str, Any]) -> dict[str, Any]:
    """Layer count, layer types, the layers that look like fused attention, and the I/O tensors.

    ``info`` is the engine inspector's JSON. TensorRT 10.x writes
    ``{"Layers": [...], "Bindings": ["name", ...]}``; 11.x replaced ``Bindings`` with
    ``"I/O Tensors"``, a list of objects (``Name``, ``IOMode``, ``DataType``, ``Dimensions``,
    ``ProfileInfo`` with each profile's ``Format``). With detailed profiling verbosity each
    layer is an object with ``Name`` and ``LayerType``, else a name. A layer counts as fused
    attention when its name, type or tactic mentions ``mha``, ``attention`` or ``kgen``
    (Myelin's ``_gemm_mha_v2``, IAttention layers, Myelin's generated kernels).
    """
    layers = info.get("Layers", [])
    types: Counter[str] = Counter()
    attention = []
    attention_types: dict[str, str] = {}   # the type its first input runs in
    for layer in layers:
        if isinstance(layer, str):
            name, kind, text = layer, "unknown", layer
        else:
            name, kind = str(layer.get("Name", "")), str(layer.get("LayerType", "unknown"))
            text = " ".join(str(layer.get(key, "")) for key in ("Name", "LayerType", "TacticName"))
        types[kind] += 1
        if any(word in text.lower() for word in ("mha", "attention", "kgen")):
            attention.append(name)
            inputs = layer.get("Inputs") if isinstance(layer, dict) else None
            if inputs and isinstance(inputs[0], dict):
                attention_types[name] = tensor_type(inputs[0])
    io = [_io_tensor(entry) for entry in info.get("I/O Tensors", [])]
    bindings = [t["name"] for t in io] or [str(b) for b in info.get("Bindings", [])]
    return {"layers": len(layers), "layer_types": dict(types.most_common()),
            "attention_layers": attention, "attention_types": attention_types,
            "bindings": bindings, "io_tensors": io}


def tensor_type(entry: dict[str, Any]) -> str:
    """A layer input/output's data type: 11.x's ``DataType``, or parsed out of 10.x's
    ``Format/Datatype`` text ("Row major linear FP32", "Channel major FP16 format ...")."""
    if "DataType" in entry:
        return str(entry["DataType"])
    text = str(entry.get("Format/Datatype", "")).upper()
    for word, name in (("BFLOAT16", "BFloat16"), ("BF16", "BFloat16"), ("FP16", "Half"),
                       ("HALF", "Half"), ("FP32", "Float"), ("FLOAT", "Float"),
                       ("INT64", "Int64"), ("INT32", "Int32"), ("INT8", "Int8"),
                       ("FP8", "FP8"), ("BOOL", "Bool")):
        if word in text:
            return name
    return "unknown"


def _io_tensor(entry: Any) -> dict[str, Any]:
    if not isinstance(entry, dict):
        return {"name": str(entry)}
    profiles = entry.get("ProfileInfo") or []
    return {"name": str(entry.get("Name", "")), "mode": str(entry.get("IOMode", "")).lower(),
            "dtype": tensor_type(entry), "shape": list(entry.get("Dimensions", [])),
            "formats": [str(p.get("Format", "")) for p in profiles if isinstance(p, dict)]}
