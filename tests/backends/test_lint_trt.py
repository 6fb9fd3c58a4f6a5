"""``lint-trt``: findings name the node and the fix; tiny graphs for each rule, every zoo model."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import xattn_compiler as xc
from tests import models
from xattn_compiler.backends import lint_trt
from xattn_compiler.backends.trt_ops import SUPPORTED, UNSUPPORTED, support
from xattn_compiler.cli import main
from xattn_compiler.registry import default_registry

from .conftest import ZOO, zoo_export

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def model_of(nodes, inputs, outputs, inits=(), opset=18, **kwargs) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=kwargs.pop(
        "opset_imports", [helper.make_opsetid("", opset)]), **kwargs)
    model.ir_version = 9
    return model


def vi(name, dims, elem=FLOAT):
    return helper.make_tensor_value_info(name, elem, dims)


def unary(op, *, domain="", elem=FLOAT, opset=18, **attrs) -> onnx.ModelProto:
    node = helper.make_node(op, ["x"], ["y"], name=f"the_{op.lower()}", domain=domain, **attrs)
    return model_of([node], [vi("x", [2, 4], elem)], [vi("y", [2, 4], elem)], opset=opset,
                    **({"opset_imports": [helper.make_opsetid("", opset),
                                          helper.make_opsetid(domain, 1)]} if domain else {}))


def findings(model, version="10.14", **kwargs):
    return lint_trt(model, version, **kwargs).findings


def codes(model, version="10.14", **kwargs):
    return {(f.severity, f.code, f.node) for f in findings(model, version, **kwargs)}


# --- the table -------------------------------------------------------------------------------

def test_the_table_holds_the_documented_facts():
    assert SUPPORTED["Softmax"].types == {"FLOAT", "FLOAT16", "BFLOAT16"}
    assert SUPPORTED["CumSum"].types == {"FLOAT", "FLOAT16", "BFLOAT16"}
    assert support("Attention", (10, 13)) is None and support("Attention", (10, 14)) is not None
    assert support("RMSNormalization", (10, 14)) is None
    assert support("RMSNormalization", (10, 15)) is not None
    assert {"Unique", "DFT", "SequenceAt"} <= UNSUPPORTED and not UNSUPPORTED & set(SUPPORTED)


def test_tensorrt_11_5_reads_opset_25_and_keeps_the_10_15_ops():
    from xattn_compiler.backends.trt_ops import opset_range

    assert opset_range((11, 5)) == (9, 25) and opset_range((11, 0)) == (9, 24)
    for op in ("RotaryEmbedding", "RMSNormalization", "TensorScatter", "Attention"):
        assert support(op, (11, 5)) is not None
    assert findings(unary("Relu", opset=25), "11.5") == []
    [blocker] = findings(unary("Relu", opset=25), "10.15")
    assert blocker.code == "opset"


def test_lint_trt_precision_flags_are_refused_for_tensorrt_11(capsys, tmp_path):
    path = tmp_path / "m.onnx"
    xc.save(unary("Relu"), path)
    assert main(["lint-trt", str(path), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT 11.5 has no precision flags" in err and "optimize --precision fp16" in err
    assert main(["lint-trt", str(path), "--precision", "fp16", "--trt-version", "10.15"]) == 0


# --- ops, types, opset -----------------------------------------------------------------------

def test_a_supported_op_on_a_documented_type_is_clean():
    assert findings(unary("Relu")) == []


def test_an_unsupported_op_blocks_and_names_the_node():
    [finding] = findings(unary("Det", opset=18))
    assert (finding.severity, finding.code, finding.node, finding.op) == \
        ("blocker", "unsupported-op", "the_det", "Det")


def test_ops_newer_than_the_target_block_with_the_version():
    model = unary("RMSNormalization", opset=23)
    [old] = findings(model, "10.14")
    assert old.severity == "blocker" and "from TensorRT 10.15" in old.message
    assert findings(model, "10.15") == []


def test_an_onnx_runtime_contrib_op_blocks_and_points_at_fusion():
    [finding] = findings(unary("MultiHeadAttention", domain="com.microsoft"))
    assert finding.severity == "blocker"
    assert finding.fix.startswith("fuse-attention{target=onnx-attention}")


def test_a_custom_domain_op_is_a_plugin_lookup():
    [finding] = findings(unary("MyAttention", domain="trt.plugins"))
    assert (finding.severity, finding.code) == ("warning", "plugin")
    assert "--plugin-lib" in finding.fix


@pytest.mark.parametrize("op", ["fMHCA", "fMHA_V2"])
@pytest.mark.parametrize("version", ["8.6", "10.14", "11.5"])
def test_the_legacy_stable_diffusion_plugins_block_from_tensorrt_8_6(op, version):
    [finding] = findings(unary(op, domain="trt.plugins"), version)
    assert (finding.severity, finding.code) == ("blocker", "plugin")
    assert "legacy" in finding.message and "8.5" in finding.message
    assert "--plugin-spec" in finding.fix and "onnx-attention" in finding.fix


def test_the_legacy_plugins_are_only_a_plugin_lookup_on_tensorrt_8_5():
    [finding] = findings(unary("fMHA_V2", domain="trt.plugins"), "8.5")
    assert (finding.severity, finding.code) == ("warning", "plugin")


def test_an_unknown_default_domain_op_is_a_plugin_lookup_not_a_blocker():
    model = unary("CustomNorm")
    [finding] = findings(model)
    assert (finding.severity, finding.code, finding.node) == ("warning", "plugin", "the_customnorm")


def test_an_opset_past_the_documented_range_blocks():
    model = unary("Relu", opset=24)
    assert ("blocker", "opset", None) in codes(model, "10.13")
    assert codes(model, "10.14") == set()


def test_types_tensorrt_lacks_block_and_undocumented_types_warn():
    assert ("blocker", "dtype", "the_relu") in codes(unary("Relu", elem=TensorProto.UINT16))
    # CumSum is documented for floats only; its importer may take more, so only a warning.
    cumsum = model_of([helper.make_node("CumSum", ["x", "axis"], ["y"], name="positions")],
                      [vi("x", [2, 4], INT64)], [vi("y", None, INT64)],
                      [numpy_helper.from_array(np.asarray(1, np.int64), "axis")])
    assert codes(cumsum) == {("warning", "dtype", "positions")}


def test_double_is_one_aggregated_warning():
    model = model_of([helper.make_node("Relu", ["x"], ["h"], name="r1"),
                      helper.make_node("Relu", ["h"], ["y"], name="r2")],
                     [vi("x", [2], TensorProto.DOUBLE)], [vi("y", None, TensorProto.DOUBLE)])
    [finding] = findings(model)
    assert finding.node == "r1" and "and 1 more nodes" in finding.message


# --- restrictions ----------------------------------------------------------------------------

def test_reduce_axes_must_be_build_time_constants():
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="sum")]
    constant = model_of(nodes, [vi("x", [2, 4])], [vi("y", None)],
                        [numpy_helper.from_array(np.asarray([1], np.int64), "axes")])
    runtime = model_of(nodes, [vi("x", [2, 4]), vi("axes", [1], INT64)], [vi("y", None)])
    assert findings(constant) == []
    assert ("blocker", "restriction", "sum") in codes(runtime)


def test_topk_must_be_sorted():
    nodes = [helper.make_node("TopK", ["x", "k"], ["v", "i"], name="top", sorted=0)]
    model = model_of(nodes, [vi("x", [2, 4])], [vi("v", None), vi("i", None, INT64)],
                     [numpy_helper.from_array(np.asarray([2], np.int64), "k")])
    assert ("blocker", "restriction", "top") in codes(model)


def attention_model(*, past: bool) -> onnx.ModelProto:
    names = ["q", "k", "v", "", "past_key", "past_value"] if past else ["q", "k", "v"]
    outputs = ["y", "present_key", "present_value"] if past else ["y"]
    node = helper.make_node("Attention", names, outputs, name="attn")
    inputs = [vi(n, [1, 2, 3, 4]) for n in ("q", "k", "v")]
    if past:
        inputs += [vi("past_key", [1, 2, 5, 4]), vi("past_value", [1, 2, 5, 4])]
    return model_of([node], inputs, [vi(o, None) for o in outputs], opset=23)


def test_attention_without_a_cache_is_clean_from_10_14_and_blocks_before():
    assert findings(attention_model(past=False), "10.14", precision="fp16") == []
    [old] = [f for f in findings(attention_model(past=False), "10.13") if f.node == "attn"]
    assert old.severity == "blocker" and old.fix == "fuse-attention{target=canonical}"


def test_attention_with_a_kv_cache_blocks_on_inputs_and_outputs():
    blockers = [f for f in findings(attention_model(past=True)) if f.severity == "blocker"]
    messages = " ".join(f.message for f in blockers)
    assert all(f.node == "attn" for f in blockers)
    for name in ("past_key", "past_value", "present_key", "present_value"):
        assert name in messages


# --- control flow ----------------------------------------------------------------------------

def if_model(else_rank: int, cond_constant: bool) -> onnx.ModelProto:
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"], name="then_relu")], "then",
                             [], [vi("t", [2, 4])])
    shape = [2, 4] if else_rank == 2 else [8]
    other = helper.make_graph([helper.make_node("Reshape", ["x", "flat"], ["e"], name="flatten")],
                              "else", [], [vi("e", shape)])
    node = helper.make_node("If", ["cond"], ["y"], name="choose", then_branch=then,
                            else_branch=other)
    inits = [numpy_helper.from_array(np.asarray([-1] if else_rank == 1 else [2, 4], np.int64),
                                     "flat")]
    inputs = [vi("x", [2, 4])]
    if cond_constant:
        inits.append(numpy_helper.from_array(np.asarray([True]), "cond"))
    else:
        inputs.append(vi("cond", [1], TensorProto.BOOL))
    return model_of([node], inputs, [vi("y", None)], inits)


def test_if_branches_of_different_ranks_block_and_point_at_unrolling():
    model = if_model(else_rank=1, cond_constant=False)
    [blocker] = [f for f in findings(model) if f.severity == "blocker"]
    assert (blocker.code, blocker.node) == ("control-flow", "choose")
    assert blocker.fix == "unroll-control-flow (optimize --specialize cond=VALUE)"


def test_if_branches_of_one_rank_build_an_iifconditional():
    assert {f.severity for f in findings(if_model(else_rank=2, cond_constant=False))} == {"info"}


def test_if_with_a_constant_condition_is_inlined_by_the_parser():
    assert findings(if_model(else_rank=1, cond_constant=True)) == []


def loop_model(trips_constant: bool) -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Add", ["acc_in", "x"], ["acc_out"], name="accumulate"),
         helper.make_node("Identity", ["acc_out"], ["scan_out"], name="record")],
        "body", [vi("i", [], INT64), vi("cond_in", [], TensorProto.BOOL), vi("acc_in", [4])],
        [vi("cond_out", [], TensorProto.BOOL), vi("acc_out", [4]), vi("scan_out", [4])])
    node = helper.make_node("Loop", ["trips", "", "acc0"], ["acc", "history"], name="repeat",
                            body=body)
    inits = [numpy_helper.from_array(np.zeros(4, np.float32), "acc0")]
    inputs = [vi("x", [4])]
    if trips_constant:
        inits.append(numpy_helper.from_array(np.asarray(3, np.int64), "trips"))
    else:
        inputs.append(vi("trips", [], INT64))
    return model_of([node], inputs, [vi("acc", None), vi("history", None)], inits)


def test_a_loop_with_scan_outputs_needs_a_static_trip_count():
    [blocker] = [f for f in findings(loop_model(False)) if f.severity == "blocker"]
    assert (blocker.node, blocker.fix) == ("repeat", "unroll-control-flow")
    assert not [f for f in findings(loop_model(True)) if f.severity == "blocker"]


# --- profiles and attention ------------------------------------------------------------------

def test_dynamic_inputs_without_a_profile_warn_with_the_default_range():
    model = models.tiny_mlp()
    [warning] = findings(model)
    assert (warning.code, warning.tensor) == ("dynamic-input", "x")
    assert "MIN [1, 4], OPT [1, 4], MAX [8, 4]" in warning.message
    assert findings(model, profiled_inputs=["x"]) == []


def attention_findings(model, **kwargs):
    return [f for f in findings(model, profiled_inputs=["x", "context"], **kwargs)
            if f.code == "attention-fusion"]


def test_fp32_attention_will_not_fuse_until_built_in_half():
    fp32 = [f for f in attention_findings(models.tiny_attention(dim=32, heads=2))
            if f.severity == "warning" and "half-precision fused kernel" in f.message]
    assert [f.fix for f in fp32] == ["build --fp16 or --bf16 (guard-precision keeps Softmax in fp32)"]
    half = attention_findings(models.tiny_attention(dim=32, heads=2), precision="fp16")
    assert not [f for f in half if "fp32" in f.message]


def test_fp32_attention_on_tensorrt_11_points_at_the_precision_pass():
    [warning] = [f for f in attention_findings(models.tiny_attention(dim=32, heads=2),
                                               version="11.5")
                 if "half-precision fused kernel" in f.message]
    assert warning.severity == "warning" and warning.fix.startswith("optimize --precision fp16")


def test_small_heads_and_score_side_scales_are_named():
    found = attention_findings(models.tiny_attention(dim=8, heads=2), precision="fp16")
    messages = " ".join(f.message for f in found)
    assert "head size 4" in messages
    assert "scale is applied to the scores" in messages
    assert {f.node for f in found} == {"softmax"}


def test_10_14_suggests_onnx_attention_for_a_cache_free_block():
    [info] = [f for f in attention_findings(models.tiny_attention(dim=32, heads=2))
              if f.severity == "info"]
    assert info.fix == "fuse-attention{target=onnx-attention}"
    assert not [f for f in attention_findings(models.tiny_attention(dim=32, heads=2),
                                              version="10.13") if f.severity == "info"]


# --- every zoo model -------------------------------------------------------------------------

_FIX = re.compile(r"^(none: .+|build .+|[a-z-]+(\{[^}]*\})?( .+)?)$")


def known_fix(fix: str) -> bool:
    """A fix is a registered or planned pass, a build option, or an honest 'none: ...'."""
    planned = {"unroll-control-flow", "fuse-attention", "guard-precision"}
    registered = {cls.name for cls in default_registry()}
    if not fix or not _FIX.match(fix):
        return False
    head = fix.split("{")[0].split(" ")[0]
    return fix.startswith(("none: ", "build ")) or head in registered | planned


def node_names(model: onnx.ModelProto) -> set[str]:
    from xattn_compiler.ir import iter_nodes

    return {n.name or n.op_type for n in iter_nodes(model.graph)}


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_lints_and_its_optimized_output_has_no_blockers(name, export_cache):
    model = xc.load(zoo_export(name, export_cache).path)
    optimized = xc.optimize(model).model
    for candidate in (model, optimized):
        names = node_names(candidate)
        inputs = {v.name for v in candidate.graph.input}
        for version in ("10.14", "10.15"):
            for finding in lint_trt(candidate, version, name=name).findings:
                assert finding.node in names or finding.tensor in inputs or \
                    finding.code == "opset", finding
                assert known_fix(finding.fix), finding.fix
    # What the default pipeline writes must build on TensorRT 10.14 and later.
    assert lint_trt(optimized, "10.14").blockers == []
    assert lint_trt(optimized, "10.15").blockers == []


def test_an_opset_23_export_blocks_on_tensorrt_before_10_14(export_cache):
    model = xc.load(zoo_export("whisper-decoder-sdpa-opset23", export_cache).path)
    report = lint_trt(model, "10.13")
    attention = {n.name for n in model.graph.node if n.op_type == "Attention"}
    blocked = {f.node for f in report.blockers if f.code == "unsupported-op"}
    assert attention and blocked == attention
    assert any(f.code == "opset" for f in report.blockers)
    assert lint_trt(model, "10.14").ok


# --- the command -----------------------------------------------------------------------------

def test_lint_trt_exits_1_on_blockers_and_0_otherwise(capsys, tmp_path):
    clean, blocked = tmp_path / "clean.onnx", tmp_path / "blocked.onnx"
    xc.save(unary("Relu"), clean)
    xc.save(unary("Det"), blocked)
    assert main(["lint-trt", str(clean)]) == 0
    assert main(["lint-trt", str(blocked), "--json"]) == 1
    captured = capsys.readouterr()
    [report] = json.loads(captured.out[captured.out.index("[\n"):])
    assert report["counts"]["blocker"] == 1 and report["findings"][0]["node"] == "the_det"
    assert "block a TensorRT 11.5 build" in captured.err


def test_lint_trt_rejects_a_malformed_version(capsys, tmp_path):
    path = tmp_path / "m.onnx"
    xc.save(unary("Relu"), path)
    assert main(["lint-trt", str(path), "--trt-version", "ten"]) == 2
    assert "MAJOR.MINOR" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_onnx_attention_fusion_builds_from_10_14_and_not_before(name, export_cache):
    if "fuse-attention" not in {cls.name for cls in default_registry()}:
        pytest.skip("the fuse-attention pass is not registered")
    model = xc.load(zoo_export(name, export_cache).path)
    fused = xc.optimize(model, "canonicalize,remove-layout-clutter,"
                               "fuse-attention{target=onnx-attention}").model
    attention = [n.name for n in fused.graph.node if n.op_type == "Attention"]
    assert lint_trt(fused, "10.14").blockers == []
    # Left on the nodes: facts (info) and, for an fp32 model, the half-precision hint.
    assert not [f for f in lint_trt(fused, "10.14").findings if f.node in attention
                and f.severity != "info" and f.code != "attention-precision"]
    if attention:    # top-level Attention nodes: TensorRT 10.13 cannot import them
        blocked = {f.node for f in lint_trt(fused, "10.13").blockers}
        assert set(attention) <= blocked


def test_lint_trt_checks_both_parts_of_a_split(capsys, export_cache, tmp_path):
    model = xc.load(zoo_export("whisper-decoder-eager", export_cache).path)
    xc.split_static_kv(model).save(tmp_path / "split")
    assert main(["lint-trt", str(tmp_path / "split"), "--json", "--profile", "input_ids"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["model"].rsplit("/", 1)[-1] for r in reports] == ["kv_projector.onnx", "decoder.onnx"]
    decoder_dynamic = {f["tensor"] for f in reports[1]["findings"] if f["code"] == "dynamic-input"}
    assert "input_ids" not in decoder_dynamic and "cross_kv.0.key" in decoder_dynamic


def test_int8_without_quantize_dequantize_nodes_warns():
    [finding] = findings(unary("Relu"), precision="int8")
    assert (finding.severity, finding.code) == ("warning", "precision")
    assert findings(unary("Relu"), precision="fp16") == []


# --- the precision audit's fp32 escape ---------------------------------------------------------

def _attention_model(elem=FLOAT) -> onnx.ModelProto:
    shape = [1, 2, 4, 16]
    node = helper.make_node("Attention", ["q", "k", "v"], ["ctx"], name="block")
    return model_of([node], [vi(n, shape, elem) for n in "qkv"], [vi("ctx", shape, elem)],
                    opset=23)


def _escaped() -> onnx.ModelProto:
    """An fp32 Attention converted to fp16 with the audit's escape for its block."""
    from xattn_compiler.passes import ConvertPrecision

    converted = ConvertPrecision(precision="fp16", convert_io=True, escapes=("ctx:fp32",))
    model = converted.run(_attention_model()).model
    (node,) = [n for n in model.graph.node if n.op_type == "Attention"]
    assert [n.op_type for n in model.graph.node].count("Cast") == 4  # Q, K, V up; output back
    return model


def precision_findings(model, version):
    return [f for f in findings(model, version) if f.code == "attention-precision"]


@pytest.mark.parametrize("version", ["11.3", "11.5"])
def test_the_audits_fp32_escape_is_fp32_accumulation_from_tensorrt_11_3(version):
    [found] = precision_findings(_escaped(), version)
    assert found.severity == "info" and "FP32 accumulation" in found.message
    assert "will not get a half-precision fused kernel" not in found.message


@pytest.mark.parametrize("version", ["10.14", "11.2"])
def test_the_audits_fp32_escape_warns_that_fp32_accumulation_needs_11_3(version):
    [found] = precision_findings(_escaped(), version)
    assert found.severity == "warning" and "needs TensorRT 11.3" in found.message
    assert "11.3" in found.fix


def test_an_fp32_attention_without_the_escape_is_still_an_fp32_core_on_11_5():
    [found] = precision_findings(_attention_model(), "11.5")
    assert found.severity == "warning" and "half-precision fused kernel" in found.message
