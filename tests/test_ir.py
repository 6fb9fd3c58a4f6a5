"""The graphsurgeon-level helpers every pass leans on: dead-node removal, ordering, shape refresh.

They replace graphsurgeon's own ``cleanup``/``toposort`` (whose cost grows faster than the graph)
and a re-import between rewrite rounds, so each is held to what graphsurgeon would produce.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from xattn_compiler import zoo
from xattn_compiler.io import load
from xattn_compiler.ir import (
    detach,
    export_model,
    import_graph,
    infer_shapes,
    iter_graphs,
    refresh_shapes,
    remove_dead_nodes,
    toposort,
)
from xattn_compiler.testing import assert_valid


def _model(nodes, outputs=("y",), initializers=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["n", 4]) for o in outputs],
        list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _names(graph: gs.Graph) -> list[str]:
    return [node.name for node in graph.nodes]


def test_dead_nodes_go_and_their_inputs_forget_them():
    graph = import_graph(_model([
        helper.make_node("Relu", ["x"], ["a"], name="live"),
        helper.make_node("Neg", ["x"], ["dead1"], name="dead1"),
        helper.make_node("Abs", ["dead1"], ["dead2"], name="dead2"),
        helper.make_node("Exp", ["a"], ["y"], name="out")]))
    x = graph.inputs[0]
    assert remove_dead_nodes(graph) == 2
    assert _names(graph) == ["live", "out"]
    assert [node.name for node in x.outputs] == ["live"]


def test_a_body_keeps_alive_what_it_reads_from_outside():
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["outer"], ["t"], name="then_id")], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"], name="else_id"),
         helper.make_node("Neg", ["x"], ["unused"], name="dead_in_body")], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [1], [True])
    graph = import_graph(_model([
        helper.make_node("Relu", ["x"], ["outer"], name="read_by_body"),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=then_branch,
                         else_branch=else_branch)], initializers=[cond]))
    assert remove_dead_nodes(graph) == 1
    assert _names(graph) == ["read_by_body", "if"]
    bodies = {path: body for path, body in iter_graphs(graph)}
    assert _names(bodies["/if/else_branch"]) == ["else_id"]


def test_detach_unlinks_many_readers_of_a_shared_tensor_at_once():
    graph = import_graph(_model([helper.make_node("Relu", ["x"], [f"r{i}"], name=f"r{i}")
                                 for i in range(50)] + [helper.make_node("Relu", ["x"], ["y"])]))
    x = graph.inputs[0]
    gone = graph.nodes[:49]
    detach(gone)
    assert len(x.outputs) == 2 and all(not node.inputs and not node.outputs for node in gone)


def test_toposort_keeps_an_ordered_graph_as_it_is_and_orders_an_appended_node():
    graph = import_graph(_model([helper.make_node("Relu", ["x"], ["a"], name="a"),
                                 helper.make_node("Exp", ["x"], ["b"], name="b"),
                                 helper.make_node("Add", ["a", "b"], ["y"], name="y")]))
    toposort(graph)
    assert _names(graph) == ["a", "b", "y"]
    # A rewrite appends a producer that an earlier node now reads.
    a = graph.nodes[0].outputs[0]
    fresh = gs.Variable("fresh", dtype=a.dtype)
    graph.nodes.append(gs.Node("Neg", "late", inputs=[a], outputs=[fresh]))
    graph.nodes[2].inputs[1] = fresh
    toposort(graph)
    assert _names(graph) == ["a", "b", "late", "y"]


def test_toposort_names_a_node_on_a_cycle():
    graph = import_graph(_model([helper.make_node("Add", ["x", "c"], ["a"], name="first"),
                                 helper.make_node("Relu", ["a"], ["c"], name="second"),
                                 helper.make_node("Relu", ["a"], ["y"], name="y")]))
    with pytest.raises(ValueError, match="cycle through node 'first'|cycle through node 'second'"):
        toposort(graph)


@pytest.mark.parametrize("name", ["whisper-decoder-eager", "if-cross-attention",
                                  "loop-cross-attention"])
def test_refreshed_shapes_equal_a_fresh_import(name):
    """What GraphPass relies on to skip the re-import between rounds."""
    model = infer_shapes(load(zoo.cached_export(name).path))
    graph = import_graph(model)
    for _, body in iter_graphs(graph):  # forget everything, as if the rewrite made it stale
        for node in body.nodes:
            for tensor in node.outputs:
                tensor.shape, tensor.dtype = None, None
    exported = infer_shapes(export_model(graph, model), in_place=True)
    refresh_shapes(graph, exported)
    fresh = import_graph(exported)
    ours = {t.name: (t.dtype, t.shape) for _, b in iter_graphs(graph) for t in b.tensors().values()}
    theirs = {t.name: (t.dtype, t.shape) for _, b in iter_graphs(fresh) for t in b.tensors().values()}
    assert ours == theirs


def test_export_orders_and_cleans_what_a_rewrite_left():
    model = _model([helper.make_node("Relu", ["x"], ["a"], name="a"),
                    helper.make_node("Neg", ["x"], ["dead"], name="dead"),
                    helper.make_node("Exp", ["a"], ["y"], name="y")])
    graph = import_graph(model)
    graph.nodes.reverse()
    out = export_model(graph, model)
    assert [n.name for n in out.graph.node] == ["a", "y"]
    assert_valid(out)
    onnx.checker.check_model(out)


def test_exporting_a_new_domain_leaves_the_imported_model_alone():
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")])
    before = model.SerializeToString()
    graph = import_graph(model)
    graph.nodes[0].domain = "com.microsoft"
    out = export_model(graph, model)
    assert "com.microsoft" in {o.domain for o in out.opset_import}
    assert model.SerializeToString() == before


def test_shapes_flow_through_an_identity_of_a_shape_constant():
    # ONNX propagates no data through Identity: Reshape(x, Identity([2, 3, 4])) had no shape
    # (exporters' clutter on shared shape constants hid every later layer's heads).
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from xattn_compiler.ir import import_with_shapes

    graph = helper.make_graph(
        [helper.make_node("Identity", ["target"], ["target_copy"]),
         helper.make_node("Reshape", ["x", "target_copy"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([2, 3, 4], np.int64), "target")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    imported = import_with_shapes(model)
    assert imported.tensors()["y"].shape == [2, 3, 4]
    assert [node.op for node in imported.nodes] == ["Identity", "Reshape"]  # the graph as it is
