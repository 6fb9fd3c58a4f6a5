"""Synthetic decoders of any depth, for scaling benchmarks.

Each layer is a pre-LN decoder layer spelled the way eager exports spell it: MatMul + bias
projections, Reshape [0, 0, H, D] + Transpose head split, K transposed in the split
(perm [0, 2, 3, 1]), Div by sqrt(D), Softmax, head merge, output projection and residual; one
self-attention (causal mask input) and one cross-attention (encoder states input) per layer,
about 40 nodes a layer. Weights are tiny so a 100k-node graph stays small in memory.

With ``clutter=True`` each attention carries what eager exports leave around it, for the
clean-up passes to remove: the Q head split reads a target computed from ``Shape``
(Gather/Unsqueeze/Concat), K^T is two Transposes (head split, then swap of the last axes),
V passes an Unsqueeze/Squeeze pair and a Cast to its own type, and the merge an Identity.
About 60 nodes a layer then.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def decoder(layers: int, embed: int = 32, heads: int = 4, clutter: bool = False) -> onnx.ModelProto:
    head_dim = embed // heads
    rng = np.random.default_rng(0)
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(np.array([0, 0, heads, head_dim], np.int64), "split"),
             numpy_helper.from_array(np.array([0, 0, embed], np.int64), "merge"),
             numpy_helper.from_array(np.array(np.sqrt(head_dim), np.float32), "sqrt_d"),
             numpy_helper.from_array(np.ones(embed, np.float32), "ln_scale"),
             numpy_helper.from_array(np.array([heads, head_dim], np.int64), "heads_dims"),
             numpy_helper.from_array(np.array(0, np.int64), "axis_0"),
             numpy_helper.from_array(np.array(1, np.int64), "axis_1"),
             numpy_helper.from_array(np.array([0], np.int64), "axes_0"),
             numpy_helper.from_array(np.zeros(embed, np.float32), "ln_bias")]

    def weight(name: str, shape: tuple[int, ...]) -> str:
        inits.append(numpy_helper.from_array(
            (rng.standard_normal(shape) * 0.1).astype(np.float32), name))
        return name

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def project(p: str, src: str, head_split: bool = True, perm=(0, 2, 1, 3),
                target: str = "split") -> str:
        out = node("Add", [node("MatMul", [src, weight(p + "_w", (embed, embed))], p + "_mm"),
                           weight(p + "_b", (embed,))], p)
        if not head_split:
            return out
        return node("Transpose", [node("Reshape", [out, target], p + "_split")], p + "_t",
                    perm=list(perm))

    def computed_split(p: str, src: str) -> str:
        shape = node("Shape", [src], p + "shape")
        dims = [node("Unsqueeze", [node("Gather", [shape, axis], f"{p}dim{i}", axis=0),
                                   "axes_0"], f"{p}dim{i}_1d")
                for i, axis in enumerate(("axis_0", "axis_1"))]
        return node("Concat", [*dims, "heads_dims"], p + "target", axis=0)

    def attention(p: str, x: str, context: str, mask: str | None) -> str:
        if not clutter:
            q = project(p + "q", x)
            k = project(p + "k", context, perm=(0, 2, 3, 1))
            v = project(p + "v", context)
        else:
            q = project(p + "q", x, target=computed_split(p + "q_", x))
            k = node("Transpose", [project(p + "k", context)], p + "k_tt", perm=[0, 1, 3, 2])
            v = node("Squeeze", [node("Unsqueeze", [project(p + "v", context), "axes_0"],
                                      p + "v_u"), "axes_0"], p + "v_s")
            v = node("Cast", [v], p + "v_cast", to=TensorProto.FLOAT)
        scores = node("Div", [node("MatMul", [q, k], p + "qk"), "sqrt_d"], p + "scaled")
        if mask:
            scores = node("Add", [scores, mask], p + "masked")
        probs = node("Softmax", [scores], p + "probs", axis=-1)
        ctx = node("MatMul", [probs, v], p + "ctx")
        if clutter:
            ctx = node("Identity", [ctx], p + "ctx_id")
        merged = node("Reshape", [node("Transpose", [ctx], p + "ctx_t", perm=[0, 2, 1, 3]),
                                  "merge"], p + "merged")
        return project(p + "o", merged, head_split=False)

    x = "x"
    for layer in range(layers):
        for kind, context, mask in (("self", None, "mask"), ("cross", "encoder_hidden_states", None)):
            p = f"l{layer}.{kind}."
            normed = node("LayerNormalization", [x, "ln_scale", "ln_bias"], p + "ln", axis=-1)
            x = node("Add", [x, attention(p, normed, context or normed, mask)], p + "residual")
    graph = helper.make_graph(
        nodes, f"decoder_{layers}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", embed]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT,
                                       ["batch", "enc_len", embed]),
         helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "seq", "seq"])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", "seq", embed])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def fitted_exponent(nodes: list[int], seconds: list[float]) -> float:
    """The slope of log(time) against log(nodes): 1.0 is linear, 2.0 quadratic."""
    x = np.log(np.asarray(nodes, dtype=float))
    y = np.log(np.maximum(np.asarray(seconds, dtype=float), 1e-6))
    return float(np.polyfit(x, y, 1)[0])
