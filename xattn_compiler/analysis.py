"""Binding-time analysis and small constant evaluation, in one linear walk per graph.

Every tensor gets the set of graph inputs its *values* depend on (a bitset; an empty set means it is a
constant) and whether an attention block's output lies upstream of it. Bodies of If/Loop/Scan
are walked too: their own inputs are dynamic, and outer-scope values keep the outer result.

``value`` evaluates the small constant expressions patterns need (a scale written as
``Cast(Sqrt(16))``, a fill value behind an ``Unsqueeze``), with numpy, for a whitelist of ops.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_graphsurgeon as gs

from .ir import _bodies, constant_value, producer

_MAX_EVAL_ELEMENTS = 1 << 16
#: Ops whose output depends on their input's shape, not its values. Their outputs count as
#: data-independent: a Reshape of K whose target reads the batch size off the query stream still
#: computes K from the encoder states alone.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
#: A bit for values that depend on something other than a graph input (a loop counter).
BODY_BIT = 1


class BindingTimes:
    """Which graph inputs each tensor depends on, for a graph and all bodies below it."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.inputs = [t for t in graph.inputs]
        self._bit = {id(t): 1 << (i + 1) for i, t in enumerate(self.inputs)}
        self._deps: dict[int, int] = {}
        self._attention_outputs: set[int] = set()
        self._via_attention: dict[int, bool] = {}
        self._walk(graph)

    # --- construction ---

    def _walk(self, graph: gs.Graph) -> None:
        for tensor in graph.inputs:
            self._deps.setdefault(id(tensor), self._bit.get(id(tensor), BODY_BIT))
        for node in graph.nodes:
            deps = 0
            if node.op not in SHAPE_ONLY_OPS:
                for tensor in node.inputs:
                    deps |= self.deps(tensor)
            for body in _bodies(node):
                self._walk(body)
                for out in body.outputs:
                    deps |= self.deps(out) & ~BODY_BIT
                deps |= BODY_BIT if node.op in ("Loop", "Scan") else 0
            for out in node.outputs:
                self._deps[id(out)] = deps

    def deps(self, tensor: gs.Tensor) -> int:
        key = id(tensor)
        if key not in self._deps:
            # A constant, or a name only an enclosing scope defines (treated as dynamic).
            self._deps[key] = 0 if isinstance(tensor, gs.Constant) else BODY_BIT
        return self._deps[key]

    # --- queries ---

    def is_constant(self, tensor: gs.Tensor) -> bool:
        return self.deps(tensor) == 0

    def input_names(self, tensor: gs.Tensor) -> list[str]:
        """The top-level graph inputs ``tensor`` depends on, in graph order."""
        deps = self.deps(tensor)
        return [t.name for t in self.inputs if deps & self._bit[id(t)]]

    def mark_attention_outputs(self, tensors: Iterable[gs.Tensor]) -> None:
        self._attention_outputs = {id(t) for t in tensors}
        self._via_attention = {}

    def via_attention(self, tensor: gs.Tensor, _depth: int = 0) -> bool:
        """Whether an attention block's output is upstream of ``tensor``."""
        key = id(tensor)
        if key in self._via_attention:
            return self._via_attention[key]
        stack, order, seen = [tensor], [], set()
        while stack:  # iterative DFS: encoder stacks are deep
            current = stack.pop()
            if id(current) in seen or id(current) in self._via_attention:
                continue
            seen.add(id(current))
            order.append(current)
            node = producer(current)
            if node is not None and id(current) not in self._attention_outputs:
                stack.extend(node.inputs)
        for current in reversed(order):
            node = producer(current)
            self._via_attention[id(current)] = id(current) in self._attention_outputs or (
                node is not None and any(self._via_attention.get(id(t), False) for t in node.inputs))
        return self._via_attention[key]




# --- constant values ---------------------------------------------------------------------------

#: Stand-ins for dims only known at run time. An expression evaluated with both that gives the
#: same result does not depend on them: ``Gather(Shape(x), 2) / 4`` is static when dim 2 is.
_UNKNOWN_DIMS = (1_000_003, 1_000_033)


def _unary(fn):
    return lambda node, args, unknown: fn(args[0])


def _binary(fn):
    return lambda node, args, unknown: fn(args[0], args[1])


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        return np.trunc(a / b).astype(np.result_type(a, b))  # ONNX integer Div truncates
    return a / b


def _shape(node: gs.Node, args, unknown: int) -> np.ndarray:
    shape = node.inputs[0].shape
    dims = np.array([d if isinstance(d, int) and d >= 0 else unknown for d in shape], np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return dims[start:end]


def _slice(node: gs.Node, args, unknown: int) -> np.ndarray:
    data, starts, ends = args[0], args[1], args[2]
    axes = args[3] if len(args) > 3 else np.arange(len(starts))
    steps = args[4] if len(args) > 4 else np.ones(len(starts), np.int64)
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return data[tuple(index)]


_EVAL = {
    "Identity": _unary(lambda x: x),
    "Cast": lambda node, args, unknown: args[0].astype(_numpy_dtype(node)),
    "Sqrt": _unary(np.sqrt),
    "Reciprocal": _unary(lambda x: 1 / x),
    "Neg": _unary(np.negative),
    "Mul": _binary(np.multiply),
    "Div": _binary(_div),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Pow": _binary(np.power),
    "Reshape": lambda node, args, unknown: args[0].reshape(_reshape_target(args[0], args[1])),
    "Squeeze": lambda node, args, unknown: np.squeeze(args[0]) if len(args) < 2 else np.squeeze(
        args[0], axis=tuple(int(a) for a in np.atleast_1d(args[1]))),
    "Unsqueeze": lambda node, args, unknown: np.expand_dims(
        args[0], axis=tuple(int(a) for a in np.atleast_1d(args[1]))),
    "Shape": _shape,
    "Gather": lambda node, args, unknown: np.take(args[0], args[1].astype(np.int64),
                                                  axis=node.attrs.get("axis", 0)),
    "Slice": _slice,
    "Concat": lambda node, args, unknown: np.concatenate(args, axis=node.attrs["axis"]),
    # A Transpose of a constant (an exporter's no-op on a shape or axes constant) is still one.
    "Transpose": lambda node, args, unknown: np.transpose(args[0], node.attrs.get("perm")),
}


def _numpy_dtype(node: gs.Node) -> np.dtype:
    from onnx import helper

    return np.dtype(helper.tensor_dtype_to_np_dtype(node.attrs["to"]))


def _reshape_target(array: np.ndarray, shape: np.ndarray) -> tuple[int, ...]:
    dims = [int(d) for d in shape]
    return tuple(array.shape[i] if d == 0 else d for i, d in enumerate(dims))


def constant_eval(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a small constant or shape expression, or None when it is not one we know.

    Shape-derived values count when they do not depend on run-time dims (evaluated with two
    different stand-ins for those dims, they agree).
    """
    first = _eval(tensor, _UNKNOWN_DIMS[0], 0, {})
    if first is None or not _uses_shape(tensor, 0):
        return first
    second = _eval(tensor, _UNKNOWN_DIMS[1], 0, {})
    if second is None or first.shape != second.shape or not np.array_equal(first, second):
        return None
    return first


def _uses_shape(tensor: gs.Tensor, depth: int) -> bool:
    node = producer(tensor)
    if node is None or depth > 8:
        return False
    return node.op == "Shape" or any(_uses_shape(t, depth + 1) for t in node.inputs
                                     if node.op not in ("Shape",))


def _eval(tensor: gs.Tensor, unknown: int, depth: int, memo: dict) -> np.ndarray | None:
    if id(tensor) in memo:
        return memo[id(tensor)]
    value = constant_value(tensor)
    if value is not None:
        return value if value.size <= _MAX_EVAL_ELEMENTS else None
    node = producer(tensor)
    if node is None or depth > 8 or node.op not in _EVAL or len(node.outputs) != 1:
        return None
    if node.op == "Shape":
        args = []
        if node.inputs[0].shape is None:
            return None
    else:
        args = [_eval(t, unknown, depth + 1, memo) for t in node.inputs]
        if any(a is None for a in args):
            return None
    try:
        with np.errstate(all="ignore"):
            result = np.asarray(_EVAL[node.op](node, args, unknown))
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    memo[id(tensor)] = result if result.size <= _MAX_EVAL_ELEMENTS else None
    return memo[id(tensor)]


#: Ops whose output rank is the largest of their inputs' (broadcasting, or rank-preserving).
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Softmax"})
#: Ops whose output has their first input's rank (normalisations over trailing axes,
#: element-wise activations, and cuts and joins along an axis: a fused QKV's Split, rotary
#: halves' Slice and Concat).
_RANK_OF_FIRST_INPUT = frozenset({"LayerNormalization", "RMSNormalization", "GroupNormalization",
                                  "InstanceNormalization", "Relu", "Gelu", "Erf", "Tanh",
                                  "Sigmoid", "Neg", "Sqrt", "Reciprocal", "Exp", "Dropout",
                                  "Split", "Slice", "Concat", "Tile", "Clip", "Abs"})


def inferred_rank(tensor: gs.Tensor, depth: int = 32,
                  _seen: dict[int, int | None] | None = None) -> int | None:
    """The tensor's rank; where shapes are unknown (If/Loop bodies, computed reshape targets)
    read off the layout ops that made it (so ``Softmax(axis=3)`` of 4-D scores is the last
    axis there too, and ``Slice(Shape(x), 0, 2)`` of a 3-D x is two dims)."""
    seen = {} if _seen is None else _seen
    if id(tensor) not in seen:
        seen[id(tensor)] = None  # while in progress: a cycle reads as unknown
        seen[id(tensor)] = _rank_of(tensor, depth, seen)
    return seen[id(tensor)]


def _rank_of(tensor: gs.Tensor, depth: int, seen: dict[int, int | None]) -> int | None:
    """:func:`inferred_rank` without the memo: each tensor is read once per query, so the
    walk back through residual Adds (two inputs each) stays linear in the tensors it meets."""
    if tensor.shape is not None:
        return len(tensor.shape)
    if getattr(tensor, "values", None) is not None:
        return tensor.values.ndim
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or depth == 0:
        return None
    if node.op == "Transpose":  # no perm: the axes reversed, the rank kept
        perm = node.attrs.get("perm")
        return len(perm) if perm is not None else inferred_rank(node.inputs[0], depth - 1, seen)
    if node.op == "Reshape":  # as many dims as its target has elements
        return piece_length(node.inputs[1])
    if node.op == "Shape":
        return 1
    if node.op in ("Unsqueeze", "Squeeze"):  # a relative-position bias made [1,H,S,S]
        data = inferred_rank(node.inputs[0], depth - 1, seen)
        axes = constant_eval(node.inputs[1]) if len(node.inputs) > 1 else None
        count = (int(axes.size) if axes is not None
                 else len(node.attrs["axes"]) if node.attrs.get("axes") is not None else None)
        if data is None or count is None:
            return None
        return data + count if node.op == "Unsqueeze" else data - count
    if node.op == "Gather":
        data, index = (inferred_rank(t, depth - 1, seen) for t in node.inputs[:2])
        return None if data is None or index is None else data - 1 + index
    if node.op in _RANK_OF_FIRST_INPUT:
        return inferred_rank(node.inputs[0], depth - 1, seen)
    if node.op == "Expand":  # broadcast to a shape: the larger of the two ranks
        data, shape = inferred_rank(node.inputs[0], depth - 1, seen), piece_length(node.inputs[1])
        return None if data is None or shape is None else max(data, shape)
    if node.op == "Flatten":
        return 2
    if node.op == "MatMul" or node.op in _BROADCASTING:
        ranks = [inferred_rank(t, depth - 1, seen) for t in node.inputs if t is not None and t.name]
        return max(ranks) if ranks and None not in ranks else None
    return None


def piece_length(tensor: gs.Tensor) -> int | None:
    """How many elements a 1-D shape tensor (a computed reshape target or a piece of one)
    holds, from its value or shape or, where shape inference saw nothing (If/Loop bodies),
    from how it was made: a constant, ``Slice(Shape(x), s, e)`` (``min(e, rank(x)) - s``
    dims), ``Gather(Shape(x), [i, j])``, an Unsqueezed scalar (one dim), ``B*H`` made from
    ``B`` (a piece times ``[H]``), a Concat of pieces, any of them behind Identities."""
    value = constant_eval(tensor)
    if value is not None:
        return int(value.size)
    if tensor.shape is not None and len(tensor.shape) == 1 and isinstance(tensor.shape[0], int):
        return tensor.shape[0]
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None:
        return None
    if node.op == "Identity":
        return piece_length(node.inputs[0])
    if node.op == "Shape":  # Reshape(x, Shape(y)): as many dims as y has (start/end applied)
        rank = inferred_rank(node.inputs[0])
        if rank is None:
            return None
        start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
        start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
        return max(end - start, 0)
    if node.op == "Unsqueeze":
        return 1 if inferred_rank(node.inputs[0], 3) == 0 else None
    if node.op == "Gather":
        index = constant_eval(node.inputs[1])
        return index.size if index is not None and index.ndim == 1 else None
    if node.op == "Slice":
        return _shape_slice_length(node)
    if node.op in ("Mul", "Add"):
        sizes = [piece_length(t) for t in node.inputs]
        return max(sizes) if None not in sizes else None
    if node.op == "Concat":  # a computed target: its pieces end to end
        sizes = [piece_length(t) for t in node.inputs]
        return sum(sizes) if None not in sizes else None
    return None


def _shape_slice_length(node: gs.Node) -> int | None:
    bounds = [constant_eval(t) for t in node.inputs[1:3]]
    steps = constant_eval(node.inputs[4]) if len(node.inputs) > 4 else None
    if any(b is None or b.size != 1 for b in bounds) or (steps is not None
                                                          and not np.all(steps == 1)):
        return None
    start, end = (int(b.reshape(-1)[0]) for b in bounds)
    shape_node = producer(node.inputs[0])
    while shape_node is not None and shape_node.op == "Identity":
        shape_node = producer(shape_node.inputs[0])
    if shape_node is None or shape_node.op != "Shape" or shape_node.attrs.get("start") \
            or shape_node.attrs.get("end") is not None:
        return None
    rank = inferred_rank(shape_node.inputs[0])
    if rank is None:
        return None  # the rank clamps the end: without it the length is a guess
    end = min(end, rank)
    return end - start if 0 <= start <= end else None
