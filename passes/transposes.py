"""Transpose clean-ups: cancel pairs, sink Transposes until they meet, one canonical K^T.

Tensors are named by layout: B batch, S sequence, H heads, D head dim; ``T_p`` is
``Transpose(perm=p)``, ``p∘q`` the single perm of ``T_q(T_p(x))`` (``compose_perms(p, q)``) and
``p⁻¹`` the inverse perm.

``cancel-transposes``::

    T_q(T_p(x))   -> T_{p∘q}(x)     per reader: every Transpose reading T_p(x) reads x instead,
                                    T_p stays only while something else reads it (no new nodes)
    T_p(x)        -> x              p the identity (also when p∘q is: an inverse pair vanishes)
    T_p(c)        -> c'             c constant, or one piece of a Split of a constant (the
                                    weight pieces of a fused in-projection): a new initializer,
                                    up to ``size-threshold`` bytes

``sink-transposes`` moves a Transpose down through ops that commute with it::

    f(T_p(x))                   -> T_p(f(x))                 f elementwise unary (Cast, Relu, Erf...)
    g(T_p(x), y)                -> T_p(g(x, y'))             g elementwise (Add, Mul, Where...),
                                                             y' = T_{p⁻¹}(y): unchanged when y only
                                                             broadcasts along axes p keeps in place,
                                                             folded when y is constant, the source of
                                                             y = T_p(z), a composed perm when y is
                                                             another Transpose, else a new Transpose
                                                             (after an Unsqueeze to full rank)
    Softmax(T_p(x), axis=a)     -> T_p(Softmax(x, axis=p[a]))           opset >= 13 (also
                                                                        LogSoftmax, Hardmax)
    Reduce(T_p(x), axes, keepdims=1) -> T_p(Reduce(x, p[axes]))
    MatMul(T_p(x), W)           -> T_p(MatMul(x, W))         W 2-D, p keeps the last axis
    LayerNorm(T_p(x), axis=-1)  -> T_p(LayerNorm(x))         p keeps the last axis

It moves a Transpose along a chain of such ops (each intermediate read by the next op only) to
the chain's end, where it either merges into the Transposes reading the end (an inverse pair
vanishes) or stays as one Transpose. A move is made only when it strictly lowers the number of
Transpose nodes, counting those it removes (the moved one, stripped operands, inverse pairs) and
those it adds (the one left at the end, transposed operands). Hence termination: every move
lowers a non-negative count. A worklist revisits only the Transposes a move touched (and those
whose chains run through a touched op), then one sweep re-plans every Transpose, so the pass
stops exactly at a fixpoint: no Transpose has a profitable move left. Idempotence follows: a
second run plans the same moves on the same graph, finds none profitable and reports
``changed=False``, returning its input untouched. (The same graph: a model whose bodies read
outer initializers infers better shapes after a round trip, so there each pass repeats itself
within one call until nothing changes; see :class:`xattn_compiler.rewrite.GraphPass`.)

``canonical-key-transpose`` gives K^T one spelling, a single Transpose from the head split::

    Reshape(T_{0,2,1}(Reshape(k_BHSD, [B*H, S, D])), [B, H, D, S]) -> T_{0,1,3,2}(k_BHSD)
    Reshape(T_{0,2,1}(k_BSE), [B, H, D, S])                       -> T_{0,2,3,1}(Reshape(k_BSE, [0, 0, H, D]))
    T_{0,1,3,2}(f(T_{0,2,1,3}(k_BSHD)))                          -> f(T_{0,2,3,1}(k_BSHD))

(HF SDPA's 3-D swap, the transpose-before-head-split spelling, and split-then-swap with scalar
scales ``f`` in between), so ``k_BSHD --T_{0,2,3,1}--> k_BHDS`` is what the fusion pass sees.
The Reshapes are proved from inferred shapes: dims compare equal when they are the same integer
or the same symbolic name (ONNX: one name, one value in a model); an unknown dim never matches.

All three keep the model's interface: a graph output keeps its name and producer's value (a
Transpose that must vanish but writes an output makes its source's producer write the output,
or becomes an Identity), and graph inputs are never edited.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from xattn_compiler.ir import constant_value, producer
from xattn_compiler.passmanager import Option
from xattn_compiler.rewrite import (
    GraphPass,
    compose_perms,
    invert_perm,
    is_identity_perm,
    transpose_perm,
)
from xattn_compiler.weights import new_constant

log = logging.getLogger(__name__)

_DEFAULT_THRESHOLD = 64 << 20

#: Elementwise ops of one input (Cast keeps its ``to``; the rest have no axis attribute).
UNARY_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "BitwiseNot", "Cast", "Ceil", "Celu",
    "Cos", "Cosh", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity",
    "IsInf", "IsNaN", "LeakyRelu", "Log", "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round",
    "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softplus", "Softsign", "Sqrt", "Tan", "Tanh",
    "ThresholdedRelu",
})
#: Elementwise ops whose inputs all broadcast together (multidirectional broadcasting).
BROADCAST_OPS = frozenset({
    "Add", "And", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Div", "Equal", "Greater",
    "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow",
    "Sub", "Sum", "Where", "Xor",
})
#: Ops whose inputs after the first are scalars or types, never laid out like the first.
_SCALAR_TAIL_OPS = frozenset({"Clip", "CastLike"})
#: Softmax-like ops: one axis, opset-13 semantics (earlier opsets flatten the trailing axes).
_AXIS_OPS = frozenset({"Softmax", "LogSoftmax", "Hardmax"})
#: Reductions and the opset from which their ``axes`` is an input rather than an attribute.
_REDUCE_AXES_INPUT = {
    "ReduceSum": 13, "ReduceMean": 18, "ReduceMax": 18, "ReduceMin": 18, "ReduceProd": 18,
    "ReduceL1": 18, "ReduceL2": 18, "ReduceLogSum": 18, "ReduceLogSumExp": 18,
    "ReduceSumSquare": 18,
}


# --- editing one graph -------------------------------------------------------------------------

class _Edit:
    """One graph being rewritten: constant-time membership tests, fresh names, and removal that
    also drops what the removed node alone kept alive (so reader counts stay exact mid-pass)."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.opset = graph.opset or 1
        self._outputs = {id(t) for t in graph.outputs}
        self._inputs = {id(t) for t in graph.inputs}
        self._local = {id(n) for n in graph.nodes}
        self._names: set[str] | None = None

    def is_output(self, tensor: gs.Tensor) -> bool:
        return id(tensor) in self._outputs

    def is_local(self, node: gs.Node) -> bool:
        return id(node) in self._local

    def local_producer(self, tensor: gs.Tensor) -> gs.Node | None:
        """The live node of this graph computing ``tensor`` (not an outer scope's)."""
        node = producer(tensor)
        if node is None or id(node) not in self._local or not node.outputs:
            return None
        return node

    def readers(self, tensor: gs.Tensor) -> list[gs.Node]:
        """Distinct nodes reading ``tensor``, in first-read order."""
        seen: dict[int, gs.Node] = {}
        for node in tensor.outputs:
            seen.setdefault(id(node), node)
        return list(seen.values())

    def sole_reader(self, tensor: gs.Tensor) -> gs.Node | None:
        """The one local node reading ``tensor``, if it has exactly one and is no output."""
        readers = self.readers(tensor)
        if len(readers) != 1 or self.is_output(tensor) or not self.is_local(readers[0]):
            return None
        return readers[0]

    def fresh(self, base: str) -> str:
        if self._names is None:
            self._names = set(self.graph.tensors()) | {n.name for n in self.graph.nodes if n.name}
        name, index = base, 0
        while name in self._names:
            index += 1
            name = f"{base}_{index}"
        self._names.add(name)
        return name

    def variable(self, base: str, like: gs.Tensor, shape: list | None) -> gs.Variable:
        return gs.Variable(self.fresh(base), dtype=like.dtype, shape=shape)

    def constant(self, base: str, values: np.ndarray) -> gs.Constant:
        return new_constant(self.fresh(base), values)  # a transposed weight stays detached

    def add_node(self, op: str, name: str, inputs: list, outputs: list,
                 attrs: dict | None = None) -> gs.Node:
        node = gs.Node(op, self.fresh(name), attrs or {}, inputs, outputs)
        self.graph.nodes.append(node)
        self._local.add(id(node))
        return node

    def remove(self, node: gs.Node) -> None:
        """Detach ``node`` and every producer left with no reader (outputs are kept)."""
        stack = [node]
        while stack:
            dead = stack.pop()
            sources = list(dead.inputs)
            dead.inputs.clear()
            dead.outputs.clear()
            for tensor in sources:
                upstream = self.local_producer(tensor)
                if upstream is not None and self._unread(upstream):
                    stack.append(upstream)

    def release(self, tensors: Iterable[gs.Tensor]) -> None:
        """Remove the producers of ``tensors`` that nothing reads any more."""
        for tensor in tensors:
            node = self.local_producer(tensor)
            if node is not None and self._unread(node):
                self.remove(node)

    def _unread(self, node: gs.Node) -> bool:
        return all(not t.outputs and not self.is_output(t) for t in node.outputs)

    def forward(self, node: gs.Node, source: gs.Tensor) -> None:
        """Remove one-output ``node`` whose output equals ``source``.

        An output keeps its name: when ``source`` is computed here and is no interface tensor,
        its producer writes the output instead and ``source``'s other readers read the output;
        otherwise ``node`` becomes an Identity (a graph input copied to an output must stay a
        node).
        """
        result = node.outputs[0]
        if not self.is_output(result):
            _redirect(result, source)
            self.remove(node)
            return
        source_node = self.local_producer(source)
        if source_node is not None and not self.is_output(source) \
                and id(source) not in self._inputs:
            node.inputs.clear()
            node.outputs.clear()
            _redirect(source, result)
            source_node.outputs[source_node.outputs.index(source)] = result
            return
        node.op, node.attrs = "Identity", {}
        node.inputs.clear()
        node.inputs.append(source)


def _redirect(old: gs.Tensor, new: gs.Tensor) -> None:
    """Every reader of ``old`` (nested bodies included) reads ``new``."""
    for reader in list(old.outputs):
        for index, tensor in enumerate(reader.inputs):
            if tensor is old:
                reader.inputs[index] = new


def _alive(node: gs.Node) -> bool:
    return bool(node.outputs) and bool(node.inputs)


def _rank(tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant):
        return len(tensor.shape)
    return len(tensor.shape) if tensor.shape is not None else None


def _permuted(shape, perm: list[int]) -> list | None:
    """The shape of ``T_perm(t)`` for ``t`` of ``shape`` (None stays None)."""
    return None if shape is None else [shape[axis] for axis in perm]


def _small_constant(tensor: gs.Tensor, limit: int) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):  # its size is known without reading the weight
        if int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize > limit:
            return None
    value = constant_value(tensor)
    if value is None or value.nbytes > limit:
        return None
    return value


def _constant_piece(tensor: gs.Tensor, limit: int) -> np.ndarray | None:
    """The value of ``tensor`` when it is a constant or an output of a Split of a constant.

    onnx-graphsurgeon does not fold multi-output nodes, so ``canonicalize`` leaves the Split of
    a fused QKV weight in place, and each piece's Transpose with it.
    """
    value = _small_constant(tensor, limit)
    split = producer(tensor)
    if value is not None or split is None or split.op != "Split":
        return value
    data = _small_constant(split.inputs[0], limit)
    if data is None or data.ndim == 0:
        return None
    axis = split.attrs.get("axis", 0) % data.ndim
    sizes = split.attrs.get("split")
    if len(split.inputs) > 1 and split.inputs[1].name:
        sizes = constant_value(split.inputs[1])
        if sizes is None:
            return None
    count = len(split.outputs)
    if sizes is None:  # equal pieces, the last one smaller (opset 18 ``num_outputs``)
        chunk = -(-data.shape[axis] // count)
        sizes = [chunk] * (count - 1) + [data.shape[axis] - chunk * (count - 1)]
    sizes = [int(size) for size in np.asarray(sizes).reshape(-1)]
    if len(sizes) != count or sum(sizes) != data.shape[axis] or min(sizes) < 0:
        return None
    pieces = np.split(data, np.cumsum(sizes)[:-1], axis=axis)
    return pieces[split.outputs.index(tensor)]


def _count_transposes(graph: gs.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "Transpose" and _alive(n))


# --- cancel-transposes ---------------------------------------------------------------------------

class CancelTransposes(GraphPass):
    """Merge Transpose pairs, drop identity Transposes, fold Transposes of constants."""

    name = "cancel-transposes"
    description = "merge Transpose pairs into one, drop identity perms, fold constant Transposes"
    options = (
        Option("size-threshold", int, _DEFAULT_THRESHOLD,
               "never fold a constant Transpose larger than this (bytes)"),
    )

    def rewrite(self, graph: gs.Graph, path: str) -> dict[str, int]:
        edit = _Edit(graph)
        counts = dict.fromkeys(
            ("constants_folded", "pairs_merged", "pairs_cancelled", "identities_removed"), 0)
        # Graph order is topological, so a Transpose's producer is already in final form when
        # the Transpose is reached: one walk leaves no pair and no identity behind.
        for node in list(graph.nodes):
            if node.op == "Transpose" and _alive(node):
                kind = cancel_transpose(node, edit, self.option("size-threshold"))
                if kind:
                    counts[kind] += 1
        if any(counts.values()):
            log.debug("cancel-transposes %s: %s", path or "<main>", counts)
        return counts


def cancel_transpose(node: gs.Node, edit: _Edit, limit: int) -> str | None:
    """Apply the first cancel rewrite that matches ``node``; the count it belongs to, or None."""
    perm = transpose_perm(node)
    if perm is None:
        return None
    source = node.inputs[0]
    value = _constant_piece(source, limit)
    if value is not None and value.ndim == len(perm):
        if edit.is_output(node.outputs[0]):
            return None  # an output written by a Transpose of a constant stays as it is
        folded = edit.constant(f"{node.outputs[0].name}_folded", np.transpose(value, perm))
        edit.forward(node, folded)
        return "constants_folded"
    if is_identity_perm(perm):
        edit.forward(node, source)
        return "identities_removed"
    inner = edit.local_producer(source)
    if inner is None or inner.op != "Transpose" or transpose_perm(inner) is None:
        return None
    merged = compose_perms(transpose_perm(inner), perm)
    node.inputs[0] = inner.inputs[0]
    edit.release([source])
    if is_identity_perm(merged):
        edit.forward(node, node.inputs[0])
        return "pairs_cancelled"
    node.attrs["perm"] = merged
    return "pairs_merged"


# --- sink-transposes: planning -----------------------------------------------------------------

@dataclass
class _Operand:
    """What becomes of input ``index`` of a crossed op: ``chain`` (the moving value), ``keep``,
    ``fold`` (the constant ``values`` instead), ``strip`` (read the source of ``T_p``),
    ``compose`` (retune a Transpose read only here) or ``insert`` (a new Transpose)."""

    index: int
    action: str
    values: Any = None


@dataclass
class _Step:
    node: gs.Node
    operands: list[_Operand]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Plan:
    """Moving Transpose ``start`` (perm ``perm``) down across ``steps``; ``absorb`` are the
    Transposes reading the end, ``keep_end`` whether a Transpose must stay at the end."""

    start: gs.Node
    perm: list[int]
    steps: list[_Step]
    absorb: list[gs.Node]
    keep_end: bool
    cost: int


def plan_sink(start: gs.Node, edit: _Edit, max_steps: int, limit: int) -> _Plan | None:
    """The move of ``start`` down its chain, with its cost in Transposes (negative: fewer)."""
    perm = transpose_perm(start)
    if perm is None or is_identity_perm(perm):
        return None
    value, steps, cost = start.outputs[0], [], -1
    operands_seen: dict[int, str] = {}
    while len(steps) < max_steps:
        node = edit.sole_reader(value)
        if node is None or node.op == "Transpose":
            break
        step = _plan_step(node, value, perm, edit, limit, operands_seen)
        if step is None:
            break
        step_cost, step = step
        cost += step_cost
        steps.append(step)
        value = node.outputs[0]
    absorb, keep_end = _plan_end(value, perm, edit)
    if not steps and not absorb:
        return None
    cost += (1 if keep_end else 0) - sum(
        1 for t in absorb if is_identity_perm(compose_perms(perm, transpose_perm(t))))
    return _Plan(start, perm, steps, absorb, keep_end, cost)


def _plan_end(value: gs.Tensor, perm: list[int], edit: _Edit) -> tuple[list[gs.Node], bool]:
    """Transposes reading the end that take the perm in, and whether one must stay for the rest."""
    absorb, keep = [], edit.is_output(value)
    for reader in edit.readers(value):
        reader_perm = transpose_perm(reader) if reader.op == "Transpose" else None
        if edit.is_local(reader) and reader_perm is not None and len(reader_perm) == len(perm):
            absorb.append(reader)
        else:
            keep = True
    return absorb, keep


def _plan_step(node: gs.Node, value: gs.Tensor, perm: list[int], edit: _Edit, limit: int,
               seen: dict[int, str]) -> tuple[int, _Step] | None:
    """How ``node`` reading the moving ``value`` is crossed, and what that costs; None: it can't."""
    if len(node.outputs) != 1 or node.domain not in ("", "ai.onnx", None):
        return None
    rank = len(perm)
    slots = [i for i, t in enumerate(node.inputs) if t is value]
    op = node.op
    if op in UNARY_OPS or op in BROADCAST_OPS:
        return _plan_operands(node, value, perm, edit, limit, seen)
    if slots != [0]:
        return None  # the moving value must be the data input of the ops below
    if op in _SCALAR_TAIL_OPS or op == "PRelu":
        fixed = op in _SCALAR_TAIL_OPS
        return _plan_operands(node, value, perm, edit, limit, seen, fixed=fixed)
    if op in _AXIS_OPS:
        return _plan_axis_op(node, perm, edit)
    if op in _REDUCE_AXES_INPUT:
        return _plan_reduce(node, perm, edit)
    if op == "LayerNormalization":
        axis = node.attrs.get("axis", -1)
        ok = axis in (-1, rank - 1) and perm[-1] == rank - 1 and all(
            _rank(t) is not None and _rank(t) <= 1 for t in node.inputs[1:])
        return (0, _Step(node, [_Operand(0, "chain")])) if ok else None
    if op == "MatMul":
        ok = perm[-1] == rank - 1 and len(node.inputs) == 2 and _rank(node.inputs[1]) == 2
        return (0, _Step(node, [_Operand(0, "chain"), _Operand(1, "keep")])) if ok else None
    return None


def _plan_operands(node: gs.Node, value: gs.Tensor, perm: list[int], edit: _Edit, limit: int,
                   seen: dict[int, str], fixed: bool = False) -> tuple[int, _Step] | None:
    """Operands of an elementwise op: each must end up laid out as ``T_{perm⁻¹}`` of itself."""
    operands, cost = [], 0
    for index, tensor in enumerate(node.inputs):
        if tensor is value:
            operands.append(_Operand(index, "chain"))
            continue
        if fixed or not tensor.name:
            operands.append(_Operand(index, "keep"))  # a bound, a type, an absent input
            continue
        planned = _plan_operand(tensor, node, perm, edit, limit)
        if planned is None:
            return None
        action, values, operand_cost = planned
        if id(tensor) in seen and action in ("compose", "insert", "strip"):
            operand_cost = 0  # the same tensor twice: it is changed (and paid for) once
        seen[id(tensor)] = action
        cost += operand_cost
        operands.append(_Operand(index, action, values))
    return cost, _Step(node, operands)


def _plan_operand(tensor: gs.Tensor, node: gs.Node, perm: list[int], edit: _Edit,
                  limit: int) -> tuple[str, Any, int] | None:
    """(action, values, cost) turning ``tensor`` into ``T_{perm⁻¹}(tensor)``; None if unknowable."""
    value = _small_constant(tensor, limit)
    shape = list(value.shape) if value is not None else tensor.shape
    full = len(perm)
    if shape is None or len(shape) > full:
        return None
    rank, inverse = len(shape), invert_perm(perm)
    padded = [1] * (full - rank) + list(shape)
    # Axes of size 1 may move freely: if every other axis stays, y broadcasts unchanged.
    if all(padded[axis] == 1 or axis == position for position, axis in enumerate(inverse)):
        return "keep", None, 0
    if value is not None:
        return "fold", np.transpose(value.reshape(padded), inverse), 0
    source = edit.local_producer(tensor)
    if source is not None and source.op == "Transpose" and rank == full:
        source_perm = transpose_perm(source)
        alone = edit.sole_reader(tensor) is node
        if source_perm == perm:
            return "strip", None, -1 if alone else 0
        if source_perm is not None and alone:
            return "compose", None, 0
    return "insert", None, 1


def _plan_axis_op(node: gs.Node, perm: list[int], edit: _Edit) -> tuple[int, _Step] | None:
    if edit.opset < 13:
        return None  # before opset 13 Softmax flattens all axes from ``axis`` on
    rank = len(perm)
    axis = node.attrs.get("axis", -1)
    moved = perm[axis % rank]
    new_axis = moved - rank if axis < 0 else moved
    return 0, _Step(node, [_Operand(0, "chain")], {"axis": new_axis})


def _plan_reduce(node: gs.Node, perm: list[int], edit: _Edit) -> tuple[int, _Step] | None:
    if node.attrs.get("keepdims", 1) != 1:
        return None
    rank = len(perm)
    if edit.opset < _REDUCE_AXES_INPUT[node.op]:
        axes = node.attrs.get("axes")
        if axes is None:
            return 0, _Step(node, [_Operand(0, "chain")])
        moved = sorted(perm[a % rank] for a in axes)
        return 0, _Step(node, [_Operand(0, "chain")], {"axes": moved})
    if len(node.inputs) < 2 or not node.inputs[1].name:
        return 0, _Step(node, [_Operand(0, "chain")])  # reduces every axis: nothing to remap
    axes = constant_value(node.inputs[1])
    if axes is None:
        return None
    moved = np.array(sorted(perm[int(a) % rank] for a in axes.reshape(-1)), np.int64)
    return 0, _Step(node, [_Operand(0, "chain"), _Operand(1, "fold", moved)])


# --- sink-transposes: applying -----------------------------------------------------------------

def apply_sink(plan: _Plan, edit: _Edit) -> list[gs.Node]:
    """Carry out ``plan``; the nodes it touched (to revisit)."""
    start, perm = plan.start, plan.perm
    inverse = invert_perm(perm)
    value, touched = start.inputs[0], []
    made: dict[int, gs.Tensor] = {}
    end = start.outputs[0]
    for position, step in enumerate(plan.steps):
        touched.extend(_apply_step(step, value, perm, edit, made))
        end = step.node.outputs[0]
        if position + 1 == len(plan.steps) and plan.keep_end:
            value = _split_end(step.node, end, inverse, edit)
        else:  # read by the next step or by absorbing Transposes only: reuse it re-laid out
            end.shape = _permuted(end.shape, inverse)
            value = end
    identities = []
    for reader in plan.absorb:
        reader.inputs[0] = value
        merged = compose_perms(perm, transpose_perm(reader))
        if is_identity_perm(merged):
            identities.append(reader)
        else:
            reader.attrs["perm"] = merged
            touched.append(reader)
    if plan.keep_end and plan.steps:
        touched.append(edit.add_node("Transpose", f"{start.name or 'transpose'}_sunk",
                                     [value], [end], {"perm": list(perm)}))
    edit.release([start.outputs[0]])  # the moved Transpose, unless it still has other readers
    for reader in identities:
        edit.forward(reader, value)
    return touched


def _split_end(node: gs.Node, end: gs.Tensor, inverse: list[int], edit: _Edit) -> gs.Tensor:
    """Give the last crossed op a new output in the moved layout; ``end`` will be a Transpose's."""
    fresh = edit.variable(f"{end.name}_untransposed", end, _permuted(end.shape, inverse))
    node.outputs[0] = fresh
    return fresh


def _apply_step(step: _Step, value: gs.Tensor, perm: list[int], edit: _Edit,
                made: dict[int, gs.Tensor]) -> list[gs.Node]:
    node, touched = step.node, [step.node]
    inverse = invert_perm(perm)
    for operand in step.operands:
        tensor = node.inputs[operand.index]
        if operand.action == "chain":
            node.inputs[operand.index] = value
        elif operand.action == "fold":
            if id(tensor) not in made:
                made[id(tensor)] = edit.constant(f"{tensor.name}_sunk", operand.values)
            node.inputs[operand.index] = made[id(tensor)]
            edit.release([tensor])
        elif operand.action == "strip":
            node.inputs[operand.index] = tensor.inputs[0].inputs[0]
            edit.release([tensor])
        elif operand.action == "compose":
            if id(tensor) not in made:
                other = producer(tensor)
                other.attrs["perm"] = compose_perms(transpose_perm(other), inverse)
                tensor.shape = _permuted(other.inputs[0].shape, other.attrs["perm"])
                made[id(tensor)] = tensor
                touched.append(other)
        elif operand.action == "insert":
            if id(tensor) not in made:
                made[id(tensor)] = _insert_transpose(tensor, node, inverse, edit, touched)
            node.inputs[operand.index] = made[id(tensor)]
    node.attrs.update(step.attrs)
    return touched


def _insert_transpose(tensor: gs.Tensor, node: gs.Node, inverse: list[int], edit: _Edit,
                      touched: list[gs.Node]) -> gs.Tensor:
    """``T_inverse(tensor)``, first unsqueezed to full rank when it broadcasts from fewer axes."""
    full, rank = len(inverse), _rank(tensor)
    base = node.name or tensor.name
    if rank < full:
        axes = list(range(full - rank))
        shape = None if tensor.shape is None else [1] * len(axes) + list(tensor.shape)
        wide = edit.variable(f"{tensor.name}_unsqueezed", tensor, shape)
        if edit.opset >= 13:
            axes_const = edit.constant(f"{tensor.name}_axes", np.array(axes, np.int64))
            edit.add_node("Unsqueeze", f"{base}_unsqueeze", [tensor, axes_const], [wide])
        else:
            edit.add_node("Unsqueeze", f"{base}_unsqueeze", [tensor], [wide], {"axes": axes})
        tensor = wide
    out = edit.variable(f"{tensor.name}_transposed", tensor, _permuted(tensor.shape, inverse))
    touched.append(edit.add_node("Transpose", f"{base}_operand_transpose", [tensor], [out],
                                 {"perm": list(inverse)}))
    return out


# --- sink-transposes: driver -------------------------------------------------------------------

class SinkTransposes(GraphPass):
    """Move Transposes down through commuting ops while that leaves fewer Transposes."""

    name = "sink-transposes"
    description = "move Transposes through elementwise ops, Softmax and reductions until pairs cancel"
    options = (
        Option("max-chain", int, 64, "most ops one Transpose is moved across in one move"),
        Option("size-threshold", int, _DEFAULT_THRESHOLD,
               "never transpose a constant operand larger than this (bytes)"),
    )

    def rewrite(self, graph: gs.Graph, path: str) -> dict[str, int]:
        edit = _Edit(graph)
        before = _count_transposes(graph)
        moves, crossed = sink_transposes(
            edit, self.option("max-chain"), self.option("size-threshold"))
        counts = {"moves": moves, "ops_crossed": crossed,
                  "transposes_removed": before - _count_transposes(graph)}
        if moves:
            log.debug("sink-transposes %s: %s", path or "<main>", counts)
        return counts


def sink_transposes(edit: _Edit, max_steps: int, limit: int) -> tuple[int, int]:
    """Make every profitable move: a worklist seeded with every Transpose, then, after any move,
    a sweep over all of them again, until a sweep moves nothing.

    The worklist revisits what a move touched, so the closing sweep normally finds nothing (one
    linear walk); it is there so the fixpoint is exact even if a revisit was missed.
    """
    moves = crossed = 0
    while True:
        work = deque(n for n in edit.graph.nodes if n.op == "Transpose" and _alive(n))
        queued = {id(n) for n in work}
        moved = False
        while work:
            node = work.popleft()
            queued.discard(id(node))
            if node.op != "Transpose" or not _alive(node):
                continue
            plan = plan_sink(node, edit, max_steps, limit)
            if plan is None or plan.cost >= 0:
                continue
            moved, moves, crossed = True, moves + 1, crossed + len(plan.steps)
            for revisit in _revisit(apply_sink(plan, edit), edit, max_steps):
                if id(revisit) not in queued:
                    queued.add(id(revisit))
                    work.append(revisit)
        if not moved:
            return moves, crossed


def _revisit(touched: list[gs.Node], edit: _Edit, max_steps: int) -> list[gs.Node]:
    """Transposes whose move may have changed: those touched, and those whose chains run into a
    touched op (found walking up through single-reader commuting ops)."""
    found: list[gs.Node] = []
    stack = [(node, 0) for node in touched if node.outputs]
    seen: set[int] = set()
    while stack:
        node, depth = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op == "Transpose":
            found.append(node)
        if depth >= max_steps:
            continue
        for tensor in node.inputs:
            upstream = edit.local_producer(tensor)
            if upstream is not None and edit.sole_reader(tensor) is node and (
                    upstream.op == "Transpose" or _commutes(upstream.op)):
                stack.append((upstream, depth + 1))
    return found


def _commutes(op: str) -> bool:
    return (op in UNARY_OPS or op in BROADCAST_OPS or op in _SCALAR_TAIL_OPS or op in _AXIS_OPS
            or op in _REDUCE_AXES_INPUT or op in ("PRelu", "MatMul", "LayerNormalization"))


# --- canonical-key-transpose -------------------------------------------------------------------

class CanonicalKeyTranspose(GraphPass):
    """Spell K^T as one Transpose from the head-split layout."""

    name = "canonical-key-transpose"
    description = "rewrite every spelling of K^T to one Transpose [0,2,3,1] from [B,S,H,D]"
    options = (
        Option("max-chain", int, 8, "most scalar ops between the head split and K^T"),
    )

    def rewrite(self, graph: gs.Graph, path: str) -> dict[str, int]:
        edit = _Edit(graph)
        counts = {"sandwiches_rewritten": 0, "head_splits_reordered": 0, "transposes_merged": 0}
        swaps = []
        for node in list(graph.nodes):
            if node.op == "Reshape" and _alive(node) and rewrite_swap_sandwich(node, edit):
                counts["sandwiches_rewritten"] += 1
                swaps.append(node)
            elif node.op == "Reshape" and _alive(node) and rewrite_transposed_split(node, edit):
                counts["head_splits_reordered"] += 1
            elif node.op == "Transpose" and _alive(node) and _swaps_last_axes(node):
                swaps.append(node)
        for swap in swaps:
            if _alive(swap) and merge_into_swap(swap, edit, self.option("max-chain")):
                counts["transposes_merged"] += 1
        if any(counts.values()):
            log.debug("canonical-key-transpose %s: %s", path or "<main>", counts)
        return counts


def _swaps_last_axes(node: gs.Node) -> bool:
    perm = transpose_perm(node)
    if perm is None or len(perm) < 3:
        return False
    rank = len(perm)
    return perm == list(range(rank - 2)) + [rank - 1, rank - 2]


def _same_dim(a: Any, b: Any) -> bool:
    """Two dims proved equal: the same integer, or the same symbolic name."""
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return isinstance(a, str) and isinstance(b, str) and a == b and a != ""


def _same_shape(out: list, expected: list, reshape: gs.Node) -> bool:
    """``out`` (a Reshape's inferred output shape) is ``expected``, dim for dim.

    Shape inference names a dim a Reshape computes from ``-1`` afresh; that dim still equals
    the expected one when every other dim does, since a Reshape keeps the element count (and
    a ``-1`` over zero elements is an error, so no empty tensor gets here).
    """
    if len(out) != len(expected):
        return False
    unproved = [i for i, (o, e) in enumerate(zip(out, expected, strict=True))
                if not _same_dim(o, e)]
    if not unproved:
        return True
    target = constant_value(reshape.inputs[1]) if len(reshape.inputs) > 1 else None
    return (len(unproved) == 1 and target is not None and target.shape == (len(out),)
            and int(target[unproved[0]]) == -1)


def rewrite_swap_sandwich(reshape: gs.Node, edit: _Edit) -> bool:
    """``Reshape(T_{0,2,1}(Reshape(x, [n, a, b])), [..., b, a]) -> T_{swap last two}(x)``.

    ``x`` of rank r >= 3 ends in ``[..., a, b]``; the first Reshape keeps its last two dims
    (so ``n`` merges the leading ones, row-major), the second splits ``n`` back into them, so
    the whole is a swap of the last two axes. The Reshape is turned into that Transpose in
    place: its output (a graph output perhaps) keeps its name.
    """
    middle = reshape.inputs[0]
    swap = edit.local_producer(middle)
    if swap is None or swap.op != "Transpose" or transpose_perm(swap) != [0, 2, 1]:
        return False
    first = edit.local_producer(swap.inputs[0])
    if first is None or first.op != "Reshape":
        return False
    x, flat, out = first.inputs[0], first.outputs[0].shape, reshape.outputs[0].shape
    shape = x.shape
    if shape is None or flat is None or out is None or len(shape) < 3 or len(flat) != 3 \
            or len(out) != len(shape):
        return False
    swapped = list(shape[:-2]) + [shape[-1], shape[-2]]
    if not (_same_dim(flat[1], shape[-2]) and _same_dim(flat[2], shape[-1])
            and _same_shape(list(out), swapped, reshape)):
        return False
    rank = len(shape)
    released = list(reshape.inputs)
    reshape.op = "Transpose"
    reshape.attrs = {"perm": list(range(rank - 2)) + [rank - 1, rank - 2]}
    reshape.inputs.clear()
    reshape.inputs.append(x)
    edit.release(released)
    return True


def rewrite_transposed_split(reshape: gs.Node, edit: _Edit) -> bool:
    """``Reshape(T_{0,2,1}(k_BSE), [B, H, D, S]) -> T_{0,2,3,1}(Reshape(k_BSE, [0, 0, H, D]))``.

    Both split E row-major into (H, D) and move S last; H and D must be static (they become the
    new Reshape's constant target, 0 copying B and S). The Transpose must be read by this
    Reshape only, so the node count stays the same: the Reshape turns into the Transpose in place
    (its output keeps its name) and the old Transpose's place is taken by the new Reshape.
    """
    transposed = reshape.inputs[0]
    swap = edit.local_producer(transposed)
    if swap is None or swap.op != "Transpose" or transpose_perm(swap) != [0, 2, 1] \
            or edit.sole_reader(transposed) is not reshape:
        return False
    k, out = swap.inputs[0], reshape.outputs[0].shape
    shape = k.shape
    if shape is None or out is None or len(shape) != 3 or len(out) != 4:
        return False
    heads, dim, width = out[1], out[2], shape[2]
    static = all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                 for d in (heads, dim, width))
    expected = [shape[0], heads, dim, shape[1]]
    if not (static and heads * dim == width and _same_shape(list(out), expected, reshape)):
        return False
    split = edit.variable(f"{k.name}_heads", k, [shape[0], shape[1], heads, dim])
    target = edit.constant(f"{k.name}_heads_shape", np.array([0, 0, heads, dim], np.int64))
    edit.add_node("Reshape", f"{reshape.name or 'reshape'}_heads", [k, target], [split])
    released = list(reshape.inputs)
    reshape.op, reshape.attrs = "Transpose", {"perm": [0, 2, 3, 1]}
    reshape.inputs.clear()
    reshape.inputs.append(split)
    edit.release(released)
    return True


def merge_into_swap(swap: gs.Node, edit: _Edit, max_steps: int) -> bool:
    """Move the nearest Transpose above ``swap`` (across scalar ops) down into it."""
    tensor, steps = swap.inputs[0], 0
    while steps <= max_steps:
        node = edit.local_producer(tensor)
        if node is None:
            return False
        if node.op == "Transpose":
            plan = plan_sink(node, edit, max_steps, _DEFAULT_THRESHOLD)
            if plan is None or plan.cost >= 0 or not any(t is swap for t in plan.absorb):
                return False
            apply_sink(plan, edit)
            return True
        if not _commutes(node.op) or not node.inputs:
            return False
        tensor, steps = node.inputs[0], steps + 1
    return False


__all__ = ["CancelTransposes", "CanonicalKeyTranspose", "SinkTransposes"]
