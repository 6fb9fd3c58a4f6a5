"""fuse-attention through KV caches: self-attention whose K/V are the Concat of the cached past
and the new K/V, the present K/V returned as graph outputs, fuses into one single-output node
that reads the concatenated K/V; the Concat stays for the outputs.

Hand-built blocks give the match/no-match pairs (a present K/V read only as a graph output, or
through a layout op into one, fuses; read by anything else, or a Q tensor returned, does not).
Real exports close the file: a transformers-5 Whisper decoder with ``past_key_values`` (eager
and SDPA, exported here with torch dynamo and cached like the zoo) and optimum's merged
Whisper/T5 decoders (transformers 4.x TorchScript) in both cache branches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.passes import FuseAttention

import xattn_compiler as xc
from tests.models import make_model
from xattn_compiler.attention import find_attention
from xattn_compiler.testing.assertions import assert_equivalent, assert_pass_properties

FLOAT = TensorProto.FLOAT
B, S, P, E, H, D = "batch", "seq", "past", 16, 2, 8
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "optimum"


# --- hand-built KV-cache blocks ---------------------------------------------------------------

def _weight(name: str, seed: int) -> onnx.TensorProto:
    rng = np.random.default_rng(seed)
    return numpy_helper.from_array(rng.normal(0, 0.3, (E, E)).astype(np.float32), name)


def _heads(prefix: str, perm: list[int], out: str | None = None) -> list[onnx.NodeProto]:
    """``Transpose(Reshape(x @ W, [0, 0, H, D]), perm)``: one head split."""
    return [helper.make_node("MatMul", ["x", f"W{prefix}"], [f"{prefix}_proj"]),
            helper.make_node("Reshape", [f"{prefix}_proj", "heads_shape"], [f"{prefix}_BSHD"]),
            helper.make_node("Transpose", [f"{prefix}_BSHD"], [out or f"{prefix}_split"],
                             perm=perm)]


def _cache(present: str) -> tuple[list[onnx.NodeProto], list[onnx.ValueInfoProto], str]:
    """K^T and the present K/V: Concats of the past (``"concat"``), or with no cache the head
    splits, the key transposed apart from K^T (``"layout"``). Returns the nodes, the past
    inputs and the V the core reads."""
    if present == "layout":
        nodes = [*_heads("k", [0, 2, 3, 1], out="k_t"),
                 helper.make_node("Transpose", ["k_BSHD"], ["present.key"], perm=[0, 2, 1, 3]),
                 helper.make_node("Identity", ["v_split"], ["present.value"])]
        return nodes, [], "v_split"
    nodes = [*_heads("k", [0, 2, 1, 3]),
             helper.make_node("Concat", ["past.key", "k_split"], ["present.key"], axis=2),
             helper.make_node("Concat", ["past.value", "v_split"], ["present.value"], axis=2),
             helper.make_node("Transpose", ["present.key"], ["k_t"], perm=[0, 1, 3, 2])]
    pasts = [helper.make_tensor_value_info(n, FLOAT, [B, H, P, D])
             for n in ("past.key", "past.value")]
    return nodes, pasts, "present.value"


def _extra_reader(extra: str) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes computing ``out`` from ``merged`` (plus the extra reader) and extra outputs."""
    if extra == "present_read":  # the present key used inside the model
        return [helper.make_node("ReduceSum", ["present.key"], ["key_sum"], keepdims=0),
                helper.make_node("Add", ["merged", "key_sum"], ["out"])], []
    if extra == "layout_read":  # ... through a layout op
        return [helper.make_node("Transpose", ["present.key"], ["key_BSHD"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", ["key_BSHD", "merge_shape"], ["key_BSE"]),
                helper.make_node("ReduceMean", ["key_BSE"], ["key_mean"], axes=[1]),
                helper.make_node("Add", ["merged", "key_mean"], ["out"])], []
    identity = [helper.make_node("Identity", ["merged"], ["out"])]
    if extra == "layout_output":  # the present key also returned as [B, S, H, D]
        return identity + [helper.make_node("Transpose", ["present.key"], ["present.key_BSHD"],
                                            perm=[0, 2, 1, 3])], ["present.key_BSHD"]
    if extra == "query_output":
        return identity, ["q_split"]
    return identity, []


def _output(name: str) -> onnx.ValueInfoProto:
    shapes = {"out": [B, S, E], "present.key_BSHD": [B, "total", H, D], "q_split": [B, H, S, D]}
    return helper.make_tensor_value_info(name, FLOAT, shapes.get(name, [B, H, "total", D]))


def cache_block(*, present: str = "concat", extra: str = "") -> onnx.ModelProto:
    """Self-attention of ``x`` with a KV cache, as a decoder exports it::

        k_BHSD = Concat(past_key, split(x @ Wk), axis=2)     (present.key, a graph output)
        v_BHSD = Concat(past_value, split(x @ Wv), axis=2)   (present.value, a graph output)
        out    = merge(Softmax(split(x @ Wq) @ k^T * s) @ v)

    ``present``: see :func:`_cache`. ``extra``: one more reader (:func:`_extra_reader`).
    """
    cache, pasts, value = _cache(present)
    tail, extra_outputs = _extra_reader(extra)
    nodes = [*_heads("q", [0, 2, 1, 3]), *_heads("v", [0, 2, 1, 3]), *cache,
             helper.make_node("MatMul", ["q_split", "k_t"], ["scores"]),
             helper.make_node("Mul", ["scores", "scale"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node("MatMul", ["probs", value], ["context"]),
             helper.make_node("Transpose", ["context"], ["context_BSHD"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["context_BSHD", "merge_shape"], ["merged"]),
             *tail]
    consts = [_weight("Wq", 1), _weight("Wk", 2), _weight("Wv", 3),
              numpy_helper.from_array(np.array([0, 0, H, D], np.int64), "heads_shape"),
              numpy_helper.from_array(np.array([0, 0, E], np.int64), "merge_shape"),
              numpy_helper.from_array(np.array(D ** -0.5, np.float32), "scale"),
              ]
    outputs = ["out", "present.key", "present.value", *extra_outputs]
    graph = helper.make_graph(nodes, "kv_cache_block",
                              [helper.make_tensor_value_info("x", FLOAT, [B, S, E]), *pasts],
                              [_output(n) for n in outputs],
                              consts)
    model = make_model(graph)
    onnx.checker.check_model(model)
    return model


def feeds(model: onnx.ModelProto, seq: int, past: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"x": (2, seq, E), "past.key": (2, H, past, D), "past.value": (2, H, past, D)}
    names = [i.name for i in model.graph.input]
    return {n: rng.normal(size=shapes[n]).astype(np.float32) for n in names}


def _fuse(model, target="onnx-attention", **options):
    # Sq != Skv on both draws (a decode step and a chunk), and a first step with no past.
    samples = [feeds(model, 1, 5), feeds(model, 3, 4, seed=1), feeds(model, 2, 0, seed=2)]
    return assert_pass_properties(FuseAttention(target=target, **options), model, samples,
                                  allow_refusal=False)


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def _fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type in ("Attention", "MultiHeadAttention")]


@pytest.mark.parametrize("target,options", [("onnx-attention", {}),
                                            ("onnx-attention", {"qkv-layout": "3d"}),
                                            ("ort-mha", {})])
def test_match_present_kv_as_graph_outputs(target, options):
    model = cache_block()
    result = _fuse(model, target, **options)
    assert result.counts["blocks_fused"] == 1
    (node,) = _fused_nodes(result.model)
    # One output, no past inputs: the op reads the concatenated K/V, the Concats stay.
    assert len(node.output) == 1 and list(node.input[1:3]) == ["present.key", "present.value"]
    producers = _producers(result.model)
    assert [o.name for o in result.model.graph.output] == ["out", "present.key", "present.value"]
    assert producers["present.key"].op_type == producers["present.value"].op_type == "Concat"
    assert not {"Softmax"} & {n.op_type for n in result.model.graph.node}


def test_match_reports_the_present_kv_and_no_escape():
    (block,) = find_attention(cache_block())
    assert block.escapes == []
    assert block.kv_outputs == ["present.key", "present.value"]
    assert block.to_dict()["kv_outputs"] == ["present.key", "present.value"]
    assert block.k.past[0].name == "past.key"


def test_match_present_kv_in_another_layout():
    """No cache: the present key is the head split transposed apart from K^T (TorchScript),
    the present value an Identity of V: both only leave the model."""
    model = cache_block(present="layout")
    (block,) = find_attention(model)
    assert block.escapes == [] and set(block.kv_outputs) == {"k_BSHD", "v_split"}
    result = _fuse(model)
    (node,) = _fused_nodes(result.model)
    # The op reads the present key's Transpose, not a second Transpose of the split; K^T goes.
    assert node.input[1] == "present.key"
    perms = [list(n.attribute[0].ints) for n in result.model.graph.node if n.op_type == "Transpose"]
    assert [0, 2, 3, 1] not in perms and perms.count([0, 2, 1, 3]) == 4


def test_match_present_kv_also_returned_in_another_layout():
    model = cache_block(extra="layout_output")
    (block,) = find_attention(model)
    assert block.escapes == [] and block.kv_outputs == ["present.key", "present.value"]
    result = _fuse(model)
    assert len(_fused_nodes(result.model)) == 1
    assert _producers(result.model)["present.key_BSHD"].op_type == "Transpose"


def test_no_match_present_kv_laid_out_for_a_use_inside_the_model():
    model = cache_block(extra="layout_read")
    (block,) = find_attention(model)
    # The Transpose feeds a ReduceMean that the output adds: a use inside the model.
    assert block.escapes == ["'present.key' is a graph output",
                             "'present.key' is read by Transpose 'Transpose->key_BSHD'"]
    assert block.kv_outputs == ["present.value"]
    assert not FuseAttention().run(model).changed


def test_no_match_present_kv_also_read_by_an_unrelated_op():
    model = cache_block(extra="present_read")
    (block,) = find_attention(model)
    assert block.escapes == ["'present.key' is a graph output",
                             "'present.key' is read by ReduceSum 'ReduceSum->key_sum'"]
    result = FuseAttention().run(model)
    assert not result.changed
    (record,) = result.details["blocks"]
    assert record["reason"] == ("intermediate tensors escape: 'present.key' is a graph output; "
                                "'present.key' is read by ReduceSum 'ReduceSum->key_sum'")


def test_no_match_query_tensor_as_graph_output():
    """Only K/V are inputs of the fused core as they are; a returned Q stays an escape."""
    (block,) = find_attention(cache_block(extra="query_output"))
    assert block.escapes == ["'q_split' is a graph output"]
    assert block.kv_outputs == ["present.key", "present.value"]
    assert not FuseAttention().run(cache_block(extra="query_output")).changed


# --- real exports ------------------------------------------------------------------------------

SPECIALIZE = "canonicalize,unroll-control-flow{{values=use_cache_branch={}}}"


@pytest.mark.parametrize("family", ["whisper", "t5"])
@pytest.mark.parametrize("branch", ["true", "false"])
def test_optimum_merged_decoder_fuses_every_block_in_each_cache_branch(family, branch):
    """transformers 4.x (optimum 1.x) merged decoders: with past, self K/V are Concats whose
    outputs are ``present.N.decoder.*``; without, the presents are the head splits."""
    merged = xc.load(FIXTURES / f"{family}_decoder_model_merged.onnx")
    # The branch taken, unfused: the reference the fused model must equal.
    model = xc.optimize(merged, SPECIALIZE.format(branch)).model
    result = xc.optimize(model, "remove-layout-clutter,fuse-attention")
    fuse = next(p for p in result.report["passes"] if p["name"] == "fuse-attention")
    assert fuse["details"]["skipped"] == {}
    assert sum(r["fused"] for r in fuse["details"]["blocks"]) == 4
    assert [o.name for o in result.model.graph.output] == [o.name for o in merged.graph.output]
    check = xc.verify(model, result.model, profile="quick")
    assert check.ok, check.summary()


# transformers 5 Whisper with a cache, exported here (the zoo's whisper family has no cache).
LAYERS, PAST = 2, 4


def _whisper_module(decoder):
    """``forward(input_ids, encoder_hidden_states, past K/V per layer) -> logits, presents``:
    the cache is built inside from plain tensors, as a deployed decode step receives it."""
    from torch import nn
    from torch.nn import functional
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    class WhisperDecodeStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, input_ids, encoder_hidden_states, key_0, value_0, key_1, value_1):
            self_cache = DynamicCache()
            for layer, (key, value) in enumerate(((key_0, value_0), (key_1, value_1))):
                self_cache.update(key, value, layer)
            out = self.decoder(input_ids=input_ids, encoder_hidden_states=encoder_hidden_states,
                               cache=EncoderDecoderCache(self_cache, DynamicCache()),
                               use_cache=True, return_dict=True)
            cache = out.cache
            presents = [t for part in (cache.self_attention_cache, cache.cross_attention_cache)
                        for layer in part.layers for t in (layer.keys, layer.values)]
            return (functional.linear(out.last_hidden_state, self.decoder.embed_tokens.weight),
                    *presents)

    return WhisperDecodeStep().eval()


def build_whisper_with_past(size: str, attn_implementation: str):
    import torch
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperDecoder

    from xattn_compiler.zoo.export import randomize_parameters
    from xattn_compiler.zoo.families.whisper import SMALL
    from xattn_compiler.zoo.spec import Attention, Built

    config = WhisperConfig(**SMALL, attn_implementation=attn_implementation)
    torch.manual_seed(0)
    decoder = WhisperDecoder(config)
    randomize_parameters(decoder, 0)
    heads = SMALL["decoder_attention_heads"]
    head_dim = SMALL["d_model"] // heads
    generator = torch.Generator().manual_seed(0)
    batch, seq, enc_len = 2, 3, 12  # seq != past + seq: the mask is not square
    inputs = {"input_ids": torch.randint(0, SMALL["vocab_size"], (batch, seq), generator=generator),
              "encoder_hidden_states": torch.randn(batch, enc_len, SMALL["d_model"],
                                                   generator=generator)}
    dims = {"input_ids": {0: "batch", 1: "seq"},
            "encoder_hidden_states": {0: "batch", 1: "enc_len"}}
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            name = f"past_key_values.{layer}.decoder.{kind}"
            inputs[name] = torch.randn(batch, heads, PAST, head_dim, generator=generator)
            dims[name] = {0: "batch", 2: "past_len"}
    outputs = ["logits"] + [f"present.{layer}.{part}.{kind}" for part in ("decoder", "encoder")
                            for layer in range(LAYERS) for kind in ("key", "value")]
    return Built(module=_whisper_module(decoder), inputs=inputs, output_names=outputs,
                 attention=Attention(self=LAYERS, cross=LAYERS, num_heads=heads,
                                     head_dim=head_dim),
                 static_inputs=[], dynamic_dims=dims, kv_source_kind="internal",
                 config={**SMALL, "attn_implementation": attn_implementation,
                         "class": "transformers.WhisperDecoder + EncoderDecoderCache"})


def _whisper_eager(size: str):
    return build_whisper_with_past(size, "eager")


def _whisper_sdpa(size: str):
    return build_whisper_with_past(size, "sdpa")


def _cached_with_past(name: str, family: str, description: str, build, export_cache):
    """A with-cache export built by ``build`` (not a zoo entry), cached as the zoo's are."""
    pytest.importorskip("transformers")
    from xattn_compiler.zoo.cache import cached_export
    from xattn_compiler.zoo.spec import ZooModel

    model = ZooModel(name, family, description, build, requires=("torch", "transformers"))
    return cached_export(model, "small", export_cache)


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def whisper_with_past(request, export_cache):
    build = {"eager": _whisper_eager, "sdpa": _whisper_sdpa}[request.param]
    return _cached_with_past(f"whisper-decoder-with-past-{request.param}", "whisper",
                             "Whisper decoder with a KV cache (past_key_values in, presents out)",
                             build, export_cache)


def test_whisper_with_past_fuses_every_block(whisper_with_past):
    """transformers 5 WhisperDecoder with an EncoderDecoderCache: 2 self blocks (K/V = Concat
    of past and new) and 2 cross blocks, all fused into single-output Attention nodes reading
    the presents; every output, presents included, equals the original's and torch's."""
    model = xc.load(whisper_with_past.path)
    before = find_attention(model)
    assert sorted(b.kind for b in before) == ["cross", "cross", "self", "self"]
    assert [b.escapes for b in before] == [[]] * 4
    result = xc.optimize(model, "canonicalize,remove-layout-clutter,fuse-attention")
    nodes = _fused_nodes(result.model)
    assert len(nodes) == 4 and all(len(n.output) == 1 and len(n.input) <= 4 for n in nodes)
    presents = [o.name for o in model.graph.output if o.name.startswith("present.")]
    assert {name for n in nodes for name in n.input[1:3]} == set(presents)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    producers = _producers(result.model)
    assert all(producers[f"present.{i}.decoder.{k}"].op_type == "Concat"
               for i in range(LAYERS) for k in ("key", "value"))
    inputs, references = whisper_with_past.sample()
    assert_equivalent(model, result.model, inputs)
    check = xc.verify(model, result.model, profile="quick")
    assert check.ok, check.summary()
    got = ort_run(result.model, inputs)
    for name, expected in references.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)


def ort_run(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


# transformers 5 Llama (RoPE, grouped-query K/V repeated after the cache) with a cache.
LLAMA = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


def _llama_module(model):
    from torch import nn
    from transformers.cache_utils import DynamicCache

    class LlamaDecodeStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, key_0, value_0, key_1, value_1):
            cache = DynamicCache()
            for layer, (key, value) in enumerate(((key_0, value_0), (key_1, value_1))):
                cache.update(key, value, layer)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                             use_cache=True, return_dict=True)
            presents = [t for layer in out.cache.layers for t in (layer.keys, layer.values)]
            return (out.logits, *presents)

    return LlamaDecodeStep().eval()


def llama_feeds(seq: int, past: int, seed: int = 0) -> dict:
    import torch

    generator = torch.Generator().manual_seed(seed)
    kv_heads = LLAMA["num_key_value_heads"]
    head_dim = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
    feeds = {"input_ids": torch.randint(0, LLAMA["vocab_size"], (2, seq), generator=generator),
             "attention_mask": torch.ones(2, past + seq, dtype=torch.int64)}
    feeds["attention_mask"][1, 0] = 0  # a left-padded row
    for layer in range(LAYERS):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{layer}.{kind}"] = torch.randn(2, kv_heads, past, head_dim,
                                                                   generator=generator)
    return feeds


def build_llama_with_past(size: str, attn_implementation: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from xattn_compiler.zoo.export import randomize_parameters
    from xattn_compiler.zoo.spec import Attention, Built

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation=attn_implementation))
    randomize_parameters(model, 0)
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"}}
    dims.update({f"past_key_values.{layer}.{kind}": {0: "batch", 2: "past_len"}
                 for layer in range(LAYERS) for kind in ("key", "value")})
    outputs = ["logits"] + [f"present.{layer}.{kind}" for layer in range(LAYERS)
                            for kind in ("key", "value")]
    heads = LLAMA["num_attention_heads"]
    return Built(module=_llama_module(model), inputs=llama_feeds(3, PAST), output_names=outputs,
                 attention=Attention(self=LAYERS, cross=0, num_heads=heads,
                                     head_dim=LLAMA["hidden_size"] // heads),
                 static_inputs=[], dynamic_dims=dims, kv_source_kind="internal",
                 config={**LLAMA, "attn_implementation": attn_implementation,
                         "class": "transformers.LlamaForCausalLM + DynamicCache"})


def _llama_eager(size: str):
    return build_llama_with_past(size, "eager")


def _llama_sdpa(size: str):
    return build_llama_with_past(size, "sdpa")


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def llama_with_past(request, export_cache):
    build = {"eager": _llama_eager, "sdpa": _llama_sdpa}[request.param]
    return _cached_with_past(f"llama-decoder-with-past-{request.param}", "llama",
                             "Llama decoder (RoPE, GQA) with a KV cache", build, export_cache)


@pytest.mark.parametrize("target", ["onnx-attention", "ort-mha"])
def test_llama_with_past_fuses_every_block(llama_with_past, target):
    """GQA: the cache holds 2 K/V heads, repeated to 4 after the Concat; ONNX Attention reads
    the presents themselves with ``kv_num_heads=2``."""
    model = xc.load(llama_with_past.path)
    result = xc.optimize(model, f"canonicalize,remove-layout-clutter,fuse-attention{{target={target}}}")
    nodes = _fused_nodes(result.model)
    assert len(nodes) == LAYERS and all(len(n.output) == 1 for n in nodes)
    if target == "onnx-attention":
        assert {name for n in nodes for name in n.input[1:3]} == {
            f"present.{layer}.{kind}" for layer in range(LAYERS) for kind in ("key", "value")}
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    inputs, references = llama_with_past.sample()
    # The export's step (3 new tokens on 4 cached) and a one-token decode step on 6 cached.
    decode = {name: value.numpy() for name, value in llama_feeds(1, 6, seed=1).items()}
    assert_equivalent(model, result.model, [inputs, decode])
    got = ort_run(result.model, inputs)
    for name, expected in references.items():
        np.testing.assert_allclose(got[name], expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_lint_trt_suggests_fusing_a_cached_block():
    """lint-trt kept quiet about cached blocks while fuse-attention could not fuse them."""
    from xattn_compiler.backends.lint_trt import lint_trt

    messages = [f.message for f in lint_trt(cache_block(), "10.14").findings
                if f.code == "attention-fusion"]
    assert any("ONNX Attention maps to IAttention" in m for m in messages)
    fused = FuseAttention().run(cache_block()).model
    assert not [f for f in lint_trt(fused, "10.14").findings if f.code == "attention-fusion"]
