"""``canonical``: no fused op; each block's core in the one form TensorRT's Myelin fuses.

    scores_BHSS  = MatMul(Mul(q_BHSD, a), k_BHDS)          the whole scale on Q, before
    logits_BHSS  = [Cast(fp32)] -> [Add(scores, mask)]       one additive mask (keep conditions
    probs_BHSS   = Softmax(logits) -> [Cast back]            as Where(keep, 0, fill))
                   -> [Where(IsNaN(p), 0, p)]                the exporter's guard, if it had one
    context_BHSD = MatMul(probs, v_BHSD)

That is the pattern TensorRT before 10.14 recognises as multi-head attention (it needs Q or K
scaled before the first MatMul and nothing else between the MatMuls). Casts around Softmax stay
where the block ran Softmax in float32 (precision first; ``guard-precision`` pins it for the
build), and so does the IsNaN guard, which decides what fully masked rows hold.

A block already in this form is left as it is (so a second run changes nothing). An ONNX
``Attention`` node (opset 23) is taken apart into the same form, for TensorRT before 10.14:
4-D inputs, no past, no causal flag or softcap, as many K/V heads as Q heads.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.attention import AttentionMatch
from xattn_compiler.passes.reshapes import onnx_dtype
from xattn_compiler.patterns.steps import Cast, MaskAdd

from .base import FusionTarget, register_target
from .operands import CorePlan, Editor, plan_core, static_dim


@register_target
class CanonicalTarget(FusionTarget):
    """Each block's core rebuilt as MatMul(q*s, K^T) -> [Add mask] -> Softmax -> MatMul(., v)."""

    name = "canonical"
    description = "MatMul-Softmax-MatMul with the scale on Q: TensorRT's own MHA fusion (< 10.14)"
    rewrites_fused = True

    def skip_reason(self, block: AttentionMatch) -> str | None:
        if block.fused:
            return _attention_problem(block)
        plan = plan_core(block)
        if isinstance(plan, str):
            return plan
        if plan.batched:
            return ("the core runs on batched heads [B*H,S,D] (remove-layout-clutter's "
                    "collapse-batched-heads puts it on [B,H,S,D])")
        if is_canonical(plan):
            return "already in the canonical form"
        return None

    def fuse(self, block: AttentionMatch) -> list[gs.Node]:
        if block.fused:
            return _take_apart(block)
        plan = plan_core(block)
        assert isinstance(plan, CorePlan)  # skip_reason said so
        edit = Editor(block.graph, f"{block.id}_canonical")
        edit.fold_scales(plan)
        mask = edit.additive_mask(plan, plan.softmax_dtype)
        context = build_core(edit, plan.q, plan.k_t, plan.v, scale=plan.folded_scale, mask=mask,
                             dtype=plan.dtype, softmax_dtype=plan.softmax_dtype,
                             guard=plan.guarded, out_dtype=plan.context.dtype)
        edit.take_over(plan.context_node, context)
        return edit.added


def is_canonical(plan: CorePlan) -> bool:
    """Nothing but Casts and at most one Add between the score MatMul and Softmax."""
    return (all(isinstance(step, (Cast, MaskAdd)) for step in plan.chain)
            and sum(isinstance(step, MaskAdd) for step in plan.chain) <= 1)


def build_core(edit: Editor, q: gs.Tensor, k_t: gs.Tensor, v: gs.Tensor, *, scale: float,
               mask: gs.Tensor | None, dtype: int, softmax_dtype: int, guard: bool,
               out_dtype) -> gs.Tensor:
    """The canonical core's nodes; returns the context tensor."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    if scale != 1.0:
        q = edit.node("Mul", [q, edit.const("scale", np.array(scale, np_dtype))], "q_scaled",
                      dtype=np_dtype)
    scores = edit.node("MatMul", [q, k_t], "scores", dtype=np_dtype)
    logits = edit.cast(scores, softmax_dtype, "scores_cast")
    if mask is not None:
        logits = edit.node("Add", [logits, edit.cast(mask, softmax_dtype, "mask_cast")], "masked",
                           dtype=logits.dtype)
    probs = edit.node("Softmax", [logits], "probs", dtype=logits.dtype, axis=-1)
    probs = edit.cast(probs, dtype, "probs_cast")
    if guard:
        nan = edit.node("IsNaN", [probs], "probs_nan", dtype=np.bool_)
        probs = edit.node("Where", [nan, edit.const("zero", np.array(0, np_dtype)), probs],
                          "probs_guarded", dtype=np_dtype)
    return edit.node("MatMul", [probs, v], "context", dtype=out_dtype)


# --- ONNX Attention taken apart ------------------------------------------------------------------

def _attention_problem(block: AttentionMatch) -> str | None:
    node = block.nodes[0]
    if (node.domain or "") not in ("", "ai.onnx") or node.op != "Attention":
        return f"already fused as {block.op}; canonical takes apart only ONNX Attention"
    if len(node.inputs) > 4 and any(t.name for t in node.inputs[4:]):
        return f"Attention '{node.name}' has past or padding inputs"
    if any(t.outputs for t in node.outputs[1:]):
        return f"Attention '{node.name}' has more than one used output"
    for attr, default in (("is_causal", 0), ("softcap", 0.0)):
        if node.attrs.get(attr, default) != default:
            return f"Attention '{node.name}' sets {attr}"
    q, k, v = node.inputs[:3]
    if any(t.shape is None or len(t.shape) != 4 for t in (q, k, v)):
        return f"Attention '{node.name}' does not have 4-D Q, K and V"
    if static_dim(q, 1) is None or static_dim(q, 1) != static_dim(k, 1):
        return f"Attention '{node.name}' has fewer (or unknown) K/V heads than Q heads"
    if node.attrs.get("scale") is None and static_dim(q, 3) is None:
        return f"Attention '{node.name}' scales by 1/sqrt(D) with D unknown"
    if onnx_dtype(q) is None:
        return f"Attention '{node.name}' has a Q of unknown type"
    return None


def _take_apart(block: AttentionMatch) -> list[gs.Node]:
    node = block.nodes[0]
    q, k, v = node.inputs[:3]
    dtype = onnx_dtype(q)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    scale = node.attrs.get("scale")
    if scale is None:
        scale = 1.0 / float(np.sqrt(static_dim(q, 3)))
    softmax_dtype = node.attrs.get("softmax_precision") or dtype
    edit = Editor(block.graph, f"{block.id}_canonical")
    k_t = edit.node("Transpose", [k], "key_t", dtype=k.dtype, perm=[0, 1, 3, 2])
    mask = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if mask is not None and onnx_dtype(mask) == onnx.TensorProto.BOOL:
        mask = edit.node("Where", [mask, edit.const("zero", np.array(0, np_dtype)),
                                   edit.const("fill", np.array(-np.inf, np_dtype))],
                         "mask", dtype=np_dtype)
    # ONNX Runtime's Attention gives 0 for a row with no key to attend; the guard keeps that.
    context = build_core(edit, q, k_t, v, scale=float(scale), mask=mask, dtype=dtype,
                         softmax_dtype=int(softmax_dtype), guard=mask is not None,
                         out_dtype=node.outputs[0].dtype)
    edit.take_over(node, context)
    return edit.added
