"""Compile-time values of small tensors: If conditions, Loop trip counts and conditions.

A tensor's value is known at compile time when it is a constant, or when every path back from
it ends in constants or in ``Shape``/``Size`` of tensors whose shapes are static: what constant
folding would compute, without folding the whole graph. The cone is walked across scopes (a
body reads outer tensors by name) and is bounded (:data:`MAX_CONE`), so a condition computed
from a large subgraph is reported unknown rather than evaluated. Ops run one at a time in
``onnx.reference`` on their constant inputs; ops with randomness or bodies never do.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from xattn_compiler.ir import constant_value, producer

#: How many nodes a cone may hold before its value is called unknown.
MAX_CONE = 64
#: Ops whose value is not a function of their inputs (or that carry bodies).
_NOT_FOLDABLE = frozenset({
    "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
    "Bernoulli", "If", "Loop", "Scan", "SequenceMap", "Dropout",
})


class Unknown(Exception):
    """The tensor's value is not known at compile time; the message says why."""


def compile_time_value(tensor: gs.Tensor, opset: int) -> np.ndarray:
    """The value of ``tensor``, or :class:`Unknown` naming the tensor that keeps it dynamic."""
    memo: dict[int, np.ndarray] = {}
    return _value(tensor, opset, memo, [0])


def _value(tensor: gs.Tensor, opset: int, memo: dict[int, np.ndarray], budget: list[int]
           ) -> np.ndarray:
    if id(tensor) in memo:
        return memo[id(tensor)]
    value = constant_value(tensor)
    if value is None:
        node = producer(tensor)
        if node is None:
            raise Unknown(f"'{tensor.name}' is a graph or body input")
        budget[0] += 1
        if budget[0] > MAX_CONE:
            raise Unknown(f"'{tensor.name}' is computed by more than {MAX_CONE} nodes")
        value = _node_value(node, tensor, opset, memo, budget)
    memo[id(tensor)] = value
    return value


def _node_value(node: gs.Node, tensor: gs.Tensor, opset: int, memo: dict[int, np.ndarray],
                budget: list[int]) -> np.ndarray:
    if node.op in ("Shape", "Size"):
        return _shape_value(node)
    if node.op == "Identity":
        return _value(node.inputs[0], opset, memo, budget)
    if node.op in _NOT_FOLDABLE or node.domain not in ("", "ai.onnx", None):
        raise Unknown(f"'{tensor.name}' is computed by {node.op} node '{node.name}'")
    inputs = [None if not t.name else _value(t, opset, memo, budget) for t in node.inputs]
    outputs = _run_one(node, inputs, opset)
    for out, array in zip(node.outputs, outputs, strict=False):
        memo[id(out)] = array
    return memo[id(tensor)]


def _shape_value(node: gs.Node) -> np.ndarray:
    source = node.inputs[0]
    shape = source.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Unknown(f"the shape of '{source.name}' is not static ({shape})")
    if node.op == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), np.int64)
    rank = len(shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", rank)
    # Shape's start/end clamp like Python slices after negative ones wrap once.
    return np.array(shape[slice(start, end)], np.int64)


def _run_one(node: gs.Node, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if value is not None else "" for i, value in enumerate(inputs)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    attrs = {key: _attr_value(value) for key, value in node.attrs.items()}
    proto = helper.make_node(node.op, names, outs, **attrs)
    graph = helper.make_graph(
        [proto], "eval", [],
        [helper.make_empty_tensor_value_info(name) for name in outs],
        [numpy_helper.from_array(np.asarray(v), n) for n, v in zip(names, inputs, strict=True)
         if v is not None])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        results = ReferenceEvaluator(model).run(None, {})
    except Exception as exc:  # the reference runtime rejects what it cannot evaluate
        raise Unknown(f"{node.op} node '{node.name}' could not be evaluated ({exc})") from exc
    return [np.asarray(r) for r in results]


def _attr_value(value: object) -> object:
    # graphsurgeon holds tensor attributes (ConstantOfShape's value) as Constants.
    if isinstance(value, gs.Constant):
        return numpy_helper.from_array(np.asarray(value.values))
    return value


def as_bool(value: np.ndarray, what: str) -> bool:
    """A one-element value as a Python bool (an If condition, a Loop condition)."""
    if value.size != 1:
        raise Unknown(f"{what} has {value.size} elements, not one")
    return bool(value.reshape(()).item())


def as_int(value: np.ndarray, what: str) -> int:
    """A one-element integer value as a Python int (a trip count)."""
    if value.size != 1 or not np.issubdtype(value.dtype, np.integer):
        raise Unknown(f"{what} is not a one-element integer ({value.dtype}, {value.shape})")
    return int(value.reshape(()).item())
