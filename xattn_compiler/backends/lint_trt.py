"""``lint-trt``: what would block or slow a TensorRT build, found without TensorRT.

The model is checked against TensorRT's ONNX operator support for one version
(:mod:`.trt_ops`): the opset, every node's op and data type (control-flow bodies included),
the per-op restrictions (:mod:`._trt_rules`), If/Loop constructs the parser rejects, dynamic
inputs without a profile, and attention blocks TensorRT will not fuse. Every finding names the
node (or tensor) and what fixes it, usually a pass (``canonicalize``, ``unroll-control-flow``,
``remove-layout-clutter``, ``split-static-kv``, ``fuse-attention{target=...}``,
``guard-precision``).

Severities: ``blocker`` (the parser or the build fails), ``warning`` (it builds, but slower or
not as asked), ``info``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import InputError
from ..ir import constant_value, import_graph, infer_shapes, iter_graphs
from . import trt_ops
from ._trt_rules import BLOCKER, INFO, WARNING, node_issues
from .profiles import derive_profile, dynamic_inputs
from .trt_attention_rules import is_onnx_attention, node_violations

_DEFAULT_DOMAINS = ("", "ai.onnx")
# The operand whose type operators.md's Types column describes, when it is not input 0.
_TYPED_OPERAND = {"Where": ("in", 1), "Constant": ("out", 0), "ConstantOfShape": ("out", 0),
                  "RandomNormal": ("out", 0), "RandomUniform": ("out", 0),
                  "If": ("out", 0), "Loop": ("out", 0)}
_CORE_OPS = {"MatMul", "Softmax", "Add", "Where", "Mul", "Div"}
_HALF = {"fp16", "bf16", "int8"}
# FP32 accumulation for FP16 fused attention (Q/K/V upcast around IAttention): 11.3 CHANGELOG.
FP32_ACCUMULATION_SINCE = (11, 3)
# Clutter remove-layout-clutter takes out of a core (Cast round trips included); anything else
# inside a core (IsNaN guards of fully masked rows, for one) goes when the block is fused.
_LAYOUT_OPS = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity"}


@dataclass
class Finding:
    """One thing that blocks or slows a build, with the node (or tensor) and the fix."""

    severity: str
    code: str
    message: str
    node: str | None = None
    op: str | None = None
    tensor: str | None = None
    subgraph: str = ""
    fix: str = ""

    def where(self) -> str:
        if self.node is not None:
            label = f"node '{self.node}' ({self.op})" if self.op else f"node '{self.node}'"
        elif self.tensor is not None:
            label = f"tensor '{self.tensor}'"
        else:
            label = "model"
        return f"{label} in {self.subgraph}" if self.subgraph else label


@dataclass
class LintReport:
    model: str
    trt_version: tuple[int, int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def blockers(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == BLOCKER]

    @property
    def ok(self) -> bool:
        return not self.blockers

    def counts(self) -> dict[str, int]:
        return {s: sum(f.severity == s for f in self.findings) for s in (BLOCKER, WARNING, INFO)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "trt_version": trt_ops.format_version(self.trt_version),
                "ok": self.ok, "counts": self.counts(),
                "findings": [asdict(f) for f in self.findings]}

    def render(self) -> str:
        lines = [f"{self.model}: TensorRT {trt_ops.format_version(self.trt_version)}: "
                 + ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in self.counts().items())]
        for f in self.findings:
            fix = f" [fix: {f.fix}]" if f.fix else ""
            lines.append(f"  {f.severity:<7} {f.code:<17} {f.where()}: {f.message}{fix}")
        return "\n".join(lines)


def lint_trt(
    model: onnx.ModelProto,
    trt_version: str | tuple[int, int] = trt_ops.DEFAULT_VERSION,
    *,
    precision: str | None = None,
    profiled_inputs: Iterable[str] = (),
    name: str = "model",
) -> LintReport:
    """Check ``model`` against the ONNX support of TensorRT ``trt_version``.

    ``precision`` is the build's (``fp16``, ``bf16``, ``int8``; None: the model's own types);
    ``profiled_inputs`` are inputs the user gives a profile for (the others get a warning).
    """
    version = trt_ops.parse_version(trt_version) if isinstance(trt_version, str) else trt_version
    if precision not in (None, "fp32") and trt_ops.strongly_typed_only(version):
        raise InputError(f"--precision {precision}: TensorRT {trt_ops.format_version(version)} "
                         "has no precision flags (the model's own types decide); convert the "
                         f"model with `xattn-compiler optimize --precision {precision}` and lint "
                         "the result")
    inferred = infer_shapes(model)
    graph = import_graph(inferred)
    types = _tensor_types(inferred)
    report = LintReport(name, version)
    report.findings.extend(_check_opset(model, version))
    doubles: list[tuple[str, gs.Node]] = []
    for path, sub in iter_graphs(graph):
        for node in sub.nodes:
            report.findings.extend(_check_node(node, path, version, types, doubles, precision))
    if doubles:
        report.findings.append(_doubles(doubles))
    report.findings.extend(_check_profiles(model, set(profiled_inputs)))
    if precision == "int8" and not any(n.op in ("QuantizeLinear", "DequantizeLinear")
                                       for _, sub in iter_graphs(graph) for n in sub.nodes):
        report.findings.append(Finding(
            WARNING, "precision", "an INT8 build of a model without QuantizeLinear/"
            "DequantizeLinear needs calibration, which build does not do: layers stay in "
            "higher precision", fix="none: quantize the model (Q/DQ) first"))
    report.findings.extend(_check_attention(inferred, version, precision))
    order = {BLOCKER: 0, WARNING: 1, INFO: 2}
    report.findings.sort(key=lambda f: order[f.severity])
    return report


# --- opset, ops, types -----------------------------------------------------------------------

def _check_opset(model: onnx.ModelProto, version: tuple[int, int]) -> Iterator[Finding]:
    low, high = trt_ops.opset_range(version)
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS and not low <= entry.version <= high:
            yield Finding(BLOCKER, "opset", f"opset {entry.version} is outside {low}..{high}, "
                          f"the range TensorRT {trt_ops.format_version(version)} documents",
                          fix=f"none: re-export with an opset in {low}..{high}")


def _check_node(node: gs.Node, path: str, version: tuple[int, int], types: dict[str, str],
                doubles: list, precision: str | None = None) -> Iterator[Finding]:
    label = node.name or node.op

    def finding(severity: str, code: str, message: str, fix: str = "") -> Finding:
        return Finding(severity, code, message, node=label, op=node.op, subgraph=path, fix=fix)

    if (node.domain or "") not in _DEFAULT_DOMAINS:
        yield _custom_domain(node, finding, version)
        return
    if node.op not in trt_ops.SUPPORTED and not onnx.defs.has(node.op):
        yield _custom_domain(node, finding, version)   # not an ONNX op: the parser tries a plugin
        return
    if node.op in trt_ops.UNSUPPORTED or node.op not in trt_ops.SUPPORTED:
        yield finding(BLOCKER, "unsupported-op", f"TensorRT does not import {node.op}",
                      "none: rewrite the op or provide a plugin")
        return
    row = trt_ops.support(node.op, version)
    if row is None:
        since = trt_ops.format_version(trt_ops.SUPPORTED[node.op].since)
        fix = ("fuse-attention{target=canonical}" if node.op == "Attention"
               else f"none: target TensorRT >= {since}")
        yield finding(BLOCKER, "unsupported-op", f"{node.op} is imported from TensorRT {since}",
                      fix)
        return
    dtype = _operand_type(node, types)
    if dtype == "DOUBLE":
        doubles.append((path, node))
    elif dtype in trt_ops.UNSUPPORTED_TYPES:
        yield finding(BLOCKER, "dtype", f"{node.op} on {dtype}: TensorRT has no {dtype} type",
                      _dtype_fix(dtype))
    elif dtype is not None and dtype not in row.types:
        # The Types column is what NVIDIA documents; several importers (CumSum, for one) accept
        # more, so an undocumented type is a risk to check on the target, not a certain failure.
        yield finding(WARNING, "dtype", f"{node.op} on {dtype} is not among the documented "
                      f"types ({', '.join(sorted(row.types))})", _dtype_fix(dtype))
    for severity, message, fix in node_issues(node):
        yield finding(severity, "restriction", message, fix)
    if is_onnx_attention(node):
        half_build = precision in _HALF   # 10.x only: 11 refused precision above
        yield from _attention_node(node, path, version, None if half_build else dtype, finding,
                                   _fp32_accumulation(node, types))
    if node.op in ("If", "Loop", "Scan"):
        for severity, message, fix in _control_flow(node):
            yield finding(severity, "control-flow", message, fix)


def _attention_node(node: gs.Node, path: str, version: tuple[int, int], dtype: str | None,
                    finding, fp32_accumulation: bool = False) -> Iterator[Finding]:
    for violation in node_violations(node, path):
        yield finding(violation.severity, "attention-node", f"{violation.rule}: "
                      f"{violation.message}", violation.fix)
    if dtype != "FLOAT":
        return
    if not fp32_accumulation:
        yield finding(WARNING, "attention-precision", "fp32 attention core: it will not get a "
                      "half-precision fused kernel", _half_fix(version))
    elif version >= FP32_ACCUMULATION_SINCE:
        yield finding(INFO, "attention-precision", "half Q/K/V cast to fp32 around the node "
                      "and back (the precision audit's escape): TensorRT "
                      f"{trt_ops.format_version(FP32_ACCUMULATION_SINCE)}+ runs it as half-precision "
                      "fused attention with FP32 accumulation")
    else:
        yield finding(WARNING, "attention-precision", "half Q/K/V cast to fp32 around the node "
                      "(the precision audit's escape) asks for FP32 accumulation, which needs "
                      f"TensorRT {trt_ops.format_version(FP32_ACCUMULATION_SINCE)}: TensorRT "
                      f"{trt_ops.format_version(version)} runs an fp32 core with no "
                      "half-precision fused kernel",
                      f"target TensorRT >= {trt_ops.format_version(FP32_ACCUMULATION_SINCE)}, "
                      "or convert-precision{escapes=NAME:bf16} for this block")


def _fp32_accumulation(node: gs.Node, types: dict[str, str]) -> bool:
    """Q, K and V each a Cast to fp32 of a half tensor and every reader of the output a Cast
    back to half: the spelling TensorRT 11.3 reads as FP32 accumulation of a half kernel."""
    def from_half(tensor) -> bool:
        producers = getattr(tensor, "inputs", [])
        return (len(producers) == 1 and producers[0].op == "Cast"
                and producers[0].attrs.get("to") == onnx.TensorProto.FLOAT
                and types.get(producers[0].inputs[0].name) in ("FLOAT16", "BFLOAT16"))

    readers = node.outputs[0].outputs if node.outputs else []
    return (len(node.inputs) >= 3 and all(from_half(t) for t in node.inputs[:3]) and bool(readers)
            and all(r.op == "Cast" and r.attrs.get("to") in (onnx.TensorProto.FLOAT16,
                                                               onnx.TensorProto.BFLOAT16)
                    for r in readers))


def _half_fix(version: tuple[int, int]) -> str:
    # TensorRT 11 takes the graph's types; 10.x can still be asked for half kernels.
    if trt_ops.strongly_typed_only(version):
        return "optimize --precision fp16 (or bf16)"
    return "build --fp16 or --bf16 (guard-precision keeps Softmax in fp32)"


def _custom_domain(node: gs.Node, finding, version: tuple[int, int]) -> Finding:
    if node.domain == "com.microsoft":
        fix = ("fuse-attention{target=onnx-attention} on the unfused export"
               if "Attention" in node.op else "none: export without ONNX Runtime's fusions")
        return finding(BLOCKER, "unsupported-op", f"{node.domain}.{node.op} is an ONNX Runtime "
                       "contrib op; TensorRT's parser does not know it", fix)
    from ..plugins.presets import LEGACY_OPS, REMOVED_IN

    if node.op in LEGACY_OPS:   # the Stable Diffusion demo's plugins, TensorRT 8.5 only
        if version >= REMOVED_IN:
            return finding(BLOCKER, "plugin", f"legacy plugin {node.op} exists only for "
                           "TensorRT 8.5: it was removed in 8.6 and TensorRT "
                           f"{trt_ops.format_version(version)} has no creator for it",
                           "fuse-attention{target=onnx-attention} on the unfused model, or a "
                           "declared IPluginV3 spec (--plugin-spec)")
        return finding(WARNING, "plugin", f"legacy plugin {node.op} (TensorRT 8.5): it must "
                       "come from a library built from the TensorRT 8.5 plugin sources",
                       "build --plugin-lib PATH")
    return finding(WARNING, "plugin", f"{node.domain or 'ai.onnx'}.{node.op} is resolved as a "
                   "TensorRT plugin by op name (attributes plugin_version, plugin_namespace)",
                   "build --plugin-lib PATH (unless the plugin ships with TensorRT)")


def _operand_type(node: gs.Node, types: dict[str, str]) -> str | None:
    side, index = _TYPED_OPERAND.get(node.op, ("in", 0))
    tensors = node.outputs if side == "out" else node.inputs
    if index >= len(tensors) or not tensors[index].name:
        return None
    if node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return _type_name(getattr(value, "dtype", None))
    return types.get(tensors[index].name)


def _dtype_fix(dtype: str) -> str:
    if dtype in trt_ops.QUANTIZED_TYPES:
        return "none: quantize through QuantizeLinear/DequantizeLinear from a float type"
    return "none: cast to a documented type in the exporter, or check on the target"


def _doubles(doubles: list[tuple[str, gs.Node]]) -> Finding:
    path, first = doubles[0]
    others = len(doubles) - 1
    return Finding(WARNING, "dtype", "DOUBLE is cast down to FLOAT and clamped to +-FLT_MAX"
                   + (f" (and {others} more nodes)" if others else ""), node=first.name or first.op,
                   op=first.op, subgraph=path, fix="none: export in float32")


# --- control flow ----------------------------------------------------------------------------

def _control_flow(node: gs.Node) -> Iterator[tuple[str, str, str]]:
    if node.op == "If":
        yield from _check_if(node)
    elif node.op == "Loop":
        yield from _check_loop(node)
    if any(n.op == "Softmax" for body in _bodies(node) for _, g in iter_graphs(body)
           for n in g.nodes):
        where = "a loop body" if node.op in ("Loop", "Scan") else "a conditional branch"
        yield (WARNING, f"attention (a Softmax) inside {where}: Myelin's fused MHA does not "
               "run inside control flow (NVIDIA/TensorRT#1081)", "unroll-control-flow")


def _check_if(node: gs.Node) -> Iterator[tuple[str, str, str]]:
    cond = node.inputs[0]
    value = constant_value(cond)
    if value is not None and np.asarray(value).size == 1:
        return   # the parser inlines the selected branch
    then, other = node.attrs["then_branch"], node.attrs["else_branch"]
    fix = ("unroll-control-flow (optimize --specialize " f"{cond.name}=VALUE)"
           if not cond.inputs else "unroll-control-flow")
    if len(then.outputs) != len(other.outputs):
        yield (BLOCKER, f"If branches have {len(then.outputs)} and {len(other.outputs)} outputs; "
               "TensorRT needs the same number", fix)
        return
    for index, (a, b) in enumerate(zip(then.outputs, other.outputs, strict=True)):
        if a.shape is not None and b.shape is not None and len(a.shape) != len(b.shape):
            yield (BLOCKER, f"If output {index}: the branches give ranks {len(a.shape)} "
                   f"('{a.name}') and {len(b.shape)} ('{b.name}'); TensorRT's IIfConditional "
                   "needs the same rank", fix)
        if a.name == b.name:
            yield (BLOCKER, f"If output {index}: both branches name it '{a.name}'; TensorRT "
                   "needs different names", "canonicalize")
    yield (INFO, f"condition '{cond.name}' is not a build-time constant: TensorRT builds an "
           "IIfConditional", fix)


def _check_loop(node: gs.Node) -> Iterator[tuple[str, str, str]]:
    body = node.attrs["body"]
    carried = len(node.inputs) - 2
    scans = len(body.outputs) - 1 - carried
    trips = node.inputs[0] if node.inputs and node.inputs[0].name else None
    static_trips = trips is not None and constant_value(trips) is not None
    if scans > 0 and not static_trips:
        yield (BLOCKER, f"Loop has {scans} scan output(s) and a trip count that is not a "
               "build-time constant; TensorRT needs a static scan output length",
               "unroll-control-flow")
    for index in range(carried):
        before, after = body.inputs[index + 2], body.outputs[index + 1]
        if before.shape is not None and after.shape is not None and \
                _known(before.shape) and _known(after.shape) and \
                list(before.shape) != list(after.shape):
            yield (BLOCKER, f"loop-carried '{before.name}' changes shape {list(before.shape)} -> "
                   f"{list(after.shape)}; TensorRT keeps loop-carried shapes fixed",
                   "unroll-control-flow")


def _known(shape) -> bool:
    return all(isinstance(d, int) and d >= 0 for d in shape)


def _bodies(node: gs.Node) -> list[gs.Graph]:
    return [v for v in node.attrs.values() if isinstance(v, gs.Graph)]


# --- profiles and attention ------------------------------------------------------------------

def _check_profiles(model: onnx.ModelProto, profiled: set[str]) -> Iterator[Finding]:
    missing = {n: d for n, d in dynamic_inputs(model).items() if n not in profiled}
    if not missing:
        return
    profile = derive_profile(model)
    for name, dims in missing.items():
        shapes = profile.inputs[name]
        yield Finding(WARNING, "dynamic-input", f"dims {dims} are dynamic and have no profile; "
                      f"the build would use MIN {list(shapes.min)}, OPT {list(shapes.opt)}, "
                      f"MAX {list(shapes.max)}", tensor=name,
                      fix=f"build --profile {name}:MIN:OPT:MAX" + "".join(
                          f" or --dim {d}=MIN:OPT:MAX" for d in dims if isinstance(d, str)))


def _check_attention(model: onnx.ModelProto, version: tuple[int, int],
                     precision: str | None) -> Iterator[Finding]:
    from ..attention import find_attention

    for block in find_attention(model):
        if block.fused:
            continue   # a fused node's support is the node check's business
        yield from _unfused_attention(block, version, precision)


def _unfused_attention(block, version: tuple[int, int], precision: str | None) -> Iterator[Finding]:
    anchor = block.core.get("softmax.node") if block.core is not None else None
    label = anchor.name if anchor is not None else block.id

    def finding(severity: str, message: str, fix: str, node: str = label, op: str = "Softmax"):
        return Finding(severity, "attention-fusion", f"{block.id} ({block.kind}): {message}",
                       node=node, op=op, subgraph=block.subgraph, fix=fix)

    # A KV cache's Concat stays outside: the fused node reads the concatenated K/V.
    if version >= trt_ops.SUPPORTED["Attention"].since and not block.escapes:
        yield finding(INFO, "unfused MatMul-Softmax-MatMul; ONNX Attention maps to IAttention",
                      "fuse-attention{target=onnx-attention}")
    dtype = _type_name(getattr(block.output, "dtype", None))
    half = precision in _HALF if precision else dtype in ("FLOAT16", "BFLOAT16")
    if not half:
        yield finding(WARNING, "fp32 attention core: it will not get a half-precision fused "
                      "kernel", _half_fix(version))
    head = block.head_dim
    if head is not None and (not 16 <= head <= 256 or head % 8):
        yield finding(WARNING, f"head size {head} is outside 16..256 or not a multiple of 8: "
                      "the MHA fusion does not apply", "fuse-attention{target=onnx-attention}")
    if block.scale not in (None, 1.0) and not block.q.scales and not block.k.scales:
        yield finding(WARNING, "the scale is applied to the scores, not to Q or K before the "
                      "first MatMul", "fuse-attention{target=canonical}")
    for node in block.core.nodes if block.core is not None else ():
        if node.op not in _CORE_OPS:
            fix = ("remove-layout-clutter" if node.op in _LAYOUT_OPS
                   else "fuse-attention{target=onnx-attention}")
            yield finding(WARNING, f"{node.op} inside the MatMul-Softmax-MatMul core stops the "
                          "fusion", fix, node=node.name or node.op, op=node.op)
    if block.escapes:
        yield finding(WARNING, f"intermediate tensors {block.escapes} are read outside the "
                      "block, so it cannot be fused", "none: the readers need them")


# --- types -----------------------------------------------------------------------------------

def _type_name(dtype: Any) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return onnx.TensorProto.DataType.Name(dtype)
    try:
        return onnx.TensorProto.DataType.Name(onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    except (TypeError, KeyError, ValueError):
        return None


def _tensor_types(model: onnx.ModelProto) -> dict[str, str]:
    """Every typed tensor's ONNX type name, bodies included."""
    types: dict[str, str] = {}

    def visit(graph: onnx.GraphProto) -> None:
        for value in [*graph.input, *graph.output, *graph.value_info]:
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                types[value.name] = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type)
        for tensor in graph.initializer:
            types[tensor.name] = onnx.TensorProto.DataType.Name(tensor.data_type)
        for node in graph.node:
            for attr in node.attribute:
                for body in [attr.g, *attr.graphs] if attr.type in (5, 10) else []:
                    visit(body)

    visit(model.graph)
    return types
