"""Fusion targets: what ``fuse-attention`` replaces a matched attention block with.

Importing this package registers the built-in targets (``onnx-attention``, ``canonical``,
``ort-mha``); others live in modules named after them (``trt-plugin`` in
``xattn_compiler.fusion.trt_plugin``) and are imported when first asked for
(:func:`load_target`).
"""

from __future__ import annotations

import importlib

from xattn_compiler.errors import InputError

from .base import TARGETS, FusionTarget, register_target


def load_target(name: str) -> type[FusionTarget]:
    """The target class called ``name``, importing its module on first use."""
    if name not in TARGETS and name.replace("-", "").isalnum():
        module = f"{__name__}.{name.replace('-', '_')}"
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if name not in TARGETS:
        raise InputError(f"unknown fusion target '{name}' (targets: {', '.join(sorted(TARGETS))})")
    return TARGETS[name]


# Registration happens on import; these modules define nothing else this package exports.
from . import canonical, onnx_attention, ort_mha  # noqa: E402, F401

__all__ = ["TARGETS", "FusionTarget", "load_target", "register_target"]
