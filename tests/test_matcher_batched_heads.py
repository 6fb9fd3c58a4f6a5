"""Heads batched to ``[B*H,S,D]`` without a 4-D ``[..., H, D]`` head split on the core's
operand chain: the head count comes from the batching Reshape itself (hand-built graphs)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xattn_compiler.attention import find_attention

B, S, E, H, D = 2, 3, 8, 2, 4


def _model(nodes, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, E])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, S, E])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def _weights(rng) -> dict:
    return {f"w{n}": rng.standard_normal((E, E)).astype(np.float32) for n in "qkv"}


def _core_and_merge_time_major() -> list:
    return [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[1, 0, 2]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"]),
        helper.make_node("Transpose", ["merged"], ["out"], perm=[1, 0, 2]),
    ]


def test_time_major_heads_report_their_head_count():
    # nn.MultiheadAttention: [B,S,E] -> [S,B,E] -> [S,B*H,D] -> [B*H,S,D].
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_proj"]),
                  helper.make_node("Transpose", [f"{n}_proj"], [f"{n}_tm"], perm=[1, 0, 2]),
                  helper.make_node("Reshape", [f"{n}_tm", "split_shape"], [f"{n}_split"]),
                  helper.make_node("Transpose", [f"{n}_split"], [n], perm=[1, 0, 2])]
    inits = {**_weights(np.random.default_rng(0)),
             "split_shape": np.array([S, B * H, D], np.int64),
             "merge_shape": np.array([S, B, E], np.int64),
             "scale": np.array(D ** -0.5, np.float32)}
    (block,) = find_attention(_model(nodes + _core_and_merge_time_major(), inits))
    assert (block.kind, block.num_heads, block.head_dim) == ("self", H, D)


def test_heads_changed_in_4d_then_batched_report_their_head_count():
    # A table added to [B,H,S,D] heads (as RoPE rotates them) ends the operand walk; the only
    # head reshape left on the chain is [B,H,S,D] -> [B*H,S,D].
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}_proj"]),
                  helper.make_node("Reshape", [f"{n}_proj", "split_shape"], [f"{n}_split"]),
                  helper.make_node("Transpose", [f"{n}_split"], [f"{n}_bhsd"], perm=[0, 2, 1, 3])]
        source = f"{n}_bhsd"
        if n != "v":
            nodes.append(helper.make_node("Add", [source, "table"], [f"{n}_pos"]))
            source = f"{n}_pos"
        nodes.append(helper.make_node("Reshape", [source, "batch_shape"], [n]))
    nodes += [
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
        helper.make_node("Reshape", ["ctx", "unbatch_shape"], ["ctx4"]),
        helper.make_node("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["out"]),
    ]
    inits = {**_weights(np.random.default_rng(1)),
             "split_shape": np.array([B, S, H, D], np.int64),
             "batch_shape": np.array([B * H, S, D], np.int64),
             "unbatch_shape": np.array([B, H, S, D], np.int64),
             "merge_shape": np.array([B, S, E], np.int64),
             "table": np.random.default_rng(2).standard_normal((S, D)).astype(np.float32)}
    (block,) = find_attention(_model(nodes, inits))
    assert (block.num_heads, block.head_dim) == (H, D)


def test_fused_qkv_split_per_head_reports_one_part_as_the_head_dim_in_a_body():
    # GPT-NeoX/Bloom: QKV projected to [B,S,H,3*D] and Split per head on the last axis, inside
    # an If branch (no shapes): the head split's target ends in 3*D, the head dim is D.
    nodes = [helper.make_node("MatMul", ["x", "wqkv"], ["qkv"]),
             helper.make_node("Reshape", ["qkv", "split_shape"], ["qkv_heads"]),
             helper.make_node("Split", ["qkv_heads", "sizes"], ["q4", "k4", "v4"], axis=-1)]
    for n in "qkv":
        nodes.append(helper.make_node("Transpose", [f"{n}4"], [f"{n}_bhsd"], perm=[0, 2, 1, 3]))
    nodes += [
        helper.make_node("Transpose", ["k_bhsd"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_bhsd", "kt"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_bhsd"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["body_out"]),
    ]
    body = helper.make_graph(nodes, "then", [], [
        helper.make_tensor_value_info("body_out", TensorProto.FLOAT, None)])
    else_body = helper.make_graph([helper.make_node("Identity", ["x"], ["else_out"])], "else",
                                  [], [helper.make_tensor_value_info("else_out", TensorProto.FLOAT,
                                                                     None)])
    inits = {"wqkv": np.random.default_rng(3).standard_normal((E, 3 * E)).astype(np.float32),
             "split_shape": np.array([0, 0, H, 3 * D], np.int64),
             "sizes": np.array([D, D, D], np.int64),
             "merge_shape": np.array([0, 0, E], np.int64), "cond": np.array(True)}
    model = _model([helper.make_node("If", ["cond"], ["out"], then_branch=body,
                                     else_branch=else_body)], inits)
    (block,) = find_attention(model)
    assert (block.kind, block.num_heads, block.head_dim) == ("self", H, D)
