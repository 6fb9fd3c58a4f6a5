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

import logging

import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.ir import (
    export_model,
    import_graph,
    infer_shapes,
    is_graph_output,
    iter_graphs,
    producer,
)
from xattn_compiler.passmanager import Option, Pass, PassResult

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
        model = infer_shapes(model)
        graph = import_graph(model)
        initializers_before = _initializer_names(graph)
        nodes_start = _node_count(graph)
        graph.cleanup(remove_unused_graph_inputs=False)
        nodes_live = _node_count(graph)
        identities = remove_identities(graph)
        nodes_folded = 0
        if self.option("fold-constants"):
            _quiet_onnxruntime()
            before = _node_count(graph)
            graph.fold_constants(
                fold_shapes=True, flatten_subgraphs=False, error_ok=True,
                size_threshold=self.option("size-threshold"),
            )
            graph.cleanup(remove_unused_graph_inputs=False)
            nodes_folded = before - _node_count(graph)
        out = infer_shapes(export_model(graph, model), in_place=True)
        counts = {
            "dead_nodes_removed": nodes_start - nodes_live,
            "identities_removed": identities,
            "nodes_folded": nodes_folded,
        }
        changed = any(counts.values()) or _initializer_names(graph) != initializers_before
        return PassResult(out, changed, counts)


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
