"""Find every attention block in a model, classify it and describe it.

The algorithm, per graph (If/Loop/Scan bodies included):

1. Anchors: every Softmax, and every node that already is fused attention.
2. From a Softmax, walk down (through Cast/Where/Dropout/Identity) to a MatMul that reads the
   probabilities, and match the core pattern upward from that MatMul's output
   (``patterns.scores.ATTENTION_CORE``). A failure is kept as a near-miss with its reason.
3. Reject cores whose K or V is a plain 2-D operand (a Softmax between two weight MatMuls is a
   classifier head, not attention).
4. From Q, K^T and V walk up through layout ops to the projections and sources
   (``patterns.operands``); walk down from the context through the head merge.
5. Classify: self when Q and K come from the same source tensor (fused QKV included), else
   cross. A binding-time analysis says what K/V depend on: only constants (``constant``), only
   graph inputs that feed nothing but cross-attention K/V (``graph_input``), or values computed
   through other attention (``internal``).
6. Mark blocks whose intermediate tensors are read outside the block: they must not be
   rewritten.

Each anchor costs a bounded walk, so the whole search is linear in the graph's size.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.patterns import (
    ATTENTION_CORE,
    K_OPERAND,
    ORIGIN_OPERAND,
    PROBS_MAX_STEPS,
    PROBS_OPS,
    Q_OPERAND,
    V_OPERAND,
    fused_operands,
)
from xattn_compiler.patterns.steps import KeepWhere, MaskAdd, Part, Scale, Step, core_steps

from .analysis import SHAPE_ONLY_OPS, BindingTimes, constant_eval, inferred_rank, piece_length
from .ir import import_with_shapes, is_graph_output, iter_graphs
from .pattern import Context, Failure, Match, match
from .provenance import Provenance
from .rewrite import transpose_perm

log = logging.getLogger(__name__)

_MERGE_OPS = ("Transpose", "Reshape")


@dataclass
class Operand:
    """One of Q, K, V: the core's operand tensor, its projection (if any) and its source."""

    tensor: gs.Tensor
    source: gs.Tensor
    projection: gs.Node | None
    weight: gs.Tensor | None
    bias: gs.Tensor | None
    steps: list[Step]               # the typed layout steps, projection side first
    nodes: list[gs.Node]
    past: list[gs.Tensor] = field(default_factory=list)

    @property
    def scales(self) -> list[Scale]:
        """The Mul/Div by constants on the path, projection side first."""
        return [step for step in self.steps if isinstance(step, Scale)]

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor.name, "source": self.source.name,
                "projection": _label(self.projection) if self.projection is not None else None,
                "weight": self.weight.name if self.weight is not None else None,
                "bias": self.bias.name if self.bias is not None else None,
                "past": [t.name for t in self.past]}


@dataclass
class AttentionMatch:
    """One attention block, as ``inspect`` reports it and passes rewrite it."""

    id: str
    kind: str                       # "self" | "cross"
    num_heads: int | None
    head_dim: int | None
    scale: float | None
    q: Operand
    k: Operand
    v: Operand
    mask: dict[str, Any] | None
    fused: bool
    op: str
    subgraph: str
    graph: gs.Graph
    nodes: list[gs.Node]
    output: gs.Tensor
    core: Match | None = None
    num_kv_heads: int | None = None
    kv_source_kind: str = "internal"
    static_inputs: list[str] = field(default_factory=list)
    escapes: list[str] = field(default_factory=list)
    shape_uses: list[str] = field(default_factory=list)
    #: K/V tensors of the block that are also results of the model (a KV cache's present K/V,
    #: maybe in another layout): a fused node reads them or what they feed, so they stay.
    kv_outputs: list[str] = field(default_factory=list)
    layout: str = "BHSD"

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of DESIGN.md's ``inspect --json`` (plus detail fields)."""
        return {
            "id": self.id, "kind": self.kind, "num_heads": self.num_heads,
            "head_dim": self.head_dim, "q_source": self.q.source.name,
            "k_source": self.k.source.name, "v_source": self.v.source.name,
            "kv_source_kind": self.kv_source_kind, "static_inputs": list(self.static_inputs),
            "fused": self.fused, "subgraph": self.subgraph,
            "nodes": [_label(n) for n in self.nodes],
            "op": self.op, "num_kv_heads": self.num_kv_heads, "scale": self.scale,
            "mask": self.mask, "layout": self.layout, "output": self.output.name,
            "q": self.q.to_dict(), "k": self.k.to_dict(), "v": self.v.to_dict(),
            "escapes": list(self.escapes), "kv_outputs": list(self.kv_outputs),
        }


@dataclass
class NearMiss:
    """A Softmax that looked like attention but did not match, and why."""

    anchor: str
    subgraph: str
    reason: str
    node: str | None
    tensor: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor, "subgraph": self.subgraph, "reason": self.reason,
                "node": self.node, "tensor": self.tensor}


@dataclass
class AttentionReport:
    blocks: list[AttentionMatch]
    near_misses: list[NearMiss]
    graph: gs.Graph


def find_attention(model: onnx.ModelProto | gs.Graph) -> list[AttentionMatch]:
    """Every attention block in ``model``, control-flow bodies included."""
    return analyze_attention(model).blocks


def analyze_attention(model: onnx.ModelProto | gs.Graph) -> AttentionReport:
    """Blocks plus near-misses (for ``inspect --explain``) and the graph they refer to."""
    graph = model if isinstance(model, gs.Graph) else import_with_shapes(model)
    times = BindingTimes(graph)
    ctx = Context(constant=times.is_constant, value=constant_eval)
    blocks: list[AttentionMatch] = []
    misses: list[NearMiss] = []
    for path, body in iter_graphs(graph):
        for node in list(body.nodes):
            if node.op == "Softmax":
                found = _match_softmax(node, body, path, ctx)
                if isinstance(found, NearMiss):
                    misses.append(found)
                else:
                    blocks.extend(found)
            else:
                fused = fused_operands(node)
                if fused is not None:
                    blocks.append(_fused_block(node, fused, body, path, ctx))
    for index, block in enumerate(blocks):
        block.id = f"attn_{index}"
    provenance = Provenance(graph, times, _block_outputs(blocks))
    _classify(blocks, times, provenance)
    _heads_past_rotations(blocks, provenance, ctx)
    return AttentionReport(blocks, misses, graph)


# --- core matching ------------------------------------------------------------------------------

def _context_matmuls(softmax: gs.Node) -> Iterator[gs.Node]:
    """MatMuls reading ``softmax``'s probabilities as their first input, a few ops down."""
    frontier, seen = [softmax.outputs[0]], set()
    for _ in range(PROBS_MAX_STEPS + 1):
        following = []
        for tensor in frontier:
            for consumer in tensor.outputs:
                if id(consumer) in seen:
                    continue
                seen.add(id(consumer))
                if consumer.op == "MatMul" and consumer.inputs[0] is tensor:
                    yield consumer
                elif consumer.op in PROBS_OPS:
                    following.extend(consumer.outputs)
        frontier = following


def _match_softmax(softmax: gs.Node, body: gs.Graph, path: str, ctx: Context):
    failure: Failure | None = None
    blocks = []
    for context_node in _context_matmuls(softmax):
        core = match(ATTENTION_CORE, context_node.outputs[0], ctx)
        if core is None or core.get("softmax.node") is not softmax:
            failure = ctx.best_failure if core is None else Failure("matched another Softmax")
            continue
        problem = _not_attention(core)
        if problem:
            failure = Failure(problem, context_node)
            continue
        blocks.append(_unfused_block(core, body, path, ctx))
    if blocks:
        return blocks
    if failure is None:
        failure = Failure("no MatMul reads the probabilities (a classifier head?)", softmax)
    return NearMiss(_label(softmax), path, failure.reason,
                    _label(failure.node) if failure.node is not None else None, failure.tensor)


def _not_attention(core: Match) -> str | None:
    for name in ("q", "k_t", "v"):
        shape = core[name].shape
        if shape is not None and len(shape) < 3:
            return (f"operand {name} '{core[name].name}' is {len(shape)}-D; attention multiplies "
                    "batched (3-D or 4-D) Q, K and V")
    return None


def _walk_operand(pattern, tensor: gs.Tensor, prefix: str, ctx: Context) -> Operand:
    found = match(pattern, tensor, ctx)
    assert found is not None  # the operand pattern ends in Any(): it always matches
    proj = found.get(f"{prefix}_proj.node")
    matmul = found.get(f"{prefix}_matmul.node")
    flatten = found.get(f"{prefix}_flatten.node")
    excluded = {id(n) for n in (proj, matmul, flatten) if n is not None}
    nodes = [n for n in found.nodes if id(n) not in excluded]
    return Operand(
        tensor=tensor, source=found[f"{prefix}_src"], projection=proj,
        weight=found.get(f"{prefix}_w"), bias=found.get(f"{prefix}_b"),
        steps=found.steps,
        nodes=nodes, past=found.get(f"{prefix}_past", []),
    )


def _unfused_block(core: Match, body: gs.Graph, path: str, ctx: Context) -> AttentionMatch:
    q = _walk_operand(Q_OPERAND, core["q"], "q", ctx)
    k = _walk_operand(K_OPERAND, core["k_t"], "k", ctx)
    v = _walk_operand(V_OPERAND, core["v"], "v", ctx)
    merge_nodes, output = _merge_heads(core["context"], body)
    # Heads are read off the whole walk: the head split may lie beyond a shared Split.
    heads, head_dim = _num_heads(core["q"], q), _head_dim(core["q"], q)
    kv_heads = _num_heads(core["k_t"], k, kv=True)
    inside = {id(n) for n in core.nodes + q.nodes + k.nodes + v.nodes + merge_nodes}
    own = _own_cut_readers((q, k, v), inside, body)
    inside |= {id(n) for n in own}
    q, k, v = (_stop_at_shared_split(operand, inside) for operand in (q, k, v))
    walked = {id(n) for n in q.nodes + k.nodes + v.nodes}
    if not any(t.inputs and id(t.inputs[0]) in walked for n in own for t in n.inputs):
        own = []  # the cut stays outside the walks: its readers are not the block's
    nodes = _unique(core.nodes + q.nodes + k.nodes + v.nodes + merge_nodes + own)
    q_shape = core["q"].shape
    block = AttentionMatch(
        id="", kind="self", num_heads=heads, head_dim=head_dim,
        scale=_scale(core, q, k), q=q, k=k, v=v, mask=_mask(core), fused=False,
        op="MatMul-Softmax-MatMul", subgraph=path, graph=body, nodes=nodes, output=output,
        core=core, num_kv_heads=kv_heads,
        layout=_core_layout(q_shape),
    )
    block.escapes, block.shape_uses, block.kv_outputs = _escapes(block)
    return block


def _stop_at_shared_split(operand: Operand, inside: set[int]) -> Operand:
    """``operand`` walked only up to a Split/Slice/Gather whose other parts are read outside
    the block: that projection is shared with computation the block does not hold (GPT-NeoX's
    Q and K leave the fused QKV Split for rotary ops; ProphetNet's main stream chunks Q/K/V
    that its predict streams read too), so the part taken is the operand's source. A part
    cut from a tensor the walk itself computed (a fused QKV reshaped and transposed, then
    Gathered) is shared too when a sibling part is read outside (RoPE on Q and K only)."""
    walked = {id(n) for n in operand.nodes}
    for index in range(len(operand.steps) - 1, -1, -1):
        step = operand.steps[index]
        if isinstance(step, Part) and (_read_outside(step.node, inside)
                                       or _input_read_outside(step.node, walked, inside)):
            kept = operand.steps[index + 1:]
            nodes = [s.node for s in kept]
            ids = {id(n) for n in nodes}
            return Operand(tensor=operand.tensor,
                           source=kept[0].data if kept else operand.tensor,
                           projection=None, weight=None, bias=None, steps=kept, nodes=nodes,
                           past=[t for t in operand.past
                                 if any(id(c) in ids for c in t.outputs)])
    return operand


#: How many nodes may lie between a fused cut and the operands it feeds (RoPE's rotate-half,
#: interleaved rotation, the head split before it).
_MAX_OWN_READERS = 48


def _own_cut_readers(operands, inside: set[int], graph: gs.Graph) -> list[gs.Node]:
    """Nodes reading a fused cut on an operand's walk (its sibling parts, or the tensor a
    Gather cuts) whose results only reach this block: RoPE on Q and K between a fused QKV
    cut and the rotated Q/K where those walks stopped. With them inside, V's walk goes
    through the cut (its source is the projection's input, as without RoPE) and the cut's
    parts do not escape the block."""
    own: dict[int, gs.Node] = {}
    for operand in operands:
        for step in operand.steps:
            if not isinstance(step, Part):
                continue
            tensors = [*step.node.outputs, step.node.inputs[0]]
            readers = [r for t in tensors for r in t.outputs
                       if id(r) not in inside and r.op not in SHAPE_ONLY_OPS]
            reached = _forward_into(readers, inside, graph)
            if reached is not None:
                own.update((id(n), n) for n in reached)
    return list(own.values())


def _forward_into(start: list[gs.Node], inside: set[int],
                  graph: gs.Graph) -> list[gs.Node] | None:
    """The nodes from ``start`` down to ``inside``, when every result on the way is read only
    by them or by ``inside`` (none is a graph output); None when one leaves."""
    reached: dict[int, gs.Node] = {}
    pending = list(start)
    while pending:
        node = pending.pop()
        if id(node) in inside or id(node) in reached:
            continue
        if len(reached) >= _MAX_OWN_READERS:
            return None
        reached[id(node)] = node
        for out in node.outputs:
            if is_graph_output(out, graph):
                return None
            pending.extend(r for r in out.outputs if r.op not in SHAPE_ONLY_OPS)
    return list(reached.values())


def _read_outside(node: gs.Node, inside: set[int]) -> bool:
    return any(id(reader) not in inside and reader.op not in SHAPE_ONLY_OPS
               for out in node.outputs for reader in out.outputs)


def _input_read_outside(node: gs.Node, walked: set[int], inside: set[int]) -> bool:
    cut = node.inputs[0]
    made_here = bool(cut.inputs) and id(cut.inputs[0]) in walked
    return made_here and any(id(reader) not in inside and reader.op not in SHAPE_ONLY_OPS
                             for reader in cut.outputs)


def _fused_block(node: gs.Node, info: dict[str, Any], body: gs.Graph, path: str,
                 ctx: Context) -> AttentionMatch:
    q = _walk_operand(Q_OPERAND, info["q"], "q", ctx)
    k = _walk_operand(K_OPERAND, info["k"] or info["q"], "k", ctx)
    v = _walk_operand(V_OPERAND, info["v"] or info["q"], "v", ctx)
    mask = {"kind": "input", "tensors": [info["mask"].name]} if info.get("mask") is not None else None
    head_dim = info.get("head_dim") or _static_dim(info["q"].shape, -1)
    if info.get("num_heads") and head_dim and info["q"].shape is not None and len(info["q"].shape) == 3:
        head_dim = _static_dim(info["q"].shape, -1)
        head_dim = head_dim // info["num_heads"] if head_dim else None
    block = AttentionMatch(
        id="", kind="self" if info.get("self_only") else "cross", num_heads=info.get("num_heads"),
        head_dim=head_dim, scale=info.get("scale"), q=q, k=k, v=v, mask=mask, fused=True,
        op=f"{node.domain + '.' if node.domain else ''}{node.op}", subgraph=path, graph=body,
        nodes=[node], output=node.outputs[0], num_kv_heads=info.get("num_kv_heads"),
    )
    if info.get("self_only"):
        block.k.source = block.q.source
    return block


def _merge_heads(context: gs.Tensor, body: gs.Graph) -> tuple[list[gs.Node], gs.Tensor]:
    """The Transpose/Reshape chain that merges heads back to [B, S, E] below the context."""
    nodes, tensor = [], context
    for _ in range(4):
        if len(tensor.outputs) != 1 or is_graph_output(tensor, body):
            break
        consumer = tensor.outputs[0]
        if consumer.op not in _MERGE_OPS or consumer.inputs[0] is not tensor:
            break
        nodes.append(consumer)
        tensor = consumer.outputs[0]
        if consumer.op == "Reshape" and any(n.op == "Transpose" for n in nodes) \
                and (_rank(tensor, consumer) or 0) <= 3:
            # The merge ends at the first Reshape to [B, S, E] after the Transpose; without
            # shapes (inside bodies) the target's length says so. Past it lies the projection.
            break
    return nodes, tensor


def _rank(tensor: gs.Tensor, reshape: gs.Node) -> int | None:
    if tensor.shape is not None:
        return len(tensor.shape)
    target = reshape_target(reshape)
    return len(target) if target is not None else None


# --- block facts ------------------------------------------------------------------------------

def _static_dim(shape, axis: int) -> int | None:
    if shape is None or len(shape) < abs(axis):
        return None
    dim = shape[axis]
    return int(dim) if isinstance(dim, int) and dim > 0 else None


def _num_heads(core_operand: gs.Tensor, operand: Operand, kv: bool = False) -> int | None:
    shape = core_operand.shape
    if shape is not None and len(shape) == 4 and _static_dim(shape, 1):
        return _static_dim(shape, 1)
    split = _head_split(operand)
    return split[0] if split else None


def _head_dim(core_operand: gs.Tensor, operand: Operand) -> int | None:
    known = _static_dim(core_operand.shape, -1)
    if known:
        return known
    # Shapes unknown (TorchScript computes reshape targets): the head split's last dim. Not any
    # Reshape's: a Gemm projection's unflatten to [B, S, H*D] ends in H*D.
    split = _head_split(operand)
    return split[1] if split else None


def _head_split(operand: Operand) -> tuple[int, int] | None:
    """``(H, D)`` from the Reshape that splits the projection's features into heads.

    It is the first rank-raising Reshape seen from the projection whose target ends in
    constant ``[..., H, D]`` (a later one, such as a flatten-and-back of ``[B, H, S, D]``,
    would give S for H); where its input's feature dim is known, ``H * D`` must equal it.
    """
    chain = [step.node for step in operand.steps]  # projection side first
    for i, node in enumerate(chain):
        if node.op != "Reshape":
            continue
        target = reshape_target(node)
        in_shape = _shape_before_reshapes(chain, i)
        if _restores_shape(chain, i, target):
            continue  # the "back" of a flatten-and-back: no layout change
        rank_in = len(in_shape) if in_shape is not None else None
        if in_shape is None or (len(in_shape) == 3 and not _static_dim(in_shape, -1)):
            in_shape = _projected_shape(operand, chain[:i + 1]) or in_shape
        batched = _batched_head_split(node, target, in_shape, _previous_moving(chain, i),
                                      _next_moving(chain, i))
        if batched:
            return batched
        if not target or len(target) < 4 or (rank_in is not None and len(target) <= rank_in):
            continue
        after = _next_moving(chain, i)
        # BLOOM's fused QKV, [B,S,H,3,D], Q/K/V picked from the axis before D: H is before it.
        parts = len(target) >= 5 and _cuts_axis(after, len(target) - 2, len(target))
        heads, dim = (target[-3] if parts else target[-2]), target[-1]
        if not (isinstance(heads, int) and heads > 0 and isinstance(dim, int) and dim > 0):
            return None
        features = _static_dim(in_shape, -1)
        if features and rank_in == len(target) - 1 and features != heads * dim:
            return None
        return heads, dim if parts else _per_head_part(dim, after)
    return None


_KEEPS_EVERY_AXIS = ("Identity", "Cast")


def _restores_shape(chain: list[gs.Node], i: int, target) -> bool:
    """Whether Reshape ``chain[i]``, read after a flatten (a Reshape to one dim; Identities
    and Casts between), gives back the shape from before it: the same dims, or the same rank
    and static last dim (the feature width; dynamic dims lose their symbols through the
    flatten). It moves nothing, so it is not a head split."""
    j = _previous_index(chain, i)
    if j is None or chain[j].op != "Reshape":
        return False
    before, flat = chain[j].inputs[0].shape, reshape_target(chain[j])
    if before is None or flat is None or len(flat) != 1:
        return False
    if list(before) == list(chain[i].outputs[0].shape or []):
        return True
    last = _static_dim(before, -1)
    return bool(target) and len(target) == len(before) and last is not None \
        and target[-1] == last


def _previous_index(chain: list[gs.Node], i: int) -> int | None:
    """The index of the node before ``chain[i]`` that is not an Identity or a Cast."""
    return next((j for j in range(i - 1, -1, -1) if chain[j].op not in _KEEPS_EVERY_AXIS), None)


def _shape_before_reshapes(chain: list[gs.Node], i: int):
    """The shape ``chain[i]`` (a Reshape) reshapes, seen through the Reshapes right before it
    (Identities and Casts between them too): a Reshape of a Reshape depends only on the first
    one's input, so a flatten-and-back of rotated ``[B,H,S,D]`` heads does not read as a
    ``[.., H, D]`` split of a flat vector."""
    start, j = i, i - 1
    while j >= 0 and chain[j + 1].inputs[0] is chain[j].outputs[0] \
            and chain[j].op in ("Reshape", *_KEEPS_EVERY_AXIS):
        if chain[j].op == "Reshape":
            if chain[j].inputs[0].shape is None:
                break
            start = j
        j -= 1
    shape = chain[start].inputs[0].shape
    return shape if shape is not None else chain[i].inputs[0].shape


def _next_moving(chain: list[gs.Node], i: int) -> gs.Node | None:
    """The first node after ``chain[i]`` that is not an Identity or a Cast (they keep every
    axis, so what the head split feeds is what comes after them)."""
    return next((node for node in chain[i + 1:] if node.op not in _KEEPS_EVERY_AXIS), None)


def _cuts_axis(node: gs.Node | None, axis: int, rank: int) -> bool:
    """Whether ``node`` takes a part of ``axis`` of its rank-``rank`` input (Gather, Split or
    Slice on it): there the axis holds Q, K and V, not heads."""
    if node is None or node.op not in ("Gather", "Split", "Slice"):
        return False
    if node.op == "Slice":
        axes = constant_eval(node.inputs[3]) if len(node.inputs) > 3 else None
        found = [int(a) for a in axes.reshape(-1)] if axes is not None else []
    else:
        found = [int(node.attrs.get("axis", 0))]
    return [a + rank if a < 0 else a for a in found] == [axis]


def _previous_moving(chain: list[gs.Node], i: int) -> gs.Node | None:
    """The node before ``chain[i]`` that moves values: Identities, Casts and flatten-and-back
    Reshape pairs skipped (what the head split reads is what came before them)."""
    j = _previous_index(chain, i)
    while j is not None and chain[j].op == "Reshape" \
            and _restores_shape(chain, j, reshape_target(chain[j])):
        flatten = _previous_index(chain, j)
        j = _previous_index(chain, flatten) if flatten is not None else None
    return chain[j] if j is not None else None


def _per_head_part(dim: int, after: gs.Node | None) -> int:
    """The head dim of a fused QKV split per head (``[B,S,H,n*D]`` cut by Split on the last
    axis, GPT-NeoX/Bloom): one part of the split's last dim, not all of it."""
    if after is None or after.op != "Split" or after.attrs.get("axis", 0) not in (-1, 3):
        return dim
    sizes = constant_eval(after.inputs[1]) if len(after.inputs) > 1 else None
    if sizes is not None and sizes.size == len(after.outputs):
        return int(sizes.reshape(-1)[0]) if len(set(sizes.reshape(-1).tolist())) == 1 else dim
    return dim // len(after.outputs) if dim % len(after.outputs) == 0 else dim


def _core_layout(q_shape) -> str:
    """``BHSD``; ``(BH)SD`` for heads folded into the batch (or a rank not known); a core with
    more leading axes (ProphetNet's n-gram streams) says so: ``BNHSD``."""
    if q_shape is None or len(q_shape) <= 3:
        return "(BH)SD"
    return "B" + "N" * (len(q_shape) - 4) + "HSD"


#: Operand steps that keep every axis: a scalar scale (the walk takes only scalar Mul/Div), a
#: Cast, an Identity.
_ELEMENTWISE_STEPS = ("Mul", "Div", "Cast", "Identity")


def _projected_shape(operand: Operand, chain: list[gs.Node]) -> list[int | None] | None:
    """``[None, None, E]`` for the input of ``chain[-1]`` where ONNX did not infer its width
    (inside If/Loop bodies), E being the projection's output width off its constant weight,
    when the ops between keep the feature axis last (Transposes that leave it there or bring
    it back, Reshapes whose target ends in E, scalar scales, Casts) or cut a part of it (a
    fused QKV's Split or Slice on the last axis). Time-major heads read H = E/D from it."""
    weight = constant_eval(operand.weight) if operand.weight is not None else None
    if operand.projection is None or weight is None or weight.ndim != 2:
        return None
    transposed = operand.projection.op == "Gemm" and operand.projection.attrs.get("transB", 0)
    features: int | None = int(weight.shape[0] if transposed else weight.shape[1])
    moved: tuple[int, int] | None = None  # (rank, where the feature axis is) once transposed
    for index, node in enumerate(chain[:-1]):
        if node.op in ("Split", "Slice") and moved is None:
            features = _part_width(node, features, chain[index + 1])
            if features is None:
                return None
            continue
        if node.op in _ELEMENTWISE_STEPS:
            continue
        perm = _transpose_perm(node) if node.op == "Transpose" else None
        if node.op == "Transpose" and perm is None:
            return None
        if perm is not None:  # follow the feature axis (a Transpose pair may bring it back)
            rank, axis = moved or (len(perm), len(perm) - 1)
            if len(perm) != rank:
                return None
            axis = list(perm).index(axis)
            moved = None if axis == rank - 1 else (rank, axis)
            continue
        target = reshape_target(node) if node.op == "Reshape" else None
        if moved is not None or target is None or target[-1:] != [features]:
            return None
    return [None, None, features] if moved is None else None


def _transpose_perm(node: gs.Node) -> list[int] | None:
    """:func:`~xattn_compiler.rewrite.transpose_perm`, the rank of a perm-less Transpose's
    input read off the ops that made it where ONNX inferred no shape (If/Loop bodies)."""
    perm = transpose_perm(node)
    if perm is not None:
        return perm
    rank = inferred_rank(node.inputs[0])
    return list(range(rank))[::-1] if rank is not None else None


def _part_width(cut: gs.Node, features: int, reader: gs.Node) -> int | None:
    """The width of the part of a last-axis Split/Slice of ``features`` that ``reader`` reads."""
    if cut.op == "Split":
        if cut.attrs.get("axis", 0) not in (-1, 2):
            return None
        index = next((i for i, out in enumerate(cut.outputs)
                      if any(t is out for t in reader.inputs)), None)
        sizes = constant_eval(cut.inputs[1]) if len(cut.inputs) > 1 else None
        if index is None:
            return None
        if sizes is not None and sizes.size == len(cut.outputs):
            return int(sizes.reshape(-1)[index])
        return features // len(cut.outputs) if features % len(cut.outputs) == 0 else None
    starts, ends, axes, steps = (constant_eval(cut.inputs[i]) if len(cut.inputs) > i else None
                                 for i in range(1, 5))
    if starts is None or ends is None or axes is None or starts.size != 1 \
            or int(axes.reshape(-1)[0]) not in (-1, 2) \
            or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        return None
    start, end = (int(v.reshape(-1)[0]) for v in (starts, ends))
    start, end = (v + features if v < 0 else v for v in (start, end))
    return max(min(end, features) - max(start, 0), 0) or None


def _batched_head_split(node: gs.Node, target, in_shape, before: gs.Node | None,
                        after: gs.Node | None = None):
    """``(H, D)`` of a Reshape that batches heads without a 4-D ``[.., H, D]`` target.

    Time-major heads (``nn.MultiheadAttention``): ``[S,B,E]`` to ``[S,B*H,D]``, so H is E/D;
    the Reshape's input is a Transpose ``[1,0,2]`` of a batch-first projection, or its output
    is transposed to put ``B*H`` first (``[1,0,2]``, or ``[1,2,0]`` for K^T) when the
    projection is time-major already. Heads rotated in ``[B,H,S,D]`` (RoPE) and then batched:
    ``[B,H,S,D]`` to ``[B*H,S,D]``, so H is the input's dim 1.
    """
    if not target or len(target) != 3 or in_shape is None or not isinstance(target[-1], int) \
            or target[-1] <= 0:
        return None
    dim = target[-1]
    if len(in_shape) == 3 and (_is_transpose(before, ([1, 0, 2],))
                               or _is_transpose(after, ([1, 0, 2], [1, 2, 0]))):
        features = _static_dim(in_shape, -1)
        return (features // dim, dim) if features and features % dim == 0 else None
    if len(in_shape) == 4 and _static_dim(in_shape, -1) == dim and _static_dim(in_shape, 1):
        return _static_dim(in_shape, 1), dim
    return None


def _is_transpose(node: gs.Node | None, perms: tuple[list[int], ...]) -> bool:
    return node is not None and node.op == "Transpose" and list(node.attrs.get("perm", [])) in perms


def reshape_target(node: gs.Node) -> list[int | None] | None:
    """A Reshape's target with the parts that are constant: ``[None, None, 4, 16]``.

    Exporters build targets for dynamic dims at run time as Concat(Unsqueeze(Gather(Shape))...,
    constants); the constant pieces are what heads and head dims are read from.
    """
    shape_input = node.inputs[1]
    value = constant_eval(shape_input)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    producer_node = shape_input.inputs[0] if shape_input.inputs else None
    # Clutter on the target: an Identity, or a Cast to int64 of integers (the same values).
    while producer_node is not None and (producer_node.op == "Identity"
                                         or _integer_to_int64(producer_node)):
        shape_input = producer_node.inputs[0]
        producer_node = shape_input.inputs[0] if shape_input.inputs else None
    if producer_node is None or producer_node.op != "Concat":
        return None
    target: list[int | None] = []
    for part in producer_node.inputs:
        value = constant_eval(part)
        if value is not None:
            target.extend(int(v) for v in value.reshape(-1))
        elif (length := piece_length(part)) is not None:
            target.extend([None] * length)
        else:
            return None
    return target


def _integer_to_int64(node: gs.Node) -> bool:
    if node.op != "Cast" or node.attrs.get("to") != onnx.TensorProto.INT64 or not node.inputs:
        return False
    try:
        return np.dtype(node.inputs[0].dtype) in (np.dtype(np.int64), np.dtype(np.int32))
    except TypeError:  # unknown, or a type numpy does not have
        return False


def _scale(core: Match, q: Operand, k: Operand) -> float | None:
    """The product of the scales in the scores chain and on Q's and K's paths."""
    scores, _, _ = core_steps(core.steps)
    scale = 1.0
    for step in [*scores, *q.scales, *k.scales]:
        if isinstance(step, Scale):
            if step.factor is None:
                return None
            scale *= step.factor
    return scale


def _mask(core: Match) -> dict[str, Any] | None:
    scores, _, _ = core_steps(core.steps)
    adds = [step.mask.name for step in scores if isinstance(step, MaskAdd)]
    conds = [step.cond.name for step in scores if isinstance(step, KeepWhere)]
    if not adds and not conds:
        return None
    kind = "add" if adds and not conds else "where" if conds and not adds else "add+where"
    return {"kind": kind, "tensors": adds + conds}


def _escapes(block: AttentionMatch) -> tuple[list[str], list[str], list[str]]:
    """Intermediate tensors read outside the block (data), by Shape ops (shape only), and the
    K/V tensors that only leave as graph outputs (:func:`_kv_output_readers`): those are inputs
    of the fused core (a KV cache's present K/V is the Concat feeding it), so they stay and the
    block can still be fused."""
    inside = {id(n) for n in block.nodes}
    kv_chain = {id(t) for operand in (block.k, block.v) for t in _kv_chain(operand)}
    escapes, shape_uses, kv_outputs = [], [], []
    for node in block.nodes:
        for tensor in node.outputs:
            if tensor is block.output:
                continue
            outside = [c for c in tensor.outputs if id(c) not in inside]
            shape_uses.extend(tensor.name for c in outside if c.op == "Shape")
            data = [c for c in outside if c.op != "Shape"]
            if id(tensor) in kv_chain and _kv_output_readers(data, block.graph):
                if data or is_graph_output(tensor, block.graph):
                    kv_outputs.append(tensor.name)
                continue
            if is_graph_output(tensor, block.graph):
                escapes.append(f"'{tensor.name}' is a graph output")
            escapes.extend(f"'{tensor.name}' is read by {c.op} '{_label(c)}'" for c in data)
    return escapes, sorted(set(shape_uses)), kv_outputs


#: Ops that only lay a present K/V out for the model's outputs (another head order, a cast).
_PRESENT_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Identity", "Cast", "Squeeze",
                                 "Unsqueeze", "Shape"})


def _kv_output_readers(readers: list[gs.Node], graph: gs.Graph, depth: int = 4) -> bool:
    """Whether ``readers`` (outside a block) only lay a K/V tensor out for graph outputs: a
    decoder returns its present K/V, directly or through a Transpose/Reshape (optimum's first
    step returns the head split K while K^T is transposed from it apart). Any other reader
    uses the value inside the model, and such a block is left alone."""
    for reader in readers:
        if reader.op not in _PRESENT_LAYOUT_OPS or depth == 0:
            return False
        if reader.op == "Shape":
            continue
        for out in reader.outputs:
            if not out.outputs and not is_graph_output(out, graph):
                return False  # dead: not a present output, and nothing to keep it for
            if not _kv_output_readers(list(out.outputs), graph, depth - 1):
                return False
    return True


# --- classification ---------------------------------------------------------------------------

def _block_outputs(blocks: list[AttentionMatch]) -> list[gs.Tensor]:
    return [b.core["context"] if b.core is not None else b.output for b in blocks]


def _classify(blocks: list[AttentionMatch], times: BindingTimes, provenance: Provenance) -> None:
    graph = provenance.graph
    outputs = _block_outputs(blocks)
    for block in blocks:
        # Self by data provenance (provenance.py): rotary tables and per-head norms between
        # the projections and the core do not make Q and K two sequences.
        if provenance.same_sequence(block.q, block.k):
            block.kind = "self"
        elif not block.fused or block.kind != "self":
            block.kind = "cross"
    times.mark_attention_outputs(outputs)
    stops = {id(t) for b in blocks if b.kind == "cross" for o in (b.k, b.v) for t in _kv_chain(o)}
    static = _static_inputs(graph, stops)
    for block in blocks:
        deps = times.deps(block.k.tensor) | times.deps(block.v.tensor)
        names = set(times.input_names(block.k.tensor)) | set(times.input_names(block.v.tensor))
        if block.kind == "cross":
            block.static_inputs = [name for name in static if name in names]
        if deps == 0:
            block.kv_source_kind = "constant"
        elif (block.kind == "cross" and names and names <= set(static)
              and not times.via_attention(block.k.source)
              and not times.via_attention(block.v.source)):
            block.kv_source_kind = "graph_input"
        else:
            block.kv_source_kind = "internal"


def _heads_past_rotations(blocks: list[AttentionMatch], provenance: Provenance,
                          ctx: Context) -> None:
    """Heads and head dim where Q's (K's) walk stops at a rotation (RoPE, a per-head norm)
    with no head split on it and no shapes to read them from: inside If/Loop bodies, or past
    a computed target ONNX did not propagate. The head split lies on the walk beyond the
    rotation, from the tensor provenance continues at (the rotation's input)."""
    for block in blocks:
        if block.fused or (block.num_heads and block.head_dim and block.num_kv_heads):
            continue
        q, k = (_walk_past_rotation(o, provenance, ctx) for o in (block.q, block.k))
        split = _head_split(q) if q is not None else None
        if split is not None:
            block.num_heads = block.num_heads or split[0]
            block.head_dim = block.head_dim or split[1]
        kv_split = _head_split(k) if k is not None else None
        if kv_split is not None and not block.num_kv_heads:
            block.num_kv_heads = kv_split[0]


def _walk_past_rotation(operand: Operand, provenance: Provenance,
                        ctx: Context) -> Operand | None:
    if operand.projection is not None:
        return None
    above = provenance.dominator(operand.source)
    return _walk_operand(ORIGIN_OPERAND, above, "origin", ctx) if above is not None else None


def _kv_chain(operand: Operand) -> list[gs.Tensor]:
    """The K or V operand and every tensor between it and its projection, the projection's
    output included: the same K/V in other layouts. A decoder that returns its cross K/V
    (optimum's ``present.N.encoder.key``, the head-split projection) still feeds only K/V."""
    chain = [operand.tensor]
    for node in [*operand.nodes, *([operand.projection] if operand.projection else [])]:
        chain.extend(node.outputs)
    return chain


def _static_inputs(graph: gs.Graph, stops: set[int]) -> list[str]:
    """Graph inputs whose every path to a graph output passes through a cross K/V operand."""
    flows = _body_output_flows(graph)
    outputs = {id(t) for t in graph.outputs}
    return [tensor.name for tensor in graph.inputs
            if tensor.outputs and not _reaches_output(tensor, stops, outputs, flows)]


def _body_output_flows(graph: gs.Graph) -> dict[int, list[gs.Tensor]]:
    """Where each body output's value goes: the owning If/Loop/Scan outputs (and, for a Loop's
    carried values, the body input of the next iteration)."""
    flows: dict[int, list[gs.Tensor]] = {}
    for _, body_owner_graph in iter_graphs(graph):
        for node in body_owner_graph.nodes:
            for attr, value in node.attrs.items():
                for body in value if isinstance(value, list) else [value]:
                    if isinstance(body, gs.Graph):
                        _map_body_outputs(node, attr, body, flows)
    return flows


def _map_body_outputs(node: gs.Node, attr: str, body: gs.Graph,
                      flows: dict[int, list[gs.Tensor]]) -> None:
    outs = list(body.outputs)
    if node.op == "Loop":
        # outputs: cond, carried..., scan...; node outputs: carried..., scan...
        for i, tensor in enumerate(outs[1:]):
            targets = [node.outputs[i]] if i < len(node.outputs) else []
            if i + 2 < len(body.inputs):
                targets.append(body.inputs[i + 2])
            flows[id(tensor)] = targets
    else:  # If branches and Scan bodies map output i to node output i
        for i, tensor in enumerate(outs):
            if i < len(node.outputs):
                flows.setdefault(id(tensor), []).append(node.outputs[i])


def _reaches_output(start: gs.Tensor, stops: set[int], outputs: set[int],
                    flows: dict[int, list[gs.Tensor]]) -> bool:
    frontier, seen = [start], set()
    while frontier:
        tensor = frontier.pop()
        if id(tensor) in seen or id(tensor) in stops:
            continue
        seen.add(id(tensor))
        if id(tensor) in outputs:
            return True
        frontier.extend(flows.get(id(tensor), ()))
        for consumer in tensor.outputs:
            if consumer.op in SHAPE_ONLY_OPS:
                continue  # reading a shape needs no values: the static part may still be cut off
            # A body node reading an outer value is a consumer too; what it computes leaves
            # the body through ``flows``.
            frontier.extend(consumer.outputs)
    return False


def _unique(nodes: list[gs.Node]) -> list[gs.Node]:
    seen, out = set(), []
    for node in nodes:
        if id(node) not in seen:
            seen.add(id(node))
            out.append(node)
    return out


def _label(node: gs.Node | None) -> str:
    if node is None:
        return ""
    return node.name or f"{node.op}->{node.outputs[0].name if node.outputs else ''}"


__all__ = ["AttentionMatch", "AttentionReport", "NearMiss", "analyze_attention", "find_attention"]
