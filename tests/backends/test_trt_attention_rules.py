"""The TensorRT parser's Attention restrictions: each rule tripped by a small hand-built node,
and every Attention node ``optimize`` writes for TensorRT passing them (every small zoo model,
the KV-cache decoders, the If export)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import xattn_compiler as xc
from xattn_compiler.backends import lint_trt
from xattn_compiler.backends.trt_attention_rules import (
    BLOCKER,
    INFO,
    RULES,
    WARNING,
    blockers,
    check_attention,
)

from .conftest import ZOO, zoo_export

FLOAT = TensorProto.FLOAT
V11 = (11, 5)
QKV4 = [1, 2, 3, 8]
OPTIMUM = Path(__file__).resolve().parents[1] / "fixtures" / "optimum"


def vi(name, dims, elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def attention(inputs=("q", "k", "v"), outputs=("y",), **attrs) -> onnx.NodeProto:
    return helper.make_node("Attention", list(inputs), list(outputs), name="attn", **attrs)


def model_of(nodes, inputs, outputs, opset=23, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def single(node=None, *, shapes=None, extra=(), opset=23, outputs=("y",)) -> onnx.ModelProto:
    """One Attention node over q, k, v (4-D [1, 2, 3, 8] unless ``shapes`` says otherwise)."""
    shapes = shapes or {}
    names = ["q", "k", "v", *extra]
    inputs = [vi(n, shapes.get(n, QKV4 if n in "qkv" else [1, 1, 3, 3])) for n in names]
    node = node or attention()
    return model_of([node], inputs, [vi(o, None) for o in outputs], opset)


def rules_of(model, severity=BLOCKER, version=V11) -> set[str]:
    return {v.rule for v in check_attention(model, version) if v.severity == severity}


def test_a_plain_4d_node_passes_every_rule():
    assert [v for v in check_attention(single()) if v.severity != INFO] == []


def test_one_output_rejects_present_key_and_value():
    model = single(attention(outputs=("y", "present_k", "present_v")),
                   outputs=("y", "present_k", "present_v"))
    found = [v for v in check_attention(model) if v.rule == "one-output"]
    assert len(found) == 2 and all(v.node == "attn" for v in found)


def test_one_output_rejects_qk_matmul_output():
    model = single(attention(outputs=("y", "", "", "scores")), outputs=("y", "scores"))
    assert "one-output" in rules_of(model)


def test_cache_inputs_reject_past_key_and_value():
    past = {"past_k": [1, 2, 5, 8], "past_v": [1, 2, 5, 8]}
    model = single(attention(inputs=("q", "k", "v", "", "past_k", "past_v"),
                             outputs=("y", "pk", "pv")),
                   shapes=past, extra=("past_k", "past_v"), outputs=("y", "pk", "pv"))
    messages = " ".join(v.message for v in check_attention(model) if v.rule == "cache-inputs")
    assert "past_key" in messages and "past_value" in messages


def test_cache_inputs_reject_nonpad_kv_seqlen():
    lens = helper.make_tensor_value_info("lens", TensorProto.INT64, [1])
    node = attention(inputs=("q", "k", "v", "", "", "", "lens"))
    model = model_of([node], [vi(n, QKV4) for n in "qkv"] + [lens], [vi("y", None)], opset=24)
    assert "cache-inputs" in rules_of(model)


@pytest.mark.parametrize("attr", [{"softcap": 30.0}, {"qk_matmul_output_mode": 1}])
def test_attributes_reject_softcap_and_qk_matmul_output_mode(attr):
    assert "attributes" in rules_of(single(attention(**attr)))


def test_mask_and_causal_together_are_rejected():
    model = single(attention(inputs=("q", "k", "v", "mask"), is_causal=1), extra=("mask",))
    assert "mask-and-causal" in rules_of(model)


def test_causal_alignment_needs_equal_query_and_key_lengths():
    decode = single(attention(is_causal=1), shapes={"q": [1, 2, 1, 8], "k": [1, 2, 7, 8],
                                                    "v": [1, 2, 7, 8]})
    assert "causal-alignment" in rules_of(decode)
    symbolic = single(attention(is_causal=1), shapes={n: [1, 2, "seq", 8] for n in "qkv"})
    assert "causal-alignment" not in rules_of(symbolic)
    cached = single(attention(is_causal=1), shapes={"q": [1, 2, "seq", 8],
                                                    "k": [1, 2, "total", 8],
                                                    "v": [1, 2, "total", 8]})
    assert "causal-alignment" in rules_of(cached)


def test_static_heads_rejects_a_dynamic_head_dim():
    model = single(shapes={n: [1, "heads", 3, 8] for n in "qkv"})
    assert "static-heads" in rules_of(model)


def test_static_heads_rejects_3d_inputs_without_num_heads():
    model = single(shapes={n: [1, 3, 16] for n in "qkv"})
    assert "static-heads" in rules_of(model)
    named = single(attention(q_num_heads=2, kv_num_heads=2), shapes={n: [1, 3, 16] for n in "qkv"})
    assert "static-heads" not in rules_of(named)


def test_static_heads_rejects_attributes_that_contradict_the_shape():
    assert "static-heads" in rules_of(single(attention(q_num_heads=4, kv_num_heads=2)))


def test_rank_warns_on_3d_and_blocks_mixed_ranks_and_a_2d_mask_with_4d_inputs():
    three = single(attention(q_num_heads=2, kv_num_heads=2), shapes={n: [1, 3, 16] for n in "qkv"})
    assert "rank" in rules_of(three, WARNING) and "rank" not in rules_of(three)
    mixed = single(attention(q_num_heads=2, kv_num_heads=2), shapes={"q": [1, 3, 16]})
    assert "rank" in rules_of(mixed)
    mask_2d = single(attention(inputs=("q", "k", "v", "mask")), extra=("mask",),
                     shapes={"mask": [3, 3]})
    assert "rank" in rules_of(mask_2d)


def _in_body(owner: str) -> onnx.ModelProto:
    body_inputs = [vi("i", [], TensorProto.INT64), vi("c", [], TensorProto.BOOL)] \
        if owner == "Loop" else []
    outs = ([vi("c_out", [], TensorProto.BOOL)] if owner == "Loop" else []) + [vi("y_in", QKV4)]
    nodes = [attention(outputs=("y_in",))]
    if owner == "Loop":
        nodes.append(helper.make_node("Identity", ["c"], ["c_out"]))
    body = helper.make_graph(nodes, "body", body_inputs, outs)
    if owner == "If":
        other = helper.make_graph([helper.make_node("Identity", ["q"], ["y_else"])], "else", [],
                                  [vi("y_else", QKV4)])
        node = helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=body,
                                else_branch=other)
        extra = [vi("cond", [], TensorProto.BOOL)]
        inits = []
    else:
        node = helper.make_node("Loop", ["trips", ""], ["y"], name="repeat", body=body)
        extra, inits = [], [numpy_helper.from_array(np.asarray(2, np.int64), "trips")]
    return model_of([node], [vi(n, QKV4) for n in "qkv"] + extra, [vi("y", None)], inits=inits)


def test_control_flow_blocks_attention_in_an_if_branch_and_warns_in_a_loop():
    [found] = [v for v in check_attention(_in_body("If")) if v.rule == "control-flow"]
    assert found.severity == BLOCKER and found.subgraph == "/choose/then_branch"
    assert "control-flow" in rules_of(_in_body("Loop"), WARNING)


def test_scale_must_not_be_negative_and_any_other_scale_is_a_note():
    assert "scale" in rules_of(single(attention(scale=-0.5)))
    [note] = [v for v in check_attention(single(attention(scale=0.5))) if v.rule == "scale"]
    assert note.severity == INFO and "sqrt(scale)" in note.message
    default = single(attention(scale=float(1 / np.sqrt(8))))
    assert not [v for v in check_attention(default) if v.rule == "scale"]


def test_softmax_precision_is_a_note_that_the_parser_ignores_it():
    found = check_attention(single(attention(softmax_precision=1)))
    assert {(v.rule, v.severity) for v in found} == {("softmax-precision", INFO)}


def test_opset_26_blocks_on_11_5_and_25_only_from_11_5():
    assert "opset" in rules_of(single(opset=26))
    assert "opset" not in rules_of(single(opset=25))
    assert "opset" in rules_of(single(opset=25), version=(10, 15))


def test_every_rule_is_documented_and_tripped_above():
    tested = {"one-output", "cache-inputs", "attributes", "mask-and-causal", "causal-alignment",
              "static-heads", "rank", "control-flow", "scale", "softmax-precision", "opset"}
    assert set(RULES) == tested


def test_lint_trt_reports_the_rules_on_the_node():
    report = lint_trt(single(attention(softcap=30.0)), "11.5", profiled_inputs=["q", "k", "v"])
    [finding] = report.blockers
    assert (finding.code, finding.node) == ("attention-node", "attn")
    assert finding.message.startswith("attributes:")


# --- what optimize writes -------------------------------------------------------------------

def _fused_attention(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    from xattn_compiler.ir import iter_nodes

    return [n for n in iter_nodes(model.graph) if n.op_type == "Attention"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["4d", "3d"])
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_optimized_for_tensorrt_passes_the_rules(name, layout, export_cache):
    model = xc.load(zoo_export(name, export_cache).path)
    optimized = xc.optimize(model, qkv_layout=layout).model
    nodes = _fused_attention(optimized)
    assert nodes or name == "if-cross-attention", "nothing fused"
    assert blockers(check_attention(optimized, V11)) == []
    assert not [n for n in nodes if any(a.name == "is_causal" and a.i for a in n.attribute)]
    assert lint_trt(optimized, "11.5").blockers == []


@pytest.mark.slow
def test_attention_inside_an_if_branch_is_left_unfused_for_tensorrt(export_cache):
    """torch.cond exported as an If whose branches attend: without a value for the condition
    the blocks stay MatMul-Softmax-MatMul (TensorRT builds those), and the report says why."""
    model = xc.load(zoo_export("if-cross-attention", export_cache).path)
    result = xc.optimize(model)
    assert _fused_attention(result.model) == []
    assert blockers(check_attention(result.model, V11)) == []
    assert lint_trt(result.model, "11.5").blockers == []
    fuse = next(p for p in result.report["passes"] if p["name"] == "fuse-attention")
    reasons = [block["reason"] for block in fuse["details"]["blocks"]]
    assert len(reasons) == 4 and all("NVIDIA/TensorRT#4739" in r for r in reasons)
    specialized = xc.optimize(model, specialize={"use_cache_branch": True}).model
    assert len(_fused_attention(specialized)) == 2


@pytest.mark.parametrize("family", ["whisper", "t5"])
def test_kv_cache_decode_blocks_carry_a_mask_never_is_causal(family):
    """A decode step over a concatenated cache (Sq = 1 or more, Skv = past + Sq): the causal
    condition must travel as a mask, which TensorRT and ONNX align the same way."""
    model = xc.load(OPTIMUM / f"{family}_decoder_model_merged.onnx")
    optimized = xc.optimize(model, specialize={"use_cache_branch": True}).model
    nodes = _fused_attention(optimized)
    assert nodes
    assert all(len([o for o in n.output if o]) == 1 and len(n.input) <= 4 for n in nodes)
    assert blockers(check_attention(optimized, V11)) == []


def test_merged_decoder_without_a_branch_value_keeps_attention_out_of_the_if():
    model = xc.load(OPTIMUM / "whisper_decoder_model_merged.onnx")
    optimized = xc.optimize(model).model
    assert blockers(check_attention(optimized, V11)) == []


def _zoo_or_gap_export(name, export_cache):
    """The zoo's export, or the family's recipe when the zoo keeps it out as a known gap of
    another pass (the export is the same)."""
    from xattn_compiler.errors import InputError
    from xattn_compiler.zoo import cache as zoo_cache

    try:
        return zoo_export(name, export_cache)
    except InputError:
        from xattn_compiler.zoo.families import known_gaps

        return zoo_cache.cached_export(known_gaps()[name][0], "small", export_cache)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nn-mha-time-major", "nn-mha-time-major-torchscript"])
def test_a_core_on_batched_heads_is_fused_4d_for_tensorrt(name, export_cache):
    """nn.MultiheadAttention on time-major input keeps its core on [B*H, S, D]; the node reads
    it as [B*H, 1, S, D] (the documented 4-D form), not as 3-D with num_heads=1."""
    from xattn_compiler.ir import infer_shapes

    exported = _zoo_or_gap_export(name, export_cache)
    model = xc.load(exported.path)
    optimized = infer_shapes(xc.optimize(model).model)
    nodes = _fused_attention(optimized)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in optimized.graph.value_info}
    assert nodes and all(ranks.get(n.input[0]) == 4 for n in nodes)
    assert [v for v in check_attention(optimized, V11) if v.severity != INFO] == []
    assert xc.verify(model, optimized, inputs=exported.sample()[0]).ok
