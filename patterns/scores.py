"""The attention core, as exporters spell it::

    context_BHSD = MatMul(probs_BHSS, v_BHSD)
    probs_BHSS   = [Cast | Where(IsNaN(p), 0, p) | Dropout | Identity | Reshape]* (Softmax(s, axis=-1))
    s            = [Cast | Reshape | Div(., c) | Mul(., c) | Add(., mask) | Where(cond, ., fill)
                    | Max(., mask value) | Tanh (softcap)]* (scores)
    scores_BHSS  = MatMul(q_BHSD, k_BHDS)

Shapes in names use B batch, H heads, S sequence, D head dim; the 3-D batched-heads form
drops H into B (``[B*H, S, D]``). Scale factors and masks may come in any order and number
(eager: ``QK*s + mask``; T5: ``QK + bias``; SDPA decomposition: scales on Q and K before the
MatMul, then ``+ mask``), so the steps form a chain rather than a list of fixed sequences.
"""

from __future__ import annotations

from xattn_compiler.analysis import inferred_rank
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
    # Gemma 2's logit softcapping: c * tanh(scores / c), before the mask.
    Op("Tanh", REST, meaning=step.Softcap),
)

#: Steps between Softmax and the context MatMul. The Where(IsNaN) guard is HF's SDPA export
#: zeroing fully masked rows.
PROBS_STEPS = (
    Op("Cast", REST, meaning=step.Cast),
    Op("Where", Op("IsNaN", Any()), Any(), REST, meaning=step.Guard),
    Op("Dropout", REST, ..., meaning=step.Dropout),
    Op("Identity", REST, meaning=step.Identity),
    # BLOOM's eager attention: probabilities [B,H,Sq,Sk] viewed back as [B*H,Sq,Sk] for bmm.
    Op("Reshape", REST, Any(), meaning=step.Layout),
)

SCORES_BHSS = Op("MatMul", Any("q"), Any("k_t"), name="scores")


def softmax_over_last_axis(node) -> bool:
    axis = node.attrs.get("axis", -1)
    rank = inferred_rank(node.inputs[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


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
