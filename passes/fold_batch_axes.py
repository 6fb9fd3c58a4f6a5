"""Attention cores with more than one batch axis, run on ``[B*N, H, S, D]``.

ProphetNet's n-gram self-attention batches every predict stream in one core: Q
``[B, N, H, S, D]``, K^T ``[B, N, H, D, T]``, V ``[B, N, H, T, D]``, scores ``[B, N, H, S, T]``.
ONNX Attention (and every fused kernel) takes one batch axis, so the leading axes are folded
into one around the core::

    q' = Reshape(q, [-1, H, S, D])  (k_t, v and full-rank masks alike)
    context = Reshape(MatMul(probs'(MatMul(q', k_t')), v'), [B, N, H, S, D])

A row of the folded batch is one (b, n) pair, so each row's attention is what it was. Proved
first: Q, K^T and V have the same leading dims (no broadcasting across them), the chain
between the MatMuls holds no layout op, its Softmax is over the last axis, and each mask either
broadcasts the same on four dims (rank <= 3) or has the full rank with the leading dims of
the scores or of ones. What cannot be proved stays as it is, with the reason logged. A step of
``remove-layout-clutter`` (its next round infers the new shapes); the matcher then sees a
four-dim core and ``fuse-attention`` fuses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs
from xattn_compiler.patterns import steps

from xattn_compiler.attention import AttentionMatch, find_attention
from xattn_compiler.rewrite import GraphPass

from .reshapes import Names, dim, rank, same_dim, set_input, sweep_dead

log = logging.getLogger(__name__)

Add = Callable[..., None]


class FoldBatchAxes(GraphPass):
    """Run attention cores with several leading batch axes (``[B,N,H,S,D]``) on one."""

    name = "fold-batch-axes"
    description = ("run attention cores with several batch axes ([B,N,H,S,D], ProphetNet's "
                   "n-gram streams) on [B*N,H,S,D] between two Reshapes")

    def rewrite(self, graph: gs.Graph, path: str) -> dict[str, int]:
        """Fold one graph's deep cores (the base calls this for the top level and each body)."""
        counts = {"cores_folded": 0}
        # Matching is the costly part: only when some Softmax reads a tensor of rank 5 or more.
        if not any(node.op == "Softmax" and node.inputs and (rank(node.inputs[0]) or 0) >= 5
                   for node in graph.nodes):
            return counts
        sweep_dead(graph, clean=self.starts_clean)
        names = Names(graph)

        def add(op: str, inputs: list[gs.Tensor], output: gs.Tensor, **attrs) -> None:
            graph.nodes.append(gs.Node(op, names.fresh(output.name, node=True), attrs, inputs,
                                       [output]))

        for block in find_attention(graph):
            if block.graph is not graph or not deep_core(block):
                continue
            problem = fold_block(block, graph, names, add)
            if problem:
                log.info("fold-batch-axes: %s%s left as it is: %s", path or "", block.id, problem)
            else:
                counts["cores_folded"] += 1
        return counts


def deep_core(block: AttentionMatch) -> int:
    """How many leading axes the block's core has beyond [B, H, S, D] (0 for a 4-D core)."""
    core = block.core
    if core is None:
        return 0
    ranks = {rank(core[name]) for name in ("q", "k_t", "v")}
    if len(ranks) != 1 or None in ranks:
        return 0
    return max(next(iter(ranks)) - 4, 0)


def fold_block(block: AttentionMatch, graph: gs.Graph, names: Names, add: Add) -> str | None:
    """Fold the leading axes of one deep core into one batch axis, or say why not (nothing
    changes then)."""
    if block.escapes:
        return "intermediate tensors are read outside the block: " + "; ".join(block.escapes)
    core, lead = block.core, deep_core(block)
    operands = [core[name] for name in ("q", "k_t", "v")]
    leading = [dim(operands[0], axis) for axis in range(lead + 1)]
    if not all(same_dim(dim(t, axis), leading[axis]) for t in operands[1:]
               for axis in range(lead + 1)):
        return "Q, K and V do not provably share their leading dims"
    plan = _plan_chain(core, lead)
    if isinstance(plan, str):
        return plan
    if (graph.opset or 0) < 15 and not all(_static(d) for t in operands for d in t.shape[lead + 1:]):
        return "folding run-time dims needs Shape(start=) (opset 15)"
    folded = {}
    for tensor in operands:
        if id(tensor) not in folded:
            folded[id(tensor)] = _folded(tensor, lead, names, add)
    scores_node, context_node = core["scores.node"], core["context.node"]
    set_input(scores_node, 0, folded[id(core["q"])])
    set_input(scores_node, 1, folded[id(core["k_t"])])
    set_input(context_node, 1, folded[id(core["v"])])
    for node, index in plan:
        set_input(node, index, _folded(node.inputs[index], lead, names, add))
    for typed in core.steps:
        if isinstance(typed, steps.Softmax):
            typed.node.attrs["axis"] = -1
        for out in typed.node.outputs:
            out.shape = None
    scores_node.outputs[0].shape = None
    _unfold_context(context_node, core["q"], lead, names, add)
    return None


def _plan_chain(core, lead: int) -> list[tuple[gs.Node, int]] | str:
    """The mask inputs to fold, or why the chain cannot run on four dims."""
    branch = steps.branching(core.steps, core.nodes)
    if branch is not None:
        return f"the scores chain at '{branch.name}' branches"
    full = lead + 4
    to_fold = []
    for typed in core.steps:
        node = typed.node
        if isinstance(typed, steps.Layout):
            return f"{node.op} '{node.name}' in the scores chain changes the layout"
        if isinstance(typed, steps.Softmax):
            if typed.axis not in (-1, full - 1):
                return f"Softmax '{node.name}' is not over the last axis"
            continue
        sides = {id(t) for t in typed.side_inputs}
        for index, side in enumerate(node.inputs):
            if id(side) not in sides or side is typed.data:
                continue
            side_rank = rank(side)
            if side_rank is not None and side_rank <= 3:
                continue  # broadcasts over the folded batch as it did over the leading axes
            folded_axes = range(lead + 1)
            if side_rank == full and (
                    all(same_dim(dim(side, a), dim(typed.data, a)) for a in folded_axes)
                    or all(same_dim(dim(side, a), 1) for a in folded_axes)):
                to_fold.append((node, index))
                continue
            return f"{node.op} '{node.name}' reads '{side.name}', which does not fold"
    return to_fold


def _folded(tensor: gs.Tensor, lead: int, names: Names, add: Add) -> gs.Tensor:
    """``Reshape(tensor, [-1, *shape[lead+1:]])``: its leading lead+1 axes as one."""
    tail = list(tensor.shape[lead + 1:])
    if all(_static(d) for d in tail):
        target = gs.Constant(names.fresh(f"{tensor.name}_folded_shape"),
                             np.array([-1, *tail], np.int64))
    else:
        shape = gs.Variable(names.fresh(f"{tensor.name}_shape"), dtype=np.int64)
        add("Shape", [tensor], shape, start=lead + 1)
        minus = gs.Constant(names.fresh(f"{tensor.name}_folded_prefix"),
                            np.array([-1], np.int64))
        target = gs.Variable(names.fresh(f"{tensor.name}_folded_shape"), dtype=np.int64)
        add("Concat", [minus, shape], target, axis=0)
    out = gs.Variable(names.fresh(f"{tensor.name}_folded"), dtype=tensor.dtype)
    add("Reshape", [tensor, target], out)
    return out


def _unfold_context(context_node: gs.Node, q: gs.Tensor, lead: int, names: Names,
                    add: Add) -> None:
    """The context MatMul writes a folded tensor; a Reshape gives its readers the old one
    (same name, same shape) with Q's leading dims."""
    context = context_node.outputs[0]
    folded = gs.Variable(names.fresh(f"{context.name}_folded"), dtype=context.dtype)
    context_node.outputs[0] = folded  # graphsurgeon moves the producer link
    shape = list(context.shape) if context.shape is not None else None
    if shape is not None and all(_static(d) for d in shape[1:]):
        target = gs.Constant(names.fresh(f"{context.name}_unfolded_shape"),
                             np.array([-1, *shape[1:]], np.int64))
    else:
        head = gs.Variable(names.fresh(f"{q.name}_leading_shape"), dtype=np.int64)
        add("Shape", [q], head, start=0, end=lead + 1)
        tail = gs.Variable(names.fresh(f"{context.name}_tail_shape"), dtype=np.int64)
        add("Shape", [folded], tail, start=1)
        target = gs.Variable(names.fresh(f"{context.name}_unfolded_shape"), dtype=np.int64)
        add("Concat", [head, tail], target, axis=0)
    add("Reshape", [folded, target], context)


def _static(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


__all__ = ["FoldBatchAxes", "deep_core", "fold_block"]
