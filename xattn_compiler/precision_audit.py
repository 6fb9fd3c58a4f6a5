"""The data-driven precision audit, CPU views of half-precision models, and their tolerances.

**Audit** (:func:`audit_model`): run the fp32 model (after fusion) in ONNX Runtime on sample
inputs and measure per block (fused Attention nodes: from Q and K, exposed as extra outputs and
scored in float64 a few query rows at a time; unfused cores: reductions of the scores added
to the graph, so a [2, 8, 4096, 4096] score tensor never comes back whole)

* ``max_abs_score``: the largest ``|scale * Q K^T|`` before the mask. fp16 stops at 65504, and a
  kernel that stores scores in half rounds each by ``|s| * 2^-11`` (fp16) or ``|s| * 2^-8``
  (bf16), which ``exp`` turns into the same relative error in every probability;
* ``normaliser``: the largest row sum of ``exp(s - rowmax)`` (mask applied), what an
  unnormalised fused kernel accumulates before it divides. Each term is at most 1, so the
  bound is the K/V length: 65,536 equal keys make 65,536, past fp16's 65504 (inf, then NaN);

and per float tensor its range (``tensor_ranges``: ReduceMin/ReduceMax in the graph, right
after the tensor is made; the ones beyond fp16's range are reported). Memory stays about one
fp32 session: ONNX Runtime reads a lazily loaded model's weights from its file, and one session
is alive at a time (issue #18: the SD-1.5-sized UNet's audit was OOM-killed at 23.8 GB).

A block whose scores overflow or lose more than the tolerance gets **fp32 accumulation** (Cast
Q/K/V to fp32 around the Attention, the output back; TensorRT 11.3+): bf16 would fix the range
but round the scores 8x coarser. A block whose only problem is the normaliser gets **bf16**
when its scores stay within the tolerance in bf16 (range of fp32, still a half-precision fused
kernel, TensorRT before 11.3 too), else fp32 accumulation.

**CPU views** (:func:`cpu_view`): ONNX Runtime's CPU provider computes fp16 Attention in fp32
and has no bf16 kernels, so a converted model verifies through a view that shows what a
half-precision GPU kernel does: each half Attention becomes the kernel's steps in its type
(``sqrt(scale)`` on Q and K as TensorRT's importer does, scores, max, ``exp``, the unnormalised
sum and ``e V``, divided last), every bf16 tensor becomes fp32 rounded to bf16 after each node.

**Tolerances** (:func:`precision_tolerances`): ``rtol = atol/max(1, max|ref|) = 8 u sqrt(depth)``
with the unit roundoff ``u`` (2^-11 fp16, 2^-8 bf16) and ``depth`` the number of attention
blocks plus one: each residual layer adds a few roundings, independent ones grow like a random
walk, and 8 covers the handful per layer (projections, norm output, residual add).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .ir import infer_shapes, iter_graph_protos

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}
_HALF = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def precision_tolerances(precision: str, depth: int) -> tuple[float, float]:
    """``(rtol, atol_factor)`` for outputs of a model converted to ``precision`` (fp16 or bf16)
    with ``depth`` rounding layers; the absolute tolerance is ``atol_factor * max(1, max|ref|)``
    as in :func:`~xattn_compiler.verification.default_tolerances`."""
    tol = 8 * UNIT_ROUNDOFF[precision] * math.sqrt(max(1, depth))
    return tol, tol


def model_depth(model: onnx.ModelProto) -> int:
    """Attention blocks plus one: the layers whose roundings add up along the model."""
    from .attention import find_attention

    try:
        return len(find_attention(model)) + 1
    except Exception:  # a graph the matcher cannot read: one layer per Softmax
        return sum(n.op_type in ("Softmax", "Attention") for g in iter_graph_protos(model.graph)
                   for n in g.node) + 1


# --- audit -----------------------------------------------------------------------------------

@dataclass
class BlockAudit:
    """One attention block measured on the sample inputs."""

    name: str                 # the Attention node's output (unfused: the Softmax's output)
    node: str
    kv_length: int | None
    max_abs_score: float
    normaliser: float
    normaliser_bound: float
    findings: list[str] = field(default_factory=list)
    escape: str | None = None  # "fp32" | "bf16"
    reason: str = ""


@dataclass
class PrecisionAudit:
    precision: str
    tolerance: float
    blocks: list[BlockAudit]
    overflowing_tensors: list[dict[str, Any]]
    skipped: list[str]

    def escapes(self) -> tuple[str, ...]:
        return tuple(f"{b.name}:{b.escape}" for b in self.blocks if b.escape)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "tolerance": self.tolerance,
                "blocks": [asdict(b) for b in self.blocks],
                "overflowing_tensors": self.overflowing_tensors[:20],
                "skipped": self.skipped}


def audit_model(model: onnx.ModelProto, precision: str = "fp16", inputs=None, *, seed: int = 0,
                tolerance: float | None = None, tensor_ranges: bool = True) -> PrecisionAudit:
    """Measure every attention block of fp32 ``model`` on sample inputs (``inputs``: a dict, an
    NPZ path, or None for the verification inputs drawn with ``seed``) and choose an escape for
    the blocks that would overflow or lose more than ``tolerance`` in ``precision``."""
    if tolerance is None:
        tolerance = precision_tolerances(precision, model_depth(model))[0]
    feeds = sample_feeds(model, inputs, seed)
    probes, skipped = _probes(model)
    # Q, K and the mask of fused blocks (V does not change the scores): linear in the length
    wanted = sorted({name for probe in probes if probe.kind == "fused"
                     for i, name in enumerate(probe.tensors) if name and i != 2})
    light, store = _light(model)
    infer_shapes(light, in_place=True)  # a copy without the weights: the value_info is ours
    ranges = _float_tensors(light) if tensor_ranges else []
    stats: dict[str, Any] = {probe.tensors[0]: ("scores", probe.attrs.get("scale") or 1.0)
                             for probe in probes if probe.kind == "scores"}
    stats.update({name: "range" for name in ranges if name not in stats})
    values = _run_light(light, feeds, wanted, stats)
    blocks = [_measure(probe, values) for probe in probes]
    for block in blocks:
        _judge(block, precision, tolerance)
    tops = {name: _extreme(values, name) for name in ranges}
    del values
    # A mask's finfo.min fill (convert-precision clips it to -65504 on purpose), NaN or inf:
    # measured again without them, in a second run of only those tensors' statistics.
    again = [name for name, top in tops.items() if top is not None and not top < 1e38]
    if again:
        light, store = _light(model)
        infer_shapes(light, in_place=True)
        finite = _run_light(light, feeds, [], dict.fromkeys(again, "finite"))
        tops.update({name: _top(finite.get(f"{name}{_RANGE}")) for name in again})
    del store, light
    over = [{"tensor": name, "max_abs": top} for name, top in tops.items()
            if top is not None and top > FP16_MAX]
    audit = PrecisionAudit(precision, tolerance, blocks, sorted(over, key=lambda d: -d["max_abs"]),
                           skipped)
    for block in blocks:
        if block.escape:
            log.info("precision audit: %s -> %s (%s)", block.name, block.escape, block.reason)
    return audit


def _extreme(values: Mapping[str, np.ndarray], name: str) -> float | None:
    """``max(|min|, |max|)`` of a watched tensor; None when it was not measured (empty)."""
    low, high = values.get(f"{name}{_MIN}"), values.get(f"{name}{_MAX}")
    if low is None or high is None or not low.size or not high.size:
        return None
    low, high = float(low.reshape(-1)[0]), float(high.reshape(-1)[0])
    if math.isnan(low) or math.isnan(high):
        return math.nan
    if low > high:  # an empty tensor reduces to (+inf, -inf)
        return None
    return max(abs(low), abs(high))


def _top(value: np.ndarray | None) -> float | None:
    """A range statistic back as a float; negative (nothing finite, or an empty tensor): None."""
    if value is None or not value.size:
        return None
    top = float(value.reshape(-1)[0])
    return top if top >= 0 else None


def sample_feeds(model: onnx.ModelProto, inputs, seed: int) -> dict[str, np.ndarray]:
    from .verification_inputs import input_sets, load_inputs

    if inputs is None:
        sets = input_sets(model, seed=seed, profile="quick")
        return dict(sets[0][0].feeds)
    if isinstance(inputs, Mapping):
        return dict(inputs)
    return load_inputs(inputs, model)


@dataclass
class _Probe:
    name: str
    node: str
    kind: str                     # "fused" | "scores"
    tensors: list[str]
    attrs: dict[str, Any]


def _probes(model: onnx.ModelProto) -> tuple[list[_Probe], list[str]]:
    from .attention import find_attention

    probes, skipped = [], []
    for block in find_attention(model):
        if block.subgraph:
            skipped.append(f"{block.id}: inside {block.subgraph} (not audited)")
            continue
        if block.fused and block.op == "Attention":
            node = block.nodes[0]
            names = [t.name if t is not None else "" for t in node.inputs[:4]]
            attrs = dict(node.attrs)
            probes.append(_Probe(node.outputs[0].name, node.name, "fused", names, attrs))
        elif block.core is not None:
            scores = block.core["scores"]
            softmax = block.core["softmax.node"]
            probes.append(_Probe(softmax.outputs[0].name, softmax.name, "scores", [scores.name],
                                 {"scale": block.scale}))
        else:
            skipped.append(f"{block.id}: {block.op} (not audited)")
    return probes, skipped


def _float_tensors(typed: onnx.ModelProto) -> list[str]:
    """The fp32 tensors of a model whose shapes were inferred."""
    return [v.name for v in typed.graph.value_info
            if v.type.tensor_type.elem_type == TensorProto.FLOAT]


def run_with_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                     names: list[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime outputs of ``model`` plus the intermediate tensors ``names``."""
    light, store = _light(model)
    values = _run_light(light, feeds, names, {})
    del store
    return values


# Suffixes of the statistics outputs: each is a scalar or one value per softmax row's batch.
_RANGE, _ABS, _NORM, _KV = ("__audit_range", "__audit_max_abs", "__audit_normaliser",
                            "__audit_shape")
_MIN, _MAX = "__audit_min", "__audit_max"
#: Rows of fused scores measured at a time (float64): a 64x64-latent self-attention's
#: [2, 8, 4096, 4096] scores would take 2 GB at once.
_CHUNK_ELEMENTS = 1 << 23


def _light(model: onnx.ModelProto):
    """A copy of ``model`` that shares its weights instead of copying them: the stubs of a
    lazily loaded or detached model, else large initializers detached here. The store returned
    must stay alive while the copy is used."""
    from .weights import detach, has_stubs

    if has_stubs(model):
        light = onnx.ModelProto()
        light.CopyFrom(model)  # stubs: a few bytes per weight
        return light, None
    return detach(model)


def _run_light(light: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: list[str],
               stats: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Run ``light`` (modified in place) with the intermediate tensors ``names`` and, for each
    tensor of ``stats``, its statistics (``"range"``: the largest finite magnitude below a
    mask's fill; ``"scores"``: the largest magnitude and the softmax row sums' maximum) as
    extra outputs. The statistics are computed in the graph right after the tensor is made,
    so no full intermediate tensor comes back or lives longer than the model needs it."""
    graph = light.graph
    present = {o.name for o in graph.output}
    extra = [name for name in names if name and name not in present]
    nodes, outputs = _stat_nodes(light, stats)
    _place(graph, nodes)
    for name in (*extra, *outputs):
        if name not in present:
            graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return _run_stubbed(light, feeds)


def _stat_nodes(model: onnx.ModelProto, stats: Mapping[str, Any]
                ) -> tuple[dict[str, list[onnx.NodeProto]], list[str]]:
    """Per watched tensor, the nodes computing its statistics; and their output names. Scores
    that cannot be measured in the graph (not fp32) come back whole (their own name)."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    shapes = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    made = {name for n in graph.node for name in n.output} | {i.name for i in graph.input} | {
        t.name for t in graph.initializer}
    f32 = TensorProto.FLOAT
    consts = {"big": 1e38, "neg": -1.0}
    for key, value in consts.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32),
                                                         f"__audit_{key}"))
    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "__audit_last"))
    by_tensor: dict[str, list[onnx.NodeProto]] = {}
    outputs = []
    for name, kind in stats.items():
        value = shapes.get(name)
        if name not in made or (value is not None and (
                value.type.tensor_type.elem_type not in (0, f32) or any(
                d.HasField("dim_value") and d.dim_value == 0
                for d in value.type.tensor_type.shape.dim))):
            if kind not in ("range", "finite") and name in made:
                outputs.append(name)  # measured in numpy as before
            continue  # empty or not fp32: no range to measure (nor a kernel to measure it)
        p = f"{name}__audit"
        if kind == "range":  # the extremes: no transient the size of the tensor
            nodes = [helper.make_node("ReduceMin", [name], [f"{name}{_MIN}"], keepdims=0),
                     helper.make_node("ReduceMax", [name], [f"{name}{_MAX}"], keepdims=0)]
            outputs += [f"{name}{_MIN}", f"{name}{_MAX}"]
        elif kind == "finite":  # the largest magnitude below a mask's fill, NaN and inf left out
            nodes = [helper.make_node("Abs", [name], [f"{p}_abs"]),
                     helper.make_node("Less", [f"{p}_abs", "__audit_big"], [f"{p}_kept"]),
                     helper.make_node("Where", [f"{p}_kept", f"{p}_abs", "__audit_neg"],
                                      [f"{p}_finite"]),
                     helper.make_node("ReduceMax", [f"{p}_finite"], [f"{name}{_RANGE}"],
                                      keepdims=0)]
            outputs.append(f"{name}{_RANGE}")
        else:
            graph.initializer.append(numpy_helper.from_array(
                np.array(kind[1], np.float32), f"{p}_scale"))
            nodes = [helper.make_node("Shape", [name], [f"{name}{_KV}"]),
                     helper.make_node("ReduceMin", [name], [f"{name}{_MIN}"], keepdims=0),
                     helper.make_node("ReduceMax", [name], [f"{name}{_MAX}"], keepdims=0),
                     helper.make_node("Abs", [name], [f"{p}_abs"]),
                     helper.make_node("ReduceMax", [f"{p}_abs"], [f"{name}{_ABS}"], keepdims=0),
                     *_row_max(name, f"{p}_rowmax", opset),
                     helper.make_node("Sub", [name, f"{p}_rowmax"], [f"{p}_shift"]),
                     helper.make_node("Mul", [f"{p}_shift", f"{p}_scale"], [f"{p}_scaled"]),
                     helper.make_node("Exp", [f"{p}_scaled"], [f"{p}_e"]),
                     helper.make_node("ReduceSum", [f"{p}_e", "__audit_last"], [f"{p}_sums"],
                                      keepdims=0),
                     helper.make_node("ReduceMax", [f"{p}_sums"], [f"{name}{_NORM}"],
                                      keepdims=0)]
            outputs += [f"{name}{_KV}", f"{name}{_MIN}", f"{name}{_MAX}", f"{name}{_ABS}",
                        f"{name}{_NORM}"]
        by_tensor[name] = nodes
    return by_tensor, outputs


def _row_max(name: str, out: str, opset: int) -> list[onnx.NodeProto]:
    if opset >= 18:
        return [helper.make_node("ReduceMax", [name, "__audit_last"], [out], keepdims=1)]
    return [helper.make_node("ReduceMax", [name], [out], axes=[-1], keepdims=1)]


def _place(graph: onnx.GraphProto, stats: Mapping[str, list[onnx.NodeProto]]) -> None:
    """Each tensor's statistics right after the node that makes it (graph inputs and
    initializers: first), so ONNX Runtime can free the tensor when the model is done with it."""
    order: list[onnx.NodeProto] = []
    produced = {out for node in graph.node for out in node.output}
    for name, nodes in stats.items():
        if name not in produced:
            order.extend(nodes)
    for node in graph.node:
        order.append(node)
        for out in node.output:
            order.extend(stats.get(out, ()))
    del graph.node[:]
    graph.node.extend(order)


def _run_stubbed(light: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """Run a model whose weights may be stubs, in one session with no copy of the weights
    here (:func:`_point_at_weights`); only when weights live in several folders, inline ones
    pass protobuf's limit or plugin nodes need decomposing does the model go the way
    :func:`~xattn_compiler.verification.run_model` takes (one materialised copy)."""
    import onnxruntime as ort

    from . import io as xio
    from .errors import InputError, first_line
    from .plugins import has_plugin_nodes
    from .verification import _run, _select_inputs, run_model
    from .weights import FileRange, is_stub, materialize, source_of, stubs

    top = {tensor.name for tensor in light.graph.initializer if is_stub(tensor)}
    folders, inline = set(), 0
    for tensor in stubs(light):
        source = source_of(tensor)
        if isinstance(source, FileRange):
            folders.add(source.path.parent)
        elif tensor.name not in top:
            inline += source.nbytes
    if (len(folders) > 1 or inline + xio.weight_bytes(light) >= xio.PROTOBUF_LIMIT
            or has_plugin_nodes(light)):
        return run_model(materialize(light), feeds)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    # Kahn's order, lowest node index first: each tensor's statistics run right after it is
    # made (the default order runs leaves last, which kept every watched tensor alive).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    held = _point_at_weights(light, top, options)
    name = f"'{light.graph.name or 'unnamed'}' (in memory)"
    try:
        session = ort.InferenceSession(light.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        del held  # the session holds the in-memory weights it was handed
        wanted = [value.name for value in session.get_inputs()]
        return _run(session, _select_inputs(feeds, wanted))
    except InputError:
        raise
    except Exception as exc:  # ORT raises several unrelated pybind exception types
        raise InputError(f"model {name}: {first_line(exc)}") from exc


def _point_at_weights(light: onnx.ModelProto, top: set[str], options) -> list:
    """Turn ``light``'s stubs into what ONNX Runtime reads without a copy here: a file's
    weights as external data in that file (the folder set on ``options``), in-memory ones
    handed over as arrays (:meth:`add_external_initializers`); inside a subgraph, inline."""
    from .verification import _to_ort_value
    from .weights import FileRange, source_of, stubs

    names, values = [], []
    for tensor in light.graph.initializer:
        source = source_of(tensor)
        if tensor.name in top and not isinstance(source, FileRange):
            del tensor.external_data[:]
            entry = tensor.external_data.add()
            entry.key, entry.value = "location", f"xattn-in-memory/{len(names)}"
            names.append(tensor.name)
            values.append(_to_ort_value(np.ascontiguousarray(source.array())))
    for tensor in list(stubs(light)):
        source = source_of(tensor)
        del tensor.external_data[:]
        if isinstance(source, FileRange):
            for key, value in (("location", source.path.name), ("offset", str(source.offset)),
                               ("length", str(source.length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(source.path.parent))
        else:
            tensor.ClearField("data_location")
            tensor.raw_data = bytes(source.raw())
    if names:
        options.add_external_initializers(names, values)
    return values


def _measure(probe: _Probe, values: Mapping[str, np.ndarray]) -> BlockAudit:
    if probe.kind == "scores":
        scores, scale = probe.tensors[0], probe.attrs.get("scale") or 1.0
        if f"{scores}{_ABS}" not in values:  # not fp32: the whole tensor came back
            s = values[scores].astype(np.float64) * scale
            top = float(np.abs(s).max()) if s.size else 0.0
            return BlockAudit(probe.name, probe.node, int(s.shape[-1]), top,
                              _normaliser(s, None, False), float(s.shape[-1]))
        kv = int(values[f"{scores}{_KV}"][-1])
        top = float(values[f"{scores}{_ABS}"]) * abs(scale)
        norm = float(values[f"{scores}{_NORM}"]) if kv else 0.0
        return BlockAudit(probe.name, probe.node, kv, top, norm, float(kv))
    q, k, _v, mask_name = (probe.tensors + ["", "", "", ""])[:4]
    mask = values.get(mask_name) if mask_name else None
    causal = bool(probe.attrs.get("is_causal", 0))
    kv, top, norm = _fused_stats(values[q], values[k], mask, causal, probe.attrs)
    return BlockAudit(probe.name, probe.node, kv, top, norm, float(kv))


def _heads(q: np.ndarray, k: np.ndarray, attrs: Mapping[str, Any]):
    """Q and K as ``[B, H, S, D]``, K/V heads repeated for grouped queries, and the scale."""
    if q.ndim == 3:
        hq, hk = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
        q = q.reshape(q.shape[0], q.shape[1], hq, -1).transpose(0, 2, 1, 3)
        k = k.reshape(k.shape[0], k.shape[1], hk, -1).transpose(0, 2, 1, 3)
    scale = attrs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    if k.shape[1] != q.shape[1]:
        k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    return q, k, scale


def _fused_stats(q: np.ndarray, k: np.ndarray, mask: np.ndarray | None, causal: bool,
                 attrs: Mapping[str, Any]) -> tuple[int, float, float]:
    """``(kv length, max |scale Q K^T|, normaliser)`` in float64, a few query rows at a time."""
    q, k, scale = _heads(q, k, attrs)
    kt = np.swapaxes(k.astype(np.float64), -1, -2)
    sq, kv = q.shape[-2], kt.shape[-1]
    full = np.broadcast_shapes(q.shape[:-2], kt.shape[:-2])
    rows = max(1, _CHUNK_ELEMENTS // max(1, int(np.prod(full, dtype=np.int64)) * kv))
    top = norm = 0.0
    for start in range(0, sq, rows):
        scores = np.matmul(q[..., start:start + rows, :].astype(np.float64), kt) * scale
        if scores.size:
            top = max(top, float(np.abs(scores).max()))
        part = None
        if mask is not None:
            part = mask if mask.ndim < 2 or mask.shape[-2] == 1 else mask[..., start:start + rows, :]
        norm = max(norm, _normaliser(scores, part, causal, kv - sq + start))
    return int(kv), top, norm


def _normaliser(scores: np.ndarray, mask: np.ndarray | None, causal: bool,
                diagonal: int = 0) -> float:
    """The largest row sum of ``exp(s - rowmax)``; causal rows see keys up to ``i + diagonal``."""
    s = scores
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask.astype(np.float64)
    if causal:
        sq, skv = s.shape[-2], s.shape[-1]
        keep = np.tril(np.ones((sq, skv), bool), k=diagonal)
        s = np.where(keep, s, -np.inf)
    if not s.size:
        return 0.0
    top = s.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        sums = np.exp(s - top).sum(axis=-1)
    return float(np.nanmax(sums)) if sums.size else 0.0


def _judge(block: BlockAudit, precision: str, tolerance: float) -> None:
    """Findings for ``precision`` and the escape they call for (see the module docstring)."""
    if precision != "fp16":
        error = block.max_abs_score * UNIT_ROUNDOFF[precision]
        if error > tolerance:
            block.findings.append(f"scores up to {block.max_abs_score:.4g} round by up to "
                                  f"{error:.3g} in {precision} (tolerance {tolerance:.3g})")
            block.escape, block.reason = "fp32", "bf16 scores lose accuracy: fp32 accumulation"
        return
    scores_over = block.max_abs_score > FP16_MAX
    lossy = block.max_abs_score * UNIT_ROUNDOFF["fp16"] > tolerance
    norm_over = block.normaliser > FP16_MAX
    if scores_over:
        block.findings.append(f"scores reach {block.max_abs_score:.4g} > 65504: fp16 overflows")
    elif lossy:
        block.findings.append(f"scores reach {block.max_abs_score:.4g}: fp16 rounds them by up "
                              f"to {block.max_abs_score * UNIT_ROUNDOFF['fp16']:.3g} "
                              f"(tolerance {tolerance:.3g})")
    if norm_over:
        block.findings.append(f"softmax normaliser reaches {block.normaliser:.6g} > 65504 "
                              f"({block.kv_length} keys): an fp16 accumulator overflows")
    elif block.normaliser_bound > FP16_MAX:
        block.findings.append(f"{block.kv_length} keys: the normaliser may exceed 65504 on "
                              "other inputs (bound), not on these")
    if scores_over or lossy:
        block.escape = "fp32"
        block.reason = ("scores out of fp16's range or precision; bf16 keeps the range but "
                        "rounds 8x coarser: fp32 accumulation (Cast Q/K/V to fp32, TensorRT 11.3+)")
    elif norm_over:
        if block.max_abs_score * UNIT_ROUNDOFF["bf16"] <= tolerance:
            block.escape = "bf16"
            block.reason = ("only the normaliser overflows and the scores stay within the "
                            "tolerance in bf16: bf16 (fp32's range, still a half fused kernel)")
        else:
            block.escape = "fp32"
            block.reason = ("the normaliser overflows and bf16 would round the scores past the "
                            "tolerance: fp32 accumulation (TensorRT 11.3+)")


# --- CPU views of half-precision models ----------------------------------------------------

def cpu_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` as ONNX Runtime's CPU provider should run it to show what half-precision GPU
    kernels do: half Attention nodes as an unnormalised half kernel, bf16 emulated in fp32
    with rounding to bf16 after every node."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    typed = infer_shapes(out)
    shapes = {v.name: v.type.tensor_type for v in (*typed.graph.input, *typed.graph.value_info,
                                                  *typed.graph.output)}
    _decompose_attention(out.graph, shapes)
    # bf16 may live only inside an If/Loop body (an fp16 model's fp32 softmax, now bf16)
    if any(t.elem_type == TensorProto.BFLOAT16 for t in shapes.values()) or any(
            t.data_type == TensorProto.BFLOAT16 for g in iter_graph_protos(out.graph)
            for t in g.initializer) or _has_bf16_body(typed.graph):
        retyped = infer_shapes(out)
        bf16_names = {v.name for g in iter_graph_protos(retyped.graph)
                      for v in (*g.value_info, *g.output)
                      if v.type.tensor_type.elem_type == TensorProto.BFLOAT16}
        for graph in iter_graph_protos(out.graph):
            _emulate_bf16(graph, bf16_names)
    return out


def _has_bf16_body(graph: onnx.GraphProto) -> bool:
    for body in iter_graph_protos(graph):
        if body is graph:
            continue
        if any(v.type.tensor_type.elem_type == TensorProto.BFLOAT16
               for v in (*body.input, *body.output, *body.value_info)) or any(
                a.t.data_type == TensorProto.BFLOAT16 or (a.name == "to" and a.i == TensorProto.BFLOAT16)
                for n in body.node for a in n.attribute):
            return True
    return False


def _decompose_attention(graph: onnx.GraphProto, shapes: Mapping[str, Any]) -> None:
    nodes = []
    for node in graph.node:
        kind = shapes.get(node.input[0]).elem_type if node.input and node.input[0] in shapes else 0
        if (node.op_type == "Attention" and node.domain in ("", "ai.onnx")
                and kind in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
                and len([o for o in node.output if o]) == 1):
            steps = _kernel_steps(node, shapes, kind)
            if steps is not None:
                nodes.extend(steps)
                continue
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _dims(shapes: Mapping[str, Any], name: str) -> list[int | None] | None:
    tt = shapes.get(name)
    if tt is None or not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]


def _kernel_steps(node: onnx.NodeProto, shapes: Mapping[str, Any], kind: int
                  ) -> list[onnx.NodeProto] | None:
    """A half Attention as the steps of an unnormalised fused kernel, all in ``kind``."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    q, k, v = node.input[:3]
    mask = node.input[3] if len(node.input) > 3 else ""
    qd, kd, vd = _dims(shapes, q), _dims(shapes, k), _dims(shapes, v)
    if not qd or not kd or not vd or len(qd) != 4 or attrs.get("softcap") or len(node.input) > 4:
        return None  # 3-D or cached forms: ONNX Runtime runs the node itself
    hq, hk, d = qd[1], kd[1], qd[3]
    if hq is None or hk is None or d is None or vd[3] is None:
        return None
    groups, dv = hq // hk, vd[3]
    p = f"{node.output[0]}__kernel"
    root = math.sqrt(attrs.get("scale") or 1.0 / math.sqrt(d))
    f32 = TensorProto.FLOAT
    n: list[onnx.NodeProto] = []

    def const(name, value, np_type=np.int64):
        tensor = numpy_helper.from_array(np.asarray(value, np_type), f"{p}_{name}")
        n.append(helper.make_node("Constant", [], [f"{p}_{name}"], value=tensor))
        return f"{p}_{name}"

    def step(op, inputs, name, **attrs):
        """One kernel step computed in fp32 and stored in the half type (explicit Casts:
        ONNX Runtime keeps them, where it would fuse away casts it inserts itself)."""
        n.append(helper.make_node(op, inputs, [f"{p}_{name}_f"], **attrs))
        n.append(helper.make_node("Cast", [f"{p}_{name}_f"], [f"{p}_{name}_h"], to=kind))
        n.append(helper.make_node("Cast", [f"{p}_{name}_h"], [f"{p}_{name}"], to=f32))
        return f"{p}_{name}"

    r = const("root", _round(root, kind), np.float32)
    last, axis2 = const("last", [-1]), const("axis2", [2])
    for name, tensor in (("qf", q), ("kf", k), ("vf", v)):
        n.append(helper.make_node("Cast", [tensor], [f"{p}_{name}"], to=f32))
    qs = step("Mul", [f"{p}_qf", r], "qs")
    ks = step("Mul", [f"{p}_kf", r], "ks")
    q5 = f"{p}_q5"
    n.append(helper.make_node("Reshape", [qs, const("q5shape", [0, hk, groups, -1, d])], [q5]))
    n.append(helper.make_node("Unsqueeze", [ks, axis2], [f"{p}_k5"]))
    n.append(helper.make_node("Unsqueeze", [f"{p}_vf", axis2], [f"{p}_v5"]))
    n.append(helper.make_node("Transpose", [f"{p}_k5"], [f"{p}_kt"], perm=[0, 1, 2, 4, 3]))
    scores = step("MatMul", [q5, f"{p}_kt"], "s")
    if mask:
        steps = _mask_steps(p, scores, mask, shapes, groups)
        if steps is None:
            return None
        n += steps
        scores = step("Identity", [f"{p}_sm"], "smr")
    if attrs.get("is_causal"):
        n += _causal_steps(p, scores)
        scores = f"{p}_sc"
    top = f"{p}_max"
    n.append(helper.make_node("ReduceMax", [scores, last], [top], keepdims=1))
    e = step("Exp", [step("Sub", [scores, top], "shift")], "e")
    total = step("ReduceSum", [e, last], "l", keepdims=1)  # the unnormalised normaliser
    out = step("MatMul", [e, f"{p}_v5"], "o")
    y = step("Div", [out, total], "y")
    n.append(helper.make_node("Reshape", [y, const("y4", [0, hq, -1, dv])], [f"{p}_out4"]))
    n.append(helper.make_node("Cast", [f"{p}_out4"], [node.output[0]], to=kind))
    return n


def _round(value: float, kind: int) -> float:
    if kind == TensorProto.FLOAT16:
        return float(np.float16(value))
    import ml_dtypes

    return float(np.float32(value).astype(ml_dtypes.bfloat16))


def _mask_steps(p: str, scores: str, mask: str, shapes, groups: int) -> list | None:
    """The mask added to (or, bool, selecting) the 5-D grouped scores ``[B, Hkv, G, S, L]``."""
    md = _dims(shapes, mask)
    if md is None:
        return None
    steps = []
    shaped = mask
    if len(md) == 4:
        if groups > 1 and md[1] != 1:
            return None  # a per-head mask over grouped heads: left to ONNX Runtime
        steps += [helper.make_node("Constant", [], [f"{p}_maxis"],
                                   value=numpy_helper.from_array(np.array([2], np.int64))),
                  helper.make_node("Unsqueeze", [mask, f"{p}_maxis"], [f"{p}_mask5"])]
        shaped = f"{p}_mask5"
    elif any(d != 1 for d in md[:-2]):
        return None
    if shapes[mask].elem_type == TensorProto.BOOL:
        steps += [helper.make_node("Constant", [], [f"{p}_ninf"],
                                   value=numpy_helper.from_array(np.array(-np.inf, np.float32))),
                  helper.make_node("Where", [shaped, scores, f"{p}_ninf"], [f"{p}_sm"])]
    else:
        steps += [helper.make_node("Cast", [shaped], [f"{p}_maskf"], to=TensorProto.FLOAT),
                  helper.make_node("Add", [scores, f"{p}_maskf"], [f"{p}_sm"])]
    return steps


def _causal_steps(p: str, scores: str) -> list:
    """Bottom-right causal mask (ONNX >= 1.23): key j is seen by query i when
    ``j <= i + (S_kv - S_q)``."""
    one = numpy_helper.from_array(np.array(True), f"{p}_true")
    return [helper.make_node("Shape", [scores], [f"{p}_shape"], start=-2),
            helper.make_node("Constant", [], [f"{p}_true"], value=one),
            helper.make_node("Expand", [f"{p}_true", f"{p}_shape"], [f"{p}_ones"]),
            helper.make_node("Shape", [scores], [f"{p}_sq"], start=-2, end=-1),
            helper.make_node("Shape", [scores], [f"{p}_skv"], start=-1),
            helper.make_node("Sub", [f"{p}_skv", f"{p}_sq"], [f"{p}_off1"]),
            helper.make_node("Squeeze", [f"{p}_off1"], [f"{p}_off"]),
            helper.make_node("Cast", [f"{p}_ones"], [f"{p}_ones_i"], to=TensorProto.INT32),
            helper.make_node("Trilu", [f"{p}_ones_i", f"{p}_off"], [f"{p}_tri"], upper=0),
            helper.make_node("Cast", [f"{p}_tri"], [f"{p}_keep"], to=TensorProto.BOOL),
            helper.make_node("Constant", [], [f"{p}_cinf"],
                             value=numpy_helper.from_array(np.array(-np.inf, np.float32))),
            helper.make_node("Where", [f"{p}_keep", scores, f"{p}_cinf"], [f"{p}_sc"])]


def _emulate_bf16(graph: onnx.GraphProto, bf16_names: set[str]) -> None:
    """bf16 tensors as fp32 values rounded to bf16 after every node (ORT CPU has no bf16
    kernels; GPU kernels accumulate bf16 in fp32 and store bf16, which this reproduces)."""
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT
    from .weights import values_of

    for tensor in graph.initializer:
        if tensor.data_type == bf16:  # a detached weight's values come from its store
            tensor.CopyFrom(numpy_helper.from_array(
                values_of(tensor).astype(np.float32), tensor.name))
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == bf16:
                attr.t.CopyFrom(numpy_helper.from_array(
                    numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        nodes.append(node)
        if node.op_type in ("If", "Loop", "Scan", "Constant"):
            continue  # bodies round their own outputs; constants are bf16 values already
        for index, out in enumerate(node.output):
            if out in bf16_names:
                raw = f"{out}__fp32"
                node.output[index] = raw
                nodes += [helper.make_node("Cast", [raw], [f"{out}__bf16"], to=bf16),
                          helper.make_node("Cast", [f"{out}__bf16"], [out], to=f32)]
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i == bf16:
                    attr.i = f32  # the rounding Casts after it make the bf16 value
    del graph.node[:]
    graph.node.extend(nodes)


# --- checks against the fp32 model ---------------------------------------------------------

def check_blocks(reference: onnx.ModelProto, converted: onnx.ModelProto,
                 feeds: Mapping[str, np.ndarray], names: list[str], tolerance: float
                 ) -> dict[str, dict[str, Any]]:
    """Each attention output ``names`` of ``converted`` (through :func:`cpu_view`) against the
    fp32 ``reference`` on ``feeds``: ``{name: {"max_error", "tolerance", "ok"}}``, the error
    relative to ``max(1, max|ref|)`` as the tolerance is."""
    # One session at a time, each reading the weights where they are (no materialised copy).
    ref = run_with_outputs(reference, feeds, names)
    cand = run_with_outputs(cpu_view(converted), feeds, names)
    out = {}
    for name in names:
        if name not in ref or name not in cand:
            continue
        error = relative_error(ref[name], cand[name])
        out[name] = {"max_error": error, "tolerance": tolerance, "ok": error <= tolerance}
    return out


def relative_error(ref: np.ndarray, cand: np.ndarray) -> float:
    """``max |cand - ref| / (max(1, max|ref|) + |ref|)``-style error: inf when the candidate
    has a NaN or infinity the reference does not. Passing means ``|c - r| <= t (s + |r|)``
    with ``s = max(1, max|ref|)``, the form of the tolerance."""
    r = ref.astype(np.float64)
    c = np.asarray(cand).astype(np.float64)
    if r.shape != c.shape:
        return math.inf
    bad = ~np.isfinite(c) & np.isfinite(r)
    if bad.any():
        return math.inf
    finite = np.isfinite(r)
    if not finite.any():
        return 0.0
    scale = max(1.0, float(np.abs(r[finite]).max()))
    return float((np.abs(c - r)[finite] / (scale + np.abs(r[finite]))).max())


def verify_precision(reference: onnx.ModelProto | str, candidate: onnx.ModelProto | str,
                     precision: str, inputs=None, seed: int = 0,
                     specialize: Mapping[str, Any] | None = None):
    """:func:`~xattn_compiler.verification.verify` of a converted model against its fp32
    original with :func:`precision_tolerances`, the candidate run through :func:`cpu_view`.
    The absolute tolerance is ``rtol * max(1, largest |reference output|)``. ``specialize``:
    the candidate was specialised on these input values (``optimize --specialize``)."""
    from .verification import verify
    from .weights import has_stubs, materialize

    ref_model = reference if isinstance(reference, onnx.ModelProto) else onnx.load(str(reference))
    ref_model = materialize(ref_model) if has_stubs(ref_model) else ref_model
    cand_model = candidate if isinstance(candidate, onnx.ModelProto) else onnx.load(str(candidate))
    rtol = precision_tolerances(precision, model_depth(cand_model))[0]
    runnable = ref_model
    if specialize:
        from xattn_compiler.passes.control_flow_specialize import pin_in_proto

        runnable = pin_in_proto(ref_model, specialize)
    feeds = sample_feeds(runnable, inputs, seed)
    outputs = run_with_outputs(runnable, feeds, [])
    scale = max([1.0] + [float(np.abs(v[np.isfinite(v)]).max()) for v in outputs.values()
                         if np.issubdtype(v.dtype, np.floating) and np.isfinite(v).any()])
    if specialize:
        from xattn_compiler.passes.control_flow_specialize import verify_specialized

        return verify_specialized(ref_model, cpu_view(cand_model), specialize, inputs=feeds,
                                  rtol=rtol, atol=rtol * scale)
    return verify(reference, cpu_view(cand_model), inputs=feeds, rtol=rtol, atol=rtol * scale)
