"""Structural checks on a ModelProto that name the node and tensor at fault.

``onnx.checker`` reports a dangling edge and a cycle with the same "not topologically sorted"
message; users need to know which one they have and where. This module checks, in one linear
walk per graph (If/Loop/Scan bodies included, with their outer scope):

- every node input is a graph input, an initializer, an outer-scope value or a node output;
- the node graph is acyclic (an acyclic graph that is merely out of order is sorted in place);
- every node's domain is imported by the model (or is a model-local function's domain);
- no tensor is produced twice, nor produced over a graph input, an initializer or a value of
  an enclosing graph (ONNX graphs are in SSA form across scopes);
- every graph output is provided.

A problem inside a body is reported where it is, e.g.
``node 'add' in body of 'loop' reads tensor 'ghost', which ...``; nested bodies read inside out
(``in then_branch of 'if' in body of 'loop'``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import onnx

from .errors import GraphStructureError

_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


def check_structure(model: onnx.ModelProto) -> None:
    """Raise :class:`GraphStructureError` on a malformed graph; sort an unsorted one in place."""
    domains = {entry.domain or "" for entry in model.opset_import}
    if domains & _DEFAULT_DOMAINS:
        # "" and "ai.onnx" name the same domain; a model may import one and use the other.
        domains |= _DEFAULT_DOMAINS
    domains |= {f.domain for f in model.functions}
    _check_graph(model.graph, outer=frozenset(), domains=domains, where="")


def _check_graph(graph: onnx.GraphProto, outer: frozenset[str], domains: set[str], where: str):
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    local |= {t.values.name for t in graph.sparse_initializer}
    defined = outer | local
    produced: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        if (node.domain or "") not in domains:
            imported = ", ".join(sorted(d or "ai.onnx" for d in domains - {""}))
            raise GraphStructureError(
                f"node '{_label(node)}'{where} uses op domain '{node.domain}', which the model "
                f"does not import (imported: {imported})",
                node=node.name,
            )
        for out in node.output:
            if not out:
                continue
            if out in produced:
                first = graph.node[produced[out]]
                raise GraphStructureError(
                    f"tensor '{out}'{where} is produced twice, by node '{_label(first)}' and "
                    f"again by node '{_label(node)}'", node=node.name, tensor=out,
                )
            if out in local:
                raise GraphStructureError(
                    f"tensor '{out}'{where} is a graph input or initializer and is also produced "
                    f"by node '{_label(node)}'", node=node.name, tensor=out,
                )
            if out in outer:
                raise GraphStructureError(
                    f"node '{_label(node)}'{where} produces tensor '{out}', which shadows a "
                    "tensor of the enclosing graph", node=node.name, tensor=out,
                )
            produced[out] = index
    for node in graph.node:
        # Only explicit inputs here: a name a body reads from outer scope is checked inside the
        # body, so the message can name the body's node.
        for name in node.input:
            if name and name not in defined and name not in produced:
                raise GraphStructureError(
                    f"node '{_label(node)}'{where} reads tensor '{name}', which no node, graph "
                    "input or initializer provides (a dangling edge)", node=node.name, tensor=name,
                )
    needs = [_node_inputs(node) for node in graph.node]
    order = _topological_order(graph, needs, produced, where)
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        del graph.node[:]
        graph.node.extend(nodes)
    visible = frozenset(defined | produced.keys())
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                _check_graph(sub, visible, domains, f" in {attr.name} of '{_label(node)}'{where}")
    for value in graph.output:
        if value.name not in defined and value.name not in produced:
            raise GraphStructureError(
                f"graph output '{value.name}'{where} is not produced by any node", tensor=value.name
            )


def _topological_order(
    graph: onnx.GraphProto, needs: list[set[str]], produced: dict[str, int], where: str = ""
) -> list[int]:
    """Kahn's algorithm, stable with respect to the original order; raises on a cycle."""
    preds = [{produced[name] for name in inputs if name in produced} for inputs in needs]
    indegree = [len(p) for p in preds]
    users: list[list[int]] = [[] for _ in graph.node]
    for index, sources in enumerate(preds):
        for pred in sorted(sources):
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
        cycle = _find_cycle(preds, {i for i, d in enumerate(indegree) if d > 0})
        nodes = [graph.node[i] for i in cycle]
        names = " -> ".join(f"'{_label(n)}'" for n in nodes[:6])
        more = f" -> ... ({len(nodes) - 6} more)" if len(nodes) > 6 else ""
        raise GraphStructureError(
            f"the graph{where} has a cycle: {names}{more} -> '{_label(nodes[0])}'",
            node=nodes[0].name,
        )
    return order


def _find_cycle(preds: list[set[int]], stuck: set[int]) -> list[int]:
    """One cycle among ``stuck`` nodes, in data-flow order.

    Every node Kahn's algorithm could not emit waits on another such node, so walking from any
    of them to a stuck predecessor must come back to a node already seen.
    """
    start = min(stuck)
    path: list[int] = []
    seen: dict[int, int] = {}
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(p for p in preds[node] if p in stuck)
    cycle = path[seen[node]:]
    cycle.reverse()  # the walk followed edges backwards
    first = cycle.index(min(cycle))
    return cycle[first:] + cycle[:first]


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """Explicit inputs plus the outer-scope names its subgraphs read (implicit inputs)."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in _subgraphs(attr):
            names |= _free_names(sub)
    return names


def _free_names(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` (and bodies below it) reads but does not define; order-independent."""
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    local |= {t.values.name for t in graph.sparse_initializer}
    local |= {out for node in graph.node for out in node.output if out}
    free = {v.name for v in graph.output}
    for node in graph.node:
        free |= _node_inputs(node)
    return free - local


def _subgraphs(attr: onnx.AttributeProto) -> Iterable[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type} -> {', '.join(node.output)}"
