"""A static cost model: FLOPs and memory traffic of one run of a model, from shapes alone.

``estimate_cost(model, dims)`` binds the symbolic dims of the inputs (``{"batch": 1,
"seq": 1, "enc_len": 1500}``), folds the now constant shape computations (``canonicalize``),
runs ONNX shape inference on that concrete copy and sums, node by node (bodies of If/Loop/Scan
counted once):

* FLOPs: ``2*M*K*N`` per matrix product (MatMul, Gemm, Einsum counted as the product of its
  distinct dims), ``2 * outputs * (C_in/group * kernel)`` per convolution, ``4*B*H*Sq*Skv*D``
  for a fused attention node (two products), a few per element for normalisations and Softmax,
  one per output element for elementwise ops; layout ops (Reshape, Transpose, ...) cost none.
* bytes: what each node reads and writes, summed (the traffic of an unfused execution: an upper
  bound a fusing runtime beats), and the weights (initializers) separately.

It answers "what does a decode step cost before and after the split", where a runtime would
answer with noise. Nodes whose shapes stay unknown are counted in ``unknown_nodes`` rather than
guessed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .ir import infer_shapes, iter_graph_protos

#: Ops that move or reinterpret data without arithmetic.
LAYOUT_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Shape", "Size",
    "Gather", "GatherElements", "Slice", "Concat", "Split", "Expand", "Tile", "Constant",
    "ConstantOfShape", "Cast", "Range", "NonZero", "ScatterND", "Pad", "If", "Loop", "Scan",
    "Dropout",
})
#: FLOPs per output element of ops that are more than one operation per element.
PER_ELEMENT = {"Softmax": 5, "LogSoftmax": 5, "LayerNormalization": 8, "GroupNormalization": 8,
               "InstanceNormalization": 8, "SimplifiedLayerNormalization": 6, "Erf": 8,
               "Gelu": 8, "FastGelu": 8, "Tanh": 4, "Sigmoid": 4, "Exp": 2, "Log": 2, "Sqrt": 2,
               "Pow": 2, "Reciprocal": 1, "Mish": 8, "Softplus": 4, "HardSigmoid": 2}


@dataclass
class Cost:
    """FLOPs and bytes of one run; ``by_op`` splits FLOPs by op type."""

    flops: int = 0
    bytes_moved: int = 0
    weight_bytes: int = 0
    nodes: int = 0
    unknown_nodes: list[str] = field(default_factory=list)
    by_op: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "bytes_moved": self.bytes_moved,
                "weight_bytes": self.weight_bytes, "nodes": self.nodes,
                "unknown_nodes": list(self.unknown_nodes),
                "by_op": dict(sorted(self.by_op.items(), key=lambda kv: -kv[1]))}


def estimate_cost(model: onnx.ModelProto, dims: Mapping[str, int] | None = None) -> Cost:
    """FLOPs and bytes of one run of ``model`` with its symbolic input dims set to ``dims``."""
    from xattn_compiler.passes.canonicalize import Canonicalize

    # With the dims bound, every shape computation (Shape -> Gather -> Range ...) is constant:
    # folding it lets shape inference see through what data propagation alone cannot.
    concrete = Canonicalize()(bind_dims(model, dims or {})).model
    inferred = infer_shapes(concrete)
    shapes = _shapes(inferred)
    cost = Cost()
    for graph in iter_graph_protos(inferred.graph):
        for tensor in graph.initializer:
            cost.weight_bytes += _tensor_bytes(tensor)
        for node in graph.node:
            cost.nodes += 1
            ins = [shapes.get(name) for name in node.input if name]
            outs = [shapes.get(name) for name in node.output if name]
            if any(s is None for s in ins + outs):
                cost.unknown_nodes.append(node.name or node.op_type)
                continue
            flops = node_flops(node, [s[0] for s in ins], [s[0] for s in outs])
            cost.flops += flops
            cost.by_op[node.op_type] = cost.by_op.get(node.op_type, 0) + flops
            if node.op_type not in ("Constant", "Shape", "Size"):
                cost.bytes_moved += sum(_bytes(*s) for s in ins + outs)
    return cost


def bind_dims(model: onnx.ModelProto, dims: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs have ``dims`` in place of their symbolic dims.

    Weights are not copied twice: only the graph's inputs are rewritten on a shallow copy.
    """
    unknown = set(dims) - {d.dim_param for v in model.graph.input
                           for d in v.type.tensor_type.shape.dim if d.dim_param}
    if unknown:
        raise ValueError(f"no graph input has a dim named {sorted(unknown)}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in out.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in dims:
                size = int(dims[dim.dim_param])
                dim.Clear()
                dim.dim_value = size
    for value in out.graph.output:  # re-inferred from the bound inputs
        value.type.tensor_type.ClearField("shape")
    del out.graph.value_info[:]
    return out


def node_flops(node: onnx.NodeProto, ins: list[tuple[int, ...]], outs: list[tuple[int, ...]]) -> int:
    """FLOPs of one node given its input and output shapes (all static)."""
    op = node.op_type
    out_elems = math.prod(outs[0]) if outs else 0
    if op in LAYOUT_OPS:
        return 0
    if op in ("MatMul", "MatMulInteger", "FusedMatMul"):
        k = ins[0][-1] if ins[0] else 1
        return 2 * out_elems * k
    if op == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = ins[0][0] if trans_a else ins[0][-1]
        return 2 * out_elems * k + (out_elems if len(ins) > 2 else 0)
    if op in ("Conv", "ConvTranspose"):
        weight = ins[1]  # [C_out, C_in/group, *kernel] ([C_in, C_out/group, ...] transposed)
        if op == "Conv":
            per_output = weight[1] * math.prod(weight[2:])
            return 2 * out_elems * per_output
        # ConvTranspose: every input element meets C_out/group * kernel weights.
        return 2 * math.prod(ins[0]) * (weight[1] * math.prod(weight[2:]))
    if op == "Einsum":
        equation = next(a.s.decode() for a in node.attribute if a.name == "equation")
        return 2 * _einsum_size(equation, ins)
    if op in ("Attention", "MultiHeadAttention", "fMHCA", "fMHA_V2"):
        return _attention_flops(op, ins)
    return out_elems * PER_ELEMENT.get(op, 1)


def _attention_flops(op: str, ins: list[tuple[int, ...]]) -> int:
    """Two products, Q K^T and P V: 4 x (query elements) x (keys)."""
    if op == "fMHA_V2":  # packed qkv [B, S, N, 3, H]
        b, s, n, _, h = ins[0]
        return 4 * b * s * n * h * s
    q, k = ins[0], ins[1]
    keys = k[-2] if len(k) == 4 and op != "fMHCA" else k[1]  # [B,H,S,D]; [B,S,...] otherwise
    return 4 * math.prod(q) * keys


def _einsum_size(equation: str, ins: list[tuple[int, ...]]) -> int:
    sizes: dict[str, int] = {}
    for term, shape in zip(equation.split("->")[0].split(","), ins, strict=False):
        for letter, size in zip(term.strip(), shape, strict=False):
            sizes[letter] = size
    return math.prod(sizes.values())


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """``name -> (shape, element type)`` for every tensor with a fully static shape."""
    known: dict[str, tuple[tuple[int, ...], int]] = {}
    for graph in iter_graph_protos(model.graph):
        for value in (*graph.input, *graph.output, *graph.value_info):
            tensor_type = value.type.tensor_type
            if not tensor_type.HasField("shape"):
                continue
            dims = tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                known[value.name] = (tuple(d.dim_value for d in dims), tensor_type.elem_type)
        for tensor in graph.initializer:
            known[tensor.name] = (tuple(tensor.dims), tensor.data_type)
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.TENSOR:
                        known[node.output[0]] = (tuple(attr.t.dims), attr.t.data_type)
    return known


def _bytes(shape: tuple[int, ...], elem_type: int) -> int:
    return math.prod(shape) * _itemsize(elem_type)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims) * _itemsize(tensor.data_type)


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 1  # 4-bit and float8 types: bytes, rounded up
