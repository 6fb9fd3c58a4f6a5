"""Nothing the CLI writes lands on its input, on a non-regular file, or over a good earlier
output: every target goes through ``xattn_compiler.outputs`` (one guard, atomic writes, staged
commits), and ``--verify`` checks the files as written before they replace anything."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests import models
from tests.test_passmanager import REGISTRY, relu_chain
from xattn_compiler import cli, io, outputs
from xattn_compiler.errors import CheckFailed, OutputError, PassError
from xattn_compiler.passmanager import Pipeline


@pytest.fixture
def source(tmp_path) -> Path:
    """An attention model with its weights (64 KiB each: read lazily) in ``in.onnx.data``."""
    folder = tmp_path / "in"
    return io.save(models.tiny_attention(dim=128), folder / "in.onnx", external_data=True)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([*argv, "-q"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _refused(capsys, *argv: str) -> str:
    code, err = _run(capsys, *argv)
    assert code == 2, err
    assert err.startswith("xattn-compiler: error: ") and err.count("\n") == 1, err
    return err


def _no_leftovers(folder: Path) -> None:
    hidden = [p.name for p in folder.rglob(".*")]
    assert not hidden, f"temporary files left behind: {hidden}"


# --- never the input or its data -----------------------------------------------------------------


def test_report_over_the_inputs_data_file(source, capsys):
    before = _snapshot(source.parent)
    err = _refused(capsys, "optimize", str(source), "-o", str(source.parent / "out.onnx"),
                   "--report", str(source.parent / "in.onnx.data"))
    assert "in.onnx.data" in err and "refusing to write over external data" in err
    assert _snapshot(source.parent) == before  # and no output: refused before any work


def test_report_over_a_data_file_the_input_names(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    model = models.tiny_attention(dim=32)
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)
    before = _snapshot(folder)
    err = _refused(capsys, "optimize", str(folder / "m.onnx"), "-o", str(tmp_path / "o.onnx"),
                   "--report", str(folder / "sub" / ".." / "weights.bin"))
    assert "weights.bin" in err
    assert _snapshot(folder) == before


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_output_through_a_link_to_the_input(link, source, tmp_path, capsys):
    target = tmp_path / "out.onnx"
    (os.symlink if link == "symlink" else os.link)(source, target)
    before = _snapshot(source.parent)
    err = _refused(capsys, "optimize", str(source), "-o", str(target))
    assert "refusing to write over the input model" in err
    assert _snapshot(source.parent) == before


def test_output_whose_data_file_is_the_inputs_data(source, tmp_path, capsys):
    os.link(source.parent / "in.onnx.data", tmp_path / "out.onnx.data")
    before = _snapshot(source.parent)
    err = _refused(capsys, "optimize", str(source), "-o", str(tmp_path / "out.onnx"))
    assert "out.onnx.data" in err and "external data of the input" in err
    assert _snapshot(source.parent) == before


def test_reproducer_dir_holding_the_input(tmp_path, capsys):
    # `--reproducer DIR` writes DIR/input.onnx: refused up front when that is the input.
    source = io.save(models.tiny_attention(dim=32), tmp_path / "input.onnx")
    before = source.read_bytes()
    err = _refused(capsys, "optimize", str(source), "-o", str(tmp_path / "out.onnx"),
                   "--reproducer", str(tmp_path))
    assert "input.onnx" in err and "refusing to write over the input model" in err
    assert source.read_bytes() == before


def test_reproducer_of_a_failing_pass_never_writes_over_the_input(tmp_path, caplog):
    source = io.save(relu_chain(3), tmp_path / "input.onnx")
    before = source.read_bytes()
    pipeline = Pipeline.parse("drop-one-relu,crashes", REGISTRY, reproducer=tmp_path)
    with outputs.protecting(source), pytest.raises(PassError):  # the pass failure, not ours
        pipeline.run(io.load(source))
    assert source.read_bytes() == before
    assert "could not write the reproducer" in caplog.text


# --- never a non-regular file ----------------------------------------------------------------


def _special(kind: str, path: Path) -> Path:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        try:  # /dev/null's numbers: a device of our own, never the machine's
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except (PermissionError, OSError) as exc:
            pytest.skip(f"cannot create a character device here: {exc}")
    return path


@pytest.mark.parametrize("kind", ["character-device", "fifo", "directory"])
@pytest.mark.parametrize("option", ["-o", "--report"])
def test_output_over_a_non_regular_file(kind, option, source, tmp_path, capsys):
    target = _special(kind, tmp_path / "target")
    argv = ["optimize", str(source), "-o", str(tmp_path / "out.onnx")]
    argv += [option, str(target)] if option == "--report" else []
    if option == "-o":
        argv[3] = str(target)
    err = _refused(capsys, *argv)
    assert str(target) in err and "not a regular file" in err
    mode = os.lstat(target).st_mode
    assert {"character-device": stat.S_ISCHR, "fifo": stat.S_ISFIFO,
            "directory": stat.S_ISDIR}[kind](mode)
    assert not (tmp_path / "out.onnx").exists()


def test_output_data_file_that_is_a_fifo(source, tmp_path, capsys):
    # A model whose weights are streamed (lazily loaded) always gets a .data file.
    _special("fifo", tmp_path / "out.onnx.data")
    err = _refused(capsys, "optimize", str(source), "-o", str(tmp_path / "out.onnx"))
    assert "out.onnx.data" in err and "FIFO" in err


# --- never destroy an earlier output ----------------------------------------------------------


def _written(capsys, source: Path, out: Path, *extra: str) -> dict[str, bytes]:
    code, err = _run(capsys, "optimize", str(source), "-o", str(out), *extra)
    assert code == 0, err
    return _snapshot(out.parent)


def test_failed_second_run_keeps_the_earlier_output(source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "model.onnx"
    first = _written(capsys, source, out)
    assert "model.onnx.data" in first

    def failed(*args, **kwargs):
        from xattn_compiler.verification import VerifyResult

        return VerifyResult(False, [], {}, "forced mismatch")

    monkeypatch.setattr(cli, "_verify", failed)
    code, err = _run(capsys, "optimize", str(source), "-o", str(out), "--verify",
                     "--target", "canonical")
    assert code == 1 and "was not written" in err
    assert _snapshot(out.parent) == first
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_for_the_output(error, source, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out" / "model.onnx"
    first = _written(capsys, source, out)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == out and ".previous" not in str(src):
            raise OSError(error, os.strerror(error))  # the data file moved already: undo it
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    err = _refused(capsys, "optimize", str(source), "-o", str(out), "--target", "canonical")
    assert str(out) in err and os.strerror(error) in err
    assert _snapshot(out.parent) == first
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_for_the_report(error, source, tmp_path, capsys, monkeypatch):
    report = tmp_path / "r.json"

    fsync = outputs._fsync

    def full(path):  # after the bytes went to the temporary file
        if Path(path).name.startswith(".r.json."):
            raise OSError(error, os.strerror(error))
        fsync(path)

    monkeypatch.setattr(outputs, "_fsync", full)
    err = _refused(capsys, "optimize", str(source), "-o", str(tmp_path / "out.onnx"),
                   "--report", str(report))
    assert str(report) in err and os.strerror(error) in err
    assert not report.exists() and not (tmp_path / "out.onnx").exists()
    _no_leftovers(tmp_path)


def test_unwritable_output_folder(source, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _refused(capsys, "optimize", str(source), "-o", str(tmp_path / "file" / "o.onnx"))
    assert "not a directory" in err.lower()


# --- --verify checks the files as written ---------------------------------------------------------


def test_verify_checks_the_files_as_written(tmp_path, capsys, monkeypatch):
    source = io.save(models.tiny_attention(dim=32), tmp_path / "in.onnx")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier output")
    serialize = io._serialize

    def corrupted(model):  # what reaches the disk differs from the model in memory
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        weight = copy.graph.initializer[0]
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 2, weight.name))
        return serialize(copy)

    monkeypatch.setattr(io, "_serialize", corrupted)
    code, err = _run(capsys, "optimize", str(source), "-o", str(out), "--verify")
    assert code == 1 and "was not written" in err
    assert out.read_bytes() == b"an earlier output"
    _no_leftovers(tmp_path)


def test_verify_refuses_a_written_model_that_does_not_load(tmp_path, capsys, monkeypatch):
    source = tmp_path / "in.onnx"
    onnx.save_model(models.tiny_attention(dim=32), str(source), save_as_external_data=True,
                    location="in.onnx.data", size_threshold=0)
    monkeypatch.setattr(io, "_put_inline", lambda tensor, raw: None)  # the old dangling stub
    monkeypatch.setattr(io, "INLINE_BYTES", 1)
    code, err = _run(capsys, "optimize", str(source), "-o", str(tmp_path / "out.onnx"),
                     "--verify")
    assert code == 1 and "does not load" in err
    assert not (tmp_path / "out.onnx").exists()


# --- the guard on its own ----------------------------------------------------------------------


def test_guard_sees_the_input_through_every_spelling(source, tmp_path, monkeypatch):
    monkeypatch.chdir(source.parent)
    guard = outputs.Guard([source])
    for spelling in ("in.onnx", "./in.onnx", "../in/in.onnx", str(source),
                     "in.onnx.data", str(source.parent / "x" / ".." / "in.onnx.data")):
        assert guard.protects(spelling), spelling
    assert guard.protects("in.onnx2") is None and guard.protects("in.onnx.data2") is None


def test_save_checked_leaves_no_trace_when_the_check_refuses(tmp_path):
    out = tmp_path / "out.onnx"

    def refuse(path: Path) -> None:
        assert path.is_file() and path != out  # staged beside the target, complete
        np.testing.assert_equal(
            numpy_helper.to_array(io.load(path).graph.initializer[0]),
            numpy_helper.to_array(models.tiny_mlp().graph.initializer[0]))
        raise CheckFailed("no")

    with pytest.raises(CheckFailed):
        outputs.save_checked(models.tiny_mlp(), out, refuse)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_error_names_the_target(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.os, "replace", lambda *a: (_ for _ in ()).throw(
        OSError(errno.EACCES, "Permission denied")))
    with pytest.raises(OutputError, match=r"r\.json: cannot write \(Permission denied\)"):
        outputs.write_json(tmp_path / "r.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_report_at_the_output_path(source, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    err = _refused(capsys, "optimize", str(source), "-o", str(out), "--report",
                   str(tmp_path / "." / "out.onnx"))
    assert "--report" in err and not out.exists()
