"""The precision audit: blocks measured on sample inputs, escapes where fp16 breaks, and the
check of each converted block against fp32.

Half-precision kernels are what the escapes are for, and ONNX Runtime's CPU provider does not
have them (it computes fp16 Attention in fp32): every numeric check runs the converted model
through ``cpu_view``, which spells each half Attention as an unnormalised kernel storing its
steps in the half type, so an overflow there is an overflow here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from xattn_compiler.passes import ConvertPrecision, FuseAttention

import xattn_compiler as xc
from xattn_compiler.cli import main
from xattn_compiler.ir import infer_shapes
from xattn_compiler.precision_audit import (
    audit_model,
    cpu_view,
    model_depth,
    precision_tolerances,
    relative_error,
)
from xattn_compiler.testing import AttentionSpec, attention_model
from xattn_compiler.verification import run_model
from xattn_compiler.zoo import cached_export

F, H, B = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


def error(reference, converted, feeds) -> float:
    ref = run_model(reference, feeds)
    got = run_model(cpu_view(converted), feeds)
    return max(relative_error(ref[k], got[k]) for k in ref)


def attention_types(model: onnx.ModelProto) -> list[tuple[int, ...]]:
    graph = infer_shapes(model).graph
    seen = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    return [tuple(seen[i] for i in n.input[:3]) for n in graph.node if n.op_type == "Attention"]


@pytest.fixture(scope="module")
def whisper(export_cache):
    exported = cached_export("whisper-decoder-sdpa", export_cache)
    return exported, xc.optimize(xc.load(exported.path)).model


def test_the_audit_measures_every_block_of_a_real_export(whisper):
    exported, fused = whisper
    inputs, _ = exported.sample()
    audit = audit_model(fused, "fp16", inputs)
    assert len(audit.blocks) == 4 and not audit.skipped
    lengths = inputs["encoder_hidden_states"].shape[1], inputs["input_ids"].shape[1]
    assert {b.kv_length for b in audit.blocks} == set(lengths)
    for block in audit.blocks:
        assert 0 < block.max_abs_score < 100 and 1 <= block.normaliser <= block.kv_length
        assert block.escape is None and not block.findings
    assert audit.escapes() == ()


# --- the long-context case -------------------------------------------------------------------

@pytest.mark.slow
def test_long_context_cross_attention_overflows_fp16_unless_escaped(whisper, tmp_path):
    """70,000 encoder frames of one constant context: every key scores the same, so the
    softmax normaliser is 70,000 > 65504. The plain fp16 cast gives inf; the audit names both
    cross-attention blocks and its escape keeps the logits within the fp16 tolerance."""
    exported, fused = whisper
    inputs, _ = exported.sample()
    frames = inputs["encoder_hidden_states"][:, :1]
    long = {**inputs, "encoder_hidden_states": np.repeat(frames, 70_000, axis=1)}
    npz = tmp_path / "long.npz"
    np.savez(npz, **long)
    audited, report = tmp_path / "audited.onnx", tmp_path / "report.json"
    reference = xc.load(exported.path)
    plain = ConvertPrecision(precision="fp16").run(fused).model
    assert math.isinf(error(reference, plain, long))
    # --verify passes: the outputs as written are within the fp16 tolerance of fp32.
    assert main(["optimize", str(exported.path), "-o", str(audited), "--precision", "fp16",
                 "--inputs", str(npz), "--verify", "--report", str(report), "-q"]) == 0
    details = json.loads(report.read_text())["passes"][-1]["details"]
    named = {b["name"]: b for b in details["audit"]["blocks"] if b["escape"]}
    assert len(named) == 2 and {b["kv_length"] for b in named.values()} == {70_000}
    for block in named.values():
        assert block["normaliser"] == pytest.approx(70_000)
        assert "normaliser reaches 70000 > 65504" in block["findings"][0]
        assert block["reason"]
    assert details["attention"]["half"] == 2
    assert set(details["escapes"]) == set(named)


# --- scores beyond fp16's range ------------------------------------------------------------

@pytest.fixture(scope="module")
def cross_block():
    """A cross-attention block reading K/V from graph inputs: keys of ~30,000 (fine in fp16)
    against queries of ~1 give scores past 65504 with head dim 16."""
    built = attention_model(AttentionSpec(kind="cross", projection="none"), q_len=3, kv_len=6)
    fused = FuseAttention().run(built.model).model
    rng = np.random.default_rng(0)
    feeds = dict(built.inputs)
    query_sign = np.sign(rng.standard_normal(feeds["cross_key_0"].shape[-1]))
    feeds["cross_key_0"] = (30_000 * query_sign * np.abs(
        rng.standard_normal(feeds["cross_key_0"].shape))).astype(np.float32).clip(-60_000, 60_000)
    return built.model, fused, feeds


def test_scores_beyond_fp16_get_fp32_accumulation(cross_block):
    original, fused, feeds = cross_block
    audit = audit_model(fused, "fp16", feeds)
    (block,) = audit.blocks
    assert block.max_abs_score > 65504 and block.escape == "fp32"
    assert "scores reach" in block.findings[0]
    tolerance = precision_tolerances("fp16", model_depth(fused))[0]
    plain = ConvertPrecision(precision="fp16").run(fused).model
    assert not error(original, plain, feeds) <= tolerance
    escaped = ConvertPrecision(precision="fp16", escapes=audit.escapes()).run(fused)
    assert attention_types(escaped.model) == [(F, F, F)]  # Q/K/V cast to fp32 around it
    assert escaped.details["escapes"] and escaped.details["attention"] == {"fp32": 1}
    assert error(original, escaped.model, feeds) <= tolerance


def test_a_block_the_audit_passes_but_fp16_breaks_gets_the_escape_from_the_check(tmp_path):
    """Equal scores over 2,000 keys (normaliser 2,000: fine) but values of 100: an fp16
    accumulator of ``e V`` reaches 200,000. The audit does not measure that product; the
    check of the converted block against fp32 catches it and escapes the block."""
    built = attention_model(AttentionSpec(kind="cross", projection="none"), q_len=3, kv_len=6)
    fused = FuseAttention().run(built.model).model
    feeds = dict(built.inputs)
    batch, heads, _, dim = feeds["cross_key_0"].shape
    feeds["cross_key_0"] = np.zeros((batch, heads, 2000, dim), np.float32)
    feeds["cross_value_0"] = np.full((batch, heads, 2000, dim), 100.0, np.float32)
    npz = tmp_path / "feeds.npz"
    np.savez(npz, **feeds)
    result = ConvertPrecision(precision="fp16", audit=True, inputs=str(npz)).run(fused)
    audit = result.details["audit"]
    assert [b["escape"] for b in audit["blocks"]] == [None]
    (name,) = audit["escaped_after_check"]
    assert result.details["escapes"] == {name: "fp32"}
    assert audit["block_check"][name]["ok"]
    tolerance = precision_tolerances("fp16", model_depth(fused))[0]
    assert error(built.model, result.model, feeds) <= tolerance


def test_bf16_conversion_audits_against_bf16_rounding(whisper):
    exported, fused = whisper
    inputs, _ = exported.sample()
    audit = audit_model(fused, "bf16", inputs)
    assert audit.escapes() == ()
    converted = ConvertPrecision(precision="bf16").run(fused).model
    assert set(attention_types(converted)) == {(B, B, B)}
    tolerance = precision_tolerances("bf16", model_depth(fused))[0]
    assert error(xc.load(exported.path), converted, inputs) <= tolerance


def test_tolerances_follow_the_mantissa_and_the_depth():
    fp16, _ = precision_tolerances("fp16", 4)
    bf16, _ = precision_tolerances("bf16", 4)
    assert fp16 == pytest.approx(8 * 2 ** -11 * 2)
    assert bf16 == pytest.approx(8 * fp16)  # 3 fewer mantissa bits
    assert precision_tolerances("fp16", 16)[0] == pytest.approx(2 * fp16)


def test_cpu_view_emulates_bf16_that_lives_only_inside_an_if_branch():
    # An fp16 model wrapped in If, its fp32 softmax converted to bf16: the bf16 is in the
    # branch only, and cpu_view left it to ONNX Runtime, which has no bf16 kernels.
    from onnx import helper

    def branch(name):
        return helper.make_graph(
            [helper.make_node("Cast", ["x"], [f"{name}_b"], to=B),
             helper.make_node("Softmax", [f"{name}_b"], [f"{name}_p"]),
             helper.make_node("Cast", [f"{name}_p"], [f"{name}_out"], to=H)],
            name, [], [helper.make_tensor_value_info(f"{name}_out", H, [2, 8])])

    model = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"),
                          else_branch=branch("else"))], "g",
        [helper.make_tensor_value_info("x", H, [2, 8]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", H, [2, 8])]),
        opset_imports=[helper.make_opsetid("", 18)])
    x = np.linspace(-3, 3, 16, dtype=np.float16).reshape(2, 8)
    got = run_model(cpu_view(model), {"x": x, "flag": np.array(True)})["y"]
    e = np.exp(x.astype(np.float32) - x.max(-1, keepdims=True))
    assert relative_error(e / e.sum(-1, keepdims=True), got) <= precision_tolerances("bf16", 1)[0]


# --- memory: statistics come back, not tensors ----------------------------------------------

def test_the_audit_of_a_unet_sized_model_returns_statistics_not_score_tensors(monkeypatch):
    """Issue #18: the audit of the SD-1.5-sized UNet was OOM-killed at 23.8 GB, every float
    tensor (score tensors of 1 GB each) coming back as an extra ONNX Runtime output. Now the
    ranges and an unfused core's score statistics are reductions in the graph: nothing that
    comes back is as large as a block's scores, and the numbers match the fused block's,
    measured from Q and K."""
    import xattn_compiler.verification as verification

    built = attention_model(AttentionSpec(kind="self"), q_len=64, kv_len=64)
    fused = FuseAttention().run(built.model).model
    feeds = dict(built.inputs)
    largest = []
    run = verification._run

    def spy(session, inputs):
        values = run(session, inputs)
        largest.append(max(v.size for v in values.values()))
        return values

    monkeypatch.setattr(verification, "_run", spy)
    unfused = audit_model(built.model, "fp16", feeds)
    runs = len(largest)
    measured = audit_model(fused, "fp16", feeds)
    (core,), (block,) = unfused.blocks, measured.blocks
    scores = int(np.prod(feeds[next(iter(feeds))].shape[:1])) * 64 * 64  # per head, at least
    assert runs >= 1 and max(largest[:runs]) < scores  # the unfused core: statistics only
    assert core.kv_length == block.kv_length == 64
    assert core.max_abs_score == pytest.approx(block.max_abs_score, rel=1e-5)
    assert core.normaliser == pytest.approx(block.normaliser, rel=1e-5)
