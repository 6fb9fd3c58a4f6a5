"""``collapse-batched-heads``: run attention on ``[B,H,S,D]`` instead of ``[B*H,S,D]``.

Exporters of diffusers' eager AttnProcessor, SDPA decompositions and older
``torch.nn.MultiheadAttention`` fold the heads into the batch around the attention core::

    merge(x) = Reshape(x_BHSD, [B*H, S, D])          split(y) = Reshape(y_(BH)SD, [B, H, S, D])

    split(MatMul(probs(MatMul(f(merge(q)), g(merge(k)))), h(merge(v))))
        -> MatMul(probs'(MatMul(f'(q), g'(k))), h'(v))                   (a batched core)
    split(f(merge(x)))  -> f'(x)                                           (a batched detour)

``f``, ``g``, ``h`` are row-wise ops (each row of the batched axis on its own): a Transpose
keeping axis 0, whose perm gains the head axis (``[0,2,1]`` -> ``[0,1,3,2]``), a Mul/Div/Add/Sub
by one element, Cast, Identity. ``probs`` is the core's chain from the scores to the
probabilities: scale, Cast, mask Add/Where, Softmax over the last axis, Dropout, the
``Where(IsNaN(p), 0, p)`` guard. On four dims a ``[B*H,Sq,Sk]`` mask becomes one
``Reshape(mask, [B,H,Sq,Sk])`` (shared by every block reading it); a mask that broadcasts
(``[1,Sq,Sk]``, ``[Sq,Sk]``) stays as it is; the Reshapes that unbatch the scores around a 4-D
mask (Whisper) and batch them again become no-ops and go. The context's ``split`` goes; a
reader of the batched context that is not such a split gets ``Reshape(context, [B*H,Sq,D])``.

Detours are what SDPA decompositions leave when they transpose K on three dims: both Reshapes go.

Everything is proved before anything changes: each merge keeps S and D (``out[1:] == in[2:]``,
equal ints or the same symbol), each split keeps them too and splits off the same H, and Q, K
and V have the same H. B needs no proof: a batched tensor has B*H rows, so equal H and equal
row counts give equal B. No tensor whose rank changes may have a reader outside the rewrite
(Shape readers included, except those that only compute the targets of Reshapes that go) or be
a graph output, and blocks ``find_attention`` reports with ``escapes`` are left alone. What
cannot be proved stays batched, with the reason logged. If/Loop bodies are rewritten too (the
base walks them); shape inference sees little inside a body whose Reshape targets live in the
outer graph, so such blocks usually stay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from xattn_compiler.patterns import steps

from xattn_compiler.attention import AttentionMatch, find_attention, reshape_target
from xattn_compiler.ir import is_graph_output, producer
from xattn_compiler.rewrite import GraphPass, transpose_perm

from .reshapes import (
    Names,
    dim,
    move_readers,
    rank,
    same_dim,
    same_product,
    set_input,
    sweep_dead,
)

log = logging.getLogger(__name__)

#: Ops a row-wise path may hold, besides Transpose.
_SCALAR_OPS = frozenset({"Mul", "Div", "Add", "Sub"})
_PASS_OPS = frozenset({"Cast", "Identity"})
#: The longest row-wise path between a merge and the core (exporters use one or two ops).
_MAX_PATH = 6


# --- facts -----------------------------------------------------------------------------------

def merge_facts(node: gs.Node) -> tuple[gs.Tensor, object, object] | None:
    """``(x, B, H)`` when ``node`` is Reshape(x[B,H,S,D]) -> [B*H,S,D] (S and D provably kept)."""
    if node.op != "Reshape":
        return None
    x, y = node.inputs[0], node.outputs[0]
    if rank(x) != 4 or rank(y) != 3:
        return None
    if not (same_dim(dim(y, 1), dim(x, 2)) and same_dim(dim(y, 2), dim(x, 3))):
        return None
    return x, dim(x, 0), dim(x, 1)


def split_facts(node: gs.Node) -> tuple[object, object] | None:
    """``(B, H)`` when ``node`` is Reshape(y[B*H,S,D]) -> [B,H,S,D] (S and D provably kept)."""
    if node.op != "Reshape":
        return None
    y, z = node.inputs[0], node.outputs[0]
    if rank(y) != 3 or rank(z) != 4 or not same_dim(dim(z, 2), dim(y, 1)):
        return None
    # The last dim kept: equal, or a -1 that can only be it, since B*H and S are kept (BLOOM's
    # exporter names the -1 '((s**2)//s)').
    target = reshape_target(node)
    inferred = (target is not None and len(target) == 4 and target[3] == -1
                and same_product([dim(z, 0), dim(z, 1)], [dim(y, 0)]))
    if not (same_dim(dim(z, 3), dim(y, 2)) or inferred):
        return None
    return dim(z, 0), dim(z, 1)


def _one_element(tensor: gs.Tensor) -> bool:
    """One element of rank <= 3: it broadcasts against [B*H,S,D] and [B,H,S,D] alike (a
    4-D one would make a batched tensor 4-D)."""
    shape = tensor.shape
    return shape is not None and len(shape) <= 3 and all(d == 1 for d in shape)


def _row_wise_input(node: gs.Node) -> int | None:
    """Which input carries the batched data when ``node`` treats each row of axis 0 alone."""
    if len(node.outputs) != 1:
        return None
    if node.op in _PASS_OPS:
        return 0
    if node.op == "Transpose":
        perm = transpose_perm(node)
        return 0 if perm is not None and len(perm) == 3 and perm[0] == 0 else None
    if node.op in _SCALAR_OPS and len(node.inputs) == 2:
        first, second = node.inputs
        if _one_element(second):
            return 0
        if _one_element(first) and node.op in ("Mul", "Add"):
            return 1
    return None


# --- lifting an operand out of the batched form ---------------------------------------------

@dataclass
class Lift:
    """A 3-D tensor written as row-wise ops on a merge of a 4-D tensor.

    ``source`` is that 4-D tensor; when the batched tensor came from a 3-D Reshape
    ``[B,H*D,S] -> [B*H,D,S]`` (K transposed before its head split) there is none yet and
    ``split`` holds ``(x, H, D)`` to make it as ``Reshape(x, [0, H, D, -1])``.
    """

    source: gs.Tensor | None
    heads: object
    path: list[tuple[gs.Node, int]] = field(default_factory=list)  # (op, data input), in order
    split: tuple[gs.Tensor, int, int] | None = None
    #: time-major heads: (x[S,B,E], H, D, the Transpose that put B*H first, its 4-D perm)
    time_major: tuple[gs.Tensor, int, int, gs.Node, list[int]] | None = None
    #: a batched tensor with no merge to walk to (a folded constant K/V, a 3-D K/V input,
    #: heads already batched by one Transpose when H = 1): viewed as Reshape(x, [-1, H, ...])
    plain: gs.Tensor | None = None


def split_merge_facts(node: gs.Node) -> tuple[gs.Tensor, int, int] | None:
    """``(x, H, D)`` when ``node`` is Reshape(x[B,H*D,S]) -> [B*H,D,S] with static H*D and D."""
    if node.op != "Reshape":
        return None
    x, y = node.inputs[0], node.outputs[0]
    if rank(x) != 3 or rank(y) != 3 or not same_dim(dim(y, 2), dim(x, 2)):
        return None
    width, rows = dim(x, 1), dim(y, 1)
    if not (_static(width) and _static(rows)) or width % rows or width == rows:
        return None
    return x, width // rows, rows


#: The Transpose putting time-major batched heads first, and the same on [S,B,H,D]:
#: [S,B*H,D] -> [B*H,S,D] becomes [S,B,H,D] -> [B,H,S,D]; K^T's [B*H,D,S] -> [B,H,D,S].
_TIME_MAJOR_PERMS = {(1, 0, 2): [1, 2, 0, 3], (1, 2, 0): [1, 2, 3, 0]}


def time_major_facts(node: gs.Node, graph: gs.Graph, local: set[int]):
    """``(x, H, D, perm4)`` when ``node`` is Transpose(Reshape(x[S,B,E]) -> [S,B*H,D]) putting
    B*H first (``nn.MultiheadAttention``'s time-major heads). S is provably kept (the same dim,
    a 0 or the same int in the target), E and D are static, so H = E/D and B*H's rows are
    b-major: the Reshape is Reshape(x, [0, 0, H, D]) merged on axis 1."""
    perm = transpose_perm(node) if node.op == "Transpose" else None
    perm4 = _TIME_MAJOR_PERMS.get(tuple(perm)) if perm is not None else None
    view = producer(node.inputs[0]) if perm4 is not None else None
    if view is None or view.op != "Reshape" or id(view) not in local:
        return None
    x, y = view.inputs[0], view.outputs[0]
    if rank(x) != 3 or len(y.outputs) != 1 or is_graph_output(y, graph):
        return None
    target = reshape_target(view)
    if not target or len(target) != 3 or not _static(target[2]) or target[1] == 0:
        return None
    width, rows = dim(x, 2), target[2]
    kept = target[0] == 0 or same_dim(dim(y, 0), dim(x, 0)) or (
        _static(target[0]) and same_dim(target[0], dim(x, 0)))
    if not (kept and _static(width)) or width % rows:
        return None
    return x, width // rows, rows, perm4


def lift(tensor: gs.Tensor, graph: gs.Graph, local: set[int],
         spare: frozenset[int] = frozenset()) -> Lift | None:
    """Walk up from a 3-D ``tensor`` through row-wise ops to the merge that made it.

    Every tensor on the path after the merge must be read by the next op only: those tensors
    change rank when the path is rewritten. ``tensor`` itself may also be read by the nodes
    in ``spare`` (ids), whose results the rewrite makes dead.
    """
    path: list[tuple[gs.Node, int]] = []
    current, allowed = tensor, spare
    for _ in range(_MAX_PATH):
        node = producer(current)
        if node is None or id(node) not in local:
            return None
        facts = merge_facts(node)
        if facts is not None:
            return Lift(facts[0], facts[2], path[::-1])
        solo = (not is_graph_output(current, graph)
                and sum(1 for c in current.outputs if id(c) not in allowed) == 1)
        split = split_merge_facts(node)
        if split is not None and solo:
            return Lift(None, split[1], path[::-1], split)
        time_major = time_major_facts(node, graph, local) if solo else None
        if time_major is not None:
            x, heads, rows, perm4 = time_major
            return Lift(None, heads, path[::-1], time_major=(x, heads, rows, node, perm4))
        index = _row_wise_input(node)
        if index is None or not solo:
            return None
        path.append((node, index))
        current, allowed = node.inputs[index], frozenset()
    return None


def only_feeds_targets(reader: gs.Node, splits: list[gs.Node], graph: gs.Graph) -> bool:
    """Whether ``reader`` is a Shape whose value ends up only in the targets of ``splits``
    (Reshapes the rewrite removes), so that it may read a tensor whose rank changes."""
    if reader.op != "Shape":
        return False
    targets = {id(s.inputs[1]) for s in splits
               if all(any(c is t for t in splits) for c in s.inputs[1].outputs)}
    stack, seen = [reader], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > _MAX_PATH * 2:
            return False
        for out in node.outputs:
            if id(out) in targets:
                continue
            if is_graph_output(out, graph):
                return False
            stack.extend(out.outputs)
    return bool(targets)


# --- the pass ---------------------------------------------------------------------------------

class CollapseBatchedHeads(GraphPass):
    """Rewrite attention cores (and detours) on batched ``[B*H,S,D]`` to run on ``[B,H,S,D]``."""

    name = "collapse-batched-heads"
    description = ("run attention cores exported on [B*H,S,D] on [B,H,S,D] and remove the "
                   "Reshapes that fold heads into the batch")

    def rewrite(self, graph: gs.Graph, path: str) -> dict[str, int]:
        """Collapse one graph (the base calls this for the top level and each body)."""
        return _Collapser(graph, path, starts_clean=self.starts_clean).run()


def _may_be_batched(softmax: gs.Node) -> bool:
    """Softmax of 3-D (or unknown) scores, or of 4-D ones batched again right after (BLOOM
    views its [B,H,Sq,Sk] probabilities as [B*H,Sq,Sk] for the context bmm)."""
    if rank(softmax.inputs[0]) in (None, 3):
        return True
    readers = list(softmax.outputs[0].outputs)
    readers += [r for cast in readers if cast.op == "Cast" for r in cast.outputs[0].outputs]
    return any(reader.op == "Reshape" for reader in readers)


class _Collapser:
    """One graph's rewrite: batched cores first (they need the matcher), then detours."""

    def __init__(self, graph: gs.Graph, path: str, starts_clean: bool = False):
        self.graph, self.path, self.starts_clean = graph, path, starts_clean
        self.local: set[int] = set()
        self.names = Names(graph)
        self.masks: dict[tuple[int, object], gs.Tensor] = {}
        self.counts = {"blocks_collapsed": 0, "detours_collapsed": 0, "reshapes_removed": 0}

    def run(self) -> dict[str, int]:
        """Collapse every batched core that can be, then every detour; count what went."""
        self.local = sweep_dead(self.graph, clean=self.starts_clean)
        reshapes_before = self._reshape_count()
        for block in self._batched_blocks():
            problem = self.collapse(block)
            if problem:
                log.info("collapse-batched-heads: %s%s left batched: %s",
                         self.path or "", block.id, problem)
            else:
                self.counts["blocks_collapsed"] += 1
        for node in list(self.graph.nodes):
            if node.op == "Reshape" and node.outputs and self.detour(node):
                self.counts["detours_collapsed"] += 1
        if self.counts["blocks_collapsed"] or self.counts["detours_collapsed"]:
            sweep_dead(self.graph)
            self.counts["reshapes_removed"] = reshapes_before - self._reshape_count()
        return self.counts

    def _batched_blocks(self) -> list[AttentionMatch]:
        """The blocks of this graph whose core runs on 3-D tensors. Matching is the costly
        part, so it runs only when some Softmax reads a tensor that may be 3-D."""
        if not any(node.op == "Softmax" and _may_be_batched(node)
                   for node in self.graph.nodes if node.inputs):
            return []
        return [block for block in find_attention(self.graph)
                if block.graph is self.graph and block.core is not None
                and block.layout == "(BH)SD"]

    def _reshape_count(self) -> int:
        """Reshapes still in the graph (a bypassed one is disconnected until the sweep)."""
        return sum(1 for node in self.graph.nodes if node.op == "Reshape" and node.outputs)

    # --- detours ---

    def detour(self, split: gs.Node) -> bool:
        """split(f(merge(x))) -> f'(x)."""
        facts = split_facts(split)
        batched = split.inputs[0]
        if facts is None or is_graph_output(split.outputs[0], self.graph):
            return False
        spare = frozenset(id(r) for r in batched.outputs
                          if r is not split and only_feeds_targets(r, [split], self.graph))
        lifted = lift(batched, self.graph, self.local, spare)
        if lifted is None or not same_dim(lifted.heads, facts[1]):
            return False
        return move_readers(split.outputs[0], self.apply_lift(lifted), self.graph)

    # --- cores ---

    def collapse(self, block: AttentionMatch) -> str | None:
        """Rewrite one batched core, or say why not (nothing changes then)."""
        if block.escapes:
            return "intermediate tensors are read outside the block: " + "; ".join(block.escapes)
        core = block.core
        operands = {name: core[name] for name in ("q", "k_t", "v")}
        lifts = {name: lift(tensor, self.graph, self.local) for name, tensor in operands.items()}
        problem = _view_unlifted(lifts, operands, core)
        if problem:
            return problem
        if (self.graph.opset or 0) < 15 and any(
                lifted.plain is not None and not (_static(dim(lifted.plain, 1))
                                                  and _static(dim(lifted.plain, 2)))
                for lifted in lifts.values()):
            return "viewing a batched operand with run-time dims as 4-D needs opset 15"
        heads = lifts["q"].heads
        if not all(same_dim(lifted.heads, heads) for lifted in lifts.values()):
            return "Q, K and V do not provably have the same number of heads"
        chain = _plan_chain(core, heads, self.graph)
        if isinstance(chain, str):
            return chain
        context = core["context.node"].outputs[0]
        splits, others = _plan_context(context, heads, self.graph)
        time_major = [r for r in others if _time_major_merge(r, self.graph)]
        others = [r for r in others if r not in time_major]
        problem = self._shape_ops_problem(core, chain, context, others, heads)
        if problem:
            return problem
        self._apply(core, lifts, chain, splits, others, heads)
        for transpose in time_major:
            # [B,H,S,D] -> [S,B,H,D] holds the elements of [S,B*H,D] in the same order
            transpose.attrs["perm"] = [2, 0, 1, 3]
            transpose.outputs[0].shape = None
        return None

    def _shape_ops_problem(self, core, chain: Chain, context: gs.Tensor, others: list,
                           heads) -> str | None:
        """Why the Reshapes the rewrite adds (masks to 4-D, the context back to 3-D) cannot be
        written: they need a static head count, and ``Shape(start=)`` (opset 15) for dims only
        known at run time."""
        computed = bool(others) and not (_static(dim(context, 1)) and _static(dim(context, 2)))
        for step in chain.steps:
            if step.reshape_inputs and not _static(heads):
                return "a [B*H,Sq,Sk] mask needs a static head count to be reshaped to 4-D"
            for index in step.reshape_inputs:
                mask = step.node.inputs[index]
                computed |= not (_static(dim(mask, 1)) and _static(dim(mask, 2)))
        if computed and (self.graph.opset or 0) < 15:
            return "reshaping a mask or the context with run-time dims needs opset 15"
        return None

    def apply_lift(self, lifted: Lift) -> gs.Tensor:
        """Rewrite the path to read the 4-D source; returns the path's (now 4-D) result."""
        result = lifted.source
        if lifted.plain is not None:
            result = self._heads_view(lifted.plain, lifted.heads)
        elif lifted.time_major is not None:
            result = self._time_major_heads(*lifted.time_major)
        elif result is None:
            x, heads, rows = lifted.split
            target = gs.Constant(self.names.fresh(f"{x.name}_heads_shape"),
                                 np.array([0, heads, rows, -1], np.int64))
            result = gs.Variable(self.names.fresh(f"{x.name}_heads"), dtype=x.dtype)
            self._add("Reshape", [x, target], result)
        for node, index in lifted.path:
            perm = transpose_perm(node) if node.op == "Transpose" else None
            set_input(node, index, result)
            if perm is not None:
                node.attrs["perm"] = [0, 1] + [axis + 1 for axis in perm[1:]]
            result = node.outputs[0]
            result.shape = None  # re-inferred after export
        return result

    def _heads_view(self, x: gs.Tensor, heads: int) -> gs.Tensor:
        """``Reshape(x[B*H,S,D], [-1, H, S, D])``, once per tensor (a shared constant K/V)."""
        key = (id(x), heads)
        if key not in self.masks:
            if _static(dim(x, 1)) and _static(dim(x, 2)):
                target = gs.Constant(self.names.fresh(f"{x.name}_heads_shape"),
                                     np.array([-1, heads, dim(x, 1), dim(x, 2)], np.int64))
            else:
                target = self._target_from_shape(x, [-1, heads], start=1)
            out = gs.Variable(self.names.fresh(f"{x.name}_heads"), dtype=x.dtype)
            self._add("Reshape", [x, target], out)
            self.masks[key] = out
        return self.masks[key]

    def _time_major_heads(self, x: gs.Tensor, heads: int, rows: int, transpose: gs.Node,
                          perm4: list[int]) -> gs.Tensor:
        """Reshape(x[S,B,E], [0, 0, H, D]) read by the Transpose, now 4-D; its old Reshape
        is left dead for the sweep."""
        target = gs.Constant(self.names.fresh(f"{x.name}_heads_shape"),
                             np.array([0, 0, heads, rows], np.int64))
        split = gs.Variable(self.names.fresh(f"{x.name}_heads"), dtype=x.dtype)
        self._add("Reshape", [x, target], split)
        set_input(transpose, 0, split)
        transpose.attrs["perm"] = perm4
        transpose.outputs[0].shape = None
        return transpose.outputs[0]

    def _apply(self, core, lifts, chain, splits, others, heads) -> None:
        """Make the planned edits: operands, the scores chain, then the context's readers."""
        applied: dict[int, gs.Tensor] = {}
        for name, lifted in lifts.items():
            key = id(core[name])
            if key not in applied:
                applied[key] = self.apply_lift(lifted)
        scores_node, context_node = core["scores.node"], core["context.node"]
        set_input(scores_node, 0, applied[id(core["q"])])
        set_input(scores_node, 1, applied[id(core["k_t"])])
        scores_node.outputs[0].shape = None
        set_input(context_node, 1, applied[id(core["v"])])
        for step in chain.steps:
            self._apply_step(step, heads)
        context = context_node.outputs[0]
        old_shape = context.shape
        context.shape = None
        for split in splits:
            move_readers(split.outputs[0], context, self.graph)
        if others:
            self._rebatch(context, old_shape, others)

    def _apply_step(self, step: Step, heads) -> None:
        """Drop a Reshape of the chain, or move a kept node to four dims."""
        node = step.node
        if step.action == "drop":
            move_readers(node.outputs[0], node.inputs[0], self.graph)
            return
        if node.op == "Softmax":
            node.attrs["axis"] = -1
        for index in step.reshape_inputs:
            set_input(node, index, self._mask_4d(node.inputs[index], heads))
        for out in step.reshaped_outputs:
            out.shape = None

    def _mask_4d(self, mask: gs.Tensor, heads) -> gs.Tensor:
        """``Reshape(mask[B*H,Sq,Sk], [-1, H, Sq, Sk])``, once per mask."""
        key = (id(mask), heads)
        if key in self.masks:
            return self.masks[key]
        rows, cols = dim(mask, 1), dim(mask, 2)
        if _static(rows) and _static(cols):
            target = gs.Constant(self.names.fresh(f"{mask.name}_heads_shape"),
                                 np.array([-1, heads, rows, cols], np.int64))
        else:
            target = self._target_from_shape(mask, [-1, heads], start=1)
        out = gs.Variable(self.names.fresh(f"{mask.name}_heads"), dtype=mask.dtype)
        self._add("Reshape", [mask, target], out)
        self.masks[key] = out
        return out

    def _rebatch(self, context: gs.Tensor, old_shape, readers: list[gs.Node]) -> None:
        """``Reshape(context[B,H,Sq,D], [-1, Sq, D])`` for readers that need the batched form."""
        rows, cols = old_shape[1], old_shape[2]
        if _static(rows) and _static(cols):
            target = gs.Constant(self.names.fresh(f"{context.name}_batched_shape"),
                                 np.array([-1, rows, cols], np.int64))
        else:
            target = self._target_from_shape(context, [-1], start=2)
        out = gs.Variable(self.names.fresh(f"{context.name}_batched"), dtype=context.dtype,
                          shape=list(old_shape))
        self._add("Reshape", [context, target], out)
        for reader in readers:
            for index, tensor in enumerate(reader.inputs):
                if tensor is context:
                    set_input(reader, index, out)

    def _target_from_shape(self, tensor: gs.Tensor, head: list, start: int) -> gs.Tensor:
        """``Concat(head, Shape(tensor)[start:])``: a target for dims only known at run time."""
        shape = gs.Variable(self.names.fresh(f"{tensor.name}_shape"), dtype=np.int64)
        self._add("Shape", [tensor], shape, start=start)
        prefix = gs.Constant(self.names.fresh(f"{tensor.name}_shape_prefix"),
                             np.array(head, np.int64))
        target = gs.Variable(self.names.fresh(f"{tensor.name}_target"), dtype=np.int64)
        self._add("Concat", [prefix, shape], target, axis=0)
        return target

    def _add(self, op: str, inputs: list[gs.Tensor], output: gs.Tensor, **attrs) -> None:
        """Append a new node writing ``output`` (the base's export sorts the graph)."""
        node = gs.Node(op, self.names.fresh(output.name, node=True), attrs, inputs, [output])
        self.graph.nodes.append(node)
        self.local.add(id(node))


# --- planning the score chain and the context --------------------------------------------------

@dataclass
class Step:
    """One node of the scores chain: kept (its batched outputs go 4-D, its [B*H,Sq,Sk] masks
    are reshaped) or dropped (a Reshape that unbatches or batches the scores again)."""

    node: gs.Node
    action: str                                             # "keep" | "drop"
    reshape_inputs: list[int] = field(default_factory=list)  # masks to reshape to 4-D
    reshaped_outputs: list[gs.Tensor] = field(default_factory=list)


@dataclass
class Chain:
    """The planned steps from the scores MatMul to the context MatMul."""

    steps: list[Step]


def _view_unlifted(lifts: dict, operands: dict, core) -> str | None:
    """Give each operand with no merge to walk to a plain view of its rows as ``[-1, H]``.

    The batched MatMuls pair row ``i`` of Q, K and V, so once one operand's rows are proved
    ``b*H + h`` (a merge), or the scores chain itself unbatches them to ``[B,H,Sq,Sk]``, every
    operand with as many rows is read the same way. H must be static (the view's target) and
    the rows provably equal (a broadcast ``[1,S,D]`` operand is not a view). Views are only
    taken when the chain unbatches the scores (a 4-D mask): a core without one fuses batched,
    and views would only add Reshapes."""
    unbatch = [facts[1] for typed in core.steps if isinstance(typed, steps.Layout)
               for facts in [split_facts(typed.node)] if facts is not None]
    heads = next((lifted.heads for lifted in lifts.values() if lifted is not None),
                 unbatch[0] if unbatch else None)
    scores = core["scores.node"].outputs[0]
    for name, tensor in operands.items():
        if lifts[name] is not None:
            continue
        # With one head the view is [B,1,S,D] whatever the rows: a broadcast [1,S,D]
        # operand becomes [1,1,S,D] and still broadcasts.
        if not (unbatch and _static(heads) and rank(tensor) == 3
                and (heads == 1 or same_dim(dim(tensor, 0), dim(scores, 0)))):
            return f"operand {name} '{tensor.name}' is not a merge of a 4-D tensor"
        lifts[name] = Lift(None, heads, plain=tensor)
    return None


def _plan_chain(core, heads, graph: gs.Graph) -> Chain | str:
    """The match's typed steps from the scores MatMul to the context MatMul, each kept or
    dropped, or why they cannot go 4-D."""
    branch = steps.branching(core.steps, core.nodes)
    if branch is not None:
        return f"the scores chain at '{branch.name}' branches"
    batched, planned = True, []
    for typed in core.steps:
        step = _plan_step(typed, batched, heads)
        if isinstance(step, str):
            return step
        if step.action == "drop":
            batched = not batched
        elif batched:
            guard = [typed.isnan.outputs[0]] if isinstance(typed, steps.Guard) else []
            step.reshaped_outputs = [typed.output, *guard]
        planned.append(step)
    if not batched:
        return "the probabilities reach the context MatMul unbatched"
    return Chain(planned)


def _plan_step(typed: steps.Step, batched: bool, heads) -> Step | str:
    """What happens to one typed step of the chain (``batched``: its data is 3-D now)."""
    node = typed.node
    if isinstance(typed, steps.Layout):
        facts = (split_facts(node) if batched else merge_facts(node)) if node.op == "Reshape" \
            else None
        same = facts is not None and same_dim(facts[1] if batched else facts[2], heads)
        return Step(node, "drop") if same else f"{node.op} '{node.name}' in the scores chain " \
            "does not (un)batch the same heads"
    if isinstance(typed, steps.Softmax):
        ok = typed.axis == -1 or typed.axis == (rank(typed.data) or 0) - 1
        return Step(node, "keep") if ok else f"Softmax '{node.name}' is not over the last axis"
    step = Step(node, "keep")
    if not batched:
        return step
    sides = {id(t) for t in typed.side_inputs}
    for index, side in enumerate(node.inputs):
        if id(side) not in sides or side is typed.data:
            continue
        kind = _side_input(side, typed.data)
        if kind is None:
            return f"{node.op} '{node.name}' reads '{side.name}', which does not fit [B,H,Sq,Sk]"
        if kind == "reshape":
            step.reshape_inputs.append(index)
    return step


def _side_input(side: gs.Tensor, batched: gs.Tensor) -> str | None:
    """How a mask or scale read next to batched scores goes 4-D: ``keep`` (it broadcasts the
    same way), ``reshape`` (it is [B*H,Sq,Sk]), or None (not provable)."""
    shape = side.shape
    if shape is None:
        return None
    if len(shape) <= 2 or _one_element(side) or (len(shape) == 3 and same_dim(shape[0], 1)):
        return "keep"
    if len(shape) == 3 and same_dim(shape[0], dim(batched, 0)):
        return "reshape"
    return None


def _plan_context(context: gs.Tensor, heads, graph: gs.Graph):
    """Readers of the batched context: splits back to [B,H,Sq,D] (they go) and the others."""
    splits, others = [], []
    for reader in context.outputs:
        facts = split_facts(reader) if reader.inputs[0] is context else None
        if (facts is not None and same_dim(facts[1], heads)
                and not is_graph_output(reader.outputs[0], graph)):
            splits.append(reader)
        else:
            others.append(reader)
    # A Shape that only computes the splits' targets goes with them.
    others = [r for r in others if not only_feeds_targets(r, splits, graph)]
    return splits, others


def _time_major_merge(reader: gs.Node, graph: gs.Graph) -> bool:
    """Whether ``reader`` is Transpose [1,0,2] of the batched context back to time-major
    ``[S,B*H,D]`` read only by Reshapes that merge it whatever its rank: their targets copy
    no dim past the first (a 0 there would copy B instead of B*H)."""
    if reader.op != "Transpose" or transpose_perm(reader) != [1, 0, 2]:
        return False
    out = reader.outputs[0]
    if is_graph_output(out, graph) or not out.outputs:
        return False
    for merge in out.outputs:
        target = reshape_target(merge) if merge.op == "Reshape" else None
        if target is None or merge.inputs[0] is not out or 0 in target[1:] \
                or merge.attrs.get("allowzero", 0):
            return False
    return True


def _static(value) -> bool:
    """Whether a dim is a known positive int."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0


__all__ = ["CollapseBatchedHeads", "Lift", "lift", "merge_facts", "only_feeds_targets", "split_facts",
           "split_merge_facts"]
