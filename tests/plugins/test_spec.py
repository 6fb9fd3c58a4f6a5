"""Plugin specs: the presets, TOML/JSON loading, and errors that name the file and field."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from xattn_compiler.errors import InputError
from xattn_compiler.plugins import FMHA_V2, FMHCA, PluginSpecError, load_spec, spec_from_dict

SPECS = Path(__file__).parent / "specs"


def test_fmhca_preset_is_the_tensorrt_85_cross_attention_plugin():
    assert (FMHCA.op, FMHCA.version, FMHCA.layout, FMHCA.kinds) == ("fMHCA", "1", "q_kv_packed",
                                                                    ("cross",))
    assert FMHCA.inputs == ("q_BSNH", "kv_BSN2H")
    assert FMHCA.constraints.dtypes == ("float16",)
    assert FMHCA.constraints.head_size_problem(64) is None
    assert "below 33" in FMHCA.constraints.head_size_problem(16)
    assert "above 256" in FMHCA.constraints.head_size_problem(320)


def test_fmha_v2_preset_packs_qkv_and_lists_its_head_sizes():
    assert (FMHA_V2.op, FMHA_V2.layout, FMHA_V2.kinds) == ("fMHA_V2", "qkv_packed", ("self",))
    assert FMHA_V2.constraints.head_size_problem(40) is None
    assert "not one of" in FMHA_V2.constraints.head_size_problem(48)


def test_toml_spec_loads_with_layout_attributes_and_constraints():
    spec = load_spec(SPECS / "acme_cross.toml")
    assert (spec.op, spec.version, spec.namespace, spec.domain) == (
        "AcmeCrossAttention", "2", "acme", "trt.plugins")
    assert (spec.layout, spec.output_layout, spec.kinds, spec.scale) == (
        "separate_bnsh", "BNSH", ("cross",), "attribute")
    attrs = spec.node_attributes({"num_heads": 4, "scale": 0.25})
    assert attrs == {"num_heads": 4, "softmax_scale": 0.25, "use_tensor_cores": 1,
                     "plugin_version": "2", "plugin_namespace": "acme"}
    assert spec.constraints.head_sizes == (8, 16)


def test_json_spec_round_trips_through_to_dict(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(load_spec(SPECS / "acme_cross.toml").to_dict()))
    assert load_spec(path) == load_spec(SPECS / "acme_cross.toml")
    assert spec_from_dict(FMHCA.to_dict()) == FMHCA


def test_scale_defaults_to_the_kernels_own_when_no_attribute_carries_it():
    spec = spec_from_dict({"op": "P", "layout": "separate_bsnh"})
    assert spec.scale == "inverse_sqrt_head_dim"
    assert spec.facts_from_attributes({}, head_dim=16)["scale"] == 0.25


@pytest.mark.parametrize(("table", "field", "words"), [
    ({}, "op", "missing"),
    ({"op": "P", "layuot": "qkv_packed"}, "layuot", "unknown field"),
    ({"op": "P", "layout": "packed"}, "layout", "not one of"),
    ({"op": "P", "layout": "qkv_packed", "kinds": ["cross"]}, "kinds", "self-attention"),
    ({"op": "P", "attributes": {"heads": "heads"}}, "attributes.heads", "not a block fact"),
    ({"op": "P", "attributes": {"plugin_version": {"value": "3"}}}, "attributes.plugin_version",
     "do not map it"),
    ({"op": "P", "constraints": {"dtypes": ["fp16"]}}, "constraints.dtypes", "float16"),
    ({"op": "P", "constraints": {"head_sizes": [64, -1]}}, "constraints.head_sizes", "positive"),
    ({"op": "P", "constraints": {"max_seq": 3}}, "constraints.max_seq", "unknown field"),
    ({"op": "P", "scale": "attribute"}, "scale", "needs an attribute"),
    ({"op": "P", "constraints": {"softmax_fp32": "yes"}}, "constraints.softmax_fp32",
     "true or false"),
    ({"op": "P", "mask": "bool"}, "mask", "not one of"),
    ({"op": "a b"}, "op", "not an op name"),
])
def test_bad_spec_names_the_source_and_the_field(table, field, words):
    with pytest.raises(PluginSpecError) as caught:
        spec_from_dict(table, source="my.toml")
    assert caught.value.field == field
    assert str(caught.value).startswith(f"my.toml: field '{field}':")
    assert words in str(caught.value)


def test_unreadable_and_malformed_files_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_spec(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text('op = "P\n')
    with pytest.raises(PluginSpecError, match=r"broken\.toml: .*not valid TOML"):
        load_spec(broken)
    other = tmp_path / "spec.yaml"
    other.write_text("op: P")
    with pytest.raises(PluginSpecError, match="toml or .json"):
        load_spec(other)


# --- specs recorded in a model's metadata are untrusted input -------------------------------------

def _plugin_model(path: Path, recorded: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 2, 8]) for n in "xy"]
    graph = helper.make_graph([helper.make_node("fMHA_V2", ["x"], ["y"], name="plug",
                                                domain="trt.plugins")], "g", value[:1], value[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("trt.plugins", 1)])
    model.metadata_props.add(key="xattn_compiler.plugin_specs", value=recorded)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("recorded, word", [("{not json", "not valid JSON"),
                                             ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                                             ("5", "expected a list")])
def test_hostile_recorded_specs_are_exit_2_naming_the_metadata(tmp_path, capsys, recorded, word):
    from xattn_compiler.cli import main

    model = _plugin_model(tmp_path / "m.onnx", recorded)
    assert main(["verify", str(model), str(model)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "xattn_compiler.plugin_specs" in err and word in err


def test_a_fifo_or_device_is_not_read_as_a_spec(tmp_path):
    os.mkfifo(tmp_path / "spec.json")
    for path in (tmp_path / "spec.json", Path("/dev/zero")):
        with pytest.raises(PluginSpecError, match="not a regular file"):
            load_spec(path)
