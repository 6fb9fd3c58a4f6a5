"""Graph inputs fixed to values: parsing ``NAME=VALUE`` text, pinning, and checking the result.

A specialised model answers for one value of an input, so it is compared with the original
run on that value: :func:`verify_specialized` pins the same values in the original (the
inputs become initializers, nothing else changes) and re-declares in the candidate the inputs
it dropped as unread, then runs the ordinary :func:`~xattn_compiler.verification.verify`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from xattn_compiler.errors import InputError
from xattn_compiler.ir import is_graph_output, remove_dead_nodes
from xattn_compiler.rewrite import replace_uses
from xattn_compiler.verification import VerifyResult, verify

log = logging.getLogger(__name__)


def parse_values(text: str) -> dict[str, str]:
    """``"use_cache_branch=false,n=3"`` -> ``{"use_cache_branch": "false", "n": "3"}``."""
    values: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, eq, value = item.partition("=")
        if not eq or not name.strip() or not value.strip():
            raise InputError(f"specialise: {item!r} is not written NAME=VALUE")
        values[name.strip()] = value.strip()
    return values


def input_value(name: str, dtype: Any, shape: Sequence[Any] | None, value: Any) -> np.ndarray:
    """``value`` (text such as ``false`` or ``3``, or a Python/numpy value) as the array input
    ``name`` would be fed: its dtype, broadcast to its shape, which must be static."""
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InputError(f"specialise: input '{name}' has no static shape ({shape}); "
                         "only inputs of static shape can become constants")
    if dtype is None:
        raise InputError(f"specialise: input '{name}' has no known type")
    dtype = np.dtype(dtype)
    if isinstance(value, str):
        value = _parse_scalar(name, value, dtype)
    array = np.asarray(value, dtype=dtype)
    try:
        return np.array(np.broadcast_to(array, tuple(shape)))
    except ValueError as exc:
        raise InputError(f"specialise: value for '{name}' of shape {array.shape} does not fit "
                         f"its shape {tuple(shape)}") from exc


def _parse_scalar(name: str, text: str, dtype: np.dtype) -> Any:
    lowered = text.lower()
    try:
        if dtype == np.bool_:
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return lowered in ("true", "1")
        if np.issubdtype(dtype, np.integer):
            return int(text)
        return float(text)
    except ValueError as exc:
        raise InputError(f"specialise: cannot read {text!r} as {dtype} for input "
                         f"'{name}' ({exc})") from exc


def pin_inputs(graph: gs.Graph, values: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Turn the named graph inputs into constants (readers in bodies included). Names that are
    no inputs are reported, not refused: a second run finds the inputs gone."""
    by_name = {t.name: t for t in graph.inputs}
    pinned, missing = [], []
    for name, value in values.items():
        tensor = by_name.get(name)
        if tensor is None:
            missing.append(name)
            continue
        if is_graph_output(tensor, graph):
            raise InputError(f"specialise: input '{name}' is also a graph output")
        constant = gs.Constant(name, input_value(name, tensor.dtype, tensor.shape, value))
        graph.inputs = [t for t in graph.inputs if t is not tensor]
        replace_uses(tensor, constant, graph)
        pinned.append(name)
    if missing:
        log.warning("specialise: no graph input named %s (already specialised?)",
                    ", ".join(repr(m) for m in missing))
    return pinned, {"specialized": pinned, "not_inputs": missing}


def remove_unread_inputs(graph: gs.Graph, read_before: set[str]) -> list[str]:
    """Drop the graph inputs that were read in ``read_before`` and no longer are."""
    remove_dead_nodes(graph)
    gone = [t.name for t in graph.inputs
            if t.name in read_before and not t.outputs and not is_graph_output(t, graph)]
    graph.inputs = [t for t in graph.inputs if t.name not in gone]
    return gone


# --- checking a specialised model ------------------------------------------------------------------

def _proto_shape(value: onnx.ValueInfoProto) -> list[Any] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim]


def pin_in_proto(model: onnx.ModelProto, values: Mapping[str, Any]) -> onnx.ModelProto:
    """A copy of ``model`` whose named inputs are initializers holding ``values``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    by_name = {value.name: value for value in out.graph.input}
    for name, value in values.items():
        if name not in by_name:
            raise InputError(f"specialise: no graph input '{name}' in the reference")
        info = by_name[name]
        dtype = helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        array = input_value(name, dtype, _proto_shape(info), value)
        out.graph.input.remove(info)
        out.graph.initializer.append(numpy_helper.from_array(array, name))
    return out


def verify_specialized(original: onnx.ModelProto, specialized: onnx.ModelProto,
                       values: Mapping[str, Any], **options: Any) -> VerifyResult:
    """Compare ``specialized`` with ``original`` run on the same ``values`` of the pinned
    inputs (other options as :func:`~xattn_compiler.verification.verify`: inputs, rtol...)."""
    reference = pin_in_proto(original, values)
    candidate = onnx.ModelProto()
    candidate.CopyFrom(specialized)
    present = {value.name for value in candidate.graph.input}
    # Inputs the specialisation dropped as unread: declared again, still unread, so both
    # models take the same feeds.
    candidate.graph.input.extend(v for v in reference.graph.input if v.name not in present)
    return verify(reference, candidate, **options)
