"""The attention core, as exporters spell it::

    context_BHSD = MatMul(probs_BHSS, v_BHSD)
    probs_BHSS   = [Cast | Where(IsNaN(p), 0, p) | Dropout | Identity]* (Softmax(s, axis=-1))
    s            = [Cast | Reshape | Div(., c) | Mul(., c) | Add(., mask) | Where(cond, ., fill)]* (scores)
    scores_BHSS  = MatMul(q_BHSD, k_BHDS)

Shapes in names use B batch, H heads, S sequence, D head dim; the 3-D batched-heads form
drops H into B (``[B*H, S, D]``). Scale factors and masks may come in any order and number
(eager: ``QK*s + mask``; T5: ``QK + bias``; SDPA decomposition: scales on Q and K before the
MatMul, then ``+ mask``), so the steps form a chain rather than a list of fixed sequences.
"""

from __future__ import annotations

from xattn_compiler.pattern import REST, Any, Chain, Op, Or, Scalar

#: Elementwise steps between the score MatMul and Softmax.
SCORE_STEPS = (
    Op("Cast", REST),
    Op("Reshape", REST, Any()),  # batched heads [B*H,S,S] unbatched around a [B,1,S,S] mask
    Op("Div", REST, Scalar("score_div*")),
    Op("Mul", REST, Scalar("score_mul*"), commutative=True),
    Op("Add", REST, Any("mask*"), commutative=True, name="mask_add*"),
    Op("Where", Any("mask_cond*"), REST, Any("mask_fill*"), name="mask_where*"),
    Op("Where", Any("mask_cond*"), Any("mask_fill*"), REST, name="mask_where*"),
)

#: Steps between Softmax and the context MatMul. The Where(IsNaN) guard is HF's SDPA export
#: zeroing fully masked rows.
PROBS_STEPS = (
    Op("Cast", REST),
    Op("Where", Op("IsNaN", Any()), Any(), REST),
    Op("Dropout", REST, ...),
    Op("Identity", REST),
)

SCORES_BHSS = Op("MatMul", Any("q"), Any("k_t"), name="scores")


def softmax_over_last_axis(node) -> bool:
    axis = node.attrs.get("axis", -1)
    rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


SOFTMAX = Op("Softmax", Chain(SCORE_STEPS, until=SCORES_BHSS, max_steps=6), name="softmax",
             check=softmax_over_last_axis)
PROBS_BHSS = Chain(PROBS_STEPS, until=SOFTMAX, max_steps=4)

#: The whole core, matched upward from the context MatMul's output.
ATTENTION_CORE = Op("MatMul", PROBS_BHSS, Any("v"), name="context")

#: Ops that may stand between Softmax and the context MatMul (for the downward anchor walk).
PROBS_OPS = frozenset({"Cast", "Where", "Dropout", "Identity", "IsNaN"})

__all__ = ["ATTENTION_CORE", "PROBS_OPS", "SCORE_STEPS", "SOFTMAX", "Or"]
