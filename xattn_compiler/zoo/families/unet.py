"""diffusers ``UNet2DConditionModel``: cross-attention from image tokens into a text context.

Every ``Transformer2DModel`` in the UNet holds one ``BasicTransformerBlock`` per layer with a
self-attention (``attn1``) and a cross-attention (``attn2``) into ``encoder_hidden_states``.
The counts are derived from the config: a ``CrossAttnDownBlock2D`` has ``layers_per_block``
transformers, a ``CrossAttnUpBlock2D`` ``layers_per_block + 1``, ``UNetMidBlock2DCrossAttn``
one, each with ``transformer_layers_per_block`` (here 1) blocks.

diffusers' ``attention_head_dim`` is, for this class, the number of heads (a historical
misnomer diffusers keeps for SD checkpoints); the per-head width is ``channels // heads`` and
so differs per level, which is why the truth lists every block in ``Attention.blocks``.

The graph inputs are ``sample`` [batch, 4, h, w], ``timestep`` int64 [batch] and
``encoder_hidden_states`` [batch, ctx_len, cross_dim]; the output is ``out_sample``. Batch and
``ctx_len`` are dynamic; ``h``/``w`` stay static (down/up-sampling needs them divisible by 2
per level, which torch.export would have to be told). ``encoder_hidden_states`` feeds only the
cross-attention K/V projections.
"""

from __future__ import annotations

import functools
from typing import Any

from ..spec import Attention, Built, ZooModel

SEED = 0
#: Tiny UNet: two levels (32 and 64 channels), one layer each, 4 heads (head widths 8 and 16),
#: context width 24. Heads, head widths, channels and context width all differ so that a
#: mixed-up dim or a transposed projection shows (with 8 heads the 64-channel level would have
#: heads == head_dim, and a context width of 32 would make to_k square at level 0).
SMALL_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 24,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
#: Stable Diffusion 1.5's UNet shape (about 860M parameters), for benchmarks only.
BENCH_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
#: SDXL's UNet shape kept tiny: three levels (the first without attention), two transformer
#: layers per block at the deepest level (and in the mid block), heads per level (32/2 = 16
#: and 64/8 = 8 wide), linear projections in and out of each
#: Transformer2DModel, and the "text_time" added conditioning (pooled text embeds and six
#: time ids: original size, crop, target size) as SDXL feeds it.
SDXL_SMALL: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (1, 2, 8),
    "use_linear_projection": True,
    "cross_attention_dim": 24,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 20 + 6 * 8,   # text_embeds width + 6 time ids
    "norm_num_groups": 8,
}
#: SDXL's pooled text embedding width in SDXL_SMALL, and the six time ids.
SDXL_TEXT_EMBEDS, SDXL_TIME_IDS = 20, 6
#: Sample shapes per size: (batch, height, width, context length). Small: all differ.
#: Small spatial tokens: 10*14 = 140 at level 0, 5*7 = 35 at level 1.
SAMPLE_SHAPES = {"small": (2, 10, 14, 7), "bench": (2, 64, 64, 77)}
#: SDXL small: two down-samplings need sides divisible by 4 (8x12 -> 4x6 -> 2x3 tokens).
SDXL_SAMPLE_SHAPE = (2, 8, 12, 7)


def _per_level(value: Any, levels: int) -> list[Any]:
    """A diffusers argument given once or per level, as a list per level."""
    return list(value) if isinstance(value, (tuple, list)) else [value] * levels


def attention_blocks(config: dict[str, Any]) -> list[dict[str, Any]]:
    """List every attention of a UNet2DConditionModel config in forward order.

    Each entry names the module (``down_blocks.0.attentions.0.transformer_blocks.0.attn2``),
    says whether it is cross-attention and gives its heads and head width. Only the config is
    read, so this is independent ground truth for what the export should contain.
    """
    if (config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn"
            or config.get("num_attention_heads") is not None
            or config.get("reverse_transformer_layers_per_block") is not None
            or not isinstance(config["layers_per_block"], int)):
        raise ValueError("attention_blocks assumes the default cross-attention mid block, heads "
                         "given as attention_head_dim and one layers_per_block")
    channels = config["block_out_channels"]
    levels = len(channels)
    heads = _per_level(config["attention_head_dim"], levels)   # diffusers: heads, despite the name
    layers = _per_level(config.get("transformer_layers_per_block", 1), levels)
    per_block = config["layers_per_block"]
    found: list[dict[str, Any]] = []

    def add(prefix: str, width: int, count: int, level_heads: int, depth: int) -> None:
        for i in range(count):
            for t in range(depth):
                for attn, cross in (("attn1", False), ("attn2", True)):
                    found.append({"name": f"{prefix}.attentions.{i}.transformer_blocks.{t}.{attn}",
                                  "cross": cross, "num_heads": level_heads,
                                  "head_dim": width // level_heads})

    for level, kind in enumerate(config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            add(f"down_blocks.{level}", channels[level], per_block, heads[level], layers[level])
    # UNetMidBlock2DCrossAttn, the default: the deepest level's heads and layers
    add("mid_block", channels[-1], 1, heads[-1], layers[-1])
    for level, kind in enumerate(config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            up = levels - 1 - level     # up blocks run the levels in reverse
            add(f"up_blocks.{level}", channels[up], per_block + 1, heads[up], layers[up])
    return found


def attention_truth(config: dict[str, Any]) -> Attention:
    """The :class:`Attention` truth for a UNet config (heads shared, head widths per block)."""
    blocks = attention_blocks(config)
    cross = sum(b["cross"] for b in blocks)
    widths = {b["head_dim"] for b in blocks}
    heads = {b["num_heads"] for b in blocks}
    return Attention(self=len(blocks) - cross, cross=cross,
                     num_heads=heads.pop() if len(heads) == 1 else None,
                     head_dim=widths.pop() if len(widths) == 1 else None,
                     blocks=tuple(blocks))


@functools.cache
def _wrapper_class() -> type:
    from torch import nn

    class UNetWrapper(nn.Module):
        """Returns the sample tensor instead of diffusers' output dataclass."""

        def __init__(self, unet: nn.Module):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class SDXLWrapper(UNetWrapper):
        """Takes SDXL's added conditions as inputs of their own (``added_cond_kwargs``)."""

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False,
                             added_cond_kwargs={"text_embeds": text_embeds,
                                                "time_ids": time_ids})[0]

    return UNetWrapper, SDXLWrapper


def build_unet(size: str, eager_attention: bool = False) -> Built:
    """UNet2DConditionModel from ``SMALL_CONFIG`` or ``BENCH_CONFIG`` with seeded weights.

    ``eager_attention`` swaps diffusers' default ``AttnProcessor2_0`` (SDPA) for
    ``AttnProcessor`` (explicit ``baddbmm`` + softmax + ``bmm`` on [batch*heads, seq, dim]).
    """
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    from ..export import randomize_parameters

    config = {"small": SMALL_CONFIG, "bench": BENCH_CONFIG}[size]
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**config)
    randomize_parameters(unet, SEED)
    if eager_attention:
        unet.set_attn_processor(AttnProcessor())
    module = _wrapper_class()[0](unet).eval()
    batch, height, width, ctx_len = SAMPLE_SHAPES[size]
    gen = torch.Generator().manual_seed(SEED + 1)
    inputs = {
        "sample": torch.randn(batch, config["in_channels"], height, width, generator=gen),
        "timestep": torch.tensor([10 + 487 * i for i in range(batch)], dtype=torch.int64),
        "encoder_hidden_states": torch.randn(batch, ctx_len, config["cross_attention_dim"],
                                             generator=gen),
    }
    return Built(
        module=module, inputs=inputs, output_names=["out_sample"],
        attention=attention_truth(config), static_inputs=["encoder_hidden_states"],
        dynamic_dims={"sample": {0: "batch"}, "timestep": {0: "batch"},
                      "encoder_hidden_states": {0: "batch", 1: "ctx_len"}},
        kv_source_kind="graph_input",
        config={**config, "attn_processor": "AttnProcessor" if eager_attention
                else "AttnProcessor2_0"},
        notes=["diffusers' attention_head_dim is the number of heads; head_dim is "
               "channels // heads and differs per level (see attention.blocks).",
               "timestep is int64 [batch], so a float16 cast leaves it alone."])


def build_sdxl(size: str) -> Built:
    """UNet2DConditionModel from ``SDXL_SMALL`` (SDPA processor) with SDXL's text_time inputs:
    ``text_embeds`` [batch, 20] and ``time_ids`` [batch, 6]."""
    import torch
    from diffusers import UNet2DConditionModel

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"the SDXL-style UNet has only the 'small' size, not {size!r}")
    config = SDXL_SMALL
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**config)
    randomize_parameters(unet, SEED)
    module = _wrapper_class()[1](unet).eval()
    batch, height, width, ctx_len = SDXL_SAMPLE_SHAPE
    gen = torch.Generator().manual_seed(SEED + 1)
    inputs = {
        "sample": torch.randn(batch, config["in_channels"], height, width, generator=gen),
        "timestep": torch.tensor([10 + 487 * i for i in range(batch)], dtype=torch.int64),
        "encoder_hidden_states": torch.randn(batch, ctx_len, config["cross_attention_dim"],
                                             generator=gen),
        "text_embeds": torch.randn(batch, SDXL_TEXT_EMBEDS, generator=gen),
        # original size, crop top-left, target size: SDXL's micro-conditioning
        "time_ids": torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * batch),
    }
    return Built(
        module=module, inputs=inputs, output_names=["out_sample"],
        attention=attention_truth(config), static_inputs=["encoder_hidden_states"],
        dynamic_dims={"sample": {0: "batch"}, "timestep": {0: "batch"},
                      "encoder_hidden_states": {0: "batch", 1: "ctx_len"},
                      "text_embeds": {0: "batch"}, "time_ids": {0: "batch"}},
        kv_source_kind="graph_input",
        config={**config, "attn_processor": "AttnProcessor2_0"},
        notes=["diffusers' attention_head_dim is the number of heads per level; "
               "transformer_layers_per_block[-1] layers in the deepest level and the mid block."])


def _sdpa(size: str) -> Built:
    return build_unet(size)


def _eager(size: str) -> Built:
    return build_unet(size, eager_attention=True)


_DESC = "diffusers UNet2DConditionModel, 2 levels (32/64 ch), 4 heads, context width 24"
_REQ = ("torch", "diffusers")
_TAGS = ("diffusion",)
MODELS: tuple[ZooModel, ...] = (
    ZooModel("unet2d-tiny", "unet", _DESC + ", SDPA processor", _sdpa, exporter="dynamo",
             opset=18, sizes=("small", "bench"), requires=_REQ, tags=_TAGS),
    ZooModel("unet2d-tiny-fp16", "unet", _DESC + ", SDPA processor, float16", _sdpa,
             exporter="dynamo", opset=18, dtype="float16", requires=_REQ,
             tags=(*_TAGS, "fp16")),
    ZooModel("unet2d-tiny-eager", "unet", _DESC + ", eager AttnProcessor", _eager,
             exporter="dynamo", opset=18, requires=_REQ, tags=_TAGS),
    ZooModel("unet2d-sdxl-tiny", "unet",
             "diffusers UNet2DConditionModel, SDXL-shaped: 3 levels (16/32/64 ch), 2 transformer "
             "layers at the deepest level, heads per level, linear projections, text_time added "
             "conditioning (text_embeds, time_ids)", build_sdxl, requires=_REQ,
             tags=(*_TAGS, "sdxl")),
    ZooModel("unet2d-tiny-torchscript", "unet", _DESC + ", SDPA processor, TorchScript "
             "exporter", _sdpa, exporter="torchscript", opset=17, requires=_REQ, tags=_TAGS),
)
