"""Fusion targets: what ``fuse-attention`` replaces a matched attention block with.

Importing this package registers the built-in targets; ``trt-plugin`` is imported on demand
(:func:`load_target`).
"""

from .base import TARGETS, FusionTarget, register_target

__all__ = ["TARGETS", "FusionTarget", "register_target"]
