"""What a zoo model is: a recipe that builds a real torch module and says what it contains.

A family module (``xattn_compiler/zoo/families/*.py``) defines builder functions and a
``MODELS`` tuple of :class:`ZooModel`. A builder takes a size (``"small"`` for tests and
demos, ``"bench"`` for benchmarks) and returns a :class:`Built`: the module in eval mode with
seeded random weights, example inputs in ``forward`` order, the dims to keep dynamic, and the
ground truth the matcher is judged against (attention counts derived from the config, not from
the exported graph). Nothing is downloaded; torch and the model libraries are imported inside
builders only, so listing the zoo needs neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SIZES = ("small", "bench")
EXPORTERS = ("dynamo", "torchscript")


@dataclass(frozen=True)
class Attention:
    """The attention a model holds, derived from its config.

    ``num_heads``/``head_dim`` describe every block when all blocks agree; a family whose
    blocks differ (a UNet's levels) lists them per block in ``blocks`` instead.
    """

    self: int
    cross: int
    num_heads: int | None = None
    head_dim: int | None = None
    blocks: tuple[dict[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"self": self.self, "cross": self.cross, "num_heads": self.num_heads,
                "head_dim": self.head_dim, "blocks": [dict(b) for b in self.blocks]}


@dataclass
class Built:
    """A module ready to export, and the truth about it."""

    module: Any                                  # torch.nn.Module, eval mode, seeded weights
    inputs: dict[str, Any]                       # name -> torch.Tensor, in forward() order
    output_names: list[str]
    attention: Attention
    static_inputs: list[str]                     # graph inputs that feed only cross K/V
    dynamic_dims: dict[str, dict[int, str]] = field(default_factory=dict)  # input -> axis -> name
    kv_source_kind: str = "graph_input"          # graph_input | constant | internal
    config: dict[str, Any] = field(default_factory=dict)   # what the architecture was built from
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ZooModel:
    """One exportable variant: a builder plus how to export it."""

    name: str                                    # kebab-case, unique: "whisper-decoder-sdpa"
    family: str                                  # "whisper", "t5", "unet", ...
    description: str
    build: Callable[[str], Built]                # size -> Built
    exporter: str = "dynamo"                     # dynamo | torchscript
    opset: int = 18
    dtype: str = "float32"                       # float32 | float16 (cast after building)
    sizes: tuple[str, ...] = ("small",)
    requires: tuple[str, ...] = ("torch",)       # importable modules the builder needs
    tolerance: tuple[float, float] | None = None  # (rtol, atol factor); None: by dtype
    tags: tuple[str, ...] = ()                   # "control-flow", "encoder-decoder", ...

    def __post_init__(self):
        if self.exporter not in EXPORTERS:
            raise ValueError(f"{self.name}: exporter must be one of {EXPORTERS}")
        unknown = set(self.sizes) - set(SIZES)
        if unknown:
            raise ValueError(f"{self.name}: unknown sizes {sorted(unknown)}")
