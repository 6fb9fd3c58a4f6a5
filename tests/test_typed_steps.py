"""Patterns carry their meaning: a match lists its steps, typed, in data-flow order, and the
readers of a block (its scale and mask, fusion's plan, collapse-batched-heads) build from that
list. A spelling added to ``patterns/`` with a meaning is found and fused with nothing else
changed: the clamped scores of OPT and LLaMA attention in transformers 4.2x, written here the
way those releases write it and exported with torch's dynamo exporter.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.patterns import steps

import xattn_compiler as xc
from xattn_compiler.attention import analyze_attention
from xattn_compiler.cli import main
from xattn_compiler.fusion.operands import plan_core
from xattn_compiler.zoo import cache
from xattn_compiler.zoo.spec import Attention, Built, ZooModel

B, S, HEADS, D = 1, 4, 2, 4
E = HEADS * D


def _core_model(chain: list[tuple[str, list[str], str, dict]], score: str = "scores",
                extra_inputs=(), floats=None) -> onnx.ModelProto:
    """Projections, head split, then ``chain`` from the scores to ``logits``, Softmax, an
    IsNaN guard and the context MatMul with the head merge."""
    rng = np.random.default_rng(0)
    values = {"Wq": rng.standard_normal((E, E)), "Wk": rng.standard_normal((E, E)),
              "Wv": rng.standard_normal((E, E)), "zero": np.array(0.0), **(floats or {})}
    shapes = {"split": np.array([B, S, HEADS, D]), "merge": np.array([B, S, E])}
    inits = ([numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in values.items()]
             + [numpy_helper.from_array(v.astype(np.int64), k) for k, v in shapes.items()])

    def node(op, inputs, output, **attrs):
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    nodes = [node("MatMul", ["x", f"W{p}"], f"{p}_proj") for p in "qkv"]
    nodes += [node("Reshape", [f"{p}_proj", "split"], f"{p}_bshd") for p in "qkv"]
    nodes += [node("Transpose", ["q_bshd"], "q", perm=[0, 2, 1, 3]),
              node("Transpose", ["k_bshd"], "k_t", perm=[0, 2, 3, 1]),
              node("Transpose", ["v_bshd"], "v", perm=[0, 2, 1, 3]),
              node("MatMul", ["q", "k_t"], score)]
    nodes += [node(op, inputs, out, **attrs) for op, inputs, out, attrs in chain]
    nodes += [node("Softmax", ["logits"], "probs", axis=-1), node("IsNaN", ["probs"], "nan"),
              node("Where", ["nan", "zero", "probs"], "guarded"),
              node("MatMul", ["guarded", "v"], "context"),
              node("Transpose", ["context"], "context_bshd", perm=[0, 2, 1, 3]),
              node("Reshape", ["context_bshd", "merge"], "y")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, S, E]), *extra_inputs]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, E])]
    model = helper.make_model(helper.make_graph(nodes, "core", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def test_a_core_match_lists_its_steps_typed_and_in_data_flow_order():
    model = _core_model(
        [("Div", ["scores", "sqrt_d"], "scaled", {}), ("Add", ["bias", "scaled"], "biased", {}),
         ("Where", ["keep", "biased", "fill"], "masked", {}),
         ("Cast", ["masked"], "logits", {"to": TensorProto.FLOAT})],
        extra_inputs=[helper.make_tensor_value_info("bias", TensorProto.FLOAT, [B, HEADS, S, S]),
                      helper.make_tensor_value_info("keep", TensorProto.BOOL, [B, 1, S, S])],
        floats={"sqrt_d": np.array(2.0), "fill": np.array(-1e9)})
    [block] = xc.find_attention(model)
    listed = [(type(step).__name__, step.node.name, step.data.name) for step in block.core.steps]
    assert listed == [("Scale", "scaled", "scores"), ("MaskAdd", "biased", "scaled"),
                      ("KeepWhere", "masked", "biased"), ("Cast", "logits", "masked"),
                      ("Softmax", "probs", "logits"), ("Guard", "guarded", "probs")]
    scale, bias, keep, _, _, guard = block.core.steps
    assert scale.factor == 0.5 and scale.divide
    assert bias.mask.name == "bias"  # the Add is commutative: the data side is found either way
    assert (keep.cond.name, keep.negate, keep.fill_value) == ("keep", False, -1e9)
    assert guard.isnan.name == "nan" and guard.fill_value == 0.0
    assert block.scale == 0.5 and block.mask == {"kind": "add+where", "tensors": ["bias", "keep"]}
    plan = plan_core(block)
    assert plan.chain_ops == ["Div", "Add", "Where", "Cast"] and plan.guarded
    assert [(m.name, f) for m, f in plan.terms] == [("bias", 1.0)]
    assert plan.keeps[0].fill == -1e9


def test_a_where_keeping_the_fill_where_the_condition_holds_is_a_negated_keep():
    model = _core_model([("Where", ["masked_out", "fill", "scores"], "logits", {})],
                        extra_inputs=[helper.make_tensor_value_info("masked_out", TensorProto.BOOL,
                                                                    [B, 1, S, S])],
                        floats={"fill": np.array(-np.inf)})
    [block] = xc.find_attention(model)
    [keep] = [s for s in block.core.steps if isinstance(s, steps.KeepWhere)]
    assert keep.negate and keep.data.name == "scores"
    assert plan_core(block).keeps[0].negate


def test_a_where_fill_that_is_not_a_mask_value_leaves_the_block_unfused():
    model = _core_model([("Where", ["keep", "scores", "fill"], "logits", {})],
                        extra_inputs=[helper.make_tensor_value_info("keep", TensorProto.BOOL,
                                                                    [B, 1, S, S])],
                        floats={"fill": np.array(-1.0)})
    [block] = xc.find_attention(model)
    assert "not a mask value" in plan_core(block)


def test_operand_scales_are_typed_steps_on_the_operand():
    """SDPA's decomposition scales Q and K by sqrt(scale) each before Q.K^T."""
    model = _core_model([("Cast", ["scores"], "logits", {"to": TensorProto.FLOAT})])
    graph = model.graph
    for name in ("q", "k_t"):
        scaled = next(n for n in graph.node if n.output[0] == name)
        scaled.output[0] = f"{name}_unscaled"
        graph.node.append(helper.make_node("Mul", [f"{name}_unscaled", "root"], [name],
                                           name=f"{name}_scaled"))
    graph.initializer.append(numpy_helper.from_array(np.array(0.5 ** 0.5, np.float32), "root"))
    model = onnx.shape_inference.infer_shapes(model)
    [block] = xc.find_attention(model)
    assert [(s.node.name, round(s.factor, 6)) for s in block.q.scales] == [("q_scaled", 0.707107)]
    assert [s.node.name for s in block.k.scales] == ["k_t_scaled"]
    assert block.scale == pytest.approx(0.5)
    plan = plan_core(block)
    assert plan.operand_scale == pytest.approx(0.5)
    assert sorted(f.node.name for f in plan.folds) == ["k_t_scaled", "q_scaled"]


def test_a_max_at_a_mask_value_is_a_step_and_max_at_zero_is_not():
    floor = np.finfo(np.float32).min
    clamped = [("Add", ["scores", "mask"], "masked", {}), ("Max", ["masked", "floor"], "logits", {})]
    mask = [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [B, 1, S, S])]
    [block] = xc.find_attention(_core_model(clamped, extra_inputs=mask,
                                            floats={"floor": np.array(floor)}))
    assert [type(s).__name__ for s in block.core.steps][:2] == ["MaskAdd", "Identity"]
    assert not isinstance(plan_core(block), str)
    relu = _core_model(clamped, extra_inputs=mask, floats={"floor": np.array(0.0)})
    assert xc.find_attention(relu) == []
    [miss] = analyze_attention(relu).near_misses
    assert miss.reason == "constant 'floor' fails its check"


# --- the clamped scores of transformers 4.2x, exported ----------------------------------------

def _opt_2023_attention(size: str) -> Built:
    """Two layers of OPT's attention as transformers 4.30 writes it: Q scaled after its
    projection, heads folded into the batch ([B*H, S, D], torch.bmm), the mask added on
    [B, H, S, S] and the sum clamped at the dtype's minimum."""
    import torch
    from torch import nn

    class OPTAttention(nn.Module):
        def __init__(self, embed_dim: int, num_heads: int):
            super().__init__()
            self.embed_dim, self.num_heads = embed_dim, num_heads
            self.head_dim = embed_dim // num_heads
            self.scaling = self.head_dim ** -0.5
            self.k_proj = nn.Linear(embed_dim, embed_dim)
            self.v_proj = nn.Linear(embed_dim, embed_dim)
            self.q_proj = nn.Linear(embed_dim, embed_dim)
            self.out_proj = nn.Linear(embed_dim, embed_dim)

        def _shape(self, tensor, seq_len: int, bsz: int):
            return tensor.view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2).contiguous()

        def forward(self, hidden_states, attention_mask):
            bsz, tgt_len, _ = hidden_states.size()
            query_states = self.q_proj(hidden_states) * self.scaling
            key_states = self._shape(self.k_proj(hidden_states), -1, bsz)
            value_states = self._shape(self.v_proj(hidden_states), -1, bsz)
            proj_shape = (bsz * self.num_heads, -1, self.head_dim)
            query_states = self._shape(query_states, tgt_len, bsz).view(*proj_shape)
            key_states = key_states.view(*proj_shape)
            value_states = value_states.view(*proj_shape)
            src_len = key_states.size(1)
            attn_weights = torch.bmm(query_states, key_states.transpose(1, 2))
            attn_weights = attn_weights.view(bsz, self.num_heads, tgt_len, src_len) + attention_mask
            attn_weights = torch.max(attn_weights, torch.tensor(torch.finfo(attn_weights.dtype).min))
            attn_weights = attn_weights.view(bsz * self.num_heads, tgt_len, src_len)
            attn_weights = nn.functional.softmax(attn_weights, dim=-1)
            attn_output = torch.bmm(attn_weights, value_states)
            attn_output = attn_output.view(bsz, self.num_heads, tgt_len, self.head_dim)
            attn_output = attn_output.transpose(1, 2).reshape(bsz, tgt_len, self.embed_dim)
            return self.out_proj(attn_output)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(OPTAttention(32, 4) for _ in range(2))

        def forward(self, hidden_states, attention_mask):
            for layer in self.layers:
                hidden_states = hidden_states + layer(hidden_states, attention_mask)
            return hidden_states

    torch.manual_seed(0)
    module = Decoder().eval()
    causal = torch.triu(torch.full((6, 6), torch.finfo(torch.float32).min), diagonal=1)
    return Built(module=module,
                 inputs={"hidden_states": torch.randn(2, 6, 32),
                         "attention_mask": causal.expand(2, 1, 6, 6).contiguous()},
                 output_names=["out"], attention=Attention(2, 0, num_heads=4, head_dim=8),
                 static_inputs=[], kv_source_kind="internal")


OPT_2023 = ZooModel("opt-2023-clamped", "opt", "OPT attention of transformers 4.30 (clamped)",
                    _opt_2023_attention)


@pytest.mark.slow
def test_opt_2023_clamped_scores_are_found_fused_and_verified(export_cache, tmp_path):
    pytest.importorskip("torch")
    exported = cache.cached_export(OPT_2023, "small", export_cache)
    blocks = xc.find_attention(xc.load(exported.path))
    assert [(b.kind, b.num_heads, b.head_dim) for b in blocks] == [("self", 4, 8)] * 2
    assert all(b.mask["kind"] == "add" and b.scale == pytest.approx(8 ** -0.5) for b in blocks)
    assert all(any(isinstance(s, steps.Identity) and s.node.op == "Max" for s in b.core.steps)
               for b in blocks)
    out = tmp_path / "opt.onnx"
    assert main(["optimize", str(exported.path), "-o", str(out), "--verify"]) == 0
    ops = Counter(n.op_type for n in onnx.load(out).graph.node)
    assert ops["Attention"] == 2 and ops["Softmax"] == 0 and ops["Max"] == 0
