"""The trt-plugin target: hand-built fp16 blocks and fp16 zoo models, verified numerically
through the plugin references (decomposed for ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import numpy_helper
from xattn_compiler.passes import FuseAttention

import xattn_compiler as xc
from xattn_compiler.plugins import METADATA_KEY, run_reference
from xattn_compiler.testing import assert_valid
from xattn_compiler.testing.builders import AttentionSpec, attention_model
from xattn_compiler.verification import random_inputs, run_model, verify

SPECS = Path(__file__).parent / "specs"
#: The clean-up half of the default pipeline: blocks left unfused for the plugin target.
CLEAN_UP = "canonicalize,remove-layout-clutter"


def fuse(model, **options):
    return FuseAttention(target="trt-plugin", **options)(model)


def plugin_ops(model):
    return [(n.op_type, n.domain) for n in model.graph.node if n.domain == "trt.plugins"]


def fp16(**kw):
    return AttentionSpec(head_dim=64, dtype="float16", **kw)


@pytest.mark.parametrize("spec", [
    fp16(kind="cross"),
    fp16(kind="cross", projection="gemm", scale="mul_q"),
    fp16(kind="cross", projection="matmul", scale="sdpa_qk"),
], ids=lambda s: s.label)
def test_cross_attention_becomes_fmhca_over_interleaved_kv(spec):
    built = attention_model(spec, q_len=6, kv_len=9)
    result = fuse(built.model)
    assert plugin_ops(result.model) == [("fMHCA", "trt.plugins")]
    node = next(n for n in result.model.graph.node if n.op_type == "fMHCA")
    attrs = {a.name: a.s.decode() for a in node.attribute}
    assert attrs == {"plugin_version": "1", "plugin_namespace": ""}
    assert_valid(result.model)
    assert verify(built.model, result.model).ok
    assert not fuse(result.model).changed  # idempotent: the plugin is already fused


def test_kv_weights_are_interleaved_per_head_into_one_projection():
    built = attention_model(fp16(kind="cross", num_heads=2), q_len=6, kv_len=9)
    model = fuse(built.model).model
    weights = {t.name: t for t in model.graph.initializer}
    w_kv = next(v for k, v in weights.items() if k.endswith("W_kv"))
    w = numpy_helper.to_array(w_kv)
    original = {t.name: numpy_helper.to_array(t) for t in built.model.graph.initializer}
    wk = next(v for k, v in original.items() if "k_proj" in k and v.ndim == 2)
    wv = next(v for k, v in original.items() if "v_proj" in k and v.ndim == 2)
    # columns: [K head 0 | V head 0 | K head 1 | V head 1], each 64 wide
    np.testing.assert_array_equal(w[:, 64:128], wv[:, :64])
    np.testing.assert_array_equal(w[:, 128:192], wk[:, 64:])
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape"
                   and any(i.endswith("kv_shape") for i in n.input))
    shape = numpy_helper.to_array(next(t for t in model.graph.initializer
                                       if t.name == reshape.input[1]))
    assert shape.tolist() == [0, 0, 2, 2, 64]


def test_self_attention_becomes_fmha_v2_with_the_scale_folded_into_wq():
    built = attention_model(fp16(kind="self", scale="none"), q_len=6)  # T5: no 1/sqrt(H)
    result = fuse(built.model)
    assert plugin_ops(result.model) == [("fMHA_V2", "trt.plugins")]
    assert verify(built.model, result.model).ok


@pytest.mark.parametrize(("spec", "reason"), [
    (AttentionSpec(kind="cross", head_dim=64), "dtype float32"),
    (fp16(kind="cross", mask="add_input"), "mask"),
    (AttentionSpec(kind="cross", head_dim=16, dtype="float16"), "head size 16 is below 33"),
    (fp16(kind="cross", projection="einsum"), "Einsum"),
    (fp16(kind="self", projection="fused_split"), "is not [E, N*H]"),  # one QKV weight
    (fp16(kind="cross", softmax_cast=True), "Softmax runs in fp32"),
])
def test_blocks_the_presets_cannot_run_are_left_with_a_reason(spec, reason):
    built = attention_model(spec, q_len=6, kv_len=9)
    result = fuse(built.model)
    assert not result.changed
    assert any(reason in text for text in result.details["skipped"]), result.details["skipped"]


def test_declared_plugin_from_a_toml_file(tmp_path):
    built = attention_model(AttentionSpec(kind="cross", head_dim=16, scale="mul_q"),
                            q_len=6, kv_len=9)
    result = fuse(built.model, plugin_spec=str(SPECS / "acme_cross.toml"))
    assert plugin_ops(result.model) == [("AcmeCrossAttention", "trt.plugins")]
    node = next(n for n in result.model.graph.node if n.op_type == "AcmeCrossAttention")
    attrs = {a.name for a in node.attribute}
    assert attrs == {"num_heads", "softmax_scale", "use_tensor_cores", "plugin_version",
                     "plugin_namespace"}
    assert any(p.key == METADATA_KEY for p in result.model.metadata_props)
    assert_valid(result.model)
    # The saved model carries its spec: it verifies without the spec file.
    path = xc.save(result.model, tmp_path / "fused.onnx")
    assert verify(built.model, path).ok
    feeds = random_inputs(built.model, seed=3)
    np.testing.assert_allclose(run_reference(xc.load(path), feeds)["output"],
                               run_model(built.model, feeds)["output"], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("name", "fused"), [("unet2d-tiny-fp16", 1), ("whisper-decoder-fp16", 0),
                                             ("nn-transformer-decoder-fp16", 0)])
def test_fp16_zoo_models_verify_through_the_plugin_references(name, fused):
    zoo = pytest.importorskip("xattn_compiler.zoo")
    exported = zoo.cached_export(name)
    model = xc.optimize(xc.load(exported.path), CLEAN_UP).model
    result = fuse(model)
    # The zoo's models are tiny (head sizes 8/16): only UNet's 16-wide self-attention fits
    # fMHA_V2; the rest are skipped with the preset's reason.
    assert result.counts["blocks_fused"] == fused
    assert len(plugin_ops(result.model)) == fused
    assert verify(xc.load(exported.path), result.model, inputs=exported.sample()[0]).ok


def _zoo_names():
    try:
        from xattn_compiler import zoo
    except ImportError:
        return []
    return [m.name for m in zoo.all_models()]


@pytest.mark.parametrize("name", _zoo_names())
def test_every_zoo_block_becomes_a_declared_plugin_and_verifies(name):
    zoo = pytest.importorskip("xattn_compiler.zoo")
    exported = zoo.cached_export(name)
    original = xc.load(exported.path)
    model = xc.optimize(original, CLEAN_UP).model
    result = fuse(model, plugin_spec=str(SPECS / "any_attention.toml"))
    unfused = [block for block in xc.find_attention(model) if not block.fused]
    assert result.counts["blocks_skipped"] == 0, result.details["skipped"]
    assert result.counts["blocks_fused"] == len(unfused)
    assert verify(original, result.model, inputs=exported.sample()[0]).ok
    assert not fuse(result.model, plugin_spec=str(SPECS / "any_attention.toml")).changed


def test_declared_plugin_takes_the_additive_mask_as_its_last_input():
    built = attention_model(AttentionSpec(kind="self", head_dim=16, mask="add_input"), q_len=6)
    result = fuse(built.model, plugin_spec=str(SPECS / "any_attention.toml"))
    node = next(n for n in result.model.graph.node if n.op_type == "AnyAttention")
    assert len(node.input) == 4
    assert verify(built.model, result.model).ok
    presets = fuse(built.model)
    assert any("mask" in reason for reason in presets.details["skipped"])


@pytest.mark.parametrize("name", ["whisper-decoder-eager", "t5-decoder-eager", "detr-decoder-mha"])
def test_onnx_reference_runs_fused_fp32_zoo_models_with_the_numpy_plugins(name):
    zoo = pytest.importorskip("xattn_compiler.zoo")
    exported = zoo.cached_export(name)
    original = xc.load(exported.path)
    fused = fuse(xc.optimize(original, CLEAN_UP).model, plugin_spec=str(SPECS / "any_attention.toml")).model
    feeds = exported.sample()[0]
    want = run_model(original, feeds)
    got = run_reference(fused, feeds)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-3, atol=1e-4 * max(1, np.abs(value).max()))


def test_a_second_run_with_another_spec_fuses_the_rest_without_name_clashes():
    built = attention_model(AttentionSpec(kind="cross", head_dim=16),
                            self_spec=AttentionSpec(kind="self", head_dim=16, mask="add_input"),
                            q_len=6, kv_len=9)
    first = fuse(built.model, plugin_spec=str(SPECS / "acme_cross.toml"))  # cross only, no mask
    assert first.counts["blocks_fused"] == 1
    second = fuse(first.model, plugin_spec=str(SPECS / "any_attention.toml"))
    assert second.counts["blocks_fused"] == 1
    assert sorted(op for op, _ in plugin_ops(second.model)) == ["AcmeCrossAttention",
                                                                "AnyAttention"]
    assert_valid(second.model)
    # Both specs stay recorded, so both nodes have a reference.
    assert verify(built.model, second.model).ok


def test_an_fp16_block_with_an_fp32_softmax_needs_a_plugin_that_keeps_it():
    built = attention_model(fp16(kind="cross", softmax_cast=True), q_len=6, kv_len=9)
    result = fuse(built.model, plugin_spec=str(SPECS / "any_attention.toml"))
    assert result.counts["blocks_fused"] == 1
    assert verify(built.model, result.model).ok


def test_the_presets_are_marked_legacy_and_warn_when_used(caplog):
    """fMHCA and fMHA_V2 exist only for TensorRT 8.5: every place that shows them says so."""
    import logging

    from xattn_compiler.cli import build_parser
    from xattn_compiler.fusion import load_target
    from xattn_compiler.plugins.presets import LEGACY_PRESETS, REMOVED_IN

    assert REMOVED_IN == (8, 6)
    assert all(spec.description.startswith("LEGACY: TensorRT 8.5 only") for spec in LEGACY_PRESETS)
    target = load_target("trt-plugin")
    assert "LEGACY" in target.description
    with caplog.at_level(logging.WARNING, logger="xattn_compiler"):
        target({})
    assert any("LEGACY" in r.getMessage() and "8.6" in r.getMessage() for r in caplog.records)
    optimize = build_parser()._subparsers._group_actions[0].choices["optimize"]
    [spec_help] = [a.help for a in optimize._actions if "--plugin-spec" in a.option_strings]
    assert "LEGACY" in spec_help and "TensorRT 8.5" in spec_help and "IPluginV3" in spec_help
