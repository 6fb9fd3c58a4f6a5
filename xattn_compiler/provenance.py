"""Self or cross attention, decided by where Q and K come from (data provenance).

Q and K come from the same sequence when they derive from the same activation, whatever
position encodings or per-head normalisation lie between that activation and the core:

    q = rope(norm_q(split_heads(x @ Wq)), cos, sin)        k = rope(norm_k(split_heads(x @ Wk)))

Both reach the core through different tensors (the rotary ``Add`` of each), yet both are
functions of ``x`` alone once position tables and weights are set aside. The walk behind
:func:`operand_origin` finds that ``x``:

1. Walk up from the core operand through layout ops to a projection (``patterns.operands``);
   the projection's input is the origin.
2. Where the walk stops short of a projection (at a rotary ``Add``, an RMSNorm ``Mul``), go to
   the nearest tensor every *activation* path from there passes through (its dominator), and
   walk on from it as in 1. Inputs that are not activations are ignored: constants, values
   computed from shapes alone (``Shape``/``Size`` reads), position ids and tables (graph
   inputs named like positions and everything computed only from them, such as rotary
   cos/sin).
3. Stop at a graph input, at the output of another attention block (a different sequence
   representation), or where paths do not meet again (a residual sum of two sequences).

Cross-attention stays cross: its K walks to the encoder states / context / Mllama's
``cross_attention_states``, a different tensor from Q's origin.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import onnx_graphsurgeon as gs

from xattn_compiler.patterns.operands import ORIGIN_OPERAND

from .analysis import SHAPE_ONLY_OPS, BindingTimes, constant_eval
from .ir import iter_graphs, producer
from .pattern import Context, match

#: Graph inputs that carry positions, not a sequence: ``position_ids``, ``cache_position``,
#: precomputed rotary tables (``cos``/``sin``, ``freqs_cis``, ``rotary_emb``), and Flux-style
#: coordinate ids (``img_ids``, ``txt_ids``). Token ids (``input_ids``) are a sequence.
POSITION_INPUT = re.compile(
    r"(^|_)(positions?|pos|rope|cos|sin)(_|$)|rotary|freqs|(^|_)(img|txt)_ids$", re.IGNORECASE)
#: How many tensors one dominator search may visit, and how many search-and-walk rounds an
#: operand gets: rotary and norm chains are a few dozen ops, not layers.
_MAX_VISITS = 96
_MAX_ROUNDS = 4


def is_position_input(name: str) -> bool:
    """Whether a graph input of this name holds positions (ids, rotary tables), not a sequence."""
    return bool(POSITION_INPUT.search(name))


class Provenance:
    """Origins of attention operands in one graph (bodies included).

    ``attention_outputs`` are the tensors attention blocks produce: a walk never passes them,
    since what an attention computed is a new representation, not the sequence it read.
    """

    def __init__(self, graph: gs.Graph, times: BindingTimes,
                 attention_outputs: Iterable[gs.Tensor] = ()):
        self.times = times
        self.ctx = Context(constant=times.is_constant, value=constant_eval)
        self.positions = {t.name for t in graph.inputs if is_position_input(t.name)}
        self.stops = {id(t) for t in attention_outputs}
        self.graph = graph

    def same_sequence(self, q, k) -> bool:
        """Whether Q and K (``attention.Operand``) derive from the same activation."""
        if q.source is k.source:
            return True
        return self.operand_origin(q) is self.operand_origin(k)

    def operand_origin(self, operand) -> gs.Tensor:
        """The activation an operand derives from: its projection's input (module docstring)."""
        tensor = operand.source
        if operand.projection is not None:
            return tensor
        for _ in range(_MAX_ROUNDS):
            above = self.dominator(tensor)
            if above is None:
                return tensor
            found = match(ORIGIN_OPERAND, above, self.ctx)
            tensor = found["origin_src"] if found is not None else above
            if found is not None and found.get("origin_proj.node") is not None:
                return tensor
        return tensor

    def is_activation(self, tensor: gs.Tensor) -> bool:
        """A value that carries a sequence: not constant, not shape-derived, not positions."""
        if constant_eval(tensor) is not None or self.times.is_constant(tensor):
            return False
        names = self.times.input_names(tensor)
        return not names or not set(names) <= self.positions

    def activation_inputs(self, node: gs.Node) -> list[gs.Tensor]:
        if node.op in SHAPE_ONLY_OPS:
            return []
        unique = {id(t): t for t in node.inputs if self.is_activation(t)}
        return list(unique.values())

    def dominator(self, tensor: gs.Tensor) -> gs.Tensor | None:
        """The nearest tensor above ``tensor`` that every activation path up from it passes.

        Pending tensors are expanded latest-computed first (graph order is topological), so
        the pending set is always a cut between ``tensor`` and what lies above it: when one
        tensor is left, every path goes through it. Leaves (graph inputs, attention outputs,
        values made in an enclosing graph) cannot be expanded; two left means no dominator.
        """
        node = producer(tensor)
        if node is None or id(tensor) in self.stops:
            return None
        scope = self.order.get(id(node), (None, -1))[0]
        pending = {id(t): t for t in self.activation_inputs(node)}
        if not pending:
            return None  # made from constants only (a Cast of a half-precision buffer)
        for _ in range(_MAX_VISITS):
            if len(pending) == 1:
                return next(iter(pending.values()))
            latest = max(pending.values(), key=lambda t: self._position(t, scope))
            if self._position(latest, scope) < 0:
                return None  # only leaves left, more than one
            del pending[id(latest)]
            pending.update((id(t), t) for t in self.activation_inputs(producer(latest)))
            if not pending:
                return None
        return None

    @functools.cached_property
    def order(self) -> dict[int, tuple[int, int]]:
        """Node -> (its graph, its index there); built on the first walk (most blocks have a
        projection on each side and need none). Positions compare within one graph only."""
        return {id(node): (id(body), index) for _, body in iter_graphs(self.graph)
                for index, node in enumerate(body.nodes)}

    def _position(self, tensor: gs.Tensor, scope: int | None) -> int:
        """Where ``tensor`` is computed in the graph ``scope``; -1 for a leaf."""
        node = producer(tensor)
        if node is None or id(tensor) in self.stops:
            return -1
        graph, index = self.order.get(id(node), (None, -1))
        return index if graph == scope else -1


__all__ = ["POSITION_INPUT", "Provenance", "is_position_input"]
