"""K/V heads repeated with ``Tile`` (what ``Tensor.repeat`` exports) are layout, not a source.

The walk from K and V up to their projections goes through the ``Tile``, so a grouped-query
self-attention is classified ``self`` with K/V projected from the same tensor as Q. Fusion
reads K and V where the core does (after the ``Tile``), so every target either fuses the
block with outputs unchanged in ONNX Runtime or leaves it with a reason.

A ``Tile`` along the head axis repeats heads cyclically (query head ``i`` reads K/V head
``i % Hkv``), unlike GQA's repeat_kv and ONNX ``Attention``'s ``kv_num_heads``, which serve
``H / Hkv`` consecutive query heads (``i // n``). The blocks below have two K/V heads under
four query heads so that a fused op that took the Tile for repeat_kv would compute wrong
outputs, which the numeric checks would catch.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from xattn_compiler.passes import FuseAttention

from xattn_compiler.attention import find_attention
from xattn_compiler.ir import op_histogram
from xattn_compiler.testing.assertions import assert_pass_properties

HEADS = 4
#: Where the repeat sits: on K/V in head layout (``k.repeat(1, n, 1, 1)``), on K^T, on the
#: projection output before the head split, or as repeat_interleave spelled with a Tile of an
#: unsqueezed head axis (then merged: the same head order as repeat_kv).
PLACEMENTS = ("heads", "key_t", "features", "interleaved")
TARGETS = ({"target": "onnx-attention"}, {"target": "onnx-attention", "qkv-layout": "3d"},
           {"target": "canonical"}, {"target": "ort-mha"})


def tiled_block(placement: str = "heads", *, kv_heads: int = 2, head_dim: int = 8,
                cross: bool = False, dtype=np.float32) -> onnx.ModelProto:
    """One attention block whose ``kv_heads`` K/V heads are tiled to ``HEADS``; Q, K and V are
    projected from ``x`` (``cross``: K and V from ``ctx``). Batch and lengths are dynamic."""
    n, d, e = HEADS // kv_heads, head_dim, 2 * head_dim
    rng = np.random.default_rng(0)
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def weight(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(dtype), name)

    def ints(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    def node(op, inputs, output, **attrs):
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    initializers = [weight("Wq", (e, HEADS * d)), weight("Wk", (e, kv_heads * d)),
                    weight("Wv", (e, kv_heads * d)),
                    numpy_helper.from_array(np.array(d ** -0.5, dtype), "scale"),
                    ints("q_shape", [0, 0, HEADS, d]), ints("kv_shape", [0, 0, kv_heads, d]),
                    ints("head_repeats", [1, n, 1, 1]), ints("feature_repeats", [1, 1, n]),
                    ints("axis2", [2]), ints("group_repeats", [1, 1, n, 1, 1]),
                    ints("grouped", [0, HEADS, -1, d]), ints("tiled_shape", [0, 0, HEADS, d]),
                    ints("merged", [0, 0, HEADS * d])]
    source = "ctx" if cross else "x"
    nodes = [node("MatMul", ["x", "Wq"], "q_proj"), node("Reshape", ["q_proj", "q_shape"], "q_bshd"),
             node("Transpose", ["q_bshd"], "q", perm=[0, 2, 1, 3])]
    for p in "kv":
        nodes.append(node("MatMul", [source, f"W{p}"], f"{p}_proj"))
        if placement == "features":
            nodes += [node("Tile", [f"{p}_proj", "feature_repeats"], f"{p}_tiled_proj"),
                      node("Reshape", [f"{p}_tiled_proj", "tiled_shape"], f"{p}_bshd")]
        else:
            nodes.append(node("Reshape", [f"{p}_proj", "kv_shape"], f"{p}_bshd"))
        if p == "k" and placement == "key_t":
            nodes += [node("Transpose", ["k_bshd"], "k_bhds", perm=[0, 2, 3, 1]),
                      node("Tile", ["k_bhds", "head_repeats"], "k_t")]
            continue
        nodes.append(node("Transpose", [f"{p}_bshd"], f"{p}_bhsd", perm=[0, 2, 1, 3]))
        if placement in ("heads", "key_t"):
            nodes.append(node("Tile", [f"{p}_bhsd", "head_repeats"], f"{p}_full"))
        elif placement == "interleaved":
            nodes += [node("Unsqueeze", [f"{p}_bhsd", "axis2"], f"{p}_groups"),
                      node("Tile", [f"{p}_groups", "group_repeats"], f"{p}_grouped"),
                      node("Reshape", [f"{p}_grouped", "grouped"], f"{p}_full")]
        else:
            nodes.append(node("Identity", [f"{p}_bhsd"], f"{p}_full"))
        if p == "k":
            nodes.append(node("Transpose", ["k_full"], "k_t", perm=[0, 1, 3, 2]))
    nodes += [node("MatMul", ["q", "k_t"], "scores"), node("Mul", ["scores", "scale"], "scaled"),
              node("Softmax", ["scaled"], "probs", axis=-1),
              node("MatMul", ["probs", "v_full"], "context"),
              node("Transpose", ["context"], "context_bshd", perm=[0, 2, 1, 3]),
              node("Reshape", ["context_bshd", "merged"], "y")]
    inputs = [helper.make_tensor_value_info("x", onnx_type, ["batch", "seq", e])]
    if cross:
        inputs.append(helper.make_tensor_value_info("ctx", onnx_type, ["batch", "ctx_len", e]))
    outputs = [helper.make_tensor_value_info("y", onnx_type, ["batch", "seq", HEADS * d])]
    model = helper.make_model(helper.make_graph(nodes, f"tiled_{placement}", inputs, outputs,
                                                initializers),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def samples(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    """Inputs at two sizes of the dynamic dims (a wrong head count or length shows in one)."""
    rng = np.random.default_rng(1)
    sets = []
    for batch, length in ((2, 3), (1, 5)):
        feed = {}
        for value in model.graph.input:
            dims = [d.dim_value or (batch if d.dim_param == "batch" else length)
                    for d in value.type.tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
            feed[value.name] = rng.standard_normal(dims).astype(dtype)
        sets.append(feed)
    return sets


# --- the matcher ----------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_tiled_kv_block_is_self_attention_projected_from_its_input(placement):
    [block] = find_attention(tiled_block(placement))
    assert block.kind == "self"
    assert {block.q.source.name, block.k.source.name, block.v.source.name} == {"x"}
    assert (block.k.weight.name, block.v.weight.name) == ("Wk", "Wv")
    # Heads as the core multiplies them: the Tile has made four K/V heads of two, as the
    # matcher reports repeat_kv's Expand.
    assert (block.num_heads, block.num_kv_heads, block.head_dim) == (HEADS, HEADS, 8)
    assert block.scale == pytest.approx(8 ** -0.5)
    assert "Tile" in {n.op for n in block.k.nodes} and "Tile" in {n.op for n in block.v.nodes}
    assert block.escapes == [] and block.static_inputs == []


def test_one_kv_head_tiled_for_every_query_head_is_self_attention():
    [block] = find_attention(tiled_block(kv_heads=1))
    assert block.kind == "self" and block.k.source.name == "x" and block.k.weight.name == "Wk"


def test_tiled_kv_from_another_tensor_stays_cross_attention_with_that_static_input():
    [block] = find_attention(tiled_block(cross=True))
    assert block.kind == "cross"
    assert (block.q.source.name, block.k.source.name, block.v.source.name) == ("x", "ctx", "ctx")
    assert block.static_inputs == ["ctx"] and block.kv_source_kind == "graph_input"


# --- fusion ---------------------------------------------------------------------------------------

def fused_ops(model: onnx.ModelProto) -> set[str]:
    return {"Attention", "MultiHeadAttention", "fMHA_V2", "fMHCA"} & set(op_histogram(model))


@pytest.mark.parametrize("options", TARGETS, ids=lambda o: "-".join(o.values()))
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_every_target_fuses_a_tiled_block_with_outputs_unchanged(placement, options):
    model = tiled_block(placement)
    result = assert_pass_properties(FuseAttention(**options), model, samples(model),
                                    allow_refusal=False)
    assert result.counts["blocks_fused"] == 1, result.details["skipped"]
    if options["target"] != "canonical":
        assert fused_ops(result.model) and "Softmax" not in op_histogram(result.model)


@pytest.mark.parametrize("options", TARGETS, ids=lambda o: "-".join(o.values()))
def test_every_target_fuses_a_single_tiled_kv_head_with_outputs_unchanged(options):
    model = tiled_block(kv_heads=1)
    result = assert_pass_properties(FuseAttention(**options), model, samples(model),
                                    allow_refusal=False)
    assert result.counts["blocks_fused"] == 1, result.details["skipped"]


def test_a_cyclic_head_repeat_is_not_read_as_grouped_kv_heads():
    # kv_num_heads=2 over the untiled K/V would serve query heads 0,1 with K/V head 0; the
    # Tile serves them with heads 0 and 1. The op must read the tiled K/V as four heads.
    model = tiled_block("heads")
    result = assert_pass_properties(FuseAttention(), model, samples(model), allow_refusal=False)
    [attention] = [n for n in result.model.graph.node if n.op_type == "Attention"]
    heads = {a.name: helper.get_attribute_value(a) for a in attention.attribute}
    assert (heads["q_num_heads"], heads["kv_num_heads"]) == (HEADS, HEADS)
    assert op_histogram(result.model)["Tile"] == 2


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_plugins_refuse_to_pack_tiled_kv_weights(cross, kv_heads):
    # fp16 and a head size both presets take, so the packing is what decides: fMHA_V2 and
    # fMHCA pack the projection weights per head, and K/V's weights hold fewer heads than Q's.
    model = tiled_block(kv_heads=kv_heads, head_dim=40, cross=cross, dtype=np.float16)
    result = assert_pass_properties(FuseAttention(target="trt-plugin"), model, samples(model),
                                    allow_refusal=False)
    assert result.counts == {"blocks_fused": 0, "blocks_skipped": 1, "already_fused": 0}
    [reason] = result.details["skipped"]
    packed = "fMHCA" if cross else "fMHA_V2"
    assert f"{packed}: K: weight 'Wk' is not [E, N*H]" in reason


# --- a real export --------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_exported_tensor_repeat_of_kv_heads_is_self_attention(tmp_path):
    torch = pytest.importorskip("torch")

    class TiledGQA(torch.nn.Module):
        def __init__(self, embed=16, heads=HEADS, kv_heads=2, head_dim=8):
            super().__init__()
            self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
            self.q = torch.nn.Linear(embed, heads * head_dim, bias=False)
            self.k = torch.nn.Linear(embed, kv_heads * head_dim, bias=False)
            self.v = torch.nn.Linear(embed, kv_heads * head_dim, bias=False)

        def forward(self, x):
            b, s, _ = x.shape
            n = self.heads // self.kv_heads
            q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
            k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2).repeat(1, n, 1, 1)
            v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2).repeat(1, n, 1, 1)
            probs = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1)
            return (probs @ v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)

    torch.manual_seed(0)
    path = tmp_path / "tiled_gqa.onnx"
    torch.onnx.export(TiledGQA().eval(), (torch.randn(2, 5, 16),), str(path), dynamo=True,
                      dynamic_shapes={"x": {0: "batch", 1: "seq"}}, external_data=False)
    model = onnx.load(str(path))
    assert op_histogram(model).get("Tile") == 2
    [block] = find_attention(model)
    assert block.kind == "self" and block.k.source is block.q.source
    assert (block.num_heads, block.head_dim) == (HEADS, 8)
    result = assert_pass_properties(FuseAttention(), model, allow_refusal=False)
    assert result.counts["blocks_fused"] == 1
