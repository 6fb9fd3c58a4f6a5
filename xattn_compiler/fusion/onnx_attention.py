"""``onnx-attention``: the ONNX ``Attention`` op (opset 23), one node per block.

    qkv-layout=4d (default)
    context_BHSD = Attention(q_BHSD, k_BHSD, v_BHSD, [mask], scale=a, q_num_heads=H,
                             kv_num_heads=Hkv, [softmax_precision=FLOAT])
    qkv-layout=3d
    out_BSE      = Attention(q_BSE, k_BSE, v_BSE, [mask], scale=a, q_num_heads=H,
                             kv_num_heads=Hkv, [softmax_precision=FLOAT])

With ``4d`` Q, K and V stay 4-D (a core left on batched heads ``[B*H,S,D]`` runs as
``[B*H,1,S,D]``, one head per row, Unsqueezed in and Squeezed out) and the projections and head
split/merge stay outside the op: what TensorRT 10.14's parser turns into ``IAttention`` (no
past inputs, one output, a 4-D mask) and what ONNX Runtime and ``onnx.reference`` run on CPU.

With ``3d`` the op reads the projection outputs ``[B, S, H*D]`` that the head splits
(``Reshape [B,S,H,D]`` then ``Transpose``) read, and its ``[B, Sq, H*D]`` output replaces the
standard head merge, so a block keeps no Reshape or Transpose of its own (the op splits and
merges heads by its attributes). A block whose Q, K and V are not all such splits, or whose
context is not merged that way (read in head layout, where 3-D would add a split back), is
fused 4-D. ONNX Runtime and newer TensorRT parsers take 3-D inputs; ``lint-trt`` warns about them.

Scales on Q and K are folded into ``scale`` where nothing else reads them; a mask is the keep
conditions as a bool tensor, or the float terms (plus keep conditions as
``Where(keep, 0, fill)``) cast to Q's type, expanded to ``[., ., Sq, Sk]``. A Softmax that ran
in float32 inside an fp16 block keeps float32 through ``softmax_precision``.

The model's default-domain opset goes to 23 when it is lower (``prepare``), and only when
some block will be fused.

What the node never carries, because TensorRT's parser rejects it (the rules are
:mod:`xattn_compiler.backends.trt_attention_rules`): past/present inputs and outputs (a KV
cache's Concat stays outside and the node reads the full K/V), softcap, qk_matmul_output_mode,
and ``is_causal`` (a causal condition travels in the mask, so no decode step over a
concatenated cache meets TensorRT's top-left causal alignment). A block inside an ``If``
branch is left unfused: TensorRT does not build Attention there (NVIDIA/TensorRT#4739);
``--specialize`` the condition to inline the branch and fuse it.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.attention import AttentionMatch
from xattn_compiler.errors import InputError

from .base import FusionTarget, register_target
from .operands import (
    CorePlan,
    Editor,
    constant_heads_merged,
    plan_core,
    split_sources,
    standard_merge,
    static_dim,
)
from .opset import ATTENTION_OPSET, upgrade_opset

LAYOUTS = ("4d", "3d")
# A body path through an If's branch attribute (ir.iter_graphs spells them "/node/then_branch").
_IF_BRANCH = re.compile(r"/(then|else)_branch(\[\d+\])?(/|$)")


@register_target
class OnnxAttentionTarget(FusionTarget):
    """Each block becomes one ONNX ``Attention`` node on [B,H,S,D] operands."""

    name = "onnx-attention"
    description = "ONNX Attention (opset 23): TensorRT 10.14+, ONNX Runtime"

    def __init__(self, options):
        super().__init__(options)
        self.layout = self.options.get("qkv_layout") or "4d"
        if self.layout not in LAYOUTS:
            raise InputError(f"fuse-attention: qkv-layout must be one of {', '.join(LAYOUTS)}, "
                             f"not {self.layout!r}")

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        return upgrade_opset(model, ATTENTION_OPSET)

    def skip_reason(self, block: AttentionMatch) -> str | None:
        if _IF_BRANCH.search(block.subgraph):
            return ("inside an If branch, where TensorRT does not build Attention "
                    "(NVIDIA/TensorRT#4739); specialize the condition (--specialize NAME=VALUE) "
                    "to inline the branch and fuse it")
        plan = plan_core(block)
        return plan if isinstance(plan, str) else None

    def fuse(self, block: AttentionMatch) -> list[gs.Node]:
        plan = plan_core(block)
        assert isinstance(plan, CorePlan)  # skip_reason said so
        edit = Editor(block.graph, f"{block.id}_attention")
        edit.fold_scales(plan)
        if self.layout == "3d" and not plan.batched and standard_merge(block, plan) is not None:
            sources = _projections(plan)
            if sources is not None:
                return _fuse_3d(edit, block, plan, *sources)
        heads, kv_heads = static_dim(plan.q, 1), static_dim(plan.k_t, 1)
        k, v = edit.key(plan.k_t), plan.v
        # GQA exported as repeat_kv: the op reads the unrepeated K/V with kv_num_heads.
        (k_src, k_heads), (v_src, v_heads) = edit.unrepeat(k, heads), edit.unrepeat(v, heads)
        if k_heads and k_heads == v_heads:
            k, v, kv_heads = k_src, v_src, k_heads
        k = edit.batched_like(k, plan.q, "key_batched", plan.k_t)
        v = edit.batched_like(v, plan.q, "value_batched")
        # Sq and Sk are read from Q and K as the op gets them: a Shape of K^T would keep the
        # K^T Transpose alive next to the K the op reads.
        axis = plan.seq_axes[0]
        mask = _mask(edit, plan, lengths=((plan.q, axis), (k, axis)))
        attrs: dict = {"scale": float(plan.folded_scale)}
        if plan.softmax_dtype != plan.dtype:
            attrs["softmax_precision"] = int(plan.softmax_dtype)
        if plan.batched:
            return _fuse_batched(edit, plan, [plan.q, k, v], mask, attrs)
        # With 4-D operands the op reads the head counts from the shapes; the attributes are
        # written only where shapes confirm them (a wrong one fails at run time).
        if heads and kv_heads:
            attrs.update(q_num_heads=heads, kv_num_heads=kv_heads)
        out = edit.node("Attention", [plan.q, k, v, *mask], "attention", dtype=plan.context.dtype,
                        **attrs)
        edit.take_over(plan.context_node, out)
        return edit.added


def _fuse_batched(edit: Editor, plan: CorePlan, qkv: list[gs.Tensor], mask: list[gs.Tensor],
                  attrs: dict) -> list[gs.Node]:
    """A core on batched heads ``[B*H, S, D]`` as one head of each row: ``[B*H, 1, S, D]``.
    The 4-D form is the one TensorRT's parser documents (3-D operands need a parser that
    reshapes them with the num_heads attributes); the mask is already ``[B*H, 1, Sq, Sk]``."""
    axis = edit.const("head_axis", np.array([1], np.int64))
    operands = [edit.node("Unsqueeze", [t, axis], f"{name}_one_head", dtype=t.dtype)
                for t, name in zip(qkv, ("query", "key", "value"), strict=True)]
    out = edit.node("Attention", [*operands, *mask], "attention", dtype=plan.context.dtype,
                    **attrs)
    context = edit.node("Squeeze", [out, axis], "context_rows", dtype=plan.context.dtype)
    edit.take_over(plan.context_node, context)
    return edit.added


def _mask(edit: Editor, plan: CorePlan, lengths=None) -> list[gs.Tensor]:
    """The op's mask input, if the block has one: the float terms (keep conditions folded in),
    else the keep conditions as a bool tensor; [., ., Sq, Sk] with Sq, Sk read from ``lengths``."""
    if plan.terms:
        mask = edit.additive_mask(plan, plan.dtype)
    elif plan.keeps:
        mask = edit.keep_mask(plan)
    else:
        return []
    return [edit.full_mask(mask, plan, lengths)]


def _projections(plan: CorePlan) -> tuple[gs.Tensor, Any, Any, int, int] | None:
    """``(q, k, v, H, Hkv)``: the [B, S, heads*D] tensors Q, K and V were split from (K and V
    of a constant context: their values, laid out so), when all three are such with head
    counts the op can take."""
    q, k, v = split_sources(plan)
    k = k or constant_heads_merged(plan.k_t, key=True)
    v = v or constant_heads_merged(plan.v, key=False)
    if q is None or k is None or v is None or k[1] != v[1] or q[1] % k[1] or q[2] != k[2]:
        return None
    return q[0], k[0], v[0], q[1], k[1]


def _fuse_3d(edit: Editor, block: AttentionMatch, plan: CorePlan, q: gs.Tensor, k, v,
             heads: int, kv_heads: int) -> list[gs.Node]:
    if isinstance(k, np.ndarray):
        k = edit.weight("key_BSE", k)
    if isinstance(v, np.ndarray):
        v = edit.weight("value_BSE", v)
    inputs = [q, edit.batched_like(k, plan.q, "key_batched"),
              edit.batched_like(v, plan.q, "value_batched"),
              *_mask(edit, plan, lengths=((q, 1), (k, 1)))]
    attrs: dict = {"scale": float(plan.folded_scale), "q_num_heads": heads,
                   "kv_num_heads": kv_heads}
    if plan.softmax_dtype != plan.dtype:
        attrs["softmax_precision"] = int(plan.softmax_dtype)
    out = edit.node("Attention", inputs, "attention", dtype=plan.context.dtype, **attrs)
    edit.merged_output(out, block, plan, heads)
    return edit.added
