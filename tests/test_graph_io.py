"""graph_io builds what graphsurgeon builds: the same export, byte for byte, both ways round.

Each model goes through four routes: graphsurgeon's importer or ours, then graphsurgeon's
exporter or ours. All four must serialize to the same bytes, on real exports and on the odd
corners (bodies reading outer tensors, omitted optional inputs, repeated value_info entries,
sequence-typed values, tensors nobody recorded a type for).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import models
from tests.models import small_zoo_export, small_zoo_names
from xattn_compiler import graph_io
from xattn_compiler.ir import import_with_shapes, infer_shapes

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def routes(model: onnx.ModelProto) -> dict[str, bytes]:
    out = {}
    for importer in ("gs", "ours"):
        for exporter in ("gs", "ours"):
            graph = gs.import_onnx(model) if importer == "gs" else graph_io.import_onnx(model)
            exported = (gs.export_onnx(graph, do_type_check=False) if exporter == "gs"
                        else graph_io.export_onnx(graph))
            out[f"{importer} import, {exporter} export"] = exported.SerializeToString()
    return out


def assert_same_bytes(model: onnx.ModelProto) -> None:
    built = routes(model)
    reference = built.pop("gs import, gs export")
    for route, data in built.items():
        assert data == reference, route


def test_a_body_reading_an_outer_tensor_and_its_initializers():
    assert_same_bytes(models.tiny_if())
    assert_same_bytes(models.tiny_loop())


def test_omitted_optional_inputs_repeated_value_info_and_untyped_tensors():
    nodes = [
        helper.make_node("Clip", ["x", "", "hi"], ["c"], name="clip"),
        helper.make_node("Dropout", ["c"], ["d", ""], name="drop"),
        helper.make_node("Relu", ["d"], ["y"], name="", domain=""),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", FLOAT, None)],
        [numpy_helper.from_array(np.float32(1.0), "hi")],
        value_info=[helper.make_tensor_value_info("c", FLOAT, None),
                    helper.make_tensor_value_info("c", FLOAT, ["n", 3]),
                    helper.make_tensor_value_info("d", FLOAT, ["n", 3]),
                    helper.make_tensor_value_info("d", TensorProto.FLOAT16, [9])],  # first wins
        doc_string="the graph's own words")
    assert_same_bytes(models.make_model(graph))


def test_sequence_values_keep_their_type():
    nodes = [helper.make_node("SplitToSequence", ["x"], ["s"], name="split", axis=0),
             helper.make_node("ConcatFromSequence", ["s"], ["y"], name="concat", axis=0)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", FLOAT, [2, 3])],
        value_info=[helper.make_tensor_sequence_value_info("s", FLOAT, [1, 3])])
    model = models.make_model(graph)
    assert_same_bytes(model)
    # Types learned by refresh (not by import) keep the sequence a sequence too.
    exported = graph_io.export_onnx(import_with_shapes(infer_shapes(model)))
    kinds = {v.name: v.type.WhichOneof("value") for v in exported.graph.value_info}
    assert kinds["s"] == "sequence_type"


def test_node_attributes_of_every_kind():
    tensor = numpy_helper.from_array(np.arange(3, dtype=np.int64), "t")
    nodes = [helper.make_node("Constant", [], ["k"], name="k", value=tensor),
             helper.make_node("Add", ["x", "k"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", INT64, [3])],
                              [helper.make_tensor_value_info("y", INT64, [3])])
    model = models.make_model(graph)
    custom = helper.make_node("Custom", ["y"], ["z"], name="custom", domain="my.ops", f=0.5,
                              i=3, s="text", floats=[1.0, 2.0], ints=[1, 2], strings=["a", "b"])
    model.graph.node.append(custom)
    model.graph.output[0].name = "z"
    model.opset_import.append(helper.make_opsetid("my.ops", 1))
    assert_same_bytes(model)


@pytest.mark.parametrize("name", small_zoo_names())
def test_real_exports(name, export_cache):
    model = onnx.load(small_zoo_export(name, export_cache).path)
    assert_same_bytes(model)
    assert_same_bytes(infer_shapes(model))  # with a value_info entry for every tensor
