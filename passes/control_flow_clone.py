"""Copying If/Loop/Scan bodies into the graph that owns them.

A copy maps every tensor the body computes (and every input of a nested body) to a new tensor;
tensors the body reads from outer scopes and the body's own constants are shared, so a copy
reads the same outer values and keeps one initializer however many times it is made. The map
may be seeded: a body input bound to the value it takes (a loop-carried value, the iteration
counter), a body output bound to the tensor that must hold it (the If or Loop output, so no
Identity is needed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import onnx_graphsurgeon as gs

from xattn_compiler.ir import detach, fresh_name, iter_graphs
from xattn_compiler.rewrite import replace_uses

Rename = Callable[[str], str]


class Names:
    """Fresh tensor names: ``name`` itself unless the model already holds it, else ``name_1``..."""

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        for _, body in iter_graphs(graph):
            self.taken.update(t.name for t in body.inputs)
            for node in body.nodes:
                self.taken.update(t.name for t in (*node.inputs, *node.outputs))

    def fresh(self, name: str) -> str:
        return fresh_name(name, self.taken)


def clone_nodes(nodes: Iterable[gs.Node], mapping: dict[int, gs.Tensor], rename: Rename,
                rename_node: Rename) -> list[gs.Node]:
    """Copies of ``nodes`` in order; ``mapping`` (original tensor id -> copy) grows as they go."""
    copies = []
    for node in nodes:
        inputs = [mapping.get(id(t), t) for t in node.inputs]
        outputs = [_copy_output(t, mapping, rename) for t in node.outputs]
        attrs = {key: _copy_attr(value, mapping, rename, rename_node)
                 for key, value in node.attrs.items()}
        copies.append(gs.Node(node.op, rename_node(node.name or node.op), attrs, inputs, outputs,
                              domain=node.domain))
    return copies


def _copy_output(tensor: gs.Tensor, mapping: dict[int, gs.Tensor], rename: Rename) -> gs.Tensor:
    if id(tensor) in mapping:
        return mapping[id(tensor)]
    if not tensor.name:
        return gs.Variable.empty()
    copy = gs.Variable(rename(tensor.name), dtype=tensor.dtype,
                       shape=list(tensor.shape) if tensor.shape is not None else None)
    mapping[id(tensor)] = copy
    return copy


def _copy_attr(value: object, mapping: dict[int, gs.Tensor], rename: Rename,
               rename_node: Rename) -> object:
    if isinstance(value, gs.Graph):
        return clone_graph(value, mapping, rename, rename_node)
    if isinstance(value, list) and value and isinstance(value[0], gs.Graph):
        return [clone_graph(g, mapping, rename, rename_node) for g in value]
    return value


def clone_graph(graph: gs.Graph, mapping: dict[int, gs.Tensor], rename: Rename,
                rename_node: Rename) -> gs.Graph:
    """A copy of a nested body: its inputs and everything it computes get new tensors."""
    inputs = [_copy_output(t, mapping, rename) for t in graph.inputs]
    nodes = clone_nodes(graph.nodes, mapping, rename, rename_node)
    outputs = [mapping.get(id(t), t) for t in graph.outputs]
    return gs.Graph(nodes=nodes, inputs=inputs, outputs=outputs, name=rename_node(graph.name),
                    opset=graph.opset, import_domains=graph.import_domains)


def computed_in(tensor: gs.Tensor, graph: gs.Graph) -> bool:
    """Whether a node of ``graph`` itself (not an outer scope, not a constant) computes it."""
    if not tensor.inputs:
        return False
    writer = tensor.inputs[0]
    return any(node is writer for node in graph.nodes)


def discard_bodies(node: gs.Node) -> None:
    """Disconnect every node of ``node``'s bodies from all tensors.

    Outer tensors a body read would otherwise keep the body's nodes among their readers, and
    reader counts (what later rewrites of the same graph rely on) would be wrong.
    """
    nodes: list[gs.Node] = []
    for value in node.attrs.values():
        for body in value if isinstance(value, list) else [value]:
            if isinstance(body, gs.Graph):
                nodes.extend(n for _, g in iter_graphs(body) for n in g.nodes)
    detach(nodes)


def release(node: gs.Node) -> None:
    """Disconnect the node itself (its outputs get new writers); its bodies stay readable."""
    node.inputs.clear()
    node.outputs.clear()


def seed_outputs(body_outputs: list[gs.Tensor], targets: list[gs.Tensor], body: gs.Graph
                  ) -> dict[int, gs.Tensor]:
    """Body outputs the copy can write straight into their targets: computed in the body and
    bound to one target only (the rest go through :func:`bind`)."""
    mapping: dict[int, gs.Tensor] = {}
    for inner, outer in zip(body_outputs, targets, strict=True):
        if id(inner) not in mapping and computed_in(inner, body) and outer.name:
            mapping[id(inner)] = outer
    return mapping


def bind(targets: list[gs.Tensor], values: list[gs.Tensor], graph: gs.Graph,
          owner: str) -> list[gs.Node]:
    """Make each target hold its value: readers read the value, or an Identity writes a graph
    output (whose name is the interface)."""
    identities = []
    for target, value in zip(targets, values, strict=True):
        if value is target or not target.name:
            continue
        if not replace_uses(target, value, graph):
            identities.append(gs.Node("Identity", f"{owner}.{target.name}", inputs=[value],
                                      outputs=[target]))
    return identities
