"""BART (transformers): the decoder alone, and encoder + decoder in one graph.

The decoder variants take ``input_ids`` [batch, seq] and ``encoder_hidden_states``
[batch, enc_len, d_model]; cross K/V come from that graph input. ``bart-encoder-decoder`` takes
``input_ids`` [batch, src_len] and ``decoder_input_ids`` [batch, seq]: the encoder runs inside
the graph, so the cross K/V are computed internally from ``input_ids``. BART differs from
Whisper in its post-LN layers, biases on every projection (k included) and learned positions
with an offset of 2.
"""

from __future__ import annotations

import functools
from typing import Any

from ..spec import Attention, Built, ZooModel

SEED = 0
#: Tiny: 2+2 layers, d_model 64, 4 heads of 16; special ids inside the small vocabulary.
SMALL: dict[str, Any] = {
    "vocab_size": 128, "d_model": 64, "encoder_layers": 2, "decoder_layers": 2,
    "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128, "max_position_embeddings": 64, "dropout": 0.0,
    "attention_dropout": 0.0, "activation_dropout": 0.0, "pad_token_id": 1, "bos_token_id": 0,
    "eos_token_id": 2, "decoder_start_token_id": 2, "forced_eos_token_id": 2,
}
#: BART-base: 6+6 layers, d_model 768, 12 heads of 64, FFN 3072, vocab 50265.
BENCH: dict[str, Any] = {
    **SMALL, "vocab_size": 50265, "d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
    "encoder_attention_heads": 12, "decoder_attention_heads": 12, "encoder_ffn_dim": 3072,
    "decoder_ffn_dim": 3072, "max_position_embeddings": 1024,
}
CONFIGS = {"small": SMALL, "bench": BENCH}
#: Sample (batch, seq, enc_len or src_len), all different so a mixed-up dim shows.
SAMPLE_SHAPES = {"small": (2, 5, 12), "bench": (2, 16, 256)}


def _config(size: str, attn_implementation: str) -> Any:
    from transformers import BartConfig

    return BartConfig(**CONFIGS[size], attn_implementation=attn_implementation)


@functools.cache
def _wrapper_classes() -> tuple[type, type]:
    """Decoder + tied head, and the seq2seq model returning logits only (need torch)."""
    import torch
    from torch import nn
    from torch.nn import functional

    class BartDecoderLM(nn.Module):
        """``forward(input_ids, encoder_hidden_states) -> logits``."""

        def __init__(self, decoder: nn.Module, vocab_size: int) -> None:
            super().__init__()
            self.decoder = decoder
            # BartForConditionalGeneration's final_logits_bias, a buffer as there; non-zero so
            # that a rewrite dropping it changes the logits.
            generator = torch.Generator().manual_seed(SEED)
            self.register_buffer("final_logits_bias",
                                 0.1 * torch.randn(1, vocab_size, generator=generator))

        def forward(self, input_ids, encoder_hidden_states):
            hidden = self.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                                  use_cache=False, return_dict=True).last_hidden_state
            logits = functional.linear(hidden, self.decoder.embed_tokens.weight)
            return logits + self.final_logits_bias

    class BartSeq2SeqLM(nn.Module):
        """``forward(input_ids, decoder_input_ids) -> logits``: encoder and decoder in one."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, decoder_input_ids):
            return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids,
                              use_cache=False, return_dict=True).logits

    return BartDecoderLM, BartSeq2SeqLM


def _token_ids(size: str, shape: tuple[int, int], generator: Any) -> Any:
    import torch

    return torch.randint(0, CONFIGS[size]["vocab_size"], shape, generator=generator)


def build_decoder(size: str, attn_implementation: str) -> Built:
    """BART decoder + tied head and logits bias at ``size``."""
    import torch
    from transformers.models.bart.modeling_bart import BartDecoder

    from ..export import randomize_parameters

    fields = CONFIGS[size]
    torch.manual_seed(SEED)
    decoder = BartDecoder(_config(size, attn_implementation))
    randomize_parameters(decoder, SEED)
    module = _wrapper_classes()[0](decoder, fields["vocab_size"]).eval()
    batch, seq, enc_len = SAMPLE_SHAPES[size]
    generator = torch.Generator().manual_seed(SEED)
    inputs = {
        "input_ids": _token_ids(size, (batch, seq), generator),
        "encoder_hidden_states": torch.randn(batch, enc_len, fields["d_model"],
                                             generator=generator),
    }
    layers, heads = fields["decoder_layers"], fields["decoder_attention_heads"]
    return Built(
        module=module, inputs=inputs, output_names=["logits"],
        attention=Attention(self=layers, cross=layers, num_heads=heads,
                            head_dim=fields["d_model"] // heads),
        static_inputs=["encoder_hidden_states"],
        dynamic_dims={"input_ids": {0: "batch", 1: "seq"},
                      "encoder_hidden_states": {0: "batch", 1: "enc_len"}},
        config={**fields, "attn_implementation": attn_implementation,
                "class": "transformers BartDecoder + tied lm_head + final_logits_bias"},
    )


def build_encoder_decoder(size: str, attn_implementation: str = "sdpa") -> Built:
    """BartForConditionalGeneration (encoder + decoder + head) as one graph, logits only."""
    import torch
    from transformers import BartForConditionalGeneration

    from ..export import randomize_parameters

    fields = CONFIGS[size]
    torch.manual_seed(SEED)
    model = BartForConditionalGeneration(_config(size, attn_implementation))
    randomize_parameters(model, SEED)
    with torch.no_grad():  # a buffer, so randomize_parameters leaves it at zero
        model.final_logits_bias.normal_(std=0.1, generator=torch.Generator().manual_seed(SEED))
    module = _wrapper_classes()[1](model).eval()
    batch, seq, src_len = SAMPLE_SHAPES[size]
    generator = torch.Generator().manual_seed(SEED)
    inputs = {"input_ids": _token_ids(size, (batch, src_len), generator),
              "decoder_input_ids": _token_ids(size, (batch, seq), generator)}
    heads = fields["decoder_attention_heads"]
    return Built(
        module=module, inputs=inputs, output_names=["logits"],
        attention=Attention(self=fields["encoder_layers"] + fields["decoder_layers"],
                            cross=fields["decoder_layers"], num_heads=heads,
                            head_dim=fields["d_model"] // heads),
        # The cross K/V depend on this graph input only (through the encoder).
        static_inputs=["input_ids"],
        kv_source_kind="internal",
        dynamic_dims={"input_ids": {0: "batch", 1: "src_len"},
                      "decoder_input_ids": {0: "batch", 1: "seq"}},
        config={**fields, "attn_implementation": attn_implementation,
                "class": "transformers BartForConditionalGeneration"},
    )


def _decoder_eager(size: str) -> Built:
    return build_decoder(size, "eager")


def _decoder_sdpa(size: str) -> Built:
    return build_decoder(size, "sdpa")


def _encoder_decoder(size: str) -> Built:
    return build_encoder_decoder(size, "sdpa")


_REQUIRES = ("torch", "transformers")
_SIZES = ("small", "bench")
MODELS = (
    ZooModel("bart-decoder-eager", "bart",
             "BART decoder + tied head, eager attention: post-LN, biased q/k/v",
             _decoder_eager, sizes=_SIZES, requires=_REQUIRES, tags=("encoder-decoder", "decoder")),
    ZooModel("bart-decoder-sdpa", "bart",
             "BART decoder + tied head, SDPA attention", _decoder_sdpa, sizes=_SIZES,
             requires=_REQUIRES, tags=("encoder-decoder", "decoder")),
    ZooModel("bart-encoder-decoder", "bart",
             "BART encoder + decoder + head in one graph (SDPA): cross K/V computed inside "
             "from input_ids", _encoder_decoder, sizes=_SIZES, requires=_REQUIRES,
             tags=("encoder-decoder", "internal-kv")),
)
