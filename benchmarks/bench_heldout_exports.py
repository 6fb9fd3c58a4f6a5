"""Exports no test was written against: found, fused and verified, one row per model.

    python benchmarks/bench_heldout_exports.py [--only bloom pixart] [--workdir DIR] [--out DIR]

Each model is a real transformers 5 / diffusers architecture built from a small config with
seeded random weights (nothing is downloaded), exported with ``torch.onnx.export(...,
dynamo=True)`` as a user would, then run through the CLI exactly as a user runs it:

* ``inspect --raw`` on the file as exported (blocks found, self/cross);
* ``optimize MODEL -o OUT --verify`` (default pipeline; outputs compared with ONNX Runtime on
  several input sets of distinct sizes, from the files as written);
* ``inspect OUT``: blocks fused.

``expected`` is the config's truth (self, cross) counted by hand from the architecture. The
table this writes (``heldout.md``) is what docs/matcher.md quotes. These models were first run
as a held-out check in session 6; the ones it broke on (BLOOM, Gemma 2, bf16 on external data)
were fixed with tests of their own, so the list here is a reproduction aid and a regression
sweep, not a test suite: it needs torch, transformers and diffusers, and takes ~10 minutes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Decoder-only causal LMs: (config class, model class, config fields, expected (self, cross)).
_LM = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=128)
CAUSAL = {
    "falcon-alibi": ("FalconConfig", "FalconForCausalLM",
                     dict(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, alibi=True, new_decoder_architecture=False,
                          multi_query=True)),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)),
    "mpt": ("MptConfig", "MptForCausalLM",
            dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, max_seq_len=128)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16, **_LM)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2, **_LM)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0, **_LM)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(num_key_value_heads=2, **_LM)),
    "gpt-bigcode-mqa": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM",
                        dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, multi_query=True,
                             n_positions=128)),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM",
                dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                     n_positions=128, n_ctx=128)),
    "gemma3-text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(num_key_value_heads=2, head_dim=16, sliding_window=4, **_LM)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_key_value_heads=2, sliding_window=4, **_LM)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                 num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=128)),
    "xglm": ("XGLMConfig", "XGLMForCausalLM",
             dict(vocab_size=128, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                  max_position_embeddings=128)),
}
#: Encoder-decoder LMs (1 encoder layer, 2 decoder layers): 3 self, 2 cross.
_S2S = dict(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
            decoder_ffn_dim=128, max_position_embeddings=128)
SEQ2SEQ = {
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", _S2S),
    "blenderbot": ("BlenderbotConfig", "BlenderbotForConditionalGeneration", _S2S),
    "plbart": ("PLBartConfig", "PLBartForConditionalGeneration", _S2S),
    "m2m100": ("M2M100Config", "M2M100ForConditionalGeneration", _S2S),
    "longt5-local": ("LongT5Config", "LongT5ForConditionalGeneration",
                     dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1,
                          num_decoder_layers=2, num_heads=4, encoder_attention_type="local",
                          local_radius=2)),
}


def _dim(name: str, low: int = 1, high: int = 64):
    import torch

    return torch.export.Dim(name, min=low, max=high)


def _causal_logits(lm):
    """``forward(input_ids) -> logits`` of a causal LM, no cache."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return Logits()


def _causal(name: str):
    import torch
    import transformers

    config, model, fields = CAUSAL[name]
    lm = getattr(transformers, model)(getattr(transformers, config)(**fields)).eval()
    return (_causal_logits(lm), (torch.randint(3, 100, (2, 7)),),
            {"input_ids": {0: _dim("b"), 1: _dim("s", 2)}}, (2, 0))


def _seq2seq(name: str):
    import torch
    import transformers

    config, model, fields = SEQ2SEQ[name]
    lm = getattr(transformers, model)(getattr(transformers, config)(**fields)).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, decoder_input_ids):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask,
                           decoder_input_ids=decoder_input_ids, use_cache=False).logits

    ids = torch.randint(3, 100, (2, 9))
    b, s, t = _dim("b"), _dim("s", 2), _dim("t", 2)
    return (Logits(), (ids, torch.ones_like(ids), torch.randint(3, 100, (2, 5))),
            {"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s},
             "decoder_input_ids": {0: b, 1: t}}, (3, 2))


def _gemma2():
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    lm = Gemma2ForCausalLM(Gemma2Config(**_LM, num_key_value_heads=2, head_dim=16,
                                        sliding_window=8, attn_logit_softcapping=50.0,
                                        final_logit_softcapping=30.0,
                                        attn_implementation="eager")).eval()
    return (_causal_logits(lm), (torch.randint(0, 128, (1, 12)),),
            {"input_ids": {1: _dim("s", 2)}}, (2, 0))


def _qformer():
    import torch
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    model = Blip2QFormerModel(Blip2QFormerConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        encoder_hidden_size=48, cross_attention_frequency=1)).eval()

    class Queries(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, query_embeds, encoder_hidden_states):
            return self.model(query_embeds=query_embeds,
                              encoder_hidden_states=encoder_hidden_states).last_hidden_state

    b = _dim("b")
    return (Queries(), (torch.randn(1, 8, 64), torch.randn(1, 10, 48)),
            {"query_embeds": {0: b}, "encoder_hidden_states": {0: b, 1: _dim("n")}}, (2, 2))


def _speech2text():
    import torch
    from transformers import Speech2TextConfig, Speech2TextForConditionalGeneration

    model = Speech2TextForConditionalGeneration(Speech2TextConfig(
        vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
        decoder_ffn_dim=128, max_source_positions=256, max_target_positions=64,
        input_feat_per_channel=16, num_conv_layers=2, conv_channels=32)).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_features, decoder_input_ids):
            return self.model(input_features=input_features, decoder_input_ids=decoder_input_ids,
                              use_cache=False).logits

    return (Logits(), (torch.randn(2, 40, 16), torch.randint(3, 100, (2, 5))),
            {"input_features": {1: _dim("f", 8, 256)}, "decoder_input_ids": {1: _dim("t", 2)}},
            (3, 2))


def _perceiver():
    import torch
    from transformers import PerceiverConfig, PerceiverModel

    model = PerceiverModel(PerceiverConfig(
        num_latents=8, d_latents=64, d_model=32, num_blocks=1, num_self_attends_per_block=2,
        num_self_attention_heads=4, num_cross_attention_heads=4)).eval()

    class Latents(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, inputs):
            return self.model(inputs=inputs).last_hidden_state

    return Latents(), (torch.randn(2, 10, 32),), {"inputs": {1: _dim("n", 2)}}, (2, 1)


def _vit_gpt2():
    import torch
    from transformers import (
        GPT2Config,
        VisionEncoderDecoderConfig,
        VisionEncoderDecoderModel,
        ViTConfig,
    )

    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=64, image_size=16, patch_size=8),
        GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, add_cross_attention=True,
                   n_positions=64))
    model = VisionEncoderDecoderModel(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values, decoder_input_ids):
            return self.model(pixel_values=pixel_values, decoder_input_ids=decoder_input_ids,
                              use_cache=False).logits

    b = _dim("b", 1, 16)
    return (Logits(), (torch.randn(2, 3, 16, 16), torch.randint(0, 100, (2, 5))),
            {"pixel_values": {0: b}, "decoder_input_ids": {0: b, 1: _dim("t", 2, 32)}}, (3, 2))


def _sd3():
    import torch
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()

    class Denoise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return self.model(hidden_states=hidden_states,
                              encoder_hidden_states=encoder_hidden_states,
                              pooled_projections=pooled_projections, timestep=timestep,
                              return_dict=False)[0]

    # MMDiT's joint attention is self-attention over image and text tokens concatenated.
    return (Denoise(), (torch.randn(1, 4, 8, 8), torch.randn(1, 7, 24), torch.randn(1, 16),
                        torch.tensor([10])), None, (2, 0))


def _pixart():
    import torch
    from diffusers import PixArtTransformer2DModel

    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=32, caption_channels=24, sample_size=8, patch_size=2,
        norm_type="ada_norm_single", use_additional_conditions=False).eval()

    class Denoise(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, hidden_states, encoder_hidden_states, timestep):
            return self.model(hidden_states, encoder_hidden_states=encoder_hidden_states,
                              timestep=timestep, return_dict=False)[0]

    return (Denoise(), (torch.randn(1, 4, 8, 8), torch.randn(1, 7, 24), torch.tensor([10])),
            None, (2, 2))


MODELS = {**{name: (lambda n=name: _causal(n)) for name in CAUSAL},
          **{name: (lambda n=name: _seq2seq(n)) for name in SEQ2SEQ},
          "gemma2-softcap": _gemma2, "blip2-qformer": _qformer, "speech2text": _speech2text,
          "perceiver": _perceiver, "vit-gpt2": _vit_gpt2, "sd3-mmdit": _sd3, "pixart": _pixart}


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = str(Path(sys.executable).with_name("xattn-compiler"))
    return subprocess.run([exe, *args], capture_output=True, text=True)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[-1] if lines else ""


def measure(name: str, workdir: Path) -> dict:
    import torch

    torch.manual_seed(0)
    module, args, dynamic, expected = MODELS[name]()
    row = {"model": name, "expected": list(expected)}
    path, out = workdir / f"{name}.onnx", workdir / "out" / f"{name}.onnx"
    names = list(module.forward.__code__.co_varnames[1:1 + len(args)])
    try:
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=names,
                          dynamic_shapes=dynamic)
    except Exception as exc:  # the exporter's failure, reported as a row
        row["error"] = f"export failed: {type(exc).__name__}"
        return row
    raw = _cli("inspect", "--raw", "--json", str(path))
    summary = json.loads(raw.stdout)["summary"] if raw.returncode == 0 else None
    row["found_raw"] = [summary["self"], summary["cross"]] if summary else None
    done = _cli("optimize", str(path), "-o", str(out), "--verify")
    row["verified"] = done.returncode == 0 and "verified" in done.stdout + done.stderr
    if done.returncode != 0:
        row["error"] = _last_line(done)[:200]
        return row
    after = _cli("inspect", "--json", str(out))
    blocks = json.loads(after.stdout)["attention"] if after.returncode == 0 else []
    row["fused"] = [sum(b["fused"] for b in blocks), len(blocks)]
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| model | expected self/cross | found (raw file) | fused | verified | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        found = "/".join(map(str, r["found_raw"])) if r.get("found_raw") else ""
        fused = "{} of {}".format(*r["fused"]) if r.get("fused") else ""
        lines.append(f"| {r['model']} | {'/'.join(map(str, r['expected']))} | {found} | "
                     f"{fused} | {'yes' if r.get('verified') else 'no'} | {r.get('error', '')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="xattn-heldout-", dir=args.workdir) as tmp:
        for name in args.only or list(MODELS):
            rows.append(measure(name, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "heldout.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
