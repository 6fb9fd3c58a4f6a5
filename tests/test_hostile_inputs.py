"""Hostile inputs: every one is exit 2 with one line on stderr naming the culprit, nothing
written where it should not be, and no name from a model reaches the terminal raw."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from xattn_compiler.cli import main
from xattn_compiler.examples import example_path

ESC_NAME = "x\x1b]0;owned\x07\x1b[2J"  # retitles the window and clears the screen if printed raw


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def one_error_line(capsys_or_fd) -> str:
    err = capsys_or_fd.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("xattn-compiler: error: "), err
    return lines[0]


def value(name: str, shape=(2, 3), elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(shape) if shape is not None else None)


def save_model(path: Path, nodes, inputs, outputs, initializers=(), opset=18) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path.write_bytes(model.SerializeToString())
    return path


def relu_model(path: Path, name_in: str = "x", name_out: str = "y", shape=(2, 3)) -> Path:
    return save_model(path, [helper.make_node("Relu", [name_in], [name_out], name="relu")],
                      [value(name_in, shape)], [value(name_out, shape)])


# --- attribute and tensor values checked at load ------------------------------------------------

def _softmax(axis: int):
    return [helper.make_node("Softmax", ["x"], ["y"], name="soft", axis=axis)], "soft", "axis"


def _transpose(perm):
    return [helper.make_node("Transpose", ["x"], ["y"], name="tr", perm=perm)], "tr", "perm"


def _cast_to(to: int):
    return [helper.make_node("Cast", ["x"], ["y"], name="cast", to=to)], "cast", "'to'"


def _body_softmax():
    body = helper.make_graph([helper.make_node("Softmax", ["x"], ["b"], name="inner", axis=7)],
                             "then", [], [value("b")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["c"], name="id")],
                              "else", [], [value("c")])
    cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
    return [helper.make_node("Constant", [], ["cond"], name="k", value=cond),
            helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=body,
                             else_branch=other)], "inner", "then_branch of 'branch'"


BAD_ATTRIBUTES = {
    "huge_axis": _softmax(2**40),
    "axis_past_the_rank": _softmax(2),
    "negative_axis_past_the_rank": _softmax(-3),
    "perm_not_a_permutation": _transpose([0, 0]),
    "perm_of_the_wrong_rank": _transpose([2, 1, 0]),
    "cast_to_no_type": _cast_to(99),
    "axis_in_a_subgraph_body": _body_softmax(),
}


@pytest.mark.parametrize("case", sorted(BAD_ATTRIBUTES))
def test_out_of_range_attribute_is_exit_2_naming_node_and_attribute(tmp_path, capsys, case):
    nodes, node_name, word = BAD_ATTRIBUTES[case]
    path = save_model(tmp_path / "m.onnx", nodes, [value("x")], [value("y")])
    assert cli("inspect", path) == 2
    line = one_error_line(capsys)
    assert f"'{node_name}'" in line and word in line and "m.onnx" in line


@pytest.mark.parametrize("op, axes, word", [("Unsqueeze", [2**40], "out of range"),
                                             ("Unsqueeze", [4], "rank-2 input 'x'"),
                                             ("Squeeze", [1, 1], "repeats"),
                                             ("ReduceSum", [-3], "rank-2 input 'x'")])
def test_constant_axes_input_out_of_range_is_exit_2(tmp_path, capsys, op, axes, word):
    axes_tensor = helper.make_tensor("axes", TensorProto.INT64, [len(axes)], axes)
    path = save_model(tmp_path / "m.onnx", [helper.make_node(op, ["x", "axes"], ["y"], name="n")],
                      [value("x")], [value("y", None)], [axes_tensor])
    assert cli("inspect", path) == 2
    line = one_error_line(capsys)
    assert "node 'n'" in line and "axes input 'axes'" in line and word in line


def test_in_range_axes_load(tmp_path, capsys):
    nodes = [helper.make_node("Softmax", ["x"], ["a"], name="s", axis=-2),
             helper.make_node("Transpose", ["a"], ["b"], name="t", perm=[1, 0]),
             helper.make_node("Flatten", ["b"], ["y"], name="f", axis=2)]
    path = save_model(tmp_path / "m.onnx", nodes, [value("x")], [value("y", (6, 1))])
    assert cli("inspect", path) == 0, capsys.readouterr().err


def _initializer(tensor: onnx.TensorProto, tmp_path: Path) -> Path:
    nodes = [helper.make_node("Add", ["x", tensor.name], ["y"], name="add")]
    return save_model(tmp_path / "m.onnx", nodes, [value("x")], [value("y")], [tensor])


def test_raw_data_longer_than_the_dims_is_exit_2_naming_the_tensor(tmp_path, capsys):
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.0] * 6)
    tensor.ClearField("float_data")
    tensor.raw_data = b"\0" * 100
    assert cli("verify", _initializer(tensor, tmp_path), example_path()) == 2
    line = one_error_line(capsys)
    assert "'w'" in line and "100 bytes" in line and "24" in line


def test_typed_data_count_not_matching_the_dims_is_exit_2(tmp_path, capsys):
    tensor = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], [0.0] * 6)
    tensor.float_data.append(1.0)
    assert cli("inspect", _initializer(tensor, tmp_path)) == 2
    line = one_error_line(capsys)
    assert "'w'" in line and "float_data holds 7 values" in line


def test_constant_with_raw_data_shorter_than_its_dims_is_exit_2(tmp_path, capsys):
    tensor = helper.make_tensor("c", TensorProto.INT64, [4], [1, 2, 3, 4])
    tensor.ClearField("int64_data")
    tensor.raw_data = b"\0" * 8
    nodes = [helper.make_node("Constant", [], ["k"], name="const", value=tensor),
             helper.make_node("Relu", ["x"], ["y"], name="r")]
    path = save_model(tmp_path / "m.onnx", nodes, [value("x")], [value("y")])
    assert cli("inspect", path) == 2
    assert "node 'const'" in one_error_line(capsys)


# --- triton-repo ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../escaped", "/tmp/absolute", 'q"uote\nbackend: "python',
                                  ".", "..", ".hidden", "a/b", ""])
def test_triton_model_name_outside_the_rules_is_exit_2(tmp_path, capsys, name):
    model = relu_model(tmp_path / "m.onnx")
    repo = tmp_path / "work" / "repo"
    assert cli("triton-repo", model, "-o", repo, "--name", name) == 2
    assert "model name" in one_error_line(capsys)
    assert not repo.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_triton_ensemble_name_outside_the_rules_is_exit_2(tmp_path, capsys):
    split = _split_dir(tmp_path)
    assert cli("triton-repo", split, "-o", tmp_path / "repo", "--ensemble-name", "../up") == 2
    assert "ensemble name '../up'" in one_error_line(capsys)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "up").exists()


def _split_dir(tmp_path: Path, spec: object = None) -> Path:
    split = tmp_path / "split"
    split.mkdir()
    save_model(split / "kv_projector.onnx", [helper.make_node("Relu", ["ctx"], ["k"], name="p")],
               [value("ctx")], [value("k")])
    save_model(split / "decoder.onnx", [helper.make_node("Add", ["x", "k"], ["y"], name="d")],
               [value("x"), value("k")], [value("y")])
    if spec is None:
        spec = {"static_inputs": ["ctx"], "kv": [{"attention": "a", "key": "k", "value": "k"}],
                "projector": "kv_projector.onnx", "decoder": "decoder.onnx"}
    text = spec if isinstance(spec, str) else json.dumps(spec)
    (split / "split.json").write_text(text)
    return split


BAD_SPLIT_JSON = {
    "not_json": ("{not json", "not valid JSON"),
    "a_list": ("[]", "top level"),
    "deeply_nested": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "decoder_outside_the_folder": ({"decoder": "../decoder.onnx", "projector": "kv_projector.onnx",
                                    "kv": []}, "'decoder'"),
    "projector_absolute": ({"decoder": "decoder.onnx", "projector": "/etc/passwd", "kv": []},
                           "'projector'"),
    "decoder_not_a_string": ({"decoder": 5, "projector": "kv_projector.onnx"}, "'decoder'"),
    "kv_entry_without_key": ({"decoder": "decoder.onnx", "projector": "kv_projector.onnx",
                              "kv": [{"value": "k"}]}, "'kv[0]'"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPLIT_JSON))
@pytest.mark.parametrize("command", ["triton-repo", "lint-trt", "verify"])
def test_malformed_split_json_is_exit_2_naming_it(tmp_path, capsys, case, command):
    spec, word = BAD_SPLIT_JSON[case]
    split = _split_dir(tmp_path, spec)
    if command == "verify":
        assert cli("verify", relu_model(tmp_path / "ref.onnx"), split) == 2
    else:
        args = ["-o", tmp_path / "repo"] if command == "triton-repo" else []
        assert cli(command, split, *args) == 2
    line = one_error_line(capsys)
    assert "split.json" in line and word in line
    assert not (tmp_path / "repo").exists()


def test_missing_split_json_is_exit_2(tmp_path, capsys):
    split = _split_dir(tmp_path)
    (split / "split.json").unlink()
    assert cli("triton-repo", split, "-o", tmp_path / "repo") == 2
    assert "no split.json" in one_error_line(capsys)


def test_triton_config_link_in_an_existing_repo_is_replaced_not_followed(tmp_path):
    model = relu_model(tmp_path / "m.onnx")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    (tmp_path / "repo" / "model").mkdir(parents=True)
    (tmp_path / "repo" / "model" / "config.pbtxt").symlink_to(victim)
    assert cli("triton-repo", model, "-o", tmp_path / "repo", "-q") == 0
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "repo" / "model" / "config.pbtxt").is_symlink()


def test_triton_config_that_is_a_fifo_is_refused(tmp_path, capsys):
    model = relu_model(tmp_path / "m.onnx")
    (tmp_path / "repo" / "model").mkdir(parents=True)
    os.mkfifo(tmp_path / "repo" / "model" / "config.pbtxt")
    assert cli("triton-repo", model, "-o", tmp_path / "repo") == 2
    assert "config.pbtxt" in one_error_line(capsys)


def test_triton_model_folder_that_is_a_link_is_refused(tmp_path, capsys):
    model = relu_model(tmp_path / "m.onnx")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "model").symlink_to(elsewhere)
    assert cli("triton-repo", model, "-o", tmp_path / "repo") == 2
    assert "is not a folder" in one_error_line(capsys)
    assert list(elsewhere.iterdir()) == []


# --- printed text: no control character from a model reaches the terminal ----------------------

def test_verify_escapes_terminal_control_characters_in_names(tmp_path, capsys):
    model = relu_model(tmp_path / "m.onnx", name_in=ESC_NAME, name_out=ESC_NAME + "out")
    assert cli("verify", model, model) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "x\\x1b]0;owned\\x07" in out


def test_lint_trt_escapes_terminal_control_characters_in_names(tmp_path, capsys):
    model = relu_model(tmp_path / "m.onnx", name_in=ESC_NAME, shape=("batch", 3))
    assert cli("lint-trt", model) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "x\\x1b]0;owned" in out  # the dynamic input is named, escaped


def test_inspect_escapes_terminal_control_characters_in_names(tmp_path, capsys):
    model = relu_model(tmp_path / f"m{ESC_NAME[1:6]}.onnx")
    assert cli("inspect", model) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b" in out


def test_log_lines_escape_terminal_control_characters(tmp_path, capsys):
    # An opset-11 model gets a warning that quotes its path.
    path = tmp_path / f"m{ESC_NAME}.onnx"
    save_model(path, [helper.make_node("Relu", ["x"], ["y"], name="r")], [value("x")],
               [value("y")], opset=11)
    assert cli("inspect", path) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "\x1b" not in err and "\x07" not in err and "\\x1b]0;" in err


def test_error_naming_a_tensor_with_escapes_and_newlines_is_one_escaped_line(tmp_path, capsys):
    name = "ghost\n\x1b[31mforged line"
    path = save_model(tmp_path / "m.onnx", [helper.make_node("Add", ["x", name], ["y"],
                                                             name="add")],
                      [value("x")], [value("y")])
    assert cli("inspect", path) == 2
    line = one_error_line(capsys)
    assert "\x1b" not in line and "\\x1b[31mforged line" in line


def test_emitted_trtexec_command_quotes_control_characters(tmp_path, capsys):
    model = relu_model(tmp_path / "m.onnx", name_in=ESC_NAME, shape=("batch", 3))
    assert cli("build", model, "--engine", tmp_path / "m.plan", "--emit-trtexec",
               "--profile", f"{ESC_NAME}:1x3:2x3:4x3") == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "$'x\\x1b]0;owned" in out


def test_split_kv_summary_escapes_the_static_input_name(tmp_path, capsys):
    model = onnx.load(example_path())
    old = "encoder_hidden_states"
    for value_info in model.graph.input:
        if value_info.name == old:
            value_info.name = ESC_NAME
    for node in model.graph.node:
        node.input[:] = [ESC_NAME if name == old else name for name in node.input]
    onnx.save(model, tmp_path / "m.onnx")
    assert cli("split-kv", tmp_path / "m.onnx", "-o", tmp_path / "split") == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "x\\x1b]0;owned" in err


# --- options a script might get wrong -----------------------------------------------------------

@pytest.mark.parametrize("args, word", [
    (["--profile", "input_ids:1x1:1x64:8x99999999999999999999999"], "above"),
    (["--profile", "input_ids:1x1:1x64:8x\u00b2"], "not dims"),
    (["--dim", "x=1:2:\u00b2"], "SYMBOL=MIN:OPT:MAX"),
    (["--dim", "x=1:2:99999999999"], "above"),
    (["--workspace", "-5"], "--workspace"),
])
def test_hostile_build_options_are_exit_2(tmp_path, capsys, args, word):
    assert cli("build", example_path(), "--engine", tmp_path / "e.plan", "--emit-trtexec",
               *args) == 2
    assert word in one_error_line(capsys)


def test_negative_seed_is_exit_2(capsys):
    assert cli("verify", example_path(), example_path(), "--seed", "-1") == 2
    assert "--seed -1" in one_error_line(capsys)


# --- ONNX Runtime's own log stays out of stderr ---------------------------------------------------

def test_onnx_runtime_failure_prints_exactly_one_line(tmp_path, capfd):
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [4, 4])
    path = save_model(tmp_path / "m.onnx", [helper.make_node("Reshape", ["x", "s"], ["y"],
                                                             name="reshape")],
                      [value("x", ("a", "b"))], [value("y", ("c", "d"))], [shape])
    assert cli("verify", path, path) == 2
    line = one_error_line(capfd)  # file-descriptor level: ORT's C++ logger writes there
    assert "reshape" in line.lower()


def test_constant_folding_that_onnx_runtime_cannot_run_prints_nothing_of_its_own(tmp_path, capfd):
    # A 4 TiB constant: ORT's allocation fails, the folder keeps the node, the run goes on.
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [2**20, 2**20])
    nodes = [helper.make_node("ConstantOfShape", ["s"], ["big"], name="cos"),
             helper.make_node("ReduceSum", ["big"], ["r"], name="rs", keepdims=0),
             helper.make_node("Add", ["x", "r"], ["y"], name="add")]
    path = save_model(tmp_path / "m.onnx", nodes, [value("x")], [value("y")], [shape])
    assert cli("optimize", path, "-o", tmp_path / "o.onnx", "-q") == 0
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


# --- plugin specs ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["deep.json", "deep.toml", "/dev/zero", "fifo.json", "dir.json",
                                  "huge.json"])
def test_hostile_plugin_spec_is_exit_2_naming_the_file(tmp_path, capsys, case):
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000)
    (tmp_path / "huge.json").write_text(" " * (2 << 20) + "{}")
    (tmp_path / "dir.json").mkdir()
    os.mkfifo(tmp_path / "fifo.json")
    spec = case if case.startswith("/") else tmp_path / case
    out = tmp_path / "o.onnx"
    assert cli("optimize", "--example", "-o", out, "--target", "trt-plugin",
               "--plugin-spec", spec) == 2
    assert Path(spec).name in one_error_line(capsys)
    assert not out.exists()


# --- outputs --------------------------------------------------------------------------------

def test_zoo_export_onto_an_existing_file_is_exit_2(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine\n")
    assert cli("zoo", "export", "whisper-decoder-eager", "-o", target) == 2
    assert "taken" in one_error_line(capsys)
    assert target.read_text() == "mine\n"


# --- the last line of defence ------------------------------------------------------------------

def _boom(*args, **kwargs):
    raise ZeroDivisionError("the unexpected")


def test_unexpected_exception_is_exit_70_with_one_line(monkeypatch, capsys):
    monkeypatch.delenv("XATTN_DEBUG", raising=False)
    monkeypatch.setattr("xattn_compiler.cli.default_registry", _boom)
    assert cli("passes") == 70
    line = one_error_line(capsys)
    assert "passes" in line and "ZeroDivisionError" in line and "the unexpected" in line


def test_xattn_debug_adds_the_traceback(monkeypatch, capsys):
    monkeypatch.setenv("XATTN_DEBUG", "1")
    monkeypatch.setattr("xattn_compiler.cli.default_registry", _boom)
    assert cli("passes") == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1].startswith("xattn-compiler: error:")


def test_out_of_memory_is_exit_2_not_a_bug_report(monkeypatch, capsys):
    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr("xattn_compiler.cli.default_registry", exhausted)
    assert cli("passes") == 2
    assert "out of memory" in one_error_line(capsys)


def test_a_file_error_the_command_did_not_expect_is_exit_2_naming_the_file(monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/srv/models/locked.onnx")

    monkeypatch.setattr("xattn_compiler.cli.default_registry", denied)
    assert cli("passes") == 2
    line = one_error_line(capsys)
    assert "/srv/models/locked.onnx: Permission denied" in line and "bug" not in line


def test_a_bundled_model_still_runs_through_every_check(tmp_path):
    shutil.copy(example_path(), tmp_path / "m.onnx")
    assert cli("inspect", tmp_path / "m.onnx") == 0
