"""Specification of ``xattn_compiler.verification``: numerical proof of a rewrite with ONNX Runtime."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import onnx
import onnx.parser
import pytest

import xattn_compiler.io as xio
from xattn_compiler.errors import InputError
from xattn_compiler.verification import (
    OutputCheck,
    VerifyResult,
    default_tolerances,
    load_inputs,
    random_inputs,
    run_model,
    verify,
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


def test_masks_are_ones_and_positions_count_along_the_last_axis():
    m = model("""
        named (int64[batch, seq] attention_mask, int64[batch, seq] position_ids, int64[batch, seq] other)
            => (int64[batch, seq] y) {
            s = Add(attention_mask, position_ids)
            y = Add(s, other)
        }""")
    inputs = random_inputs(m, dims={"batch": 2, "seq": 5})
    np.testing.assert_array_equal(inputs["attention_mask"], np.ones((2, 5), np.int64))
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
    wrong_dtype = {"x": np.ones((2, 3), np.float64)}
    with pytest.raises(InputError, match="reference model"):
        verify(scale_model(), scale_model(), inputs=wrong_dtype)


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
