"""ONNX model <-> onnx-graphsurgeon graph, built the way graphsurgeon builds them, faster.

Every graph pass imports a model and exports it again; on a 100k-node model graphsurgeon's
own importer and exporter were a third of a clean-up. What they cost is generic work per
node and tensor: a logger call with a formatted message for every tensor the model has no
value_info for, ``onnx.helper`` builders that validate and copy, value_info built field by
field for every tensor, and the whole graph copied twice more into the model. These two
functions produce the same objects (the tests compare exports byte for byte) with the work
per node cut down: tensor types are built once per distinct type and copied, protos are
filled in place. Everything unusual (model-local functions, sparse initializers) goes to
graphsurgeon itself, as do node attributes (its conversions are the reference).
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter
from onnx_graphsurgeon.importers.onnx_importer import (
    OnnxImporter,
    get_onnx_tensor_dtype,
    get_onnx_tensor_shape,
    get_onnx_tensor_type,
)
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

# --- import ----------------------------------------------------------------------------------

def import_onnx(model: onnx.ModelProto, value_info: bool = True) -> gs.Graph:
    """``gs.import_onnx(model)``; with ``value_info=False`` the value_info is not read
    (the caller sets every type afterwards, as :func:`ir.refresh_shapes` does)."""
    if len(model.functions) or len(model.graph.sparse_initializer):
        return gs.import_onnx(model)
    opset = OnnxImporter.get_opset(model)
    domains = OnnxImporter.get_import_domains(model)
    source = model.graph
    local: dict[str, gs.Tensor] = {}
    for initializer in source.initializer:
        if initializer.name not in local:
            location = (int(initializer.data_location) if initializer.HasField("data_location")
                        else None)
            local[initializer.name] = gs.Constant(initializer.name, LazyValues(initializer),
                                                  data_location=location)
    if value_info:
        for value in source.value_info:
            known = local.get(value.name)
            if known is None:
                local[value.name] = _variable(value)
            elif isinstance(known, gs.Variable):  # a repeated entry adds what the first lacked
                other = _variable(value)
                known.dtype = known.dtype or other.dtype
                known.shape = known.shape or other.shape
    initializers = {t.name for t in source.initializer}
    inputs = [_io_tensor(value, local) for value in source.input if value.name not in initializers]
    outputs = [_io_tensor(value, local) for value in source.output]
    nodes = [_node(node, local, opset, domains) for node in source.node]
    graph = gs.Graph(nodes=[], inputs=inputs, outputs=outputs, name=source.name,
                     doc_string=source.doc_string, producer_name=model.producer_name,
                     producer_version=model.producer_version, opset=opset,
                     import_domains=domains, functions=[], ir_version=model.ir_version)
    # Given the nodes, the constructor walks every body to merge the functions bodies
    # declare; without model-local functions (else graphsurgeon imported it) there are none.
    graph.nodes = nodes
    return graph


def _variable(value: onnx.ValueInfoProto) -> gs.Variable:
    tensor = gs.Variable(value.name)
    if value.type.ByteSize() > 0:
        tensor.dtype = get_onnx_tensor_dtype(value)
        tensor.shape = get_onnx_tensor_shape(value)
        tensor.type = get_onnx_tensor_type(value)
    return tensor


def _io_tensor(value: onnx.ValueInfoProto, local: dict[str, gs.Tensor]) -> gs.Tensor:
    tensor = local.get(value.name)
    if tensor is None:
        tensor = local[value.name] = _variable(value)
    return tensor


def _tensors(names, local: dict[str, gs.Tensor]) -> list[gs.Tensor]:
    """The graph's tensors of these names; a name not seen yet is a new variable of this graph
    (an omitted optional one, ``""``, an empty tensor of its own)."""
    tensors = []
    for name in names:
        tensor = local.get(name)
        if tensor is None:
            tensor = gs.Variable.empty() if not name else local.setdefault(name, gs.Variable(name))
        tensors.append(tensor)
    return tensors


def _node(proto: onnx.NodeProto, local: dict[str, gs.Tensor], opset, domains) -> gs.Node:
    inputs, outputs = _tensors(proto.input, local), _tensors(proto.output, local)
    attrs = (OnnxImporter.import_attributes(proto.attribute, {}, local, opset, domains)
             if len(proto.attribute) else {})
    return gs.Node(op=proto.op_type, name=proto.name, attrs=attrs, inputs=inputs,
                   outputs=outputs, domain=proto.domain if proto.HasField("domain") else None)


# --- export ----------------------------------------------------------------------------------

def export_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """``gs.export_onnx(graph, do_type_check=False)``."""
    if graph.functions:
        return gs.export_onnx(graph, do_type_check=False)
    model = onnx.ModelProto()
    model.ir_version = onnx.IR_VERSION
    _fill_graph(model.graph, graph, {})
    model.opset_import.extend(_import_domains(graph))
    model.producer_name = graph.producer_name
    model.producer_version = graph.producer_version
    if graph.ir_version is not None:
        model.ir_version = graph.ir_version
    return model


def _import_domains(graph: gs.Graph) -> list[onnx.OperatorSetIdProto]:
    """graphsurgeon's ``update_import_domains``: the graph's opset list, plus version 1 of
    every domain a node (in bodies too) uses that the list lacks. Updates the graph's list."""
    from .ir import iter_graphs  # ir imports this module

    if graph.import_domains is None:
        graph.import_domains = [onnx.helper.make_opsetid("", graph.opset)]
    used = {node.domain for _, body in iter_graphs(graph) for node in body.nodes}
    used.discard(None)
    known = {entry.domain for entry in graph.import_domains}
    for domain in sorted(used - known, key=str):
        graph.import_domains.append(onnx.helper.make_opsetid(domain, 1))
    return graph.import_domains


def _fill_graph(proto: onnx.GraphProto, graph: gs.Graph, types: dict) -> None:
    """Write ``graph`` into the empty ``proto``; ``types`` caches one TypeProto per type."""
    for node in graph.nodes:
        _fill_node(proto.node.add(), node, types)
    proto.name = graph.name
    proto.input.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.inputs)
    proto.output.extend(OnnxExporter.export_value_info_proto(t, False) for t in graph.outputs)
    tensors = graph.tensors()
    for tensor in tensors.values():
        if isinstance(tensor, gs.Constant):
            if isinstance(tensor._values, SparseValues):
                proto.sparse_initializer.append(OnnxExporter.export_sparse_tensor_proto(tensor))
            else:
                proto.initializer.append(OnnxExporter.export_tensor_proto(tensor))
    if graph.doc_string:
        proto.doc_string = graph.doc_string
    for tensor in (*graph.inputs, *graph.outputs):
        tensors.pop(tensor.name, None)
    for tensor in tensors.values():
        if isinstance(tensor, gs.Variable) and (tensor.dtype is not None or tensor.shape is not None):
            _fill_value_info(proto.value_info.add(), tensor, types)


def _fill_node(proto: onnx.NodeProto, node: gs.Node, types: dict) -> None:
    proto.op_type = node.op
    proto.input.extend([t.name for t in node.inputs])
    proto.output.extend([t.name for t in node.outputs])
    if node.name:
        proto.name = node.name
    if node.domain is not None:
        proto.domain = node.domain
    for key, value in node.attrs.items():
        if isinstance(value, gs.Graph):
            attribute = proto.attribute.add()
            attribute.name = key
            attribute.type = onnx.AttributeProto.GRAPH
            _fill_graph(attribute.g, value, types)
        else:
            proto.attribute.extend(OnnxExporter.export_attributes({key: value}))


def _fill_value_info(proto: onnx.ValueInfoProto, tensor: gs.Variable, types: dict) -> None:
    shape = tensor.shape
    key = (tensor.dtype, tensor.type, None if shape is None else tuple(shape))
    cached = types.get(key)
    if cached is None:
        cached = types[key] = OnnxExporter.export_value_info_proto(tensor, False).type
    proto.name = tensor.name
    proto.type.CopyFrom(cached)
