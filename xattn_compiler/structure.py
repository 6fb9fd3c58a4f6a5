"""Structural checks on a ModelProto that name the node and tensor at fault.

``onnx.checker`` reports a dangling edge and a cycle with the same "not topologically sorted"
message; users need to know which one they have and where. This module checks, in one linear
walk per graph (If/Loop/Scan bodies included, with their outer scope):

- every node input is a graph input, an initializer, an outer-scope value or a node output;
- the node graph is acyclic (an acyclic graph that is merely out of order is sorted in place);
- every node's domain is imported by the model (or is a model-local function's domain);
- no tensor is produced twice.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import onnx

from .errors import GraphStructureError


def check_structure(model: onnx.ModelProto) -> None:
    """Raise :class:`GraphStructureError` on a malformed graph; sort an unsorted one in place."""
    domains = {entry.domain or "" for entry in model.opset_import}
    domains |= {"ai.onnx"} if "" in domains else set()
    domains |= {f.domain for f in model.functions}
    _check_graph(model.graph, outer=frozenset(), domains=domains, where="")


def _check_graph(graph: onnx.GraphProto, outer: frozenset[str], domains: set[str], where: str):
    defined = set(outer) | {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {t.name for t in graph.sparse_initializer}
    produced: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        if (node.domain or "") not in domains:
            raise GraphStructureError(
                f"node '{_label(node)}'{where} uses op domain '{node.domain}', which the model "
                f"does not import (imported: {', '.join(sorted(d or 'ai.onnx' for d in domains))})",
                node=node.name,
            )
        for out in node.output:
            if not out:
                continue
            if out in produced or out in defined - set(outer):
                raise GraphStructureError(
                    f"tensor '{out}'{where} is produced twice (again by node '{_label(node)}')",
                    node=node.name, tensor=out,
                )
            produced[out] = index
    needs = [_node_inputs(node) for node in graph.node]
    for node, inputs in zip(graph.node, needs):
        for name in inputs:
            if name not in defined and name not in produced:
                raise GraphStructureError(
                    f"node '{_label(node)}'{where} reads tensor '{name}', which no node, graph "
                    "input or initializer provides (a dangling edge)", node=node.name, tensor=name,
                )
    order = _topological_order(graph, needs, produced)
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)
    visible = frozenset(defined | set(produced))
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                _check_graph(sub, visible, domains, f"{where} in {attr.name} of '{_label(node)}'")
    for value in graph.output:
        if value.name not in defined and value.name not in produced:
            raise GraphStructureError(
                f"graph output '{value.name}'{where} is not produced by any node", tensor=value.name
            )


def _topological_order(graph: onnx.GraphProto, needs: list[set[str]], produced: dict[str, int]):
    """Kahn's algorithm, stable with respect to the original order; raises on a cycle."""
    indegree = [0] * len(graph.node)
    users: list[list[int]] = [[] for _ in graph.node]
    for index, inputs in enumerate(needs):
        for pred in {produced[name] for name in inputs if name in produced}:
            indegree[index] += 1
            users[pred].append(index)
    ready = deque(i for i, d in enumerate(indegree) if d == 0)
    order: list[int] = []
    while ready:
        index = ready.popleft()
        order.append(index)
        for user in users[index]:
            indegree[user] -= 1
            if indegree[user] == 0:
                ready.append(user)
    if len(order) < len(graph.node):
        stuck = [graph.node[i] for i, d in enumerate(indegree) if d > 0]
        names = ", ".join(f"'{_label(n)}'" for n in stuck[:4])
        more = f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""
        raise GraphStructureError(
            f"the graph has a cycle through nodes {names}{more}", node=stuck[0].name
        )
    return order


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """Explicit inputs plus the outer-scope names its subgraphs read (implicit inputs)."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            names |= _free_names(sub)
    return names


def _free_names(graph: onnx.GraphProto) -> set[str]:
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    free: set[str] = set()
    for node in graph.node:
        free |= {name for name in _node_inputs(node) if name not in local}
        local |= set(node.output)
    free |= {v.name for v in graph.output if v.name not in local}
    return free


def _subgraphs(attr: onnx.AttributeProto) -> Iterable[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type} -> {', '.join(node.output)}"
