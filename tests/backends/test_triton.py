"""``triton-repo``: every config parses as Triton's ModelConfig; names, types and shapes agree
with the models; the ensemble wires projector outputs into the decoder."""

from __future__ import annotations

from pathlib import Path

import onnx

import xattn_compiler as xc
from xattn_compiler.cli import main

from .conftest import zoo_export
from .triton_schema import data_type_name, parse_config

TRITON_TYPES = {"FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "INT64": "TYPE_INT64",
                "BOOL": "TYPE_BOOL", "INT32": "TYPE_INT32"}


def configs(repo: Path) -> dict[str, object]:
    return {path.parent.name: parse_config(path.read_text())
            for path in sorted(repo.glob("*/config.pbtxt"))}


def onnx_io(model: onnx.ModelProto) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """``{"input": {name: (triton type, dims)}, "output": {...}}`` with -1 for dynamic dims."""
    def table(values):
        return {v.name: (TRITON_TYPES[onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)],
                         [d.dim_value if d.HasField("dim_value") else -1
                          for d in v.type.tensor_type.shape.dim]) for v in values}
    return {"input": table(model.graph.input), "output": table(model.graph.output)}


def config_io(config) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """The same table from a config, batch dim put back when the config batches."""
    batch = [-1] if config.max_batch_size > 0 else []
    return {kind: {t.name: (data_type_name(t.data_type), batch + list(t.dims))
                   for t in getattr(config, kind)} for kind in ("input", "output")}


def test_a_batching_model_gets_dynamic_batching_and_dims_without_the_batch(tmp_path,
                                                                          export_cache):
    source = zoo_export("nn-transformer-decoder-batch-first", export_cache).path
    assert main(["triton-repo", str(source), "-o", str(tmp_path / "repo"), "--name", "decoder",
                 "--max-batch-size", "16", "-q"]) == 0
    [(name, config)] = configs(tmp_path / "repo").items()
    assert (name, config.name, config.platform) == ("decoder", "decoder", "onnxruntime_onnx")
    assert config.max_batch_size == 16
    assert config.WhichOneof("scheduling_choice") == "dynamic_batching"
    served = xc.load(tmp_path / "repo" / "decoder" / "1" / "model.onnx")
    assert config_io(config) == onnx_io(served) == onnx_io(xc.load(source))


def test_a_sequence_first_model_does_not_batch(tmp_path, export_cache):
    source = zoo_export("nn-transformer-decoder-seq-first", export_cache).path
    assert main(["triton-repo", str(source), "-o", str(tmp_path / "repo"), "-q"]) == 0
    config = configs(tmp_path / "repo")["model"]
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert config_io(config) == onnx_io(xc.load(source))


def test_a_split_model_becomes_projector_decoder_and_an_ensemble(tmp_path, export_cache):
    model = xc.load(zoo_export("whisper-decoder-eager", export_cache).path)
    split = xc.split_static_kv(model)
    split.save(tmp_path / "split")
    assert main(["triton-repo", str(tmp_path / "split"), "-o", str(tmp_path / "repo"), "-q"]) == 0
    found = configs(tmp_path / "repo")
    assert set(found) == {"kv_projector", "decoder", "ensemble"}
    parts = {"kv_projector": split.projector, "decoder": split.decoder}
    for name, part in parts.items():
        assert config_io(found[name]) == onnx_io(part)
        assert (tmp_path / "repo" / name / "1" / "model.onnx").is_file()
    ensemble = found["ensemble"]
    assert ensemble.platform == "ensemble" and (tmp_path / "repo" / "ensemble" / "1").is_dir()
    available = dict(config_io(ensemble)["input"])        # tensors a step may read
    for step in ensemble.ensemble_scheduling.step:
        composing = config_io(found[step.model_name])
        assert set(step.input_map) == set(composing["input"])
        assert set(step.output_map) == set(composing["output"])
        for key, value in step.input_map.items():
            assert available[value] == composing["input"][key], value
        for key, value in step.output_map.items():
            available[value] = composing["output"][key]
    assert config_io(ensemble)["output"] == {n: available[n] for n in config_io(ensemble)["output"]}
    # The ensemble's inputs are the projector's static inputs and the decoder's own inputs.
    kv = {name for entry in split.split_json()["kv"] for name in (entry["key"], entry["value"])}
    assert set(config_io(ensemble)["input"]) == \
        set(onnx_io(split.projector)["input"]) | set(onnx_io(split.decoder)["input"]) - kv
    assert ensemble.max_batch_size <= min(found["kv_projector"].max_batch_size,
                                          found["decoder"].max_batch_size)


def test_plans_are_served_by_the_tensorrt_backend(tmp_path, export_cache):
    model = xc.load(zoo_export("whisper-decoder-eager", export_cache).path)
    xc.split_static_kv(model).save(tmp_path / "split")
    # Stand-in bytes: this checks the repository layout and config, not an engine.
    (tmp_path / "decoder.plan").write_bytes(b"engine bytes")
    assert main(["triton-repo", str(tmp_path / "split"), "-o", str(tmp_path / "repo"), "-q",
                 "--engine", f"decoder={tmp_path / 'decoder.plan'}"]) == 0
    found = configs(tmp_path / "repo")
    assert found["decoder"].platform == "tensorrt_plan"
    assert found["decoder"].instance_group[0].kind == 1          # KIND_GPU
    assert (tmp_path / "repo" / "decoder" / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert found["kv_projector"].platform == "onnxruntime_onnx"


def test_an_engine_for_an_unknown_part_is_a_usage_error(tmp_path, export_cache, capsys):
    model = xc.load(zoo_export("whisper-decoder-eager", export_cache).path)
    xc.split_static_kv(model).save(tmp_path / "split")
    code = main(["triton-repo", str(tmp_path / "split"), "-o", str(tmp_path / "repo"),
                 "--engine", "encoder=x.plan"])
    assert code == 2 and "kv_projector and decoder" in capsys.readouterr().err


def test_tensor_names_with_quotes_and_newlines_stay_inside_their_strings(tmp_path):
    # A name that, written raw, would close its string and add `backend: "python"`.
    hostile = 'x"\nbackend: "python" #\\ é\x1b'
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", [hostile], ["y"], name="relu")], "g",
        [onnx.helper.make_tensor_value_info(hostile, onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    source = tmp_path / "m.onnx"
    onnx.save(onnx.helper.make_model(graph), source)
    assert main(["triton-repo", str(source), "-o", str(tmp_path / "repo"), "-q"]) == 0
    text = (tmp_path / "repo" / "model" / "config.pbtxt").read_text()
    config = parse_config(text)  # an injected field or a broken string fails to parse
    assert [t.name for t in config.input] == [hostile]
    assert [t.name for t in config.output] == ["y"]
    assert text.isascii() and all(line.isprintable() for line in text.splitlines())
