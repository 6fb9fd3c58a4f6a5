"""Whisper's decoder (transformers) with its tied vocab projection, no KV cache.

Graph inputs ``input_ids`` [batch, seq] and ``encoder_hidden_states`` [batch, enc_len, d_model],
output ``logits`` [batch, seq, vocab]. Every decoder layer holds causal self-attention and
cross-attention whose K/V come from ``encoder_hidden_states`` alone. The encoder is not built:
only the decoder and the projection (Whisper's ``proj_out`` is tied to ``embed_tokens``).
"""

from __future__ import annotations

import functools
from typing import Any

from ..spec import Attention, Built, ZooModel

SEED = 0
#: Tiny: 2 layers, d_model 64, 4 heads of 16. The special ids must fit the small vocabulary and
#: the suppress lists name ids of the real one, so they are dropped.
SMALL: dict[str, Any] = {
    "vocab_size": 128, "d_model": 64, "decoder_layers": 2, "decoder_attention_heads": 4,
    "decoder_ffn_dim": 256, "encoder_layers": 1, "encoder_attention_heads": 4,
    "encoder_ffn_dim": 256, "num_mel_bins": 16, "max_source_positions": 32,
    "max_target_positions": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "decoder_start_token_id": 1, "suppress_tokens": None, "begin_suppress_tokens": None,
}
#: Whisper-base's decoder: 6 layers, d_model 512, 8 heads of 64, FFN 2048, the full 51865 vocab
#: (the embedding is 106 MB in fp32; the export stays far below 2 GB).
BENCH: dict[str, Any] = {
    **SMALL, "vocab_size": 51865, "d_model": 512, "decoder_layers": 6,
    "decoder_attention_heads": 8, "decoder_ffn_dim": 2048, "encoder_attention_heads": 8,
    "encoder_ffn_dim": 2048, "num_mel_bins": 80, "max_source_positions": 1500,
    "max_target_positions": 448, "pad_token_id": 50257, "bos_token_id": 50257,
    "eos_token_id": 50257, "decoder_start_token_id": 50258,
}
CONFIGS = {"small": SMALL, "bench": BENCH}
#: Sample (batch, seq, enc_len): all different so a mixed-up dim shows; bench uses Whisper's
#: real encoder length of 1500 frames.
SAMPLE_SHAPES = {"small": (2, 5, 12), "bench": (2, 16, 1500)}
DYNAMIC_DIMS = {"input_ids": {0: "batch", 1: "seq"},
                "encoder_hidden_states": {0: "batch", 1: "enc_len"}}


@functools.cache
def _wrapper_class() -> type:
    """The decoder + tied projection module; defined lazily because it needs torch."""
    from torch import nn
    from torch.nn import functional

    class WhisperDecoderLM(nn.Module):
        """``forward(input_ids, encoder_hidden_states) -> logits``."""

        def __init__(self, decoder: nn.Module) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, input_ids, encoder_hidden_states):
            hidden = self.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                                  use_cache=False, return_dict=True).last_hidden_state
            # Whisper's proj_out shares embed_tokens' weight and has no bias.
            return functional.linear(hidden, self.decoder.embed_tokens.weight)

    return WhisperDecoderLM


def build_decoder(size: str, attn_implementation: str) -> Built:
    """Whisper decoder + tied vocab head at ``size`` with the given attention implementation."""
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    from ..export import randomize_parameters

    fields = CONFIGS[size]
    config = WhisperConfig(**fields, attn_implementation=attn_implementation)
    torch.manual_seed(SEED)
    decoder = WhisperDecoder(config)
    randomize_parameters(decoder, SEED)
    module = _wrapper_class()(decoder).eval()
    batch, seq, enc_len = SAMPLE_SHAPES[size]
    generator = torch.Generator().manual_seed(SEED)
    inputs = {
        "input_ids": torch.randint(0, fields["vocab_size"], (batch, seq), generator=generator),
        "encoder_hidden_states": torch.randn(batch, enc_len, fields["d_model"],
                                             generator=generator),
    }
    heads, layers = fields["decoder_attention_heads"], fields["decoder_layers"]
    return Built(
        module=module, inputs=inputs, output_names=["logits"],
        attention=Attention(self=layers, cross=layers, num_heads=heads,
                            head_dim=fields["d_model"] // heads),
        static_inputs=["encoder_hidden_states"],
        dynamic_dims={name: dict(axes) for name, axes in DYNAMIC_DIMS.items()},
        config={**fields, "attn_implementation": attn_implementation,
                "class": "transformers.WhisperDecoder + tied proj_out"},
    )


def _eager(size: str) -> Built:
    return build_decoder(size, "eager")


def _sdpa(size: str) -> Built:
    return build_decoder(size, "sdpa")


_REQUIRES = ("torch", "transformers")
_TAGS = ("encoder-decoder", "decoder")
MODELS = (
    ZooModel("whisper-decoder-eager", "whisper",
             "Whisper decoder + tied vocab head, eager attention (matmul/softmax spelled out)",
             _eager, sizes=("small", "bench"), requires=_REQUIRES, tags=_TAGS),
    ZooModel("whisper-decoder-sdpa", "whisper",
             "Whisper decoder + tied vocab head, SDPA attention (scaled_dot_product_attention)",
             _sdpa, sizes=("small", "bench"), requires=_REQUIRES, tags=_TAGS),
    ZooModel("whisper-decoder-sdpa-opset23", "whisper",
             "Whisper decoder + tied vocab head, SDPA attention exported at opset 23",
             _sdpa, opset=23, sizes=("small", "bench"), requires=_REQUIRES, tags=_TAGS),
    ZooModel("whisper-decoder-fp16", "whisper",
             "Whisper decoder + tied vocab head in float16, SDPA attention",
             _sdpa, dtype="float16", sizes=("small", "bench"), requires=_REQUIRES, tags=_TAGS),
)
