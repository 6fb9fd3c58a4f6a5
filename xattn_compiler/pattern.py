"""A small declarative pattern language over onnx-graphsurgeon graphs.

A pattern describes how a tensor is computed, written as the op calls that would build it::

    scores = Op("MatMul", Any("q"), Any("k_t"), name="qk")
    scaled = Or(Op("Div", scores, Scalar("scale")), scores)

Matching starts at a tensor and walks *up* to producers, so a match is bounded by the pattern's
size: anchored matching costs O(pattern) per anchor and O(graph) in all. Match is pure; it
returns bindings (capture name -> tensor or node) and the nodes it used.

The building blocks:

- ``Any(name)``: any tensor. ``Const(name, check)``: a constant (initializer, Constant node, or
  a subgraph of constants and shapes only). ``Scalar(name)``: a constant with one element (its
  value may be unknown when it is computed from shapes).
- ``Op(op, *inputs, name, attrs, commutative, output, domain, check)``: a node of type ``op``
  (a string or a tuple of alternatives) whose inputs match ``inputs``; ``...`` as the last input
  accepts any further inputs. ``name`` captures the node's output tensor under ``name`` and the
  node under ``name + ".node"``. ``commutative`` also tries the first two inputs swapped.
- ``Or(*alternatives)``: the first alternatives first; backtracking tries the rest.
- ``Chain(steps, until, otherwise, max_steps)``: ``until``, or one of ``steps`` wrapped around
  the rest of the chain (``REST`` marks where), repeated: exporters put Casts, scales and masks
  in any order and number, and a chain states that without listing each order.
- Capture names ending in ``*`` collect every binding in a list (several masks); a plain name
  bound twice must bind the same tensor both times.
- ``Op(..., meaning=T)`` says what a step is (a scale, a mask, a cast: the types in
  ``patterns/steps.py``): the match lists such steps in data-flow order (``Match.steps``), each
  made by ``T.read(node, data, value)`` once the match succeeds, ``data`` being the input the
  chain flows through (the one ``REST`` stands for, else the first). Consumers build from that
  list instead of walking the graph again.

A failed match records why at the point it got furthest (the near-miss), so ``inspect
--explain`` can say "Softmax 'attn/Softmax_3': expected MatMul(probs, V) below, found Mul".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any as AnyType

import numpy as np
import onnx_graphsurgeon as gs

from .ir import producer

Bindings = dict[str, AnyType]


# --- match state ------------------------------------------------------------------------------

@dataclass(frozen=True)
class State:
    """Bindings and matched nodes so far; copied on write so backtracking is free."""

    bindings: tuple[tuple[str, AnyType], ...] = ()
    nodes: tuple[gs.Node, ...] = ()
    #: (meaning, node, data tensor) of each step with a meaning, upstream first.
    steps: tuple[tuple[AnyType, gs.Node, gs.Tensor], ...] = ()

    def get(self, name: str) -> AnyType:
        for key, value in reversed(self.bindings):
            if key == name:
                return value
        return None

    def bind(self, name: str | None, value: AnyType) -> State | None:
        if not name:
            return self
        if not name.endswith("*"):
            existing = self.get(name)
            if existing is not None:
                return self if existing is value else None
        return State(self.bindings + ((name, value),), self.nodes, self.steps)

    def add_node(self, node: gs.Node) -> State:
        return State(self.bindings, self.nodes + (node,), self.steps)

    def add_step(self, meaning: AnyType, node: gs.Node, data: gs.Tensor) -> State:
        return State(self.bindings, self.nodes, self.steps + ((meaning, node, data),))

    def to_dict(self) -> Bindings:
        out: Bindings = {}
        for key, value in self.bindings:
            if key.endswith("*"):
                out.setdefault(key[:-1], []).append(value)
            else:
                out[key] = value
        return out


@dataclass
class Failure:
    """Why a match stopped where it got furthest."""

    reason: str
    node: gs.Node | None = None
    tensor: str | None = None
    progress: int = -1


@dataclass
class Context:
    """What patterns may ask of the graph beyond one tensor: constant-ness and values."""

    constant: Callable[[gs.Tensor], bool]
    value: Callable[[gs.Tensor], np.ndarray | None]
    best_failure: Failure = field(default_factory=lambda: Failure("no match attempted"))

    def fail(self, state: State, reason: str, tensor: gs.Tensor | None = None) -> None:
        progress = len(state.nodes)
        if progress > self.best_failure.progress:  # the first way to fail at the furthest point
            node = producer(tensor) if tensor is not None else None
            self.best_failure = Failure(reason, node, tensor.name if tensor is not None else None,
                                        progress)


@dataclass
class Match:
    """A successful match: captures by name, the nodes the pattern covered, and its steps with
    a meaning (typed, in data-flow order)."""

    bindings: Bindings
    nodes: list[gs.Node]
    steps: list[AnyType] = field(default_factory=list)

    def __getitem__(self, name: str) -> AnyType:
        return self.bindings[name]

    def get(self, name: str, default: AnyType = None) -> AnyType:
        return self.bindings.get(name, default)


# --- patterns --------------------------------------------------------------------------------

class Pattern:
    """Matches a tensor; yields every way it does (lazily, so the first is cheap)."""

    def match(self, tensor: gs.Tensor, state: State, ctx: Context) -> Iterator[State]:
        raise NotImplementedError

    def replace(self, old: Pattern, new: Pattern) -> Pattern:
        return new if self is old else self

    def __or__(self, other: Pattern) -> Pattern:
        return Or(self, other)


class Any(Pattern):
    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, tensor, state, ctx):
        bound = state.bind(self.name, tensor)
        if bound is None:
            ctx.fail(state, f"'{self.name}' is already bound to another tensor", tensor)
            return
        yield bound

    def __repr__(self) -> str:
        return f"Any({self.name!r})" if self.name else "Any()"


class Const(Pattern):
    """A tensor computed from constants only; ``check`` sees its value when it is known."""

    def __init__(self, name: str | None = None, check: Callable[[np.ndarray], bool] | None = None,
                 scalar: bool = False):
        self.name, self.check, self.scalar = name, check, scalar

    def match(self, tensor, state, ctx):
        if not ctx.constant(tensor):
            ctx.fail(state, f"expected a constant, found computed tensor '{tensor.name}'", tensor)
            return
        if self.scalar or self.check:
            value = ctx.value(tensor)
            if self.scalar and not _one_element(value, tensor):
                ctx.fail(state, f"expected a scalar constant, '{tensor.name}' is not one", tensor)
                return
            if self.check and (value is None or not self.check(value)):
                ctx.fail(state, f"constant '{tensor.name}' fails its check", tensor)
                return
        bound = state.bind(self.name, tensor)
        if bound is not None:
            yield bound

    def __repr__(self) -> str:
        return f"{'Scalar' if self.scalar else 'Const'}({self.name!r})"


def _one_element(value: np.ndarray | None, tensor: gs.Tensor) -> bool:
    if value is not None:
        return value.size == 1
    # A scalar computed from shapes (``1 / sqrt(Shape(q)[-1])``, TorchScript's SDPA scale):
    # its value is unknown here but its shape says it is one element.
    shape = tensor.shape
    return shape is not None and all(isinstance(d, int) and d == 1 for d in shape)


def Scalar(name: str | None = None, check: Callable[[np.ndarray], bool] | None = None) -> Const:
    """A one-element constant (a scale, a fill value)."""
    return Const(name, check, scalar=True)


class Op(Pattern):
    def __init__(self, op: str | Sequence[str], *inputs: Pattern | type(Ellipsis),
                 name: str | None = None, attrs: dict[str, AnyType] | None = None,
                 commutative: bool = False, output: int | None = 0, domain: str | None = None,
                 check: Callable[[gs.Node], bool] | None = None, meaning: AnyType = None):
        self.ops = (op,) if isinstance(op, str) else tuple(op)
        self.open = bool(inputs) and inputs[-1] is Ellipsis
        self.inputs = tuple(p for p in inputs if p is not Ellipsis)
        self.name, self.attrs, self.commutative = name, attrs or {}, commutative
        self.output, self.domain, self.check = output, domain, check
        self.meaning = meaning
        # Which input the chain flows through: REST's place (fixed before REST is replaced).
        self.data_index = next((i for i, p in enumerate(self.inputs) if p is REST), 0)

    def replace(self, old, new):
        if self is old:
            return new
        copy = Op.__new__(Op)
        copy.__dict__.update(self.__dict__)
        copy.inputs = tuple(p.replace(old, new) for p in self.inputs)
        return copy

    def match(self, tensor, state, ctx):
        node = producer(tensor)
        if node is None or node.op not in self.ops:
            found = "a graph input or constant" if node is None else f"{node.op} '{node.name}'"
            ctx.fail(state, f"expected {'|'.join(self.ops)} producing '{tensor.name}', "
                     f"found {found}", tensor)
            return
        if any(n is node for n in state.nodes):
            yield from self._bind_only(tensor, node, state, ctx)
            return
        problem = self._node_problem(node, tensor)
        if problem:
            ctx.fail(state, f"{node.op} '{node.name}': {problem}", tensor)
            return
        state = state.add_node(node)
        for order in self._input_orders(node):
            yield from self._match_inputs(order, 0, state, ctx, tensor, node)

    def _bind_only(self, tensor, node, state, ctx):
        # A node reached twice (a shared sub-expression) is matched once; bind and move on.
        bound = self._bind(state, tensor, node)
        if bound is not None:
            yield bound

    def _bind(self, state: State, tensor: gs.Tensor, node: gs.Node) -> State | None:
        """Bind the output under ``name`` and the node under ``name.node`` (``name.node*``)."""
        if not self.name:
            return state
        bound = state.bind(self.name, tensor)
        if bound is None:
            return None
        node_key = f"{self.name[:-1]}.node*" if self.name.endswith("*") else f"{self.name}.node"
        return bound.bind(node_key, node)

    def _node_problem(self, node: gs.Node, tensor: gs.Tensor) -> str | None:
        if self.domain is not None and (node.domain or "") != self.domain:
            return f"domain '{node.domain}' is not '{self.domain}'"
        if self.output is not None and (len(node.outputs) <= self.output
                                        or node.outputs[self.output] is not tensor):
            return f"expected output {self.output}"
        if len(node.inputs) < len(self.inputs) or (not self.open and len(node.inputs) > len(self.inputs)):
            return f"has {len(node.inputs)} inputs, the pattern has {len(self.inputs)}"
        for key, expected in self.attrs.items():
            actual = node.attrs.get(key)
            ok = expected(actual) if callable(expected) else actual == expected
            if not ok:
                return f"attribute {key}={actual!r} does not fit"
        if self.check is not None and not self.check(node):
            return f"fails {getattr(self.check, '__name__', 'its check')}"
        return None

    def _input_orders(self, node: gs.Node) -> list[list[gs.Tensor]]:
        tensors = list(node.inputs[: len(self.inputs)])
        orders = [tensors]
        if self.commutative and len(tensors) >= 2 and tensors[0] is not tensors[1]:
            orders.append([tensors[1], tensors[0], *tensors[2:]])
        return orders

    def _match_inputs(self, tensors, index, state, ctx, out_tensor, node):
        if index == len(self.inputs):
            bound = self._bind(state, out_tensor, node)
            if bound is None:
                ctx.fail(state, f"'{self.name}' is already bound to another tensor", out_tensor)
                return
            if self.meaning is not None and tensors:
                bound = bound.add_step(self.meaning, node, tensors[self.data_index])
            yield bound
            return
        for next_state in self.inputs[index].match(tensors[index], state, ctx):
            yield from self._match_inputs(tensors, index + 1, next_state, ctx, out_tensor, node)

    def __repr__(self) -> str:
        inner = ", ".join(map(repr, self.inputs)) + (", ..." if self.open else "")
        return f"Op({'|'.join(self.ops)}({inner}){', ' + repr(self.name) if self.name else ''})"


class Or(Pattern):
    def __init__(self, *alternatives: Pattern):
        self.alternatives = alternatives

    def replace(self, old, new):
        if self is old:
            return new
        return Or(*(p.replace(old, new) for p in self.alternatives))

    def match(self, tensor, state, ctx):
        for alternative in self.alternatives:
            yield from alternative.match(tensor, state, ctx)

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.alternatives))


class _Rest(Pattern):
    """Placeholder for the rest of a chain inside a step pattern."""

    def match(self, tensor, state, ctx):
        raise TypeError("REST is only meaningful inside Chain steps")

    def __repr__(self) -> str:
        return "REST"


REST = _Rest()


class Chain(Pattern):
    """``until``, or a step around the rest of the chain, at most ``max_steps`` deep.

    Order of preference at each depth: ``until`` first (the chain ends as early as it can),
    then each step, then ``otherwise`` (where the chain may end on anything, e.g. a tensor
    with no projection). Steps are materialised once per depth.
    """

    def __init__(self, steps: Sequence[Pattern], until: Pattern, otherwise: Pattern | None = None,
                 max_steps: int = 8):
        self.steps, self.until, self.otherwise = tuple(steps), until, otherwise
        self.max_steps = max_steps
        self._levels: list[Pattern] = []

    def _level(self, depth: int) -> Pattern:
        while len(self._levels) <= depth:
            self._levels.append(_ChainLevel(self, len(self._levels)))
        return self._levels[depth]

    def replace(self, old, new):
        if self is old:
            return new
        return Chain([s.replace(old, new) for s in self.steps], self.until.replace(old, new),
                     self.otherwise.replace(old, new) if self.otherwise else None, self.max_steps)

    def match(self, tensor, state, ctx):
        yield from self._level(0).match(tensor, state, ctx)

    def __repr__(self) -> str:
        return f"Chain({list(self.steps)!r} until {self.until!r})"


class _ChainLevel(Pattern):
    def __init__(self, chain: Chain, depth: int):
        self.chain, self.depth = chain, depth
        self._steps: list[Pattern] | None = None

    def match(self, tensor, state, ctx):
        chain = self.chain
        yield from chain.until.match(tensor, state, ctx)
        if self.depth < chain.max_steps:
            if self._steps is None:
                rest = chain._level(self.depth + 1)
                self._steps = [step.replace(REST, rest) for step in chain.steps]
            for step in self._steps:
                yield from step.match(tensor, state, ctx)
        if chain.otherwise is not None:
            yield from chain.otherwise.match(tensor, state, ctx)


# --- driving ---------------------------------------------------------------------------------

def match(pattern: Pattern, tensor: gs.Tensor, ctx: Context) -> Match | None:
    """The first way ``pattern`` matches ``tensor``, or None (``ctx.best_failure`` says why)."""
    ctx.best_failure = Failure("no match attempted")
    for state in pattern.match(tensor, State(), ctx):
        steps = [meaning.read(node, data, ctx.value) for meaning, node, data in state.steps]
        return Match(state.to_dict(), list(state.nodes), steps)
    return None
