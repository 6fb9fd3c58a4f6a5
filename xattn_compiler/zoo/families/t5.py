"""T5's decoder stack (transformers) with its tied, rescaled vocab head, no KV cache.

Graph inputs ``input_ids`` [batch, seq] and ``encoder_hidden_states`` [batch, enc_len, d_model],
output ``logits``. T5 differs from Whisper/BART where a matcher is most likely to trip: no
1/sqrt(d) scaling of the scores, a relative position bias (computed once from bucketed
positions and added in every self-attention), RMS-style layer norms, projections without
biases, and a zero bias tensor added in the cross-attentions.
"""

from __future__ import annotations

import functools
from typing import Any

from ..spec import Attention, Built, ZooModel

SEED = 0
#: Tiny: 2 decoder layers, d_model 64, 4 heads of d_kv 16.
SMALL: dict[str, Any] = {
    "vocab_size": 128, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
    "num_decoder_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.0, "feed_forward_proj": "relu",
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}
#: T5-base's decoder: 12 layers, d_model 768, 12 heads of 64, d_ff 3072, vocab 32128.
BENCH: dict[str, Any] = {
    **SMALL, "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12,
    "num_decoder_layers": 12, "num_heads": 12,
}
CONFIGS = {"small": SMALL, "bench": BENCH}
#: Sample (batch, seq, enc_len), all different so a mixed-up dim shows.
SAMPLE_SHAPES = {"small": (2, 5, 12), "bench": (2, 16, 512)}
DYNAMIC_DIMS = {"input_ids": {0: "batch", 1: "seq"},
                "encoder_hidden_states": {0: "batch", 1: "enc_len"}}


@functools.cache
def _wrapper_class() -> type:
    """The decoder stack + tied head; defined lazily because it needs torch."""
    from torch import nn
    from torch.nn import functional

    class T5DecoderLM(nn.Module):
        """``forward(input_ids, encoder_hidden_states) -> logits``."""

        def __init__(self, stack: nn.Module, d_model: int) -> None:
            super().__init__()
            self.decoder = stack
            self.output_scale = d_model**-0.5

        def forward(self, input_ids, encoder_hidden_states):
            hidden = self.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                                  use_cache=False, return_dict=True).last_hidden_state
            # T5 with tied embeddings rescales before the head, as T5ForConditionalGeneration.
            return functional.linear(hidden * self.output_scale, self.decoder.embed_tokens.weight)

    return T5DecoderLM


def _fold_score_scale_into_queries(stack: Any, d_kv: int) -> None:
    """Scale every query projection by d_kv**-0.5, as T5's own init does.

    T5 never scales its scores; its init (and training) puts the 1/sqrt(d_kv) into the query
    weights instead. Without it, unit-variance random weights give scores of std ~sqrt(d_kv)
    and a saturated softmax whose rounding noise eats most of the fp32 tolerance at bench
    size. The graph still has no scaling op: only the weights change.
    """
    import torch

    with torch.no_grad():
        for name, param in stack.named_parameters():
            if name.endswith(".q.weight"):
                param.mul_(d_kv**-0.5)


def build_decoder(size: str, attn_implementation: str) -> Built:
    """T5 decoder stack + head at ``size`` with the given attention implementation."""
    import torch
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Stack

    from ..export import randomize_parameters

    fields = CONFIGS[size]
    # The decoder's own config, as T5ForConditionalGeneration derives it.
    config = T5Config(**fields, is_decoder=True, is_encoder_decoder=False, use_cache=False,
                      attn_implementation=attn_implementation)
    config.num_layers = fields["num_decoder_layers"]
    torch.manual_seed(SEED)
    stack = T5Stack(config)
    randomize_parameters(stack, SEED)
    _fold_score_scale_into_queries(stack, fields["d_kv"])
    module = _wrapper_class()(stack, fields["d_model"]).eval()
    batch, seq, enc_len = SAMPLE_SHAPES[size]
    generator = torch.Generator().manual_seed(SEED)
    inputs = {
        "input_ids": torch.randint(0, fields["vocab_size"], (batch, seq), generator=generator),
        "encoder_hidden_states": torch.randn(batch, enc_len, fields["d_model"],
                                             generator=generator),
    }
    layers = fields["num_decoder_layers"]
    return Built(
        module=module, inputs=inputs, output_names=["logits"],
        attention=Attention(self=layers, cross=layers, num_heads=fields["num_heads"],
                            head_dim=fields["d_kv"]),
        static_inputs=["encoder_hidden_states"],
        dynamic_dims={name: dict(axes) for name, axes in DYNAMIC_DIMS.items()},
        config={**fields, "attn_implementation": attn_implementation, "attention_scale": 1.0,
                "class": "transformers T5Stack (decoder) + tied, rescaled lm_head"},
    )


def _eager(size: str) -> Built:
    return build_decoder(size, "eager")


def _sdpa(size: str) -> Built:
    return build_decoder(size, "sdpa")


_REQUIRES = ("torch", "transformers")
_TAGS = ("encoder-decoder", "decoder", "unscaled-attention", "position-bias")
MODELS = (
    ZooModel("t5-decoder-eager", "t5",
             "T5 decoder stack + tied head, eager attention: no score scaling, relative "
             "position bias", _eager, sizes=("small", "bench"), requires=_REQUIRES, tags=_TAGS),
)

#: Variants left out of MODELS because they do not export, with the error (checked by
#: tests/zoo, which fail when one starts to export so it can be added).
#: SDPA with T5's float position-bias mask: after torch.export decomposes
#: scaled_dot_product_attention, the attention output reaches the merge-heads view still
#: transposed (non-contiguous) and the view to [batch, seq, d_model] fails, with static shapes
#: too (torch 2.13; the same error as pytorch/pytorch#136543 and #141107).
KNOWN_FAILURES = {
    "t5-decoder-sdpa": (_sdpa, "ValueError: Cannot view a tensor with shape"),
}
