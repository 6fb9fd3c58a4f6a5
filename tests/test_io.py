"""Specification of ``xattn_compiler.io``: loading turns every bad file into one clear line,
external data round-trips, and saving is atomic and never overwrites the input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from tests import models
from xattn_compiler import io, ir
from xattn_compiler.errors import InputError, ModelLoadError, OutputError


def _load_error(path: Path) -> str:
    """Load ``path``, expecting a ModelLoadError; return its message after the shared checks."""
    with pytest.raises(ModelLoadError) as info:
        io.load(path)
    err = info.value
    assert isinstance(err, InputError)
    message = str(err)
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert str(path) in message
    return message


def _arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(model_or_path, **feeds) -> list[np.ndarray]:
    source = model_or_path
    if isinstance(source, onnx.ModelProto):
        source = source.SerializeToString()
    else:
        source = str(source)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --- load: files that are not usable models -------------------------------------------------


def test_load_missing_file_names_the_path(tmp_path):
    message = _load_error(tmp_path / "nowhere.onnx")
    assert "no such file" in message


def test_load_directory_is_not_a_model(tmp_path):
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    message = _load_error(folder)
    assert "not a file" in message


def test_load_text_file_is_not_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a README,\nnot a model\n")
    message = _load_error(path)
    assert "not a valid ONNX model" in message or "not an ONNX model" in message


def test_load_empty_file_is_not_onnx(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    assert "not an ONNX model" in _load_error(path)


def test_load_truncated_model(tmp_path):
    whole = models.tiny_attention().SerializeToString()
    path = tmp_path / "half.onnx"
    path.write_bytes(whole[: len(whole) // 2])
    message = _load_error(path)
    assert "truncated or corrupt" in message


def test_load_unreadable_file(tmp_path, monkeypatch):
    path = models.write_unchecked(models.tiny_mlp(), tmp_path / "locked.onnx")

    def denied(*args, **kwargs):  # chmod 0 does not stop root, so simulate it
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(io.onnx, "load_model", denied)
    assert "cannot read the file (Permission denied)" in _load_error(path)


# --- load: header checks ---------------------------------------------------------------------


def test_load_opset_newer_than_onnx_knows(tmp_path):
    model = models.tiny_mlp()
    model.opset_import[0].version = onnx.defs.onnx_opset_version() + 5
    path = models.write_unchecked(model, tmp_path / "future_opset.onnx")
    message = _load_error(path)
    assert f"opset {onnx.defs.onnx_opset_version() + 5}" in message


def test_load_ir_version_too_new(tmp_path):
    model = models.tiny_mlp()
    model.ir_version = onnx.IR_VERSION + 1
    path = models.write_unchecked(model, tmp_path / "future_ir.onnx")
    message = _load_error(path)
    assert f"IR version {onnx.IR_VERSION + 1}" in message


def test_load_without_default_opset(tmp_path):
    model = models.tiny_mlp()
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    path = models.write_unchecked(model, tmp_path / "no_default.onnx")
    assert "no default-domain" in _load_error(path)


def test_load_old_opset_warns_but_loads(tmp_path, caplog):
    model = models.tiny_mlp()
    model.opset_import[0].version = 11
    path = models.write_unchecked(model, tmp_path / "old.onnx")
    loaded = io.load(path)
    assert io.default_opset(loaded) == 11
    assert "opset 11 is older" in caplog.text


# --- load: graph structure -------------------------------------------------------------------


def test_load_unknown_domain_names_node_and_domain(tmp_path):
    model = models.tiny_mlp()
    model.graph.node[2].op_type = "FancyRelu"
    model.graph.node[2].domain = "com.example"
    path = models.write_unchecked(model, tmp_path / "custom.onnx")
    message = _load_error(path)
    assert "'relu'" in message and "'com.example'" in message


def test_load_dangling_edge_names_node_and_tensor(tmp_path):
    model = models.tiny_mlp()
    model.graph.node[1].input[1] = "ghost_bias"
    path = models.write_unchecked(model, tmp_path / "dangling.onnx")
    message = _load_error(path)
    assert "'bias1'" in message and "'ghost_bias'" in message and "dangling" in message


def test_load_cycle_names_the_nodes_in_it(tmp_path):
    model = models.tiny_mlp()
    # relu now feeds fc1 back: fc1 -> bias1 -> relu -> fc1; fc2 only hangs off the cycle.
    model.graph.node[0].input[0] = "h2"
    model.graph.node.insert(0, model.graph.node.pop())  # fc2 first, so it is seen first
    path = models.write_unchecked(model, tmp_path / "cycle.onnx")
    message = _load_error(path)
    assert "cycle" in message
    for name in ("fc1", "bias1", "relu"):
        assert f"'{name}'" in message
    assert "'fc2'" not in message, "fc2 is downstream of the cycle, not in it"


def test_load_sorts_an_out_of_order_acyclic_graph(tmp_path):
    model = models.tiny_attention()
    expected = _run(model, x=np.ones((1, 4, 8), np.float32), context=np.ones((1, 6, 8), np.float32))
    shuffled = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    path = models.write_unchecked(model, tmp_path / "reversed.onnx")
    loaded = io.load(path)
    seen = {t.name for t in loaded.graph.initializer} | {v.name for v in loaded.graph.input}
    for node in loaded.graph.node:
        assert all(name in seen for name in node.input), f"{node.name} runs before its inputs"
        seen |= set(node.output)
    got = _run(loaded, x=np.ones((1, 4, 8), np.float32), context=np.ones((1, 6, 8), np.float32))
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)


def test_load_dangling_edge_in_loop_body_names_body_and_node(tmp_path):
    model = models.tiny_loop()
    model.graph.node[0].attribute[0].g.node[0].input[1] = "ghost_step"
    path = models.write_unchecked(model, tmp_path / "loop.onnx")
    message = _load_error(path)
    assert "'accumulate'" in message and "'ghost_step'" in message
    assert "body of 'repeat'" in message


def test_load_dangling_edge_in_if_branch_names_branch_and_node(tmp_path):
    model = models.tiny_if()
    else_branch = next(a for a in model.graph.node[0].attribute if a.name == "else_branch")
    else_branch.g.node[0].input[0] = "ghost_x"
    path = models.write_unchecked(model, tmp_path / "if.onnx")
    message = _load_error(path)
    assert "'else_sub'" in message and "'ghost_x'" in message
    assert "else_branch of 'choose'" in message


def test_load_checker_failure_is_one_line(tmp_path):
    model = models.tiny_mlp()
    model.graph.node[2].op_type = "NoSuchOp"
    path = models.write_unchecked(model, tmp_path / "bad_op.onnx")
    message = _load_error(path)
    assert "invalid model" in message and "NoSuchOp" in message


def test_load_check_false_skips_graph_checks(tmp_path):
    model = models.tiny_mlp()
    model.graph.node[1].input[1] = "ghost_bias"
    path = models.write_unchecked(model, tmp_path / "dangling.onnx")
    loaded = io.load(path, check=False)
    assert loaded.graph.node[1].input[1] == "ghost_bias"


# --- external data -----------------------------------------------------------------------------


def test_save_external_data_round_trip(tmp_path):
    model = models.tiny_attention(dim=32)
    before = model.SerializeToString()
    path = io.save(model, tmp_path / "attn.onnx", external_data=True)
    assert _listing(tmp_path) == {"attn.onnx", "attn.onnx.data"}
    assert model.SerializeToString() == before, "save changed the caller's model"
    assert all(t.HasField("raw_data") for t in model.graph.initializer)
    on_disk = onnx.load_model(str(path), load_external_data=False)
    external = {t.name for t in on_disk.graph.initializer
                if onnx.external_data_helper.uses_external_data(t)}
    assert external == {"Wq", "Wk", "Wv", "Wo"}  # 4 KiB each; the small ones stay inline
    loaded = io.load(path)
    uses_external = onnx.external_data_helper.uses_external_data
    assert not any(uses_external(t) for t in loaded.graph.initializer)
    original, back = _arrays(model), _arrays(loaded)
    assert original.keys() == back.keys()
    for name, value in original.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_save_external_data_restores_typed_fields(tmp_path):
    model = models.tiny_mlp(dim=64)
    w1 = model.graph.initializer[0]
    values = numpy_helper.to_array(w1)
    w1.ClearField("raw_data")
    w1.float_data.extend(values.ravel().tolist())
    before = model.SerializeToString()
    io.save(model, tmp_path / "typed.onnx", external_data=True)
    assert model.SerializeToString() == before
    np.testing.assert_array_equal(_arrays(io.load(tmp_path / "typed.onnx"))["W1"], values)


def test_save_large_tensors_are_aligned(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "ALIGN_THRESHOLD", 2048)
    model = models.tiny_attention(dim=32)
    io.save(model, tmp_path / "a.onnx", external_data=True)
    on_disk = onnx.load_model(str(tmp_path / "a.onnx"), load_external_data=False)
    offsets = [int(onnx.external_data_helper.ExternalDataInfo(t).offset)
               for t in on_disk.graph.initializer if t.external_data]
    assert len(offsets) == 4 and all(offset % 65536 == 0 for offset in offsets)


def test_load_missing_external_data_names_tensor_and_file(tmp_path):
    io.save(models.tiny_attention(dim=32), tmp_path / "attn.onnx", external_data=True)
    (tmp_path / "attn.onnx.data").unlink()
    message = _load_error(tmp_path / "attn.onnx")
    assert "'Wq'" in message and "attn.onnx.data" in message and "missing" in message


def test_load_short_external_data_names_tensor(tmp_path):
    io.save(models.tiny_attention(dim=32), tmp_path / "attn.onnx", external_data=True)
    data = tmp_path / "attn.onnx.data"
    data.write_bytes(data.read_bytes()[:5000])
    message = _load_error(tmp_path / "attn.onnx")
    assert "'Wk'" in message and "past the end of 'attn.onnx.data'" in message


def test_load_external_data_outside_the_folder_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    model = models.tiny_mlp(dim=32)
    w1 = model.graph.initializer[0]
    w1.ClearField("raw_data")
    for key, value in (("location", "../secret.bin"), ("offset", "0"), ("length", "1024")):
        entry = w1.external_data.add()
        entry.key, entry.value = key, value
    w1.data_location = onnx.TensorProto.EXTERNAL
    path = models.write_unchecked(model, inner / "escape.onnx")
    message = _load_error(path)
    assert "'W1'" in message and "outside" in message


def test_save_switches_to_external_data_past_the_protobuf_limit(tmp_path, monkeypatch):
    model = models.tiny_attention(dim=32)
    io.save(model, tmp_path / "inline.onnx")
    assert _listing(tmp_path) == {"inline.onnx"}
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 4096)
    io.save(model, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert (tmp_path / "big.onnx").stat().st_size < (tmp_path / "inline.onnx").stat().st_size
    loaded = io.load(tmp_path / "big.onnx")  # the checker path for large models
    np.testing.assert_array_equal(_arrays(loaded)["Wq"], _arrays(model)["Wq"])


def test_load_large_model_sorts_before_checking(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 4096)
    model = models.tiny_attention(dim=32)
    shuffled = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    io.save(model, tmp_path / "big.onnx")
    loaded = io.load(tmp_path / "big.onnx")
    assert loaded.graph.node[-1].name == "out_proj"


def test_onnxruntime_runs_the_external_data_model_from_its_path(tmp_path):
    model = models.tiny_attention(dim=32, heads=4, q_len=16, kv_len=16)
    # Also a Constant node (4 KiB of scales) goes to the data file.
    model.graph.node[10].input[1] = "scale_const"
    model.graph.node.insert(0, helper.make_node(
        "Constant", [], ["scale_const"], name="scale_constant",
        value=numpy_helper.from_array(np.full((1, 4, 16, 16), 0.25, np.float32)),
    ))
    feeds = {"x": np.ones((1, 16, 32), np.float32),
             "context": np.linspace(-1, 1, 16 * 32, dtype=np.float32).reshape(1, 16, 32)}
    expected = _run(model, **feeds)
    io.save(model, tmp_path / "attn.onnx", external_data=True)
    on_disk = onnx.load_model(str(tmp_path / "attn.onnx"), load_external_data=False)
    assert on_disk.graph.node[0].attribute[0].t.external_data, "the Constant went external"
    got = _run(tmp_path / "attn.onnx", **feeds)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)


def test_onnxruntime_runs_external_data_in_a_loop_body(tmp_path, monkeypatch):
    model = models.tiny_loop()
    body = model.graph.node[0].attribute[0].g
    body.node[0].input[1] = "inner_step"
    body.initializer.append(numpy_helper.from_array(np.full(2, 0.25, np.float32), "inner_step"))
    expected = _run(model, x=np.zeros(2, np.float32))
    monkeypatch.setattr(io, "EXTERNAL_THRESHOLD", 8)
    io.save(model, tmp_path / "loop.onnx", external_data=True)
    on_disk = onnx.load_model(str(tmp_path / "loop.onnx"), load_external_data=False)
    assert on_disk.graph.node[0].attribute[0].g.initializer[0].external_data
    np.testing.assert_allclose(_run(tmp_path / "loop.onnx", x=np.zeros(2, np.float32))[0],
                               expected[0])
    np.testing.assert_allclose(expected[0], [0.75, 0.75])
    back = io.load(tmp_path / "loop.onnx")
    inner = back.graph.node[0].attribute[0].g.initializer[0]
    np.testing.assert_array_equal(numpy_helper.to_array(inner), [0.25, 0.25])


def test_save_refuses_a_model_with_unloaded_external_data(tmp_path):
    io.save(models.tiny_attention(dim=32), tmp_path / "a.onnx", external_data=True)
    lazy = onnx.load_model(str(tmp_path / "a.onnx"), load_external_data=False)
    with pytest.raises(OutputError, match="'Wq' still refers to external data"):
        io.save(lazy, tmp_path / "elsewhere" / "b.onnx")
    assert not (tmp_path / "elsewhere" / "b.onnx").exists()


# --- save: atomic -----------------------------------------------------------------------------


def test_save_leaves_only_the_model(tmp_path):
    path = io.save(models.tiny_mlp(), tmp_path / "out.onnx")
    assert path == tmp_path / "out.onnx"
    assert _listing(tmp_path) == {"out.onnx"}
    assert io.load(path).graph.name == "tiny_mlp"


def test_save_creates_missing_folders(tmp_path):
    path = io.save(models.tiny_mlp(), tmp_path / "a" / "b" / "out.onnx")
    assert path.is_file()


def test_save_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"old")
    io.save(models.tiny_mlp(), path)
    assert io.load(path).graph.name == "tiny_mlp"
    assert _listing(tmp_path) == {"out.onnx"}


def test_failed_serialisation_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"previous contents")

    def explode(model):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(io, "_serialize", explode)
    with pytest.raises(RuntimeError, match="serialisation failed"):
        io.save(models.tiny_mlp(), path)
    assert path.read_bytes() == b"previous contents"
    assert _listing(tmp_path) == {"out.onnx"}


def test_failed_write_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"previous contents")
    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", disk_full)  # after the bytes were written
    with pytest.raises(OutputError, match="No space left") as info:
        io.save(models.tiny_mlp(), path)
    assert str(path) in str(info.value)
    assert path.read_bytes() == b"previous contents"
    assert _listing(tmp_path) == {"out.onnx"}


def test_failed_external_save_leaves_previous_files_and_the_model(tmp_path, monkeypatch):
    model = models.tiny_attention(dim=32)
    io.save(model, tmp_path / "attn.onnx", external_data=True)
    old_model = (tmp_path / "attn.onnx").read_bytes()
    old_data = (tmp_path / "attn.onnx.data").read_bytes()
    before = model.SerializeToString()
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
    changed = model.SerializeToString()
    assert changed != before

    def explode(model):
        raise RuntimeError("serialisation failed")

    monkeypatch.setattr(io, "_serialize", explode)
    with pytest.raises(RuntimeError):
        io.save(model, tmp_path / "attn.onnx", external_data=True)
    assert model.SerializeToString() == changed, "the model was not restored after a failure"
    assert (tmp_path / "attn.onnx").read_bytes() == old_model
    assert (tmp_path / "attn.onnx.data").read_bytes() == old_data
    assert _listing(tmp_path) == {"attn.onnx", "attn.onnx.data"}


# --- save: protected paths --------------------------------------------------------------------


@pytest.fixture
def input_model(tmp_path) -> Path:
    path = tmp_path / "in.onnx"
    io.save(models.tiny_mlp(), path)
    return path


def _assert_refused(model, target, protect, input_path):
    before = input_path.read_bytes()
    listing = _listing(input_path.parent)
    with pytest.raises(OutputError, match="refusing to write over"):
        io.save(model, target, protect=protect)
    assert input_path.read_bytes() == before
    assert _listing(input_path.parent) == listing


def test_save_refuses_the_input_path(input_model):
    _assert_refused(models.tiny_mlp(), input_model, [input_model], input_model)


def test_save_refuses_the_input_given_as_one_path(input_model):
    _assert_refused(models.tiny_mlp(), input_model, str(input_model), input_model)


def test_save_refuses_the_input_through_a_symlink(input_model, tmp_path):
    link = tmp_path / "link.onnx"
    link.symlink_to(input_model)
    _assert_refused(models.tiny_mlp(), link, [input_model], input_model)
    _assert_refused(models.tiny_mlp(), input_model, [link], input_model)


def test_save_refuses_the_input_through_a_hard_link(input_model, tmp_path):
    other = tmp_path / "other.onnx"
    os.link(input_model, other)
    _assert_refused(models.tiny_mlp(), other, [input_model], input_model)


def test_save_refuses_the_input_through_a_relative_path(input_model, tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    _assert_refused(models.tiny_mlp(), Path("..") / "in.onnx", [input_model], input_model)
    monkeypatch.chdir(tmp_path)
    _assert_refused(models.tiny_mlp(), input_model, ["in.onnx"], input_model)


def test_save_refuses_the_inputs_data_file(tmp_path):
    source = tmp_path / "in.onnx"
    io.save(models.tiny_attention(dim=32), source, external_data=True)
    _assert_refused(models.tiny_mlp(), tmp_path / "in.onnx.data", [source], source)


def test_save_refuses_a_data_file_the_input_refers_to(tmp_path):
    # The input was written by another tool with a data file named like our output's.
    model = models.tiny_attention(dim=32)
    onnx.save_model(models.tiny_attention(dim=32), str(tmp_path / "in.onnx"),
                    save_as_external_data=True, location="out.onnx.data", size_threshold=1024)
    data_before = (tmp_path / "out.onnx.data").read_bytes()
    with pytest.raises(OutputError, match="external data of the input"):
        io.save(model, tmp_path / "out.onnx", external_data=True, protect=[tmp_path / "in.onnx"])
    assert (tmp_path / "out.onnx.data").read_bytes() == data_before
    assert not (tmp_path / "out.onnx").exists()


def test_save_allows_names_that_merely_start_like_the_input(input_model, tmp_path):
    for name in ("in.onnx.opt.onnx", "in.onnx2", "in.opt.onnx"):
        io.save(models.tiny_mlp(), tmp_path / name, protect=[input_model])
        assert (tmp_path / name).is_file()


def test_save_refuses_a_directory(tmp_path):
    folder = tmp_path / "out.onnx"
    folder.mkdir()
    with pytest.raises(OutputError, match="is a directory"):
        io.save(models.tiny_mlp(), folder)
    assert list(folder.iterdir()) == []
    assert _listing(tmp_path) == {"out.onnx"}


def test_save_into_a_file_as_folder_is_an_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot write"):
        io.save(models.tiny_mlp(), tmp_path / "file" / "out.onnx")


# --- shape inference on large models (ir.infer_shapes) -----------------------------------------


def test_infer_shapes_with_a_large_initializer_matches_onnx():
    model = models.large_weight_model(1 << 17)
    assert model.graph.initializer[0].ByteSize() >= 1 << 16  # takes the skeleton path
    before = model.SerializeToString()
    ours = ir.infer_shapes(model)
    plain = onnx.shape_inference.infer_shapes(model, data_prop=True)
    assert model.SerializeToString() == before, "infer_shapes changed its argument"
    assert {v.name for v in ours.graph.value_info} == {"h", "r"}
    assert list(ours.graph.value_info) == list(plain.graph.value_info)
    assert _arrays(ours).keys() == _arrays(model).keys(), "weights lost on the way"
    np.testing.assert_array_equal(_arrays(ours)["W"], _arrays(model)["W"])


def test_a_large_model_is_checked_without_a_copy_of_its_weights_and_still_checked(
        tmp_path, monkeypatch):
    # Over CHECK_VIEW_BYTES the checker sees a view without the large weights; each weight is
    # checked on its own, so a truncated one is still named.
    monkeypatch.setattr(io, "CHECK_VIEW_BYTES", 1)
    model = models.large_weight_model(2**21)
    good = models.write_unchecked(model, tmp_path / "good.onnx")
    assert io.load(good).SerializeToString() == model.SerializeToString()
    weight = model.graph.initializer[0]
    weight.raw_data = weight.raw_data[:-4]
    bad = models.write_unchecked(model, tmp_path / "bad.onnx")
    message = _load_error(bad)
    # Named by the structure check (before the checker) or by the checker's own look at it.
    assert weight.name in message and ("invalid model" in message or "raw_data" in message)
