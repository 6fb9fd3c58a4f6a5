"""Per-op restrictions of TensorRT's ONNX parser that a static look at one node can decide.

Each rule takes a node and returns ``(severity, message, fix)`` triples; the restrictions are
the "Restrictions" column of operators.md (see :mod:`.trt_ops`). A value that must be a
build-time constant passes when it is an initializer or a Constant node's output; a value that
is only constant once shape expressions are folded is a warning whose fix is ``canonicalize``.
ONNX ``Attention`` has its own module, :mod:`.trt_attention_rules`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import onnx_graphsurgeon as gs

from ..analysis import constant_eval
from ..ir import constant_value

Issue = tuple[str, str, str]   # severity, message, fix

BLOCKER, WARNING, INFO = "blocker", "warning", "info"

_RESIZE_COORDINATES = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
                       "align_corners"}
_RESIZE_NEAREST = {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"}
_TOPK_LIMIT = 3840


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _used(tensor: gs.Tensor) -> bool:
    return bool(tensor.name) and bool(tensor.outputs)


def _must_be_constant(node: gs.Node, index: int, what: str) -> Iterator[Issue]:
    tensor = _input(node, index)
    if tensor is None or constant_value(tensor) is not None:
        return
    if constant_eval(tensor) is not None:
        yield (WARNING, f"{what} '{tensor.name}' is computed from shapes; TensorRT wants a "
               "build-time constant", "canonicalize")
    else:
        yield (BLOCKER, f"{what} '{tensor.name}' must be a build-time constant but depends on "
               "run-time values", "none: re-export with a constant")


def _reduce(node: gs.Node) -> Iterator[Issue]:
    yield from _must_be_constant(node, 1, "axes")


def _squeeze(node: gs.Node) -> Iterator[Issue]:
    yield from _must_be_constant(node, 1, "axes")


def _cumsum(node: gs.Node) -> Iterator[Issue]:
    yield from _must_be_constant(node, 1, "axis")


def _onehot(node: gs.Node) -> Iterator[Issue]:
    yield from _must_be_constant(node, 1, "depth")


def _topk(node: gs.Node) -> Iterator[Issue]:
    if node.attrs.get("sorted", 1) != 1:
        yield (BLOCKER, "TopK with sorted=0 is unsupported", "none: export with sorted=1")
    k = _input(node, 1)
    value = constant_value(k) if k is not None else None
    if value is not None and value.size and int(np.max(value)) >= _TOPK_LIMIT:
        yield (BLOCKER, f"TopK K={int(np.max(value))} must be less than {_TOPK_LIMIT}",
               "none: reduce K")


def _scatter_nd(node: gs.Node) -> Iterator[Issue]:
    if node.attrs.get("reduction", "none") != "none":
        yield (BLOCKER, f"ScatterND reduction='{node.attrs['reduction']}' is unsupported "
               "(only 'none')", "none: rewrite the scatter")


def _dropout(node: gs.Node) -> Iterator[Issue]:
    training = _input(node, 2)
    if training is None:
        return
    value = constant_value(training)
    if value is None or bool(np.any(value)):
        yield (BLOCKER, f"Dropout training_mode '{training.name}' must be an initializer that is "
               "False", "none: export in eval mode")


def _pool(node: gs.Node) -> Iterator[Issue]:
    dilations = node.attrs.get("dilations")
    if dilations and any(d != 1 for d in dilations):
        yield (BLOCKER, f"{node.op} dilations {list(dilations)} must be empty or all ones",
               "none: re-export without dilation")
    kernel = node.attrs.get("kernel_shape")
    if node.op in ("AveragePool", "MaxPool") and kernel is not None and len(kernel) not in (2, 3):
        yield (BLOCKER, f"{node.op} over {len(kernel)} spatial dims: only 2D or 3D pooling",
               "none: reshape to 2D pooling")
    if node.op == "MaxPool" and len(node.outputs) > 1 and _used(node.outputs[1]):
        yield (BLOCKER, "MaxPool's Indices output is unsupported", "none: drop the indices")


def _layer_norm(node: gs.Node) -> Iterator[Issue]:
    if any(_used(t) for t in node.outputs[1:]):
        yield (BLOCKER, "LayerNormalization: only the first output Y is supported",
               "none: do not read Mean/InvStdDev")


def _zero_point(node: gs.Node) -> Iterator[Issue]:
    point = _input(node, 2)
    value = constant_value(point) if point is not None else None
    if point is not None and (value is None or bool(np.any(value))):
        yield (BLOCKER, f"{node.op} zero point '{point.name}' must be zero",
               "none: quantize symmetrically")


def _constant(node: gs.Node) -> Iterator[Issue]:
    for attr in ("sparse_value", "value_string", "value_strings"):
        if attr in node.attrs:
            yield (BLOCKER, f"Constant attribute '{attr}' is unsupported", "canonicalize")


def _resize(node: gs.Node) -> Iterator[Issue]:
    attrs = node.attrs
    if attrs.get("mode", "nearest") not in ("nearest", "linear"):
        yield (BLOCKER, f"Resize mode '{attrs['mode']}' is unsupported (nearest, linear)",
               "none: resize with nearest or linear")
    coordinates = attrs.get("coordinate_transformation_mode", "half_pixel")
    if coordinates not in _RESIZE_COORDINATES:
        yield (BLOCKER, f"Resize coordinate_transformation_mode '{coordinates}' is unsupported",
               "none: re-export with half_pixel or align_corners")
    if attrs.get("mode", "nearest") == "nearest" and \
            attrs.get("nearest_mode", "round_prefer_floor") not in _RESIZE_NEAREST:
        yield (BLOCKER, f"Resize nearest_mode '{attrs['nearest_mode']}' is unsupported",
               "none: re-export")
    if attrs.get("antialias", 0):
        yield (BLOCKER, "Resize with antialias=1 is unsupported", "none: re-export")
    if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        yield (BLOCKER, "Resize keep_aspect_ratio_policy must be 'stretch'", "none: re-export")


def _recurrent(node: gs.Node) -> Iterator[Issue]:
    if node.op == "LSTM" and node.attrs.get("input_forget", 0):
        yield (BLOCKER, "LSTM input_forget must be 0", "none: re-export")
    if node.attrs.get("layout", 0):
        yield (BLOCKER, f"{node.op} layout must be 0", "none: re-export with layout=0")


RULES: dict[str, Callable[[gs.Node], Iterator[Issue]]] = {
    "Squeeze": _squeeze, "Unsqueeze": _squeeze, "CumSum": _cumsum, "OneHot": _onehot,
    "TopK": _topk, "ScatterND": _scatter_nd, "Dropout": _dropout, "AveragePool": _pool,
    "MaxPool": _pool, "LpPool": _pool, "LayerNormalization": _layer_norm,
    "QuantizeLinear": _zero_point, "DequantizeLinear": _zero_point, "Constant": _constant,
    "Resize": _resize, "LSTM": _recurrent, "GRU": _recurrent, "RNN": _recurrent,
    **{op: _reduce for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
                              "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
                              "ReduceSumSquare")},
}


def node_issues(node: gs.Node) -> list[Issue]:
    """The restrictions ``node`` breaks (empty for ops without a rule)."""
    rule = RULES.get(node.op)
    return list(rule(node)) if rule is not None else []
