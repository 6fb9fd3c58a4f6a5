"""``ort-mha``: ONNX Runtime's ``com.microsoft.MultiHeadAttention``, one node per block.

    out_BSE = MultiHeadAttention(q_BSE, k_BSE, v_BSE, , , [bias_BHSS], num_heads=H, scale=a)

Q, K and V go in as the projection outputs ``[B, S, H*D]`` their head splits
(``Reshape [B,S,H,D]`` then ``Transpose``) read, so the splits go with the core. Where a split
is not that (Q: ``Q = Reshape(Transpose(q_BHSD, [0,2,1,3]), [0,0,-1])`` is built; K and V:
both stay ``[B, H, Sk, D]``, which the op accepts too). A mask becomes the additive
``attention_bias`` (keep conditions as ``Where(keep, 0, fill)``), expanded to ``[., ., Sq, Sk]``.
When the block merges its heads the usual way (``Transpose(0,2,1,3)`` then a Reshape to
``[B, Sq, H*D]``), the op's output is the block's output directly; otherwise it is split back
into the core's ``[B, H, Sq, D]`` context and the block's own merge follows.

The op has no ``softmax_precision``: a Softmax that ran in float32 inside an fp16 block stays
unfused rather than lose that precision. GQA (fewer K/V heads) is left alone too.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.attention import AttentionMatch

from .base import FusionTarget, register_target
from .operands import (
    CorePlan,
    Editor,
    plan_core,
    split_sources,
    static_dim,
)

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
        if plan.batched:
            # [B*H,S,D]: B*H rows of one head; K/V as [B*H,1,S,D].
            heads, q_bse = 1, plan.q
            k = edit.batched_like(edit.key(plan.k_t), plan.q, "key_batched", plan.k_t)
            v = edit.batched_like(plan.v, plan.q, "value_batched")
            axis = edit.const("head_axis", np.array([1], np.int64))
            k = edit.node("Unsqueeze", [k, axis], "key_rows", dtype=k.dtype)
            v = edit.node("Unsqueeze", [v, axis], "value_rows", dtype=v.dtype)
        else:
            heads = int(block.num_heads)
            q_source, k_source, v_source = split_sources(plan)
            q_bse = self._query(edit, plan, heads, q_source)
            k, v, k_len = self._key_value(edit, plan, heads, k_source, v_source)
        empty = gs.Variable.empty()
        inputs = [q_bse, k, v, empty, empty]
        mask = edit.additive_mask(plan, plan.dtype)
        if mask is not None:
            # Lengths from what the op reads: a Shape of the core's Q or K^T would keep the
            # head split the op made unnecessary.
            lengths = None if plan.batched else ((q_bse, 1), k_len)
            inputs.append(edit.full_mask(mask, plan, lengths))
        out = edit.node("MultiHeadAttention", inputs, "attention", domain=MS_DOMAIN,
                        dtype=plan.context.dtype, num_heads=heads, scale=float(plan.folded_scale))
        if plan.batched:
            edit.take_over(plan.context_node, out)
        else:
            edit.merged_output(out, block, plan, heads)
        return edit.added


    @staticmethod
    def _query(edit: Editor, plan: CorePlan, heads: int, source) -> gs.Tensor:
        """Q as [B, Sq, H*D]: the projection output the head split read, else Q merged."""
        if source is not None and source[1] == heads:
            return source[0]
        q_bshd = edit.node("Transpose", [plan.q], "query_BSHD", dtype=plan.q.dtype,
                           perm=[0, 2, 1, 3])
        return edit.node("Reshape", [q_bshd, edit.const("query_shape",
                                                        np.array([0, 0, -1], np.int64))],
                         "query_BSE", dtype=plan.q.dtype)

    @staticmethod
    def _key_value(edit: Editor, plan: CorePlan, heads: int, k_source, v_source
                   ) -> tuple[gs.Tensor, gs.Tensor, tuple[gs.Tensor, int]]:
        """K and V as the op takes them: both [B, Sk, H*D] when both are head splits of
        projection outputs (the splits go), else both [B, H, Sk, D]; and where Sk is read."""
        if k_source is not None and v_source is not None and k_source[1] == v_source[1] == heads:
            return (edit.batched_like(k_source[0], plan.q, "key_batched"),
                    edit.batched_like(v_source[0], plan.q, "value_batched"), (k_source[0], 1))
        k = edit.batched_like(edit.key(plan.k_t), plan.q, "key_batched", plan.k_t)
        return k, edit.batched_like(plan.v, plan.q, "value_batched"), (k, 2)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
