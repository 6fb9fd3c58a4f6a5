"""Structural checks on a ModelProto that name the node and tensor at fault.

``onnx.checker`` reports a dangling edge and a cycle with the same "not topologically sorted"
message; users need to know which one they have and where. This module checks, in one linear
walk per graph (If/Loop/Scan bodies included, with their outer scope):

- every node input is a graph input, an initializer, an outer-scope value or a node output;
- the node graph is acyclic (an acyclic graph that is merely out of order is sorted in place);
- every node's domain is imported by the model (or is a model-local function's domain);
- no tensor is produced twice, nor produced over a graph input, an initializer or a value of
  an enclosing graph that is visible where the body's node stands (ONNX graphs are in SSA form
  across scopes);
- every graph output is provided.

What ``onnx.checker`` and ONNX Runtime accept, this accepts: a body may define a name its own
node produces, or a later node of an enclosing graph (optimum's merged decoders name the
outputs of both If branches after the If's outputs). Such a name is then two tensors, which
onnx-graphsurgeon, whose importer maps names to tensors across scopes, would take for one;
:func:`separate_scopes` renames the body's copy (body outputs bind by position, so the
meaning is unchanged).

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
_GRAPH_TYPES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def check_structure(model: onnx.ModelProto) -> None:
    """Raise :class:`GraphStructureError` on a malformed graph; sort an unsorted one in place."""
    domains = {entry.domain or "" for entry in model.opset_import}
    if domains & _DEFAULT_DOMAINS:
        # "" and "ai.onnx" name the same domain; a model may import one and use the other.
        domains |= _DEFAULT_DOMAINS
    domains |= {f.domain for f in model.functions}
    _check_graph(model.graph, outer=_Scope(None, {}, 0), domains=domains, where="")
    separate_scopes(model)


class _Scope:
    """The names a body can see: those of its graph defined before the body's node (graph
    inputs and initializers at position -1, node outputs at their node's position), and so on
    outwards. A view, not a copy, so a graph with many bodies is not copied per body."""

    def __init__(self, parent: _Scope | None, positions: dict[str, int], limit: int):
        self.parent, self.positions, self.limit = parent, positions, limit

    def __contains__(self, name: str) -> bool:
        scope: _Scope | None = self
        while scope is not None:
            if scope.positions.get(name, scope.limit) < scope.limit:
                return True
            scope = scope.parent
        return False


def _check_graph(graph: onnx.GraphProto, outer: _Scope, domains: set[str], where: str):
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    local |= {t.values.name for t in graph.sparse_initializer}
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
            if name and name not in local and name not in produced and name not in outer:
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
    _check_bodies(graph, outer, local, domains, where)
    for value in graph.output:
        if value.name not in local and value.name not in produced and value.name not in outer:
            raise GraphStructureError(
                f"graph output '{value.name}'{where} is not produced by any node", tensor=value.name
            )


def _check_bodies(graph: onnx.GraphProto, outer: _Scope, local: set[str], domains: set[str],
                  where: str) -> None:
    """Check each body with the scope its node sees: the ONNX checker's rule, under which a
    body may reuse the name of its node's output or of a later node's output."""
    if not _has_bodies(graph):
        return
    positions = dict.fromkeys(local, -1)
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out:
                positions.setdefault(out, index)
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                _check_graph(sub, _Scope(outer, positions, index), domains,
                             f" in {attr.name} of '{_label(node)}'{where}")


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


# --- one tensor per name across scopes ---------------------------------------------------------


def separate_scopes(model: onnx.ModelProto) -> int:
    """Rename, in place, every name a body defines that the model uses elsewhere; returns how
    many names were renamed.

    Afterwards one name is one tensor in the whole model: the body's and its enclosing graph's
    (optimum's If branches produce the If's output names), and sibling branches' alike (both
    branches of a merged decoder hold a ``/model/decoder/Add_output_0``, of different types),
    so nothing keyed by name (graphsurgeon's importer, value_info, a branch inlined next to
    the other's tensors) confuses them. Run on a structurally valid model (:func:`check_structure`
    runs it). Reads of a renamed name in the body, and in bodies below it, follow the rename;
    the top graph keeps its names, so the model's inputs and outputs are unchanged, and a
    body's outputs bind to its node's outputs by position, so renaming them changes nothing.
    """
    if not _has_bodies(model.graph):
        return 0
    taken = set(_all_names(model.graph))
    claimed = _graph_names(model.graph)
    return sum(_separate(sub, {}, claimed, taken) for sub in _bodies_of(model.graph))


def needs_separating(model: onnx.ModelProto) -> bool:
    """Whether :func:`separate_scopes` would rename anything (a walk over names, no copy)."""
    if not _has_bodies(model.graph):
        return False
    claimed = _graph_names(model.graph)
    return any(_collides(sub, claimed) for sub in _bodies_of(model.graph))


def _collides(graph: onnx.GraphProto, claimed: set[str]) -> bool:
    if not claimed.isdisjoint(_variable_names(graph)):
        return True
    claimed |= _graph_names(graph)
    return any(_collides(sub, claimed) for sub in _bodies_of(graph))


def _separate(graph: onnx.GraphProto, renamed: dict[str, str], claimed: set[str],
              taken: set[str]) -> int:
    """Rename ``graph``'s definitions that are ``claimed`` (by enclosing graphs or bodies seen
    before), apply ``renamed`` (the enclosing graphs' renames) to its reads, then recurse."""
    mapping = dict(renamed)
    count = 0
    for name in _defined_names(graph):
        mapping.pop(name, None)  # a local definition hides an outer rename
    for name in _variable_names(graph):
        if name in claimed:
            mapping[name] = _fresh(name, taken)
            count += 1
    if mapping:
        _apply(graph, mapping)
    claimed |= _graph_names(graph)
    for sub in _bodies_of(graph):
        count += _separate(sub, mapping, claimed, taken)
    return count


def _has_bodies(graph: onnx.GraphProto) -> bool:
    return any(attr.type in _GRAPH_TYPES for node in graph.node for attr in node.attribute)


def _bodies_of(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    for node in graph.node:
        for attr in node.attribute:
            yield from _subgraphs(attr)


def _fresh(name: str, taken: set[str]) -> str:
    index = 1
    while f"{name}__scope{index}" in taken:
        index += 1
    fresh = f"{name}__scope{index}"
    taken.add(fresh)
    return fresh


def _apply(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename in this graph only; bodies below get the mapping from :func:`_separate`."""
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = mapping.get(value.name, value.name)
    for tensor in graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = mapping.get(sparse.values.name, sparse.values.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]


def _defined_names(graph: onnx.GraphProto) -> list[str]:
    names = [v.name for v in graph.input] + [t.name for t in graph.initializer]
    names += [t.values.name for t in graph.sparse_initializer]
    names += [out for node in graph.node for out in node.output if out]
    return names


def _variable_names(graph: onnx.GraphProto) -> list[str]:
    """The names a body computes or receives. Its initializers are not among them: a body's
    constants become graphsurgeon constants of that body alone (they are read, never typed by
    name), and exports place an outer constant in each body that reads it, so siblings
    sharing one is the normal case."""
    return [v.name for v in graph.input] + [out for node in graph.node for out in node.output if out]


def _graph_names(graph: onnx.GraphProto) -> set[str]:
    """Every name this graph (not its bodies) mentions: graphsurgeon's importer hands all of
    them, value_info and outputs included, to the bodies as their outer scope."""
    names = set(_defined_names(graph))
    names.update(v.name for v in (*graph.output, *graph.value_info))
    names.update(name for node in graph.node for name in node.input if name)
    return names


def _all_names(graph: onnx.GraphProto) -> Iterable[str]:
    yield from _graph_names(graph)
    for node in graph.node:
        for attr in node.attribute:
            for sub in _subgraphs(attr):
                yield from _all_names(sub)
