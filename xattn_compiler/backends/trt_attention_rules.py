"""Which ONNX ``Attention`` nodes TensorRT's ONNX parser turns into ``IAttention``.

The rules below are the parser's restrictions (operators.md of TensorRT 10.15, the Attention
importer, the issues named per rule), checked one node at a time without TensorRT. A
``blocker`` fails the parse or the build, or computes something other than the ONNX node; a
``warning`` builds on some parsers only; ``info`` is a fact worth knowing that changes nothing.

    rule               severity  what the parser does
    one-output         blocker   "TensorRT only supports Attention nodes with one output"
                                 (present_key, present_value, qk_matmul_output; #4738)
    cache-inputs       blocker   past_key, past_value, nonpad_kv_seqlen: kUNSUPPORTED_NODE
    attributes         blocker   softcap and qk_matmul_output_mode are unsupported
    mask-and-causal    blocker   IAttention::setCausal cannot be used together with setMask
    causal-alignment   blocker   is_causal=1 with Sq, Skv not provably equal: TensorRT's
                                 causal mask is top-left, ONNX >= 1.23 aligns it bottom-right,
                                 so a decode step over a concatenated cache needs a mask
    static-heads       blocker   the head count is dim 1 of 4-D Q/K/V (or q_num_heads /
                                 kv_num_heads for 3-D inputs) and must be static
    rank               blocker   Q, K, V of one rank, 3 or 4; a 4-D node's mask 4-D
                       warning   3-D inputs: newer importers reshape them with the num_heads
                                 attributes; operators.md documents 4-D only
    control-flow       blocker   inside an If branch the engine does not build (#4739, #4757)
                       warning   inside a Loop/Scan body: no fused kernel in control flow
    scale              blocker   scale < 0: the importer multiplies Q and K by sqrt(scale)
                       info      scale != default: sqrt(scale) on Q and on K, the same product
                                 (rounding differs slightly in half precision)
    softmax-precision  info      softmax_precision is not read
    opset              blocker   the model's default-domain opset above the parser's range

:func:`check_attention` checks a model (every body included); :func:`node_violations` one
node. ``optimize`` with an ``onnx-attention`` target emits nodes that pass (tests hold it to
that on every zoo model); ``lint-trt`` reports these findings for ONNX Attention nodes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from ..ir import import_graph, infer_shapes, iter_graphs
from . import trt_ops

BLOCKER, WARNING, INFO = "blocker", "warning", "info"

#: Rule id -> what it checks, one line each (docs and reports).
RULES = {
    "one-output": "exactly one output (no present_key/present_value/qk_matmul_output)",
    "cache-inputs": "no past_key, past_value or nonpad_kv_seqlen input",
    "attributes": "no softcap, no qk_matmul_output_mode",
    "mask-and-causal": "a mask or is_causal, never both",
    "causal-alignment": "is_causal only where Sq and Skv are the same length",
    "static-heads": "a static head count (dim 1 of 4-D Q/K/V, or the num_heads attributes)",
    "rank": "Q, K, V (and the mask) 4-D; 3-D with num_heads attributes on newer parsers",
    "control-flow": "not inside an If branch (NVIDIA/TensorRT#4739)",
    "scale": "scale >= 0 (the importer puts sqrt(scale) on Q and on K)",
    "softmax-precision": "softmax_precision is ignored by the parser",
    "opset": "the model's opset within the parser's range",
}

_FUSE_FIX = "fuse-attention{target=onnx-attention}"
_BRANCH = re.compile(r"/(then|else)_branch(\[\d+\])?(/|$)")
_LOOP_BODY = re.compile(r"/body(\[\d+\])?(/|$)")
_CACHE_INPUTS = ((4, "past_key"), (5, "past_value"), (6, "nonpad_kv_seqlen"))
_EXTRA_OUTPUTS = ((1, "present_key"), (2, "present_value"), (3, "qk_matmul_output"))


@dataclass(frozen=True)
class Violation:
    """One restriction an Attention node breaks (or a fact about it, ``info``)."""

    rule: str
    severity: str
    message: str
    node: str = ""
    subgraph: str = ""
    fix: str = ""

    def __str__(self) -> str:
        where = f"node '{self.node}'" if self.node else "model"
        where += f" in {self.subgraph}" if self.subgraph else ""
        fix = f" [fix: {self.fix}]" if self.fix else ""
        return f"{self.severity} {self.rule}: {where}: {self.message}{fix}"


def check_attention(model: onnx.ModelProto,
                    trt_version: tuple[int, int] = trt_ops.DEFAULT_VERSION) -> list[Violation]:
    """Every restriction the model's ONNX Attention nodes break for TensorRT ``trt_version``,
    control-flow bodies included, plus the opset rule when the model has Attention nodes."""
    graph = import_graph(infer_shapes(model))
    found: list[Violation] = []
    for path, sub in iter_graphs(graph):
        for node in sub.nodes:
            if is_onnx_attention(node):
                found.extend(node_violations(node, path))
    if _has_attention(graph):
        found.extend(opset_violations(model, trt_version))
    return found


def blockers(violations: list[Violation]) -> list[Violation]:
    return [v for v in violations if v.severity == BLOCKER]


def is_onnx_attention(node: gs.Node) -> bool:
    return node.op == "Attention" and (node.domain or "") in ("", "ai.onnx")


def _has_attention(graph: gs.Graph) -> bool:
    return any(is_onnx_attention(n) for _, sub in iter_graphs(graph) for n in sub.nodes)


def opset_violations(model: onnx.ModelProto, version: tuple[int, int]) -> list[Violation]:
    low, high = trt_ops.opset_range(version)
    return [Violation("opset", BLOCKER, f"opset {entry.version} is outside {low}..{high}, the "
                      f"range TensorRT {trt_ops.format_version(version)} reads",
                      fix=f"none: export at an opset in {low}..{high} (Attention needs >= 23)")
            for entry in model.opset_import
            if entry.domain in ("", "ai.onnx") and not low <= entry.version <= high]


def node_violations(node: gs.Node, subgraph: str = "") -> list[Violation]:
    """The restrictions one Attention node breaks; shapes are read from its tensors."""
    label = node.name or node.op

    def made(rule: str, severity: str, message: str, fix: str = _FUSE_FIX) -> Violation:
        return Violation(rule, severity, message, label, subgraph, fix)

    return [made(*issue) for check in _NODE_CHECKS for issue in check(node, subgraph)]


# --- the checks: each yields (rule, severity, message[, fix]) ------------------------------------

def _present(tensors: list[gs.Tensor], index: int) -> gs.Tensor | None:
    return tensors[index] if index < len(tensors) and tensors[index].name else None


def _outputs(node: gs.Node, _path: str) -> Iterator[tuple]:
    for index, name in _EXTRA_OUTPUTS:
        if _present(node.outputs, index) is not None:
            yield ("one-output", BLOCKER, f"output {name} is unsupported: TensorRT takes Attention "
                   "nodes with one output (keep a KV cache's present outside the node)")


def _cache_inputs(node: gs.Node, _path: str) -> Iterator[tuple]:
    for index, name in _CACHE_INPUTS:
        if _present(node.inputs, index) is not None:
            yield ("cache-inputs", BLOCKER, f"input {name} is unsupported: concatenate the cache "
                   "outside the node and pass the full K/V")


def _attributes(node: gs.Node, _path: str) -> Iterator[tuple]:
    for attr in ("softcap", "qk_matmul_output_mode"):
        if node.attrs.get(attr):
            yield ("attributes", BLOCKER, f"attribute {attr}={node.attrs[attr]} is unsupported",
                   "fuse-attention{target=canonical}")
    if "softmax_precision" in node.attrs:
        yield ("softmax-precision", INFO, "softmax_precision is not read by the parser: the "
               "kernel's own accumulation decides", "none: nothing to change")


def _causal(node: gs.Node, _path: str) -> Iterator[tuple]:
    if not node.attrs.get("is_causal", 0):
        return
    if _present(node.inputs, 3) is not None:
        yield ("mask-and-causal", BLOCKER, "a mask together with is_causal=1 fails IAttention's "
               "validation: fold the causal condition into the mask")
        return
    q_len, k_len = _seq_len(node.inputs[0]), _seq_len(node.inputs[1])
    if q_len is None or q_len != k_len:
        yield ("causal-alignment", BLOCKER, f"is_causal=1 with query length {_text(q_len)} and "
               f"key length {_text(k_len)}: TensorRT aligns the causal mask top-left, ONNX "
               "(>= 1.23) bottom-right; give an explicit mask")


def _heads(node: gs.Node, _path: str) -> Iterator[tuple]:
    ranks = _ranks(node)
    if not ranks or len(set(ranks.values())) != 1:
        return   # the rank check speaks
    rank = next(iter(ranks.values()))
    for index, attr in ((0, "q_num_heads"), (1, "kv_num_heads")):
        value = node.attrs.get(attr)
        if rank == 3:
            if not value:
                yield ("static-heads", BLOCKER, f"3-D inputs need {attr}: the parser reshapes "
                       "to 4-D with it")
            continue
        dim = _dim(node.inputs[index], 1)
        if not isinstance(dim, int):
            yield ("static-heads", BLOCKER, f"the head count (dim 1 of "
                   f"'{node.inputs[index].name}') is {_text(dim)}, not a static number")
        elif value and value != dim:
            yield ("static-heads", BLOCKER, f"{attr}={value} contradicts dim 1 = {dim} of "
                   f"'{node.inputs[index].name}'")


def _rank(node: gs.Node, _path: str) -> Iterator[tuple]:
    ranks = _ranks(node)
    if len(set(ranks.values())) > 1:
        yield ("rank", BLOCKER, f"Q, K and V must have one rank, got {ranks}")
        return
    rank = next(iter(ranks.values()), None)
    if rank is not None and rank not in (3, 4):
        yield ("rank", BLOCKER, f"Q, K and V must be 4-D (or 3-D), got rank {rank}")
    elif rank == 3:
        yield ("rank", WARNING, "3-D Q/K/V: parsers that reshape them with q_num_heads/"
               "kv_num_heads take them; operators.md documents 4-D only",
               "fuse-attention{target=onnx-attention qkv-layout=4d}")
    mask = _present(node.inputs, 3)
    if mask is not None and mask.shape is not None and len(mask.shape) != 4:
        severity = BLOCKER if rank == 4 else WARNING
        yield ("rank", severity, f"mask '{mask.name}' is {len(mask.shape)}-D; the parser takes a "
               "4-D mask [B|1, H|1, Sq, Skv]")


def _control_flow(node: gs.Node, path: str) -> Iterator[tuple]:
    if _BRANCH.search(path):
        yield ("control-flow", BLOCKER, "Attention inside an If branch does not build "
               "(NVIDIA/TensorRT#4739): inline the branch",
               "unroll-control-flow (optimize --specialize NAME=VALUE)")
    elif _LOOP_BODY.search(path):
        yield ("control-flow", WARNING, "Attention inside a loop body gets no fused kernel",
               "unroll-control-flow")


def _scale(node: gs.Node, _path: str) -> Iterator[tuple]:
    scale = node.attrs.get("scale")
    if scale is None:
        return
    if not math.isfinite(scale) or scale < 0:
        yield ("scale", BLOCKER, f"scale={scale}: the importer multiplies Q and K by "
               "sqrt(scale), which is not a real number", "fuse-attention{target=canonical}")
    else:
        head = _head_size(node)
        if head is None or not math.isclose(scale, 1.0 / math.sqrt(head), rel_tol=1e-6):
            yield ("scale", INFO, f"scale={scale:g}: the importer multiplies Q and K by "
                   f"sqrt(scale)={math.sqrt(scale):g} each, the same product up to rounding",
                   "none: nothing to change")


_NODE_CHECKS = (_outputs, _cache_inputs, _attributes, _causal, _rank, _heads, _control_flow,
                _scale)


# --- shapes ------------------------------------------------------------------------------------

def _ranks(node: gs.Node) -> dict[str, int]:
    return {name: len(t.shape) for name, t in zip("QKV", node.inputs[:3], strict=False)
            if t.shape is not None}


def _dim(tensor: gs.Tensor, axis: int):
    shape = tensor.shape
    return shape[axis] if shape is not None and len(shape) > axis else None


def _seq_len(tensor: gs.Tensor):
    """The sequence length (dim -2 of 4-D, dim 1 of 3-D): an int, a symbol name, or None."""
    shape = tensor.shape
    if shape is None or len(shape) not in (3, 4):
        return None
    value = shape[-2] if len(shape) == 4 else shape[1]
    return value if isinstance(value, (int, str)) and value not in (-1, "") else None


def _head_size(node: gs.Node) -> int | None:
    shape, rank = node.inputs[0].shape, len(node.inputs[0].shape or ())
    if rank == 4 and isinstance(shape[-1], int):
        return shape[-1]
    heads = node.attrs.get("q_num_heads")
    if rank == 3 and isinstance(shape[-1], int) and heads:
        return shape[-1] // heads
    return None


def _text(value) -> str:
    return "unknown" if value is None else repr(value) if isinstance(value, str) else str(value)


__all__ = ["BLOCKER", "INFO", "RULES", "WARNING", "Violation", "blockers", "check_attention",
           "is_onnx_attention", "node_violations", "opset_violations"]
