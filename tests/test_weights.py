"""Detached weights: passes run on stubs, the bytes never copied, and nothing lost on the way out."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import xattn_compiler as xc
from xattn_compiler import io, ir, weights, zoo
from xattn_compiler.io import load, save
from xattn_compiler.ir import import_with_shapes
from xattn_compiler.passmanager import graph_problem
from xattn_compiler.verification import verify


@pytest.fixture
def whisper():
    exported = zoo.cached_export("whisper-decoder-eager")
    return load(exported.path), exported.sample()[0]


@pytest.fixture
def small_threshold(monkeypatch):
    """Detach every tensor of 1 KiB or more, and any model: the small zoo exercises the path."""
    monkeypatch.setattr(weights, "DETACH_TENSOR_BYTES", 1024)
    monkeypatch.setattr("xattn_compiler.pipeline.DETACH_MODEL_BYTES", 1)


def _arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_detach_leaves_the_model_alone_and_materialize_gives_it_back(whisper, small_threshold):
    model, _ = whisper
    before = model.SerializeToString()
    light, store = weights.detach(model)
    assert model.SerializeToString() == before
    assert weights.has_stubs(light) and light.ByteSize() < model.ByteSize() // 4
    assert store.nbytes > 0.9 * sum(len(t.raw_data) for t in model.graph.initializer)
    restored = weights.materialize(light)
    assert restored.SerializeToString() == before


def test_graphsurgeon_reads_a_stub_through_its_store(whisper, small_threshold):
    model, _ = whisper
    light, _store = weights.detach(model)
    graph = import_with_shapes(light)
    name = max(model.graph.initializer, key=lambda t: len(t.raw_data)).name
    tensor = next(t for t in graph.tensors().values() if t.name == name)
    np.testing.assert_array_equal(tensor.values, _arrays(model)[name])


def test_the_checker_sees_a_detached_model_as_valid(whisper, small_threshold):
    light, _store = weights.detach(whisper[0])
    assert graph_problem(light) is None


def test_optimize_runs_detached_and_gives_the_same_model(whisper, small_threshold, tmp_path):
    model, inputs = whisper
    result = xc.optimize(model)
    assert weights.has_stubs(result.detached)
    plain = xc.optimize(model, debug=True)  # debug: every pass's output checked, stubs and all
    assert result.model.SerializeToString() == plain.model.SerializeToString()
    assert verify(model, result.model, inputs=inputs).ok
    written = result.save(tmp_path / "out.onnx")
    assert (tmp_path / "out.onnx.data").is_file()
    again = load(written)
    assert verify(model, again, inputs=inputs).ok
    assert _arrays(again).keys() == _arrays(result.model).keys()


def test_lazily_loaded_weights_stay_in_their_file_until_saved(whisper, tmp_path):
    model, inputs = whisper
    source = save(model, tmp_path / "in.onnx", external_data=True)
    lazy = load(source, lazy_weights=True)
    assert all(not t.HasField("raw_data") for t in weights.stubs(lazy))
    on_disk = onnx.load_model(str(source), load_external_data=False)
    external = [t.name for t in ir.iter_tensors(on_disk) if t.external_data]
    large = {t.name for t in ir.iter_tensors(on_disk) if t.external_data
             and io.packed_nbytes(t) >= io.INLINE_BYTES}
    assert len(external) > len(large) >= 4  # both kinds are present
    assert {t.name for t in weights.stubs(lazy)} == large
    out = save(lazy, tmp_path / "copy.onnx", protect=[source])
    np.testing.assert_equal(_arrays(load(out)), _arrays(model))
    assert verify(model, lazy, inputs=inputs).ok


def test_a_stub_without_its_store_is_an_error_that_says_so(whisper, small_threshold):
    light, store = weights.detach(whisper[0])
    del store
    gc.collect()
    stub = next(weights.stubs(light))
    with pytest.raises(RuntimeError, match="store no longer exists"):
        weights.source_of(stub)


def test_a_missing_external_data_file_is_named_when_loading_lazily(whisper, tmp_path):
    source = save(whisper[0], tmp_path / "in.onnx", external_data=True)
    (tmp_path / "in.onnx.data").unlink()
    with pytest.raises(xc.XattnError, match="in.onnx.data"):
        load(source, lazy_weights=True)


@pytest.mark.parametrize("name", ["bart-decoder-eager", "whisper-decoder-eager", "unet2d-tiny"])
def test_a_pass_that_reads_a_detached_weight_exports_its_bytes(name, small_threshold, tmp_path):
    # graphsurgeon keeps an imported constant's data_location when its values are read (and
    # so loaded); exported with that flag, the bytes would claim to live in a file.
    exported = zoo.cached_export(name)
    model = load(exported.path)
    result = xc.optimize(model)
    for tensor in weights._all_tensors(result.detached):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            assert weights.is_stub(tensor), tensor.name
    assert verify(model, result.model, inputs=exported.sample()[0]).ok
    # Fusion upgrades the opset with the weights detached: every block is still fused.
    blocks = exported.manifest["attention"]
    fused = sum(n.op_type == "Attention" for n in result.detached.graph.node)
    assert fused == blocks["self"] + blocks["cross"]


def test_a_detached_weight_that_was_read_exports_with_its_bytes(small_threshold):
    from onnx import TensorProto, helper

    from xattn_compiler.ir import export_model
    from xattn_compiler.ir import import_with_shapes as imported

    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    light, _store = weights.detach(model)
    g = imported(light)
    constant = next(t for t in g.tensors().values() if t.name == "w")
    assert constant.values.sum() == weight_sum(model)  # a pass reads it, changes nothing
    out = export_model(g, light)
    tensor = out.graph.initializer[0]
    assert tensor.data_location != TensorProto.EXTERNAL and len(tensor.raw_data) == 64 * 64 * 4
    assert verify(model, out).ok


def weight_sum(model):
    return numpy_helper.to_array(model.graph.initializer[0]).sum()


def _transposed_weight_model() -> onnx.ModelProto:
    """y = x @ Transpose(W): a weight stored [out, in] (a tied embedding, say), whose
    Transpose the layout passes fold into a new constant."""
    w = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
         onnx.helper.make_node("MatMul", ["x", "Wt"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 300])],
        [numpy_helper.from_array(w, "W")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def test_a_weight_a_pass_computes_stays_detached_and_comes_back_the_same(small_threshold,
                                                                          monkeypatch):
    model = _transposed_weight_model()
    result = xc.optimize(model, "remove-layout-clutter")
    assert weights.has_stubs(result.detached)
    (folded,) = [t for t in result.detached.graph.initializer if t.name != "W"]
    assert weights.is_stub(folded) and folded.ByteSize() < 200  # a stub, not 75 kB of values
    monkeypatch.setattr("xattn_compiler.pipeline.DETACH_MODEL_BYTES", 1 << 40)
    inline = xc.optimize(model, "remove-layout-clutter")
    assert not weights.has_stubs(inline.detached)
    assert result.model.SerializeToString() == inline.model.SerializeToString()
    x = np.ones((2, 64), np.float32)
    assert verify(model, result.model, inputs={"x": x}).ok


def test_a_weight_computed_from_a_lazily_loaded_one_is_saved_with_its_bytes(tmp_path):
    model = _transposed_weight_model()
    save(model, tmp_path / "in.onnx", external_data=True)
    lazy = load(tmp_path / "in.onnx", lazy_weights=True)
    assert weights.has_stubs(lazy)
    result = xc.optimize(lazy, "remove-layout-clutter")
    folded = [t for t in result.detached.graph.initializer if t.name != "W"]
    assert folded and all(weights.is_stub(t) for t in folded)  # in the run's own store
    written = load(result.save(tmp_path / "out.onnx"))
    assert "Transpose" not in {n.op_type for n in written.graph.node}
    assert verify(model, written, inputs={"x": np.ones((2, 64), np.float32)}).ok


def test_new_constant_keeps_a_scalar_a_scalar():
    # np.ascontiguousarray turned 0-d values into shape [1]: a scale a pass computed changed rank.
    constant = weights.new_constant("scale", np.array(0.125, np.float32))
    assert constant.values.shape == ()
