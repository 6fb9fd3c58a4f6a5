"""A fused QKV projection with RoPE on Q and K, on the real export (transformers GPT-NeoX,
dynamo): one ``query_key_value`` MatMul, cut per head into Q, K and V, rotary on Q and K.

Q's and K's walks stop at the rotation (positions are not a source); V's walk goes through
the cut to the projection's input, as it does without RoPE, and the rotation between the cut
and Q/K is the block's own, so nothing escapes. It was reported as V's piece of the cut.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import numpy_helper

import xattn_compiler as xc
from tests.models import small_zoo_export
from xattn_compiler.inspection import inspect_model
from xattn_compiler.zoo.export import fused_attention_count

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def neox(export_cache):
    exp = small_zoo_export("gpt-neox-decoder", export_cache)
    return onnx.load(exp.path), exp.sample()[0], exp.manifest["attention"]


def _fused_qkv_inputs(model: onnx.ModelProto) -> set[str]:
    """Inputs of the MatMuls whose weight is [E, 3*E] (the fused query_key_value)."""
    weights = {init.name: numpy_helper.to_array(init).shape for init in model.graph.initializer}
    return {node.input[0] for node in model.graph.node if node.op_type == "MatMul"
            and len(weights.get(node.input[1], ())) == 2
            and weights[node.input[1]][1] == 3 * weights[node.input[1]][0]}


def test_gpt_neox_fused_qkv_with_rope_reports_v_from_the_projection_input(neox):
    model, _, truth = neox
    blocks = inspect_model(model)["attention"]
    assert len(blocks) == truth["self"]
    projection_inputs = _fused_qkv_inputs(model)
    assert len(projection_inputs) == truth["self"]
    assert {block["v_source"] for block in blocks} == projection_inputs
    assert all(block["kind"] == "self" and not block["escapes"] for block in blocks)


def test_gpt_neox_fused_qkv_with_rope_fuses_and_verifies(neox):
    model, inputs, truth = neox
    optimized = xc.optimize(model).model
    assert fused_attention_count(optimized) == truth["self"]
    check = xc.verify(model, optimized, inputs=inputs)
    assert check.ok, check.summary()
