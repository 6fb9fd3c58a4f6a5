"""Specification of ``xattn_compiler.verification``: numerical proof of a rewrite with ONNX Runtime."""

from __future__ import annotations

import io
import json
import zipfile

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest

import xattn_compiler.io as xio
import xattn_compiler.verification_inputs as vi
from xattn_compiler.cli import main
from xattn_compiler.errors import InputError
from xattn_compiler.testing import assert_equivalent
from xattn_compiler.verification import (
    CandidateError,
    OutputCheck,
    VerifyResult,
    default_tolerances,
    input_sets,
    load_inputs,
    random_inputs,
    run_model,
    verify,
    verify_with,
)

HEADER = '<ir_version: 10, opset_import: ["" : 17]>'


def model(text: str) -> onnx.ModelProto:
    """A model from ONNX's textual syntax; ``text`` is the graph (the header is added)."""
    parsed = onnx.parser.parse_model(HEADER + "\n" + text)
    onnx.checker.check_model(parsed)
    return parsed


def scale_model(extra: float = 0.0, dtype: str = "float") -> onnx.ModelProto:
    """y = x * 1.5 + extra, for x of shape [2, 3] (constants are written as float, then cast
    like x, because the text syntax takes float16 literals only as raw bits)."""
    return model(f"""
        scale ({dtype}[2, 3] x) => ({dtype}[2, 3] y) {{
            k32 = Constant <value = float {{1.5}}> ()
            e32 = Constant <value = float {{{extra!r}}}> ()
            k = CastLike(k32, x)
            e = CastLike(e32, x)
            t = Mul(x, k)
            y = Add(t, e)
        }}""")


def failing(result: VerifyResult) -> list[str]:
    return [check.name for check in result.outputs if not check.ok]


# --- identical and perturbed models --------------------------------------------------------

def test_identical_models_pass_with_zero_error():
    m = scale_model()
    result = verify(m, m)
    assert result.ok
    assert result.reason is None
    assert [c.name for c in result.outputs] == ["y"]
    check = result.outputs[0]
    assert (check.dtype, check.shape) == ("float32", (2, 3))
    assert check.max_abs_error == 0.0
    assert result.input_shapes == {"x": (2, 3)}
    assert "PASS" in result.summary() and "FAIL" not in result.summary()


def test_adding_1e_2_to_the_output_fails_and_names_it():
    result = verify(scale_model(), scale_model(extra=1e-2))
    assert not result.ok
    assert failing(result) == ["y"]
    check = result.outputs[0]
    assert check.max_abs_error == pytest.approx(1e-2, rel=1e-3)
    assert "6 of 6 elements out of tolerance, worst at [" in check.reason
    assert "np.int64" not in check.reason  # indices read as plain numbers
    summary = result.summary()
    assert "FAIL" in summary and "y" in summary and "out of tolerance" in summary


def test_a_change_within_tolerance_passes_but_is_measured():
    result = verify(scale_model(), scale_model(extra=1e-6))
    assert result.ok
    assert result.outputs[0].max_abs_error == pytest.approx(1e-6, rel=0.2)


def test_user_tolerances_override_the_defaults_and_atol_is_absolute():
    strict = verify(scale_model(), scale_model(extra=1e-6), rtol=0.0, atol=1e-7)
    assert not strict.ok
    assert (strict.outputs[0].rtol, strict.outputs[0].atol) == (0.0, 1e-7)
    loose = verify(scale_model(), scale_model(extra=1e-2), rtol=0.0, atol=2e-2)
    assert loose.ok


def test_default_atol_follows_the_output_magnitude():
    # |x| of a few units times 1000: the scaled atol is 1e-4 * max|ref|, not 1e-4.
    big = model("""
        big (float[4, 4] x) => (float[4, 4] y) {
            k = Constant <value = float {1000.0}> ()
            y = Mul(x, k)
        }""")
    check = verify(big, big).outputs[0]
    assert check.atol > 1e-2
    assert check.rtol == 1e-3


# --- dtypes --------------------------------------------------------------------------------

def test_float16_outputs_get_float16_tolerances():
    ref, cand = scale_model(dtype="float16"), scale_model(extra=5e-3, dtype="float16")
    result = verify(ref, cand)
    assert result.ok
    check = result.outputs[0]
    assert check.dtype == "float16"
    assert check.rtol == 2e-2 and check.atol >= 2e-2
    assert check.max_abs_error > 1e-3  # the change is real; the tolerance absorbs it
    # The same change breaks a float32 model.
    assert not verify(scale_model(), scale_model(extra=5e-3)).ok


def test_bfloat16_inputs_and_outputs_are_supported():
    text = """
        bf (bfloat16[2, 3] x) => (bfloat16[2, 3] y) {{
            f = Cast <to = 1> (x)
            e = Constant <value = float {{{extra}}}> ()
            g = Add(f, e)
            y = Cast <to = 16> (g)
        }}"""
    ref, cand, off = (model(text.format(extra=v)) for v in ("0.0", "0.004", "0.5"))
    inputs = random_inputs(ref)
    assert inputs["x"].dtype == ml_dtypes.bfloat16
    result = verify(ref, cand)
    assert result.ok and result.outputs[0].dtype == "bfloat16"
    assert result.outputs[0].rtol == 2e-2
    assert failing(verify(ref, off)) == ["y"]


def test_integer_outputs_compare_exactly_whatever_the_tolerance():
    text = """
        ints (int64[2, 3] x) => (int64[2, 3] y) {{
            k = Constant <value = int64 {{{k}}}> ()
            y = Add(x, k)
        }}"""
    ref, cand = model(text.format(k=1)), model(text.format(k=2))
    assert verify(ref, ref).outputs[0].rtol == 0.0
    result = verify(ref, cand, rtol=10.0, atol=10.0)
    assert not result.ok
    check = result.outputs[0]
    assert (check.rtol, check.atol) == (0.0, 0.0)
    assert check.max_abs_error == 1.0
    assert "6 of 6 elements differ (exact comparison)" in check.reason
    assert "np.int64" not in check.reason


def test_a_different_output_dtype_fails():
    as_half = model("""
        half (float[2, 3] x) => (float16[2, 3] y) {
            k = Constant <value = float {1.5}> ()
            t = Mul(x, k)
            y = Cast <to = 10> (t)
        }""")
    result = verify(scale_model(), as_half)
    assert failing(result) == ["y"]
    assert "dtype differs" in result.outputs[0].reason


def test_a_different_output_shape_fails():
    flat = model("""
        flat (float[2, 3] x) => (float[6] y) {
            k = Constant <value = float {1.5}> ()
            t = Mul(x, k)
            s = Constant <value = int64[1] {6}> ()
            y = Reshape(t, s)
        }""")
    result = verify(scale_model(), flat)
    assert failing(result) == ["y"]
    assert "shape differs" in result.outputs[0].reason


def test_default_tolerances_table():
    assert default_tolerances(np.float32) == (1e-3, 1e-4)
    assert default_tolerances("float64") == (1e-3, 1e-4)
    assert default_tolerances(np.float16) == (2e-2, 2e-2)
    assert default_tolerances(ml_dtypes.bfloat16) == (2e-2, 2e-2)
    assert default_tolerances(onnx.TensorProto.FLOAT16) == (2e-2, 2e-2)
    assert default_tolerances(np.int64) == (0.0, 0.0)
    assert default_tolerances(np.bool_) == (0.0, 0.0)


# --- NaN and inf ---------------------------------------------------------------------------

SQRT = """
    root (float[2, 3] x) => (float[2, 3] y) {
        y = Sqrt(x)
    }"""
SQRT_OF_RELU = """
    root (float[2, 3] x) => (float[2, 3] y) {
        r = Relu(x)
        y = Sqrt(r)
    }"""


def test_nan_at_the_same_places_counts_as_equal():
    m = model(SQRT)
    x = np.array([[-1, 4, 9], [1, -2, 0]], np.float32)
    assert np.isnan(run_model(m, {"x": x})["y"]).any()
    assert verify(m, m, inputs={"x": x}).ok


def test_nan_in_one_model_only_fails_with_reason():
    x = np.array([[-1, 4, 9], [1, -2, 0]], np.float32)
    result = verify(model(SQRT), model(SQRT_OF_RELU), inputs={"x": x})
    assert not result.ok
    assert "NaN mismatch at 2 of 6 elements" in result.outputs[0].reason


def test_inf_mismatch_fails_and_equal_infinities_pass():
    recip = model("""
        recip (float[3] x) => (float[3] y) {
            y = Reciprocal(x)
        }""")
    clipped = model("""
        recip (float[3] x) => (float[3] y) {
            r = Reciprocal(x)
            lo = Constant <value = float {-1e6}> ()
            hi = Constant <value = float {1e6}> ()
            y = Clip(r, lo, hi)
        }""")
    x = {"x": np.array([0.0, 2.0, 4.0], np.float32)}
    assert verify(recip, recip, inputs=x).ok
    result = verify(recip, clipped, inputs=x)
    assert not result.ok
    assert "inf mismatch" in result.outputs[0].reason


# --- random inputs -------------------------------------------------------------------------

ADD_DYNAMIC = """
    add (float[batch, n] a, float[batch, n] b) => (float[batch, n] y) {
        y = Add(a, b)
    }"""


def test_dynamic_dims_get_one_value_shared_by_all_inputs():
    m = model(ADD_DYNAMIC)
    inputs = random_inputs(m)
    assert inputs["a"].shape == inputs["b"].shape == (2, 3)
    result = verify(m, m)
    assert result.ok
    assert result.input_shapes == {"a": (2, 3), "b": (2, 3)}


def test_dims_override_the_default_sizes():
    m = model(ADD_DYNAMIC)
    assert random_inputs(m, dims={"batch": 5, "n": 7})["a"].shape == (5, 7)
    assert verify(m, m, dims={"batch": 4}).input_shapes["b"] == (4, 3)


def test_anonymous_dims_and_scalars_are_drawn():
    m = model("""
        mixed (float[?, 4] x, float s, int64 k) => (float[?, 4] y) {
            t = Mul(x, s)
            f = Cast <to = 1> (k)
            y = Add(t, f)
        }""")
    inputs = random_inputs(m)
    assert inputs["x"].shape == (2, 4)
    assert inputs["s"].shape == () and inputs["s"].dtype == np.float32
    assert inputs["k"].shape == () and inputs["k"].dtype == np.int64
    assert verify(m, m).ok


def test_random_inputs_are_deterministic_per_seed():
    m = model(ADD_DYNAMIC)
    first, second = random_inputs(m, seed=0), random_inputs(m, seed=0)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
    other = random_inputs(m, seed=1)
    assert not np.array_equal(first["a"], other["a"])


def test_random_floats_are_standard_normal_and_bools_random():
    m = model("""
        draws (float[100, 100] x, bool[1000] b) => (float[100, 100] y, bool[1000] c) {
            y = Identity(x)
            c = Identity(b)
        }""")
    inputs = random_inputs(m)
    assert abs(float(inputs["x"].mean())) < 0.05
    assert 0.9 < float(inputs["x"].std()) < 1.1
    assert inputs["b"].dtype == np.bool_ and 300 < int(inputs["b"].sum()) < 700


def embedding(rows: int, ids_type: str = "int64", through_cast: bool = False) -> onnx.ModelProto:
    """An Embedding: Gather of a [rows, 4] initializer at the input ids (optionally after a Cast
    and an Unsqueeze, which do not change index values)."""
    table = ", ".join(str(float(i)) for i in range(rows * 4))
    indices = "ids"
    prelude = ""
    if through_cast:
        prelude = """
            c = Cast <to = 7> (ids)
            axes = Constant <value = int64[1] {0}> ()
            u = Unsqueeze(c, axes)"""
        indices = "u"
    out_shape = "[1, batch, seq, 4]" if through_cast else "[batch, seq, 4]"
    return model(f"""
        embed ({ids_type}[batch, seq] ids) => (float{out_shape} y)
        <float[{rows}, 4] table = {{{table}}}> {{{prelude}
            y = Gather <axis = 0> (table, {indices})
        }}""")


def test_ids_feeding_a_gather_stay_in_the_table_range():
    # Default integer draws are in [0, 4); a table of 3 rows would make ORT raise.
    small = embedding(rows=3)
    ids = random_inputs(small)["ids"]
    assert ids.min() >= 0 and ids.max() < 3
    assert verify(small, small).ok


def test_ids_use_the_whole_table_range():
    large = embedding(rows=1000)
    ids = random_inputs(large, dims={"batch": 4, "seq": 8})["ids"]
    assert ids.max() >= 4 and ids.max() < 1000


def test_gather_heuristic_follows_casts_and_unsqueezes():
    m = embedding(rows=3, ids_type="int32", through_cast=True)
    ids = random_inputs(m, dims={"batch": 4, "seq": 8})["ids"]
    assert ids.dtype == np.int32 and ids.max() < 3
    assert verify(m, m).ok


def test_masks_hold_both_values_and_positions_count_along_the_last_axis():
    m = model("""
        named (int64[batch, seq] attention_mask, int64[batch, seq] position_ids, int64[batch, seq] other)
            => (int64[batch, seq] y) {
            s = Add(attention_mask, position_ids)
            y = Add(s, other)
        }""")
    inputs = random_inputs(m, dims={"batch": 2, "seq": 5})
    mask = inputs["attention_mask"]
    # Every row keeps its first position (never fully masked) and masks its last.
    np.testing.assert_array_equal(mask[:, 0], [1, 1])
    np.testing.assert_array_equal(mask[:, -1], [0, 0])
    assert set(np.unique(mask)) == {0, 1}
    np.testing.assert_array_equal(inputs["position_ids"], [[0, 1, 2, 3, 4]] * 2)
    assert inputs["other"].min() >= 0 and inputs["other"].max() < 4


# --- given inputs --------------------------------------------------------------------------

def test_npz_inputs_are_used_verbatim_and_extra_keys_ignored(tmp_path):
    m = model(ADD_DYNAMIC)
    a = np.arange(14, dtype=np.float32).reshape(2, 7)
    b = np.full((2, 7), 0.5, np.float32)
    path = tmp_path / "inputs.npz"
    np.savez(path, a=a, b=b, **{"ref:y": a + b})
    loaded = load_inputs(path)
    assert set(loaded) == {"a", "b", "ref:y"}
    np.testing.assert_array_equal(run_model(m, loaded)["y"], a + b)
    result = verify(m, m, inputs=path)
    assert result.ok
    assert result.input_shapes == {"a": (2, 7), "b": (2, 7)}


def test_both_models_get_exactly_the_given_arrays():
    # A candidate that ignores b matches the reference only where b is zero.
    ignores_b = model("""
        add (float[batch, n] a, float[batch, n] b) => (float[batch, n] y) {
            z = Sub(b, b)
            t = Add(a, z)
            y = Identity(t)
        }""")
    a = np.ones((2, 3), np.float32)
    assert verify(model(ADD_DYNAMIC), ignores_b, inputs={"a": a, "b": np.zeros_like(a)}).ok
    assert not verify(model(ADD_DYNAMIC), ignores_b, inputs={"a": a, "b": a}).ok


def test_missing_inputs_raise_input_error_naming_them(tmp_path):
    path = tmp_path / "partial.npz"
    np.savez(path, a=np.ones((2, 3), np.float32))
    m = model(ADD_DYNAMIC)
    with pytest.raises(InputError, match="'b'"):
        verify(m, m, inputs=path)
    with pytest.raises(InputError, match="'b'"):
        verify(m, m, inputs={"a": np.ones((2, 3), np.float32)})


def test_unreadable_inputs_file_is_an_input_error(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(InputError, match="garbage.npz"):
        load_inputs(garbage)
    with pytest.raises(InputError, match="no such"):
        load_inputs(tmp_path / "absent.npz")


# --- structural differences ----------------------------------------------------------------

TWO_OUTPUTS = """
    two (float[2, 3] x) => (float[2, 3] y, float[2, 3] z) {
        y = Relu(x)
        z = Neg(x)
    }"""


def test_a_different_output_count_fails():
    one = model("""
        one (float[2, 3] x) => (float[2, 3] y) {
            y = Relu(x)
        }""")
    result = verify(model(TWO_OUTPUTS), one)
    assert not result.ok
    assert "output count differs" in result.reason
    by_name = {check.name: check for check in result.outputs}
    assert by_name["y"].ok
    assert not by_name["z"].ok and "missing" in by_name["z"].reason
    assert "output count differs" in result.summary()


def test_an_extra_candidate_output_fails_even_if_the_shared_ones_match():
    one = model("""
        one (float[2, 3] x) => (float[2, 3] y) {
            y = Relu(x)
        }""")
    result = verify(one, model(TWO_OUTPUTS))
    assert [check.ok for check in result.outputs] == [True]
    assert not result.ok
    assert "reference has 1 (y), candidate has 2 (y, z)" in result.reason


def test_renamed_outputs_are_matched_by_position_and_said_so():
    renamed = model("""
        two (float[2, 3] x) => (float[2, 3] p, float[2, 3] q) {
            p = Relu(x)
            q = Neg(x)
        }""")
    result = verify(model(TWO_OUTPUTS), renamed)
    assert result.ok
    assert [c.name for c in result.outputs] == ["y", "z"]
    assert "matched by position to candidate output 'p'" in result.outputs[0].reason
    swapped = model("""
        two (float[2, 3] x) => (float[2, 3] p, float[2, 3] q) {
            q = Relu(x)
            p = Neg(x)
        }""")
    assert failing(verify(model(TWO_OUTPUTS), swapped)) == ["y", "z"]


def test_a_candidate_with_different_inputs_fails_with_reason():
    extra = model("""
        scale (float[2, 3] x, float[2, 3] w) => (float[2, 3] y) {
            y = Add(x, w)
        }""")
    result = verify(scale_model(), extra)
    assert not result.ok
    assert "inputs differ" in result.reason and "'w'" in result.reason


def test_a_candidate_that_cannot_load_fails_without_raising(tmp_path):
    unknown_op = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("NoSuchOp", ["x"], ["y"])], "broken",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])]),
        opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)
    result = verify(scale_model(), unknown_op)
    assert not result.ok and result.outputs == []
    assert result.reason.startswith("candidate does not load in ONNX Runtime")
    assert "NoSuchOp" in result.reason
    assert "\n" not in result.reason
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage")
    assert not verify(scale_model(), corrupt).ok
    assert "no such file" in verify(scale_model(), tmp_path / "absent.onnx").reason


def test_a_candidate_that_fails_at_run_time_fails_without_raising():
    bad_reshape = model("""
        scale (float[2, 3] x) => (float[2, 3] y) {
            s = Constant <value = int64[2] {4, 4}> ()
            y = Reshape(x, s)
        }""")
    result = verify(scale_model(), bad_reshape)
    assert not result.ok
    assert result.reason.startswith("candidate fails in ONNX Runtime")


def test_a_reference_that_cannot_run_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="reference model .*absent.onnx"):
        verify(tmp_path / "absent.onnx", scale_model())
    always_fails = model("""
        scale (float[batch, 3] x) => (float[batch, 3] y) {
            s = Constant <value = int64[2] {4, 4}> ()
            y = Reshape(x, s)
        }""")
    # Every input set fails, fallbacks included: nothing was verified, so it is an error.
    with pytest.raises(InputError, match="reference model .* fails in ONNX Runtime on every "
                                         "input set drawn .*'distinct'.*'legacy'"):
        verify(always_fails, always_fails)


# --- models on disk and large models -------------------------------------------------------

def weighted(offset: float = 0.0) -> onnx.ModelProto:
    """y = x @ W + offset with a [16, 32] float initializer (2 KiB: goes to external data)."""
    w = onnx.numpy_helper.from_array(
        np.linspace(-1, 1, 16 * 32, dtype=np.float32).reshape(16, 32), "W")
    o = onnx.numpy_helper.from_array(np.array(offset, np.float32), "o")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "W"], ["t"]),
         onnx.helper.make_node("Add", ["t", "o"], ["y"])], "weighted",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 32])],
        [w, o])
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=10)


def test_models_given_as_paths_verify(tmp_path):
    ref_path = xio.save(weighted(), tmp_path / "ref.onnx")
    cand_path = xio.save(weighted(offset=1.0), tmp_path / "cand.onnx")
    assert verify(ref_path, str(ref_path)).ok
    assert failing(verify(ref_path, cand_path)) == ["y"]
    assert random_inputs(ref_path)["x"].shape == (2, 16)


def test_models_too_big_for_one_protobuf_go_through_external_data(monkeypatch):
    saved = []
    real_save = xio.save

    def spy_save(model, path, **kwargs):
        written = real_save(model, path, **kwargs)
        saved.append((kwargs.get("external_data"), written.with_name(written.name + ".data")
                      .is_file()))
        return written

    monkeypatch.setattr(xio, "PROTOBUF_LIMIT", 1024)
    monkeypatch.setattr(xio, "save", spy_save)
    assert verify(weighted(), weighted()).ok
    assert saved == [(True, True), (True, True)]  # reference and candidate, each with its data
    assert failing(verify(weighted(), weighted(offset=1.0))) == ["y"]


def test_sessions_run_on_cpu_with_graph_optimizations_off(monkeypatch):
    import onnxruntime as ort

    seen = []
    real_session = ort.InferenceSession

    def spy_session(source, options, **kwargs):
        seen.append((type(source), options.graph_optimization_level, kwargs["providers"]))
        return real_session(source, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy_session)
    assert verify(weighted(), weighted()).ok
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    # Small in-memory models go to ORT as serialized bytes, not through a file.
    assert seen == [(bytes, off, ["CPUExecutionProvider"])] * 2


# --- reports -------------------------------------------------------------------------------

def test_results_serialise_to_json_and_summarise_one_line_per_output():
    result = verify(model(TWO_OUTPUTS), model(TWO_OUTPUTS))
    data = json.loads(json.dumps(result.to_dict()))
    assert data["ok"] is True
    assert [o["name"] for o in data["outputs"]] == ["y", "z"]
    assert data["outputs"][0]["shape"] == [2, 3]
    assert data["input_shapes"] == {"x": [2, 3]}
    lines = result.summary().splitlines()
    assert lines[0] == "verify: PASS"
    assert [line.split()[0] for line in lines[-2:]] == ["y", "z"]
    assert all(line.rstrip().endswith("PASS") for line in lines[-2:])


def test_errors_stay_finite_where_the_reference_is_zero():
    zero = model("""
        zero (float[2, 3] x) => (float[2, 3] y) {
            y = Sub(x, x)
        }""")
    far = model("""
        zero (float[2, 3] x) => (float[2, 3] y) {
            t = Sub(x, x)
            k = Constant <value = float {100.0}> ()
            y = Add(t, k)
        }""")
    result = verify(zero, far)
    check = result.outputs[0]
    assert not check.ok
    assert check.max_abs_error == 100.0
    assert np.isfinite(check.max_rel_error) and check.max_rel_error > 1e30
    json.dumps(result.to_dict(), allow_nan=False)  # strict JSON: no inf or NaN


def test_output_check_to_dict_keeps_every_field():
    check = OutputCheck("y", "float32", (2, 3), 0.5, 0.25, 1e-3, 1e-4, False, "bad")
    assert check.to_dict() == {
        "name": "y", "dtype": "float32", "shape": [2, 3], "max_abs_error": 0.5,
        "max_rel_error": 0.25, "rtol": 1e-3, "atol": 1e-4, "ok": False, "reason": "bad",
        "input_set": None,
    }


def _widened(dtype: int, offset: float, identities: int = 20) -> onnx.ModelProto:
    """``Cast(x + 1 + offset, to=float32)`` computed in ``dtype``, then Identities and a
    float32 MatMul: a float32 output computed from a ``dtype`` value."""
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    one = onnx.numpy_helper.from_array(np.array([1.0 + offset], np_dtype), "one")
    chain = [onnx.helper.make_node("Identity", [f"id{i}"], [f"id{i + 1}" if i + 1 < identities
                                                            else "y"])
             for i in range(identities)]
    dense = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "dense")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["x", "one"], ["sum"]),
         onnx.helper.make_node("Cast", ["sum"], ["id0"], to=onnx.TensorProto.FLOAT), *chain[:-1],
         onnx.helper.make_node("MatMul", [chain[-1].input[0], "dense"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", dtype, [4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4])], [one, dense])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])


def test_an_output_widened_from_fp16_is_judged_at_fp16_precision():
    inputs = {"x": np.zeros(4, np.float16)}
    # Four fp16 ulps at 1.0: within what an fp16 computation can promise.
    assert verify(_widened(onnx.TensorProto.FLOAT16, 0.0),
                  _widened(onnx.TensorProto.FLOAT16, 2.0**-8), inputs=inputs).ok
    # The same difference in a float32 computation is a real change.
    inputs = {"x": np.zeros(4, np.float32)}
    assert not verify(_widened(onnx.TensorProto.FLOAT, 0.0),
                      _widened(onnx.TensorProto.FLOAT, 2.0**-8), inputs=inputs).ok


# --- tolerances ----------------------------------------------------------------------------

@pytest.mark.parametrize("tolerances", [
    {"rtol": float("nan")}, {"atol": float("nan")}, {"rtol": float("inf")},
    {"atol": -1e-3}, {"rtol": -0.5}, {"atol": "tight"},
])
def test_nan_infinite_or_negative_tolerances_are_refused(tolerances):
    # NaN compares false with everything, so a NaN tolerance used to pass a wrong candidate.
    with pytest.raises(InputError, match="tolerance must be a finite number >= 0|must be a"):
        verify(scale_model(), scale_model(extra=1.0), **tolerances)
    with pytest.raises(InputError):
        assert_equivalent(scale_model(), scale_model(extra=1.0), **tolerances)


def test_assert_equivalent_checks_every_input_set_of_verify():
    # Wrong only at a sequence length of 1: the decode-step set catches it, and says so.
    from . import test_verify_mutations as mutations

    with pytest.raises(AssertionError, match="input set 'decode-step'.*FAIL"):
        assert_equivalent(mutations.reference(), mutations.when_dim_is_one("x", 1))
    assert_equivalent(mutations.reference(), mutations.correct_rewrite())


@pytest.mark.parametrize("flag, value", [("--rtol", "nan"), ("--atol", "nan"),
                                         ("--rtol", "-1"), ("--atol", "inf")])
def test_cli_verify_refuses_bad_tolerances_with_exit_2(tmp_path, capsys, flag, value):
    ref = xio.save(scale_model(), tmp_path / "ref.onnx")
    cand = xio.save(scale_model(extra=1.0), tmp_path / "cand.onnx")
    assert main(["verify", str(ref), str(cand), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xattn-compiler: error: ")
    assert flag.lstrip("-") in err[0]


# --- input sets ----------------------------------------------------------------------------

def test_three_input_sets_by_default_each_reported_with_its_dims():
    m = model(ADD_DYNAMIC)
    result = verify(m, m)
    assert result.num_input_sets == 3
    assert [(r.name, r.dims, r.status) for r in result.input_sets] == [
        ("distinct", {"batch": 2, "n": 3}, "passed"),
        ("decode-step", {"batch": 1, "n": 1}, "passed"),
        ("reversed", {"batch": 3, "n": 4}, "passed")]
    assert result.input_sets[2].input_shapes == {"a": (3, 4), "b": (3, 4)}
    assert "input set 'decode-step': batch=1 n=1: PASS" in result.summary()
    assert json.loads(json.dumps(result.to_dict()))["num_input_sets"] == 3


def test_the_quick_profile_and_given_inputs_run_one_set():
    m = model(ADD_DYNAMIC)
    assert [r.name for r in verify(m, m, profile="quick").input_sets] == ["distinct"]
    given = {"a": np.ones((2, 2), np.float32), "b": np.ones((2, 2), np.float32)}
    result = verify(m, m, inputs=given)
    assert [(r.name, r.dims) for r in result.input_sets] == [("given", {})]
    with pytest.raises(InputError, match="unknown verification profile"):
        verify(m, m, profile="fast")


def test_dims_that_must_agree_fall_back_and_the_skip_is_reported():
    # n and m are different names for what must be one size: the distinct sizes cannot run.
    m = model("""
        add (float[batch, n] a, float[batch, m] b) => (float[batch, n] y) {
            y = Add(a, b)
        }""")
    result = verify(m, m)
    assert result.ok
    statuses = [(r.name, r.replaces, r.status) for r in result.input_sets]
    assert statuses == [("distinct", None, "skipped"), ("legacy", "distinct", "passed"),
                        ("decode-step", None, "passed"),
                        ("reversed", None, "skipped"), ("uniform", "reversed", "passed")]
    assert "the reference fails" in result.input_sets[0].reason
    assert "input set 'legacy' (in place of 'distinct')" in result.summary()


def test_dims_named_by_an_expression_take_its_value():
    # An exporter's cache mask: one more position than the past (a zero column appended).
    m = model("""
        grow (float[batch, past] a, float[batch, "past + 1"] b) => (float[batch, "past + 1"] y) {
            zero = Constant <value = float[1, 1] {0.0}> ()
            rows = Shape <end = 1> (a)
            one = Constant <value = int64[1] {1}> ()
            column = Concat <axis = 0> (rows, one)
            pad = Expand(zero, column)
            c = Concat <axis = 1> (a, pad)
            y = Add(c, b)
        }""")
    result = verify(m, m)
    assert [r.status for r in result.input_sets] == ["passed"] * 3
    distinct = result.input_sets[0]
    assert distinct.dims == {"batch": 2, "past": 3, "past + 1": 4}
    assert distinct.input_shapes["b"] == (2, 4)


def test_single_booleans_are_drawn_both_ways_and_arrays_hold_both():
    m = model("""
        flags (bool flag, bool[batch, n] bits) => (bool[batch, n] y) {
            y = And(flag, bits)
        }""")
    sets = [choices[0].feeds for choices in input_sets(m)]
    assert {bool(feeds["flag"]) for feeds in sets} == {True, False}
    for feeds in sets:
        if feeds["bits"].size > 1:
            assert set(np.unique(feeds["bits"])) == {False, True}


def test_ids_cover_the_first_and_last_rows_of_the_table():
    m = embedding(rows=1000)
    sets = [choices[0].feeds["ids"] for choices in input_sets(m)]
    assert [ids.shape for ids in sets] == [(2, 3), (1, 1), (3, 4)]
    for ids in sets[0], sets[2]:
        assert ids.min() == 0 and ids.max() == 999


def test_the_spread_set_reaches_small_and_large_magnitudes_of_both_signs():
    m = model("""
        draws (float[batch, n] x, float16[batch, n] h, int64[batch, n] k) => (float[batch, n] y) {
            y = Identity(x)
        }""")
    spread = input_sets(m)[2][0]
    assert spread.name == "reversed"
    x, h = spread.feeds["x"], spread.feeds["h"].astype(np.float32)
    assert x.max() == 8.0 and x.min() == -8.0 and np.abs(x).min() < 0.5
    assert h.max() == 4.0 and h.min() == -4.0  # half precision: a smaller spread
    assert spread.feeds["k"].max() == 15  # beyond the [0, 4) of the other sets
    assert input_sets(m)[0][0].feeds["k"].max() < 4


# --- .npz inputs that cannot be trusted ------------------------------------------------------

def _cli_verify_with(tmp_path, capsys, npz, m=None) -> str:
    ref = xio.save(m if m is not None else scale_model(), tmp_path / "ref.onnx")
    assert main(["verify", str(ref), str(ref), "--inputs", str(npz)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("xattn-compiler: error: "), err
    return err[0]


def test_npz_object_array_is_refused_naming_the_member(tmp_path, capsys):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(InputError, match=r"objects.npz: member 'x.npy' is an array of Python "
                                         r"objects"):
        load_inputs(path)
    assert "member 'x.npy'" in _cli_verify_with(tmp_path, capsys, path)


def test_npz_corrupt_member_is_refused_naming_the_member(tmp_path, capsys):
    path = tmp_path / "corrupt.npz"
    np.savez_compressed(path, x=np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3))
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("x.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"corrupt.npz: member 'x.npy'"):
        load_inputs(path)
    assert "corrupt.npz: member 'x.npy'" in _cli_verify_with(tmp_path, capsys, path)


def test_npz_decompression_bomb_is_refused_before_decompressing(tmp_path, capsys, monkeypatch):
    path = tmp_path / "bomb.npz"
    np.savez_compressed(path, x=np.zeros(4_000_000, np.float32))  # 16 MB in ~16 KB
    assert path.stat().st_size < 100_000

    def never(*args, **kwargs):
        raise AssertionError("a member was decompressed")

    # The model's x is [2, 3] float: 24 bytes, so the limit derives from it.
    monkeypatch.setattr(zipfile.ZipFile, "open", never)
    with pytest.raises(InputError, match=r"bomb.npz: member 'x.npy' would unpack to 16000128 "
                                         r"bytes, more than the \d+ bytes its input takes"):
        load_inputs(path, scale_model())
    # An input with open dims is held to the general cap.
    monkeypatch.setattr(vi, "MAX_MEMBER_BYTES", 1 << 20)
    with pytest.raises(InputError, match="would unpack to 16000128 bytes"):
        load_inputs(path, model(ADD_DYNAMIC.replace("a,", "x,").replace("Add(a", "Add(x")))
    with pytest.raises(InputError, match="would unpack"):
        load_inputs(path)
    monkeypatch.undo()
    assert "would unpack" in _cli_verify_with(tmp_path, capsys, path)


def test_npz_header_claiming_more_data_than_stored_is_corrupt(tmp_path):
    # A header may declare a huge shape over a few bytes; numpy would allocate the shape.
    path = tmp_path / "liar.npz"
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 3)})
    member.write(np.ones((2, 3), np.float32).tobytes())
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", member.getvalue())
    with pytest.raises(InputError, match=r"member 'x.npy' is corrupt"):
        load_inputs(path)


def test_npz_arrays_must_match_the_inputs_type_and_rank(tmp_path, capsys):
    path = tmp_path / "wrong.npz"
    np.savez(path, x=np.ones((2, 3), np.float64))
    with pytest.raises(InputError, match=r"wrong.npz: member 'x.npy': input 'x' has element "
                                         r"type float64, the model takes float32"):
        verify(scale_model(), scale_model(), inputs=path)
    assert "input 'x'" in _cli_verify_with(tmp_path, capsys, path)
    np.savez(path, x=np.ones((2, 3, 1), np.float32))
    with pytest.raises(InputError, match=r"input 'x' has rank 3 \[2, 3, 1\], the model takes "
                                         r"rank 2 \[2, 3\]"):
        verify(scale_model(), scale_model(), inputs=path)
    with pytest.raises(InputError, match=r"inputs: input 'x' has shape \[3, 3\]"):
        verify(scale_model(), scale_model(), inputs={"x": np.ones((3, 3), np.float32)})


def test_npz_members_that_are_not_inputs_are_never_read(tmp_path):
    path = tmp_path / "extra.npz"
    np.savez(path, a=np.ones((2, 3), np.float32), b=np.ones((2, 3), np.float32),
             junk=np.array([None], dtype=object))
    assert verify(model(ADD_DYNAMIC), model(ADD_DYNAMIC), inputs=path).ok


def test_npz_bfloat16_saved_by_numpy_loads_as_bfloat16(tmp_path):
    m = model("""
        bf (bfloat16[2, 3] x) => (bfloat16[2, 3] y) {
            y = Identity(x)
        }""")
    path = tmp_path / "bf.npz"
    np.savez(path, x=np.ones((2, 3), ml_dtypes.bfloat16))  # stored as raw 2-byte voids
    assert verify(m, m, inputs=path).ok


# --- candidates that are not one model -------------------------------------------------------

def test_verify_with_runs_a_runner_on_every_input_set():
    m = model(ADD_DYNAMIC)
    seen = []

    def run(feeds):
        seen.append(feeds["a"].shape)
        return {"y": feeds["a"] + feeds["b"]}

    assert verify_with(m, run).ok
    assert seen == [(2, 3), (1, 1), (3, 4)]

    def broken(feeds):
        raise CandidateError("the decoder fails: boom")

    result = verify_with(m, broken)
    assert not result.ok and result.reason == "the decoder fails: boom"
    with pytest.raises(InputError, match="rtol"):
        verify_with(m, run, rtol=float("nan"))


def test_a_scalar_input_runs_as_a_scalar():
    # Inputs went through np.ascontiguousarray, which makes a 0-d array 1-d: Shape(x) of a scalar
    # x came out [1] instead of [], so folding that Shape to an empty constant looked wrong.
    reference = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float x) => (int64[0] s) { s = Shape(x) }
    """)
    candidate = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float x) => (int64[0] s) {
            s = Constant<value = int64[0] {}>()
        }
    """)
    assert run_model(reference, {"x": np.array(3.0, np.float32)})["s"].shape == (0,)
    assert verify(reference, candidate).ok


def test_a_kv_cache_mask_spans_past_and_new_tokens():
    # A decoder with a cache only runs when the mask covers past + new tokens; drawn at
    # unrelated sizes, the reference failed on every set and `optimize --verify` exited 2 on
    # a real Llama-with-cache export.
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[batch, seq, 4] x, int64[batch, total] attention_mask,
           float[batch, past_len, 4] past) => (float[batch, seq_plus, 4] present,
                                               float[batch, total_plus] weighted) {
            present = Concat<axis = 1>(past, x)
            summed = ReduceSum<keepdims = 0>(present, axes)
            mask = Cast<to = 1>(attention_mask)
            weighted = Mul(summed, mask)
            axes = Constant<value = int64[1] {2}>()
        }
    """)
    result = verify(model, model)
    assert result.ok, result.summary()
    for input_set in result.input_sets:
        dims = input_set.dims
        assert dims["total"] == dims["past_len"] + dims["seq"]
