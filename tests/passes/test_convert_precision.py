"""convert-precision: fp16/bf16 in the graph, fp32 kept only where a rule says why.

Real exports go through ``optimize --precision`` as a user runs it (files as written, checked
and shape-inferred strictly, outputs within the precision's tolerance of the fp32 original);
each kept-fp32 rule has a small hand-built graph next to its expectation.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.passes import ConvertPrecision

import xattn_compiler as xc
from xattn_compiler.attention import find_attention
from xattn_compiler.backends.lint_trt import lint_trt
from xattn_compiler.cli import main
from xattn_compiler.ir import infer_shapes
from xattn_compiler.precision_audit import (
    cpu_view,
    model_depth,
    precision_tolerances,
    relative_error,
    verify_precision,
)
from xattn_compiler.testing import AttentionSpec, attention_model
from xattn_compiler.testing.assertions import (
    assert_deterministic,
    assert_idempotent,
    assert_valid,
)
from xattn_compiler.testing.strategies import Layer, Recipe, build_example
from xattn_compiler.verification import run_model
from xattn_compiler.zoo import cached_export

F, H, B = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
HALF = {"fp16": H, "bf16": B}


def types(model: onnx.ModelProto) -> dict[str, int]:
    graph = infer_shapes(model).graph
    found = {v.name: v.type.tensor_type.elem_type
             for v in [*graph.value_info, *graph.input, *graph.output]}
    found.update({t.name: t.data_type for t in graph.initializer})
    return found


def node(model: onnx.ModelProto, op: str) -> onnx.NodeProto:
    (found,) = [n for n in model.graph.node if n.op_type == op]
    return found


def model_of(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def out(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, F, shape)


def weight(name: str, shape, seed=0, scale=0.3) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def converted_error(reference, converted, feeds) -> float:
    ref = run_model(reference, feeds)
    got = run_model(cpu_view(converted), feeds)
    return max(relative_error(ref[k], got[k]) for k in ref)


# --- real exports through the CLI --------------------------------------------------------------

def _fp32_zoo() -> list[str]:
    from xattn_compiler.zoo import all_models

    return [m.name for m in all_models() if m.dtype == "float32" and "small" in m.sizes]


ZOO = _fp32_zoo()
# What stays fp32 in each, and why: the norms these architectures are built from (torch and
# diffusers LayerNorm/GroupNorm as ops; T5, Llama and Wan's RMSNorm written out), their masks
# and position arithmetic (T5's log-spaced relative buckets, rotary angles, the UNets'
# sinusoidal timestep embedding, causal and padding masks built from bool). Models with no
# index arithmetic take masks and positions as inputs or have none.
_LAYER_NORM = {"normalization", "index-arithmetic"}
_RMS_NORM = {"norm-statistics", "index-arithmetic"}
EXPECTED_KEPT = {
    **dict.fromkeys(ZOO, _LAYER_NORM),
    **dict.fromkeys(["t5-decoder-eager", "llama-decoder-eager", "llama-decoder-sdpa",
                     "llama-decoder-position-ids", "mllama-text-eager"], _RMS_NORM),
    "wan-transformer": _LAYER_NORM | _RMS_NORM,
    **dict.fromkeys(["einsum-head-merge", "ldm-transformer-einsum", "if-cross-attention",
                     "loop-cross-attention", "nn-mha-time-major",
                     "nn-mha-time-major-torchscript", "whisper-decoder-sdpa-opset23"],
                    {"normalization"}),
}
# Attention inside an If branch stays unfused by design for TensorRT (NVIDIA/TensorRT#4739):
# such models are specialised on their condition, as a user runs them.
SPECIALIZE = {"if-cross-attention": "use_cache_branch"}


def _cases():
    for name in ZOO:
        for precision in ("fp16", "bf16"):
            values = ("true", "false") if name in SPECIALIZE else (None,)
            for value in values:
                spec = {SPECIALIZE[name]: value == "true"} if value else None
                yield pytest.param((name, precision, spec),
                                   id=f"{name}-{precision}" + (f"-{value}" if value else ""))


@pytest.fixture(scope="module", params=list(_cases()))
def converted_zoo(request, export_cache, tmp_path_factory):
    name, precision, spec = request.param
    exported = cached_export(name, export_cache)
    folder = tmp_path_factory.mktemp(f"{name}-{precision}")
    out, report = folder / "model.onnx", folder / "report.json"
    pinned = [a for k, v in (spec or {}).items() for a in ("--specialize", f"{k}={str(v).lower()}")]
    code = main(["optimize", str(exported.path), "-o", str(out), "--precision", precision,
                 "--verify", "--report", str(report), "-q", *pinned])
    return exported, precision, code, out, json.loads(report.read_text()), spec


def test_optimize_precision_fuses_every_block_with_half_qkv(converted_zoo):
    exported, precision, code, out, report, _spec = converted_zoo
    assert code == 0, report.get("verify")
    written = onnx.load(out)
    assert_valid(written)  # full checker and strict shape inference on the file as written
    seen = types(written)
    attention = [n for n in written.graph.node if n.op_type == "Attention"]
    blocks = find_attention(written)
    assert attention and len(attention) == len(blocks) and all(b.fused for b in blocks)
    for n in attention:
        assert {seen[i] for i in n.input[:3]} == {HALF[precision]}, n.name
    original = {v.name: v.type.tensor_type.elem_type for v in xc.load(exported.path).graph.output}
    assert {v.name: v.type.tensor_type.elem_type for v in written.graph.output} == original


def test_optimize_precision_reports_what_stayed_fp32_and_why(converted_zoo):
    exported, precision, code, _out, report, _spec = converted_zoo
    record = report["passes"][-1]
    assert record["name"] == "convert-precision"
    details = record["details"]
    assert set(details["kept_fp32"]) == EXPECTED_KEPT[exported.name]
    assert details["attention"] == {"half": details["counts"]["attention_half"]}
    assert all(details["kept_fp32_nodes"][kind] for kind in details["kept_fp32"])
    assert details["audit"]["blocks"] and not details["audit"]["escaped_after_check"]


def test_optimize_precision_outputs_within_the_precisions_tolerance(converted_zoo):
    exported, precision, code, out, report, spec = converted_zoo
    inputs, _ = exported.sample()
    result = verify_precision(exported.path, out, precision, inputs=inputs, specialize=spec)
    assert result.ok, result.summary()
    assert report["verify"]["ok"]


def test_lint_trt_11_5_finds_no_blocker_and_no_fp32_core_in_the_converted_model(converted_zoo):
    _exported, _precision, _code, out, _report, _spec = converted_zoo
    findings = lint_trt(onnx.load(out), "11.5").findings
    assert not [f for f in findings if f.severity == "blocker"]
    assert not [f for f in findings if "fp32 attention core" in f.message]


def test_convert_precision_is_idempotent_on_a_real_export(export_cache):
    fused = xc.optimize(xc.load(cached_export("llama-decoder-sdpa", export_cache).path)).model
    once = ConvertPrecision(precision="fp16").run(fused).model
    assert_idempotent(ConvertPrecision(precision="fp16"), once)


# --- the rules, one small graph each ------------------------------------------------------------

def test_layer_normalization_computes_in_fp32_between_casts():
    model = model_of(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1),
         helper.make_node("MatMul", ["n", "w2"], ["y"])],
        [helper.make_tensor_value_info("x", F, [2, 8])], [out("y", [2, 4])],
        [weight("w1", [8, 8]), weight("gamma", [8], 1), weight("beta", [8], 2), weight("w2", [8, 4], 3)])
    result = ConvertPrecision(precision="fp16").run(model)
    seen = types(result.model)
    norm = node(result.model, "LayerNormalization")
    assert [seen[i] for i in norm.input] == [F, F, F] and seen[norm.output[0]] == F
    assert seen["w1"] == seen["w2"] == H and seen["h"] == H
    assert result.details["kept_fp32"] == {"normalization": 1}
    x = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    assert converted_error(model, result.model, x) <= precision_tolerances("fp16", 1)[0]


def test_written_out_rms_norm_keeps_its_statistics_in_fp32():
    # x * rsqrt(mean(x^2) + eps) * w: x^2 overflows fp16 once |x| > 256.
    eps = numpy_helper.from_array(np.array(1e-6, np.float32), "eps")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    model = model_of(
        [helper.make_node("Pow", ["x", "two"], ["sq"]),
         helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], keepdims=1),
         helper.make_node("Add", ["var", "eps"], ["var_eps"]),
         helper.make_node("Sqrt", ["var_eps"], ["std"]),
         helper.make_node("Reciprocal", ["std"], ["inv"]),
         helper.make_node("Mul", ["x", "inv"], ["normed"]),
         helper.make_node("Mul", ["normed", "w"], ["y"])],
        [helper.make_tensor_value_info("x", F, [2, 8])], [out("y", [2, 8])],
        [two, eps, weight("w", [8])], opset=17)
    result = ConvertPrecision(precision="fp16").run(model)
    seen = types(result.model)
    for name in ("sq", "var", "var_eps", "std", "inv", "normed"):
        assert seen[name] == F, name
    assert seen["w"] == H
    assert result.details["kept_fp32"] == {"norm-statistics": 6}
    big = {"x": (np.random.default_rng(1).standard_normal((2, 8)) * 400).astype(np.float32)}
    assert converted_error(model, result.model, big) <= precision_tolerances("fp16", 1)[0]


def test_a_softmax_outside_attention_stays_fp32():
    model = model_of(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["y"], axis=-1)],
        [helper.make_tensor_value_info("x", F, [2, 8])], [out("y", [2, 16])],
        [weight("w", [8, 16])])
    result = ConvertPrecision(precision="fp16").run(model)
    seen = types(result.model)
    assert seen["logits"] == H and seen[node(result.model, "Softmax").input[0]] == F
    assert result.details["kept_fp32"] == {"softmax": 1}


def test_an_unfused_attention_core_stays_half_so_tensorrt_fuses_it():
    built = attention_model(AttentionSpec(kind="self"))
    result = ConvertPrecision(precision="fp16").run(built.model)
    (block,) = find_attention(result.model)
    seen = types(result.model)
    assert seen[block.core["softmax.node"].outputs[0].name] == H
    assert seen[block.core["scores"].name] == H
    assert "softmax" not in result.details["kept_fp32"]
    assert converted_error(built.model, result.model, built.inputs) <= precision_tolerances("fp16", 2)[0]


def test_index_arithmetic_stays_fp32_and_joins_through_a_saturating_cast():
    # positions -> angles -> sin (rotary-like), and a bool mask -> finfo.min fill
    fill = numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "fill")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    freq = numpy_helper.from_array(np.array(0.37, np.float32), "freq")
    model = model_of(
        [helper.make_node("Cast", ["pos"], ["posf"], to=F),
         helper.make_node("Mul", ["posf", "freq"], ["angle"]),
         helper.make_node("Sin", ["angle"], ["sin"]),
         helper.make_node("Where", ["keep", "zero", "fill"], ["mask"]),
         helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Add", ["h", "sin"], ["h2"]),
         helper.make_node("Add", ["h2", "mask"], ["y"])],
        [helper.make_tensor_value_info("x", F, [2, 8]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, [2, 8]),
         helper.make_tensor_value_info("keep", TensorProto.BOOL, [2, 8])],
        [out("y", [2, 8])], [fill, zero, freq, weight("w", [8, 8])])
    result = ConvertPrecision(precision="fp16").run(model)
    seen = types(result.model)
    assert seen["posf"] == seen["angle"] == seen["sin"] == seen["mask"] == F
    assert seen["fill"] == F  # only fp32 readers: stored as it was, not clipped
    assert result.details["kept_fp32"] == {"index-arithmetic": 3}  # Casts are not counted
    clip = node(result.model, "Clip")
    assert clip.input[0] == "mask"  # sin is bounded: no Clip for it
    feeds = {"x": np.ones((2, 8), np.float32), "pos": np.arange(16).reshape(2, 8) * 300,
             "keep": np.arange(16).reshape(2, 8) % 3 > 0}
    got = run_model(result.model, feeds)["y"]
    assert np.isfinite(got).all() and got.min() < -60000  # -65504, not -inf


def test_a_rotary_table_cut_to_the_sequence_length_is_a_lookup():
    # Slice(cos_table, 0, Shape(x)[1]): the table's values picked by a shape, as Gather picks
    # them by position ids, so the table goes half and no fp32 copy of it is kept.
    table = numpy_helper.from_array(np.cos(np.arange(64, dtype=np.float32)).reshape(8, 8),
                                    "cos_table")
    starts = numpy_helper.from_array(np.array([0], np.int64), "starts")
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    model = model_of(
        [helper.make_node("Shape", ["x"], ["len"], start=0, end=1),
         helper.make_node("Slice", ["cos_table", "starts", "len", "starts"], ["cos"]),
         helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Mul", ["h", "cos"], ["y"])],
        [helper.make_tensor_value_info("x", F, [4, 8])], [out("y", [4, 8])],
        [table, starts, one, weight("w", [8, 8])])
    result = ConvertPrecision(precision="bf16").run(model)
    seen = types(result.model)
    assert seen["cos_table"] == seen["cos"] == B
    assert result.details["kept_fp32"] == {}


def test_convert_precision_is_idempotent_on_a_table_shared_by_a_gather_and_a_shape_cut_slice():
    # (thorough profile, bf16) Two RoPE layers share a cos/sin table: one Gathers it by
    # position ids, the other Slices it to the sequence length. The Slice stayed fp32 as
    # "constants picked by ints" and read an fp32 Cast of the converted table; a second run saw
    # a Cast, not a constant, converted the Slice and added two Casts.
    recipe = Recipe(layers=(
        Layer((AttentionSpec(kind="self", head_layout="3d", rope="rotate_half"),)),
        Layer((AttentionSpec(kind="self", projection="fused_split", head_layout="3d",
                             rope="rotate_half", rope_table="constant"),))),
        batch=1, q_len=1, kv_len=1)
    assert_idempotent(ConvertPrecision(precision="bf16"), build_example(recipe).model)


def test_bf16_with_the_audit_on_an_external_data_model(tmp_path):
    # (BLOOM, held-out check: torch's dynamo export writes external data) Weights of 64 KiB
    # or more in external data are read lazily, as stubs, and converted into the run's weight
    # store; the audit's bf16 emulation read stubs as if they held their bytes: "Data of
    # TensorProto ... should be stored in xattn-detached-weights/...".
    built = attention_model(AttentionSpec(kind="self", num_heads=4, head_dim=32))
    assert max(len(t.raw_data) for t in built.model.graph.initializer) >= 64 << 10
    source, out = tmp_path / "model.onnx", tmp_path / "out" / "model.onnx"
    onnx.save(built.model, source, save_as_external_data=True, location="model.onnx.data",
              size_threshold=1024)
    assert main(["optimize", str(source), "-o", str(out), "--precision", "bf16", "--verify",
                 "-q"]) == 0
    assert types(onnx.load(out))[built.model.graph.initializer[0].name] == B


def test_a_cast_from_int_read_only_by_half_nodes_is_retargeted():
    model = model_of(
        [helper.make_node("Cast", ["count"], ["countf"], to=F),
         helper.make_node("Mul", ["x", "countf"], ["y"])],
        [helper.make_tensor_value_info("x", F, [2, 8]),
         helper.make_tensor_value_info("count", TensorProto.INT64, [2, 8])],
        [out("y", [2, 8])])
    result = ConvertPrecision(precision="bf16").run(model)
    cast = [n for n in result.model.graph.node if n.input == ["count"]][0]
    assert helper.get_attribute_value(cast.attribute[0]) == B
    assert types(result.model)["count"] == TensorProto.INT64  # ints untouched


def test_an_op_without_a_half_kernel_stays_fp32():
    # Sin has no bfloat16 kernel before opset 22 (its schema's type constraint).
    model = model_of(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Sin", ["h"], ["s"]),
         helper.make_node("MatMul", ["s", "w"], ["y"])],
        [helper.make_tensor_value_info("x", F, [2, 8])], [out("y", [2, 8])],
        [weight("w", [8, 8])], opset=18)
    bf16 = ConvertPrecision(precision="bf16").run(model)
    assert types(bf16.model)["s"] == F
    assert bf16.details["kept_fp32"] == {"no-half-kernel": 1}
    fp16 = ConvertPrecision(precision="fp16").run(model)
    assert types(fp16.model)["s"] == H and fp16.details["kept_fp32"] == {}


def test_graph_inputs_and_outputs_stay_fp32_unless_convert_io():
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["y"])],
                     [helper.make_tensor_value_info("x", F, [2, 8])],
                     [out("y", [2, 8])], [weight("w", [8, 8])])
    kept = ConvertPrecision(precision="fp16").run(model).model
    assert kept.graph.input[0].type.tensor_type.elem_type == F
    assert kept.graph.output[0].type.tensor_type.elem_type == F
    assert node(kept, "MatMul").output[0] != "y" and types(kept)[node(kept, "MatMul").output[0]] == H
    converted = ConvertPrecision(precision="fp16", convert_io=True).run(model).model
    assert converted.graph.input[0].type.tensor_type.elem_type == H
    assert converted.graph.output[0].type.tensor_type.elem_type == H
    assert [n.op_type for n in converted.graph.node] == ["MatMul"]


def test_constants_beyond_the_fp16_range_are_clipped_and_reported():
    big = numpy_helper.from_array(np.array([1.0, 1e6, -3e5], np.float32), "big")
    model = model_of([helper.make_node("Add", ["x", "big"], ["y"])],
                     [helper.make_tensor_value_info("x", F, [3])],
                     [out("y", [3])], [big])
    result = ConvertPrecision(precision="fp16").run(model)
    (stored,) = result.model.graph.initializer
    assert numpy_helper.to_array(stored).tolist() == [1.0, 65504.0, -65504.0]
    assert result.details["constants_clipped"] == [
        {"tensor": "big", "values": 2, "max_abs": 1e6}]
    bf16 = ConvertPrecision(precision="bf16").run(model)
    assert bf16.details["constants_clipped"] == []  # bf16 has fp32's range


def test_if_and_loop_bodies_convert_with_their_node():
    def branch(name, op, other):
        return helper.make_graph([helper.make_node(op, ["h", other], [f"{name}_out"])], name, [],
                                 [out(f"{name}_out", [2, 8])])

    loop_body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("MatMul", ["acc_in", "w"], ["acc_mm"]),
         helper.make_node("Tanh", ["acc_mm"], ["acc_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("acc_in", F, [2, 8])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", F, [2, 8])])
    trips = numpy_helper.from_array(np.array(3, np.int64), "trips")
    model = model_of(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("If", ["flag"], ["picked"], then_branch=branch("then", "MatMul", "w"),
                          else_branch=branch("else", "Add", "h")),
         helper.make_node("Loop", ["trips", "", "picked"], ["looped"], body=loop_body),
         helper.make_node("LayerNormalization", ["looped", "gamma"], ["y"])],
        [helper.make_tensor_value_info("x", F, [2, 8]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [out("y", [2, 8])],
        [weight("w", [8, 8]), trips, weight("gamma", [8], 1)])
    result = ConvertPrecision(precision="fp16").run(model)
    assert_valid(result.model)
    seen = types(result.model)
    assert seen["picked"] == seen["looped"] == H
    for flag in (True, False):
        feeds = {"x": np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32),
                 "flag": np.array(flag)}
        assert converted_error(model, result.model, feeds) <= precision_tolerances("fp16", 4)[0]


def test_unknown_precision_is_refused():
    with pytest.raises(xc.errors.InputError, match="fp16 or bf16"):
        ConvertPrecision(precision="fp8").run(onnx.ModelProto())


def test_precision_round_trips_through_external_data(export_cache, tmp_path):
    exported = cached_export("whisper-decoder-sdpa", export_cache)
    source = tmp_path / "src" / "model.onnx"
    source.parent.mkdir()
    xc.save(xc.load(exported.path), source, external_data=True)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    assert main(["optimize", str(source), "-o", str(out), "--precision", "fp16", "--verify",
                 "-q"]) == 0
    written = onnx.load(out, load_external_data=False)
    external = [t for t in written.graph.initializer
                if t.data_location == TensorProto.EXTERNAL]
    assert external and {t.data_type for t in external} <= {H, TensorProto.INT64, F}
    assert any(t.data_type == H for t in external)
    assert_valid(onnx.load(out))


def test_convert_precision_output_is_deterministic(export_cache):
    fused = xc.optimize(xc.load(cached_export("whisper-decoder-sdpa", export_cache).path)).model
    assert_deterministic(ConvertPrecision(precision="fp16"), fused)


def test_a_model_onnx_runtime_cannot_run_converts_without_the_audit():
    # A custom op the CPU provider lacks: the audit is skipped with its reason, not an error.
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]),
                               helper.make_node("Mystery", ["h"], ["y"], domain="example.custom")],
                              "g", [helper.make_tensor_value_info("x", F, [2, 8])],
                              [out("y", [2, 8])], [weight("w", [8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("example.custom", 1)])
    result = ConvertPrecision(precision="fp16", audit=True).run(model)
    assert "skipped" in result.details["audit"]
    assert result.details["kept_fp32"] == {"no-schema": 1}


@pytest.mark.parametrize("argv, message", [
    (["--no-audit"], "--no-audit and --convert-io apply to --precision only"),
    (["--precision", "fp16", "--guard-precision"], "guard_precision is for TensorRT 10"),
])
def test_precision_usage_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    code = main(["optimize", "--example", "-o", str(tmp_path / "out.onnx"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "out.onnx").exists()


def test_optimize_precision_with_specialize_verifies_against_the_pinned_original(tmp_path):
    # Was: the specialised fp16 model was compared with the fp32 default tolerances.
    from xattn_compiler.testing.merged_decoder import merged_decoder

    source, out = tmp_path / "merged.onnx", tmp_path / "decoder.fp16.onnx"
    report = tmp_path / "report.json"
    xc.save(merged_decoder(), source)
    assert main(["optimize", str(source), "-o", str(out), "--specialize",
                 "use_cache_branch=false", "--precision", "fp16", "--verify", "--report",
                 str(report), "-q"]) == 0
    assert_valid(onnx.load(out))
    rtol = precision_tolerances("fp16", model_depth(onnx.load(out)))[0]
    checks = json.loads(report.read_text())["verify"]["outputs"]
    assert checks and all(check["rtol"] == pytest.approx(rtol) for check in checks)


def test_a_cast_to_float_that_is_a_graph_output_stays_fp32():
    # The property machine's clutter: Cast(x, to=float) written straight to an output. Its
    # retarget to half would change the output's type.
    model = model_of([helper.make_node("Tanh", ["x"], ["t"]),
                      helper.make_node("Cast", ["t"], ["y"], to=F)],
                     [helper.make_tensor_value_info("x", F, [1, 8])], [out("y", [1, 8])])
    result = ConvertPrecision(precision="fp16").run(model)
    assert_valid(result.model)
    assert types(result.model)["y"] == F
    feeds = {"x": np.linspace(-2, 2, 8, dtype=np.float32)[None]}
    assert run_model(result.model, feeds)["y"].dtype == np.float32


def test_an_outer_fp32_weight_read_in_both_if_branches_gets_distinct_cast_names():
    # The property's If-wrapped stack: a LayerNorm's weight is an outer initializer and each
    # branch casts it for its fp32 norm; the same Cast name in both branches is one name
    # defined twice (shape inference: "Data for input 0 already exists").
    def branch(name):
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], [f"{name}_mm"]),
             helper.make_node("LayerNormalization", [f"{name}_mm", "gamma"], [f"{name}_out"])],
            name, [], [out(f"{name}_out", [2, 8])])

    model = model_of(
        [helper.make_node("If", ["flag"], ["y"], then_branch=branch("then"),
                          else_branch=branch("else"))],
        [helper.make_tensor_value_info("x", F, [2, 8]),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [out("y", [2, 8])], [weight("w", [8, 8]), weight("gamma", [8], 1)])
    result = ConvertPrecision(precision="fp16").run(model)
    assert_valid(result.model)
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32),
             "flag": np.array(False)}
    assert converted_error(model, result.model, feeds) <= precision_tolerances("fp16", 2)[0]


def test_a_graph_output_also_read_by_an_fp32_node_is_cast_for_that_reader():
    # A KV cache's present is an output and the next step's operand: the property's einsum
    # core (no bf16 Einsum kernel) read the half present with no Cast to fp32.
    model = model_of([helper.make_node("MatMul", ["x", "w"], ["present"]),
                      helper.make_node("LayerNormalization", ["present", "gamma"], ["y"])],
                     [helper.make_tensor_value_info("x", F, [2, 8])],
                     [out("present", [2, 8]), out("y", [2, 8])],
                     [weight("w", [8, 8]), weight("gamma", [8], 1)])
    result = ConvertPrecision(precision="fp16").run(model)
    assert_valid(result.model)
    feeds = {"x": np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)}
    assert converted_error(model, result.model, feeds) <= precision_tolerances("fp16", 1)[0]
