"""``canonicalize``: the clean-ups every later pass relies on.

    dead nodes        -> removed            (graph outputs and graph inputs are kept)
    Identity(x)       -> x                  (renaming the producer when Identity feeds an output)
    f(constants...)   -> constant           (onnx-graphsurgeon folding, ONNX Runtime evaluates)
    value_info        -> re-inferred        (symbolic dims kept)

Control flow is left alone (an If with a constant condition is the unroll pass's job), and
folding skips tensors over ``size-threshold`` bytes so a broadcast never turns into gigabytes
of initializer.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.ir import (
    export_model,
    import_graph,
    infer_shapes,
    is_graph_output,
    iter_graphs,
    producer,
    remove_dead_nodes,
)
from xattn_compiler.passmanager import Option, Pass, PassResult
from xattn_compiler.rewrite import replace_uses

log = logging.getLogger(__name__)


class Canonicalize(Pass):
    """Shape inference, constant folding, dead-code and Identity removal."""

    name = "canonicalize"
    description = "fold constants, remove Identity and dead nodes, re-infer shapes"
    options = (
        Option("fold-constants", bool, True, "evaluate nodes whose inputs are all constant"),
        Option("size-threshold", int, 64 << 20, "never fold a tensor larger than this (bytes)"),
    )

    def run(self, model: onnx.ModelProto) -> PassResult:
        # Folding inside If/Loop bodies makes shapes known that ONNX inference could not see
        # (outer initializers), and the next round folds more: repeat until nothing changes,
        # so a second call finds nothing left to do.
        totals: dict[str, int] = {}
        changed = False
        for _ in range(4):
            result = self._run_once(model)
            for key, value in result.counts.items():
                totals[key] = totals.get(key, 0) + value
            if not result.changed:
                break
            model, changed = result.model, True
        return PassResult(model, changed, totals)

    def _run_once(self, model: onnx.ModelProto) -> PassResult:
        model = infer_shapes(model)
        graph = import_graph(model)
        initializers_before = _initializer_names(graph)
        nodes_start = _node_count(graph)
        remove_dead_nodes(graph)
        nodes_live = _node_count(graph)
        identities = remove_identities(graph)
        nodes_folded = 0
        if self.option("fold-constants"):
            _quiet_onnxruntime()
            before = _node_count(graph)
            fold_sliced_shapes(graph)
            with _hidden_sliced_shapes(graph):
                graph.fold_constants(
                    fold_shapes=True, flatten_subgraphs=False, error_ok=True,
                    size_threshold=self.option("size-threshold"),
                )
            remove_dead_nodes(graph)
            nodes_folded = before - _node_count(graph)
        out = infer_shapes(export_model(graph, model), in_place=True)
        counts = {
            "dead_nodes_removed": nodes_start - nodes_live,
            "identities_removed": identities,
            "nodes_folded": nodes_folded,
        }
        changed = any(counts.values()) or _initializer_names(graph) != initializers_before
        return PassResult(out, changed, counts)


def _sliced_shapes(graph: gs.Graph) -> list[gs.Node]:
    return [node for _, body in iter_graphs(graph) for node in body.nodes
            if node.op == "Shape" and ("start" in node.attrs or "end" in node.attrs)]


def fold_sliced_shapes(graph: gs.Graph) -> int:
    """``Shape(x, start, end)`` -> constant when those dims of x are known.

    onnx-graphsurgeon's shape folding ignores ``start``/``end`` (opset 15) and folds such a node
    to the *whole* shape of x, a wrong value; so these are folded here, correctly, and the rest
    are hidden from it while it runs (:func:`_hidden_sliced_shapes`).
    """
    folded = 0
    for _, body in iter_graphs(graph):
        for node in list(body.nodes):
            if node.op != "Shape" or not ("start" in node.attrs or "end" in node.attrs):
                continue
            shape = node.inputs[0].shape
            if shape is None:
                continue
            dims = list(shape)[node.attrs.get("start", 0):node.attrs.get("end", None)]
            if not all(isinstance(d, int) and d >= 0 for d in dims):
                continue
            out = node.outputs[0]
            constant = gs.Constant(f"{out.name}_folded", np.array(dims, dtype=np.int64))
            if replace_uses(out, constant, body):
                node.outputs.clear()
                folded += 1
    return folded


@contextlib.contextmanager
def _hidden_sliced_shapes(graph: gs.Graph):
    hidden = _sliced_shapes(graph)
    for node in hidden:
        node.op = "XattnSlicedShape"  # not a Shape to the folder; restored below
    try:
        yield
    finally:
        for node in hidden:
            node.op = "Shape"


def _quiet_onnxruntime() -> None:
    # graphsurgeon's folder runs ONNX Runtime, whose optimizer logs a warning per node it
    # cannot simplify in the folded subgraphs: noise to a user, not a finding.
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)


def remove_identities(graph: gs.Graph) -> int:
    """Bypass every Identity, in bodies too; return how many were removed.

    An Identity that produces a graph output keeps that output's name: its producer is
    renamed to write the output directly, which needs a producer in the same graph whose
    result nothing else reads. Otherwise (the output copies a graph input, an initializer, an
    outer-scope value or another output) the Identity stays, because the output must exist.
    """
    removed = 0
    for _, body in iter_graphs(graph):
        local_nodes = {id(node) for node in body.nodes}
        for node in list(body.nodes):
            if node.op != "Identity" or len(node.inputs) != 1 or len(node.outputs) != 1:
                continue
            source, result = node.inputs[0], node.outputs[0]
            if is_graph_output(result, body):
                prod = producer(source)
                if (prod is None or id(prod) not in local_nodes
                        or is_graph_output(source, body) or len(source.outputs) != 1):
                    continue
                prod.outputs[prod.outputs.index(source)] = result
            else:
                for consumer in list(result.outputs):
                    for index, tensor in enumerate(consumer.inputs):
                        if tensor is result:
                            consumer.inputs[index] = source
            node.inputs.clear()
            node.outputs.clear()
            removed += 1
    return removed


def _node_count(graph: gs.Graph) -> int:
    return sum(len(body.nodes) for _, body in iter_graphs(graph))


def _initializer_names(graph: gs.Graph) -> set[str]:
    names: set[str] = set()
    for _, body in iter_graphs(graph):
        names |= {name for name, t in body.tensors().items() if isinstance(t, gs.Constant)}
    return names
