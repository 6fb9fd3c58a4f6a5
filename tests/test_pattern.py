"""The pattern language: each combinator matched and not matched on a tiny graph."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from xattn_compiler.analysis import BindingTimes, constant_eval
from xattn_compiler.pattern import REST, Any, Chain, Const, Context, Op, Or, Scalar, match


def graph_of(text_nodes, inputs=("x", "y"), initializers=None):
    """A gs graph from (op, inputs, outputs, attrs) tuples; every tensor float [2, 2]."""
    nodes = [helper.make_node(op, ins, outs, **attrs) for op, ins, outs, attrs in text_nodes]
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k)
             for k, v in (initializers or {}).items()]
    produced = [o for _, _, outs, _ in text_nodes for o in outs]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(i, onnx.TensorProto.FLOAT, [2, 2]) for i in inputs],
        [helper.make_tensor_value_info(produced[-1], onnx.TensorProto.FLOAT, None)], inits)
    return gs.import_onnx(helper.make_model(graph))


def run(pattern, graph, tensor_name):
    times = BindingTimes(graph)
    ctx = Context(constant=times.is_constant, value=constant_eval)
    return match(pattern, graph.tensors()[tensor_name], ctx), ctx


def test_op_matches_and_captures():
    g = graph_of([("Add", ["x", "y"], ["s"], {}), ("Relu", ["s"], ["r"], {})])
    found, _ = run(Op("Relu", Op("Add", Any("a"), Any("b"), name="sum")), g, "r")
    assert found["a"].name == "x" and found["b"].name == "y" and found["sum"].name == "s"
    assert [n.op for n in found.nodes] == ["Relu", "Add"]


def test_op_of_the_wrong_type_fails_with_a_reason():
    g = graph_of([("Sub", ["x", "y"], ["s"], {}), ("Relu", ["s"], ["r"], {})])
    found, ctx = run(Op("Relu", Op("Add", Any(), Any())), g, "r")
    assert found is None
    assert "expected Add producing 's', found Sub" in ctx.best_failure.reason


def test_commutative_tries_both_orders():
    g = graph_of([("Add", ["x", "c"], ["s"], {})], initializers={"c": [1.0]})
    assert run(Op("Add", Const("k"), Any("v")), g, "s")[0] is None
    found, _ = run(Op("Add", Const("k"), Any("v"), commutative=True), g, "s")
    assert found["k"].name == "c" and found["v"].name == "x"


def test_alternatives_take_the_first_that_matches():
    g = graph_of([("Mul", ["x", "y"], ["m"], {})])
    found, _ = run(Or(Op("Add", Any(), Any(), name="a"), Op("Mul", Any(), Any(), name="m")), g, "m")
    assert "m" in found.bindings and "a" not in found.bindings


def test_attributes_are_constraints():
    g = graph_of([("Softmax", ["x"], ["p"], {"axis": 0})])
    assert run(Op("Softmax", Any(), attrs={"axis": -1}), g, "p")[0] is None
    assert run(Op("Softmax", Any(), attrs={"axis": lambda a: a in (0, -1)}), g, "p")[0]


def test_scalar_needs_one_known_element():
    g = graph_of([("Div", ["x", "c"], ["d"], {})], initializers={"c": [2.0, 3.0]})
    assert run(Op("Div", Any(), Scalar("s")), g, "d")[0] is None
    g = graph_of([("Sqrt", ["c"], ["r"], {}), ("Div", ["x", "r"], ["d"], {})],
                 initializers={"c": 16.0})
    found, _ = run(Op("Div", Any(), Scalar("s")), g, "d")
    assert float(constant_eval(found["s"])) == 4.0  # a constant expression, evaluated


def test_const_rejects_computed_tensors():
    g = graph_of([("Add", ["x", "y"], ["s"], {}), ("MatMul", ["x", "s"], ["m"], {})])
    found, ctx = run(Op("MatMul", Any(), Const("w")), g, "m")
    assert found is None and "expected a constant" in ctx.best_failure.reason


def test_chain_takes_steps_in_any_order_and_number():
    steps = (Op("Cast", REST),
             Op("Mul", REST, Scalar("scale*"), commutative=True), Op("Add", REST, Any("mask*")))
    pattern = Chain(steps, until=Op("MatMul", Any("a"), Any("b"), name="mm"), max_steps=4)
    g = graph_of([
        ("MatMul", ["x", "y"], ["mm"], {}), ("Add", ["mm", "y"], ["a1"], {}),
        ("Mul", ["two", "a1"], ["m1"], {}), ("Add", ["m1", "x"], ["a2"], {}),
    ], initializers={"two": 2.0})
    found, _ = run(pattern, g, "a2")
    assert found["mm"].name == "mm"
    # List captures collect every binding, in data-flow order (nearest the MatMul first).
    assert [t.name for t in found["mask"]] == ["y", "x"]
    assert [t.name for t in found["scale"]] == ["two"]


def test_chain_stops_at_its_depth_limit():
    pattern = Chain((Op("Relu", REST),), until=Op("MatMul", Any(), Any()), max_steps=2)
    g = graph_of([("MatMul", ["x", "y"], ["t0"], {})] +
                 [("Relu", [f"t{i}"], [f"t{i + 1}"], {}) for i in range(3)])
    assert run(pattern, g, "t2")[0] is not None
    assert run(pattern, g, "t3")[0] is None


def test_chain_otherwise_ends_anywhere():
    pattern = Chain((Op("Relu", REST),), until=Op("MatMul", Any(), Any()), otherwise=Any("src"))
    g = graph_of([("Relu", ["x"], ["r"], {})])
    found, _ = run(pattern, g, "r")
    assert found["src"].name == "x"


def test_a_name_bound_twice_must_be_the_same_tensor():
    pattern = Op("Add", Any("t"), Any("t"))
    assert run(pattern, graph_of([("Add", ["x", "x"], ["s"], {})]), "s")[0] is not None
    assert run(pattern, graph_of([("Add", ["x", "y"], ["s"], {})]), "s")[0] is None


def test_open_inputs_accept_extra_inputs():
    g = graph_of([("Slice", ["x", "s", "e"], ["o"], {})],
                 initializers={"s": [0.0], "e": [1.0]})
    assert run(Op("Slice", Any()), g, "o")[0] is None
    assert run(Op("Slice", Any(), ...), g, "o")[0] is not None


def test_reached_nodes_are_not_duplicated():
    g = graph_of([("Relu", ["x"], ["r"], {}), ("Add", ["r", "r"], ["s"], {})])
    found, _ = run(Op("Add", Op("Relu", Any(), name="a"), Op("Relu", Any(), name="b")), g, "s")
    assert [n.op for n in found.nodes] == ["Add", "Relu"]


def test_match_is_pure():
    g = graph_of([("Add", ["x", "y"], ["s"], {})])
    before = [(n.op, [t.name for t in n.inputs]) for n in g.nodes]
    run(Op("Mul", Any(), Any()), g, "s")
    assert [(n.op, [t.name for t in n.inputs]) for n in g.nodes] == before


def test_list_captures_of_ops_collect_outputs_and_nodes():
    pattern = Chain((Op("Add", REST, Any("bias*"), name="add*"),), until=Op("MatMul", Any(), Any()))
    g = graph_of([("MatMul", ["x", "y"], ["m"], {}), ("Add", ["m", "x"], ["a1"], {}),
                  ("Add", ["a1", "y"], ["a2"], {})])
    found, _ = run(pattern, g, "a2")
    assert [t.name for t in found["add"]] == ["a1", "a2"]
    assert [n.op for n in found["add.node"]] == ["Add", "Add"]
