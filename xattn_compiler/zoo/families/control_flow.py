"""Attention inside ONNX control flow: an ``If`` whose branches attend, a ``Loop`` that does.

* ``if-cross-attention`` (dynamo, opset 18): ``torch.cond`` picks one of two pre-norm blocks
  (self-attention, cross-attention into ``context``, feed-forward; hand-written attention),
  so each ``If`` branch holds one self- and one cross-attention. The predicate is a graph
  input ``use_cache_branch`` (bool, shape []): torch.cond specialises a Python-bool predicate
  while tracing (no ``If`` at all), and a buffer predicate survives torch.export only for the
  exporter's optimizer (on by default) to fold the ``If`` on its constant condition, so only
  an input keeps the ``If``. The condition becomes known once a user fixes that input.
* ``loop-cross-attention`` (TorchScript, opset 17): a ``torch.jit.script``-ed module applies
  one such block three times (``for _ in range(int(self.steps))``, weights shared), which the
  TorchScript exporter turns into a ``Loop`` whose trip count is the int64 initializer
  ``steps`` (3) and whose body holds the attention. A literal ``range(3)`` does not survive:
  the exporter freezes the scripted module, and freezing unrolls constant-count loops.

Ground truth counts attention blocks as they appear in the graph: each ``If`` branch's blocks
count (2 self + 2 cross), a ``Loop`` body's block counts once (1 self + 1 cross) however many
times it runs. ``context`` feeds only cross-attention K/V (from inside the subgraphs, as an
outer-scope value).
"""

from __future__ import annotations

import functools

from ..spec import Attention, Built, ZooModel

D_MODEL, NHEAD, FFN, LOOP_STEPS = 64, 4, 128, 3
#: Sample: batch 2, sequence 5, context length 12; width 64, heads 4 of 16.
BATCH, SEQ, CONTEXT_LEN = 2, 5, 12
SEED = 0


@functools.cache
def _classes() -> tuple[type, type]:
    import torch
    from torch import nn

    from .torch_nn import plain_blocks

    CrossBlock = plain_blocks().CrossBlock

    class BranchingModel(nn.Module):
        """``torch.cond`` between two cross-attention blocks on a boolean input."""

        def __init__(self):
            super().__init__()
            self.cached = CrossBlock(D_MODEL, NHEAD, FFN)
            self.uncached = CrossBlock(D_MODEL, NHEAD, FFN)

        def forward(self, x, context, use_cache_branch):
            return torch.cond(use_cache_branch, self.cached, self.uncached, (x, context))

    class LoopingModel(nn.Module):
        """One cross-attention block applied ``LOOP_STEPS`` times with shared weights."""

        def __init__(self):
            super().__init__()
            # The trip count lives in a buffer: a literal or constant range() is unrolled by
            # the module freezing the TorchScript exporter runs (UnrollConstantLoops), while a
            # buffer survives freezing as an int64 initializer feeding the Loop's trip count.
            self.register_buffer("steps", torch.tensor(LOOP_STEPS, dtype=torch.int64))
            self.block = CrossBlock(D_MODEL, NHEAD, FFN)
            self.norm = nn.LayerNorm(D_MODEL)

        def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            for _ in range(int(self.steps)):
                x = self.block(x, context)
            return self.norm(x)

    return BranchingModel, LoopingModel


def _inputs() -> dict:
    import torch

    gen = torch.Generator().manual_seed(SEED + 1)
    return {"x": torch.randn(BATCH, SEQ, D_MODEL, generator=gen),
            "context": torch.randn(BATCH, CONTEXT_LEN, D_MODEL, generator=gen)}


_CONFIG = {"d_model": D_MODEL, "nhead": NHEAD, "dim_feedforward": FFN,
           "attention": "hand-written (q/k/v/out nn.Linear, matmul, softmax)"}
_DIMS = {"x": {0: "batch", 1: "seq"}, "context": {0: "batch", 1: "context_len"}}


def build_if(size: str) -> Built:
    """Two blocks behind ``torch.cond`` on the bool input ``use_cache_branch``."""
    import torch

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"if-cross-attention has only the 'small' size, not {size!r}")
    torch.manual_seed(SEED)
    module = _classes()[0]()
    randomize_parameters(module, SEED)
    module.eval()
    # True: the sample runs the "cached" branch; the reference checks that branch only.
    inputs = {**_inputs(), "use_cache_branch": torch.tensor(True)}
    return Built(
        module=module, inputs=inputs, output_names=["out"],
        attention=Attention(self=2, cross=2, num_heads=NHEAD, head_dim=D_MODEL // NHEAD),
        static_inputs=["context"], dynamic_dims=_DIMS, kv_source_kind="graph_input",
        config={**_CONFIG, "branches": 2, "blocks_per_branch": 1},
        notes=["Counted per If branch: each branch holds one block (1 self + 1 cross), "
               "so 2 self + 2 cross in the graph though one branch runs.",
               "The If condition is the graph input use_cache_branch (bool []): a Python "
               "bool predicate is specialised by torch.cond, a buffer one folded by the "
               "exporter's optimizer, so it is compile-time-known only once a user fixes "
               "this input."])


def build_loop(size: str) -> Built:
    """A scripted module looping one block ``LOOP_STEPS`` times."""
    import torch

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"loop-cross-attention has only the 'small' size, not {size!r}")
    torch.manual_seed(SEED)
    eager = _classes()[1]()
    randomize_parameters(eager, SEED)
    module = torch.jit.script(eager.eval())
    return Built(
        module=module, inputs=_inputs(), output_names=["out"],
        attention=Attention(self=1, cross=1, num_heads=NHEAD, head_dim=D_MODEL // NHEAD),
        static_inputs=["context"], dynamic_dims=_DIMS, kv_source_kind="graph_input",
        config={**_CONFIG, "loop_steps": LOOP_STEPS, "scripted": True},
        notes=[f"Counted once for the Loop body: one block (1 self + 1 cross) that runs "
               f"{LOOP_STEPS} times with shared weights."])


MODELS: tuple[ZooModel, ...] = (
    ZooModel("if-cross-attention", "control-flow",
             "torch.cond on a bool input between two self+cross-attention blocks (If node)",
             build_if, exporter="dynamo", opset=18, tags=("control-flow",)),
    ZooModel("loop-cross-attention", "control-flow",
             "torch.jit.script-ed for-range(3) over one self+cross-attention block (Loop node)",
             build_loop, exporter="torchscript", opset=17, tags=("control-flow",)),
)
