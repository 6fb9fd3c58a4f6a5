"""The data-driven precision audit, CPU views of half-precision models, and their tolerances.

**Audit** (:func:`audit_model`): run the fp32 model (after fusion) in ONNX Runtime on sample
inputs, with each attention block's Q, K and V (fused Attention nodes) or scores (unfused
cores) exposed as extra outputs, and measure per block

* ``max_abs_score``: the largest ``|scale * Q K^T|`` before the mask. fp16 stops at 65504, and a
  kernel that stores scores in half rounds each by ``|s| * 2^-11`` (fp16) or ``|s| * 2^-8``
  (bf16), which ``exp`` turns into the same relative error in every probability;
* ``normaliser``: the largest row sum of ``exp(s - rowmax)`` (mask applied), what an
  unnormalised fused kernel accumulates before it divides. Each term is at most 1, so the
  bound is the K/V length: 65,536 equal keys make 65,536, past fp16's 65504 (inf, then NaN);

and per float tensor its range (``tensor_ranges``: the ones beyond fp16's range are reported).

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
    from .weights import has_stubs, materialize

    model = materialize(model) if has_stubs(model) else model
    if tolerance is None:
        tolerance = precision_tolerances(precision, model_depth(model))[0]
    feeds = sample_feeds(model, inputs, seed)
    probes, skipped = _probes(model)
    wanted = sorted({name for probe in probes for name in probe.tensors})
    ranges = _float_tensors(model) if tensor_ranges else []
    values = run_with_outputs(model, feeds, wanted + [n for n in ranges if n not in wanted])
    blocks = [_measure(probe, values) for probe in probes]
    for block in blocks:
        _judge(block, precision, tolerance)
    over = [{"tensor": name, "max_abs": top} for name in ranges
            if (top := _largest(values.get(name))) is not None and top > FP16_MAX]
    audit = PrecisionAudit(precision, tolerance, blocks, sorted(over, key=lambda d: -d["max_abs"]),
                           skipped)
    for block in blocks:
        if block.escape:
            log.info("precision audit: %s -> %s (%s)", block.name, block.escape, block.reason)
    return audit


def _largest(array: np.ndarray | None) -> float | None:
    """Largest finite magnitude, a mask's ``finfo.min`` fill left out (it saturates to -65504
    on purpose: convert-precision clips it)."""
    if array is None or not array.size or not np.issubdtype(array.dtype, np.floating):
        return None
    values = np.abs(array)
    kept = values < 1e38  # NaN and inf compare False
    return float(np.max(values, where=kept, initial=0.0)) if kept.any() else None


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


def _float_tensors(model: onnx.ModelProto) -> list[str]:
    typed = infer_shapes(model)
    return [v.name for v in typed.graph.value_info
            if v.type.tensor_type.elem_type == TensorProto.FLOAT]


def run_with_outputs(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray],
                     names: list[str]) -> dict[str, np.ndarray]:
    """ONNX Runtime outputs of ``model`` plus the intermediate tensors ``names``."""
    from .verification import run_model

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in names:
        if name and name not in present:
            probe.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return run_model(probe, feeds)


def _measure(probe: _Probe, values: Mapping[str, np.ndarray]) -> BlockAudit:
    if probe.kind == "scores":
        scale = probe.attrs.get("scale") or 1.0
        scores = values[probe.tensors[0]].astype(np.float64) * scale
        mask = None
        causal = False
    else:
        q, k, _v, mask_name = (probe.tensors + ["", "", "", ""])[:4]
        scores = _fused_scores(values[q], values[k], probe.attrs)
        mask = values.get(mask_name) if mask_name else None
        causal = bool(probe.attrs.get("is_causal", 0))
    kv = scores.shape[-1]
    top = float(np.abs(scores).max()) if scores.size else 0.0
    norm = _normaliser(scores, mask, causal)
    return BlockAudit(probe.name, probe.node, int(kv), top, norm, float(kv))


def _fused_scores(q: np.ndarray, k: np.ndarray, attrs: Mapping[str, Any]) -> np.ndarray:
    """``scale * Q K^T`` per head, K/V heads repeated for grouped queries (float64)."""
    if q.ndim == 3:
        hq, hk = int(attrs["q_num_heads"]), int(attrs["kv_num_heads"])
        q = q.reshape(q.shape[0], q.shape[1], hq, -1).transpose(0, 2, 1, 3)
        k = k.reshape(k.shape[0], k.shape[1], hk, -1).transpose(0, 2, 1, 3)
    scale = attrs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    if k.shape[1] != q.shape[1]:
        k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)
    return np.matmul(q.astype(np.float64), np.swapaxes(k.astype(np.float64), -1, -2)) * scale


def _normaliser(scores: np.ndarray, mask: np.ndarray | None, causal: bool) -> float:
    s = scores
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == bool else s + mask.astype(np.float64)
    if causal:
        sq, skv = s.shape[-2], s.shape[-1]
        keep = np.tril(np.ones((sq, skv), bool), k=skv - sq)
        s = np.where(keep, s, -np.inf)
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
    for tensor in graph.initializer:
        if tensor.data_type == bf16:
            tensor.CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
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
    from .weights import has_stubs, materialize

    reference = materialize(reference) if has_stubs(reference) else reference
    converted = materialize(converted) if has_stubs(converted) else converted
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
