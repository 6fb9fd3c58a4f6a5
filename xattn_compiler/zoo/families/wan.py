"""diffusers ``WanTransformer3DModel`` (Wan 2.1 video DiT): RoPE self-attention and
cross-attention into a text context in every block.

Each ``WanTransformerBlock`` holds ``attn1`` (self-attention over the patchified video tokens,
Q and K RMS-normalised across heads and then given 3-D rotary embeddings in the interleaved
form: ``unflatten(-1, (-1, 2)).unbind(-1)`` and a strided write-back) and ``attn2``
(cross-attention into the projected ``encoder_hidden_states``, no rotary embedding). The
rotary tables are computed from the input's shape, so Q and K of ``attn1`` reach the core
through different tensors derived from one activation.

Graph inputs ``hidden_states`` [batch, 4, frames, h, w], ``timestep`` int64 [batch] and
``encoder_hidden_states`` [batch, text_len, text_dim]; output ``sample``. Batch and text length
are dynamic; the video grid stays static (the patchify view needs h and w divisible by 2).
``encoder_hidden_states`` feeds only the cross-attention K/V projections.
"""

from __future__ import annotations

import functools
from typing import Any

from ..spec import Attention, Built, ZooModel

SEED = 0
#: Tiny Wan: 2 blocks of 2 heads of 16 (the rotary dims split 16 into t=8, h=4, w=4), text
#: width 24, FFN 64; channels, text width and model width all differ.
SMALL: dict[str, Any] = {
    "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 16,
    "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 32, "ffn_dim": 64,
    "num_layers": 2, "rope_max_seq_len": 32,
}
#: Sample (batch, frames, height, width, text_len): 2 x 3 x 2 = 12 video tokens, 7 text tokens.
SAMPLE_SHAPES = {"small": (2, 2, 6, 4, 7)}
DYNAMIC_DIMS = {"hidden_states": {0: "batch"}, "timestep": {0: "batch"},
                "encoder_hidden_states": {0: "batch", 1: "text_len"}}


@functools.cache
def _wrapper_class() -> type:
    """``forward(hidden_states, timestep, encoder_hidden_states) -> sample``; lazy (torch)."""
    from torch import nn

    class WanSample(nn.Module):
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, hidden_states, timestep, encoder_hidden_states):
            return self.model(hidden_states, timestep, encoder_hidden_states,
                              return_dict=False)[0]

    return WanSample


def build(size: str) -> Built:
    """The tiny Wan transformer with seeded random weights."""
    import torch
    from diffusers import WanTransformer3DModel

    from ..export import randomize_parameters

    torch.manual_seed(SEED)
    model = WanTransformer3DModel(**SMALL)
    randomize_parameters(model, SEED)
    batch, frames, height, width, text_len = SAMPLE_SHAPES[size]
    generator = torch.Generator().manual_seed(SEED)
    inputs = {
        "hidden_states": torch.randn(batch, SMALL["in_channels"], frames, height, width,
                                     generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_len, SMALL["text_dim"],
                                             generator=generator),
    }
    layers = SMALL["num_layers"]
    return Built(
        module=_wrapper_class()(model).eval(), inputs=inputs, output_names=["sample"],
        attention=Attention(self=layers, cross=layers, num_heads=SMALL["num_attention_heads"],
                            head_dim=SMALL["attention_head_dim"]),
        static_inputs=["encoder_hidden_states"],
        dynamic_dims={name: dict(axes) for name, axes in DYNAMIC_DIMS.items()},
        kv_source_kind="graph_input",
        config={**SMALL, "class": "diffusers WanTransformer3DModel"},
    )


MODELS = (
    ZooModel("wan-transformer", "wan",
             "Wan 2.1 video DiT (diffusers): RoPE self-attention with QK RMSNorm and "
             "cross-attention into the text context", build,
             requires=("torch", "diffusers"), tags=("dit", "rope", "cross-attention")),
)
