"""Value checks at load that ``onnx.checker`` leaves out, each naming the node or tensor.

The checker accepts a Softmax with ``axis = 2**40``, a Transpose whose ``perm`` is no
permutation and an initializer whose ``raw_data`` is longer than its dims say; passes would
then index out of range, read the wrong bytes or silently rewrite the wrong axis. Checked here,
bodies of If/Loop/Scan included:

- axis-like attributes of default-domain ops are integers of sane size, in range for the
  rank of the input they index (when that rank is known: declared, or shape-inferred);
- ``perm`` is a permutation (of the input's rank when known), ``axes`` has no repeats;
- ``to`` and ``dtype`` name a real ONNX element type;
- every tensor's dims are non-negative and its data (``raw_data``, or the typed field) holds
  exactly the number of elements its dims say.

"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import onnx

from .errors import GraphStructureError
from .ir import SUB_BYTE_BITS, packed_nbytes
from .structure import _label

#: Ops whose ``axis`` attribute indexes an axis of input 0 (of rank r): valid is -r..r-1, but
#: Flatten's axis may also be r, and OneHot's indexes its output, one axis more (-r-1..r).
_AXIS_OPS = {"Softmax", "LogSoftmax", "Hardmax", "Concat", "Gather", "GatherElements",
             "ScatterElements", "Split", "Flatten", "LayerNormalization", "RMSNormalization",
             "ArgMax", "ArgMin", "TopK", "Compress", "Unique", "OneHot", "QuantizeLinear",
             "DequantizeLinear"}
_AXIS_RANGE = {"Flatten": (0, 1), "OneHot": (1, 1)}  # (extra below, extra above)
_AXES_OPS = {"Squeeze", "Unsqueeze", "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin",
             "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
             "ReduceSumSquare", "Slice"}
#: Ops that take their axes as input 1 in newer opsets (13 for Squeeze, 18 for most Reduce).
_AXES_INPUT_OPS = _AXES_OPS - {"Slice"}
_INT_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32})
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype",
                "RandomUniform": "dtype", "RandomNormalLike": "dtype",
                "RandomUniformLike": "dtype", "Multinomial": "dtype", "Bernoulli": "dtype"}
_DEFAULT_DOMAINS = ("", "ai.onnx")
#: No tensor has 2**31 axes; a larger value is hostile, not a model.
_SANE = 2**31
_TYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)
#: Packed 6-bit types: their storage is not checked here.
_UNCHECKED = frozenset(getattr(onnx.TensorProto, name) for name in ("FLOAT6E2M3", "FLOAT6E3M2")
                       if hasattr(onnx.TensorProto, name))

def check_values(model: onnx.ModelProto) -> None:
    """Raise :class:`GraphStructureError` naming the node and attribute, or the tensor, whose
    value is out of range or disagrees with its dims."""
    for graph, where in _graphs(model.graph, ""):
        for tensor, owner in _tensors(graph):
            _check_tensor(tensor, owner, where)
        for node in graph.node:
            if node.domain in _DEFAULT_DOMAINS:
                _check_sizes(node, where)
    _check_graph_ranges(_inferred(model).graph, _Scope({}, {}), "")


def _check_graph_ranges(graph: onnx.GraphProto, outer: _Scope, where: str) -> None:
    # Scoped: sibling branches of an If may reuse a name for different tensors.
    scope = _Scope(ChainMap(_local_ranks(graph), outer.ranks),
                   ChainMap(_local_ints(graph), outer.ints))
    for node in graph.node:
        if node.domain in _DEFAULT_DOMAINS:
            _check_ranges(node, scope, where)
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
                attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else [])
            for body in bodies:
                _check_graph_ranges(body, scope, f" in {attr.name} of '{_label(node)}'{where}")


@dataclass(frozen=True)
class _Scope:
    ranks: Mapping[str, int]          # known ranks by tensor name
    ints: Mapping[str, list[int]]     # small constant integer tensors (axes inputs) by name


# --- walking ---------------------------------------------------------------------------------

def _graphs(graph: onnx.GraphProto, where: str) -> Iterator[tuple[onnx.GraphProto, str]]:
    yield graph, where
    for node in graph.node:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
                attr.graphs if attr.type == onnx.AttributeProto.GRAPHS else [])
            for body in bodies:
                yield from _graphs(body, f" in {attr.name} of '{_label(node)}'{where}")


def _tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    for tensor in graph.initializer:
        yield tensor, f"initializer '{tensor.name}'"
    for sparse in graph.sparse_initializer:
        yield sparse.values, f"sparse initializer '{sparse.values.name}'"
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t, f"attribute '{attr.name}' of node '{_label(node)}'"
            elif attr.type == onnx.AttributeProto.TENSORS:
                for tensor in attr.tensors:
                    yield tensor, f"attribute '{attr.name}' of node '{_label(node)}'"


def _fail(message: str, node: onnx.NodeProto | None = None, tensor: str | None = None):
    raise GraphStructureError(message, node=node.name if node is not None else None,
                              tensor=tensor)


# --- tensors ---------------------------------------------------------------------------------

# The typed field each element type stores its values in, and how many entries one element
# takes there (complex numbers are two; sub-byte types pack several elements in one int32).
_FIELD = {**{t: "int32_data" for t in (
    onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT16, onnx.TensorProto.UINT8, onnx.TensorProto.BOOL,
    onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)},
    onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.COMPLEX64: "float_data",
    onnx.TensorProto.INT64: "int64_data", onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.COMPLEX128: "double_data", onnx.TensorProto.UINT32: "uint64_data",
    onnx.TensorProto.UINT64: "uint64_data", onnx.TensorProto.STRING: "string_data"}
_PER_ELEMENT = {onnx.TensorProto.COMPLEX64: 2, onnx.TensorProto.COMPLEX128: 2}


def _check_tensor(tensor: onnx.TensorProto, owner: str, where: str) -> None:
    if tensor.data_type not in _TYPES:
        _fail(f"{owner}{where} has element type {tensor.data_type}, which is no ONNX type",
              tensor=tensor.name)
    if any(d < 0 for d in tensor.dims):
        _fail(f"{owner}{where} has negative dims {list(tensor.dims)}", tensor=tensor.name)
    if (tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.HasField("segment")
            or tensor.data_type in _UNCHECKED):
        return  # its bytes are elsewhere: external data is checked when it is read
    count = math.prod(tensor.dims)
    if tensor.HasField("raw_data"):
        expected = packed_nbytes(tensor)
        if expected is not None and len(tensor.raw_data) != expected:
            _fail(f"{owner}{where}: raw_data holds {len(tensor.raw_data)} bytes, but dims "
                  f"{list(tensor.dims)} of {onnx.TensorProto.DataType.Name(tensor.data_type)} "
                  f"need {expected}", tensor=tensor.name)
        return
    field = _FIELD.get(tensor.data_type, "int32_data")
    held = len(getattr(tensor, field))
    expected = _typed_length(tensor.data_type, count)
    if held != expected:
        _fail(f"{owner}{where}: {field} holds {held} values, but dims {list(tensor.dims)} "
              f"of {onnx.TensorProto.DataType.Name(tensor.data_type)} need {expected}",
              tensor=tensor.name)


def _typed_length(data_type: int, count: int) -> int:
    bits = SUB_BYTE_BITS.get(data_type)
    if bits is not None:
        return math.ceil(count * bits / 8)  # packed, one byte per int32_data entry
    return count * _PER_ELEMENT.get(data_type, 1)


# --- attributes ------------------------------------------------------------------------------

def _int_attr(node: onnx.NodeProto, name: str) -> int | None:
    for attr in node.attribute:
        if attr.name == name and attr.type == onnx.AttributeProto.INT:
            return attr.i
    return None


def _ints_attr(node: onnx.NodeProto, name: str) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == name and attr.type == onnx.AttributeProto.INTS:
            return list(attr.ints)
    return None


def _check_sizes(node: onnx.NodeProto, where: str) -> None:
    """What needs no shapes: sane sizes, a permutation, no repeated axes, real dtypes."""
    here = f"node '{_label(node)}' ({node.op_type}){where}"
    if node.op_type in _AXIS_OPS:
        axis = _int_attr(node, "axis")
        if axis is not None and abs(axis) >= _SANE:
            _fail(f"{here}: attribute 'axis' = {axis} is out of range", node)
    axes = _ints_attr(node, "axes") if node.op_type in _AXES_OPS else None
    if axes is not None:
        if any(abs(a) >= _SANE for a in axes):
            _fail(f"{here}: attribute 'axes' = {axes} is out of range", node)
        if len(set(axes)) != len(axes):
            _fail(f"{here}: attribute 'axes' = {axes} repeats an axis", node)
    perm = _ints_attr(node, "perm") if node.op_type == "Transpose" else None
    if perm is not None and sorted(perm) != list(range(len(perm))):
        shown = perm if len(perm) <= 16 else [*perm[:16], "..."]
        _fail(f"{here}: attribute 'perm' = {shown} is not a permutation of 0..{len(perm) - 1}",
              node)
    dtype_attr = _DTYPE_ATTRS.get(node.op_type)
    value = _int_attr(node, dtype_attr) if dtype_attr else None
    if value is not None and value not in _TYPES:
        _fail(f"{here}: attribute '{dtype_attr}' = {value} is not an ONNX element type", node)


def _check_ranges(node: onnx.NodeProto, scope: _Scope, where: str) -> None:
    """Axis values against the rank of the input they index, where that rank is known."""
    here = f"node '{_label(node)}' ({node.op_type}){where}"
    found = _axes(node, scope.ints)
    if found is not None:
        _check_axes(node, here, *found, rank=scope.ranks.get(node.input[0]))
    rank = scope.ranks.get(node.input[0]) if node.input else None
    if rank is None:
        return
    axis = _int_attr(node, "axis") if node.op_type in _AXIS_OPS else None
    if axis is not None:
        below, above = _AXIS_RANGE.get(node.op_type, (0, 0))
        low, high = -rank - below, rank - 1 + above
        if not low <= axis <= high:
            _fail(f"{here}: attribute 'axis' = {axis} is out of range for its rank-{rank} input "
                  f"'{node.input[0]}' (valid: {low}..{high})", node, node.input[0])
    perm = _ints_attr(node, "perm") if node.op_type == "Transpose" else None
    if perm and len(perm) != rank:
        _fail(f"{here}: attribute 'perm' has {len(perm)} entries for its rank-{rank} input "
              f"'{node.input[0]}'", node, node.input[0])


def _axes(node: onnx.NodeProto, ints: Mapping[str, list[int]]) -> tuple[list[int], str] | None:
    """The node's axes and what holds them: the attribute (older opsets) or a constant input."""
    axes = _ints_attr(node, "axes") if node.op_type in _AXES_OPS else None
    if axes is not None:
        return axes, "attribute 'axes'"
    if node.op_type in _AXES_INPUT_OPS and len(node.input) > 1 and node.input[1] in ints:
        return ints[node.input[1]], f"axes input '{node.input[1]}'"
    return None


def _check_axes(node: onnx.NodeProto, here: str, axes: list[int], what: str,
                rank: int | None) -> None:
    if any(abs(a) >= _SANE for a in axes):
        _fail(f"{here}: {what} = {axes} is out of range", node)
    if len(set(axes)) != len(axes):
        _fail(f"{here}: {what} = {axes} repeats an axis", node)
    if rank is None:
        return
    # Unsqueeze's axes index its output, which has one more axis per entry.
    high = rank + len(axes) if node.op_type == "Unsqueeze" else rank
    if any(not -high <= a < high for a in axes):
        _fail(f"{here}: {what} = {axes} is out of range for its rank-{rank} input "
              f"'{node.input[0]}'", node, node.input[0])


# --- ranks -----------------------------------------------------------------------------------

def _local_ranks(graph: onnx.GraphProto) -> dict[str, int]:
    """Known ranks of the tensors ``graph`` itself defines or declares: inputs, outputs,
    value_info (declared or inferred), initializers and Constant values."""
    ranks: dict[str, int] = {}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        kind = value.type.tensor_type
        if value.type.HasField("tensor_type") and kind.HasField("shape"):
            ranks[value.name] = len(kind.shape.dim)
    for tensor in graph.initializer:
        ranks[tensor.name] = len(tensor.dims)
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output:
            value = _tensor_attr(node)
            if value is not None:
                ranks[node.output[0]] = len(value.dims)
    return ranks


def _local_ints(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Small 0-D/1-D integer constants ``graph`` defines (initializers, Constant values)."""
    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(node.output[0], _tensor_attr(node)) for node in graph.node
                if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output]
    ints: dict[str, list[int]] = {}
    for name, tensor in tensors:
        if (tensor is not None and tensor.data_type in _INT_TYPES and len(tensor.dims) <= 1
                and math.prod(tensor.dims) <= 64
                and tensor.data_location != onnx.TensorProto.EXTERNAL):
            ints[name] = [int(v) for v in onnx.numpy_helper.to_array(tensor).reshape(-1)]
    return ints


def _tensor_attr(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
    return None


def _inferred(model: onnx.ModelProto) -> onnx.ModelProto:
    # On the weightless skeleton (inference serialises its argument); a model inference
    # cannot handle is still checked against its declared ranks.
    from .ir import _skeleton

    try:
        return onnx.shape_inference.infer_shapes(_skeleton(model), strict_mode=False)
    except Exception:  # noqa: BLE001 - inference raises assorted errors on odd models
        return model


__all__ = ["check_values"]
