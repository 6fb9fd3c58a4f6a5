"""The command line: the main job on the bundled example, exit codes, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from xattn_compiler.cli import main
from xattn_compiler.examples import example_path
from xattn_compiler.ir import count_nodes


def value(name, shape=(2,)):
    return helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, list(shape))


def write_model(path: Path, nodes, *, opsets=(("", 18),), check=True) -> Path:
    graph = helper.make_graph(nodes, "g", [value("x")], [value("y")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    if check:
        onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


def cli(*args: str) -> int:
    return main([str(a) for a in args])


# --- the main job ----------------------------------------------------------------------------

def test_optimize_the_bundled_example_verifies_and_reports(tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert cli("optimize", "--example", "-o", out, "--verify", "--report", report) == 0
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized)
    assert count_nodes(optimized) <= count_nodes(onnx.load(example_path()))
    data = json.loads(report.read_text())
    assert [entry["name"] for entry in data["passes"]] == [
        "canonicalize", "normalize-spellings", "unroll-control-flow", "remove-layout-clutter",
        "fuse-attention"]
    for entry in data["passes"]:
        assert {"name", "changed", "nodes_before", "nodes_after", "seconds", "details"} <= set(entry)
    assert data["verify"]["ok"] is True
    # The default target: every block one ONNX Attention node.
    assert data["after"]["ops"].get("Attention") == 4 and data["after"]["opset"] >= 23


@pytest.mark.parametrize("target, fused_op", [
    ("ort-mha", "MultiHeadAttention"), ("canonical", None), ("onnx-attention", "Attention")])
def test_optimize_fuses_to_the_chosen_target(tmp_path, target, fused_op):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert cli("optimize", "--example", "-o", out, "--target", target, "--verify",
               "--report", report, "-q") == 0
    ops = json.loads(report.read_text())["after"]["ops"]
    if fused_op:
        assert ops[fused_op] == 4
    else:
        assert ops["Softmax"] == 4 and "Attention" not in ops


def test_the_3d_layout_leaves_no_head_split_or_merge(tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert cli("optimize", "--example", "-o", out, "--qkv-layout", "3d", "--verify",
               "--report", report, "-q") == 0
    data = json.loads(report.read_text())
    assert data["after"]["ops"]["Attention"] == 4 and "qkv-layout=3d" in data["pipeline"]
    # What layout ops are left make the self-attention K/V cache the model outputs
    # ([B, H, S, D]); no block keeps a split or merge of its own.
    optimized = onnx.load(out)
    outputs = {o.name for o in optimized.graph.output}
    left = [n for n in optimized.graph.node if n.op_type in ("Transpose", "Reshape")]
    transposes = [n for n in left if n.op_type == "Transpose"]
    assert len(left) == 2 * len(transposes) and all(n.output[0] in outputs for n in transposes)
    assert len(left) < data["before"]["ops"]["Transpose"] + data["before"]["ops"]["Reshape"] - 24


def test_a_qkv_layout_for_another_target_is_refused(tmp_path, capsys):
    assert cli("optimize", "--example", "-o", tmp_path / "o.onnx", "--target", "canonical",
               "--qkv-layout", "3d") == 2
    assert "onnx-attention only" in capsys.readouterr().err


def test_specialize_fixes_an_input_and_inlines_what_it_decides(tmp_path):
    from xattn_compiler.testing.merged_decoder import merged_decoder

    source = tmp_path / "merged.onnx"
    source.write_bytes(merged_decoder().SerializeToString())
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert cli("optimize", source, "-o", out, "--specialize", "use_cache_branch=false",
               "--report", report, "--verify", "-q") == 0
    optimized = onnx.load(out)
    assert "use_cache_branch" not in [i.name for i in optimized.graph.input]
    assert "If" not in json.loads(report.read_text())["after"]["ops"]


def test_specializing_an_input_the_model_lacks_names_it(tmp_path, capsys):
    assert cli("optimize", "--example", "-o", tmp_path / "o.onnx", "--specialize",
               "use_cache_branch=true") == 2
    assert "'use_cache_branch'" in capsys.readouterr().err


def test_a_malformed_specialization_is_a_usage_error(tmp_path, capsys):
    assert cli("optimize", "--example", "-o", tmp_path / "o.onnx", "--specialize", "oops") == 2
    assert "NAME=VALUE" in capsys.readouterr().err


def test_target_options_with_explicit_passes_are_refused(tmp_path, capsys):
    assert cli("optimize", "--example", "-o", tmp_path / "o.onnx", "--passes", "canonicalize",
               "--target", "canonical") == 2
    assert "pass options" in capsys.readouterr().err


def test_optimize_output_verifies_from_the_command_line(tmp_path):
    out = tmp_path / "out.onnx"
    assert cli("optimize", "--example", "-o", out, "-q") == 0
    assert cli("verify", example_path(), out, "-q") == 0


def test_verify_fails_on_models_that_differ(tmp_path, capsys):
    model = onnx.load(example_path())
    # Perturb one weight of the vocabulary projection: a real, visible difference.
    biggest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    values = numpy_helper.to_array(biggest).copy()
    values.flat[0] += 5.0
    biggest.CopyFrom(numpy_helper.from_array(values, biggest.name))
    changed = tmp_path / "changed.onnx"
    changed.write_bytes(model.SerializeToString())
    assert cli("verify", example_path(), changed) == 1
    assert "FAIL" in capsys.readouterr().out


def test_verify_json_is_one_object(tmp_path, capsys):
    assert cli("verify", example_path(), example_path(), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["outputs"]


def test_passes_lists_the_builtins(capsys):
    assert cli("passes") == 0
    assert "canonicalize" in capsys.readouterr().out


def test_passes_json_lists_options(capsys):
    assert cli("passes", "--json") == 0
    (canonicalize,) = [p for p in json.loads(capsys.readouterr().out) if p["name"] == "canonicalize"]
    assert {o["name"] for o in canonicalize["options"]} >= {"fold-constants", "size-threshold"}


def test_pipeline_text_selects_passes(tmp_path):
    report = tmp_path / "r.json"
    args = ["optimize", "--example", "-o", tmp_path / "o.onnx", "--report", report]
    assert cli(*args, "--passes", "canonicalize{fold-constants=false}", "-q") == 0
    assert json.loads(report.read_text())["pipeline"] == "canonicalize{fold-constants=false}"


# --- bad input: exit 2, one line naming the culprit, nothing written --------------------------

def bad_models(tmp: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, a word the error must contain)."""
    real = example_path().read_bytes()
    (tmp / "truncated.onnx").write_bytes(real[: len(real) // 2])
    (tmp / "text.onnx").write_text("this is not a model\n" * 10)
    return {
        "missing": (tmp / "missing.onnx", "no such file"),
        "not-onnx": (tmp / "text.onnx", "text.onnx"),
        "truncated": (tmp / "truncated.onnx", "truncated.onnx"),
        "unknown-domain": (write_model(tmp / "domain.onnx", [
            helper.make_node("Fancy", ["x"], ["y"], domain="com.example", name="fancy_0")],
            check=False), "com.example"),
        "dangling": (write_model(tmp / "dangling.onnx", [
            helper.make_node("Add", ["x", "ghost"], ["y"], name="add_0")], check=False), "ghost"),
        "cycle": (write_model(tmp / "cycle.onnx", [
            helper.make_node("Add", ["x", "b"], ["a"], name="first"),
            helper.make_node("Relu", ["a"], ["b"], name="second"),
            helper.make_node("Identity", ["a"], ["y"], name="out")], check=False), "cycle"),
    }


@pytest.mark.parametrize("case", ["missing", "not-onnx", "truncated", "unknown-domain",
                                  "dangling", "cycle"])
@pytest.mark.parametrize("command", ["optimize", "verify"])
def test_bad_input_exits_2_with_one_clear_line(tmp_path, capsys, case, command):
    models = tmp_path / "models"
    models.mkdir()
    path, word = bad_models(models)[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if command == "optimize":
        code = cli("optimize", path, "-o", out_dir / "o.onnx", "--report", out_dir / "r.json")
    else:
        code = cli("verify", path, example_path())
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert word in err and err.startswith("xattn-compiler: error:")
    assert list(out_dir.iterdir()) == []


def test_refuses_to_write_over_its_input(tmp_path, capsys):
    model = tmp_path / "m.onnx"
    shutil.copy(example_path(), model)
    before = model.read_bytes()
    assert cli("optimize", model, "-o", model) == 2
    assert "refusing to write over the input" in capsys.readouterr().err
    assert model.read_bytes() == before


def test_unknown_pass_is_bad_usage(tmp_path, capsys):
    assert cli("optimize", "--example", "-o", tmp_path / "o.onnx", "--passes", "canonicalise") == 2
    assert "did you mean 'canonicalize'" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_missing_npz_input_is_bad_input(tmp_path, capsys):
    np.savez(tmp_path / "inputs.npz", nothing=np.zeros(1))
    assert cli("verify", example_path(), example_path(), "--inputs", tmp_path / "inputs.npz") == 2
    assert "input_ids" in capsys.readouterr().err


# --- the installed command --------------------------------------------------------------------

def test_installed_command_runs_quietly_when_piped(tmp_path):
    exe = shutil.which("xattn-compiler", path=os.path.dirname(sys.executable)) or shutil.which(
        "xattn-compiler")
    if exe is None:
        pytest.skip("the package is not installed with its console script")
    out = tmp_path / "o.onnx"
    proc = subprocess.run([exe, "optimize", "--example", "-o", str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "[1/2]" not in proc.stderr  # no progress line when stderr is not a terminal
    assert "wrote" in proc.stderr and out.exists()


def test_progress_line_shows_each_pass_on_a_terminal(capsys):
    from xattn_compiler.passes import Canonicalize

    from xattn_compiler.cli import ProgressLine
    from xattn_compiler.pipeline import optimize

    optimize(onnx.load(example_path()), [Canonicalize(), Canonicalize()],
             listener=ProgressLine(enabled=True))
    err = capsys.readouterr().err
    assert "[1/2] canonicalize: changed" in err and "[2/2] canonicalize: no change" in err


def test_verbose_logs_what_each_pass_did(tmp_path, capsys):
    assert cli("optimize", "--example", "-o", tmp_path / "o.onnx", "-v") == 0
    assert "canonicalize: changed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, word", [
    (["optimize"], "optimize: the following arguments are required: -o/--output"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["optimize", "m.onnx", "-o", "o.onnx", "--target", "\x1b[31mred"], "'\\x1b[31mred'"),
])
def test_usage_error_is_one_line_with_exit_2(capsys, argv, word):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("xattn-compiler: error: "), err
    assert word in err and "\x1b" not in err


def test_optimize_verify_on_an_export_onnx_runtime_rejects_names_the_input(tmp_path, capsys):
    # (held-out: diffusers PixArt, dynamo export) A valid ONNX file ONNX Runtime will not load
    # (Squeeze of a dim that is 16): --verify has nothing to compare against. The one line
    # names the input file, not "'main_graph' (in memory)", and nothing is written.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Squeeze", ["y", "axes"], ["z"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16, 4])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")])
    source, out = tmp_path / "export.onnx", tmp_path / "out.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), source)
    assert main(["optimize", str(source), "-o", str(out), "--verify"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(source) in err and "(the input)" in err
    assert "without --verify" in err and not out.exists()
