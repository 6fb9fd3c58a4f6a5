"""Self vs cross attention by data provenance: rotary embeddings, position ids and per-head
norms between the projections and the core do not make Q and K two sequences.

Real exports from the zoo (transformers Llama and Mllama, diffusers Wan 2.1), and tiny
graphs for the spellings a zoo model does not show (the ONNX RotaryEmbedding op).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import xattn_compiler as xc
from xattn_compiler.cli import main
from xattn_compiler.provenance import is_position_input
from xattn_compiler.zoo import cached_export

pytestmark = pytest.mark.slow


def _export(name: str, export_cache):
    pytest.importorskip("transformers")
    if name.startswith("wan"):
        pytest.importorskip("diffusers")
    return cached_export(name, export_cache)


def _counts(path) -> tuple[int, int]:
    counts = Counter(b.kind for b in xc.find_attention(xc.load(path)))
    return counts["self"], counts["cross"]


@pytest.mark.parametrize("name", ["llama-decoder-eager", "llama-decoder-sdpa",
                                  "llama-decoder-position-ids", "gptj-decoder",
                                  "phi-decoder"])
def test_rope_decoder_reports_no_cross_attention(name, export_cache, capsys):
    exported = _export(name, export_cache)
    assert _counts(exported.path) == (2, 0)
    assert main(["inspect", str(exported.path), "--json", "--raw"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"] == {"self": 2, "cross": 0}


def test_gpt_neox_fused_qkv_with_partial_rotary_is_self_attention(export_cache):
    exported = _export("gpt-neox-decoder", export_cache)
    blocks = xc.find_attention(xc.load(exported.path))
    assert [b.kind for b in blocks] == ["self", "self"]
    assert [b.escapes for b in blocks] == [[], []]  # V stops at the shared QKV Split


def test_mllama_text_reports_its_cross_attention_layer_as_cross(export_cache):
    exported = _export("mllama-text-eager", export_cache)
    blocks = xc.find_attention(xc.load(exported.path))
    assert [b.kind for b in blocks] == ["self", "cross", "self"]  # cross_attention_layers=[1]
    cross = blocks[1]
    assert cross.static_inputs == ["cross_attention_states"]
    assert cross.kv_source_kind == "graph_input"


def test_wan_rope_self_attention_is_self_and_text_attention_cross(export_cache):
    exported = _export("wan-transformer", export_cache)
    blocks = xc.find_attention(xc.load(exported.path))
    assert [b.kind for b in blocks] == ["self", "cross", "self", "cross"]
    assert {name for b in blocks for name in b.static_inputs} == {"encoder_hidden_states"}


@pytest.mark.parametrize("name", ["llama-decoder-sdpa", "llama-decoder-position-ids",
                                  "gptj-decoder", "mllama-text-eager", "wan-transformer"])
def test_rope_models_optimize_and_verify(name, export_cache, tmp_path, capsys):
    exported = _export(name, export_cache)
    out = tmp_path / "opt.onnx"
    assert main(["optimize", str(exported.path), "-o", str(out), "--verify"]) == 0
    fused = Counter(n.op_type for n in onnx.load(out).graph.node)
    assert fused["Attention"] == sum(_counts(exported.path)) and fused["Softmax"] == 0


def test_split_kv_on_a_rope_decoder_says_there_is_no_cross_attention(export_cache, tmp_path,
                                                                       capsys):
    exported = _export("llama-decoder-eager", export_cache)
    assert main(["split-kv", str(exported.path), "-o", str(tmp_path / "split")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["xattn-compiler: error: the model has no cross-attention: there are no K/V "
                   "to project once"]


def test_split_kv_on_mllama_projects_the_image_states_once(export_cache, tmp_path, capsys):
    exported = _export("mllama-text-eager", export_cache)
    out = tmp_path / "split"
    assert main(["split-kv", str(exported.path), "-o", str(out)]) == 0
    spec = json.loads((out / "split.json").read_text())
    assert spec["static_inputs"] == ["cross_attention_states"] and len(spec["kv"]) == 1
    assert main(["verify", str(exported.path), str(out)]) == 0


# --- tiny graphs ----------------------------------------------------------------------------

def _rotary_op_model(k_input: str) -> onnx.ModelProto:
    """Attention whose Q and K go through ONNX's RotaryEmbedding (opset 23) with cos/sin caches
    indexed by a ``position_ids`` graph input; K is projected from ``k_input``."""
    heads, dim, width = 2, 8, 16
    rng = np.random.default_rng(0)

    def weight(name):
        return helper.make_tensor(name, TensorProto.FLOAT, [width, width],
                                  rng.standard_normal((width, width)).astype(np.float32).ravel())

    def cache(name, fn):
        angles = np.arange(32)[:, None] * 0.1 ** (np.arange(dim // 2)[None, :] / (dim // 2))
        return helper.make_tensor(name, TensorProto.FLOAT, [32, dim // 2],
                                  fn(angles).astype(np.float32).ravel())

    nodes = []
    for p, src in (("q", "x"), ("k", k_input), ("v", k_input)):
        nodes += [
            helper.make_node("MatMul", [src, f"w_{p}"], [f"{p}_proj"]),
            helper.make_node("Reshape", [f"{p}_proj", "heads_shape"], [f"{p}_bshd"]),
            helper.make_node("Transpose", [f"{p}_bshd"], [f"{p}_bhsd"], perm=[0, 2, 1, 3]),
        ]
    for p in ("q", "k"):
        nodes.append(helper.make_node("RotaryEmbedding",
                                      [f"{p}_bhsd", "cos_cache", "sin_cache", "position_ids"],
                                      [f"{p}_rot"]))
    nodes += [
        helper.make_node("Transpose", ["k_rot"], ["k_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q_rot", "k_t"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v_bhsd"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_bshd"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_bshd", "merge_shape"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", width]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["b", "s"])]
    if k_input != "x":
        inputs.append(helper.make_tensor_value_info(k_input, TensorProto.FLOAT,
                                                    ["b", "t", width]))
    inits = [weight("w_q"), weight("w_k"), weight("w_v"), cache("cos_cache", np.cos),
             cache("sin_cache", np.sin),
             helper.make_tensor("heads_shape", TensorProto.INT64, [4], [0, -1, heads, dim]),
             helper.make_tensor("merge_shape", TensorProto.INT64, [3], [0, -1, width]),
             helper.make_tensor("scale", TensorProto.FLOAT, [], [dim ** -0.5])]
    graph = helper.make_graph(nodes, "rotary", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", width])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])


def test_rotary_embedding_op_with_position_ids_input_is_self():
    model = _rotary_op_model("x")
    onnx.checker.check_model(model, full_check=True)
    assert [b.kind for b in xc.find_attention(model)] == ["self"]


def test_rotary_embedding_op_on_a_context_stays_cross():
    blocks = xc.find_attention(_rotary_op_model("context"))
    assert [(b.kind, b.static_inputs) for b in blocks] == [("cross", ["context"])]


@pytest.mark.parametrize("name, positional", [
    ("position_ids", True), ("cache_position", True), ("decoder_position_ids", True),
    ("freqs_cis", True), ("img_ids", True), ("input_ids", False),
    ("encoder_hidden_states", False), ("cross_attention_states", False),
    ("attention_mask", False), ("compose", False), ("composition", False),
    ("cos_cached", True), ("europe", False)])
def test_which_graph_inputs_are_positions(name, positional):
    assert is_position_input(name) is positional


def test_prompt_buffer_converted_to_fp16_classifies_its_cross_attention(export_cache):
    # optimize --precision fp16 leaves the constant prompt as a Cast of an fp16 buffer: the
    # walk up from K found no activation input at all and crashed (max of nothing).
    exported = _export("constant-context-prompt-buffer", export_cache)
    converted = xc.optimize(xc.load(exported.path), precision="fp16").model
    blocks = xc.find_attention(converted)
    assert len(blocks) == 4 and {b.kind for b in blocks} == {"self", "cross"}
