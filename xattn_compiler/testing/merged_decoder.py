"""An Optimum-style merged decoder, built with ``onnx.helper``: one ``If`` on ``use_cache_branch``.

Optimum merges ``decoder_model`` and ``decoder_with_past_model`` of an encoder-decoder export
into ``decoder_model_merged``: the graph is a single ``If(use_cache_branch: bool[1])`` whose
then-branch is the with-past decoder and else-branch the first-step decoder, with the weights
shared in the outer graph. The with-past decoder has no ``present.*.encoder.*`` outputs (the
cross K/V come in as ``past_key_values.*.encoder.*``), so the merge fills them with empty
``Constant`` outputs: the first symbolic dim becomes 0, the other symbolic dims 1
(``[0, heads, 1, head_dim]``), shapes that do not match the other branch's and that TensorRT
rejects (NVIDIA/TensorRT#4032, huggingface/optimum#2013).

Each branch here is a BART-style decoder of ``num_layers`` layers over token embeddings::

    h = Gather(embed_tokens, input_ids)
    per layer:  self-attention (with past: K/V = Concat(past, new) on the sequence axis)
                -> Add + LayerNorm -> cross-attention (no past: K/V projected from
                encoder_hidden_states; with past: K/V = past_key_values.L.encoder.*)
                -> Add + LayerNorm -> MLP (Relu) -> Add + LayerNorm
    logits = MatMul(h, lm_head)

An attention block is spelled as exporters write it: ``q = (x W_q + b_q) * scale``, heads split
by ``Reshape [0, 0, H, D]`` + ``Transpose [0, 2, 1, 3]``, ``MatMul(q, Transpose(k, [0, 1, 3, 2]))``,
``Softmax``, ``MatMul`` with V, merged by ``Transpose [0, 2, 1, 3]`` + ``Reshape [0, 0, E]`` and
projected out. So each branch holds ``num_layers`` self- and ``num_layers`` cross-attention
blocks for the matcher to find.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MergedDecoderConfig", "merged_decoder", "merged_decoder_inputs"]

FLOAT = TensorProto.FLOAT
_BATCH, _SEQ, _PAST, _ENC = ("batch_size", "decoder_sequence_length",
                             "past_decoder_sequence_length", "encoder_sequence_length_out")


@dataclass(frozen=True)
class MergedDecoderConfig:
    """Sizes of the decoder: ``d_model = num_heads * head_dim``."""

    num_layers: int = 2
    num_heads: int = 4
    head_dim: int = 8
    ffn: int = 64
    vocab: int = 50
    opset: int = 17
    seed: int = 0

    @property
    def d_model(self) -> int:
        return self.num_heads * self.head_dim


class _Branch:
    """Nodes of one branch; every node and tensor name starts with the branch's prefix."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        node_name = f"{self.prefix}/{name}/{op_type}"
        out = f"{node_name}_output_0"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        return out

    def linear(self, x: str, weights: str, name: str) -> str:
        return self.op("Add", [self.op("MatMul", [x, f"{weights}.weight"], name),
                               f"{weights}.bias"], name)

    def split_heads(self, x: str, name: str) -> str:
        """``[B, S, E] -> [B, H, S, D]``."""
        return self.op("Transpose", [self.op("Reshape", [x, "const.heads_shape"], name)], name,
                       perm=[0, 2, 1, 3])

    def attend(self, q_BHSD: str, k_BHSD: str, v_BHSD: str, name: str) -> str:
        """Scores, Softmax, weighted V, heads merged: ``[B, S, E]``."""
        k_BHDS = self.op("Transpose", [k_BHSD], f"{name}/k_t", perm=[0, 1, 3, 2])
        scores = self.op("MatMul", [q_BHSD, k_BHDS], f"{name}/scores")
        probs = self.op("Softmax", [scores], name, axis=-1)
        out_BHSD = self.op("MatMul", [probs, v_BHSD], f"{name}/context")
        out_BSHD = self.op("Transpose", [out_BHSD], f"{name}/merge", perm=[0, 2, 1, 3])
        return self.op("Reshape", [out_BSHD, "const.merge_shape"], f"{name}/merge")

    def residual_norm(self, x: str, update: str, norm: str) -> str:
        total = self.op("Add", [x, update], f"{norm}/residual")
        return self.op("LayerNormalization", [total, f"{norm}.weight", f"{norm}.bias"], norm,
                       axis=-1, epsilon=1e-5)


def _layer(b: _Branch, h: str, layer: int, with_past: bool, cfg: MergedDecoderConfig
           ) -> tuple[str, list[str]]:
    """One decoder layer; returns the hidden state and its four present outputs."""
    w = f"model.decoder.layers.{layer}"
    past = f"past_key_values.{layer}"
    # Self-attention: new K/V appended to the past ones when there are any.
    q = b.split_heads(b.op("Mul", [b.linear(h, f"{w}.self_attn.q_proj", f"{w}/self_attn/q_proj"),
                                   "const.scale"], f"{w}/self_attn/scale"), f"{w}/self_attn/q")
    k = b.split_heads(b.linear(h, f"{w}.self_attn.k_proj", f"{w}/self_attn/k_proj"),
                      f"{w}/self_attn/k")
    v = b.split_heads(b.linear(h, f"{w}.self_attn.v_proj", f"{w}/self_attn/v_proj"),
                      f"{w}/self_attn/v")
    if with_past:
        k = b.op("Concat", [f"{past}.decoder.key", k], f"{w}/self_attn/past_k", axis=2)
        v = b.op("Concat", [f"{past}.decoder.value", v], f"{w}/self_attn/past_v", axis=2)
    attended = b.linear(b.attend(q, k, v, f"{w}/self_attn"), f"{w}.self_attn.out_proj",
                        f"{w}/self_attn/out_proj")
    h = b.residual_norm(h, attended, f"{w}.self_attn_layer_norm")
    presents = [k, v]
    # Cross-attention: K/V of the encoder output, projected once and then carried as past.
    q = b.split_heads(b.op("Mul", [b.linear(h, f"{w}.encoder_attn.q_proj",
                                            f"{w}/encoder_attn/q_proj"), "const.scale"],
                           f"{w}/encoder_attn/scale"), f"{w}/encoder_attn/q")
    if with_past:
        k, v = f"{past}.encoder.key", f"{past}.encoder.value"
        presents += [_empty_present(b, f"{w}/present_encoder_{kind}", cfg)
                     for kind in ("key", "value")]
    else:
        k = b.split_heads(b.linear("encoder_hidden_states", f"{w}.encoder_attn.k_proj",
                                   f"{w}/encoder_attn/k_proj"), f"{w}/encoder_attn/k")
        v = b.split_heads(b.linear("encoder_hidden_states", f"{w}.encoder_attn.v_proj",
                                   f"{w}/encoder_attn/v_proj"), f"{w}/encoder_attn/v")
        presents += [k, v]
    attended = b.linear(b.attend(q, k, v, f"{w}/encoder_attn"), f"{w}.encoder_attn.out_proj",
                        f"{w}/encoder_attn/out_proj")
    h = b.residual_norm(h, attended, f"{w}.encoder_attn_layer_norm")
    hidden = b.op("Relu", [b.linear(h, f"{w}.fc1", f"{w}/fc1")], f"{w}/activation")
    h = b.residual_norm(h, b.linear(hidden, f"{w}.fc2", f"{w}/fc2"), f"{w}.final_layer_norm")
    return h, presents


def _empty_present(b: _Branch, name: str, cfg: MergedDecoderConfig) -> str:
    """Optimum's filler for an output the with-past decoder lacks: ``[0, H, 1, D]``, empty."""
    dims = [0, cfg.num_heads, 1, cfg.head_dim]
    value = helper.make_tensor("const_tensor", FLOAT, dims, [])
    return b.op("Constant", [], name, value=value)


def _branch(with_past: bool, cfg: MergedDecoderConfig) -> onnx.GraphProto:
    b = _Branch("/decoder_with_past" if with_past else "/decoder")
    h = b.op("Gather", ["model.decoder.embed_tokens.weight", "input_ids"], "embed_tokens")
    presents: list[str] = []
    for layer in range(cfg.num_layers):
        h, layer_presents = _layer(b, h, layer, with_past, cfg)
        presents += layer_presents
    logits = b.op("MatMul", [h, "lm_head.weight"], "lm_head")
    outputs = [helper.make_tensor_value_info(name, FLOAT, None) for name in [logits, *presents]]
    return helper.make_graph(b.nodes, "decoder_with_past" if with_past else "decoder", [],
                             outputs)


def _weights(cfg: MergedDecoderConfig) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(cfg.seed)
    e, f = cfg.d_model, cfg.ffn
    arrays: dict[str, np.ndarray] = {
        "model.decoder.embed_tokens.weight": rng.normal(0, 1, (cfg.vocab, e)),
        "lm_head.weight": rng.normal(0, e ** -0.5, (e, cfg.vocab)),
    }
    for layer in range(cfg.num_layers):
        w = f"model.decoder.layers.{layer}"
        linears = {f"{w}.{attn}.{proj}": (e, e) for attn in ("self_attn", "encoder_attn")
                   for proj in ("q_proj", "k_proj", "v_proj", "out_proj")}
        linears.update({f"{w}.fc1": (e, f), f"{w}.fc2": (f, e)})
        for name, shape in linears.items():
            arrays[f"{name}.weight"] = rng.normal(0, shape[0] ** -0.5, shape)
            arrays[f"{name}.bias"] = rng.normal(0, 0.1, shape[1])
        for norm in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"):
            arrays[f"{w}.{norm}.weight"] = 1 + rng.normal(0, 0.1, e)
            arrays[f"{w}.{norm}.bias"] = rng.normal(0, 0.1, e)
    tensors = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    tensors += [
        numpy_helper.from_array(np.array([0, 0, cfg.num_heads, cfg.head_dim], np.int64),
                                "const.heads_shape"),
        numpy_helper.from_array(np.array([0, 0, e], np.int64), "const.merge_shape"),
        numpy_helper.from_array(np.array(cfg.head_dim ** -0.5, np.float32), "const.scale"),
    ]
    return tensors


def merged_decoder(config: MergedDecoderConfig | None = None) -> onnx.ModelProto:
    """The merged decoder: inputs, outputs and names as Optimum writes them (see the module)."""
    cfg = config or MergedDecoderConfig()
    h, d = cfg.num_heads, cfg.head_dim
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [_BATCH, _SEQ]),
              helper.make_tensor_value_info("encoder_hidden_states", FLOAT,
                                            [_BATCH, "encoder_sequence_length", cfg.d_model])]
    outputs = [helper.make_tensor_value_info("logits", FLOAT, [_BATCH, _SEQ, cfg.vocab])]
    for layer in range(cfg.num_layers):
        for part, length in (("decoder", _PAST), ("encoder", _ENC)):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(
                    f"past_key_values.{layer}.{part}.{kind}", FLOAT, [_BATCH, h, length, d]))
                present_len = f"{_PAST} + {_SEQ}" if part == "decoder" else _ENC
                outputs.append(helper.make_tensor_value_info(
                    f"present.{layer}.{part}.{kind}", FLOAT, [_BATCH, h, present_len, d]))
    inputs.append(helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]))
    node = helper.make_node("If", ["use_cache_branch"], [v.name for v in outputs],
                            name="optimum::if", then_branch=_branch(True, cfg),
                            else_branch=_branch(False, cfg))
    graph = helper.make_graph([node], "merged_decoder", inputs, outputs, _weights(cfg))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", cfg.opset)],
                              producer_name="xattn_compiler.testing.merged_decoder")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def merged_decoder_inputs(use_cache_branch: bool, config: MergedDecoderConfig | None = None, *,
                          batch: int = 2, seq: int = 3, past: int = 4, encoder: int = 6,
                          seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for one run: the cached step (``use_cache_branch``) reads the past K/V, the first
    step the encoder output; both are always fed, as Optimum's runtime does."""
    cfg = config or MergedDecoderConfig()
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(0, cfg.vocab, (batch, seq), dtype=np.int64),
        "encoder_hidden_states": rng.normal(0, 1, (batch, encoder, cfg.d_model)),
    }
    for layer in range(cfg.num_layers):
        for part, length in (("decoder", past), ("encoder", encoder)):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{layer}.{part}.{kind}"] = rng.normal(
                    0, 1, (batch, cfg.num_heads, length, cfg.head_dim))
    feeds = {name: a.astype(np.float32) if a.dtype == np.float64 else a
             for name, a in feeds.items()}
    feeds["use_cache_branch"] = np.array([use_cache_branch])
    return feeds
