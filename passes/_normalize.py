"""What the spelling normalisations share: rewriting the model's protos in place of a graph
import, and counting the candidates they left alone, with why.

A spelling normalisation is local (one node becomes a few, or changes its op) and needs no
shapes beyond what the model records, so it edits a copy of the ``ModelProto`` directly: no
graphsurgeon import, no export, no shape inference. That is what lets the default pipeline run
it on every model for the price of a copy and a walk over the nodes (an import/export round
trip with shape inference was 15% of the default pipeline on a 10k-node decoder). A step that
needs an element type or a rank the model does not record asks :meth:`ModelEdit.value_type`,
which runs shape inference once, on demand. New tensors get no ``value_info``; the next pass
that imports the graph infers their shapes.

A step rewrites what it can prove equal and leaves the rest; the rest is reported
(``<what>_skipped`` in the counts, ``skipped: {node: reason}`` in the details), so a user can
see why an Einsum stayed an Einsum. Skips never make a pass "changed": only rewrites do.
"""

from __future__ import annotations

import logging
from collections import ChainMap
from collections.abc import Iterable, Iterator
from typing import ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from xattn_compiler.io import default_opset
from xattn_compiler.ir import _may_own_bodies as may_own_bodies
from xattn_compiler.ir import infer_shapes, iter_graph_protos, iter_nodes
from xattn_compiler.passmanager import Pass, PassResult

log = logging.getLogger(__name__)

DEFAULT_DOMAINS = ("", "ai.onnx")
_EXTERNAL = onnx.TensorProto.EXTERNAL


class Scope:
    """What the nodes of one graph can read: constants and recorded types, the outer scopes'
    included (an inner name hides an outer one). Types are collected on first use: most
    models have no Einsum to ask about them."""

    def __init__(self, graph: onnx.GraphProto, outer: Scope | None = None):
        # Before IR 4 an initializer that is also a graph input is only a default: not constant.
        constants: dict[str, onnx.TensorProto | None] = {v.name: None for v in graph.input}
        constants.update((t.name, t) for t in graph.initializer if t.name not in constants)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                constants.update((name, _constant_value(node)) for name in node.output)
            elif outer is not None:  # a body's own value hides an outer constant of that name
                constants.update((name, None) for name in node.output)
        self._graph, self._outer = graph, outer
        self.constants = ChainMap(constants, *(outer.constants.maps if outer else ()))
        self._types: ChainMap | None = None

    @property
    def types(self) -> ChainMap:
        if self._types is None:
            graph = self._graph
            local = {v.name: v.type for v in (*graph.input, *graph.value_info, *graph.output)}
            for tensor in graph.initializer:
                local.setdefault(tensor.name, _initializer_type(tensor))
            self._types = ChainMap(local, *(self._outer.types.maps if self._outer else ()))
        return self._types

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant the graph reads, if it is in the model's own bytes."""
        tensor = self.constants.get(name)
        if tensor is None or tensor.data_location == _EXTERNAL:
            return None  # a detached or external weight: no divisor is that large
        return numpy_helper.to_array(tensor)


class ModelEdit:
    """A copy of a model being rewritten: its graphs with their scopes, fresh names, and types
    from shape inference when the model does not record them."""

    def __init__(self, model: onnx.ModelProto):
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.opset = default_opset(self.model)
        self._names: set[str] | None = None
        self._inferred: dict[str, onnx.TypeProto] | None = None
        # Scopes are built once: the steps add initializers, never constants a step reads.
        self._graphs: list[tuple[str, onnx.GraphProto, Scope]] | None = None

    def graphs(self) -> list[tuple[str, onnx.GraphProto, Scope]]:
        """Every graph, outermost first, with its path (empty at the top) and its scope."""
        if self._graphs is None:
            self._graphs = list(_walk(self.model.graph, "", Scope(self.model.graph)))
        return self._graphs

    def fresh(self, hint: str) -> str:
        """A name no tensor or node of the model has, starting with ``hint`` (deterministic)."""
        if self._names is None:
            self._names = _all_names(self.model)
        name, n = hint, 0
        while name in self._names:
            n += 1
            name = f"{hint}_{n}"
        self._names.add(name)
        return name

    def value_type(self, name: str, scope: Scope) -> onnx.TypeProto | None:
        """The recorded type of ``name`` when it has a shape, else the one shape inference
        gives (run once per edit, only for a step that needs it)."""
        recorded = scope.types.get(name)
        if recorded is not None and rank(recorded) is not None and elem_type(recorded):
            return recorded
        if self._inferred is None:
            inferred = infer_shapes(self.model)
            self._inferred = {}
            for graph in iter_graph_protos(inferred.graph):
                self._inferred.update(
                    (v.name, v.type) for v in (*graph.input, *graph.value_info, *graph.output))
                for tensor in graph.initializer:
                    self._inferred.setdefault(tensor.name, _initializer_type(tensor))
        return self._inferred.get(name, recorded)


def _walk(graph: onnx.GraphProto, path: str, scope: Scope
          ) -> Iterator[tuple[str, onnx.GraphProto, Scope]]:
    yield path, graph, scope
    for node in graph.node:
        if not may_own_bodies(node.op_type, node.domain):
            continue
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else (
                list(attr.graphs) if attr.type == onnx.AttributeProto.GRAPHS else [])
            for index, body in enumerate(bodies):
                suffix = f"[{index}]" if attr.type == onnx.AttributeProto.GRAPHS else ""
                where = f"{path}/{node.name or node.op_type}/{attr.name}{suffix}"
                yield from _walk(body, where, Scope(body, scope))


def _all_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name (a tensor is a graph input, an initializer or a node output
    in some scope, so node inputs and value_info add nothing)."""
    names: set[str] = set()
    for graph in iter_graph_protos(model.graph):
        names.update([v.name for v in graph.input])
        names.update([t.name for t in graph.initializer])
        for node in graph.node:
            names.update(node.output)
            names.add(node.name)
    return names


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A Constant node's value as a tensor (``value``, ``value_float``, ``value_floats``)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats"):
            value = attr.f if attr.name == "value_float" else list(attr.floats)
            return numpy_helper.from_array(np.array(value, np.float32))
    return None


def _initializer_type(tensor: onnx.TensorProto) -> onnx.TypeProto:
    return onnx.helper.make_tensor_type_proto(tensor.data_type, list(tensor.dims))


def elem_type(value_type: onnx.TypeProto | None) -> int | None:
    if value_type is None or not value_type.HasField("tensor_type"):
        return None
    return value_type.tensor_type.elem_type or None


def rank(value_type: onnx.TypeProto | None) -> int | None:
    if value_type is None or not value_type.tensor_type.HasField("shape"):
        return None
    return len(value_type.tensor_type.shape.dim)


def readers(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs and graph outputs read each name, bodies included."""
    counts: dict[str, int] = {}
    for graph in iter_graph_protos(model.graph):
        for name in [*(v.name for v in graph.output), *(i for n in graph.node for i in n.input)]:
            counts[name] = counts.get(name, 0) + 1
    return counts


class NormalizingPass(Pass):
    """A spelling normalisation on the model's protos; subclasses implement :meth:`rewrite`
    for one graph and call :meth:`skip` for each candidate they leave."""

    #: The ops this pass may rewrite: a model with none of them is returned as it is, uncopied.
    candidate_ops: ClassVar[frozenset[str]] = frozenset()
    #: The count keys of the rewrites and of the candidates left alone.
    rewritten_key: ClassVar[str] = "rewritten"
    skipped_key: ClassVar[str] = "skipped"

    def __init__(self, **values):
        super().__init__(**values)
        self.skipped: dict[str, str] = {}

    def rewrite(self, graph: onnx.GraphProto, scope: Scope, edit: ModelEdit, path: str) -> int:
        """Rewrite ``graph`` of ``edit.model`` in place; returns how many rewrites were made."""
        raise NotImplementedError

    def finish(self, edit: ModelEdit) -> None:
        """After every graph is rewritten: drop what the rewrites left unread."""

    def skip(self, node: onnx.NodeProto, path: str, reason: str) -> None:
        where = f"{path}/{node.name}" if path else node.name
        if where not in self.skipped:
            log.info("%s: left %s '%s' alone: %s", self.name, node.op_type, where, reason)
        self.skipped[where] = reason

    def has_candidates(self, model: onnx.ModelProto) -> bool:
        return has_ops(model, self.candidate_ops)

    def apply(self, edit: ModelEdit) -> int:
        """Every graph of ``edit``, then :meth:`finish`; the number of rewrites."""
        done = sum(self.rewrite(graph, scope, edit, path) for path, graph, scope in edit.graphs())
        if done:
            self.finish(edit)
        return done

    def run(self, model: onnx.ModelProto) -> PassResult:
        self.skipped = {}
        done = 0
        if self.has_candidates(model):
            edit = ModelEdit(model)
            done = self.apply(edit)
            if done:
                model = edit.model
        counts = {self.rewritten_key: done, self.skipped_key: len(self.skipped)}
        return PassResult(model, bool(done), counts, {"skipped": dict(sorted(self.skipped.items()))})


def has_ops(model: onnx.ModelProto, ops: Iterable[str]) -> bool:
    """Whether any node of the model (bodies included) is one of ``ops`` (default domain)."""
    wanted = frozenset(ops)
    return any(node.op_type in wanted and node.domain in DEFAULT_DOMAINS
               for node in iter_nodes(model.graph))
