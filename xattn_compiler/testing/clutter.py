"""Clutter: the value-preserving op chains exporters scatter through graphs, from an op table.

Two tables drive everything here and in :mod:`xattn_compiler.testing.strategies`:

- :data:`OPS`, one :class:`OpSpec` per primitive op: the constraint under which it applies to a
  tensor (rank, dtype, which dims must be static), its shape function, its numpy semantics and
  how it is emitted. Graphs grown from it are valid by construction, and the stateful test
  checks each shape function against ONNX shape inference and ONNX Runtime.
- :data:`CLUTTER`, one :class:`ClutterKind` per chain of those ops whose result *equals* its
  input: an identity Transpose, a Transpose then its inverse, a Reshape to a flattened shape
  and back, Unsqueeze then Squeeze on the same axis, Identity, a Cast to the same type, a
  widening Cast and back. Values never change, so a model's ground truth and reference outputs
  stay valid after :func:`insert_clutter`.

Where clutter may go is a question of the pattern definition of attention, answered by
:func:`clutter_sites`: anywhere outside a block; inside a block only where the pattern library
allows such ops (the Q/K/V operand chains between the projection and the core MatMuls, the
score and probability chains around Softmax, the integer shape computations), never in more
steps than the library's bounded chains take. The core MatMuls' outputs and the head merge
stay clean: the matcher defines a block's output as the end of the merge chain.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "CLUTTER", "OPS", "REGION_OPS", "ClutterKind", "Emitter", "ModelEditor", "OpSpec", "Site",
    "chain_shape", "clutter_sites", "emit_chain", "insert_clutter", "tensor_types",
]

Dim = int | str | None  # static size, symbolic name, or unknown
Shape = tuple[Dim, ...]

_FLOATS = ("float16", "float32", "float64")
#: Widening casts that round-trip exactly (every value of the narrow type is representable).
_WIDER = {"float16": "float32", "float32": "float64"}


class Emitter(Protocol):
    """What an op needs to emit itself: :class:`~xattn_compiler.testing.GraphBuilder` is one."""

    def node(self, op: str, inputs: Sequence[str], hint: str, **attrs) -> Any: ...

    def const(self, values, dtype: str = "int64", hint: str = "const") -> str: ...


# --- primitive ops -----------------------------------------------------------------------------

@dataclass(frozen=True)
class OpSpec:
    """One primitive op of the table.

    ``accepts(shape, dtype)`` is its constraint on the input (declared shape: ints, symbols or
    None); ``shape(shape, params)`` its shape function (works on symbolic shapes as far as the
    op allows: a ``-1`` over unknown dims gives None); ``numpy(x, params)`` its semantics;
    ``emit(emitter, x, params, hint)`` appends it and returns the output name.
    """

    op: str
    accepts: Callable[[Shape, str], bool]
    shape: Callable[[Shape, dict], Shape]
    numpy: Callable[[np.ndarray, dict], np.ndarray]
    emit: Callable[..., str]


def _static(dim: Dim) -> bool:
    return isinstance(dim, int)


def _reshape_shape(shape: Shape, params: dict) -> Shape:
    target = list(params["target"])
    out: list[Dim] = [shape[i] if v == 0 else v for i, v in enumerate(target)]
    if -1 in target:
        known = [d for i, d in enumerate(out) if target[i] != -1]
        out[target.index(-1)] = _quotient(shape, known)
    return tuple(out)


def _quotient(dims: Shape, divisors: Sequence[Dim]) -> Dim:
    """``prod(dims) / prod(divisors)`` where symbols cancel; None when it cannot be told."""
    if None in dims or None in divisors:
        return None
    symbols = Counter(d for d in dims if not _static(d))
    symbols.subtract(d for d in divisors if not _static(d))
    if any(n < 0 for n in symbols.values()):
        return None
    left = [s for s, n in symbols.items() for _ in range(n)]
    size = math.prod(d for d in dims if _static(d))
    part = math.prod(d for d in divisors if _static(d))
    if part == 0 or size % part:
        return None
    if not left:
        return size // part
    return left[0] if len(left) == 1 and size == part else None


def _reshape_np(x: np.ndarray, params: dict) -> np.ndarray:
    target = [x.shape[i] if v == 0 else v for i, v in enumerate(params["target"])]
    return x.reshape(target)


def _insert(shape: Shape, axis: int) -> Shape:
    return (*shape[:axis], 1, *shape[axis:])


def _emit(op: str, **fixed) -> Callable[..., str]:
    def emit(e: Emitter, x: str, params: dict, hint: str, **out) -> str:
        return e.node(op, [x], hint, **fixed, **params, **out)
    return emit


def _emit_cast(e: Emitter, x: str, params: dict, hint: str, **out) -> str:
    to = helper.np_dtype_to_tensor_dtype(np.dtype(params["to"]))
    return e.node("Cast", [x], hint, to=to, **out)


def _emit_transpose(e: Emitter, x: str, params: dict, hint: str, **out) -> str:
    perm = params.get("perm")
    attrs = {} if perm is None else {"perm": list(perm)}
    return e.node("Transpose", [x], hint, **attrs, **out)


def _emit_with_input(op: str, key: str) -> Callable[..., str]:
    # Since opset 13/14 Reshape targets and (Un)Squeeze axes are int64 inputs, not attributes.
    def emit(e: Emitter, x: str, params: dict, hint: str, **out) -> str:
        return e.node(op, [x, e.const(list(params[key]), hint=f"{hint}.{key}")], hint, **out)
    return emit


def _perm(shape: Shape, params: dict) -> tuple[int, ...]:
    perm = params.get("perm")
    return tuple(reversed(range(len(shape)))) if perm is None else tuple(perm)


OPS: dict[str, OpSpec] = {
    "Identity": OpSpec("Identity", lambda s, t: True, lambda s, p: tuple(s),
                       lambda x, p: x, _emit("Identity")),
    "Cast": OpSpec("Cast", lambda s, t: True, lambda s, p: tuple(s),
                   lambda x, p: x.astype(p["to"]), _emit_cast),
    "Transpose": OpSpec("Transpose", lambda s, t: len(s) >= 1,
                        lambda s, p: tuple(s[i] for i in _perm(s, p)),
                        lambda x, p: np.transpose(x, p.get("perm")), _emit_transpose),
    "Reshape": OpSpec("Reshape", lambda s, t: True, _reshape_shape, _reshape_np,
                      _emit_with_input("Reshape", "target")),
    "Unsqueeze": OpSpec("Unsqueeze", lambda s, t: len(s) < 8,
                        lambda s, p: _insert(tuple(s), p["axes"][0]),
                        lambda x, p: np.expand_dims(x, p["axes"][0]),
                        _emit_with_input("Unsqueeze", "axes")),
    "Squeeze": OpSpec("Squeeze", lambda s, t: 1 in s,
                      lambda s, p: tuple(d for i, d in enumerate(s) if i != p["axes"][0]),
                      lambda x, p: np.squeeze(x, p["axes"][0]),
                      _emit_with_input("Squeeze", "axes")),
    "Relu": OpSpec("Relu", lambda s, t: t in _FLOATS, lambda s, p: tuple(s),
                   lambda x, p: np.maximum(x, 0.0), _emit("Relu")),
    "Tanh": OpSpec("Tanh", lambda s, t: t in _FLOATS, lambda s, p: tuple(s),
                   lambda x, p: np.tanh(x), _emit("Tanh")),
    "Softmax": OpSpec("Softmax", lambda s, t: t in _FLOATS and len(s) >= 1, lambda s, p: tuple(s),
                      lambda x, p: _np_softmax(x, p["axis"]), _emit("Softmax")),
}


def _np_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# --- value-preserving chains ---------------------------------------------------------------------

Step = tuple[str, dict]


@dataclass(frozen=True)
class ClutterKind:
    """A chain of :data:`OPS` whose output equals its input.

    ``choices(shape, dtype)`` lists the parameter choices that are valid for a tensor (empty:
    the kind does not apply); ``steps(shape, dtype, choice)`` the ``(op, params)`` chain.
    ``ops`` names what the chain inserts, which decides where inside a block it may go.
    """

    name: str
    ops: frozenset[str]
    choices: Callable[[Shape, str], list]
    steps: Callable[[Shape, str, Any], list[Step]]

    def applies(self, shape: Shape, dtype: str) -> bool:
        return bool(self.choices(shape, dtype))


def _one(shape: Shape, dtype: str) -> list:
    return [None]


def _ranked(min_rank: int) -> Callable[[Shape, str], list]:
    return lambda shape, dtype: [None] if len(shape) >= min_rank else []


def _pair_perms(shape: Shape, dtype: str) -> list:
    rank = len(shape)
    if rank < 2:
        return []
    identity = tuple(range(rank))
    perms = [p for p in itertools.permutations(range(rank)) if p != identity]
    # Rank 5 has 119; a sample keeps the choice list (and the shrink space) small.
    return perms[:: max(1, len(perms) // 24)]


def _inverse(perm: Sequence[int]) -> tuple[int, ...]:
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return tuple(inverse)


def _flatten_points(shape: Shape, dtype: str) -> list:
    """Split points ``k``: keep dims ``[:k]`` (target 0s), merge the rest, and split back.

    Splitting back spells dims ``[k:]`` as constants, so at most one of them may be unknown
    (it becomes the -1); the merged tail must span at least two dims.
    """
    return [k for k in range(len(shape) - 1)
            if sum(not _static(d) for d in shape[k:]) <= 1]


def _flatten_steps(shape: Shape, dtype: str, k: int) -> list[Step]:
    tail = [d if _static(d) else -1 for d in shape[k:]]
    return [("Reshape", {"target": (0,) * k + (-1,)}),
            ("Reshape", {"target": (0,) * k + tuple(tail)})]


def _same_reshape_choices(shape: Shape, dtype: str) -> list:
    # None: all zeros (x.view(x.shape)); i: a -1 at position i, zeros elsewhere.
    return [None, *range(len(shape))] if len(shape) >= 1 else []


def _same_reshape_steps(shape: Shape, dtype: str, at: int | None) -> list[Step]:
    target = [0] * len(shape)
    if at is not None:
        target[at] = -1
    return [("Reshape", {"target": tuple(target)})]


def _static_ones(shape: Shape, dtype: str) -> list:
    return [i for i, d in enumerate(shape) if d == 1]


CLUTTER: dict[str, ClutterKind] = {kind.name: kind for kind in (
    ClutterKind("identity", frozenset({"Identity"}), _one, lambda s, t, c: [("Identity", {})]),
    ClutterKind("cast_same", frozenset({"Cast"}), _one, lambda s, t, c: [("Cast", {"to": t})]),
    ClutterKind("cast_roundtrip", frozenset({"Cast"}),
                lambda s, t: [None] if t in _WIDER else [],
                lambda s, t, c: [("Cast", {"to": _WIDER[t]}), ("Cast", {"to": t})]),
    ClutterKind("transpose_identity", frozenset({"Transpose"}), _ranked(1),
                lambda s, t, c: [("Transpose", {"perm": tuple(range(len(s)))})]),
    ClutterKind("transpose_pair", frozenset({"Transpose"}), _pair_perms,
                lambda s, t, perm: [("Transpose", {"perm": tuple(perm)}),
                                    ("Transpose", {"perm": _inverse(perm)})]),
    ClutterKind("transpose_default_pair", frozenset({"Transpose"}), _ranked(2),
                lambda s, t, c: [("Transpose", {}), ("Transpose", {})]),
    ClutterKind("reshape_same", frozenset({"Reshape"}), _same_reshape_choices,
                _same_reshape_steps),
    ClutterKind("reshape_flatten", frozenset({"Reshape"}), _flatten_points, _flatten_steps),
    ClutterKind("unsqueeze_squeeze", frozenset({"Unsqueeze", "Squeeze"}),
                lambda s, t: list(range(len(s) + 1)) if len(s) < 7 else [],
                lambda s, t, a: [("Unsqueeze", {"axes": (a,)}), ("Squeeze", {"axes": (a,)})]),
    ClutterKind("squeeze_unsqueeze", frozenset({"Unsqueeze", "Squeeze"}), _static_ones,
                lambda s, t, a: [("Squeeze", {"axes": (a,)}), ("Unsqueeze", {"axes": (a,)})]),
)}


def chain_shape(shape: Shape, steps: Iterable[Step]) -> Shape:
    """The shape after ``steps``, by the ops' shape functions."""
    for op, params in steps:
        shape = OPS[op].shape(tuple(shape), params)
    return tuple(shape)


def emit_chain(e: Emitter, x: str, steps: Sequence[Step], hint: str,
               final: str | None = None) -> str:
    """Emit ``steps`` on ``x``; the last output is named ``final`` when given."""
    for i, (op, params) in enumerate(steps):
        last = i == len(steps) - 1
        out = {"outputs": [final]} if last and final else {}
        x = OPS[op].emit(e, x, params, f"{hint}.{op.lower()}", **out)
    return x


# --- editing a ModelProto -------------------------------------------------------------------------

class ModelEditor:
    """An :class:`Emitter` over an existing top-level graph: it collects new nodes to splice in."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self._used = _all_names(graph)

    def unique(self, hint: str) -> str:
        name, n = hint, 0
        while name in self._used:
            n += 1
            name = f"{hint}_{n}"
        self._used.add(name)
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, *, outputs=None, **attrs) -> str:
        name = self.unique(hint)
        out = list(outputs) if outputs else [name]
        self.nodes.append(helper.make_node(op, list(inputs), out, name=name, **attrs))
        return out[0]

    def const(self, values, dtype: str = "int64", hint: str = "const") -> str:
        name = self.unique(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype), name))
        return name


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.output)
        names.update(node.input)
        names.add(node.name)
    return names


def tensor_types(model: onnx.ModelProto) -> dict[str, tuple[Shape, str]]:
    """Declared (shape, dtype name) of every top-level tensor of an inferred model."""
    graph = model.graph
    out: dict[str, tuple[Shape, str]] = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        ttype = value.type.tensor_type
        if not ttype.HasField("shape") or not ttype.elem_type:
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in ttype.shape.dim)
        out[value.name] = (dims, helper.tensor_dtype_to_np_dtype(ttype.elem_type).name)
    for tensor in graph.initializer:
        out[tensor.name] = (tuple(tensor.dims),
                            helper.tensor_dtype_to_np_dtype(tensor.data_type).name)
    return out


def insert_clutter(model: onnx.ModelProto, kind: str, tensor: str, choice: Any = None,
                   hint: str = "clutter") -> tuple[onnx.ModelProto, str, str]:
    """A copy of ``model`` with clutter ``kind`` inserted on top-level ``tensor``.

    Every reader of ``tensor`` reads the chain's output instead, so the clutter sits on the
    tensor, not on one edge: a self-attention block still reads Q, K and V from one tensor.
    A graph output keeps its name (the chain then ends in it and the producer's result is
    renamed), as exporters do with a trailing Identity. Returns ``(model, new, old)``: ``new`` is
    a name the chain introduced whose value equals tensor ``old`` of ``model``. Raises ``ValueError``
    when the tensor is unknown or the kind does not apply to it.
    """
    from xattn_compiler.ir import infer_shapes

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = tensor_types(infer_shapes(out))
    if tensor not in types:
        raise ValueError(f"no top-level tensor {tensor!r} with a known type")
    shape, dtype = types[tensor]
    spec = CLUTTER[kind]
    if choice not in spec.choices(shape, dtype):
        raise ValueError(f"clutter {kind}({choice!r}) does not apply to {tensor!r} "
                         f"({dtype}{list(shape)})")
    steps = spec.steps(shape, dtype, choice)
    editor = ModelEditor(graph)
    position, producer = _position(graph, tensor)
    is_output = any(v.name == tensor for v in graph.output)
    source = tensor
    if is_output:
        if producer is None:
            raise ValueError(f"graph output {tensor!r} has no producer to rename")
        source = editor.unique(f"{tensor}.pre_{hint}")
        producer.output[list(producer.output).index(tensor)] = source
    result = emit_chain(editor, source, steps, hint, final=tensor if is_output else None)
    if not is_output:
        for node in graph.node:
            node.input[:] = [result if name == tensor else name for name in node.input]
    new_nodes = list(graph.node)
    new_nodes[position:position] = editor.nodes
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]
    return out, (source if is_output else result), tensor


def _position(graph: onnx.GraphProto, tensor: str) -> tuple[int, onnx.NodeProto | None]:
    """Where a chain reading ``tensor`` goes: right after its producer (start for inputs)."""
    for index, node in enumerate(graph.node):
        if tensor in node.output:
            return index + 1, node
    return 0, None


# --- where clutter may go ------------------------------------------------------------------------

#: Ops each region admits, from the pattern library: the operand chains take layout ops, the
#: score chain Cast and Reshape, the probability chain Cast and Identity; a shape target is
#: read through Identity and Cast.
REGION_OPS: dict[str, frozenset[str] | None] = {
    "outside": None,  # anything
    "operand": frozenset({"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity"}),
    "score": frozenset({"Cast", "Reshape"}),
    "probs": frozenset({"Cast", "Identity"}),
    "shape": frozenset({"Cast", "Identity"}),
}


@dataclass(frozen=True)
class Site:
    """A tensor clutter may go on: its type, its region and the node budget left there.

    ``budget`` is how many more nodes the bounded chains of the pattern library can take on
    every chain through this tensor (None outside blocks).
    """

    tensor: str
    shape: Shape
    dtype: str
    region: str
    budget: int | None

    def kinds(self) -> list[str]:
        """The clutter kinds that apply here (type, region and budget allowing)."""
        allowed = REGION_OPS[self.region]
        return [name for name, kind in CLUTTER.items()
                if (allowed is None or kind.ops <= allowed) and kind.applies(self.shape, self.dtype)
                and (self.budget is None or _cost(kind, self.shape, self.dtype) <= self.budget)]


def _cost(kind: ClutterKind, shape: Shape, dtype: str) -> int:
    return max(len(kind.steps(shape, dtype, c)) for c in kind.choices(shape, dtype))


def _chain_limits() -> dict[str, int]:
    # Read from the pattern library so that the strategies follow it when the bounds change.
    from xattn_compiler.patterns import operands, scores

    return {"operand": operands.Q_OPERAND.max_steps,
            "score": scores.SOFTMAX.inputs[0].max_steps,
            "probs": scores.PROBS_BHSS.max_steps}


def clutter_sites(model: onnx.ModelProto, blocks: Iterable[Any]) -> list[Site]:
    """Every top-level tensor of ``model`` that clutter may go on, given its planted ``blocks``.

    ``blocks`` are :class:`~xattn_compiler.testing.BlockTruth` records of blocks the builders
    emitted (their nodes are named ``<block name>.<part>``). Returned in graph order: graph
    inputs, initializers, then node outputs.
    """
    from xattn_compiler.ir import infer_shapes

    graph = model.graph
    types = tensor_types(infer_shapes(model))
    producers = {out: node for node in graph.node for out in node.output}
    regions: dict[str, tuple[str, int | None]] = {}
    forbidden: set[str] = set()
    limits = _chain_limits()
    for truth in blocks:
        _block_regions(graph, producers, truth, limits, regions, forbidden)
    names = [v.name for v in graph.input] + [t.name for t in graph.initializer]
    names += [out for node in graph.node for out in node.output if out]
    sites = []
    for name in dict.fromkeys(names):
        if name in forbidden or name not in types:
            continue
        region, budget = regions.get(name, ("outside", None))
        shape, dtype = types[name]
        sites.append(Site(name, shape, dtype, region, budget))
    return sites


_PROJECTION_OPS = frozenset({"MatMul", "Gemm", "Einsum", "Add"})


def _block_regions(graph, producers, truth, limits, regions, forbidden) -> None:
    """Mark the operand/score/probability/shape tensors of one block, the rest forbidden."""
    prefix = f"{truth.name}."
    by_name = {node.name: node for node in graph.node}
    try:
        scores, probs, context = (by_name[prefix + part] for part in ("scores", "probs", "context"))
    except KeyError as exc:
        raise ValueError(f"block {truth.name!r}: no builder node {exc.args[0]!r}") from exc
    # The block's own nodes: named after it and computing its merged output (not the out
    # projection, residual or norm the builders name after the block too).
    upstream = set(_shape_tensors(truth.output, producers, through_shape=True))
    own = [n for n in graph.node if n.name.startswith(prefix) and n.output[0] in upstream]
    forbidden.update(out for node in own for out in node.output)
    for start in (scores.input[0], scores.input[1], context.input[1]):
        chain = _walk_up(start, producers, lambda node: node.op_type in _PROJECTION_OPS)
        _mark(regions, chain, "operand", limits["operand"])
    score_chain = _walk_up(probs.input[0], producers, lambda node: node.name == scores.name)
    _mark(regions, score_chain, "score", limits["score"])
    probs_chain = _walk_up(context.input[0], producers, lambda node: node.name == probs.name)
    _mark(regions, probs_chain, "probs", limits["probs"])
    for node in own:
        if node.op_type == "Reshape" and len(node.input) > 1:
            for name in _shape_tensors(node.input[1], producers):
                regions.setdefault(name, ("shape", None))
    forbidden.difference_update(regions)
    forbidden.discard(truth.output)  # the merged heads: the block ends there, outside it is free


def _walk_up(tensor: str, producers, stop) -> list[str]:
    """Tensors from ``tensor`` up the data inputs while the producer is not ``stop``."""
    chain = []
    while tensor in producers:
        node = producers[tensor]
        if stop(node):
            chain.append(tensor)  # the projection's output may carry clutter; its input not
            break
        chain.append(tensor)
        tensor = node.input[1] if node.op_type == "Where" else node.input[0]
    else:
        chain.append(tensor)  # a graph input read without a projection (projection="none")
    return chain


def _mark(regions, chain: list[str], region: str, limit: int) -> None:
    # Nodes between the two ends: every one is a step of the library's bounded chain.
    budget = max(0, limit - (len(chain) - 1))
    for name in chain:
        old = regions.get(name)
        regions[name] = (region, budget if old is None else min(budget, old[1] or 0))


def _shape_tensors(target: str, producers, through_shape: bool = False) -> list[str]:
    """The computed part of a Reshape target: Shape -> Gather/Slice -> Unsqueeze -> Concat.

    With ``through_shape``, every computed tensor ``target`` depends on.
    """
    found, seen, stack = [], set(), [target]
    while stack:
        name = stack.pop()
        node = producers.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        found.append(name)
        if through_shape or node.op_type != "Shape":  # above a Shape is data, not shape math
            stack.extend(i for i in node.input if i)
    return found
