"""Decoder-only LMs from transformers: rotary-position (RoPE) Llama, Mllama's text model and
the other rotary spellings (GPT-J, GPT-NeoX, Phi), BLOOM's ALiBi, Gemma 2's softcapping.

Both apply rotary embeddings to Q and K after the head split (``q * cos + rotate_half(q) *
sin``, cos/sin computed from the position ids), so Q and K of a self-attention reach the core
through different tensors while deriving from the same activation: the case that tells a
matcher classifying self/cross by data provenance from one that compares tensors.

* ``llama-decoder-*``: ``LlamaForCausalLM``, 2 layers of grouped-query self-attention (4 query
  heads, 2 K/V heads). Input ``input_ids`` [batch, seq], output ``logits``. No cross-attention.
* ``mllama-text-*``: ``MllamaForCausalLM`` (Llama 3.2 Vision's language model), 3 layers of
  which layer 1 is a gated cross-attention layer (eager attention; the SDPA export is wrong, see
  ``KNOWN_BAD_EXPORTS``). Inputs ``input_ids`` and
  ``cross_attention_states`` [batch, img_len, hidden] (the projected vision features). Its
  cross-attention has no rotary embedding and RMS-normalises Q and K per head (``q_norm``,
  ``k_norm``); K/V come from ``cross_attention_states`` alone.
* ``gptj-decoder``: interleaved rotary (``rotate_every_two``: strided slices, stacked and
  flattened) on the first ``rotary_dim`` of each head, applied before the head transpose.
* ``gpt-neox-decoder``: one fused QKV projection split per head (Q and K leave the Split for
  the rotary ops, V goes straight to the core), rotate-half on half of each head
  (``rotary_pct`` 0.5) with the rest concatenated back.
* ``phi-decoder``: rotate-half on half of each head (``partial_rotary_factor`` 0.5),
  projections with biases.
* ``bloom-decoder``: no rotary, ALiBi (a per-head linear bias on the batched scores), the
  eager attention's probabilities viewed back from ``[B,H,S,S]`` to ``[B*H,S,S]`` for bmm,
  and a fused QKV viewed as ``[B,S,H,3,D]`` with Q, K, V Gathered from the axis before D.
* ``gemma2-decoder`` (a ``KNOWN_GAPS`` recipe): Gemma 2's logit softcapping, ``c *
  tanh(scores / c)`` between the scaled scores and the mask, with a sliding-window layer.
  Found and classified like the others; left unfused by design (TensorRT's Attention has no
  softcap), so it stays out of ``MODELS``, whose every block the zoo-wide tests fuse.
"""

from __future__ import annotations

import functools
from typing import Any

from ..spec import Attention, Built, ZooModel

SEED = 0
#: Tiny Llama: 2 layers, hidden 64, 4 heads of 16, 2 K/V heads (GQA).
LLAMA_SMALL: dict[str, Any] = {
    "vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}
#: Tiny Mllama text model: 3 layers, layer 1 cross-attention, hidden 64, 4 heads, 2 K/V heads.
MLLAMA_SMALL: dict[str, Any] = {
    **LLAMA_SMALL, "num_hidden_layers": 3, "cross_attention_layers": [1],
}
#: The other spellings: 2 layers, hidden 64, 4 heads of 16, rotary on 8 of each head's 16 dims.
_COMMON = {"vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4,
           "intermediate_size": 128, "max_position_embeddings": 64, "num_hidden_layers": 2}
#: Tiny Gemma 2: 2 layers (one sliding-window), 4 heads of 16, 2 K/V heads, softcaps on.
GEMMA2_SMALL: dict[str, Any] = {
    **_COMMON, "num_key_value_heads": 2, "head_dim": 16, "sliding_window": 4,
    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
}
OTHER_SMALL: dict[str, dict[str, Any]] = {
    "gptj": {"vocab_size": 128, "n_embd": 64, "n_head": 4, "n_layer": 2, "rotary_dim": 8,
             "n_positions": 64, "bos_token_id": 1, "eos_token_id": 2},
    "gpt_neox": {**_COMMON, "rotary_pct": 0.5},
    "phi": {**_COMMON, "partial_rotary_factor": 0.5},
    "gemma2": GEMMA2_SMALL,
    "bloom": {"vocab_size": 128, "hidden_size": 64, "n_layer": 2, "n_head": 4},
}
_OTHER_CLASSES = {"gptj": ("GPTJConfig", "GPTJForCausalLM"),
                  "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
                  "phi": ("PhiConfig", "PhiForCausalLM"),
                  "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
                  "bloom": ("BloomConfig", "BloomForCausalLM")}
#: Eager where SDPA is not there: Gemma 2's softcapping, BLOOM (no SDPA in transformers).
_ATTENTION = {"gemma2": "eager", "bloom": "eager"}
#: Sample (batch, seq, img_len): all different so a mixed-up dim shows.
SAMPLE_SHAPES = {"small": (2, 5, 12)}
DYNAMIC_DIMS = {"input_ids": {0: "batch", 1: "seq"},
                "cross_attention_states": {0: "batch", 1: "img_len"}}


@functools.cache
def _wrapper_classes() -> dict[str | None, type]:
    """Modules ``forward(input_ids[, <extra input>]) -> logits`` by the extra input's name;
    lazy because they need torch. The parameter names become the graph input names."""
    from torch import nn

    class CausalLMLogits(nn.Module):
        """Calls a transformers causal LM without a cache and returns only the logits."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return self.logits(input_ids)

        def logits(self, input_ids, **extra):
            return self.model(input_ids=input_ids, use_cache=False, return_dict=True,
                              **extra).logits

    class WithPositionIds(CausalLMLogits):
        def forward(self, input_ids, position_ids):
            return self.logits(input_ids, position_ids=position_ids)

    class WithCrossAttentionStates(CausalLMLogits):
        def forward(self, input_ids, cross_attention_states):
            return self.logits(input_ids, cross_attention_states=cross_attention_states)

    return {None: CausalLMLogits, "position_ids": WithPositionIds,
            "cross_attention_states": WithCrossAttentionStates}


def _head_truth(fields: dict[str, Any], self_count: int, cross_count: int) -> Attention:
    heads = fields["num_attention_heads"]
    return Attention(self=self_count, cross=cross_count, num_heads=heads,
                     head_dim=fields["hidden_size"] // heads)


def build_llama(size: str, attn_implementation: str, position_ids: bool = False) -> Built:
    """``LlamaForCausalLM`` at ``size`` with the given attention implementation; with
    ``position_ids`` the positions are a graph input (as optimum exports decoders)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..export import randomize_parameters

    config = LlamaConfig(**LLAMA_SMALL, attn_implementation=attn_implementation)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    randomize_parameters(model, SEED)
    batch, seq, _ = SAMPLE_SHAPES[size]
    generator = torch.Generator().manual_seed(SEED)
    inputs = {"input_ids": torch.randint(0, LLAMA_SMALL["vocab_size"], (batch, seq),
                                         generator=generator)}
    dims = {"input_ids": dict(DYNAMIC_DIMS["input_ids"])}
    if position_ids:  # a left-padded batch: row 1 starts later
        inputs["position_ids"] = (torch.arange(seq) - torch.tensor([[0], [2]])).clamp(min=0)
        dims["position_ids"] = dict(DYNAMIC_DIMS["input_ids"])
    wrapper = _wrapper_classes()["position_ids" if position_ids else None]
    return Built(
        module=wrapper(model).eval(), inputs=inputs, output_names=["logits"],
        attention=_head_truth(LLAMA_SMALL, LLAMA_SMALL["num_hidden_layers"], 0),
        static_inputs=[], dynamic_dims=dims, kv_source_kind="internal",
        config={**LLAMA_SMALL, "attn_implementation": attn_implementation,
                "position_ids_input": position_ids, "class": "transformers LlamaForCausalLM"},
    )


def build_other(size: str, kind: str) -> Built:
    """A GPT-J, GPT-NeoX, Phi or Gemma 2 causal LM (``kind`` keys ``OTHER_SMALL``), SDPA
    attention (eager for Gemma 2's softcapping)."""
    import torch
    import transformers

    from ..export import randomize_parameters

    fields = OTHER_SMALL[kind]
    config_class, model_class = (getattr(transformers, name) for name in _OTHER_CLASSES[kind])
    torch.manual_seed(SEED)
    attention = _ATTENTION.get(kind, "sdpa")
    model = model_class(config_class(**fields, attn_implementation=attention))
    randomize_parameters(model, SEED)
    batch, seq, _ = SAMPLE_SHAPES[size]
    generator = torch.Generator().manual_seed(SEED)
    inputs = {"input_ids": torch.randint(0, fields["vocab_size"], (batch, seq),
                                         generator=generator)}
    heads = fields.get("num_attention_heads", fields.get("n_head"))
    width = fields.get("hidden_size", fields.get("n_embd"))
    layers = fields.get("num_hidden_layers", fields.get("n_layer"))
    return Built(
        module=_wrapper_classes()[None](model).eval(), inputs=inputs, output_names=["logits"],
        attention=Attention(self=layers, cross=0, num_heads=heads, head_dim=width // heads),
        static_inputs=[], dynamic_dims={"input_ids": dict(DYNAMIC_DIMS["input_ids"])},
        kv_source_kind="internal",
        config={**fields, "attn_implementation": attention,
                "class": f"transformers {model_class.__name__}"},
    )


def build_mllama_text(size: str, attn_implementation: str) -> Built:
    """``MllamaForCausalLM`` (the text model with its cross-attention layers) at ``size``."""
    import torch
    from transformers import MllamaTextConfig
    from transformers.models.mllama.modeling_mllama import MllamaForCausalLM

    from ..export import randomize_parameters

    config = MllamaTextConfig(**MLLAMA_SMALL, attn_implementation=attn_implementation)
    torch.manual_seed(SEED)
    model = MllamaForCausalLM(config)
    randomize_parameters(model, SEED)
    _open_cross_attention_gates(model)
    batch, seq, img_len = SAMPLE_SHAPES[size]
    generator = torch.Generator().manual_seed(SEED)
    inputs = {
        "input_ids": torch.randint(0, MLLAMA_SMALL["vocab_size"], (batch, seq),
                                   generator=generator),
        "cross_attention_states": torch.randn(batch, img_len, MLLAMA_SMALL["hidden_size"],
                                              generator=generator),
    }
    layers, cross = MLLAMA_SMALL["num_hidden_layers"], len(MLLAMA_SMALL["cross_attention_layers"])
    return Built(
        module=_wrapper_classes()["cross_attention_states"](model).eval(), inputs=inputs,
        output_names=["logits"], attention=_head_truth(MLLAMA_SMALL, layers - cross, cross),
        static_inputs=["cross_attention_states"],
        dynamic_dims={name: dict(axes) for name, axes in DYNAMIC_DIMS.items()},
        config={**MLLAMA_SMALL, "attn_implementation": attn_implementation,
                "class": "transformers MllamaForCausalLM (MllamaTextConfig)"},
    )


def _open_cross_attention_gates(model: Any) -> None:
    """Set the tanh gates of the cross-attention layers to 1.

    Mllama initialises them to 0 (a pretrained text model that ignores images until trained);
    the random 1-D draw puts them near 1 already, but a gate of exactly 0 would make a wrong
    cross-attention rewrite invisible to verification, so make them plainly open.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(1.0)


def _llama_eager(size: str) -> Built:
    return build_llama(size, "eager")


def _llama_sdpa(size: str) -> Built:
    return build_llama(size, "sdpa")


def _llama_position_ids(size: str) -> Built:
    return build_llama(size, "sdpa", position_ids=True)


def _gptj(size: str) -> Built:
    return build_other(size, "gptj")


def _gpt_neox(size: str) -> Built:
    return build_other(size, "gpt_neox")


def _phi(size: str) -> Built:
    return build_other(size, "phi")


def _bloom(size: str) -> Built:
    return build_other(size, "bloom")


def _gemma2(size: str) -> Built:
    return build_other(size, "gemma2")


def _mllama_eager(size: str) -> Built:
    return build_mllama_text(size, "eager")


def _mllama_sdpa(size: str) -> Built:
    return build_mllama_text(size, "sdpa")


_REQUIRES = ("torch", "transformers")
#: "self-attention-only": nothing for split-kv to split (tests that split every zoo model skip it).
_SELF_ONLY = ("decoder", "rope", "gqa", "self-attention-only")
MODELS = (
    ZooModel("llama-decoder-eager", "llama",
             "Llama causal LM (RoPE, GQA), eager attention: self-attention only",
             _llama_eager, requires=_REQUIRES, tags=_SELF_ONLY),
    ZooModel("llama-decoder-sdpa", "llama",
             "Llama causal LM (RoPE, GQA), SDPA attention: self-attention only",
             _llama_sdpa, requires=_REQUIRES, tags=_SELF_ONLY),
    ZooModel("llama-decoder-position-ids", "llama",
             "Llama causal LM (RoPE, GQA), SDPA attention, position_ids a graph input",
             _llama_position_ids, requires=_REQUIRES, tags=_SELF_ONLY),
    ZooModel("gptj-decoder", "gptj",
             "GPT-J causal LM: interleaved (rotate-every-two) partial rotary, SDPA attention",
             _gptj, requires=_REQUIRES, tags=_SELF_ONLY),
    ZooModel("gpt-neox-decoder", "gpt-neox",
             "GPT-NeoX causal LM: fused query_key_value split per head, partial rotate-half "
             "rotary, SDPA attention", _gpt_neox, requires=_REQUIRES, tags=_SELF_ONLY),
    ZooModel("phi-decoder", "phi",
             "Phi causal LM: rotate-half on half of each head, projections with biases",
             _phi, requires=_REQUIRES, tags=_SELF_ONLY),
    ZooModel("bloom-decoder", "bloom",
             "BLOOM causal LM: ALiBi added to the batched [B*H,S,S] scores (baddbmm), the "
             "probabilities viewed back to [B*H,S,S] for the context bmm, a fused QKV "
             "[B,S,H,3,D] cut by Gather", _bloom, requires=_REQUIRES, tags=_SELF_ONLY),
    ZooModel("mllama-text-eager", "llama",
             "Mllama text model: RoPE self-attention and a gated cross-attention layer on "
             "cross_attention_states, eager attention",
             _mllama_eager, requires=_REQUIRES, tags=("decoder", "rope", "gqa", "multimodal")),
)

#: Variants left out of MODELS, with why. ``mllama-text-sdpa`` exports, but torch.onnx (2.13)
#: annotates a Slice of the cross-attention K (on its sequence axis, ended at the text length)
#: as ``[batch, 2, seq, 16]``; it is ``[batch, 2, img_len, 16]`` when seq > img_len, and ONNX
#: Runtime's memory planner, trusting the annotation, then fails with "Shape mismatch
#: attempting to re-use buffer" (the file runs when every value_info is dropped).
KNOWN_BAD_EXPORTS = {
    "mllama-text-sdpa": (_mllama_sdpa, "Shape mismatch attempting to re-use buffer"),
}

#: Recipes out of MODELS because a zoo-wide check fails on them (test_attention_zoo holds them
#: to their truth all the same, the failing check a strict xfail).
KNOWN_GAPS = {
    "gemma2-decoder": (
        ZooModel("gemma2-decoder", "gemma2",
                 "Gemma 2 causal LM: logit softcapping (c * tanh(scores / c)), RoPE, GQA, a "
                 "sliding-window layer", _gemma2, requires=_REQUIRES, tags=_SELF_ONLY),
        "logit softcapping: TensorRT's Attention has no softcap, so its blocks stay unfused"),
}
