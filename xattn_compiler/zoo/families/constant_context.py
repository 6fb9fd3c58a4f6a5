"""Cross-attention whose context is a constant of the model, not a graph input.

The only input is ``x`` [batch, seq, 64]. Two pre-norm blocks (hand-written attention, 4
heads of 16) each run self-attention over ``x`` and cross-attention into a context that lives
in the weights:

* ``constant-context-cross-attention``: learned latents, an ``nn.Parameter`` [9, 64] expanded
  to the batch (``latents.expand(batch, -1, -1)``), as a resampler or adapter holds them;
* ``constant-context-prompt-buffer``: a fixed prompt embedding registered as a buffer
  [1, 9, 64] and left at batch 1, so K/V are computed once and broadcast in the score and
  value matmuls (the exporter's constant folding may precompute them outright).

Cross K/V depend on no graph input: ``kv_source_kind`` is ``"constant"`` and there are no
static inputs.
"""

from __future__ import annotations

import functools

from ..spec import Attention, Built, ZooModel

D_MODEL, NHEAD, FFN, LAYERS, CONTEXT_LEN = 64, 4, 128, 2, 9
#: Sample: batch 2, sequence 5; context length 9, width 64, heads 4 of 16.
BATCH, SEQ = 2, 5
SEED = 0


@functools.cache
def _model_class() -> type:
    import torch
    from torch import nn

    from .torch_nn import plain_blocks

    class ConstantContextModel(nn.Module):
        """Blocks whose cross-attention reads a parameter or buffer context."""

        def __init__(self, as_buffer: bool):
            super().__init__()
            self.as_buffer = as_buffer
            context = torch.randn(CONTEXT_LEN, D_MODEL)
            if as_buffer:
                self.register_buffer("prompt", context.unsqueeze(0))   # [1, L, d]
            else:
                self.latents = nn.Parameter(context)                   # [L, d]
            self.blocks = nn.ModuleList(plain_blocks().CrossBlock(D_MODEL, NHEAD, FFN)
                                        for _ in range(LAYERS))
            self.norm = nn.LayerNorm(D_MODEL)

        def forward(self, x):
            if self.as_buffer:
                context = self.prompt                 # batch 1: the matmuls broadcast it
            else:
                context = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
            for block in self.blocks:
                x = block(x, context)
            return self.norm(x)

    return ConstantContextModel


def build_constant_context(size: str, as_buffer: bool) -> Built:
    """Self- plus cross-attention blocks reading learned latents or a prompt buffer."""
    import torch

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"the constant-context model has only the 'small' size, not {size!r}")
    torch.manual_seed(SEED)
    module = _model_class()(as_buffer)
    randomize_parameters(module, SEED)
    if not as_buffer:
        # Latents at unit scale, like the prompt buffer (randomize scales 2-D tensors by fan-in).
        with torch.no_grad():
            module.latents.copy_(torch.randn(CONTEXT_LEN, D_MODEL,
                                             generator=torch.Generator().manual_seed(SEED)))
    module.eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    source = "buffer [1, L, d], broadcast" if as_buffer else "nn.Parameter [L, d], expanded"
    return Built(
        module=module, inputs={"x": torch.randn(BATCH, SEQ, D_MODEL, generator=gen)},
        output_names=["out"],
        attention=Attention(self=LAYERS, cross=LAYERS, num_heads=NHEAD,
                            head_dim=D_MODEL // NHEAD),
        static_inputs=[], dynamic_dims={"x": {0: "batch", 1: "seq"}},
        kv_source_kind="constant",
        config={"d_model": D_MODEL, "nhead": NHEAD, "dim_feedforward": FFN,
                "num_layers": LAYERS, "context_len": CONTEXT_LEN, "context": source},
        notes=[f"Cross-attention context is a {source}; no graph input reaches cross K/V."])


def _latents(size: str) -> Built:
    return build_constant_context(size, as_buffer=False)


def _prompt_buffer(size: str) -> Built:
    return build_constant_context(size, as_buffer=True)


_DESC = "2 blocks of self- and cross-attention (d 64, 4 heads) into a constant context of 9"
MODELS: tuple[ZooModel, ...] = (
    ZooModel("constant-context-cross-attention", "constant-context",
             _DESC + ": learned latents (nn.Parameter)", _latents, exporter="dynamo",
             opset=18, tags=("constant-context",)),
    ZooModel("constant-context-prompt-buffer", "constant-context",
             _DESC + ": fixed prompt embedding (buffer, batch 1, broadcast)", _prompt_buffer,
             exporter="dynamo", opset=18, tags=("constant-context",)),
)
