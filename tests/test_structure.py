"""Specification of ``xattn_compiler.structure.check_structure``: each malformation is told
apart from the others and named (node, tensor, and the body it sits in); a graph that is only
out of order is sorted in place, bodies included. Also ``ir.iter_graphs``' body paths."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from xattn_compiler import ir
from xattn_compiler.errors import GraphStructureError, InputError
from xattn_compiler.structure import check_structure


def _error(model: onnx.ModelProto) -> GraphStructureError:
    with pytest.raises(GraphStructureError) as info:
        check_structure(model)
    assert isinstance(info.value, InputError)
    assert "\n" not in str(info.value)
    return info.value


def _names(graph: onnx.GraphProto) -> list[str]:
    return [node.name for node in graph.node]


def _reverse(graph: onnx.GraphProto) -> None:
    nodes = list(graph.node)[::-1]
    del graph.node[:]
    graph.node.extend(nodes)


def _attr(node: onnx.NodeProto, name: str) -> onnx.AttributeProto:
    return next(a for a in node.attribute if a.name == name)


# --- valid models pass untouched ---------------------------------------------------------------


@pytest.mark.parametrize(
    "build", [models.tiny_mlp, models.tiny_attention, models.tiny_if, models.tiny_loop]
)
def test_valid_models_pass_unchanged(build):
    model = build()
    before = model.SerializeToString()
    check_structure(model)
    assert model.SerializeToString() == before


def test_empty_optional_inputs_are_not_edges():
    model = models.tiny_mlp()
    clip = helper.make_node("Clip", ["y_raw", "", "hi"], ["y"], name="clip")
    model.graph.node[-1].output[0] = "y_raw"
    model.graph.node.append(clip)
    model.graph.initializer.append(numpy_helper.from_array(np.float32(1.0), "hi"))
    check_structure(model)
    onnx.checker.check_model(model)


def test_ai_onnx_and_empty_domain_are_the_same_domain():
    model = models.tiny_mlp()
    model.opset_import[0].domain = "ai.onnx"
    check_structure(model)
    model = models.tiny_mlp()
    model.graph.node[0].domain = "ai.onnx"
    check_structure(model)


def test_model_local_function_domain_is_known():
    model = models.tiny_mlp()
    model.graph.node[2].op_type = "MyRelu"
    model.graph.node[2].domain = "local.fns"
    model.functions.append(helper.make_function(
        "local.fns", "MyRelu", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])],
        [helper.make_opsetid("", models.OPSET)],
    ))
    check_structure(model)


# --- what each error says ------------------------------------------------------------------------


def test_unknown_domain():
    model = models.tiny_mlp()
    model.graph.node[1].domain = "com.example"
    err = _error(model)
    assert err.node == "bias1"
    assert "'com.example'" in str(err) and "imported: ai.onnx" in str(err)


def test_unknown_domain_inside_a_body():
    model = models.tiny_if()
    _attr(model.graph.node[0], "then_branch").g.node[0].domain = "com.example"
    err = _error(model)
    assert err.node == "then_add"
    assert "then_branch of 'choose'" in str(err)


def test_dangling_edge():
    model = models.tiny_attention()
    model.graph.node[9].input[1] = "k_transposed"
    err = _error(model)
    assert (err.node, err.tensor) == ("scores", "k_transposed")
    assert "dangling edge" in str(err)


def test_unnamed_node_is_labelled_by_op_and_outputs():
    model = models.tiny_mlp()
    model.graph.node[2].name = ""
    model.graph.node[2].input[0] = "nothing"
    assert "node 'Relu -> h2' reads tensor 'nothing'" in str(_error(model))


def test_dangling_edge_in_a_loop_body():
    model = models.tiny_loop()
    _attr(model.graph.node[0], "body").g.node[1].input[0] = "cond_typo"
    err = _error(model)
    assert (err.node, err.tensor) == ("keep_going", "cond_typo")
    assert "node 'keep_going' in body of 'repeat' reads tensor 'cond_typo'" in str(err)


def test_dangling_outer_scope_read_is_reported_in_the_body():
    model = models.tiny_loop()
    del model.graph.initializer[2]  # "step", which only the body reads
    err = _error(model)
    assert (err.node, err.tensor) == ("accumulate", "step")
    assert "body of 'repeat'" in str(err)


def test_nested_body_location_reads_inside_out():
    inner = models.tiny_if()
    model = models.tiny_loop()
    body = _attr(model.graph.node[0], "body").g
    if_node = inner.graph.node[0]
    _attr(if_node, "else_branch").g.node[0].input[1] = "ghost"
    # The If reads x and cond; give the body both, and let its result feed nothing.
    body.node.append(helper.make_node("Identity", ["acc_in"], ["x_in"], name="to_x"))
    if_node.input[0] = "cond_in"
    for branch in ("then_branch", "else_branch"):
        for n in _attr(if_node, branch).g.node:
            n.input[0] = "x_in"
    if_node.output[0] = "unused"
    body.node.append(if_node)
    body.node[0].input[1] = "acc_in"  # accumulate no longer needs step
    err = _error(model)
    assert err.node == "else_sub"
    assert "node 'else_sub' in else_branch of 'choose' in body of 'repeat'" in str(err)


def test_cycle_names_only_the_nodes_in_it():
    model = models.tiny_attention()
    # merge (Reshape) now reads its shape from out_proj's result: merge -> out_proj -> merge.
    model.graph.node[14].input[1] = "y"
    err = _error(model)
    message = str(err)
    assert "cycle" in message
    assert "'merge' -> 'out_proj' -> 'merge'" in message
    assert "'context_mix'" not in message and "'softmax'" not in message
    assert err.node == "merge"


def test_self_loop_is_a_cycle():
    model = models.tiny_mlp()
    model.graph.node[2].input[0] = "h2"
    assert "'relu' -> 'relu'" in str(_error(model))


def test_cycle_through_a_body_read():
    model = models.tiny_loop()
    # "step" is now computed from the Loop's own result, which the body reads.
    model.graph.initializer.pop()
    model.graph.node.append(helper.make_node("Neg", ["y"], ["step"], name="negate"))
    message = str(_error(model))
    assert "'repeat' -> 'negate' -> 'repeat'" in message


def test_cycle_inside_a_body_says_where():
    model = models.tiny_loop()
    body = _attr(model.graph.node[0], "body").g
    body.node[0].input[0] = "acc_out"
    message = str(_error(model))
    assert "graph in body of 'repeat' has a cycle: 'accumulate' -> 'accumulate'" in message


def test_tensor_produced_twice():
    model = models.tiny_mlp()
    model.graph.node[2].output[0] = "h1"
    err = _error(model)
    assert (err.node, err.tensor) == ("relu", "h1")
    assert "by node 'bias1' and again by node 'relu'" in str(err)


def test_node_output_over_an_initializer():
    model = models.tiny_mlp()
    model.graph.node[0].output[0] = "b1"
    err = _error(model)
    assert (err.node, err.tensor) == ("fc1", "b1")
    assert "graph input or initializer" in str(err)


def test_body_output_shadowing_an_outer_tensor():
    model = models.tiny_if()
    then_graph = _attr(model.graph.node[0], "then_branch").g
    then_graph.node[0].output[0] = "bias"
    then_graph.output[0].name = "bias"
    err = _error(model)
    assert (err.node, err.tensor) == ("then_add", "bias")
    assert "shadows" in str(err) and "then_branch of 'choose'" in str(err)
    with pytest.raises(onnx.checker.ValidationError):  # onnx agrees this is invalid
        onnx.checker.check_model(model)


def test_graph_output_not_produced():
    model = models.tiny_mlp()
    model.graph.output[0].name = "logits"
    err = _error(model)
    assert err.tensor == "logits" and err.node is None
    assert "graph output 'logits'" in str(err)


# --- sorting -------------------------------------------------------------------------------------


def test_out_of_order_graph_is_sorted_in_place():
    model = models.tiny_attention()
    order = _names(model.graph)
    _reverse(model.graph)
    check_structure(model)
    # Kahn's algorithm seeded in file order; a valid order, and stable for independent nodes.
    position = {name: i for i, name in enumerate(_names(model.graph))}
    for node in models.tiny_attention().graph.node:
        for later in models.tiny_attention().graph.node:
            if set(node.output) & set(later.input):
                assert position[node.name] < position[later.name]
    assert sorted(_names(model.graph)) == sorted(order)
    onnx.checker.check_model(model)


def test_sorted_graph_keeps_its_order():
    model = models.tiny_attention()
    order = _names(model.graph)
    check_structure(model)
    assert _names(model.graph) == order


def test_out_of_order_body_is_sorted():
    model = models.tiny_loop()
    body = _attr(model.graph.node[0], "body").g
    body.node.insert(0, helper.make_node("Relu", ["acc_out"], ["unused_relu"], name="late"))
    check_structure(model)
    assert _names(body) == ["accumulate", "keep_going", "late"]


def test_producer_of_a_body_read_is_moved_before_the_loop():
    model = models.tiny_loop()
    model.graph.initializer.pop()  # "step" is now computed after the Loop in file order
    model.graph.node.append(helper.make_node("Neg", ["x"], ["step"], name="make_step"))
    check_structure(model)
    assert _names(model.graph) == ["make_step", "repeat"]
    onnx.checker.check_model(model)


def test_body_reading_a_name_defined_later_in_the_body_is_not_an_outer_read():
    model = models.tiny_loop()
    body = _attr(model.graph.node[0], "body").g
    # An out-of-order body whose first node reads "twice", made by its second node.
    body.node.insert(0, helper.make_node("Relu", ["twice"], ["unused_relu"], name="late"))
    body.node.append(helper.make_node("Add", ["acc_in", "acc_in"], ["twice"], name="double"))
    check_structure(model)
    assert _names(body).index("double") < _names(body).index("late")
    assert _names(model.graph) == ["repeat"]


# --- ir.iter_graphs -----------------------------------------------------------------------------


def test_iter_graphs_yields_bodies_with_readable_paths():
    graph = ir.import_graph(models.tiny_if())
    found = {path: [node.name for node in sub.nodes] for path, sub in ir.iter_graphs(graph)}
    assert found == {
        "": ["choose"],
        "/choose/then_branch": ["then_add"],
        "/choose/else_branch": ["else_sub"],
    }


def test_iter_graphs_nested_paths():
    model = models.tiny_loop()
    body = _attr(model.graph.node[0], "body").g
    then_branch = helper.make_graph(
        [helper.make_node("Identity", ["acc_in"], ["t"], name="inner_then")], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["acc_in"], ["e"], name="inner_else")], "else", [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    body.node.append(helper.make_node("If", ["cond_in"], ["picked"], name="pick",
                                      then_branch=then_branch, else_branch=else_branch))
    check_structure(model)
    paths = [path for path, _ in ir.iter_graphs(ir.import_graph(model))]
    assert paths[:2] == ["", "/repeat/body"]
    assert set(paths) == {"", "/repeat/body", "/repeat/body/pick/then_branch",
                          "/repeat/body/pick/else_branch"}


# --- names a body may reuse (onnx.checker's rule), kept apart --------------------------------


def _if_model(then_nodes, then_out, else_nodes, else_out, after=()):
    """``y = If(c, ...)`` on input ``x``; ``after``: nodes following the If (outputs added)."""
    def branch(nodes, out, name):
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(out, TensorProto.FLOAT, [2])])

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("If", ["c"], ["y"], name="choose",
                              then_branch=branch(then_nodes, then_out, "then"),
                              else_branch=branch(else_nodes, else_out, "else")), *after]
    outputs = ["y"] + [out for node in after for out in node.output]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2]) for name in outputs])
    return models.make_model(graph)


def _run(model: onnx.ModelProto, cond: bool) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": np.asarray([1.0, -2.0], np.float32), "c": np.asarray(cond)})


def _body_names(model: onnx.ModelProto) -> list[set[str]]:
    return [{out for node in body.node for out in node.output} | {v.name for v in body.output}
            for body in list(ir.iter_graph_protos(model.graph))[1:]]


def _accepted_and_separated(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)  # onnx accepts it: so must we
    expected = [_run(model, cond) for cond in (True, False)]
    outputs = [v.name for v in model.graph.output]
    check_structure(model)
    onnx.checker.check_model(model, full_check=True)
    top = {name for node in model.graph.node for name in (*node.input, *node.output)}
    for names in _body_names(model):
        assert not names & top
    assert [v.name for v in model.graph.output] == outputs
    for cond, before in zip((True, False), expected, strict=True):
        for got, want in zip(_run(model, cond), before, strict=True):
            np.testing.assert_array_equal(got, want)
    return model


def test_optimum_body_output_named_after_its_own_node_output():
    # optimum's merged decoders: each branch's outputs are named like the If's outputs.
    model = _if_model([helper.make_node("Neg", ["r"], ["y"], name="then_neg")], "y",
                      [helper.make_node("Abs", ["x"], ["y"], name="else_abs")], "y")
    _accepted_and_separated(model)
    then_names, else_names = _body_names(model)
    assert not then_names & else_names  # sibling branches' "y" are two tensors too


def test_body_output_named_after_a_later_node_output():
    later = helper.make_node("Sigmoid", ["y"], ["z"], name="later")
    model = _if_model([helper.make_node("Neg", ["x"], ["z"], name="then_neg")], "z",
                      [helper.make_node("Abs", ["x"], ["e"], name="else_abs")], "e", [later])
    _accepted_and_separated(model)


def test_body_output_shadowing_an_earlier_node_output():
    model = _if_model([helper.make_node("Neg", ["x"], ["r"], name="then_neg")], "r",
                      [helper.make_node("Abs", ["x"], ["e"], name="else_abs")], "e")
    with pytest.raises(onnx.checker.ValidationError):  # onnx refuses this one
        onnx.checker.check_model(model, full_check=True)
    err = _error(model)
    assert (err.node, err.tensor) == ("then_neg", "r") and "shadows" in str(err)


def test_nested_body_reads_follow_a_rename():
    # The then branch defines "y" (renamed) and a nested If's branches read it.
    inner_then = helper.make_graph([helper.make_node("Neg", ["y"], ["a"], name="in_neg")], "it",
                                   [], [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])])
    inner_else = helper.make_graph([helper.make_node("Abs", ["y"], ["b"], name="in_abs")], "ie",
                                   [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    then_nodes = [helper.make_node("Add", ["x", "r"], ["y"], name="then_add"),
                  helper.make_node("If", ["c"], ["w"], name="inner", then_branch=inner_then,
                                   else_branch=inner_else)]
    model = _if_model(then_nodes, "w",
                      [helper.make_node("Abs", ["x"], ["e"], name="else_abs")], "e")
    separated = _accepted_and_separated(model)
    bodies = list(ir.iter_graph_protos(separated.graph))[1:]
    inner = next(n for body in bodies for n in body.node if n.op_type == "If")
    reads = {name for a in inner.attribute for node in a.g.node for name in node.input}
    assert "y" not in reads and len(reads) == 1
