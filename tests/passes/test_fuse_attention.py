"""fuse-attention: each matched block becomes the target's fused node, outputs unchanged.

Blocks come from the builders (one spelling per test: scale, mask, precision, layout) and from
small hand-made edits for what must be refused. Every rewrite is checked against the original
in ONNX Runtime (optimizations off) at two sizes of the dynamic dims, for validity, and for
idempotence and determinism (``assert_pass_properties``). Real exports close the file (slow).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.passes import FuseAttention

import xattn_compiler as xc
from tests.models import small_zoo_export, small_zoo_names
from xattn_compiler.attention import find_attention
from xattn_compiler.errors import InputError
from xattn_compiler.fusion import TARGETS, load_target
from xattn_compiler.fusion.operands import head_problem, plan_core
from xattn_compiler.fusion.opset import upgrade_opset
from xattn_compiler.io import default_opset
from xattn_compiler.ir import op_histogram
from xattn_compiler.testing import AttentionSpec, attention_model, classifier_model
from xattn_compiler.testing.assertions import assert_pass_properties
from xattn_compiler.testing.strategies import Layer, Recipe, Wrap, build_example
from xattn_compiler.verification import verify

TARGET_NAMES = ("onnx-attention", "canonical", "ort-mha")


def samples(built):
    """The builder's inputs and a second draw at other sizes of the dynamic dims."""
    other = {name: 3 for name in built.dynamic}
    return [built.inputs, built.sample(seed=3, **other)[0]] if other else [built.inputs]


def fuse(built, target="onnx-attention"):
    """Run the pass with every property checked; returns its result."""
    result = assert_pass_properties(FuseAttention(target=target), built.model, samples(built),
                                    allow_refusal=False)
    return result


def attention_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]


def attr(node: onnx.NodeProto, name: str):
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else None


# --- onnx-attention -------------------------------------------------------------------------------

def test_a_cross_block_becomes_one_attention_node_with_the_scale_and_heads():
    built = attention_model(AttentionSpec(kind="cross", num_heads=2, head_dim=8))
    result = fuse(built)
    (node,) = attention_nodes(result.model)
    assert attr(node, "scale") == pytest.approx(8 ** -0.5)
    assert (attr(node, "q_num_heads"), attr(node, "kv_num_heads")) == (2, 2)
    assert op_histogram(result.model).get("Softmax", 0) == 0
    assert default_opset(result.model) == 23 and result.model.ir_version >= 11
    assert result.counts == {"blocks_fused": 1, "blocks_skipped": 0, "already_fused": 0}


@pytest.mark.parametrize("scale", ["div_after", "mul_after", "mul_q", "sdpa_qk", "none", "folded"])
def test_every_scale_spelling_ends_in_the_scale_attribute(scale):
    built = attention_model(AttentionSpec(kind="self", scale=scale, head_dim=4))
    result = fuse(built)
    (node,) = attention_nodes(result.model)
    expected = 1.0 if scale in ("none", "folded") else 4 ** -0.5
    assert attr(node, "scale") == pytest.approx(expected, rel=1e-6)
    # Scales on Q and K were taken over by the op: no Mul/Div by a scalar is left.
    assert not {"Div"} & set(op_histogram(result.model))


@pytest.mark.parametrize("mask, mask_type", [("add_input", TensorProto.FLOAT),
                                             ("add_bias_input", TensorProto.FLOAT),
                                             ("add_causal_const", TensorProto.FLOAT),
                                             ("where_bool", TensorProto.BOOL)])
def test_masks_become_the_fourth_input_with_q_and_k_lengths(mask, mask_type):
    built = attention_model(AttentionSpec(kind="self", mask=mask), q_len=4)
    result = fuse(built)
    (node,) = attention_nodes(result.model)
    assert len(node.input) == 4
    inferred = {v.name: v for v in [*result.model.graph.value_info, *result.model.graph.input]}
    mask_type_seen = inferred[node.input[3]].type.tensor_type
    assert mask_type_seen.elem_type == mask_type
    assert len(mask_type_seen.shape.dim) == 4  # IAttention and ONNX Runtime want [., ., Sq, Sk]


def test_a_softmax_that_ran_in_fp32_keeps_fp32_in_an_fp16_block():
    built = attention_model(AttentionSpec(kind="cross", dtype="float16", softmax_cast=True))
    result = fuse(built)
    (node,) = attention_nodes(result.model)
    assert attr(node, "softmax_precision") == TensorProto.FLOAT
    plain = fuse(attention_model(AttentionSpec(kind="cross", dtype="float16")))
    assert attr(attention_nodes(plain.model)[0], "softmax_precision") is None


def test_a_constant_context_of_batch_one_is_expanded_to_the_query_batch():
    built = attention_model(AttentionSpec(kind="cross"), context_kind="constant")
    result = fuse(built)
    assert len(attention_nodes(result.model)) == 1


def test_blocks_inside_if_branches_are_left_unfused_for_tensorrt():
    # TensorRT does not build Attention inside an If branch (NVIDIA/TensorRT#4739).
    ex = build_example(Recipe(layers=(Layer((AttentionSpec(kind="self"),)),
                                      Layer((AttentionSpec(kind="cross"),))), wrap=Wrap()))
    result = FuseAttention().run(ex.model)
    assert op_histogram(result.model).get("Attention", 0) == 0
    assert op_histogram(result.model)["Softmax"] == 4  # two blocks in each branch
    [reason] = result.details["skipped"]
    assert "NVIDIA/TensorRT#4739" in reason and "--specialize" in reason


# --- what stays ---------------------------------------------------------------------------------

def test_a_block_whose_probabilities_escape_is_left_alone():
    built = attention_model(AttentionSpec(kind="cross"))
    model = built.model
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    model.graph.output.append(helper.make_tensor_value_info(softmax.output[0], TensorProto.FLOAT, None))
    result = FuseAttention().run(model)
    assert not result.changed and result.model is model
    (reason,) = result.details["skipped"]
    assert "escape" in reason and softmax.output[0] in reason


def _softcapped(model: onnx.ModelProto, cap: float = 50.0) -> onnx.ModelProto:
    """Gemma 2's logit softcapping, ``cap * tanh(scores / cap)``, just before the Softmax."""
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    scores = softmax.input[0]
    model.graph.initializer.append(numpy_helper.from_array(np.array(cap, np.float32), "cap"))
    at = list(model.graph.node).index(softmax)
    for offset, node in enumerate([helper.make_node("Div", [scores, "cap"], ["capped.div"]),
                                   helper.make_node("Tanh", ["capped.div"], ["capped.tanh"]),
                                   helper.make_node("Mul", ["capped.tanh", "cap"], ["capped"])]):
        model.graph.node.insert(at + offset, node)
    softmax.input[0] = "capped"
    return model


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_softcapped_block_is_found_and_left_with_the_reason(target):
    # Softcapping bounds the scores by a tanh no fused target computes (TensorRT's Attention
    # has no softcap attribute): the block is attention all the same, reported and left.
    model = _softcapped(attention_model(AttentionSpec(kind="self")).model)
    (block,) = find_attention(model)
    assert block.kind == "self" and block.num_heads == 2
    result = FuseAttention(target=target).run(model)
    assert not result.changed
    (reason,) = result.details["skipped"]
    assert "softcap" in reason and "Tanh" in reason


def test_a_where_that_fills_with_a_small_value_is_not_a_mask():
    built = attention_model(AttentionSpec(kind="self", mask="where_bool"))
    model = built.model
    fill = next(n for n in model.graph.node if n.op_type == "Where").input[2]
    init = next(t for t in model.graph.initializer if t.name == fill)
    init.CopyFrom(numpy_helper.from_array(np.array(-5.0, np.float32), fill))
    result = FuseAttention().run(model)
    assert not result.changed
    assert any("not a mask value" in reason for reason in result.details["skipped"])


def test_a_head_count_the_shapes_contradict_is_not_trusted():
    built = attention_model(AttentionSpec(kind="cross", num_heads=2, head_dim=8), dynamic=False)
    (block,) = find_attention(built.model)
    assert head_problem(block) is None
    block.num_heads = 4  # what a matcher bug would report
    assert "says 2" in head_problem(block)
    block.num_heads, block.head_dim = 2, None
    assert head_problem(block) == "the head count or head dim is unknown"


def test_batched_heads_cores_fuse_as_rows_of_one_head_or_wait_for_the_layout_pass():
    built = attention_model(AttentionSpec(kind="self", head_layout="3d", mask="add_causal_const"))
    result = fuse(built)  # [B*H,S,D] operands: B*H rows of one head
    (node,) = attention_nodes(result.model)
    # Read as [B*H, 1, S, D]: the 4-D form TensorRT's parser documents, one head per row.
    producers = {o: n.op_type for n in result.model.graph.node for o in n.output}
    assert [producers[name] for name in node.input[:3]] == ["Unsqueeze"] * 3
    assert (attr(node, "q_num_heads"), attr(node, "kv_num_heads")) == (None, None)
    assert verify(built.model, result.model, inputs=built.inputs).ok
    assert fuse(built, "ort-mha").counts["blocks_fused"] == 1
    waiting = FuseAttention(target="canonical").run(built.model)
    assert not waiting.changed
    assert any("batched heads" in reason for reason in waiting.details["skipped"])
    cleaned = xc.optimize(built.model, "remove-layout-clutter,fuse-attention").model
    (node,) = attention_nodes(cleaned)
    assert attr(node, "q_num_heads") == 2
    assert verify(built.model, cleaned, inputs=built.inputs).ok


def test_a_model_without_attention_keeps_its_opset():
    plain = classifier_model().model
    result = FuseAttention().run(plain)
    assert not result.changed and default_opset(result.model) == default_opset(plain)


def test_an_already_fused_model_counts_as_fused():
    first = fuse(attention_model(AttentionSpec(kind="cross")))
    second = FuseAttention().run(first.model)
    assert not second.changed
    assert second.counts == {"blocks_fused": 0, "blocks_skipped": 0, "already_fused": 1}


# --- canonical ----------------------------------------------------------------------------------

def core_ops(model: onnx.ModelProto) -> list[str]:
    """Ops between the score MatMul and Softmax of each block."""
    return [tuple(plan_core(b).chain_ops) for b in find_attention(model)]


def test_canonical_moves_the_scale_onto_q_before_the_first_matmul():
    built = attention_model(AttentionSpec(kind="self", scale="div_after", mask="add_input"))
    result = fuse(built, "canonical")
    (block,) = find_attention(result.model)
    plan = plan_core(block)
    assert plan.chain_ops == ["Add"] and plan.chain_scale == 1.0
    assert plan.operand_scale == pytest.approx(8 ** -0.5)
    assert block.q.scales  # a Mul on Q
    assert op_histogram(result.model).get("Div", 0) == 0


def test_canonical_turns_a_bool_where_into_one_additive_mask():
    built = attention_model(AttentionSpec(kind="self", mask="where_bool"))
    result = fuse(built, "canonical")
    assert core_ops(result.model) == [("Add",)]


def test_canonical_leaves_a_canonical_block_alone():
    built = attention_model(AttentionSpec(kind="cross", scale="mul_q"))
    result = FuseAttention(target="canonical").run(built.model)
    assert not result.changed
    assert result.details["skipped"] == {"already in the canonical form": 1}


def test_canonical_takes_an_onnx_attention_apart():
    fused = fuse(attention_model(AttentionSpec(kind="self", mask="where_bool"), q_len=4))
    result = assert_pass_properties(FuseAttention(target="canonical"), fused.model,
                                    allow_refusal=False)
    assert not attention_nodes(result.model)
    (block,) = find_attention(result.model)
    assert not block.fused and plan_core(block).chain_ops == ["Add"]


# --- ort-mha ------------------------------------------------------------------------------------

def test_ort_mha_uses_the_microsoft_domain_and_the_block_output():
    built = attention_model(AttentionSpec(kind="cross", mask="add_input"))
    result = fuse(built, "ort-mha")
    nodes = [n for n in result.model.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(nodes) == 1 and nodes[0].domain == "com.microsoft"
    assert attr(nodes[0], "num_heads") == 2
    assert any(o.domain == "com.microsoft" for o in result.model.opset_import)
    assert default_opset(result.model) == 18  # no upgrade needed


def test_ort_mha_keeps_a_float32_softmax_unfused():
    built = attention_model(AttentionSpec(kind="cross", dtype="float16", softmax_cast=True))
    result = FuseAttention(target="ort-mha").run(built.model)
    assert not result.changed
    assert any("softmax_precision" in reason for reason in result.details["skipped"])


# --- targets and opsets -------------------------------------------------------------------------

def test_targets_are_registered_and_loaded_by_name():
    assert set(TARGET_NAMES) <= set(TARGETS)
    assert load_target("trt-plugin").name == "trt-plugin"
    with pytest.raises(InputError, match="unknown fusion target 'flash'"):
        FuseAttention(target="flash").run(attention_model(AttentionSpec()).model)


def test_the_opset_upgrade_is_checked_and_keeps_outputs():
    built = attention_model(AttentionSpec(kind="self", mask="add_input"), opset=17)
    upgraded = upgrade_opset(built.model, 23)
    assert default_opset(upgraded) == 23
    onnx.checker.check_model(upgraded, full_check=True)
    assert verify(built.model, upgraded, inputs=built.inputs).ok
    assert upgrade_opset(upgraded, 23) is upgraded


# --- real exports (slow) ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=small_zoo_names())
def prepared(request, export_cache):
    exported = small_zoo_export(request.param, export_cache)
    model = xc.optimize(xc.load(exported.path),
                        "canonicalize,normalize-spellings,remove-layout-clutter").model
    return exported, model


def _in_if_branches(model) -> list:
    return [b for b in find_attention(model) if "_branch" in b.subgraph]


def _expected(exported) -> int:
    truth = exported.manifest["attention"]
    return truth["self"] + truth["cross"]


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGET_NAMES)
def test_every_zoo_model_fuses_every_block_and_verifies(prepared, target):
    exported, model = prepared
    result = FuseAttention(target=target).run(model)
    inputs, _ = exported.sample()
    check = verify(model, result.model, inputs=inputs)
    assert check.ok, check.summary()
    histogram = op_histogram(result.model)
    fused = histogram.get("Attention", 0) + histogram.get("MultiHeadAttention", 0)
    if target == "canonical":
        blocks = find_attention(result.model)
        assert fused == 0 and histogram["Softmax"] == _expected(exported)
        assert Counter(b.kind for b in blocks) == Counter(
            {"self": exported.manifest["attention"]["self"],
             "cross": exported.manifest["attention"]["cross"]})
        for block in blocks:
            plan = plan_core(block)
            assert set(plan.chain_ops) <= {"Add", "Cast"} and plan.chain_scale == 1.0, plan.chain_ops
            assert plan.scale == pytest.approx(block.scale)
    else:
        # onnx-attention leaves blocks inside If branches (TensorRT cannot build them there,
        # NVIDIA/TensorRT#4739); every other block fuses.
        left = len(_in_if_branches(model)) if target == "onnx-attention" else 0
        assert fused == _expected(exported) - left, result.details["skipped"]
        assert histogram.get("Softmax", 0) == left
    again = FuseAttention(target=target).run(result.model)
    assert not again.changed


# --- grouped and multi-query attention -----------------------------------------------------------

def _gqa_model(repeat: bool) -> onnx.ModelProto:
    """Q with 4 heads over K/V with 2 (``repeat``: repeat_kv's Unsqueeze-Expand-Reshape to 4
    heads, as transformers exports GQA) or 1 (MQA: the MatMuls broadcast the head axis)."""
    b, h, sq, sk, d = 2, 4, 3, 5, 8
    kv = 2 if repeat else 1
    f = TensorProto.FLOAT
    nodes, k_name, v_name = [], "k", "v"
    inits = [numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale")]
    if repeat:
        inits += [numpy_helper.from_array(np.array([2], np.int64), "axis2"),
                  numpy_helper.from_array(np.array([b, kv, h // kv, sk, d], np.int64), "rep"),
                  numpy_helper.from_array(np.array([b, h, sk, d], np.int64), "merged")]
        for name in ("k", "v"):
            nodes += [helper.make_node("Unsqueeze", [name, "axis2"], [f"{name}5"]),
                      helper.make_node("Expand", [f"{name}5", "rep"], [f"{name}e"]),
                      helper.make_node("Reshape", [f"{name}e", "merged"], [f"{name}r"])]
        k_name, v_name = "kr", "vr"
    nodes += [helper.make_node("Transpose", [k_name], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["s"]),
              helper.make_node("Mul", ["s", "scale"], ["ss"]),
              helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", v_name], ["y"])]
    graph = helper.make_graph(
        nodes, "gqa",
        [helper.make_tensor_value_info("q", f, [b, h, sq, d]),
         helper.make_tensor_value_info("k", f, [b, kv, sk, d]),
         helper.make_tensor_value_info("v", f, [b, kv, sk, d])],
        [helper.make_tensor_value_info("y", f, [b, h, sq, d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("repeat, kv_heads", [(True, 2), (False, 1)])
def test_grouped_and_multi_query_blocks_read_the_kv_heads(repeat, kv_heads):
    model = _gqa_model(repeat)
    result = assert_pass_properties(FuseAttention(), model, allow_refusal=False)
    (node,) = attention_nodes(result.model)
    assert (attr(node, "q_num_heads"), attr(node, "kv_num_heads")) == (4, kv_heads)
    assert node.input[1] == "k" and node.input[2] == "v"  # the unrepeated K/V
    assert not {"Expand", "Unsqueeze"} & set(op_histogram(result.model))
