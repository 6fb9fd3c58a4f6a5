"""A block whose operand is one part of a fused projection the block does not wholly hold.

GPT-NeoX splits one fused QKV projection per head, then Q and K leave the block for rotary ops
while V goes straight to the core; ProphetNet chunks Q/K/V by stream and its main stream reads
one chunk of each. The V walk used to take in the shared Split and the projection, whose other
parts are read outside the block, so every such block escaped and none fused.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import xattn_compiler as xc

HEADS, HEAD_DIM, WIDTH = 4, 8, 32


def _neox_like_block() -> onnx.ModelProto:
    """x @ Wqkv -> [B,S,H,3D] -> [B,H,S,3D] -> Split(q, k, v); q and k get a position
    offset (stands for the rotary ops) before the core, v does not."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((WIDTH, 3 * WIDTH)).astype(np.float32)
                                * WIDTH ** -0.5, "w_qkv"),
        numpy_helper.from_array(np.array([0, 0, HEADS, 3 * HEAD_DIM], np.int64), "heads"),
        numpy_helper.from_array(np.array([HEAD_DIM] * 3, np.int64), "parts"),
        numpy_helper.from_array(rng.standard_normal((1, 1, 1, HEAD_DIM)).astype(np.float32),
                                "pos_q"),
        numpy_helper.from_array(rng.standard_normal((1, 1, 1, HEAD_DIM)).astype(np.float32),
                                "pos_k"),
        numpy_helper.from_array(np.array(HEAD_DIM ** -0.5, np.float32), "scale"),
        numpy_helper.from_array(np.array([0, 0, WIDTH], np.int64), "merged"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_qkv"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "heads"], ["qkv_heads"]),
        helper.make_node("Transpose", ["qkv_heads"], ["qkv_bhsd"], perm=[0, 2, 1, 3]),
        helper.make_node("Split", ["qkv_bhsd", "parts"], ["q", "k", "v"], axis=-1),
        helper.make_node("Add", ["q", "pos_q"], ["q_pos"]),
        helper.make_node("Add", ["k", "pos_k"], ["k_pos"]),
        helper.make_node("Transpose", ["k_pos"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_pos", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context"]),
        helper.make_node("Transpose", ["context"], ["context_bshd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["context_bshd", "merged"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "neox_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", WIDTH])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", "S", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_v_from_a_fused_qkv_split_whose_q_and_k_leave_the_block_fuses():
    model = _neox_like_block()
    (block,) = xc.find_attention(model)
    assert (block.kind, block.num_heads, block.head_dim) == ("self", HEADS, HEAD_DIM)
    assert block.escapes == []
    # The position offsets read only this block's Q/K parts, so the cut is the block's own
    # (5c0e8a9): V's walk goes through it to the fused projection's input, as without RoPE.
    assert block.v.source.name == "x" and block.v.projection is not None
    result = xc.optimize(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Attention") == 1 and "Softmax" not in ops
    assert xc.verify(model, result.model).ok
