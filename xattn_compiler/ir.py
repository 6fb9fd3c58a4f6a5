"""The IR: onnx-graphsurgeon graphs plus the helpers every pass needs.

Passes exchange ``onnx.ModelProto`` (the stable, serialisable form users hold) and edit an
onnx-graphsurgeon ``Graph`` inside (tensors know their producer and consumers; edits are list
assignments; ``cleanup().toposort()`` restores consistency). This module converts between the
two without losing model-level fields, walks If/Loop/Scan bodies, reads constants, runs shape
inference with symbolic dims on models of any size, and offers a networkx view for analyses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import graph_io
from . import weights as _weights  # noqa: F401  (graphsurgeon reads detached weights)
from .structure import needs_separating, separate_scopes

_SUBGRAPH_ATTRS = ("then_branch", "else_branch", "body")


# --- proto level ---------------------------------------------------------------------------

# The standard ops with graph attributes; only these (and ops of other domains) can own bodies.
# Asked for every node by every walk over bodies, so the common answer is one set lookup.
_BODY_OPS = frozenset({"If", "Loop", "Scan", "SequenceMap"})
_DEFAULT_DOMAINS = (None, "", "ai.onnx")


def _may_own_bodies(op: str, domain: str | None) -> bool:
    return op in _BODY_OPS or domain not in _DEFAULT_DOMAINS


def iter_graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every If/Loop/Scan body below it, outermost first."""
    yield graph
    for node in graph.node:
        if not _may_own_bodies(node.op_type, node.domain):
            continue
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graph_protos(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graph_protos(sub)


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, those in If/Loop/Scan bodies included."""
    for body in iter_graph_protos(graph):
        yield from body.node


def iter_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every initializer and tensor-valued attribute (Constant values), subgraphs included."""
    for graph in iter_graph_protos(model.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.TENSORS:
                    yield from attr.tensors


def count_nodes(model: onnx.ModelProto) -> int:
    """Number of nodes, those inside If/Loop/Scan bodies included."""
    return sum(len(g.node) for g in iter_graph_protos(model.graph))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """How many nodes of each op type the model has, bodies included."""
    counts: dict[str, int] = {}
    for graph in iter_graph_protos(model.graph):
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


# --- graphsurgeon level --------------------------------------------------------------------

def import_graph(model: onnx.ModelProto, value_info: bool = True) -> gs.Graph:
    """An onnx-graphsurgeon graph of ``model`` (bodies of If/Loop/Scan included).

    Without ``value_info`` the model's recorded types are not read: for a caller that sets
    every tensor's type itself right after (:func:`refresh_shapes`).
    """
    graph = graph_io.import_onnx(_separated(model), value_info=value_info)
    # graphsurgeon keeps the model's own opset list and appends to it on export (a new domain
    # such as com.microsoft): the graph gets a copy, so the model is never written to.
    domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in model.opset_import]
    for _, body in iter_graphs(graph):
        if body.import_domains is not None:
            body.import_domains = list(domains)
    return graph


def _separated(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy whose bodies no longer reuse names of the rest of the model.

    ``load`` separates scopes in place; a model built or loaded otherwise whose body reuses an
    outer or sibling name (optimum's merged decoders do) would have graphsurgeon make the two
    tensors one, so it is separated here, on a copy: the caller's model is not written to.
    """
    if not any(_may_own_bodies(n.op_type, n.domain) for n in model.graph.node):
        return model
    if not needs_separating(model):
        return model
    separated = onnx.ModelProto()
    separated.CopyFrom(model)
    separate_scopes(separated)
    return separated


def import_with_shapes(model: onnx.ModelProto) -> gs.Graph:
    """``import_graph(infer_shapes(model))`` without copying the model.

    The graph's constants stay views of ``model``'s initializers (graphsurgeon reads them
    lazily), so a multi-gigabyte model is not duplicated; shapes come from inference on the
    weightless skeleton. :func:`export_model` never writes into those initializers.
    """
    model = _separated(model)  # shapes are refreshed by name: the names must be the graph's
    inferred = _infer_skeleton(model)
    graph = import_graph(model, value_info=False)
    refresh_shapes(graph, inferred)
    return graph


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` and carry over the model-level fields of ``like``.

    graphsurgeon drops metadata and keeps its own producer fields; a pass must not change
    anything it did not mean to, so those are copied back from the original model.
    """
    remove_dead_nodes(graph)
    toposort(graph)
    _own_renamed_constants(graph)
    out = graph_io.export_onnx(graph)
    out.ir_version = like.ir_version
    out.producer_name = like.producer_name
    out.producer_version = like.producer_version
    out.domain = like.domain
    out.model_version = like.model_version
    out.doc_string = like.doc_string
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    imports = {(e.domain or ""): e.version for e in out.opset_import}
    for entry in like.opset_import:
        imports[entry.domain or ""] = max(imports.get(entry.domain or "", 0), entry.version)
    del out.opset_import[:]
    out.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    if not out.functions and like.functions:
        out.functions.extend(like.functions)
    return out


def remove_dead_nodes(graph: gs.Graph) -> int:
    """Drop the nodes no graph output depends on, in bodies too; returns how many went.

    What ``gs.Graph.cleanup`` does, in time linear in the graph (its own cost grows with the
    number of bodies times the graph, which dominated passes on 100k-node models). A node with
    bodies keeps alive whatever its bodies read from outer scopes. Graph inputs stay.
    """
    for tensor in graph.inputs:
        tensor.inputs.clear()
    live = live_nodes(graph)
    kept = [node for node in graph.nodes if id(node) in live]
    removed = len(graph.nodes) - len(kept)
    if removed:
        detach([node for node in graph.nodes if id(node) not in live])
        graph.nodes = kept
    for node in kept:
        for body in _bodies(node):
            removed += remove_dead_nodes(body)
    return removed


def live_nodes(graph: gs.Graph, local: set[int] | None = None) -> set[int]:
    """Ids of the nodes some output of ``graph`` depends on (through bodies' outer reads too);
    with ``local``, the walk stays among those node ids."""
    live: set[int] = set()
    stack = [t.inputs[0] for t in graph.outputs if t.inputs]
    # Inlined walk (no generators, no helper calls): it visits every node of every liveness
    # check, several per pass, and was a tenth of a 100k-node clean-up.
    while stack:
        node = stack.pop()
        key = id(node)
        if key in live or (local is not None and key not in local):
            continue
        live.add(key)
        for tensor in node.inputs:
            writers = tensor.inputs
            if writers and id(writers[0]) not in live:
                stack.append(writers[0])
        if _may_own_bodies(node.op, node.domain):
            stack.extend(t.inputs[0] for t in _outer_reads(node) if t.inputs)
    return live


def detach(nodes: list[gs.Node]) -> None:
    """Disconnect ``nodes`` from every tensor they read or write, all at once.

    graphsurgeon unlinks one reader at a time with ``list.remove`` (deep node comparison), so
    dropping the readers of a constant every layer shares is quadratic; this filters each
    touched tensor's reader list once, by identity.
    """
    gone = {id(node) for node in nodes}
    touched: dict[int, gs.Tensor] = {}
    for node in nodes:
        for tensor in node.inputs:
            touched[id(tensor)] = tensor
        for tensor in node.outputs:
            if any(id(writer) in gone for writer in tensor.inputs):
                kept = [w for w in tensor.inputs if id(w) not in gone]
                list.clear(tensor.inputs)
                list.extend(tensor.inputs, kept)
        list.clear(node.inputs)
        list.clear(node.outputs)
    for tensor in touched.values():
        readers = [r for r in tensor.outputs if id(r) not in gone]
        list.clear(tensor.outputs)
        list.extend(tensor.outputs, readers)


def toposort(graph: gs.Graph) -> None:
    """Order nodes so every producer comes before its readers, bodies included.

    Stable: an already ordered graph keeps its order, and otherwise a node moves only as far
    as its inputs require (ready nodes are taken in their original order), so a rewrite that
    appends nodes changes the order locally. Linear (plus a heap) in the graph's size.
    """
    import heapq

    for node in graph.nodes:
        for body in _bodies(node):
            toposort(body)
    position = {id(node): i for i, node in enumerate(graph.nodes)}
    waiting: list[int] = [0] * len(graph.nodes)
    readers: list[list[int]] = [[] for _ in graph.nodes]
    for i, node in enumerate(graph.nodes):
        sources = {id(t.inputs[0]) for t in node.inputs if t.inputs}
        if node.attrs:
            sources.update(id(t.inputs[0]) for t in _outer_reads(node) if t.inputs)
        for source in sources:
            j = position.get(source)
            if j is not None and j != i:
                readers[j].append(i)
                waiting[i] += 1
    if all(j > i for i, after in enumerate(readers) for j in after):
        return
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in readers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(graph.nodes):
        stuck = next(graph.nodes[i] for i, count in enumerate(waiting) if count > 0)
        raise ValueError(f"graph {graph.name!r} has a cycle through node {stuck.name!r} ({stuck.op})")
    graph.nodes = [graph.nodes[i] for i in order]


def _bodies(node: gs.Node) -> list[gs.Graph]:
    if not _may_own_bodies(node.op, node.domain):
        return []
    bodies = []
    for value in node.attrs.values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, gs.Graph):
                bodies.append(item)
    return bodies


def _outer_reads(node: gs.Node) -> list[gs.Tensor]:
    """Tensors a node's bodies read without computing them: its implicit inputs."""
    bodies = _bodies(node)
    if not bodies:
        return []
    reads: list[gs.Tensor] = []
    for body in bodies:
        inner = {id(t) for t in body.inputs}
        for inner_node in body.nodes:
            inner.update(id(t) for t in inner_node.outputs)
        for inner_node in body.nodes:
            reads.extend(t for t in inner_node.inputs if id(t) not in inner)
            reads.extend(t for t in _outer_reads(inner_node) if id(t) not in inner)
        reads.extend(t for t in body.outputs if id(t) not in inner)
    return reads


def _own_renamed_constants(graph: gs.Graph) -> None:
    """Give a renamed constant its own copy of the initializer it was imported from, and a
    constant whose external bytes were read a plain data location.

    graphsurgeon exports a lazily read constant by reusing the imported TensorProto and
    setting its name: without this, renaming a constant would rename the initializer in the
    model the graph was imported from (which :func:`import_with_shapes` does not copy).
    """
    from onnx_graphsurgeon.ir.tensor import LazyValues

    for _, body in iter_graphs(graph):
        for node in body.nodes:
            for tensor in node.inputs:
                if not isinstance(tensor, gs.Constant):
                    continue
                values = tensor._values
                if isinstance(values, LazyValues) and values.tensor.name != tensor.name:
                    owned = onnx.TensorProto()
                    owned.CopyFrom(values.tensor)
                    tensor._values = LazyValues(owned)
                elif not isinstance(values, LazyValues) and \
                        tensor.data_location == onnx.TensorProto.EXTERNAL:
                    # Read (so loaded) from external data or a detached weight, it now holds
                    # its bytes; exported with the flag it would claim to live in a file.
                    tensor.data_location = None


def iter_graphs(graph: gs.Graph, path: str = "") -> Iterator[tuple[str, gs.Graph]]:
    """``(path, graph)`` for the graph and every nested body; the top level's path is ``""``.

    A body's path names the owning node and attribute, e.g. ``"/loop_0/body"``, so reports
    can say where inside control flow something was found.
    """
    yield path, graph
    for node in graph.nodes:
        if not _may_own_bodies(node.op, node.domain):
            continue
        for attr_name, value in node.attrs.items():
            bodies = value if isinstance(value, list) else [value]
            for index, body in enumerate(bodies):
                if isinstance(body, gs.Graph):
                    suffix = f"[{index}]" if isinstance(value, list) else ""
                    yield from iter_graphs(body, f"{path}/{node.name or node.op}/{attr_name}{suffix}")


def fresh_name(hint: str, taken: set[str]) -> str:
    """``hint``, or ``hint_N`` with the smallest ``N`` not in ``taken`` (deterministic, so a
    pass names what it makes the same way on every run); the name is added to ``taken``."""
    name, n = hint, 0
    while name in taken:
        n += 1
        name = f"{hint}_{n}"
    taken.add(name)
    return name


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes ``tensor``, or None for inputs and constants."""
    return tensor.inputs[0] if tensor.inputs else None


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of ``tensor`` when it is an initializer or a Constant node's output."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        value = node.attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    return None


def is_graph_output(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    return any(out is tensor for out in graph.outputs)


# --- shapes --------------------------------------------------------------------------------

def infer_shapes(
    model: onnx.ModelProto, *, strict: bool = False, in_place: bool = False
) -> onnx.ModelProto:
    """Shape inference with symbolic dims and data propagation, on models of any size.

    ONNX shape inference serialises the model, which fails past 2 GB; it only needs tensor
    shapes and the values of small tensors (Reshape targets), so it runs on a skeleton whose
    large initializers are replaced by typed graph inputs, and the inferred value_info is
    copied back onto the full model (``model`` itself with ``in_place``, which saves a copy
    of the weights; else a copy). Memory stays bounded by the model's size: see
    :func:`_skeleton` for the long 1-D tensors data propagation would expand.
    """
    inferred = _infer_skeleton(model, strict=strict)
    out = model
    if not in_place:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    _copy_value_info(inferred.graph, out.graph)
    return out


_ITEMSIZE: dict[int, int] = {}


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """The size of a tensor's data from its dims and element type, without reading the data
    (``ByteSize`` serialises the tensor: a millisecond for a large weight, asked per weight
    per pass). Strings and unknown types fall back to ``ByteSize``."""
    kind = tensor.data_type
    if kind not in _ITEMSIZE:
        try:
            _ITEMSIZE[kind] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(kind)).itemsize
        except (KeyError, TypeError, ValueError):
            _ITEMSIZE[kind] = 0
        if kind == onnx.TensorProto.STRING:
            _ITEMSIZE[kind] = 0
    if not _ITEMSIZE[kind]:
        return tensor.ByteSize()
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * _ITEMSIZE[kind]


#: Bits per element of the packed sub-byte types this onnx package knows.
SUB_BYTE_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2), ("INT2", 2))
    if hasattr(onnx.TensorProto, name)
}


def packed_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes of the tensor's raw data from its dims and type; None for types without a
    fixed size (strings) or that this onnx package does not know."""
    count = 1
    for dim in tensor.dims:
        count *= dim
    bits = SUB_BYTE_BITS.get(tensor.data_type)
    if bits is not None:
        return (count * bits + 7) // 8
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return count * itemsize if tensor.data_type != onnx.TensorProto.STRING else None


#: 1-D tensors longer than this are given a symbolic length while data propagation runs.
#: Shape values (the data it propagates) have one entry per dim, so they are never this long.
LONG_1D = 1 << 12
_LENGTH_PARAM = "xattn_len_"


def _infer_skeleton(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    """Inference with data propagation on ``model``'s skeleton, long lengths restored."""
    skeleton = _skeleton(model, data_prop=True)
    inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=strict, data_prop=True)
    if _renamed_lengths(skeleton):  # else a walk over every dim of every value for nothing
        _restore_lengths(inferred.graph)
    return inferred


def _renamed_lengths(skeleton: onnx.ModelProto) -> bool:
    return any(dim.dim_param.startswith(_LENGTH_PARAM)
               for value in skeleton.graph.input for dim in value.type.tensor_type.shape.dim)


def _skeleton(model: onnx.ModelProto, threshold: int = 1 << 16,
              data_prop: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference whose initializers of ``threshold`` bytes or
    more are typed graph inputs. For inference with ``data_prop``, so are its Constant nodes
    that large, and every 1-D graph input longer than :data:`LONG_1D` has a symbolic length.

    Why the lengths: ONNX's data propagation treats a 1-D tensor of known length as a shape
    and builds one symbolic dim per element (about 200 bytes each), so ``Add`` on a 64 MB 1-D
    tensor took 3.7 GB. As ``xattn_len_<n>`` the length is unknown to it, elementwise ops and
    broadcasts carry the name, and :func:`_restore_lengths` turns it back into ``n``.
    Built field by field so neither the weights are copied nor the caller's model touched;
    a model with none of these is its own skeleton (inference does not write to it).
    """
    def stays(tensor: onnx.TensorProto) -> bool:
        # A tensor whose bytes live elsewhere (external data, a detached weight) is never
        # read by inference; as a typed input it cannot make inference look for them.
        return (tensor.data_location != onnx.TensorProto.EXTERNAL
                and tensor_nbytes(tensor) < threshold)

    source = model.graph
    large_constants = [i for i, node in enumerate(source.node)
                       if node.op_type == "Constant" and _large_constant(node, stays)
                       ] if data_prop else []
    long_inputs = data_prop and any(_long_1d(value) for value in source.input)
    held = _identities_of_constants(source, stays) if data_prop else {}
    if all(stays(tensor) for tensor in source.initializer) and not large_constants \
            and not long_inputs and not held:
        return model
    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.name = source.name
    for name in ("node", "output", "value_info", "sparse_initializer"):
        getattr(graph, name).extend(getattr(source, name))
    inputs = list(source.input)
    for tensor in source.initializer:
        if stays(tensor):
            graph.initializer.append(tensor)
        else:
            inputs.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    for index in large_constants:
        # Same position, same output: body value_info is copied back by node position.
        node, value = graph.node[index], graph.node[index].attribute[0].t
        feed = f"{node.output[0]}__xattn_value"
        inputs.append(onnx.helper.make_tensor_value_info(feed, value.data_type, list(value.dims)))
        graph.node[index].CopyFrom(onnx.helper.make_node(
            "Identity", [feed], [node.output[0]], name=node.name))
    for index, value in held.items():
        # ONNX propagates no data through Identity: a shape constant behind one (exporters'
        # clutter) would leave every Reshape reading it without a shape. Same position,
        # same output, the constant's value.
        node = graph.node[index]
        graph.node[index].CopyFrom(onnx.helper.make_node(
            "Constant", [], [node.output[0]], name=node.name, value=value))
    graph.input.extend(_with_symbolic_length(v) if data_prop else v for v in inputs)
    return skeleton


def _identities_of_constants(graph: onnx.GraphProto, stays) -> dict[int, onnx.TensorProto]:
    """Node index -> value, for each Identity of a small initializer or Constant of ``graph``."""
    values = {t.name: t for t in graph.initializer if stays(t)}
    found: dict[int, onnx.TensorProto] = {}
    for index, node in enumerate(graph.node):
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output \
                and len(node.attribute) == 1 and node.attribute[0].name == "value" \
                and stays(node.attribute[0].t):
            values[node.output[0]] = node.attribute[0].t
        elif (node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.input
              and node.input[0] in values and node.output):
            found[index] = values[node.input[0]]
            values[node.output[0]] = values[node.input[0]]
    return found


def _large_constant(node: onnx.NodeProto, stays) -> bool:
    return (node.op_type == "Constant" and node.domain in ("", "ai.onnx")
            and len(node.attribute) == 1 and node.attribute[0].name == "value"
            and not stays(node.attribute[0].t))


def _long_1d(value: onnx.ValueInfoProto) -> bool:
    dims = value.type.tensor_type.shape.dim
    return len(dims) == 1 and dims[0].HasField("dim_value") and dims[0].dim_value > LONG_1D


def _with_symbolic_length(value: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    if not _long_1d(value):
        return value
    renamed = onnx.ValueInfoProto()
    renamed.CopyFrom(value)
    dim = renamed.type.tensor_type.shape.dim[0]
    dim.dim_param = f"{_LENGTH_PARAM}{dim.dim_value}"  # clears dim_value (a oneof)
    return renamed


def _restore_lengths(graph: onnx.GraphProto) -> None:
    """``xattn_len_<n>`` dims (from :func:`_skeleton`) back to ``n``, bodies included."""
    for body in iter_graph_protos(graph):
        for value in (*body.value_info, *body.output, *body.input):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param.startswith(_LENGTH_PARAM):
                    dim.dim_value = int(dim.dim_param[len(_LENGTH_PARAM):])


def _copy_value_info(source: onnx.GraphProto, target: onnx.GraphProto) -> None:
    known = {v.name for v in target.input} | {v.name for v in target.output}
    del target.value_info[:]
    target.value_info.extend(v for v in source.value_info if v.name not in known)
    by_name = {v.name: v for v in source.output}
    for value in target.output:
        if value.name in by_name and not value.type.tensor_type.HasField("shape"):
            value.CopyFrom(by_name[value.name])
    for src_node, dst_node in zip(source.node, target.node, strict=False):
        for src_attr, dst_attr in zip(src_node.attribute, dst_node.attribute, strict=False):
            if src_attr.type == onnx.AttributeProto.GRAPH:
                _copy_value_info(src_attr.g, dst_attr.g)


def refresh_shapes(graph: gs.Graph, model: onnx.ModelProto) -> None:
    """Give ``graph``'s tensors the types and shapes recorded in ``model`` (its export, inferred).

    Afterwards the graph holds what a fresh import of ``model`` would, without the import:
    a pass that rewrites in rounds keeps one graph and only refreshes what shape inference
    learned. Tensors ``model`` records nothing for get no shape, as on import.
    """
    from onnx_graphsurgeon.importers.onnx_importer import (
        get_onnx_tensor_dtype,
        get_onnx_tensor_shape,
        get_onnx_tensor_type,
    )

    known: dict[str, onnx.ValueInfoProto] = {}
    for proto in iter_graph_protos(model.graph):
        for value in (*proto.input, *proto.output, *proto.value_info):
            known.setdefault(value.name, value)
    # Layers repeat: most tensors share their type with many others, so each distinct type is
    # parsed once (keyed by its bytes) with graphsurgeon's own conversion of the element type.
    parsed: dict[bytes, tuple[Any, list | None, str | None]] = {}
    set_attr = object.__setattr__  # dtype and shape are plain attributes; skip gs's hook
    for _, body in iter_graphs(graph):
        for tensor in _variables(body):
            value = known.get(tensor.name)
            if value is None:
                set_attr(tensor, "dtype", None)
                set_attr(tensor, "shape", None)
                continue
            key = value.type.SerializeToString()
            if key not in parsed:
                parsed[key] = (get_onnx_tensor_dtype(value), get_onnx_tensor_shape(value),
                               get_onnx_tensor_type(value) if key else None)
            dtype, shape, kind = parsed[key]
            set_attr(tensor, "dtype", dtype)
            set_attr(tensor, "shape", list(shape) if shape is not None else None)
            if kind is not None:  # a sequence stays a sequence on export
                set_attr(tensor, "type", kind)


def _variables(graph: gs.Graph) -> Iterator[gs.Variable]:
    seen: set[int] = set()
    for tensor in (*graph.inputs, *graph.outputs,
                   *(t for node in graph.nodes for t in (*node.inputs, *node.outputs))):
        if isinstance(tensor, gs.Variable) and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def shape_of(tensor: gs.Tensor) -> list[int | str | None] | None:
    """The tensor's shape: ints for static dims, names for symbolic dims, None for unknown."""
    if tensor.shape is None:
        return None
    return [d if isinstance(d, (int, str)) else None for d in tensor.shape]


# --- graph analysis --------------------------------------------------------------------------

def to_networkx(graph: gs.Graph) -> nx.MultiDiGraph:
    """Nodes of ``graph`` as a networkx multigraph, one edge per tensor from producer to user.

    Node keys are positions in ``graph.nodes`` (names may be empty or repeated); each key has
    ``node`` (the gs.Node) and each edge ``tensor`` (the gs.Tensor) as data.
    """
    view = nx.MultiDiGraph()
    index = {id(node): i for i, node in enumerate(graph.nodes)}
    for i, node in enumerate(graph.nodes):
        view.add_node(i, node=node)
    for i, node in enumerate(graph.nodes):
        for tensor in node.inputs:
            src = producer(tensor)
            if src is not None and id(src) in index:
                view.add_edge(index[id(src)], i, tensor=tensor)
    return view
