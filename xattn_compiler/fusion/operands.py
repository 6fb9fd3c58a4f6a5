"""What every fusion target reads off a matched block, and the edits they share.

Names carry shapes (B batch, H query heads, Hkv key/value heads, Sq/Sk lengths, D head dim)::

    scores_BHSS  = MatMul(q_BHSD, k_BHDS)
    logits_BHSS  = chain(scores)          Mul/Div by constants, Add(mask), Where(keep, ., fill),
                                          Cast (the precision Softmax runs in)
    probs_BHSS   = guard(Softmax(logits)) Cast back, Dropout (inference), Identity,
                                          Where(IsNaN(p), 0, p)
    context_BHSD = MatMul(probs, v_BHSD)

:func:`plan_core` builds a :class:`CorePlan` from the match's typed steps
(``patterns/steps.py``), without walking the graph again or changing it: the scale
as one number, the mask as additive terms and boolean "keep" conditions, the precision of the
Softmax, and the Mul/Div on Q or K that a fused op can take over as its ``scale``. The chain is
affine in the scores: ``logits = a * scores + sum(f_i * m_i)`` with masked positions
(``Where``) at a very negative fill, so the fused op's ``scale`` is ``a`` and its mask
``sum(f_i * m_i)`` (``f_i``: the factors applied after term ``i`` was added), or the keep
conditions where there are no float terms.

A Where fill that is not a mask value (above ``-1e4``) is not a mask, and such blocks stay.
Rows where every key is masked differ anyway: the unfused graph gives NaN (``-inf`` masks,
unless a ``Where(IsNaN)`` guard zeroes them) or a uniform average (finite fills), ONNX
Runtime's fused kernels give 0. Such rows carry no information and the verification inputs
never hold them.

:class:`Editor` holds the edits targets share: fold operand scales, K from K^T, one mask
tensor in the form an op accepts, and taking over a tensor's producer so names and graph
outputs stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.analysis import constant_eval
from xattn_compiler.attention import AttentionMatch, _head_split
from xattn_compiler.ir import constant_value, is_graph_output, producer
from xattn_compiler.passes.reshapes import (
    Names,
    disconnect,
    move_readers,
    onnx_dtype,
    same_dim,
    set_input,
)
from xattn_compiler.patterns.steps import (
    MASK_FILL_LIMIT,
    Guard,
    KeepWhere,
    MaskAdd,
    Scale,
    Step,
    branching,
    core_steps,
)
from xattn_compiler.rewrite import compose_perms, is_identity_perm, transpose_perm
from xattn_compiler.weights import new_constant

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}


@dataclass
class ScaleFold:
    """A Mul/Div by a constant on the Q or K path that a fused op's ``scale`` can replace."""

    node: gs.Node
    data: gs.Tensor          # the input it scales
    factor: float            # what it multiplies by (1/c for a Div)


@dataclass
class KeepCondition:
    """``Where(cond, logits, fill)`` (``negate``: ``Where(cond, fill, logits)``)."""

    cond: gs.Tensor
    negate: bool
    fill: float              # the fill times every factor applied after the Where


@dataclass
class CorePlan:
    """One unfused block as a fused op sees it. Nothing in the graph changes to make it."""

    q: gs.Tensor                        # [B,H,Sq,D], the core's first operand
    k_t: gs.Tensor                      # [B,Hkv,D,Sk]
    v: gs.Tensor                        # [B,Hkv,Sk,Dv]
    context: gs.Tensor                  # [B,H,Sq,Dv], what the fused op computes
    context_node: gs.Node
    chain_scale: float                  # a: the factor on the scores inside the chain
    operand_scale: float                # the product of every Mul/Div on Q and K's paths
    folds: list[ScaleFold]              # those a fused op can take over (a subset)
    terms: list[tuple[gs.Tensor, float]] = field(default_factory=list)   # (m_i, f_i)
    keeps: list[KeepCondition] = field(default_factory=list)
    dtype: int | None = None            # ONNX type of Q
    softmax_dtype: int | None = None    # the type Softmax runs in
    guarded: bool = False               # Where(IsNaN(p), 0, p) after Softmax
    chain: list[Step] = field(default_factory=list)     # the score MatMul -> Softmax steps
    #: Heads folded into the batch ([B*H,S,D] operands, as some exporters leave them when
    #: remove-layout-clutter cannot collapse them): a fused op sees B*H rows of one head each.
    batched: bool = False

    @property
    def chain_ops(self) -> list[str]:
        """The op types of the scores chain, in order."""
        return [step.node.op for step in self.chain]

    @property
    def mask_rank(self) -> int | None:
        """The rank of the summed mask (None: some term's rank is unknown)."""
        ranks = [len(t.shape) if t.shape is not None else None
                 for t in [*(m for m, _ in self.terms), *(k.cond for k in self.keeps)]]
        return None if None in ranks else max(ranks, default=0)

    @property
    def seq_axes(self) -> tuple[int, int]:
        """Axes of Sq in Q and of Sk in K^T."""
        return (1, 2) if self.batched else (2, 3)

    @property
    def scale(self) -> float:
        """The whole softmax scale: chain and operand factors."""
        return self.chain_scale * self.operand_scale

    @property
    def folded_scale(self) -> float:
        """The scale a fused op applies once the folds are done."""
        folded = 1.0
        for fold in self.folds:
            folded *= fold.factor
        return self.chain_scale * folded

    @property
    def has_mask(self) -> bool:
        return bool(self.terms or self.keeps)


# --- reading a block ----------------------------------------------------------------------------

def plan_core(block: AttentionMatch) -> CorePlan | str:
    """The block as a :class:`CorePlan`, or why a fused op cannot compute it."""
    core = block.core
    if block.fused or core is None:
        return f"already fused as {block.op}"
    q, k_t, v, context_node = core["q"], core["k_t"], core["v"], core["context.node"]
    if q.shape is None:
        return f"the rank of Q '{q.name}' is unknown (shape inference saw nothing here)"
    rank = len(q.shape)
    if rank not in (3, 4):
        return f"Q '{q.name}' is {rank}-D, not [B,H,S,D] or [B*H,S,D]"
    for name, tensor in (("K^T", k_t), ("V", v)):
        if tensor.shape is None or len(tensor.shape) != rank:
            return f"operand {name} '{tensor.name}' does not have Q's rank {rank}"
    dtype = onnx_dtype(q)
    if dtype not in _FLOAT_TYPES:
        return f"Q '{q.name}' has no known float type"
    plan = CorePlan(q=q, k_t=k_t, v=v, context=context_node.outputs[0], context_node=context_node,
                    chain_scale=1.0, operand_scale=1.0, folds=[], dtype=dtype, batched=rank == 3)
    scores, softmax, probs = core_steps(core.steps)
    problem = (_read_scores(plan, scores, softmax, core.nodes) or _read_probs(plan, probs, core)
               or _batched_mask_problem(plan) or _read_operand_scales(plan, block))
    if problem:
        return problem
    if not (plan.scale > 0 and np.isfinite(plan.scale)):
        return f"the softmax scale {plan.scale} is not a positive number"
    return plan


def _read_scores(plan: CorePlan, scores: list[Step], softmax: Step, nodes: list[gs.Node]
                 ) -> str | None:
    """The steps from the score MatMul to Softmax as scale, mask terms and keep conditions."""
    branch = branching([*scores, softmax], nodes)
    if branch is not None:
        return f"the scores chain at '{branch.name}' branches"
    plan.chain = list(scores)
    for step in scores:
        problem = step.problem()
        if problem:
            return problem
        if isinstance(step, Scale):
            factor = step.factor
            plan.chain_scale *= factor
            plan.terms = [(m, f * factor) for m, f in plan.terms]
            for keep in plan.keeps:
                keep.fill *= factor
        elif isinstance(step, MaskAdd):
            plan.terms.append((step.mask, 1.0))
        elif isinstance(step, KeepWhere):
            plan.keeps.append(KeepCondition(step.cond, negate=step.negate, fill=step.fill_value))
    plan.softmax_dtype = onnx_dtype(softmax.data) or plan.dtype
    for keep in plan.keeps:
        if not keep.fill <= MASK_FILL_LIMIT:
            return (f"a Where on '{keep.cond.name}' leaves masked scores at {keep.fill:g}, not a "
                    f"mask value (at most {MASK_FILL_LIMIT:g})")
    return None


def _read_probs(plan: CorePlan, probs: list[Step], core) -> str | None:
    """Softmax -> context MatMul: casts back, inference Dropout, Identity, the IsNaN guard."""
    branch = branching(probs, core.nodes)
    if branch is not None:
        return f"the probabilities '{branch.name}' are read twice"
    for step in probs:
        problem = step.problem()
        if problem:
            return problem
        plan.guarded |= isinstance(step, Guard)
    tensor = plan.context_node.inputs[0]
    if onnx_dtype(tensor) not in (None, plan.dtype) and onnx_dtype(plan.v) not in (None, onnx_dtype(tensor)):
        return f"the probabilities '{tensor.name}' and V differ in type"
    return None


def _batched_mask_problem(plan: CorePlan) -> str | None:
    if plan.batched and plan.has_mask and plan.mask_rank is None:
        return "a mask of a batched-heads core has an unknown rank (rows or heads?)"
    return None


def _read_operand_scales(plan: CorePlan, block: AttentionMatch) -> str | None:
    """Multiply in every Mul/Div on Q's and K's paths; list those a fused op can take over."""
    inside = {id(n) for n in block.nodes}
    seen: set[int] = set()
    for operand in (block.q, block.k):
        for step in operand.scales:
            factor = step.factor
            if not factor:
                return (f"the scale '{step.constant.name}' on the {operand.tensor.name} path is "
                        "not a constant")
            if id(step.node) in seen:
                continue
            seen.add(id(step.node))
            plan.operand_scale *= factor
            if _foldable(step.node, step.data, step.constant, inside, block.graph):
                plan.folds.append(ScaleFold(step.node, step.data, factor))
    return None


def _foldable(node: gs.Node, data: gs.Tensor, scale: gs.Tensor, inside: set[int],
              graph: gs.Graph) -> bool:
    """Whether removing ``node`` leaves every reader of its output with the same shape and type
    (the scale broadcasts to nothing new) and nothing outside the block reads that output."""
    if node.op == "Div" and node.inputs[0] is not data:
        return False
    out = node.outputs[0]
    if is_graph_output(out, graph) or any(id(r) not in inside for r in out.outputs):
        return False
    if scale.shape is None or data.shape is None or len(scale.shape) > len(data.shape):
        return False
    return onnx_dtype(data) == onnx_dtype(out)


# --- heads --------------------------------------------------------------------------------------

def head_problem(block: AttentionMatch) -> str | None:
    """Why the block's head count or head dim cannot be trusted, or None.

    The core operands' static dims are the evidence (H at axis 1 of Q, K^T and V; D at Q's
    axis 3 and K^T's axis 2): none may contradict the matcher. Where shape inference saw none
    (inside If/Loop bodies), the head-split Reshape on each operand's path must give the same
    H and D; without either, the head count is a guess and the block stays.
    """
    heads, head_dim = block.num_heads, block.head_dim
    kv_heads = block.num_kv_heads or heads
    core = block.core
    if core is not None and all(core[name].shape is not None and len(core[name].shape) == 3
                                for name in ("q", "k_t", "v")):
        return None  # [B*H,S,D]: fused as B*H rows of one head, the count is not used
    if not heads or not head_dim:
        return "the head count or head dim is unknown"
    if core is None:
        return None
    evidence = [("Q", core["q"], 1, heads), ("Q", core["q"], 3, head_dim),
                ("K^T", core["k_t"], 1, kv_heads), ("K^T", core["k_t"], 2, head_dim),
                ("V", core["v"], 1, kv_heads)]
    seen = 0
    for name, tensor, axis, expected in evidence:
        value = static_dim(tensor, axis)
        if value is not None:
            seen += 1
            if value != expected:
                return (f"the matcher says {expected} at axis {axis} of {name} '{tensor.name}', "
                        f"its shape says {value}")
    if seen:
        return None
    for name, operand, expected in (("Q", block.q, heads), ("K", block.k, kv_heads),
                                    ("V", block.v, kv_heads)):
        split = _head_split(operand)
        if split is None:
            continue
        seen += 1
        if split != (expected, head_dim):
            return (f"the matcher says {expected} heads of {head_dim} for {name}, its head "
                    f"split says {split[0]} of {split[1]}")
    if not seen:
        return "no shape or head-split Reshape confirms the head count and head dim"
    return None


def static_dim(tensor: gs.Tensor, axis: int) -> int | None:
    """Dim ``axis`` of a 4-D ``tensor`` when it is a known int."""
    shape = tensor.shape
    value = shape[axis] if shape is not None and len(shape) == 4 else None
    return value if isinstance(value, int) and value > 0 else None


def _dim(tensor: gs.Tensor, axis: int):
    shape = tensor.shape
    return shape[axis] if shape is not None and len(shape) > axis else None


# --- editing ------------------------------------------------------------------------------------

def head_split_source(tensor: gs.Tensor, perm: list[int]) -> tuple[gs.Tensor, int, int] | None:
    """``(x, H, D)`` when ``tensor`` is ``Transpose(Reshape(x[B,S,H*D], [B,S,H,D]), perm)``: the
    head split of a projection output ``x``, which a fused op can read as it is (3-D, with the
    head count as an attribute) so the split goes. Shapes must prove it: static ``H``, ``D``
    and ``H*D``, and the same batch and length on both sides."""
    transpose = producer(tensor)
    if transpose is None or transpose.op != "Transpose" or transpose_perm(transpose) != perm:
        return None
    reshape = producer(transpose.inputs[0])
    if reshape is None or reshape.op != "Reshape":
        return None
    source, split = reshape.inputs[0], reshape.outputs[0]
    if source.shape is None or split.shape is None or len(source.shape) != 3 \
            or len(split.shape) != 4:
        return None
    heads, dim, width = split.shape[2], split.shape[3], source.shape[2]
    if not all(isinstance(d, int) and d > 0 for d in (heads, dim, width)) or heads * dim != width:
        return None
    if not (same_dim(split.shape[0], source.shape[0]) and same_dim(split.shape[1], source.shape[1])) \
            and not _keeps_leading_dims(reshape, source.shape[:2]):
        return None
    return source, heads, dim


def _flattens_rows(reshape: gs.Node, width: int) -> bool:
    """Whether ``reshape`` is ``[-1, H*D]``: GPT-2's Conv1D flattening the merged heads for
    its Gemm (merged with the head merge into one Reshape). It reads ``[B, Sq, H*D]`` the same
    way as ``[B, Sq, H, D]``: row-major, and nothing copied from a dim."""
    target = constant_value(reshape.inputs[1])
    return target is not None and [int(t) for t in target.reshape(-1)] == [-1, width]


def _keeps_leading_dims(reshape: gs.Node, dims: list) -> bool:
    """Whether a Reshape between [B, S, H*D] and [B, S, H, D] (either way) keeps B and S
    (``dims``), read off its constant target where shape inference named the output dims
    afresh (``unk__``): each of the first two entries copies its dim (0) or is that dim, and
    at most one is -1 (then it can only be the one left: the shapes above fix the entries
    after the first two to exactly H and D, or H*D)."""
    target = constant_value(reshape.inputs[1])
    if target is None or target.size not in (3, 4):
        return False
    entries = [int(t) for t in target.reshape(-1)]
    if -1 in entries[2:] or entries[:2].count(-1) > 1 \
            or (reshape.attrs.get("allowzero", 0) and 0 in entries):  # then 0 is a zero
        return False
    return all(t in (0, -1) or (isinstance(d, int) and d == t)
               for t, d in zip(entries[:2], dims, strict=True))


def key_split_source(k_t: gs.Tensor) -> tuple[gs.Tensor, int, int] | None:
    """:func:`head_split_source` for K^T: one Transpose from the split (``[0,2,3,1]``, what
    ``canonical-key-transpose`` leaves) or K's split then a swap of the last two axes."""
    direct = head_split_source(k_t, [0, 2, 3, 1])
    if direct is not None:
        return direct
    swap = producer(k_t)
    if swap is None or swap.op != "Transpose" or transpose_perm(swap) != [0, 1, 3, 2]:
        return None
    return head_split_source(swap.inputs[0], [0, 2, 1, 3])


def split_sources(plan: CorePlan) -> tuple:
    """For Q, K and V each ``(x, H, D)`` when it is the head split of a projection output ``x``
    (:func:`head_split_source`, :func:`key_split_source`), else None."""
    return (head_split_source(plan.q, [0, 2, 1, 3]), key_split_source(plan.k_t),
            head_split_source(plan.v, [0, 2, 1, 3]))


def constant_heads_merged(tensor: gs.Tensor, key: bool) -> tuple[np.ndarray, int, int] | None:
    """``(values[B, S, H*D], H, D)`` of a constant K^T ``[B, H, D, S]`` (``key``) or V
    ``[B, H, S, D]``: what a constant context's head split would have read, for an op that
    takes 3-D K/V."""
    if not isinstance(tensor, gs.Constant) or tensor.shape is None or len(tensor.shape) != 4:
        return None
    values = np.asarray(tensor.values)
    bshd = values.transpose(0, 3, 1, 2) if key else values.transpose(0, 2, 1, 3)
    batch, length, heads, dim = bshd.shape
    return np.ascontiguousarray(bshd).reshape(batch, length, heads * dim), heads, dim


def standard_merge(block: AttentionMatch, plan: CorePlan) -> gs.Node | None:
    """The Reshape ending a ``Transpose(0,2,1,3) -> Reshape [B, Sq, H*D]`` merge of the core's
    context, when the block has exactly that (its output is then what an op with 3-D Q
    computes)."""
    readers = plan.context.outputs
    if len(readers) != 1 or readers[0].op != "Transpose" or transpose_perm(readers[0]) != [0, 2, 1, 3]:
        return None
    transposed = readers[0].outputs[0]
    if len(transposed.outputs) != 1 or transposed.outputs[0].op != "Reshape":
        return None
    reshape = transposed.outputs[0]
    merged, context = reshape.outputs[0], plan.context
    if merged is not block.output or merged.shape is None or context.shape is None:
        return None
    width = static_dim(context, 1), static_dim(context, 3)
    if None in width:
        return None
    if _flattens_rows(reshape, width[0] * width[1]):
        return reshape
    if len(merged.shape) != 3 or merged.shape[2] != width[0] * width[1]:
        return None
    if not (same_dim(merged.shape[0], context.shape[0]) and same_dim(merged.shape[1], context.shape[2])) \
            and not _keeps_leading_dims(reshape, [context.shape[0], context.shape[2]]):
        return None
    return reshape


def _existing_transpose(source: gs.Tensor, perm: list[int], graph: gs.Graph) -> gs.Tensor | None:
    """The output of a Transpose of ``source`` by ``perm`` in ``graph`` (not in a body that
    reads ``source`` from outside: its output is not visible here)."""
    for reader in source.outputs:
        if reader.op == "Transpose" and reader.inputs[0] is source \
                and transpose_perm(reader) == list(perm) \
                and any(node is reader for node in graph.nodes):
            return reader.outputs[0]
    return None


class Editor:
    """New nodes for one graph, with fresh deterministic names; remembers what it added."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph = graph
        self.names = Names.of(graph)
        self.prefix = prefix
        self.added: list[gs.Node] = []

    def tensor(self, hint: str, dtype=None) -> gs.Variable:
        return gs.Variable(self.names.fresh(f"{self.prefix}/{hint}"), dtype=dtype)

    def const(self, hint: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.names.fresh(f"{self.prefix}/{hint}"), np.asarray(value))

    def weight(self, hint: str, value: np.ndarray) -> gs.Constant:
        """A constant computed from a weight (K laid out for the op): kept detached when the
        run detaches weights (:func:`xattn_compiler.weights.new_constant`)."""
        return new_constant(self.names.fresh(f"{self.prefix}/{hint}"), value)

    def node(self, op: str, inputs: list[gs.Tensor], hint: str, *, outputs: list[gs.Tensor] | None = None,
             domain: str | None = None, dtype=None, **attrs) -> gs.Tensor:
        """Append ``op`` and return its (first) output."""
        outs = outputs if outputs is not None else [self.tensor(hint, dtype)]
        node = gs.Node(op, self.names.fresh(f"{self.prefix}/{hint}", node=True), attrs,
                       list(inputs), list(outs), domain=domain)
        self.graph.nodes.append(node)
        self.added.append(node)
        return outs[0]

    def take_over(self, old: gs.Node, new_output: gs.Tensor) -> None:
        """Make ``new_output``'s producer compute ``old``'s (first) output tensor itself, so its
        name, its readers and a graph output stay; ``old`` is left dead."""
        target = old.outputs[0]
        maker = producer(new_output)
        assert maker is not None  # always one of the nodes this editor added
        disconnect(old)
        index = next(i for i, t in enumerate(maker.outputs) if t is new_output)
        maker.outputs[index] = target
        if target.dtype is None:
            target.dtype = new_output.dtype

    def replace(self, old: gs.Tensor, new: gs.Tensor) -> bool:
        return move_readers(old, new, self.graph)

    # --- shared pieces ---

    def fold_scales(self, plan: CorePlan) -> None:
        """Remove the Mul/Div on Q and K that the fused op's ``scale`` now applies."""
        for fold in plan.folds:
            out = fold.node.outputs[0]
            move_readers(out, fold.data, self.graph)
            disconnect(fold.node)
            # The Mul may be the last op before the core (SDPA scales K^T itself).
            if plan.q is out:
                plan.q = fold.data
            if plan.k_t is out:
                plan.k_t = fold.data
            # The op's scale now applies the factor: move it from the operands to the chain.
            plan.chain_scale *= fold.factor
            plan.operand_scale /= fold.factor
        plan.folds = []

    def key(self, k_t: gs.Tensor) -> gs.Tensor:
        """K as [B,Hkv,Sk,D] from K^T: the Transpose that made K^T with its last two axes
        swapped back (nothing when that is the identity), else a new Transpose."""
        if isinstance(k_t, gs.Constant):  # a constant context's K^T: K is a constant too
            return self.weight("key", np.swapaxes(np.asarray(k_t.values), -1, -2))
        maker = producer(k_t)
        rank = len(k_t.shape) if k_t.shape is not None else 4
        swap = [0, 1, 3, 2] if rank == 4 else [0, 2, 1]
        if maker is not None and maker.op == "Transpose":
            perm = transpose_perm(maker)
            if perm is not None and len(perm) == rank:
                perm = compose_perms(perm, swap)
                source = maker.inputs[0]
                if is_identity_perm(perm):
                    return source
                # A decoder returning its K (a cache's present key) often transposes the head
                # split once for the output and once for K^T: the op reads the first one.
                same = _existing_transpose(source, perm, self.graph)
                if same is not None:
                    return same
                return self.node("Transpose", [source], "key", dtype=k_t.dtype, perm=perm)
        return self.node("Transpose", [k_t], "key", dtype=k_t.dtype, perm=swap)

    def batched_like(self, tensor: gs.Tensor, q: gs.Tensor, hint: str,
                     shape_of: gs.Tensor | None = None) -> gs.Tensor:
        """``tensor`` with Q's batch: MatMul broadcasts a K or V of batch 1 (a constant
        context), fused ops do not. ``shape_of``: the tensor whose (inferred) batch
        ``tensor`` has, when ``tensor`` is new."""
        known = shape_of if shape_of is not None else tensor
        if same_dim(_dim(known, 0), _dim(q, 0)):
            return tensor
        batch = self.shape_slice(q, 0, "batch")
        # The tensor's own rank: a 3-D K read before its head split goes with a 4-D Q.
        reference = known if known.shape is not None else q
        rank = len(reference.shape) if reference.shape is not None else 4
        ones = self.const("ones", np.ones(rank - 1, np.int64))
        target = self.node("Concat", [batch, ones], f"{hint}_shape", dtype=np.int64, axis=0)
        return self.node("Expand", [tensor, target], hint, dtype=tensor.dtype)

    def unrepeat(self, tensor: gs.Tensor, heads: int | None) -> tuple[gs.Tensor, int | None]:
        """``(x, Hkv)`` when ``tensor`` is GQA's repeat of K/V heads,
        ``Reshape(Expand(Unsqueeze(x[B,Hkv,S,D], 2), [B,Hkv,n,S,D]), [B,Hkv*n,S,D])``, so a fused
        op with ``kv_num_heads`` reads ``x``; else ``(tensor, None)``."""
        reshape = producer(tensor)
        if reshape is None or reshape.op != "Reshape" or not heads:
            return tensor, None
        expand = producer(reshape.inputs[0])
        unsqueeze = producer(expand.inputs[0]) if expand is not None and expand.op == "Expand" else None
        if unsqueeze is None or unsqueeze.op != "Unsqueeze":
            return tensor, None
        axes = (unsqueeze.attrs.get("axes") if len(unsqueeze.inputs) < 2
                else constant_eval(unsqueeze.inputs[1]))
        source = unsqueeze.inputs[0]
        kv_heads = static_dim(source, 1)
        if axes is None or [int(a) for a in np.asarray(axes).reshape(-1)] != [2] or not kv_heads \
                or heads % kv_heads or kv_heads == heads:
            return tensor, None
        shape = reshape.outputs[0].shape
        target = constant_eval(reshape.inputs[1])
        # The Reshape must merge exactly the two head axes: [B, Hkv*n, S, D].
        if shape is None or len(shape) != 4 or shape[1] != heads or target is None \
                or len(target) != 4 or int(target[1]) != heads:
            return tensor, None
        return source, kv_heads

    def cast(self, tensor: gs.Tensor, to: int, hint: str) -> gs.Tensor:
        if onnx_dtype(tensor) == to:
            return tensor
        return self.node("Cast", [tensor], hint, dtype=onnx.helper.tensor_dtype_to_np_dtype(to), to=to)

    def keep_mask(self, plan: CorePlan) -> gs.Tensor:
        """One bool tensor, True where a key is attended."""
        result = None
        for keep in plan.keeps:
            cond = self.cast(keep.cond, onnx.TensorProto.BOOL, "keep")
            if keep.negate:
                cond = self.node("Not", [cond], "keep", dtype=np.bool_)
            result = cond if result is None else self.node("And", [result, cond], "keep",
                                                           dtype=np.bool_)
        assert result is not None
        return result

    def additive_mask(self, plan: CorePlan, dtype: int) -> gs.Tensor | None:
        """``sum(f_i * m_i)`` plus the keep conditions as ``Where(keep, 0, fill)``, in ``dtype``;
        None without a mask."""
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        result = None
        for tensor, factor in plan.terms:
            term = self.cast(tensor, dtype, "mask")
            if factor != 1.0:
                term = self.node("Mul", [term, self.const("mask_factor", np.array(factor, np_dtype))],
                                 "mask", dtype=np_dtype)
            result = term if result is None else self.node("Add", [result, term], "mask",
                                                           dtype=np_dtype)
        if plan.keeps:
            fill = max(k.fill for k in plan.keeps)
            fill_value = np.array(max(fill, float(np.finfo(np_dtype).min)) if np.isfinite(fill)
                                  else fill, np_dtype)
            term = self.node("Where", [self.keep_mask(plan), self.const("zero", np.array(0, np_dtype)),
                                       self.const("fill", fill_value)], "mask", dtype=np_dtype)
            result = term if result is None else self.node("Add", [result, term], "mask",
                                                           dtype=np_dtype)
        return result

    def full_mask(self, mask: gs.Tensor, plan: CorePlan,
                  lengths: tuple[tuple[gs.Tensor, int], tuple[gs.Tensor, int]] | None = None
                  ) -> gs.Tensor:
        """``mask`` broadcast to rank 4 with its last two dims exactly [Sq, Sk]: fused kernels
        (ONNX Runtime's Attention and MultiHeadAttention, TensorRT's IAttention) take a mask of
        that form and broadcast only batch and heads. ``lengths``: the tensors and axes to read
        Sq and Sk from, when the op reads other tensors than the core's (a Shape of the core's
        Q would keep its head split alive)."""
        shape = mask.shape
        (q, q_axis), (k_t, k_axis) = lengths or ((plan.q, plan.seq_axes[0]),
                                                  (plan.k_t, plan.seq_axes[1]))
        if plan.batched and (len(shape) if shape is not None else plan.mask_rank) == 3:
            # [B*H,Sq,Sk] masks the rows of the batch, which the op sees as [B*H,1,Sq,Sk].
            mask = self.node("Unsqueeze", [mask, self.const("head_axis", np.array([1], np.int64))],
                             "mask_rows", dtype=mask.dtype)
            shape = [shape[0], 1, *shape[1:]] if shape is not None else None
        if shape is not None and len(shape) == 4 and q.shape is not None and k_t.shape is not None \
                and same_dim(shape[2], q.shape[q_axis]) and same_dim(shape[3], k_t.shape[k_axis]):
            return mask
        int64 = np.int64
        sq = self.shape_slice(q, q_axis, "q_len")
        sk = self.shape_slice(k_t, k_axis, "k_len")
        target = self.node("Concat", [self.const("ones", np.array([1, 1], int64)), sq, sk],
                           "mask_shape", dtype=int64, axis=0)
        return self.node("Expand", [mask, target], "mask_full", dtype=mask.dtype)

    def merged_output(self, out: gs.Tensor, block: AttentionMatch, plan: CorePlan, heads: int
                      ) -> None:
        """Let ``out`` ([B, Sq, H*D], a fused op's output for 3-D Q) stand for the block: it
        takes over the block's standard head merge, or is split back into the core's
        ``[B, H, Sq, D]`` context where the block merges some other way."""
        merge = standard_merge(block, plan)
        if merge is not None and len(merge.outputs[0].shape or ()) == 2:
            set_input(merge, 0, out)  # the rows [B*Sq, H*D] stay a Reshape of the op's output
            return
        if merge is not None:
            self.take_over(merge, out)
            return
        head_dim = static_dim(plan.context, 3) or -1
        split = self.node("Reshape", [out, self.const("split_shape",
                                                      np.array([0, 0, heads, head_dim], np.int64))],
                          "context_BSHD", dtype=plan.context.dtype)
        context = self.node("Transpose", [split], "context", dtype=plan.context.dtype,
                            perm=[0, 2, 1, 3])
        self.take_over(plan.context_node, context)

    def shape_slice(self, tensor: gs.Tensor, axis: int, hint: str) -> gs.Tensor:
        """``[tensor.shape[axis]]`` as a 1-D int64 tensor (a constant when static)."""
        shape = tensor.shape
        if shape is not None and len(shape) > axis and isinstance(shape[axis], int) and shape[axis] > 0:
            return self.const(hint, np.array([shape[axis]], np.int64))
        if (self.graph.opset or 0) >= 15:
            return self.node("Shape", [tensor], hint, dtype=np.int64, start=axis, end=axis + 1)
        whole = self.node("Shape", [tensor], hint, dtype=np.int64)
        return self.node("Gather", [whole, self.const(hint + "_axis", np.array([axis], np.int64))],
                         hint, dtype=np.int64, axis=0)


__all__ = ["MASK_FILL_LIMIT", "CorePlan", "Editor", "KeepCondition", "ScaleFold", "head_problem",
           "constant_heads_merged", "head_split_source", "key_split_source", "split_sources", "plan_core", "standard_merge", "static_dim"]
