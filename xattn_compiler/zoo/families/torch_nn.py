"""``torch.nn.TransformerDecoder``: cross-attention as spelled by ``nn.MultiheadAttention``.

Two decoder layers (d_model 64, 4 heads of 16, feed-forward 128, dropout 0) read ``tgt`` and
``memory``; the causal ``tgt_mask`` is built inside ``forward`` from ``tgt``'s length (with
``nn.Transformer.generate_square_subsequent_mask``), so the graph inputs are just ``tgt`` and
``memory`` and the sequence length stays dynamic. ``memory`` feeds only the cross-attention K/V.

``nn.MultiheadAttention`` has an inference fast path (``torch._native_multi_head_attention``),
but it is taken only for self-attention with ``query is key is value`` and no float mask; the
decoder's self-attention carries the float causal mask and its cross-attention has distinct
query and key, so neither takes it and the exports show the ordinary ``in_proj`` spelling.

This module also holds the hand-written attention blocks the other plain-torch families reuse
(:func:`plain_blocks`); like everything in the zoo they import torch only when called.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

from ..spec import Attention, Built, ZooModel

D_MODEL, NHEAD, FFN, LAYERS = 64, 4, 128, 2
#: Sample shapes: batch, target length, memory length and width all differ.
BATCH, TGT_LEN, MEM_LEN = 2, 5, 12
SEED = 0


@functools.cache
def plain_blocks() -> SimpleNamespace:
    """Hand-written attention modules in plain ops, scriptable by ``torch.jit.script``.

    Returns a namespace with ``MultiHeadAttention(d_model, num_heads)`` (separate q/k/v/out
    ``nn.Linear``; ``forward(query, key, value)`` on batch-first tensors; scores scaled by
    ``head_dim**-0.5`` after ``Q @ K^T``, so the graph shows MatMul -> Mul/Div -> Softmax) and
    ``CrossBlock(d_model, num_heads, ffn)`` (pre-norm self-attention, cross-attention into a
    context, feed-forward; ``forward(x, context)``). Classes are made on first call so that
    importing this module does not import torch.
    """
    import torch
    from torch import nn

    class MultiHeadAttention(nn.Module):
        """Attention with explicit reshape/transpose/matmul/softmax (no SDPA)."""

        def __init__(self, d_model: int, num_heads: int):
            super().__init__()
            self.num_heads = num_heads
            self.head_dim = d_model // num_heads
            self.scale = float(self.head_dim) ** -0.5
            self.q_proj = nn.Linear(d_model, d_model)
            self.k_proj = nn.Linear(d_model, d_model)
            self.v_proj = nn.Linear(d_model, d_model)
            self.out_proj = nn.Linear(d_model, d_model)

        def _heads(self, x: torch.Tensor) -> torch.Tensor:
            # [B, S, H*D] -> [B, H, S, D]; -1 keeps the sequence length symbolic.
            return x.reshape(x.size(0), -1, self.num_heads, self.head_dim).transpose(1, 2)

        def forward(self, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor) -> torch.Tensor:
            q = self._heads(self.q_proj(query))
            k = self._heads(self.k_proj(key))
            v = self._heads(self.v_proj(value))
            weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)
            out = torch.matmul(weights, v).transpose(1, 2)
            return self.out_proj(out.reshape(out.size(0), -1, self.num_heads * self.head_dim))

    class CrossBlock(nn.Module):
        """Pre-norm block: self-attention, cross-attention into ``context``, feed-forward."""

        def __init__(self, d_model: int, num_heads: int, ffn: int):
            super().__init__()
            self.norm1 = nn.LayerNorm(d_model)
            self.self_attn = MultiHeadAttention(d_model, num_heads)
            self.norm2 = nn.LayerNorm(d_model)
            self.cross_attn = MultiHeadAttention(d_model, num_heads)
            self.norm3 = nn.LayerNorm(d_model)
            self.ffn = nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model))

        def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            h = self.norm1(x)
            x = x + self.self_attn(h, h, h)
            x = x + self.cross_attn(self.norm2(x), context, context)
            return x + self.ffn(self.norm3(x))

    return SimpleNamespace(MultiHeadAttention=MultiHeadAttention, CrossBlock=CrossBlock)


@functools.cache
def _decoder_class() -> type:
    from torch import nn

    class CausalDecoder(nn.Module):
        """``nn.TransformerDecoder`` with the causal mask made from ``tgt``'s length."""

        def __init__(self, batch_first: bool):
            super().__init__()
            self.batch_first = batch_first
            layer = nn.TransformerDecoderLayer(D_MODEL, NHEAD, dim_feedforward=FFN, dropout=0.0,
                                               batch_first=batch_first)
            self.decoder = nn.TransformerDecoder(layer, LAYERS, norm=nn.LayerNorm(D_MODEL))

        def forward(self, tgt, memory):
            length = tgt.shape[1] if self.batch_first else tgt.shape[0]
            mask = nn.Transformer.generate_square_subsequent_mask(
                length, device=tgt.device, dtype=tgt.dtype)
            # tgt_is_causal=False: left as None, torch compares the mask with a fresh causal
            # mask (torch.equal), a data-dependent branch torch.export cannot trace; True
            # would drop the mask and use SDPA's is_causal instead.
            return self.decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=False)

    return CausalDecoder


def build_decoder(size: str, batch_first: bool, static_lengths: bool = False) -> Built:
    """Two-layer ``nn.TransformerDecoder``; ``batch_first`` picks [B, S, D] or [S, B, D].

    ``static_lengths`` keeps only the batch dynamic. The TorchScript exporter needs it: MHA's
    packed in-projection (``q is k is v`` in self-attention, ``k is v`` in cross-attention)
    goes through ``unflatten``, whose traced sizes are Python ints, so the exported Reshapes
    bake the sample's tgt_len and mem_len even when the axes are declared dynamic.
    """
    import torch

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"nn.TransformerDecoder has only the 'small' size, not {size!r}")
    torch.manual_seed(SEED)
    module = _decoder_class()(batch_first)
    randomize_parameters(module, SEED)
    module.eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    if batch_first:
        tgt_shape, mem_shape = (BATCH, TGT_LEN, D_MODEL), (BATCH, MEM_LEN, D_MODEL)
        dims = {"tgt": {0: "batch", 1: "tgt_len"}, "memory": {0: "batch", 1: "mem_len"}}
    else:
        tgt_shape, mem_shape = (TGT_LEN, BATCH, D_MODEL), (MEM_LEN, BATCH, D_MODEL)
        dims = {"tgt": {0: "tgt_len", 1: "batch"}, "memory": {0: "mem_len", 1: "batch"}}
    inputs = {"tgt": torch.randn(tgt_shape, generator=gen),
              "memory": torch.randn(mem_shape, generator=gen)}
    notes = ["Causal tgt_mask built inside forward from tgt's length (not a graph input).",
             "MHA fast path not taken: float causal mask on self-attention, query is not "
             "key in cross-attention; in_proj_weight is packed [3*d, d]."]
    if static_lengths:
        dims = {name: {axis: dim for axis, dim in axes.items() if dim == "batch"}
                for name, axes in dims.items()}
        notes.append(f"tgt_len ({TGT_LEN}) and mem_len ({MEM_LEN}) are static: the "
                     "TorchScript exporter bakes them into MHA's head-split Reshapes.")
    return Built(
        module=module, inputs=inputs, output_names=["out"],
        attention=Attention(self=LAYERS, cross=LAYERS, num_heads=NHEAD,
                            head_dim=D_MODEL // NHEAD),
        static_inputs=["memory"], dynamic_dims=dims, kv_source_kind="graph_input",
        config={"d_model": D_MODEL, "nhead": NHEAD, "dim_feedforward": FFN,
                "num_layers": LAYERS, "dropout": 0.0, "batch_first": batch_first,
                "final_norm": True, "tgt_mask": "causal, built in forward"},
        notes=notes)


#: Context width of the time-major blocks: not d_model, so cross-attention's K/V projections
#: are separate weights (``kdim``/``vdim``), not the packed in-projection.
CTX_DIM = 24


@functools.cache
def _time_major_class() -> type:
    from torch import nn

    class TimeMajorBlock(nn.Module):
        """Self-attention then cross-attention with ``nn.MultiheadAttention`` in its default
        sequence-first layout ([S, B, E]; heads as [S, B*H, D] transposed to [B*H, S, D])."""

        def __init__(self):
            super().__init__()
            self.norm1 = nn.LayerNorm(D_MODEL)
            self.self_attn = nn.MultiheadAttention(D_MODEL, NHEAD)
            self.norm2 = nn.LayerNorm(D_MODEL)
            self.cross_attn = nn.MultiheadAttention(D_MODEL, NHEAD, kdim=CTX_DIM, vdim=CTX_DIM)

        def forward(self, x, context):
            h = self.norm1(x)
            # need_weights=False: torch computes the core with SDPA; the cross-attention's
            # default (True) takes the explicit bmm/softmax/bmm path and returns averaged
            # weights, which this block drops as most callers do.
            x = x + self.self_attn(h, h, h, need_weights=False)[0]
            return x + self.cross_attn(self.norm2(x), context, context)[0]

    class TimeMajorStack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(TimeMajorBlock() for _ in range(LAYERS))

        def forward(self, x, context):
            for block in self.blocks:
                x = block(x, context)
            return x

    return TimeMajorStack


def build_time_major(size: str, static_lengths: bool = False) -> Built:
    """``LAYERS`` standalone time-major self+cross blocks of ``nn.MultiheadAttention``;
    ``static_lengths`` for the TorchScript exporter (see :func:`build_decoder`)."""
    import torch

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"time-major MHA has only the 'small' size, not {size!r}")
    torch.manual_seed(SEED)
    module = _time_major_class()()
    randomize_parameters(module, SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    inputs = {"x": torch.randn(TGT_LEN, BATCH, D_MODEL, generator=gen),
              "context": torch.randn(MEM_LEN, BATCH, CTX_DIM, generator=gen)}
    dims = {"x": {0: "seq", 1: "batch"}, "context": {0: "ctx_len", 1: "batch"}}
    notes = ["batch_first=False: inputs are [seq, batch, width]; the MHA fast path needs "
             "batch_first, so neither attention takes it."]
    if static_lengths:
        dims = {name: {1: "batch"} for name in dims}
        notes.append(f"seq ({TGT_LEN}) and ctx_len ({MEM_LEN}) are static: the TorchScript "
                     "exporter bakes them into MHA's head-split Reshapes.")
    return Built(
        module=module.eval(), inputs=inputs, output_names=["out"],
        attention=Attention(self=LAYERS, cross=LAYERS, num_heads=NHEAD,
                            head_dim=D_MODEL // NHEAD),
        static_inputs=["context"], dynamic_dims=dims, kv_source_kind="graph_input",
        config={"d_model": D_MODEL, "nhead": NHEAD, "kdim": CTX_DIM, "vdim": CTX_DIM,
                "layers": LAYERS, "batch_first": False,
                "need_weights": {"self": False, "cross": True}},
        notes=notes)


_time_major = build_time_major
_time_major_static = functools.partial(build_time_major, static_lengths=True)
_batch_first = functools.partial(build_decoder, batch_first=True)
_seq_first = functools.partial(build_decoder, batch_first=False)
_batch_first_static = functools.partial(build_decoder, batch_first=True, static_lengths=True)
_seq_first_static = functools.partial(build_decoder, batch_first=False, static_lengths=True)


_DESC = "torch.nn.TransformerDecoder, 2 layers, d_model 64, 4 heads, causal mask in forward"
MODELS: tuple[ZooModel, ...] = (
    ZooModel("nn-transformer-decoder-batch-first", "torch-nn", _DESC + ", batch_first=True",
             _batch_first, exporter="dynamo", opset=18, tags=("encoder-decoder",)),
    ZooModel("nn-transformer-decoder-batch-first-torchscript", "torch-nn",
             _DESC + ", batch_first=True, TorchScript exporter, static lengths",
             _batch_first_static,
             exporter="torchscript", opset=17, tags=("encoder-decoder",)),
    ZooModel("nn-transformer-decoder-seq-first", "torch-nn", _DESC + ", batch_first=False",
             _seq_first, exporter="dynamo", opset=18, tags=("encoder-decoder",)),
    ZooModel("nn-transformer-decoder-seq-first-torchscript", "torch-nn",
             _DESC + ", batch_first=False, TorchScript exporter, static lengths",
             _seq_first_static,
             exporter="torchscript", opset=17, tags=("encoder-decoder",)),
    ZooModel("nn-transformer-decoder-fp16", "torch-nn", _DESC + ", batch_first=True, float16",
             _batch_first, exporter="dynamo", opset=18, dtype="float16",
             tags=("encoder-decoder", "fp16")),
    ZooModel("nn-mha-time-major", "torch-nn",
             "nn.MultiheadAttention, batch_first=False, 2 self+cross blocks ([S, B*H, D] "
             "heads), cross K/V from a 24-wide context", _time_major, exporter="dynamo",
             opset=18),
    ZooModel("nn-mha-time-major-torchscript", "torch-nn",
             "nn.MultiheadAttention, batch_first=False, 2 self+cross blocks, TorchScript "
             "exporter, static lengths", _time_major_static, exporter="torchscript",
             opset=17),
)

