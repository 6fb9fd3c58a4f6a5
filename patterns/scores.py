"""The attention core, as exporters spell it::

    context_BHSD = MatMul(probs_BHSS, v_BHSD)
    probs_BHSS   = [Cast | Where(IsNaN(p), 0, p) | Dropout | Identity]* (Softmax(s, axis=-1))
    s            = [Cast | Reshape | Div(., c) | Mul(., c) | Add(., mask) | Where(cond, ., fill)
                    | Max(., mask value)]* (scores)
    scores_BHSS  = MatMul(q_BHSD, k_BHDS)

Shapes in names use B batch, H heads, S sequence, D head dim; the 3-D batched-heads form
drops H into B (``[B*H, S, D]``). Scale factors and masks may come in any order and number
(eager: ``QK*s + mask``; T5: ``QK + bias``; SDPA decomposition: scales on Q and K before the
MatMul, then ``+ mask``), so the steps form a chain rather than a list of fixed sequences.
"""

from __future__ import annotations

from xattn_compiler.pattern import REST, Any, Chain, Op, Or, Scalar

from . import steps as step

#: Elementwise steps between the score MatMul and Softmax.
SCORE_STEPS = (
    Op("Cast", REST, meaning=step.Cast),
    # batched heads [B*H,S,S] unbatched around a [B,1,S,S] mask
    Op("Reshape", REST, Any(), meaning=step.Layout),
    Op("Div", REST, Scalar(), meaning=step.Scale),
    Op("Mul", REST, Scalar(), commutative=True, meaning=step.Scale),
    Op("Add", REST, Any(), commutative=True, meaning=step.MaskAdd),
    Op("Where", Any(), REST, Any(), meaning=step.KeepWhere),
    Op("Where", Any(), Any(), REST, meaning=step.KeepWhere),
    # LLaMA/OPT in transformers 4.2x: torch.max(scores + mask, finfo.min) keeps -inf out of
    # masked scores and changes nothing else.
    Op("Max", REST, Scalar(check=step.at_mask_value), commutative=True, meaning=step.Identity),
)

#: Steps between Softmax and the context MatMul. The Where(IsNaN) guard is HF's SDPA export
#: zeroing fully masked rows.
PROBS_STEPS = (
    Op("Cast", REST, meaning=step.Cast),
    Op("Where", Op("IsNaN", Any()), Any(), REST, meaning=step.Guard),
    Op("Dropout", REST, ..., meaning=step.Dropout),
    Op("Identity", REST, meaning=step.Identity),
)

SCORES_BHSS = Op("MatMul", Any("q"), Any("k_t"), name="scores")


def softmax_over_last_axis(node) -> bool:
    axis = node.attrs.get("axis", -1)
    rank = _rank(node.inputs[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


#: Ops whose output rank is the largest of their inputs' (broadcasting, or rank-preserving).
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Softmax"})


def _rank(tensor, depth: int = 8) -> int | None:
    """The tensor's rank; where shapes are unknown (If/Loop bodies, computed reshape targets)
    read off the layout ops that made it, so ``Softmax(axis=3)`` of 4-D scores is the last axis
    there too."""
    if tensor.shape is not None:
        return len(tensor.shape)
    if getattr(tensor, "values", None) is not None:
        return tensor.values.ndim
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or depth == 0:
        return None
    if node.op == "Transpose":  # no perm: the axes reversed, the rank kept
        perm = node.attrs.get("perm")
        return len(perm) if perm is not None else _rank(node.inputs[0], depth - 1)
    if node.op == "Reshape":
        target = node.inputs[1]
        length = _rank(target, depth - 1) == 1 and target.shape
        if length and isinstance(target.shape[0], int):
            return target.shape[0]
        if getattr(target, "values", None) is not None:
            return int(target.values.size)
        parts = target.inputs[0] if target.inputs else None  # Concat of computed pieces
        if parts is not None and parts.op == "Concat":
            sizes = [_length(t) for t in parts.inputs]
            return sum(sizes) if None not in sizes else None
        return None
    if node.op == "Shape":
        return 1
    if node.op in ("Unsqueeze", "Squeeze"):  # a relative-position bias made [1,H,S,S]
        data = _rank(node.inputs[0], depth - 1)
        axes = node.inputs[1] if len(node.inputs) > 1 else None
        count = (int(axes.values.size) if getattr(axes, "values", None) is not None
                 else len(node.attrs["axes"]) if node.attrs.get("axes") is not None else None)
        if data is None or count is None:
            return None
        return data + count if node.op == "Unsqueeze" else data - count
    if node.op == "Gather":
        data, index = (_rank(t, depth - 1) for t in node.inputs[:2])
        return None if data is None or index is None else data - 1 + index
    if node.op == "MatMul" or node.op in _BROADCASTING:
        ranks = [_rank(t, depth - 1) for t in node.inputs if t is not None and t.name]
        return max(ranks) if ranks and None not in ranks else None
    return None


def _length(tensor) -> int | None:
    """The length of a 1-D shape piece: a constant, a Slice of a Shape, an Unsqueezed scalar."""
    if getattr(tensor, "values", None) is not None:
        return int(tensor.values.size)
    if tensor.shape is not None and len(tensor.shape) == 1 and isinstance(tensor.shape[0], int):
        return tensor.shape[0]
    node = tensor.inputs[0] if tensor.inputs else None
    if node is not None and node.op == "Unsqueeze" and _rank(node.inputs[0], 3) == 0:
        return 1
    if node is not None and node.op in ("Mul", "Add"):  # B*H from B: a 1-D piece times [H]
        sizes = [_length(t) for t in node.inputs]
        return max(sizes) if None not in sizes else None
    return None



def _ops_in(pattern) -> set[str]:
    if not isinstance(pattern, Op):
        return set()
    return set(pattern.ops).union(*(_ops_in(p) for p in pattern.inputs))


#: Steps between Softmax and the context MatMul: a softmax Cast back and up to four cast round
#: trips (the attention module's downward walk from Softmax goes as far).
PROBS_MAX_STEPS = 10


def attention_core(score_steps=SCORE_STEPS, probs_steps=PROBS_STEPS) -> Op:
    """The core with these steps, matched upward from the context MatMul's output."""
    # Room for exporters' clutter: a batched-heads unbatch/rebatch around a mask, a scale and
    # a cast round trip already take 7 steps; the strategies stack up to four clutter items
    # (two ops each) on top of a spelling's own steps (found by the thorough matcher profile).
    softmax = Op("Softmax", Chain(score_steps, until=SCORES_BHSS, max_steps=14), name="softmax",
                 check=softmax_over_last_axis, meaning=step.Softmax)
    return Op("MatMul", Chain(probs_steps, until=softmax, max_steps=PROBS_MAX_STEPS), Any("v"), name="context")


#: The whole core, matched upward from the context MatMul's output.
ATTENTION_CORE = attention_core()
PROBS_BHSS = ATTENTION_CORE.inputs[0]
SOFTMAX = PROBS_BHSS.until

#: Ops that may stand between Softmax and the context MatMul (for the downward anchor walk).
PROBS_OPS = frozenset(op for probs_step in PROBS_STEPS for op in _ops_in(probs_step))

__all__ = ["ATTENTION_CORE", "PROBS_OPS", "PROBS_STEPS", "SCORE_STEPS", "SOFTMAX", "attention_core", "Or"]
