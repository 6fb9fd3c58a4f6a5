"""Raise a model's default-domain opset so it can hold an op introduced later.

ONNX's version converter rewrites every node whose op changed between the versions (If/Loop
bodies included); the result is checked (``onnx.checker``, full) before it is used, and the IR
version rises to the least one that may import the new opset. Both run without the weights.
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from xattn_compiler.errors import XattnError
from xattn_compiler.io import checker_view, default_opset

#: The opset that introduced ``Attention``.
ATTENTION_OPSET = 23


class OpsetUpgradeError(XattnError):
    """The model cannot be moved to the opset a target needs; the target cannot fuse."""


def upgrade_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``model`` importing the default domain at ``version`` or later (unchanged when it
    already does); raises :class:`OpsetUpgradeError` when conversion or its check fails."""
    current = default_opset(model)
    if current is not None and current >= version:
        return model
    # The converter and the checker serialise the model: they run on a view whose large and
    # detached weights are graph inputs (no weight is copied, no 2 GB limit, no stub read),
    # and the weights return afterwards; converters never rewrite initializers.
    view = checker_view(model)
    kept = {t.name for t in view.graph.initializer}
    moved = [t for t in model.graph.initializer if t.name not in kept]
    declared = {v.name for v in model.graph.input}
    try:
        if current is None:
            converted = view
            converted.opset_import.append(onnx.helper.make_opsetid("", version))
        else:
            converted = version_converter.convert_version(view, version)
        minimum = onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid("", version)], ignore_unknown=True)
        converted.ir_version = max(converted.ir_version, model.ir_version, minimum)
        onnx.checker.check_model(converted, full_check=True)
    except Exception as exc:  # the converter raises RuntimeError, ValidationError, ...
        lines = str(exc).strip().splitlines()
        raise OpsetUpgradeError(f"cannot convert the model from opset {current} to {version}: "
                                f"{lines[0] if lines else type(exc).__name__}") from exc
    if moved:
        names = {t.name for t in moved}
        inputs = [v for v in converted.graph.input if v.name not in names or v.name in declared]
        del converted.graph.input[:]
        converted.graph.input.extend(inputs)
        converted.graph.initializer.extend(moved)
    return converted


__all__ = ["ATTENTION_OPSET", "OpsetUpgradeError", "upgrade_opset"]
