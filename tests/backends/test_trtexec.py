"""``build --emit-trtexec``: the printed trtexec and Polygraphy commands, parsed back."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

import xattn_compiler as xc
from xattn_compiler.backends.profiles import derive_profile, parse_override
from xattn_compiler.backends.trtexec import (
    FP32_LAYERS_KEY,
    BuildPlan,
    polygraphy_command,
    shell_join,
    trtexec_command,
)
from xattn_compiler.cli import main
from xattn_compiler.registry import default_registry

from .conftest import zoo_export


def parse_trtexec(line: str) -> dict[str, list[str]]:
    argv = shlex.split(line)
    assert argv[0] == "trtexec"
    options: dict[str, list[str]] = {}
    for arg in argv[1:]:
        assert arg.startswith("--"), arg
        key, _, value = arg[2:].partition("=")
        options.setdefault(key, []).append(value)
    return options


def trtexec_shapes(spec: str) -> dict[str, tuple[int, ...]]:
    """trtexec's ``name:1x2x3,name2:4x5`` (a name may hold ':', the shape never does)."""
    shapes = {}
    for entry in spec.split(","):
        name, _, dims = entry.rpartition(":")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def parse_polygraphy(line: str) -> argparse.Namespace:
    argv = shlex.split(line)
    assert argv[:2] == ["polygraphy", "run"]
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    for flag in ("--trt", "--onnxrt", "--fp16", "--bf16", "--int8"):
        parser.add_argument(flag, action="store_true")
    for flag in ("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes", "--input-shapes",
                 "--layer-precisions", "--plugins"):
        parser.add_argument(flag, nargs="+", default=[])
    for flag in ("--precision-constraints", "--load-timing-cache"):
        parser.add_argument(flag)
    parser.add_argument("--rtol", type=float)
    parser.add_argument("--atol", type=float)
    return parser.parse_args(argv[2:])


def polygraphy_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for value in values:
        name, _, dims = value.rpartition(":")
        shapes[name] = tuple(int(d) for d in dims.strip("[]").split(","))
    return shapes


def emitted(capsys, *argv: str) -> list[tuple[str, str, str]]:
    """(comment, trtexec line, polygraphy line) per part from ``build --emit-trtexec``."""
    assert main(["build", *argv, "--emit-trtexec"]) == 0
    lines = capsys.readouterr().out.splitlines()
    parts = []
    for index in range(0, len(lines), 4):
        comment, trtexec, check, polygraphy = lines[index:index + 4]
        assert check.startswith("#")
        parts.append((comment, trtexec, polygraphy))
    return parts


def test_the_trtexec_command_carries_shapes_precision_softmax_plugins_and_cache(
        capsys, export_cache, tmp_path):
    exported = zoo_export("whisper-decoder-eager", export_cache)
    override = "input_ids:1x1:2x16:4x32"
    plugin, cache = tmp_path / "lib plugin.so", tmp_path / "timing.cache"
    [(_, line, _)] = emitted(capsys, str(exported.path), "--engine", str(tmp_path / "w.plan"),
                             "--trt-version", "10.15", "--fp16", "--fp32-softmax",
                             "--profile", override,
                             "--dim", "enc_len=1500:1500:1500",
                             "--plugin-lib", str(plugin), "--timing-cache", str(cache))
    options = parse_trtexec(line)
    model = xc.load(exported.path)
    profile = derive_profile(model, [override], {"enc_len": (1500, 1500, 1500)})
    for index, which in enumerate(("min", "opt", "max")):
        shapes = trtexec_shapes(options[f"{which}Shapes"][0])
        assert shapes == {n: s.as_tuple()[index] for n, s in profile.inputs.items()}
    assert trtexec_shapes(options["maxShapes"][0])["encoder_hidden_states"] == (4, 1500, 64)
    assert options["onnx"] == [str(exported.path)]
    assert options["saveEngine"] == [str(tmp_path / "w.plan")]
    assert "fp16" in options and "bf16" not in options and "int8" not in options
    softmaxes = sorted(n.name for n in model.graph.node if n.op_type == "Softmax")
    assert options["precisionConstraints"] == ["obey"]
    assert sorted(options["layerPrecisions"][0].split(",")) == [f"{n}:fp32" for n in softmaxes]
    assert options["staticPlugins"] == [str(plugin)]          # the space survived quoting
    assert options["timingCacheFile"] == [str(cache)]
    assert "skipInference" in options


def test_the_polygraphy_command_compares_the_same_build_with_onnx_runtime(capsys, export_cache,
                                                                          tmp_path):
    exported = zoo_export("whisper-decoder-eager", export_cache)
    [(_, _, line)] = emitted(capsys, str(exported.path), "--engine", str(tmp_path / "w.plan"),
                             "--trt-version", "10.15", "--bf16", "--fp32-softmax",
                             "--plugin-lib", "/opt/p.so",
                             "--timing-cache", "t.cache")
    args = parse_polygraphy(line)
    profile = derive_profile(xc.load(exported.path))
    assert args.trt and args.onnxrt and args.bf16 and not args.fp16
    assert polygraphy_shapes(args.trt_min_shapes) == {n: s.min for n, s in profile.inputs.items()}
    assert polygraphy_shapes(args.trt_max_shapes) == {n: s.max for n, s in profile.inputs.items()}
    assert polygraphy_shapes(args.input_shapes) == {n: s.opt for n, s in profile.inputs.items()}
    assert args.precision_constraints == "obey"
    assert all(p.endswith(":float32") for p in args.layer_precisions)
    assert args.plugins == ["/opt/p.so"] and args.load_timing_cache == "t.cache"
    assert (args.rtol, args.atol) == (2e-2, 2e-2)


def test_fp32_builds_have_no_precision_flags_and_tight_tolerances(tmp_path):
    plan = BuildPlan(Path("m.onnx"), Path("m.plan"), None)
    options = parse_trtexec(shell_join(trtexec_command(plan)))
    assert not {"fp16", "bf16", "int8", "minShapes", "layerPrecisions"} & set(options)
    args = parse_polygraphy(shell_join(polygraphy_command(plan)))
    assert (args.rtol, args.atol) == (1e-3, 1e-4) and not args.trt_min_shapes


def test_awkward_names_survive_the_shell():
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["in put:0"], ["y"], name="attn:0/Softmax")], "g",
        [helper.make_tensor_value_info("in put:0", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    profile = derive_profile(model, [parse_override("in put:0:1x4:2x4:3x4")])
    plan = BuildPlan(Path("dir with space/m's.onnx"), Path("e.plan"), profile, "fp16",
                     fp32_layers=["attn:0/Softmax"], trt_version=(10, 15))
    argv = trtexec_command(plan)
    assert shlex.split(shell_join(argv)) == argv
    options = parse_trtexec(shell_join(argv))
    assert options["onnx"] == ["dir with space/m's.onnx"]
    assert trtexec_shapes(options["optShapes"][0]) == {"in put:0": (2, 4)}
    # trtexec strips single quotes around a layer name that holds ':'.
    assert options["layerPrecisions"] == ["'attn:0/Softmax':fp32"]


def test_a_split_model_emits_one_build_per_part_with_agreeing_shapes(capsys, export_cache,
                                                                    tmp_path):
    exported = zoo_export("whisper-decoder-eager", export_cache)
    xc.split_static_kv(xc.load(exported.path)).save(tmp_path / "split")
    parts = emitted(capsys, str(tmp_path / "split"), "--engine", str(tmp_path / "engines"),
                    "--dim", "enc_len=1:1500:1500")
    assert [comment.split(":")[0] for comment, _, _ in parts] == ["# kv_projector", "# decoder"]
    projector, decoder = (parse_trtexec(line) for _, line, _ in parts)
    assert projector["saveEngine"] == [str(tmp_path / "engines" / "kv_projector.plan")]
    assert decoder["saveEngine"] == [str(tmp_path / "engines" / "decoder.plan")]
    for which in ("min", "opt", "max"):
        states = trtexec_shapes(projector[f"{which}Shapes"][0])["encoder_hidden_states"]
        key = trtexec_shapes(decoder[f"{which}Shapes"][0])["cross_kv.0.key"]
        assert (key[0], key[3]) == (states[0], states[1])     # batch and K/V length agree


def test_a_split_model_needs_an_engine_directory(capsys, export_cache, tmp_path):
    exported = zoo_export("whisper-decoder-eager", export_cache)
    xc.split_static_kv(xc.load(exported.path)).save(tmp_path / "split")
    code = main(["build", str(tmp_path / "split"), "--engine", "x.plan", "--emit-trtexec"])
    assert code == 2 and "give a directory" in capsys.readouterr().err


def test_fp32_softmax_adds_no_constraints_to_an_fp32_build(capsys, export_cache, tmp_path):
    exported = zoo_export("whisper-decoder-eager", export_cache)
    [(_, line, _)] = emitted(capsys, str(exported.path), "--engine", str(tmp_path / "w.plan"),
                             "--trt-version", "10.15", "--fp32-softmax")
    assert not {"precisionConstraints", "layerPrecisions"} & set(parse_trtexec(line))


def test_guard_precision_layers_are_the_ones_kept_in_fp32(capsys, export_cache, tmp_path):
    if "guard-precision" not in {cls.name for cls in default_registry()}:
        pytest.skip("the guard-precision pass is not registered")
    model = xc.load(zoo_export("nn-transformer-decoder-fp16", export_cache).path)
    guarded = xc.optimize(model, "canonicalize,guard-precision").model
    listed = {e.key: e.value for e in guarded.metadata_props}[FP32_LAYERS_KEY].split(",")
    assert len(listed) > len([n for n in guarded.graph.node if n.op_type == "Softmax"])
    xc.save(guarded, tmp_path / "guarded.onnx")
    [(_, line, polygraphy)] = emitted(capsys, str(tmp_path / "guarded.onnx"), "--engine",
                                      str(tmp_path / "g.plan"), "--trt-version", "10.15",
                                      "--fp16", "--fp32-softmax")
    layers = parse_trtexec(line)["layerPrecisions"][0].split(",")
    assert sorted(layers) == sorted(f"{name}:fp32" for name in listed)
    assert sorted(parse_polygraphy(polygraphy).layer_precisions) == \
        sorted(f"{name}:float32" for name in listed)


# --- TensorRT 11: no precision flags; decomposable attention ---------------------------------

def test_tensorrt_11_commands_carry_no_precision_flags_and_take_the_model_types(
        capsys, export_cache, tmp_path):
    exported = zoo_export("whisper-decoder-fp16", export_cache)
    [(_, line, polygraphy)] = emitted(capsys, str(exported.path), "--engine",
                                      str(tmp_path / "w.plan"))
    options = parse_trtexec(line)
    assert not {"fp16", "bf16", "int8", "best", "precisionConstraints",
                "layerPrecisions"} & set(options)
    args = parse_polygraphy(polygraphy)
    assert not (args.fp16 or args.bf16 or args.int8) and not args.layer_precisions
    # The engine computes in the model's fp16: the comparison uses half-precision tolerances.
    assert (args.rtol, args.atol) == (2e-2, 2e-2)


def test_tensorrt_10_keeps_the_precision_flags(capsys, export_cache, tmp_path):
    exported = zoo_export("whisper-decoder-eager", export_cache)
    [(_, line, polygraphy)] = emitted(capsys, str(exported.path), "--engine",
                                      str(tmp_path / "w.plan"), "--trt-version", "10.14",
                                      "--fp16")
    assert "fp16" in parse_trtexec(line) and parse_polygraphy(polygraphy).fp16


@pytest.mark.parametrize("flag", ["--fp16", "--bf16", "--int8", "--fp32-softmax"])
def test_build_fp16_on_tensorrt_11_points_at_optimize_precision(flag, capsys, tmp_path):
    from tests import models

    path = tmp_path / "m.onnx"
    xc.save(models.tiny_attention(), path)
    for extra in ([], ["--emit-trtexec"]):
        code = main(["build", str(path), "--engine", str(tmp_path / "m.plan"), flag, *extra])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert "TensorRT 11.5" in err and "optimize" in err and "--precision" in err


def _decomposable_model(tmp_path):
    from tests import models

    model = xc.optimize(models.tiny_attention(dim=32, heads=2)).model
    names = [n.name for n in model.graph.node if n.op_type == "Attention"]
    assert names
    return model, names


def test_decomposable_attentions_are_named_for_trtexec(capsys, tmp_path):
    from xattn_compiler.backends.trtexec import DECOMPOSABLE_KEY

    model, names = _decomposable_model(tmp_path)
    onnx.helper.set_model_props(model, {DECOMPOSABLE_KEY: ",".join(names)})
    path = tmp_path / "marked.onnx"
    xc.save(model, path)
    assert main(["build", str(path), "--engine", str(tmp_path / "m.plan"), "--emit-trtexec"]) == 0
    lines = capsys.readouterr().out.splitlines()
    [line] = [x for x in lines if x.startswith("trtexec")]
    assert parse_trtexec(line)["decomposableAttentions"] == [",".join(names)]
    assert any("Polygraphy has no option for decomposable" in x for x in lines)


def test_build_decomposable_marks_every_attention_node_and_needs_10_14(capsys, tmp_path):
    model, names = _decomposable_model(tmp_path)
    path = tmp_path / "plain.onnx"
    xc.save(model, path)
    argv = ["build", str(path), "--engine", str(tmp_path / "m.plan"), "--emit-trtexec"]
    assert main([*argv, "--decomposable"]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("trtexec")]
    assert parse_trtexec(line)["decomposableAttentions"] == [",".join(names)]
    assert main(argv) == 0   # nothing marked: no option
    assert "decomposableAttentions" not in capsys.readouterr().out
    assert main([*argv, "--decomposable", "--trt-version", "10.13"]) == 2
    assert "10.14" in capsys.readouterr().err


def test_a_decomposable_name_with_a_comma_is_refused():
    plan = BuildPlan(Path("m.onnx"), Path("m.plan"), None, decomposable=["a,b"])
    from xattn_compiler.errors import InputError

    with pytest.raises(InputError, match="--decomposableAttentions"):
        trtexec_command(plan)


def test_optimize_decomposable_records_stable_names_in_a_standard_file(capsys, tmp_path):
    """The names go in the metadata (onnx.checker and ONNX Runtime take the file as it is, and
    --verify runs on it); two runs name the same nodes; build --emit-trtexec passes them on."""
    import onnxruntime as ort

    from tests import models
    from xattn_compiler.backends.trtexec import DECOMPOSABLE_KEY

    source = tmp_path / "m.onnx"
    xc.save(models.tiny_attention(dim=32, heads=2), source)
    recorded = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.onnx"
        assert main(["optimize", str(source), "-o", str(out), "--decomposable", "--verify"]) == 0
        model = onnx.load(str(out))
        onnx.checker.check_model(model, full_check=True)
        ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        attention = [n.name for n in model.graph.node if n.op_type == "Attention"]
        names = {e.key: e.value for e in model.metadata_props}[DECOMPOSABLE_KEY].split(",")
        assert names == attention and len(set(names)) == len(names) > 0
        assert not any(a.name == "TRT_decomposable" for n in model.graph.node
                       for a in n.attribute)
        recorded.append(names)
    assert recorded[0] == recorded[1]
    capsys.readouterr()
    assert main(["build", str(tmp_path / "a.onnx"), "--engine", str(tmp_path / "m.plan"),
                 "--emit-trtexec"]) == 0
    [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("trtexec")]
    assert parse_trtexec(line)["decomposableAttentions"] == [",".join(recorded[0])]


def test_emitted_json_names_the_tensorrt_version_and_the_decomposable_nodes(capsys, tmp_path):
    import json

    model, names = _decomposable_model(tmp_path)
    path = tmp_path / "plain.onnx"
    xc.save(model, path)
    assert main(["build", str(path), "--engine", str(tmp_path / "m.plan"), "--decomposable",
                 "--emit-trtexec", "--json", "--trt-version", "10.15"]) == 0
    [record] = json.loads(capsys.readouterr().out)
    assert record["trt_version"] == "10.15" and record["decomposable_attentions"] == names
    assert f"--decomposableAttentions={','.join(names)}" in record["trtexec"]
