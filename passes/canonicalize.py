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
from onnx_graphsurgeon.ir.tensor import LazyValues

from xattn_compiler.ir import (
    export_model,
    import_with_shapes,
    infer_shapes,
    is_graph_output,
    iter_graphs,
    producer,
    refresh_shapes,
    remove_dead_nodes,
)
from xattn_compiler.passmanager import Option, Pass, PassResult
from xattn_compiler.rewrite import replace_uses
from xattn_compiler.weights import is_stub

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
        # so a second call finds nothing left to do. One import serves every round; between
        # rounds the graph only takes the re-inferred shapes.
        graph = import_with_shapes(model)
        totals: dict[str, int] = {}
        changed = False
        for _ in range(4):
            counts, round_changed = self._round(graph)
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
            if not round_changed:
                break
            changed = True
            model = infer_shapes(export_model(graph, model), in_place=True)
            refresh_shapes(graph, model)
        return PassResult(model, changed, totals)

    def _round(self, graph: gs.Graph) -> tuple[dict[str, int], bool]:
        initializers_before = _initializer_names(graph)
        dead = remove_dead_nodes(graph)
        identities = remove_identities(graph)
        nodes_folded = 0
        if self.option("fold-constants"):
            before = _node_count(graph)
            if fold_sliced_shapes(graph) or identities:
                # Bypassed Identities and folded Shapes are still listed, with no inputs or
                # outputs: neither the checks below nor graphsurgeon's folder expect that.
                remove_dead_nodes(graph)
            # graphsurgeon's folder copies the whole graph before it looks: ask it only when
            # something can fold (the confirming round of a large model usually has nothing).
            if _has_foldable(graph):
                _quiet_onnxruntime()
                with _hidden_sliced_shapes(graph):
                    graph.fold_constants(
                        fold_shapes=True, flatten_subgraphs=False, error_ok=True,
                        size_threshold=self.option("size-threshold"),
                    )
            remove_dead_nodes(graph)
            nodes_folded = before - _node_count(graph)
        counts = {"dead_nodes_removed": dead, "identities_removed": identities,
                  "nodes_folded": nodes_folded}
        changed = any(counts.values()) or _initializer_names(graph) != initializers_before
        return counts, changed


def _has_foldable(graph: gs.Graph) -> bool:
    """Whether graphsurgeon's folder could change anything: a Constant node, a node reading
    only constants, or a Shape of a tensor with a static dim (a Gather of it may fold)."""
    for _, body in iter_graphs(graph):
        for node in body.nodes:
            if node.op == "Constant":
                return True
            if node.op == "Shape":
                if _shape_folds(node):
                    return True
                continue
            inputs = [t for t in node.inputs if t.name]
            if inputs and all(_is_constant(t) for t in inputs):
                return True
    return False


def _shape_folds(node: gs.Node) -> bool:
    """Whether graphsurgeon can fold this Shape, or a Gather or Slice of it, to a constant."""
    if not node.inputs or not node.outputs:  # already folded, waiting to be swept
        return False
    shape = node.inputs[0].shape
    if shape is None:
        return False
    static = [isinstance(d, int) and d >= 0 for d in shape]
    if all(static):
        return True
    for reader in node.outputs[0].outputs:
        picked = None
        if reader.op == "Gather" and len(reader.inputs) > 1:
            index = _constant_array(reader.inputs[1])
            if index is not None:
                picked = [static[int(i)] for i in index.reshape(-1) if -len(static) <= i < len(static)]
        elif reader.op == "Slice" and len(reader.inputs) >= 3 and len(reader.inputs) < 5:
            bounds = [_constant_array(t) for t in reader.inputs[1:3]]
            if all(b is not None and b.size == 1 for b in bounds):
                start, end = (int(b.reshape(-1)[0]) for b in bounds)
                picked = static[start:end]
        if picked and all(picked):
            return True
    return False


def _is_detached(tensor: gs.Tensor) -> bool:
    """A weight kept out of the model while passes run (:mod:`xattn_compiler.weights`)."""
    values = getattr(tensor, "_values", None)
    return isinstance(values, LazyValues) and is_stub(values.tensor)


def _constant_array(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = producer(tensor)
    if node is not None and node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
        return np.asarray(node.attrs["value"].values)
    return None


def _is_constant(tensor: gs.Tensor) -> bool:
    if isinstance(tensor, gs.Constant):
        return not _is_detached(tensor)
    node = producer(tensor)
    return node is not None and node.op == "Constant"


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
    # Not a Shape to the folder, and with an input that is no constant, so it never tries to
    # evaluate one (ONNX Runtime knows no such op, and one failed evaluation stops all folding).
    # Nodes reading a detached weight get the same input: ONNX Runtime cannot read its bytes,
    # and computations on weights are TensorRT's to fold.
    unknown = gs.Variable("xattn_unfoldable_input")
    on_weights = [node for _, body in iter_graphs(graph) for node in body.nodes
                  if any(_is_detached(t) for t in node.inputs)]
    for node in hidden:
        node.op = "XattnSlicedShape"
    for node in hidden + on_weights:
        node.inputs.append(unknown)
    try:
        yield
    finally:
        for node in hidden:
            node.op = "Shape"
        for node in hidden + on_weights:
            node.inputs.pop()


def _quiet_onnxruntime() -> None:
    # graphsurgeon's folder runs ONNX Runtime, whose optimizer logs a warning per node it
    # cannot simplify in the folded subgraphs, and an error line for a subgraph it cannot
    # run (the folder then leaves it unfolded): noise to a user, not a finding.
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)


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
