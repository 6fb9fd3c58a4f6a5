"""Blocks that already are one op: the anchor is the op itself.

Each entry maps ``(domain, op_type)`` to a function that names the node's Q, K and V inputs
(None where packed into another input) and reads heads and scale from its attributes:

    ONNX Attention (opset 23+)         Attention(Q, K, V, [mask], ...)    q_num_heads, scale
    com.microsoft MultiHeadAttention   MHA(q, k, v, ...)                  num_heads, scale
    com.microsoft Attention            Attention(x, W_qkv, b, ...)        self-attention only
    TensorRT fMHCA (8.5 demo plugin)   fMHCA(q_BSNH, kv_BSN2H)            cross-attention
    TensorRT fMHA_V2                   fMHA_V2(qkv_BSN3H)                 self-attention
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx_graphsurgeon as gs


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _onnx_attention(node: gs.Node) -> dict[str, Any]:
    q = _input(node, 0)
    heads = node.attrs.get("q_num_heads")
    if heads is None and q is not None and q.shape is not None and len(q.shape) == 4:
        heads = q.shape[1]
    return {"q": q, "k": _input(node, 1), "v": _input(node, 2), "num_heads": heads,
            "num_kv_heads": node.attrs.get("kv_num_heads"), "scale": node.attrs.get("scale"),
            "mask": _input(node, 3), "causal": bool(node.attrs.get("is_causal", 0))}


def _ms_mha(node: gs.Node) -> dict[str, Any]:
    return {"q": _input(node, 0), "k": _input(node, 1), "v": _input(node, 2),
            "num_heads": node.attrs.get("num_heads"), "scale": node.attrs.get("scale"),
            "mask": _input(node, 4) or _input(node, 5), "packed_qkv": _input(node, 1) is None}


def _ms_attention(node: gs.Node) -> dict[str, Any]:
    x = _input(node, 0)
    return {"q": x, "k": x, "v": x, "num_heads": node.attrs.get("num_heads"),
            "scale": node.attrs.get("scale"), "mask": _input(node, 3), "self_only": True}


def _fmhca(node: gs.Node) -> dict[str, Any]:
    kv = _input(node, 1)
    return {"q": _input(node, 0), "k": kv, "v": kv, "num_heads": _dim(_input(node, 0), 2),
            "head_dim": _dim(_input(node, 0), 3), "scale": None}


def _fmha_v2(node: gs.Node) -> dict[str, Any]:
    qkv = _input(node, 0)
    return {"q": qkv, "k": qkv, "v": qkv, "num_heads": _dim(qkv, 2), "head_dim": _dim(qkv, 4),
            "scale": None, "self_only": True}


def _dim(tensor: gs.Tensor | None, axis: int) -> int | None:
    if tensor is None or tensor.shape is None or len(tensor.shape) <= axis:
        return None
    dim = tensor.shape[axis]
    return dim if isinstance(dim, int) else None


FUSED_ATTENTION_OPS: dict[tuple[str, str], Callable[[gs.Node], dict[str, Any]]] = {
    ("", "Attention"): _onnx_attention,
    ("com.microsoft", "MultiHeadAttention"): _ms_mha,
    ("com.microsoft", "Attention"): _ms_attention,
    ("", "fMHCA"): _fmhca,
    ("", "fMHA_V2"): _fmha_v2,
}


def fused_operands(node: gs.Node) -> dict[str, Any] | None:
    """What a fused attention node reads, or None when ``node`` is not one."""
    reader = FUSED_ATTENTION_OPS.get(((node.domain or "").replace("ai.onnx", ""), node.op))
    if reader is None and node.attrs.get("plugin_version") is not None:
        reader = FUSED_ATTENTION_OPS.get(("", node.op))
    return reader(node) if reader else None
