"""The model zoo: every small model exports (cached), is a valid graph, matches torch in ONNX
Runtime and has an honest manifest; the listing, lookup, cache and CLI around it."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from xattn_compiler import zoo
from xattn_compiler.cli import main
from xattn_compiler.errors import InputError
from xattn_compiler.zoo import cache as zoo_cache
from xattn_compiler.zoo.export import ExportedModel, requirements_missing
from xattn_compiler.zoo.spec import Attention, Built, ZooModel

# zoo.export is the function; the module of the same name comes from the import system.
zoo_export = importlib.import_module("xattn_compiler.zoo.export")
MODELS = zoo.all_models()
SMALL = [m for m in MODELS if "small" in m.sizes]
MANIFEST_FIELDS = {
    "name", "family", "description", "size", "exporter", "opset", "dtype", "versions",
    "inputs", "outputs", "attention", "static_inputs", "kv_source_kind", "config", "notes",
    "op_histogram", "fused_attention_ops", "export_seconds", "tolerance",
}
#: Families of this module's author whose dims the dynamic-shape test knows how to vary.
TEXT_FAMILIES = ("whisper", "t5", "bart")


def _skip_if_missing(model: ZooModel) -> None:
    missing = requirements_missing(model)
    if missing:
        pytest.skip(f"{model.name} needs {', '.join(missing)}, not installed here")


@pytest.fixture(scope="module", params=SMALL, ids=[m.name for m in SMALL])
def small_export(request, export_cache) -> tuple[ZooModel, ExportedModel]:
    model = request.param
    _skip_if_missing(model)
    return model, zoo.cached_export(model.name, export_cache)


# --- listing and lookup (no torch) -----------------------------------------------------------

def test_models_are_sorted_unique_and_well_formed():
    names = [m.name for m in MODELS]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for model in MODELS:
        assert model.name == model.name.lower() and " " not in model.name
        assert model.description and model.family
    assert {"whisper-decoder-eager", "whisper-decoder-sdpa", "whisper-decoder-sdpa-opset23",
            "whisper-decoder-fp16", "t5-decoder-eager", "bart-decoder-eager",
            "bart-decoder-sdpa", "bart-encoder-decoder"} <= set(names)


def test_unknown_name_is_an_input_error_naming_close_matches():
    with pytest.raises(InputError, match="whisper-decoder-eager"):
        zoo.get_model("whisper-decoder-eagre")
    with pytest.raises(InputError, match="no zoo model named 'zzz'"):
        zoo.get_model("zzz")


def test_listing_and_a_cache_hit_do_not_import_torch(tmp_path):
    entry = zoo_cache.entry_dir(zoo.get_model("whisper-decoder-eager"), "small", tmp_path)
    _fake_export(entry)
    code = (
        "import sys\n"
        "from xattn_compiler import zoo\n"
        "from xattn_compiler.cli import main\n"
        "zoo.all_models()\n"
        "main(['zoo', 'list', '--json'])\n"
        f"hit = zoo.cached_export('whisper-decoder-eager', {str(tmp_path)!r})\n"
        "assert hit.manifest['name'] == 'fake', hit.manifest\n"
        "sys.stderr.write('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.endswith("NO-TORCH")


def test_cache_key_depends_on_size_and_fields_and_is_stable():
    model = zoo.get_model("whisper-decoder-eager")
    other = zoo.get_model("whisper-decoder-sdpa")
    key = zoo_cache.cache_key(model, "small")
    assert key == zoo_cache.cache_key(model, "small")
    assert key != zoo_cache.cache_key(model, "bench")
    assert key != zoo_cache.cache_key(other, "small")


def test_cache_key_follows_the_family_files_a_model_is_built_from(monkeypatch):
    """Editing one family re-exports its models and the families built on it, not the zoo."""
    whisper, detr = zoo.get_model("whisper-decoder-eager"), zoo.get_model("detr-decoder")
    assert [p.name for p in zoo_cache._family_files(detr)] == ["detr.py", "torch_nn.py"]
    keys = {m.name: zoo_cache.cache_key(m, "small") for m in (whisper, detr)}
    real = zoo_cache._source_digest

    def torch_nn_edited(path):
        return "edited" if path is not None and path.name == "torch_nn.py" else real(path)

    monkeypatch.setattr(zoo_cache, "_source_digest", torch_nn_edited)
    assert zoo_cache.cache_key(whisper, "small") == keys["whisper-decoder-eager"]
    assert zoo_cache.cache_key(detr, "small") != keys["detr-decoder"]


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XATTN_CACHE", str(tmp_path))
    assert zoo_cache.default_cache_dir() == tmp_path
    monkeypatch.delenv("XATTN_CACHE")
    assert zoo_cache.default_cache_dir() == Path.home() / ".cache" / "xattn-compiler"


def test_missing_requirement_is_an_input_error(tmp_path):
    model = ZooModel("needs-nothing-real", "test", "x", _never_built,
                     requires=("no_such_module_for_xattn",))
    with pytest.raises(InputError, match="no_such_module_for_xattn"):
        zoo_export.export_model(model, tmp_path)
    with pytest.raises(InputError, match="no size 'bench'"):
        zoo_export.export_model(model, tmp_path, size="bench")


def _never_built(size: str) -> Built:
    raise AssertionError("the builder must not run")


# --- the cache -------------------------------------------------------------------------------

def _fake_export(directory: Path, name: str = "fake") -> ExportedModel:
    """A complete export directory with placeholder contents."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(b"not a model")
    with open(directory / "sample.npz", "wb") as f:
        np.savez(f, x=np.zeros(2, np.float32), **{"ref:y": np.ones(2, np.float32)})
    (directory / "manifest.json").write_text(json.dumps({"name": name}))
    return ExportedModel(directory)


def test_a_cache_miss_exports_once_then_hits(tmp_path, monkeypatch):
    calls = []

    def fake_export_model(model, out_dir, size):
        calls.append((model.name, size))
        return _fake_export(Path(out_dir))

    monkeypatch.setattr(zoo_export, "export_model", fake_export_model)
    first = zoo.cached_export("bart-decoder-eager", tmp_path)
    second = zoo.cached_export("bart-decoder-eager", tmp_path)
    assert calls == [("bart-decoder-eager", "small")]
    assert first.path == second.path and first.path.is_file()
    inputs, references = second.sample()
    assert list(inputs) == ["x"] and list(references) == ["y"]
    assert [p.name for p in tmp_path.iterdir()] == [first.directory.name]  # no temp dir left


def test_a_damaged_entry_is_exported_again(tmp_path, monkeypatch):
    model = zoo.get_model("bart-decoder-eager")
    entry = zoo_cache.entry_dir(model, "small", tmp_path)
    _fake_export(entry, name="old")
    (entry / "sample.npz").unlink()
    monkeypatch.setattr(zoo_export, "export_model",
                        lambda model, out_dir, size: _fake_export(Path(out_dir), name="new"))
    assert zoo.cached_export(model.name, tmp_path).manifest["name"] == "new"


def test_an_entry_finished_concurrently_is_kept(tmp_path, monkeypatch):
    model = zoo.get_model("bart-decoder-eager")
    entry = zoo_cache.entry_dir(model, "small", tmp_path)

    def racing_export_model(model, out_dir, size):
        _fake_export(entry, name="winner")  # another process renames its entry first
        return _fake_export(Path(out_dir), name="loser")

    monkeypatch.setattr(zoo_export, "export_model", racing_export_model)
    result = zoo.cached_export(model.name, tmp_path)
    assert result.directory == entry and result.manifest["name"] == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]


def test_a_failed_export_leaves_no_entry(tmp_path, monkeypatch):
    def failing_export_model(model, out_dir, size):
        (Path(out_dir) / "model.onnx").write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(zoo_export, "export_model", failing_export_model)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        zoo.cached_export("bart-decoder-eager", tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- the CLI ---------------------------------------------------------------------------------

def test_cli_zoo_list(capsys):
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [m.name for m in MODELS]
    assert main(["zoo", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == [m.name for m in MODELS]
    assert set(rows[0]) == {"name", "family", "exporter", "opset", "dtype", "sizes",
                            "description"}


def test_cli_zoo_export_unknown_name_exits_2(tmp_path, capsys):
    assert main(["zoo", "export", "whisper-decoder-eagre", "-o", str(tmp_path)]) == 2
    assert "did you mean 'whisper-decoder-eager'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_zoo_export_size_the_model_lacks_exits_2(tmp_path, capsys):
    small_only = next((m for m in MODELS if m.sizes == ("small",)), None)
    if small_only is None:
        pytest.skip("every zoo model offers a bench size")
    assert main(["zoo", "export", small_only.name, "-o", str(tmp_path), "--size", "bench"]) == 2
    assert "no size 'bench'" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_zoo_export_writes_the_files_and_prints_the_manifest(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["zoo", "export", "bart-decoder-eager", "-o", str(tmp_path), "-q"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(tmp_path / "manifest.json")  # only the path: torch's prints are logged
    assert json.loads(Path(out).read_text())["name"] == "bart-decoder-eager"
    assert {p.name for p in tmp_path.iterdir()} == {"model.onnx", "sample.npz",
                                                    "manifest.json"}


# --- every small model (slow: exports with torch, cached) -------------------------------------

@pytest.mark.slow
def test_export_is_a_valid_graph(small_export):
    _, exported = small_export
    onnx.checker.check_model(onnx.load(exported.path), full_check=True)


@pytest.mark.slow
def test_export_matches_torch_in_onnxruntime(small_export):
    _, exported = small_export
    check = zoo.check_export(exported)
    assert check.ok, check.summary()


@pytest.mark.slow
def test_manifest_describes_the_export(small_export):
    model, exported = small_export
    manifest = exported.manifest
    assert MANIFEST_FIELDS <= set(manifest), MANIFEST_FIELDS - set(manifest)
    assert (manifest["name"], manifest["family"], manifest["size"]) == (
        model.name, model.family, "small")
    assert manifest["dtype"] == model.dtype and manifest["exporter"] == model.exporter
    assert manifest["opset"] == model.opset  # read back from the file
    graph_inputs = [value["name"] for value in manifest["inputs"]]
    assert set(manifest["static_inputs"]) <= set(graph_inputs)
    inputs, references = exported.sample()
    assert list(inputs) == graph_inputs
    assert list(references) == [value["name"] for value in manifest["outputs"]]
    attention = manifest["attention"]
    if attention["self"] + attention["cross"] > 0:
        histogram = manifest["op_histogram"]
        assert histogram.get("Softmax", 0) + manifest["fused_attention_ops"] > 0, histogram
    assert sum(manifest["op_histogram"].values()) > 0


@pytest.mark.slow
def test_opset23_export_records_its_attention_ops(export_cache):
    pytest.importorskip("transformers")
    manifest = zoo.cached_export("whisper-decoder-sdpa-opset23", export_cache).manifest
    # torch 2.13 lowers scaled_dot_product_attention to the ONNX Attention op at opset 23: one
    # per self- and one per cross-attention. A torch that stops doing so fails here on purpose.
    attention = manifest["attention"]
    assert manifest["fused_attention_ops"] == attention["self"] + attention["cross"]
    assert manifest["op_histogram"]["Attention"] == manifest["fused_attention_ops"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [m.name for m in SMALL if m.family in TEXT_FAMILIES])
def test_dynamic_dims_really_are_dynamic(name, export_cache):
    """Other batch/sequence sizes (1s included, which torch.export likes to specialise) run and
    match a freshly built torch model."""
    pytest.importorskip("transformers")
    import torch

    from xattn_compiler.verification import run_model

    model = zoo.get_model(name)
    exported = zoo.cached_export(name, export_cache)
    built = model.build("small")
    if model.dtype == "float16":
        zoo_export._cast_half(built)
    rtol, atol_factor = zoo_export.tolerance_for(model)
    for sizes in ({"batch": 1, "seq": 1, "enc_len": 1, "src_len": 1},
                  {"batch": 3, "seq": 7, "enc_len": 20, "src_len": 9}):
        inputs = _resized_inputs(built, sizes)
        with torch.no_grad():
            reference = built.module(*inputs.values()).numpy()
        feeds = {key: value.numpy() for key, value in inputs.items()}
        actual = run_model(exported.path, feeds)[built.output_names[0]]
        atol = atol_factor * max(1.0, float(np.abs(reference.astype(np.float64)).max()))
        np.testing.assert_allclose(actual.astype(np.float64), reference.astype(np.float64),
                                   rtol=rtol, atol=atol)


def _resized_inputs(built: Built, sizes: dict[str, int]) -> dict:
    import torch

    generator = torch.Generator().manual_seed(1)
    resized = {}
    for name, sample in built.inputs.items():
        shape = list(sample.shape)
        for axis, dim in built.dynamic_dims.get(name, {}).items():
            shape[axis] = sizes[dim]
        if sample.is_floating_point():
            resized[name] = torch.randn(shape, generator=generator).to(sample.dtype)
        else:  # token ids: stay inside the sample's (the vocabulary's) range
            resized[name] = torch.randint(0, int(sample.max()) + 1, shape, generator=generator)
    return resized


@pytest.mark.slow
def test_export_is_deterministic(tmp_path):
    pytest.importorskip("transformers")
    first = zoo.export("whisper-decoder-eager", tmp_path / "a")
    second = zoo.export("whisper-decoder-eager", tmp_path / "b")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert (first.directory / "sample.npz").read_bytes() == (
        second.directory / "sample.npz").read_bytes()


@pytest.mark.slow
def test_a_real_cache_hit_returns_the_same_file_without_exporting(export_cache, monkeypatch):
    pytest.importorskip("transformers")
    first = zoo.cached_export("bart-decoder-eager", export_cache)
    stamp = first.path.stat().st_mtime_ns

    def no_export(*args, **kwargs):
        raise AssertionError("a cache hit must not export")

    monkeypatch.setattr(zoo_export, "export_model", no_export)
    second = zoo.cached_export("bart-decoder-eager", export_cache)
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp


@pytest.mark.slow
@pytest.mark.parametrize("name", ["t5-decoder-sdpa"])
def test_known_export_failures_still_fail(name, tmp_path):
    """Variants kept out of the zoo because they do not export. When a newer torch exports
    one, this fails so that the variant gets added to its family's MODELS."""
    pytest.importorskip("transformers")
    from xattn_compiler.zoo.families import t5

    build, expected = t5.KNOWN_FAILURES[name]
    model = ZooModel(name, "t5", "known failure", build, requires=("torch", "transformers"))
    with pytest.raises(Exception) as failure:  # noqa: B017 (torch raises assorted types)
        zoo_export.export_model(model, tmp_path)
    assert expected in zoo_export.root_cause(failure.value)


def test_attention_truth_serialises():
    truth = Attention(self=2, cross=2, num_heads=4, head_dim=16)
    assert truth.to_dict() == {"self": 2, "cross": 2, "num_heads": 4, "head_dim": 16,
                               "blocks": []}


def _batch_must_be_two(size: str) -> Built:
    """A module whose batch dim cannot stay dynamic (it reshapes to a literal 2)."""
    import torch

    class FixedBatch(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x.reshape(2, x.shape[1] * 4), dim=-1)

    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    return Built(module=FixedBatch(), inputs={"x": x}, output_names=["y"],
                 attention=Attention(self=0, cross=0), static_inputs=[],
                 dynamic_dims={"x": {0: "batch", 1: "seq"}})


@pytest.mark.slow
def test_a_dim_that_cannot_stay_dynamic_goes_static_with_a_note(tmp_path):
    pytest.importorskip("torch")
    model = ZooModel("fixed-batch", "test", "batch specialised to 2", _batch_must_be_two)
    exported = zoo_export.export_model(model, tmp_path)
    manifest = exported.manifest
    assert manifest["inputs"][0]["shape"] == [2, "seq", 4]
    # torch.onnx relaxes a refused named Dim itself; either way the manifest must say so.
    assert "x axis 0 ('batch') exported static: 2" in manifest["notes"]
    assert zoo.check_export(exported).ok
    # A class defined in a function is recorded without "<locals>" in the node metadata.
    metadata = [p.value for n in onnx.load(exported.path).graph.node for p in n.metadata_props]
    assert any("FixedBatch" in value for value in metadata)
    assert not any("<locals>" in value for value in metadata)
