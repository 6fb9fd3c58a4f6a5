"""Fused attention without head splits: ``onnx-attention{qkv-layout=3d}`` and ``ort-mha`` read
the projection outputs [B, S, H*D] and write the merged [B, Sq, H*D], so a block keeps no
Reshape or Transpose of its own.

Each rewrite is checked against the original in ONNX Runtime at two sizes of the dynamic dims,
for validity, idempotence and determinism (``assert_pass_properties``); the blocks that cannot
go 3-D (K/V given in head layout, a context read 4-D) are fused the 4-D way or split back.
Real exports close the file (slow): every block fused, fewer Transposes and Reshapes than the
4-D form, outputs unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.passes import FuseAttention

import xattn_compiler as xc
from tests.models import small_zoo_export, small_zoo_names
from xattn_compiler.errors import InputError
from xattn_compiler.ir import op_histogram
from xattn_compiler.testing import AttentionSpec, attention_model
from xattn_compiler.testing.assertions import assert_pass_properties
from xattn_compiler.verification import verify

LAYOUT_3D = {"target": "onnx-attention", "qkv_layout": "3d"}
ORT_MHA = {"target": "ort-mha"}


def samples(built):
    other = {name: 3 for name in built.dynamic}
    return [built.inputs, built.sample(seed=3, **other)[0]] if other else [built.inputs]


def fuse(built, **options):
    return assert_pass_properties(FuseAttention(**options), built.model, samples(built),
                                  allow_refusal=False)


def fused_node(model: onnx.ModelProto) -> onnx.NodeProto:
    (node,) = [n for n in model.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]
    return node


def attr(node: onnx.NodeProto, name: str):
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else None


def layout_ops(model: onnx.ModelProto) -> int:
    histogram = op_histogram(model)
    return histogram.get("Transpose", 0) + histogram.get("Reshape", 0)


def ranks(model: onnx.ModelProto, names) -> list[int | None]:
    typed = {v.name: v for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    return [len(typed[n].type.tensor_type.shape.dim) if n in typed else None for n in names]


@pytest.mark.parametrize("options", [LAYOUT_3D, ORT_MHA], ids=["onnx-attention-3d", "ort-mha"])
@pytest.mark.parametrize("kind", ["cross", "self"])
def test_a_block_reads_its_projections_and_keeps_no_reshape_or_transpose(options, kind):
    built = attention_model(AttentionSpec(kind=kind, num_heads=2, head_dim=8, mask="add_input"))
    assert layout_ops(built.model) == 9  # three head splits and the merge (2 each), K^T
    result = fuse(built, **options)
    assert layout_ops(result.model) == 0
    node = fused_node(result.model)
    assert ranks(result.model, node.input[:3]) == [3, 3, 3]
    heads = ("q_num_heads", "kv_num_heads") if node.op_type == "Attention" else ("num_heads",)
    assert all(attr(node, name) == 2 for name in heads)


@pytest.mark.parametrize("k_transpose", ["separate", "fused"])
def test_both_spellings_of_k_transposed_are_read_back_to_the_key_projection(k_transpose):
    built = attention_model(AttentionSpec(kind="cross", k_transpose=k_transpose))
    result = fuse(built, **LAYOUT_3D)
    assert layout_ops(result.model) == 0


def test_a_constant_context_of_batch_one_is_expanded_in_its_own_rank():
    built = attention_model(AttentionSpec(kind="cross"), context_kind="constant")
    result = fuse(built, **LAYOUT_3D)
    node = fused_node(result.model)
    assert ranks(result.model, node.input[:3]) == [3, 3, 3]


def test_kv_given_in_head_layout_is_fused_the_4d_way():
    built = attention_model(AttentionSpec(kind="cross", projection="none"))
    result = fuse(built, **LAYOUT_3D)
    node = fused_node(result.model)
    assert ranks(result.model, node.input[:3]) == [4, 4, 4]
    mha = fuse(built, **ORT_MHA)  # MultiHeadAttention: 3-D Q with 4-D K/V
    node = fused_node(mha.model)
    assert ranks(mha.model, node.input[:3]) == [3, 4, 4]


def _self_attention(split_target, merge_target=None) -> onnx.ModelProto:
    """Self-attention on ``x[B,S,8]`` with two heads split by ``split_target``; merged by
    ``merge_target`` into the output ``y``, or else the 4-D context is the graph output (no
    head merge for the op's 3-D output to take over)."""
    f = TensorProto.FLOAT
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"w{n}")
             for n in "qkv"]
    inits += [numpy_helper.from_array(np.array(split_target, np.int64), "split"),
              numpy_helper.from_array(np.array(0.5, np.float32), "scale")]
    nodes = []
    for n in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"w{n}"], [f"{n}3"]),
                  helper.make_node("Reshape", [f"{n}3", "split"], [f"{n}4"]),
                  helper.make_node("Transpose", [f"{n}4"], [n], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["s"]),
              helper.make_node("Mul", ["s", "scale"], ["ss"]),
              helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "v"], ["context"])]
    output = "context"
    if merge_target is not None:
        inits.append(numpy_helper.from_array(np.array(merge_target, np.int64), "merge"))
        nodes += [helper.make_node("Transpose", ["context"], ["bshd"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["bshd", "merge"], ["y"])]
        output = "y"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", f, ["b", "s", 8])],
                              [helper.make_tensor_value_info(output, f, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_splits_and_merges_are_proved_by_their_targets_where_inference_names_dims_afresh():
    # A -1 in the target: shape inference calls the length unk__N, not s.
    model = _self_attention([0, -1, 2, 4], [0, -1, 8])
    result = assert_pass_properties(FuseAttention(**LAYOUT_3D), model, allow_refusal=False)
    assert layout_ops(result.model) == 0
    # A target that does not keep the batch (here it folds it into the length) is no split.
    folded = _self_attention([1, -1, 2, 4], [0, -1, 8])
    result = assert_pass_properties(FuseAttention(**LAYOUT_3D), folded, allow_refusal=False,
                                    inputs=[{"x": np.ones((1, 3, 8), np.float32)}])
    assert ranks(result.model, fused_node(result.model).input[:3]) == [4, 4, 4]


def test_a_context_read_in_head_layout_stays_4d_where_3d_would_split_it_back():
    model = _self_attention([0, 0, 2, 4])
    result = assert_pass_properties(FuseAttention(**LAYOUT_3D), model, allow_refusal=False)
    node = fused_node(result.model)
    assert node.output[0] == "context" and ranks(result.model, node.input[:3]) == [4, 4, 4]
    # MultiHeadAttention has 3-D output only: it is split back under the context's name.
    mha = assert_pass_properties(FuseAttention(**ORT_MHA), model, allow_refusal=False)
    producer = {o: n for n in mha.model.graph.node for o in n.output}["context"]
    assert producer.op_type == "Transpose"


def test_an_unknown_layout_is_refused_with_the_choices():
    with pytest.raises(InputError, match="qkv-layout must be one of 4d, 3d"):
        FuseAttention(target="onnx-attention", qkv_layout="5d").run(
            attention_model(AttentionSpec()).model)


# --- real exports (slow) ----------------------------------------------------------------------

@pytest.fixture(scope="module", params=small_zoo_names())
def cleaned(request, export_cache):
    exported = small_zoo_export(request.param, export_cache)
    model = xc.optimize(xc.load(exported.path), "canonicalize,normalize-spellings,"
                                                "unroll-control-flow,remove-layout-clutter").model
    four_d = FuseAttention().run(model).model
    return exported, model, four_d


@pytest.mark.slow
@pytest.mark.parametrize("options", [LAYOUT_3D, ORT_MHA], ids=["onnx-attention-3d", "ort-mha"])
def test_every_zoo_model_fuses_every_block_with_no_more_layout_ops_than_4d(cleaned, options):
    exported, model, four_d = cleaned
    result = FuseAttention(**options).run(model)
    check = verify(model, result.model, inputs=exported.sample()[0])
    assert check.ok, check.summary()
    histogram = op_histogram(result.model)
    fused = histogram.get("Attention", 0) + histogram.get("MultiHeadAttention", 0)
    if options is ORT_MHA and not fused:
        assert result.details["skipped"]  # every block has a stated reason (fp32 Softmax)
    elif options is ORT_MHA:  # (onnx-attention leaves blocks in If branches: TensorRT#4739)
        assert fused >= op_histogram(four_d).get("Attention", 0), result.details["skipped"]
    else:  # as many as the 4-D form (which test_fuse_attention holds to the manifest)
        assert fused == op_histogram(four_d).get("Attention", 0), result.details["skipped"]
    if options is LAYOUT_3D:  # (ort-mha adds a merge and a split where a block has neither)
        assert layout_ops(result.model) <= layout_ops(four_d)
    assert not FuseAttention(**options).run(result.model).changed


@pytest.mark.slow
def test_the_default_fusion_adds_no_transpose_or_reshape(cleaned):
    # A Shape of K^T (for the mask's length) used to keep the K^T Transpose alive beside the
    # K the op reads (T5 went from 33 to 37), and a constant context's K^T was transposed
    # back by a new node rather than folded.
    exported, model, four_d = cleaned
    assert layout_ops(four_d) <= layout_ops(model)


@pytest.mark.slow
def test_a_constant_prompt_s_k_and_v_are_laid_out_for_the_op_as_constants(export_cache):
    # The prompt buffer's K^T and V fold to constants in head layout; the op's K (4-D) or
    # K and V (3-D) are those constants laid out anew, not Transposes of them.
    exported = small_zoo_export("constant-context-prompt-buffer", export_cache)
    model = xc.optimize(xc.load(exported.path), "canonicalize,remove-layout-clutter").model
    for options, left in (({}, layout_ops(model)), (LAYOUT_3D, 4)):
        result = FuseAttention(**options).run(model)
        assert verify(model, result.model, inputs=exported.sample()[0]).ok
        assert layout_ops(result.model) <= left
        constants = {t.name for t in result.model.graph.initializer}
        assert not [n.name for n in result.model.graph.node
                    if n.op_type == "Transpose" and n.input[0] in constants]
