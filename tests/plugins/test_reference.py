"""Reference implementations of plugin ops against a plain per-head numpy attention, and the
standard-op decomposition ONNX Runtime verifies with against both."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from xattn_compiler.errors import InputError
from xattn_compiler.plugins import (
    FMHA_V2,
    FMHCA,
    decompose_plugins,
    has_plugin_nodes,
    run_reference,
    spec_from_dict,
)
from xattn_compiler.plugins.reference import record_specs
from xattn_compiler.testing import assert_valid
from xattn_compiler.verification import run_model

B, SQ, SK, N, H = 2, 5, 7, 2, 16
RNG = np.random.default_rng(0)


def plain_attention(q_bsnh, k_bsnh, v_bsnh, scale):
    """One head and one batch at a time, the textbook way: [B, Sq, N, H]."""
    out = np.zeros(q_bsnh.shape, dtype=np.float64)
    for b in range(q_bsnh.shape[0]):
        for n in range(q_bsnh.shape[2]):
            q, k, v = (t[b, :, n].astype(np.float64) for t in (q_bsnh, k_bsnh, v_bsnh))
            scores = q @ k.T * scale
            weights = np.exp(scores - scores.max(axis=1, keepdims=True))
            out[b, :, n] = weights / weights.sum(axis=1, keepdims=True) @ v
    return out


def plugin_model(spec, inputs, attrs=None, dtype=TensorProto.FLOAT16):
    names = [f"in{i}" for i in range(len(inputs))]
    node = helper.make_node(spec.op, names, ["y"], name="plugin", domain=spec.domain,
                            **spec.node_attributes(attrs or {}))
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, dtype, list(a.shape))
                      for n, a in zip(names, inputs, strict=True)],
        [helper.make_tensor_value_info("y", dtype, ["d0", "d1", "d2", "d3"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(spec.domain, 1)])
    model.ir_version = 8
    record_specs(model, [spec])
    return model, dict(zip(names, inputs, strict=True))


def draw(*shape, dtype=np.float16):
    return RNG.standard_normal(shape).astype(dtype)


def test_fmhca_reference_is_attention_over_packed_kv():
    q, kv = draw(B, SQ, N, H), draw(B, SK, N, 2, H)
    model, feeds = plugin_model(FMHCA, [q, kv])
    got = run_reference(model, feeds)["y"]
    want = plain_attention(q, kv[:, :, :, 0], kv[:, :, :, 1], H ** -0.5)
    assert got.dtype == np.float16 and got.shape == (B, SQ, N, H)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-2, atol=2e-2)


def test_fmha_v2_reference_is_self_attention_over_packed_qkv():
    qkv = draw(B, SQ, N, 3, H)
    model, feeds = plugin_model(FMHA_V2, [qkv])
    got = run_reference(model, feeds)["y"]
    want = plain_attention(qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2], H ** -0.5)
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-2, atol=2e-2)


def test_declared_spec_reads_its_scale_attribute_and_bnsh_layout():
    spec = spec_from_dict({"op": "Mine", "layout": "separate_bnsh", "output_layout": "BNSH",
                           "attributes": {"alpha": "scale"}})
    q, k, v = draw(B, N, SQ, H, dtype=np.float32), draw(B, N, SK, H, dtype=np.float32), \
        draw(B, N, SK, H, dtype=np.float32)
    model, feeds = plugin_model(spec, [q, k, v], {"scale": 0.1}, dtype=TensorProto.FLOAT)
    got = run_reference(model, feeds)["y"]
    bsnh = [t.transpose(0, 2, 1, 3) for t in (q, k, v)]
    want = plain_attention(*bsnh, 0.1).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["q_kv_packed", "qkv_packed", "separate_bsnh", "separate_bnsh"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_decomposition_runs_in_onnx_runtime_like_the_reference(layout, scale):
    table = {"op": "P", "layout": layout, "kinds": ["self"] if layout == "qkv_packed" else
             ["cross"]}
    if scale is not None:
        table["attributes"] = {"s": "scale"}
    spec = spec_from_dict(table)
    shapes = {"q_kv_packed": [(B, SQ, N, H), (B, SK, N, 2, H)], "qkv_packed": [(B, SQ, N, 3, H)],
              "separate_bsnh": [(B, SQ, N, H), (B, SK, N, H), (B, SK, N, H)],
              "separate_bnsh": [(B, N, SQ, H), (B, N, SK, H), (B, N, SK, H)]}[layout]
    model, feeds = plugin_model(spec, [draw(*s, dtype=np.float32) for s in shapes],
                                {"scale": scale}, dtype=TensorProto.FLOAT)
    decomposed = decompose_plugins(model)
    assert not has_plugin_nodes(decomposed) and has_plugin_nodes(model)
    assert_valid(decomposed)
    np.testing.assert_allclose(run_model(decomposed, feeds)["y"], run_reference(model, feeds)["y"],
                               rtol=1e-4, atol=1e-5)


def test_a_plugin_node_without_a_spec_is_named_in_the_error():
    node = helper.make_node("Mystery", ["x"], ["y"], name="mystery_0", domain="trt.plugins",
                            plugin_version="1", plugin_namespace="")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    model = helper.make_model(graph)
    with pytest.raises(InputError, match="'mystery_0' .*no plugin spec"):
        run_reference(model, {"x": np.ones(1, np.float32)})
    with pytest.raises(InputError, match="mystery_0"):
        decompose_plugins(model)


def test_preset_nodes_in_the_default_domain_are_recognised_by_their_plugin_version():
    # Models written by TensorRT's 8.5 demo put fMHCA in the default domain.
    q, kv = draw(B, SQ, N, H), draw(B, SK, N, 2, H)
    model, feeds = plugin_model(FMHCA, [q, kv])
    model.graph.node[0].domain = ""
    del model.metadata_props[:]
    assert has_plugin_nodes(model)
    assert isinstance(decompose_plugins(model), onnx.ModelProto)
    np.testing.assert_allclose(run_model(model, feeds)["y"].astype(np.float64),
                               plain_attention(q, kv[:, :, :, 0], kv[:, :, :, 1], H ** -0.5),
                               rtol=2e-2, atol=2e-2)


def test_an_input_of_the_wrong_layout_is_named():
    q, kv = draw(B, SQ, N, H), draw(B, SK, N, 3, H)  # a qkv where kv belongs
    model, feeds = plugin_model(FMHCA, [q, kv])
    with pytest.raises(Exception, match=r"fMHCA: input 1 must be kv_BSN2H, got shape \[2, 7, 2, 3, 16\]"):
        run_reference(model, feeds)
