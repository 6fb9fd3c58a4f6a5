"""fold-batch-axes: an attention core with several batch axes runs on one, and then fuses.

The case is ProphetNet's n-gram self-attention (transformers, dynamo export): its predict
streams are one 5-D core ``[batch, ngram, heads, seq, 2*seq]``. Hand-built 5-D cores show
what is proved before anything changes (masks that broadcast across the leading axes in a way
a folded batch cannot are left alone).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from xattn_compiler.passes import FoldBatchAxes

import xattn_compiler as xc
from tests.models import small_zoo_export
from xattn_compiler.attention import find_attention
from xattn_compiler.testing.assertions import assert_pass_properties
from xattn_compiler.verification import verify
from xattn_compiler.zoo.export import fused_attention_count

from .test_reshapes import other_sizes

FLOAT = TensorProto.FLOAT


def five_dim_core(mask_shape: list[int] | None = None) -> onnx.ModelProto:
    """Softmax(q @ k_t + mask) @ v on [batch, 3 streams, 4 heads, 5, 8]."""
    inputs = [helper.make_tensor_value_info("q", FLOAT, ["batch", 3, 4, 5, 8]),
              helper.make_tensor_value_info("k_t", FLOAT, ["batch", 3, 4, 8, 6]),
              helper.make_tensor_value_info("v", FLOAT, ["batch", 3, 4, 6, 8])]
    nodes = [helper.make_node("MatMul", ["q", "k_t"], ["scores"])]
    probs_input = "scores"
    if mask_shape is not None:
        inputs.append(helper.make_tensor_value_info("mask", FLOAT, mask_shape))
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["masked"]))
        probs_input = "masked"
    nodes += [helper.make_node("Softmax", [probs_input], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v"], ["context"])]
    graph = helper.make_graph(nodes, "five_dim_core", inputs,
                              [helper.make_tensor_value_info("context", FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _layouts(model: onnx.ModelProto) -> list[str]:
    return [block.layout for block in find_attention(model)]


@pytest.mark.parametrize("mask_shape", [None, ["batch", 3, 4, 5, 6], [1, 1, 4, 5, 6], [5, 6]])
def test_a_five_dim_core_runs_on_one_batch_axis(mask_shape):
    model = five_dim_core(mask_shape)
    assert _layouts(model) == ["BNHSD"]
    result = assert_pass_properties(FoldBatchAxes(), model, allow_refusal=False)
    assert result.counts == {"cores_folded": 1}
    assert _layouts(result.model) == ["BHSD"]


def test_a_mask_broadcast_over_the_batch_but_not_the_streams_is_left_alone():
    """[1, 3, 1, 5, 6]: one mask row per stream, shared by every batch row; a folded batch
    would need it repeated per batch row, which the pass does not write."""
    result = FoldBatchAxes()(five_dim_core([1, 3, 1, 5, 6]))
    assert not result.changed
    assert result.counts == {"cores_folded": 0}


# --- the real export --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def prophetnet(export_cache):
    exp = small_zoo_export("prophetnet-einsum", export_cache)
    return onnx.load(exp.path), exp.sample()[0]


@pytest.mark.slow
def test_prophetnet_ngram_predict_stream_core_runs_on_one_batch_axis(prophetnet):
    original, inputs = prophetnet
    # The export holds Einsums: the matcher sees MatMuls after normalize-spellings.
    normalized = xc.optimize(original, "normalize-spellings").model
    assert sorted(_layouts(normalized)) == ["BHSD", "BHSD", "BHSD", "BNHSD"]
    result = FoldBatchAxes()(normalized)
    assert result.counts == {"cores_folded": 1}
    assert _layouts(result.model) == ["BHSD"] * 4
    for check in (verify(original, result.model, inputs=inputs),
                  verify(original, result.model, dims=other_sizes(original, inputs), seed=3)):
        assert check.ok, check.summary()
    assert not FoldBatchAxes()(result.model).changed


@pytest.mark.slow
def test_prophetnet_ngram_predict_stream_fuses(prophetnet):
    original, inputs = prophetnet
    optimized = xc.optimize(original).model
    assert fused_attention_count(optimized) == 4  # encoder, main stream, predict streams, cross
    check = verify(original, optimized, inputs=inputs)
    assert check.ok, check.summary()


def test_the_pass_declares_its_name_and_description():
    assert FoldBatchAxes.name == "fold-batch-axes"
    assert FoldBatchAxes.description
    assert np.array_equal(sorted(FoldBatchAxes()(five_dim_core()).counts), ["cores_folded"])
