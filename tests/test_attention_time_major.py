"""Time-major heads from a time-major projection (``nn.MultiheadAttention``, batch_first=False).

``[S, B, E]`` input, projected as it is, reshaped to ``[S, B*H, D]`` and only then transposed to
``[B*H, S, D]`` (``[B*H, D, S]`` for K^T): no Transpose ``[1, 0, 2]`` comes before the head
split, so the heads were unknown (``None``) on MHA's cross-attention with ``kdim``/``vdim``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import xattn_compiler as xc

HEADS, HEAD_DIM, WIDTH, CTX = 4, 16, 64, 24


def _time_major_cross_attention() -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def weight(name, rows, cols):
        return numpy_helper.from_array(
            (rng.standard_normal((rows, cols)) * rows ** -0.5).astype(np.float32), name)

    inits = [weight("wq", WIDTH, WIDTH), weight("wk", CTX, WIDTH), weight("wv", CTX, WIDTH),
             numpy_helper.from_array(np.array([0, -1, HEAD_DIM], np.int64), "heads"),
             numpy_helper.from_array(np.array([0, -1, WIDTH], np.int64), "merged"),
             numpy_helper.from_array(np.array(HEAD_DIM ** -0.5, np.float32), "scale")]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q_proj"]),
        helper.make_node("Reshape", ["q_proj", "heads"], ["q_sbd"]),       # [S, B*H, D]
        helper.make_node("Transpose", ["q_sbd"], ["q"], perm=[1, 0, 2]),
        helper.make_node("Mul", ["q", "scale"], ["q_scaled"]),
        helper.make_node("MatMul", ["context", "wk"], ["k_proj"]),
        helper.make_node("Reshape", ["k_proj", "heads"], ["k_sbd"]),
        helper.make_node("Transpose", ["k_sbd"], ["k_t"], perm=[1, 2, 0]),  # [B*H, D, M]
        helper.make_node("MatMul", ["context", "wv"], ["v_proj"]),
        helper.make_node("Reshape", ["v_proj", "heads"], ["v_sbd"]),
        helper.make_node("Transpose", ["v_sbd"], ["v"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["q_scaled", "k_t"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["context_bh"]),
        helper.make_node("Transpose", ["context_bh"], ["context_sbd"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["context_sbd", "merged"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes, "time_major",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", "B", WIDTH]),
         helper.make_tensor_value_info("context", TensorProto.FLOAT, ["M", "B", CTX])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["S", "B", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_time_major_projection_split_into_batched_heads_reports_its_heads():
    model = _time_major_cross_attention()
    (block,) = xc.find_attention(model)
    assert (block.kind, block.num_heads, block.head_dim) == ("cross", HEADS, HEAD_DIM)
    result = xc.optimize(model)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Attention") == 1 and "Softmax" not in ops
    assert xc.verify(model, result.model).ok
