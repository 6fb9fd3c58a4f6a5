"""``ort-mha``: ONNX Runtime's ``com.microsoft.MultiHeadAttention``, one node per block.

    q_BSE        = Reshape(Transpose(q_BHSD, [0,2,1,3]), [0, 0, -1])
    out_BSE      = MultiHeadAttention(q_BSE, k_BHSD, v_BHSD, , , [bias_BHSS],
                                      num_heads=H, scale=a)

The query is 3-D ([B, Sq, H*D]); K and V go in as [B, H, Sk, D], which the op accepts for
cross and self attention alike. A mask becomes the additive ``attention_bias`` (keep
conditions as ``Where(keep, 0, fill)``), expanded to ``[., ., Sq, Sk]``. When the block merges
its heads the usual way (``Transpose(0,2,1,3)`` then a Reshape to ``[B, Sq, H*D]``), the op's
output is the block's output directly; otherwise it is split back into the core's
``[B, H, Sq, D]`` context and the block's own merge follows.

The op has no ``softmax_precision``: a Softmax that ran in float32 inside an fp16 block stays
unfused rather than lose that precision. GQA (fewer K/V heads) is left alone too.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.attention import AttentionMatch
from xattn_compiler.passes.reshapes import same_dim
from xattn_compiler.rewrite import transpose_perm

from .base import FusionTarget, register_target
from .operands import CorePlan, Editor, plan_core, static_dim

MS_DOMAIN = "com.microsoft"


@register_target
class OrtMultiHeadAttentionTarget(FusionTarget):
    """Each block becomes one com.microsoft MultiHeadAttention node (ONNX Runtime)."""

    name = "ort-mha"
    description = "com.microsoft MultiHeadAttention (ONNX Runtime CPU/CUDA)"

    def skip_reason(self, block: AttentionMatch) -> str | None:
        plan = plan_core(block)
        if isinstance(plan, str):
            return plan
        if plan.softmax_dtype != plan.dtype:
            return ("the Softmax runs in a wider type than Q; MultiHeadAttention has no "
                    "softmax_precision to keep it")
        if plan.batched:
            return None
        heads = static_dim(plan.q, 1)
        if heads is None or heads != block.num_heads:
            return "MultiHeadAttention needs the head count as a number, and Q's shape does not give it"
        if (block.num_kv_heads or heads) != heads:
            return "K/V have fewer heads than Q (GQA); MultiHeadAttention takes equal counts"
        return None

    def finish(self, model: onnx.ModelProto) -> onnx.ModelProto:
        if any(n.domain == MS_DOMAIN for n in _all_nodes(model.graph)) and \
                not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
        return model

    def fuse(self, block: AttentionMatch) -> list[gs.Node]:
        plan = plan_core(block)
        assert isinstance(plan, CorePlan)  # skip_reason said so
        edit = Editor(block.graph, f"{block.id}_mha")
        edit.fold_scales(plan)
        k = edit.batched_like(edit.key(plan.k_t), plan.q, "key_batched", plan.k_t)
        v = edit.batched_like(plan.v, plan.q, "value_batched")
        if plan.batched:
            # [B*H,S,D]: B*H rows of one head; K/V as [B*H,1,S,D].
            heads, q_bse = 1, plan.q
            axis = edit.const("head_axis", np.array([1], np.int64))
            k = edit.node("Unsqueeze", [k, axis], "key_rows", dtype=k.dtype)
            v = edit.node("Unsqueeze", [v, axis], "value_rows", dtype=v.dtype)
        else:
            heads = int(block.num_heads)
            q_bshd = edit.node("Transpose", [plan.q], "query_BSHD", dtype=plan.q.dtype,
                               perm=[0, 2, 1, 3])
            q_bse = edit.node("Reshape", [q_bshd, edit.const("query_shape",
                                                             np.array([0, 0, -1], np.int64))],
                              "query_BSE", dtype=plan.q.dtype)
        empty = gs.Variable.empty()
        inputs = [q_bse, k, v, empty, empty]
        mask = edit.additive_mask(plan, plan.dtype)
        if mask is not None:
            inputs.append(edit.full_mask(mask, plan))
        out = edit.node("MultiHeadAttention", inputs, "attention", domain=MS_DOMAIN,
                        dtype=plan.context.dtype, num_heads=heads, scale=float(plan.folded_scale))
        merged = None if plan.batched else _standard_merge(block, plan)
        if plan.batched:
            edit.take_over(plan.context_node, out)
        elif merged is not None:
            edit.take_over(merged, out)
        else:
            head_dim = static_dim(plan.context, 3) or -1
            split = edit.node("Reshape", [out, edit.const("split_shape",
                                                          np.array([0, 0, heads, head_dim], np.int64))],
                              "context_BSHD", dtype=plan.context.dtype)
            context = edit.node("Transpose", [split], "context", dtype=plan.context.dtype,
                                perm=[0, 2, 1, 3])
            edit.take_over(plan.context_node, context)
        return edit.added


def _standard_merge(block: AttentionMatch, plan: CorePlan) -> gs.Node | None:
    """The Reshape ending a ``Transpose(0,2,1,3) -> Reshape [B, Sq, H*D]`` merge of the core's
    context, when the block has exactly that (its output is then what MHA computes)."""
    readers = plan.context.outputs
    if len(readers) != 1 or readers[0].op != "Transpose" or transpose_perm(readers[0]) != [0, 2, 1, 3]:
        return None
    transposed = readers[0].outputs[0]
    if len(transposed.outputs) != 1 or transposed.outputs[0].op != "Reshape":
        return None
    reshape = transposed.outputs[0]
    merged, context = reshape.outputs[0], plan.context
    if merged is not block.output or merged.shape is None or context.shape is None \
            or len(merged.shape) != 3:
        return None
    width = static_dim(context, 1), static_dim(context, 3)
    if None in width or merged.shape[2] != width[0] * width[1]:
        return None
    if not (same_dim(merged.shape[0], context.shape[0]) and same_dim(merged.shape[1], context.shape[2])):
        return None
    return reshape


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
