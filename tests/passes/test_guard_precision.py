"""guard-precision: the score MatMul and Softmax of every block run in float32.

Half-precision blocks (unfused cores, ONNX Attention) are checked against the original in ONNX
Runtime, for validity, idempotence and determinism; float32 models change only in the layer
list the TensorRT stage reads from the metadata.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper
from xattn_compiler.passes import FuseAttention, GuardPrecision
from xattn_compiler.passes.guard_precision import METADATA_KEY

from xattn_compiler.attention import find_attention
from xattn_compiler.testing import AttentionSpec, attention_model
from xattn_compiler.testing.assertions import assert_pass_properties


def guard(model, inputs):
    return assert_pass_properties(GuardPrecision(), model, inputs, allow_refusal=False)


def types(model: onnx.ModelProto) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type
            for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}


def layers(model: onnx.ModelProto) -> list[str]:
    value = {p.key: p.value for p in model.metadata_props}.get(METADATA_KEY)
    return value.split(",") if value else []


@pytest.mark.parametrize("mask", ["none", "add_input", "where_bool"])
def test_an_fp16_core_computes_scores_and_softmax_in_fp32(mask):
    built = attention_model(AttentionSpec(kind="self", dtype="float16", mask=mask))
    result = guard(built.model, built.inputs)
    assert result.counts["cores_cast"] == 1
    (block,) = find_attention(result.model)
    scores, softmax = block.core["scores.node"], block.core["softmax.node"]
    seen = types(result.model)
    assert seen[scores.outputs[0].name] == TensorProto.FLOAT
    assert seen[softmax.outputs[0].name] == TensorProto.FLOAT
    assert seen[block.core["context"].name] == TensorProto.FLOAT16  # the rest stays half
    assert sorted(layers(result.model)) == sorted([scores.name, softmax.name])


def test_a_fused_fp16_attention_gets_float_softmax_precision():
    built = attention_model(AttentionSpec(kind="cross", dtype="float16"))
    fused = FuseAttention().run(built.model).model
    result = guard(fused, built.inputs)
    (node,) = [n for n in result.model.graph.node if n.op_type == "Attention"]
    precision = [a for a in node.attribute if a.name == "softmax_precision"]
    assert precision and helper.get_attribute_value(precision[0]) == TensorProto.FLOAT
    assert layers(result.model) == [node.name]


def test_a_float32_model_only_gets_the_layer_list():
    built = attention_model(AttentionSpec(kind="cross"))
    result = guard(built.model, built.inputs)
    assert result.counts == {"cores_cast": 0, "attention_pinned": 0}
    assert list(result.model.graph.node) == list(built.model.graph.node)
    assert len(layers(result.model)) == 2


def test_a_model_without_attention_is_unchanged():
    from xattn_compiler.testing import classifier_model

    model = classifier_model().model
    result = GuardPrecision().run(model)
    assert not result.changed and not layers(result.model)
