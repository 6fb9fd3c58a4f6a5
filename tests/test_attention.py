"""The attention matcher: each spelling matched, each look-alike not; facts checked against truth.

Graphs come from ``xattn_compiler.testing.builders``, which plants blocks spelled as exporters
spell them and records what a matcher must report.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from xattn_compiler.attention import analyze_attention, find_attention
from xattn_compiler.testing import (
    HEAD_LAYOUTS,
    K_TRANSPOSES,
    MASKS,
    PROJECTIONS,
    SCALES,
    SHAPE_STYLES,
    AttentionSpec,
    attention_model,
    classifier_model,
    cnn_model,
    softmax_between_weights_model,
    spec_conflicts,
)


def assert_found_as_planted(built):
    blocks = find_attention(built.model)
    assert len(blocks) == len(built.blocks), [b.id for b in blocks]
    by_output = {b.output.name: b for b in blocks}
    for truth in built.blocks:
        block = by_output.get(truth.output)
        assert block is not None, f"no block ends at {truth.output}: {sorted(by_output)}"
        assert block.kind == truth.kind
        assert (block.num_heads, block.head_dim) == (truth.num_heads, truth.head_dim)
        assert block.scale == pytest.approx(truth.scale, rel=2e-3)
        assert (block.q.source.name, block.k.source.name, block.v.source.name) == (
            truth.q_source, truth.k_source, truth.v_source)
        assert tuple(block.static_inputs) == tuple(truth.static_inputs)
        assert block.kv_source_kind == truth.kv_source_kind
        assert not block.escapes


def variants(option: str, values) -> list[AttentionSpec]:
    specs = []
    for kind, value in itertools.product(("self", "cross"), values):
        options = {"kind": kind, option: value}
        if not spec_conflicts(**options):
            specs.append(AttentionSpec(**options))
    return specs


def spec_id(spec: AttentionSpec) -> str:
    default = AttentionSpec(kind=spec.kind)
    changed = [f"{f.name}={getattr(spec, f.name)}" for f in dataclasses.fields(spec)
               if getattr(spec, f.name) != getattr(default, f.name)]
    return "-".join([spec.kind, *changed]) or spec.kind


ONE_AT_A_TIME = [
    *variants("projection", PROJECTIONS), *variants("head_layout", HEAD_LAYOUTS),
    *variants("k_transpose", K_TRANSPOSES), *variants("scale", SCALES),
    *variants("mask", MASKS), *variants("shape_style", SHAPE_STYLES),
    *variants("softmax_cast", (True,)), *variants("dtype", ("float16",)),
]


@pytest.mark.parametrize("spec", ONE_AT_A_TIME, ids=spec_id)
def test_match_each_spelling(spec):
    assert_found_as_planted(attention_model(spec))


@pytest.mark.parametrize("layout, mask, scale", list(itertools.product(HEAD_LAYOUTS, MASKS, SCALES)))
def test_match_layouts_masks_and_scales_together(layout, mask, scale):
    spec = AttentionSpec(kind="cross", head_layout=layout, mask=mask, scale=scale)
    assert_found_as_planted(attention_model(spec))


@pytest.mark.parametrize("context_kind", ["input", "constant", "encoded", "internal"])
@pytest.mark.parametrize("layers", [1, 2])
def test_match_decoder_stacks_with_each_context(context_kind, layers):
    built = attention_model(AttentionSpec(kind="cross"), self_spec=AttentionSpec(kind="self"),
                            layers=layers, context_kind=context_kind)
    assert_found_as_planted(built)


@pytest.mark.parametrize("projection", ["fused_split", "fused_slice", "fused_gather"])
def test_fused_qkv_is_self_attention(projection):
    blocks = find_attention(attention_model(AttentionSpec(kind="self", projection=projection)).model)
    assert [b.kind for b in blocks] == ["self"]


@pytest.mark.parametrize("build", [classifier_model, softmax_between_weights_model, cnn_model])
def test_no_match_on_look_alikes(build):
    report = analyze_attention(build().model)
    assert report.blocks == []


def test_softmax_between_weights_is_explained():
    (miss,) = analyze_attention(softmax_between_weights_model().model).near_misses
    assert "2-D" in miss.reason


def test_no_match_when_softmax_is_over_the_wrong_axis():
    model = attention_model(AttentionSpec(kind="cross")).model
    for node in model.graph.node:
        if node.op_type == "Softmax":
            node.attribute[0].CopyFrom(helper.make_attribute("axis", 1))
    report = analyze_attention(model)
    assert report.blocks == [] and "axis" in report.near_misses[0].reason


def test_an_intermediate_read_outside_the_block_is_reported():
    built = attention_model(AttentionSpec(kind="cross"))
    model = built.model
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(helper.make_tensor_value_info(softmax.output[0],
                                                            onnx.TensorProto.FLOAT, None))
    (block,) = find_attention(model)
    assert any("graph output" in reason for reason in block.escapes)


# --- already fused ------------------------------------------------------------------------------

def fused_model(op: str, domain: str, inputs: list[str], opset: int, **attrs) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w_q")
    nodes = [helper.make_node("MatMul", ["x", "w_q"], ["q"]),
             helper.make_node(op, inputs, ["y"], domain=domain, **attrs)]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "g", [value("x", onnx.TensorProto.FLOAT, [2, 5, 16]),
                     value("k", onnx.TensorProto.FLOAT, [2, 7, 16]),
                     value("v", onnx.TensorProto.FLOAT, [2, 7, 16])],
        [value("y", onnx.TensorProto.FLOAT, None)], [w])
    imports = [helper.make_opsetid("", opset)] + (
        [helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=imports)


@pytest.mark.parametrize("op, domain, opset, attrs", [
    ("Attention", "", 23, {"q_num_heads": 4, "kv_num_heads": 4}),
    ("MultiHeadAttention", "com.microsoft", 18, {"num_heads": 4}),
])
def test_fused_ops_are_reported_as_fused(op, domain, opset, attrs):
    (block,) = find_attention(fused_model(op, domain, ["q", "k", "v"], opset, **attrs))
    assert block.fused and block.kind == "cross"
    assert (block.num_heads, block.head_dim) == (4, 4)
    assert block.q.source.name == "x" and block.k.source.name == "k"
    assert block.static_inputs == ["k", "v"] and block.kv_source_kind == "graph_input"


def test_tensorrt_cross_attention_plugin_is_reported_as_fused():
    value = helper.make_tensor_value_info
    node = helper.make_node("fMHCA", ["q", "kv"], ["y"], plugin_version="1", plugin_namespace="")
    graph = helper.make_graph(
        [node], "g", [value("q", onnx.TensorProto.FLOAT16, [2, 5, 4, 16]),
                      value("kv", onnx.TensorProto.FLOAT16, [2, 7, 4, 2, 16])],
        [value("y", onnx.TensorProto.FLOAT16, [2, 5, 4, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    (block,) = find_attention(model)
    assert (block.fused, block.kind, block.op) == (True, "cross", "fMHCA")
    assert (block.num_heads, block.head_dim) == (4, 16)
    assert block.k.source.name == block.v.source.name == "kv"
