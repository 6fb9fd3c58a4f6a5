"""The fusion-target interface: one way to replace a matched attention block with the node a
runtime executes as one fused kernel.

The ``fuse-attention`` pass drives a target:

1. ``prepare(model)`` before matching (e.g. raise the default-domain opset to 23);
2. per block the matcher found, the pass's common checks (already fused, escaping
   intermediates, heads or head dim unknown or contradicted by the shapes), then
   ``skip_reason(block)``;
3. ``fuse(block)`` rewrites ``block.graph`` in place so that ``block.output`` keeps its value
   (and its name: a graph output must stay one), computed by the new nodes, directly or
   through block nodes a target keeps (such as the head merge below the core's context);
   the pass exports the graph, which drops what became dead;
4. ``finish(model)`` after export (e.g. register a custom domain's opset import).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.attention import AttentionMatch


class FusionTarget:
    """One way to replace a matched attention block with the node a runtime runs fused."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    #: Whether ``skip_reason``/``fuse`` also see blocks that already are one fused op (the
    #: ``canonical`` target takes ONNX Attention apart); otherwise the pass leaves them.
    rewrites_fused: ClassVar[bool] = False

    def __init__(self, options: Mapping[str, Any]):
        self.options = dict(options)

    def prepare(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Before matching; the default leaves the model unchanged."""
        return model

    def skip_reason(self, block: AttentionMatch) -> str | None:
        """Why this block is left alone, or None to fuse it."""
        return None

    def fuse(self, block: AttentionMatch) -> list[gs.Node]:
        """Rewrite ``block.graph`` in place so new nodes compute ``block.output``'s value;
        return the new nodes. Called only for blocks ``skip_reason`` accepted."""
        raise NotImplementedError(f"target '{self.name}' does not implement fuse")

    def finish(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """After export; the default leaves the model unchanged."""
        return model


TARGETS: dict[str, type[FusionTarget]] = {}


def register_target(cls: type[FusionTarget]) -> type[FusionTarget]:
    """Class decorator: make ``cls`` available as ``fuse-attention{target=<cls.name>}``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"fusion target {cls.__qualname__} has no name")
    existing = TARGETS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"fusion target '{name}' is already registered by {existing.__qualname__}")
    TARGETS[name] = cls
    return cls


__all__ = ["TARGETS", "FusionTarget", "register_target"]
