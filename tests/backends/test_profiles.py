"""Optimization profiles from symbolic dims: classes, shared symbols, overrides, position caps."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import xattn_compiler as xc
from xattn_compiler.backends.parts import load_parts, part_profiles
from xattn_compiler.backends.profiles import (
    DimDefaults,
    derive_profile,
    parse_dim_range,
    parse_override,
    position_limits,
)
from xattn_compiler.errors import InputError
from xattn_compiler.verification import random_inputs, run_model

from .conftest import ZOO, zoo_export

FLOAT = TensorProto.FLOAT


def two_inputs(x_dims=("batch", "seq", 8), ctx_dims=("batch", "enc_len", 8)) -> onnx.ModelProto:
    """``y = x @ ReduceMean(ctx)``-free toy: x and ctx meet in a MatMul over their last dims."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
         helper.make_node("Identity", ["ctx"], ["c"], name="keep")],
        "g",
        [helper.make_tensor_value_info("x", FLOAT, list(x_dims)),
         helper.make_tensor_value_info("ctx", FLOAT, list(ctx_dims))],
        [helper.make_tensor_value_info("y", FLOAT, None),
         helper.make_tensor_value_info("c", FLOAT, None)],
        [numpy_helper.from_array(np.ones((8, 8), np.float32), "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_shared_symbols_get_one_range_and_classes_pick_defaults():
    defaults = DimDefaults(batch=(1, 2, 4), sequence=(1, 16, 32), context=(2, 64, 128))
    profile = derive_profile(two_inputs(), defaults=defaults, context_inputs=["ctx"])
    assert profile.inputs["x"].as_tuple() == ((1, 1, 8), (2, 16, 8), (4, 32, 8))
    assert profile.inputs["ctx"].as_tuple() == ((1, 2, 8), (2, 64, 8), (4, 128, 8))
    assert profile.origins == {"batch": "default batch", "seq": "default sequence",
                               "enc_len": "default context"}


def test_an_input_override_carries_its_symbols_into_the_other_inputs():
    profile = derive_profile(two_inputs(), ["x:2x1x8:4x10x8:8x20x8"], context_inputs=[])
    assert profile.inputs["x"].as_tuple() == ((2, 1, 8), (4, 10, 8), (8, 20, 8))
    assert [s[0] for s in profile.inputs["ctx"].as_tuple()] == [2, 4, 8]    # batch followed
    assert profile.origins["batch"] == "--profile x"


def test_a_dim_override_applies_everywhere_and_loses_to_an_input_override():
    profile = derive_profile(two_inputs(), ["x:1x1x8:1x1x8:1x1x8"],
                             {"enc_len": (1500, 1500, 1500), "batch": (1, 4, 16)})
    assert profile.inputs["ctx"].as_tuple() == ((1, 1500, 8),) * 3
    assert profile.symbols["enc_len"] == (1500, 1500, 1500)


def test_conflicting_overrides_name_the_symbol_and_both_inputs():
    with pytest.raises(InputError, match=r"ctx: dim 'batch'.*--profile x"):
        derive_profile(two_inputs(), ["x:1x1x8:1x1x8:1x1x8", "ctx:2x1x8:2x1x8:2x1x8"])


@pytest.mark.parametrize("override, message", [
    ("x:1x1:1x1:1x1", "rank 2 but the input has rank 3"),
    ("x:1x1x4:1x1x4:1x1x4", "axis 2 is fixed at 8"),
    ("nope:1:1:1", "not an input of the model"),
    ("x:1x9x8:1x2x8:1x3x8", "MIN <= OPT <= MAX"),
    ("x:1x1x8:1x1:1x1x8", "different ranks"),
    ("x:1xax8:1x1x8:1x1x8", "not dims joined by 'x'"),
    ("x:1x1x8", "expected NAME:MIN:OPT:MAX"),
])
def test_bad_overrides_are_input_errors_naming_the_input(override, message):
    with pytest.raises(InputError, match=message):
        derive_profile(two_inputs(), [override])


def test_an_input_name_may_contain_colons():
    parsed = parse_override("input:0:1x2:1x4:1x8")
    assert (parsed.name, parsed.max) == ("input:0", (1, 8))


@pytest.mark.parametrize("text", ["enc_len", "enc_len=1:2", "enc_len=3:2:1", "=1:1:1"])
def test_bad_dim_ranges_are_input_errors(text):
    with pytest.raises(InputError):
        parse_dim_range(text)


def test_unnamed_dynamic_dims_are_their_own_symbols():
    profile = derive_profile(two_inputs(x_dims=(None, None, 8), ctx_dims=(3, 5, 8)),
                             defaults=DimDefaults(batch=(1, 1, 2), sequence=(1, 7, 9)))
    assert profile.inputs["x"].as_tuple() == ((1, 1, 8), (1, 7, 8), (2, 9, 8))
    assert "ctx" not in profile.inputs          # fully static: no profile entry needed


def position_model(rows: int = 10, offset: int = 2) -> onnx.ModelProto:
    """positions = Range(0, seq) + offset; y = x + table[positions] (BART's learned positions)."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Gather", ["shape", "one"], ["seq"], name="seq_len", axis=0),
        helper.make_node("Range", ["zero", "seq", "step"], ["positions"], name="range"),
        helper.make_node("Add", ["positions", "offset"], ["shifted"], name="shift"),
        helper.make_node("Gather", ["table", "shifted"], ["pos"], name="position_table"),
        helper.make_node("Add", ["x", "pos"], ["y"], name="add_positions"),
    ]
    inits = [numpy_helper.from_array(np.arange(rows * 4, dtype=np.float32).reshape(rows, 4), "table"),
             numpy_helper.from_array(np.asarray(1, np.int64), "one"),
             numpy_helper.from_array(np.asarray(0, np.int64), "zero"),
             numpy_helper.from_array(np.asarray(1, np.int64), "step"),
             numpy_helper.from_array(np.asarray(offset, np.int64), "offset")]
    graph = helper.make_graph(nodes, "positions",
                              [helper.make_tensor_value_info("x", FLOAT, ["batch", "seq", 4])],
                              [helper.make_tensor_value_info("y", FLOAT, ["batch", "seq", 4])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_position_table_caps_the_default_range_and_the_cap_is_exact():
    model = position_model(rows=10, offset=2)
    assert position_limits(model) == {"seq": (8, "position_table")}
    profile = derive_profile(model)
    assert profile.symbols["seq"] == (1, 8, 8)
    assert "capped at 8 by position table 'position_table'" in profile.origins["seq"]
    run_model(model, random_inputs(model, dims={"seq": 8}))          # the cap is reachable
    with pytest.raises(Exception, match="position_table"):
        run_model(model, random_inputs(model, dims={"seq": 9}))      # and one more is not


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_profiles_cover_every_dynamic_input_and_run_at_min_opt_max(name, export_cache):
    exported = zoo_export(name, export_cache)
    model = xc.load(exported.path)
    profile = derive_profile(model)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            low, opt, high = profile.inputs[value.name].as_tuple()
            assert all(a <= b <= c for a, b, c in zip(low, opt, high, strict=True))
            for axis, dim in enumerate(dims):
                if dim.HasField("dim_value"):
                    assert low[axis] == high[axis] == dim.dim_value
    # The ranges are real shapes of this model: ONNX Runtime runs it at MIN, OPT and MAX.
    for index in range(3):
        sizes = {symbol: values[index] for symbol, values in profile.symbols.items()}
        run_model(model, random_inputs(model, dims=sizes))


def test_split_parts_share_batch_and_kv_length(export_cache, tmp_path):
    exported = zoo_export("whisper-decoder-eager", export_cache)
    xc.split_static_kv(xc.load(exported.path)).save(tmp_path)
    parts = load_parts(tmp_path)
    assert [p.name for p in parts] == ["kv_projector", "decoder"]
    projector, decoder = part_profiles(parts, ["encoder_hidden_states:1x1500x64:2x1500x64:4x1500x64"])
    assert projector.symbols["enc_len"] == decoder.symbols["enc_len"] == (1500, 1500, 1500)
    assert projector.symbols["batch"] == decoder.symbols["batch"] == (1, 2, 4)
    # The K/V inputs take the encoder length on their sequence axis, not a default.
    key = decoder.inputs["cross_kv.0.key"]
    assert key.min == (1, 4, 16, 1500) and key.max == (4, 4, 16, 1500)
    # Without overrides, K/V length is a context dim in both parts.
    projector, decoder = part_profiles(parts)
    assert projector.origins["enc_len"].startswith("default context")
    assert decoder.symbols["enc_len"] == projector.symbols["enc_len"]


def test_split_overrides_must_name_an_input_of_some_part(export_cache, tmp_path):
    exported = zoo_export("whisper-decoder-eager", export_cache)
    xc.split_static_kv(xc.load(exported.path)).save(tmp_path)
    with pytest.raises(InputError, match="no part has"):
        part_profiles(load_parts(tmp_path), ["encoder_states:1x1x64:1x1x64:1x1x64"])
