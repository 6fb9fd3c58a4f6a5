"""``torch.nn.Transformer``: encoder and decoder in one graph, with a source padding mask.

The cross-attention K/V are projections of the encoder's output, so they depend on the
source ``src`` and on its padding mask ``src_pad`` (the encoder's self-attention reads it);
``src_pad`` also masks the cross-attention scores directly. Inputs: ``tgt`` (per step),
``src`` and ``src_pad`` (per context). A split must name both context inputs; ``src`` alone
determines no K/V. Kept apart from :mod:`.torch_nn` because its boolean input is a mask of the
source length, not a control-flow flag, which that family's tests assume of boolean inputs.
"""

from __future__ import annotations

import functools

from ..spec import Attention, Built, ZooModel
from .torch_nn import BATCH, D_MODEL, FFN, LAYERS, MEM_LEN, NHEAD, SEED, TGT_LEN


@functools.cache
def _transformer_class() -> type:
    from torch import nn

    class PaddedTransformer(nn.Module):
        """``nn.Transformer`` with a source padding mask and the causal mask made in forward."""

        def __init__(self):
            super().__init__()
            self.transformer = nn.Transformer(
                D_MODEL, NHEAD, num_encoder_layers=LAYERS, num_decoder_layers=LAYERS,
                dim_feedforward=FFN, dropout=0.0, batch_first=True)

        def forward(self, tgt, src, src_pad):
            mask = nn.Transformer.generate_square_subsequent_mask(
                tgt.shape[1], device=tgt.device, dtype=tgt.dtype)
            return self.transformer(src, tgt, tgt_mask=mask, src_key_padding_mask=src_pad,
                                    memory_key_padding_mask=src_pad, tgt_is_causal=False)

    return PaddedTransformer


def build_transformer(size: str) -> Built:
    """Encoder and decoder in one graph: ``src`` and its padding mask ``src_pad`` reach the
    cross-attention K/V only through the encoder (its self-attention reads them too)."""
    import torch

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"nn.Transformer has only the 'small' size, not {size!r}")
    torch.manual_seed(SEED)
    module = _transformer_class()()
    randomize_parameters(module, SEED)
    module.eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    src_pad = torch.zeros(BATCH, MEM_LEN, dtype=torch.bool)
    src_pad[1, MEM_LEN - 3:] = True  # the second sequence is shorter
    src = torch.randn(BATCH, MEM_LEN, D_MODEL, generator=gen)
    inputs = {"tgt": torch.randn(BATCH, TGT_LEN, D_MODEL, generator=gen), "src": src,
              "src_pad": src_pad}
    dims = {"tgt": {0: "batch", 1: "tgt_len"}, "src": {0: "batch", 1: "src_len"},
            "src_pad": {0: "batch", 1: "src_len"}}
    return Built(
        module=module, inputs=inputs, output_names=["out"],
        attention=Attention(self=2 * LAYERS, cross=LAYERS, num_heads=NHEAD,
                            head_dim=D_MODEL // NHEAD),
        # Only src feeds nothing but the K/V; src_pad also masks the cross-attention scores.
        static_inputs=["src"], dynamic_dims=dims, kv_source_kind="internal",
        config={"d_model": D_MODEL, "nhead": NHEAD, "dim_feedforward": FFN,
                "num_encoder_layers": LAYERS, "num_decoder_layers": LAYERS, "dropout": 0.0,
                "batch_first": True, "tgt_mask": "causal, built in forward",
                "src_key_padding_mask": "src_pad", "memory_key_padding_mask": "src_pad",
                "context_inputs": ["src", "src_pad"]},
        notes=["The cross-attention K/V are projections of the encoder's output (memory), "
               "which src and src_pad feed; src_pad also masks the cross-attention, so the "
               "default split-kv (src alone) moves no K/V and is refused: split with "
               "--static-inputs src,src_pad (config context_inputs)."])


MODELS: tuple[ZooModel, ...] = (
    ZooModel("nn-transformer-padded", "torch-nn",
             "torch.nn.Transformer (encoder + decoder), 2+2 layers, d_model 64, 4 heads, "
             "batch_first=True, source padding mask input src_pad, causal mask in forward",
             build_transformer, exporter="dynamo", opset=18,
             tags=("encoder-decoder", "internal-kv", "explicit-static-inputs")),
)
