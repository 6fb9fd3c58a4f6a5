"""Attention written with ``torch.einsum``: the exporter keeps every einsum as an ONNX ``Einsum``.

* ``ldm-transformer-einsum``: two CompVis/latent-diffusion ``BasicTransformerBlock``s (self-
  attention, cross-attention into ``context``, feed-forward). Their ``CrossAttention`` is written
  as ``ldm/modules/attention.py`` writes it, with einops' ``rearrange`` spelled as reshape/
  permute (the same ops in the export): heads folded into the batch, ``einsum('b i d, b j d ->
  b i j', q, k) * scale``, softmax, ``einsum('b i j, b j d -> b i d', attn, v)``.
* ``einsum-head-merge``: DenseGeneral-style attention (Flax/T5X ports, some DiT and lucidrains
  code): per-head projection weights ``einsum('bnd,dhk->bhnk')``, scores ``'bhik,bhjk->bhij'``,
  ``'bhij,bhjk->bhik'`` and the output projection merging the heads, ``'bhnk,hke->bne'`` (two
  contracted labels). Self-attention then cross-attention into ``context``.
* ``prophetnet-einsum``: transformers' ``ProphetNetForConditionalGeneration``; every attention
  uses ``einsum``. Per decoder layer the n-gram self-attention holds two cores: the main stream
  and the predict streams (all n-grams batched in one 5-D core ``[batch, ngram, heads, seq,
  2*seq]``, K/V = main stream's K/V concatenated with the stream's own; ``fold-batch-axes``
  runs it on ``[batch*ngram, heads, ...]`` so it fuses); each reads the one Q/K/V projection,
  chunked by stream.

Inputs ``x`` [batch, seq, dim] and ``context`` [batch, ctx_len, ctx_dim] (ProphetNet:
``input_ids`` [batch, src_len] and ``decoder_input_ids`` [batch, tgt_len]).
"""

from __future__ import annotations

import functools
from typing import Any

from ..spec import Attention, Built, ZooModel
from .bart import _wrapper_classes

SEED = 0
#: query width, context width, heads, head width, blocks: all differ so a mixed-up dim shows.
DIM, CTX_DIM, HEADS, HEAD_DIM, DEPTH = 32, 24, 4, 8, 2
BATCH, SEQ, CTX_LEN = 2, 10, 7
DYNAMIC_DIMS = {"x": {0: "batch", 1: "seq"}, "context": {0: "batch", 1: "ctx_len"}}
#: Tiny ProphetNet: 1 encoder and 1 decoder layer, 4 heads of 8, 2-gram prediction.
PROPHETNET_SMALL: dict[str, Any] = {
    "vocab_size": 100, "hidden_size": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "num_encoder_layers": 1, "num_decoder_layers": 1, "num_encoder_attention_heads": 4,
    "num_decoder_attention_heads": 4, "max_position_embeddings": 64, "ngram": 2,
    "num_buckets": 8, "relative_max_distance": 16,
}


@functools.cache
def _ldm_classes() -> tuple[type, type]:
    """LDM's ``CrossAttention`` and ``BasicTransformerBlock`` (lazy: they need torch)."""
    import torch
    from torch import nn

    class CrossAttention(nn.Module):
        def __init__(self, query_dim, context_dim=None, heads=8, dim_head=64):
            super().__init__()
            inner_dim = dim_head * heads
            context_dim = query_dim if context_dim is None else context_dim
            self.scale = dim_head ** -0.5
            self.heads = heads
            self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
            self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
            self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

        def forward(self, x, context=None):
            h = self.heads
            q = self.to_q(x)
            context = x if context is None else context
            k = self.to_k(context)
            v = self.to_v(context)
            # rearrange(t, 'b n (h d) -> (b h) n d', h=h)
            q, k, v = (t.reshape(t.shape[0], t.shape[1], h, -1).permute(0, 2, 1, 3)
                       .reshape(t.shape[0] * h, t.shape[1], -1) for t in (q, k, v))
            sim = torch.einsum("b i d, b j d -> b i j", q, k) * self.scale
            attn = sim.softmax(dim=-1)
            out = torch.einsum("b i j, b j d -> b i d", attn, v)
            # rearrange(out, '(b h) n d -> b n (h d)', h=h)
            out = out.reshape(-1, h, out.shape[1], out.shape[2]).permute(0, 2, 1, 3)
            out = out.reshape(out.shape[0], out.shape[1], -1)
            return self.to_out(out)

    class BasicTransformerBlock(nn.Module):
        def __init__(self, dim, n_heads, d_head, context_dim):
            super().__init__()
            self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head)
            self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
            self.attn2 = CrossAttention(dim, context_dim, heads=n_heads, dim_head=d_head)
            self.norm1 = nn.LayerNorm(dim)
            self.norm2 = nn.LayerNorm(dim)
            self.norm3 = nn.LayerNorm(dim)

        def forward(self, x, context=None):
            x = self.attn1(self.norm1(x)) + x
            x = self.attn2(self.norm2(x), context=context) + x
            return self.ff(self.norm3(x)) + x

    return CrossAttention, BasicTransformerBlock


@functools.cache
def _dense_general_classes() -> tuple[type, type]:
    """Attention with per-head weight tensors, every product an einsum."""
    import torch
    from torch import nn

    class DenseGeneralAttention(nn.Module):
        def __init__(self, dim, context_dim, heads, head_dim):
            super().__init__()
            self.scale = head_dim ** -0.5
            self.wq = nn.Parameter(torch.empty(dim, heads, head_dim))
            self.wk = nn.Parameter(torch.empty(context_dim, heads, head_dim))
            self.wv = nn.Parameter(torch.empty(context_dim, heads, head_dim))
            self.wo = nn.Parameter(torch.empty(heads, head_dim, dim))
            self.bo = nn.Parameter(torch.zeros(dim))

        def forward(self, x, context):
            q = torch.einsum("bnd,dhk->bhnk", x, self.wq)
            k = torch.einsum("bmd,dhk->bhmk", context, self.wk)
            v = torch.einsum("bmd,dhk->bhmk", context, self.wv)
            scores = torch.einsum("bhik,bhjk->bhij", q, k) * self.scale
            out = torch.einsum("bhij,bhjk->bhik", scores.softmax(dim=-1), v)
            return torch.einsum("bhnk,hke->bne", out, self.wo) + self.bo

    class Block(nn.Module):
        def __init__(self, dim, context_dim, heads, head_dim):
            super().__init__()
            self.norm1 = nn.LayerNorm(dim)
            self.self_attn = DenseGeneralAttention(dim, dim, heads, head_dim)
            self.norm2 = nn.LayerNorm(dim)
            self.cross_attn = DenseGeneralAttention(dim, context_dim, heads, head_dim)

        def forward(self, x, context):
            h = self.norm1(x)
            x = x + self.self_attn(h, h)
            return x + self.cross_attn(self.norm2(x), context)

    return DenseGeneralAttention, Block


@functools.cache
def _stack_class() -> type:
    from torch import nn

    class Stack(nn.Module):
        """``DEPTH`` blocks reading the same context, then a norm."""

        def __init__(self, blocks):
            super().__init__()
            self.blocks = nn.ModuleList(blocks)
            self.norm = nn.LayerNorm(DIM)

        def forward(self, x, context):
            for block in self.blocks:
                x = block(x, context)
            return self.norm(x)

    return Stack


def _build_stack(size: str, make_block, config: dict[str, Any]) -> Built:
    import torch

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"einsum attention has only the 'small' size, not {size!r}")
    torch.manual_seed(SEED)
    module = _stack_class()([make_block() for _ in range(DEPTH)])
    randomize_parameters(module, SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    inputs = {"x": torch.randn(BATCH, SEQ, DIM, generator=gen),
              "context": torch.randn(BATCH, CTX_LEN, CTX_DIM, generator=gen)}
    return Built(
        module=module.eval(), inputs=inputs, output_names=["out"],
        attention=Attention(self=DEPTH, cross=DEPTH, num_heads=HEADS, head_dim=HEAD_DIM),
        static_inputs=["context"],
        dynamic_dims={name: dict(axes) for name, axes in DYNAMIC_DIMS.items()},
        kv_source_kind="graph_input",
        config={"dim": DIM, "context_dim": CTX_DIM, "heads": HEADS, "head_dim": HEAD_DIM,
                "depth": DEPTH, **config})


def build_ldm(size: str) -> Built:
    """Two LDM ``BasicTransformerBlock``s with einsum ``CrossAttention``."""
    _, block = _ldm_classes()
    return _build_stack(size, lambda: block(DIM, HEADS, HEAD_DIM, CTX_DIM),
                        {"class": "CompVis ldm.modules.attention.BasicTransformerBlock"})


def build_head_merge(size: str) -> Built:
    """Two self+cross blocks of DenseGeneral (per-head weight) einsum attention."""
    _, block = _dense_general_classes()
    return _build_stack(size, lambda: block(DIM, CTX_DIM, HEADS, HEAD_DIM),
                        {"class": "DenseGeneral einsum attention, 'bhnk,hke->bne' merge"})


@functools.cache
def _prophetnet_wrapper() -> type:
    """ProphetNet without a cache, returning the main stream's logits: the same
    ``forward(input_ids, decoder_input_ids) -> logits`` wrapper as BART's seq2seq entry."""
    return _wrapper_classes()[1]


def build_prophetnet(size: str) -> Built:
    """``ProphetNetForConditionalGeneration`` from ``PROPHETNET_SMALL``, eager attention."""
    import torch
    from transformers import ProphetNetConfig, ProphetNetForConditionalGeneration

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"prophetnet has only the 'small' size, not {size!r}")
    fields = PROPHETNET_SMALL
    torch.manual_seed(SEED)
    model = ProphetNetForConditionalGeneration(ProphetNetConfig(**fields))
    randomize_parameters(model, SEED)
    gen = torch.Generator().manual_seed(SEED)
    inputs = {"input_ids": torch.randint(3, fields["vocab_size"], (BATCH, 7), generator=gen),
              "decoder_input_ids": torch.randint(3, fields["vocab_size"], (BATCH, 5),
                                                 generator=gen)}
    enc, dec = fields["num_encoder_layers"], fields["num_decoder_layers"]
    heads = fields["num_decoder_attention_heads"]
    return Built(
        module=_prophetnet_wrapper()(model).eval(), inputs=inputs, output_names=["logits"],
        # main stream and predict streams are two cores per decoder layer
        attention=Attention(self=enc + 2 * dec, cross=dec, num_heads=heads,
                            head_dim=fields["hidden_size"] // heads),
        # the encoder reads input_ids alone, and only the cross K/V read the encoder
        static_inputs=["input_ids"], kv_source_kind="internal",
        dynamic_dims={"input_ids": {0: "batch", 1: "src_len"},
                      "decoder_input_ids": {0: "batch", 1: "tgt_len"}},
        config={**fields, "class": "transformers ProphetNetForConditionalGeneration"},
        notes=["per decoder layer: main-stream and predict-stream (n-gram) self-attention "
               "cores, both counted as self; then the cross-attention"])


_TAGS = ("einsum",)
MODELS: tuple[ZooModel, ...] = (
    ZooModel("ldm-transformer-einsum", "einsum",
             "CompVis LDM BasicTransformerBlock x2: torch.einsum CrossAttention, heads folded "
             "into the batch, self and cross into a context", build_ldm, tags=_TAGS),
    ZooModel("einsum-head-merge", "einsum",
             "DenseGeneral attention x2 (self, cross): per-head einsum projections and a "
             "'bhnk,hke->bne' head merge", build_head_merge, tags=_TAGS),
    ZooModel("prophetnet-einsum", "einsum",
             "transformers ProphetNetForConditionalGeneration (einsum attention, n-gram "
             "main/predict streams), 1+1 layers", build_prophetnet,
             requires=("torch", "transformers"), tags=(*_TAGS, "encoder-decoder")),
)
