"""The TensorRT build: a clear exit 2 without TensorRT; real engines where TensorRT imports."""

from __future__ import annotations

import importlib.util

import pytest
from onnx import TensorProto, helper

import xattn_compiler as xc
from tests import models
from xattn_compiler.backends.profiles import derive_profile
from xattn_compiler.backends.tensorrt import (
    INSTALL_HINT,
    TensorRTBuildError,
    TensorRTMissing,
    build_engine,
    summarize_layers,
)
from xattn_compiler.cli import main
from xattn_compiler.errors import InputError

HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
without_tensorrt = pytest.mark.skipif(HAVE_TENSORRT, reason="TensorRT is installed here")


@without_tensorrt
def test_build_without_tensorrt_exits_2_and_says_how_to_install(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    xc.save(models.tiny_attention(), path)
    assert main(["build", str(path), "--engine", str(tmp_path / "m.plan")]) == 2
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pip install tensorrt" in err
    assert "--emit-trtexec" in err
    assert not (tmp_path / "m.plan").exists()


@without_tensorrt
def test_build_engine_raises_tensorrt_missing_an_input_error(tmp_path):
    with pytest.raises(TensorRTMissing, match="nvcr.io/nvidia/tensorrt") as raised:
        build_engine(models.tiny_attention(), engine_path=tmp_path / "m.plan")
    assert isinstance(raised.value, InputError) and INSTALL_HINT in str(raised.value)


def test_an_unknown_precision_is_refused_before_tensorrt_is_needed(tmp_path):
    with pytest.raises(InputError, match="fp8"):
        build_engine(models.tiny_attention(), precision="fp8", engine_path=tmp_path / "m.plan")


def test_layer_summaries_find_fused_attention_in_inspector_json():
    detailed = {"Layers": [
        {"Name": "q_proj", "LayerType": "Gemm", "TacticName": "sm80_xmma_gemm"},
        {"Name": "{ForeignNode[scores...context_mix]}", "LayerType": "Myelin",
         "TacticName": "_gemm_mha_v2_fp16"},
        {"Name": "attn", "LayerType": "Attention"},
    ], "Bindings": ["x", "context", "y"]}
    summary = summarize_layers(detailed)
    assert summary["layers"] == 3 and summary["bindings"] == ["x", "context", "y"]
    assert summary["attention_layers"] == ["{ForeignNode[scores...context_mix]}", "attn"]
    assert summary["layer_types"] == {"Gemm": 1, "Myelin": 1, "Attention": 1}
    names_only = summarize_layers({"Layers": ["q_proj", "fused_mha_0"]})
    assert names_only["attention_layers"] == ["fused_mha_0"]


def test_layer_summaries_read_the_tensorrt_11_inspector_json():
    """11.x: "I/O Tensors" objects instead of 10.x's "Bindings" names, and a layer tensor's
    DataType apart from its Format (sample written from the 10.x-to-11.x migration guide)."""
    info = {
        "Layers": [
            {"Name": "q_proj", "LayerType": "Gemm",
             "Inputs": [{"Name": "x", "Format": "Row major linear FP16 format (kLINEAR)",
                         "DataType": "Half", "Dimensions": [1, 4, 32]}]},
            {"Name": "attn_0_attention/attention", "LayerType": "kgen",
             "Inputs": [{"Name": "q", "Format": "Row major linear FP16 format (kLINEAR)",
                         "DataType": "Half", "Dimensions": [1, 2, 4, 16]}]},
        ],
        "I/O Tensors": [
            {"Name": "x", "IOMode": "Input", "DataType": "Half", "Dimensions": [-1, -1, 32],
             "Location": "Device", "IsShapeInferenceIO": False,
             "ProfileInfo": [{"MinShape": [1, 1, 32], "OptShape": [1, 4, 32],
                              "MaxShape": [8, 64, 32],
                              "Format": "Row major linear FP16 format (kLINEAR)"}]},
            {"Name": "y", "IOMode": "Output", "DataType": "Half", "Dimensions": [-1, -1, 32],
             "Location": "Device", "IsShapeInferenceIO": False, "ProfileInfo": []},
        ]}
    summary = summarize_layers(info)
    assert summary["bindings"] == ["x", "y"]
    assert [(t["name"], t["mode"], t["dtype"]) for t in summary["io_tensors"]] == \
        [("x", "input", "Half"), ("y", "output", "Half")]
    assert summary["io_tensors"][0]["formats"] == ["Row major linear FP16 format (kLINEAR)"]
    assert summary["attention_layers"] == ["attn_0_attention/attention"]
    assert summary["attention_types"] == {"attn_0_attention/attention": "Half"}


def test_layer_summaries_read_the_10x_format_datatype_text():
    info = {"Layers": [{"Name": "fused_mha", "LayerType": "Myelin",
                        "Inputs": [{"Name": "q", "Format/Datatype": "Row major linear FP32",
                                    "Dimensions": [1, 2, 4, 16]}]}],
            "Bindings": ["q", "y"]}
    summary = summarize_layers(info)
    assert summary["attention_types"] == {"fused_mha": "Float"}
    assert summary["bindings"] == ["q", "y"] and summary["io_tensors"] == []


@pytest.mark.parametrize("kwargs", [{"precision": "fp16"}, {"fp32_softmax": True,
                                                            "precision": "bf16"}])
def test_build_engine_refuses_precision_flags_for_tensorrt_11_before_importing_it(kwargs,
                                                                                  tmp_path):
    with pytest.raises(InputError, match="optimize"):
        build_engine(models.tiny_attention(), engine_path=tmp_path / "m.plan",
                     trt_version=(11, 5), **kwargs)


# --- real engines (only where TensorRT imports) -----------------------------------------------

@pytest.fixture
def trt():
    return pytest.importorskip("tensorrt", reason="TensorRT is not installed (its wheels come "
                               "from a download host this machine cannot reach)")


def test_a_real_engine_builds_with_the_derived_profile(trt, tmp_path):
    model = models.tiny_attention(dim=32, heads=2)
    result = build_engine(model, derive_profile(model), engine_path=tmp_path / "a.plan",
                          timing_cache=tmp_path / "t.cache")
    assert result.engine.stat().st_size > 0 and result.summary["layers"] > 0
    assert (tmp_path / "t.cache").stat().st_size > 0
    again = build_engine(model, engine_path=tmp_path / "b.plan", timing_cache=tmp_path / "t.cache")
    assert again.engine.stat().st_size > 0


def test_a_real_fp16_engine_keeps_softmax_in_fp32(trt, tmp_path):
    from xattn_compiler.backends.tensorrt import installed_version

    if installed_version(trt) >= (11, 0):
        pytest.skip("TensorRT 11 has no precision flags (the model's types decide)")
    result = build_engine(models.tiny_attention(dim=32, heads=2), precision="fp16",
                          fp32_softmax=True, engine_path=tmp_path / "a.plan")
    assert result.fp32_layers and all("softmax" in n.lower() for n in result.fp32_layers)


def test_a_real_build_marks_the_named_attention_decomposable(trt, tmp_path):
    from xattn_compiler.backends.tensorrt import installed_version

    if installed_version(trt) < (10, 14):
        pytest.skip("IAttention arrived in TensorRT 10.14")
    model = xc.optimize(models.tiny_attention(dim=32, heads=2)).model
    names = [n.name for n in model.graph.node if n.op_type == "Attention"]
    result = build_engine(model, engine_path=tmp_path / "d.plan", decomposable=names)
    assert result.engine.is_file()


def test_parser_errors_name_the_node(trt, tmp_path):
    graph = helper.make_graph([helper.make_node("Det", ["x"], ["y"], name="the_det")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(TensorRTBuildError, match="the_det"):
        build_engine(model, engine_path=tmp_path / "m.plan")


def test_a_profile_missing_a_dynamic_input_names_it(trt, tmp_path):
    model = models.tiny_attention(dim=32, heads=2)
    profile = derive_profile(model)
    del profile.inputs["context"]
    with pytest.raises(InputError, match="context"):
        build_engine(model, profile, engine_path=tmp_path / "m.plan")



def test_build_refuses_an_engine_path_that_is_a_fifo_before_building(tmp_path, capsys):
    # The engine was written with a bare mkstemp + replace: a FIFO (or a device, as root) at
    # --engine would have been replaced by a file after a build of minutes.
    import os

    path = tmp_path / "m.onnx"
    xc.save(models.tiny_attention(), path)
    fifo = tmp_path / "engine.plan"
    os.mkfifo(fifo)
    assert main(["build", str(path), "--engine", str(fifo)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a FIFO, not a regular file" in err[0]
    assert fifo.is_fifo()
