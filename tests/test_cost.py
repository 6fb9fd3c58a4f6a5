"""The static cost model: FLOPs and bytes from shapes, checked against hand counts."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from xattn_compiler import zoo
from xattn_compiler.cost import bind_dims, estimate_cost
from xattn_compiler.io import load
from xattn_compiler.split import split_static_kv


def _model(nodes, inputs, outputs, initializers=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _value(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_a_matmul_costs_two_flops_per_multiply_add_and_reads_and_writes_its_tensors():
    weight = numpy_helper.from_array(np.zeros((8, 16), np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_value("x", ["batch", "seq", 8])], [_value("y", ["batch", "seq", 16])],
                   [weight])
    cost = estimate_cost(model, {"batch": 2, "seq": 5})
    assert cost.flops == 2 * (2 * 5) * 8 * 16
    assert cost.bytes_moved == 4 * (2 * 5 * 8 + 8 * 16 + 2 * 5 * 16)
    assert cost.weight_bytes == 4 * 8 * 16
    assert cost.by_op == {"MatMul": cost.flops} and cost.unknown_nodes == []


def test_layout_ops_cost_no_flops_and_softmax_a_few_per_element():
    target = numpy_helper.from_array(np.array([0, 0, 2, 4], np.int64), "target")
    model = _model([helper.make_node("Reshape", ["x", "target"], ["r"], name="split"),
                    helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3], name="t"),
                    helper.make_node("Softmax", ["t"], ["y"], axis=-1, name="softmax")],
                   [_value("x", [1, 3, 8])], [_value("y", [1, 2, 3, 4])], [target])
    cost = estimate_cost(model)
    assert cost.by_op == {"Reshape": 0, "Transpose": 0, "Softmax": 5 * 24}


def test_a_convolution_counts_its_kernel_per_output_element():
    weight = numpy_helper.from_array(np.zeros((6, 3, 3, 3), np.float32), "w")
    model = _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")],
                   [_value("x", [1, 3, 8, 8])], [_value("y", [1, 6, 8, 8])], [weight])
    assert estimate_cost(model).flops == 2 * (6 * 8 * 8) * (3 * 3 * 3)


def test_binding_an_unknown_dim_is_an_error_naming_it():
    model = _model([helper.make_node("Relu", ["x"], ["y"])], [_value("x", ["n", 4])],
                   [_value("y", ["n", 4])])
    with pytest.raises(ValueError, match="frames"):
        bind_dims(model, {"frames": 3})


def test_the_split_decoder_step_costs_less_than_the_whole_model():
    exported = zoo.cached_export("whisper-decoder-eager")
    model = load(exported.path)
    split = split_static_kv(model)
    dims = {d.dim_param: 4 for v in model.graph.input for d in v.type.tensor_type.shape.dim
            if d.dim_param}
    whole = estimate_cost(model, dims)
    step = estimate_cost(split.decoder, {k: v for k, v in dims.items() if any(
        d.dim_param == k for i in split.decoder.graph.input for d in i.type.tensor_type.shape.dim)})
    once = estimate_cost(split.projector, {k: v for k, v in dims.items() if any(
        d.dim_param == k for i in split.projector.graph.input for d in i.type.tensor_type.shape.dim)})
    assert whole.unknown_nodes == [] and step.unknown_nodes == []
    assert step.flops < whole.flops
    # The projector's work is what the step no longer does (layout ops cost nothing).
    assert step.flops + once.flops == pytest.approx(whole.flops, rel=0.02)
