"""Real exports of `transformers` models for tests, built from configs and cached on disk.

Nothing is downloaded: each model is built from a small config with seeded random weights and
exported with ``torch.onnx.export(..., dynamo=True)``, the only exporter transformers 5.x
supports. An export is cached under ``<cache_dir>/<model>-<key>/`` where ``<key>`` hashes the
torch, transformers, onnx and onnxscript versions, the config, the options and this file's own
text, so any change that could alter the graph re-exports and an unchanged re-run reuses it.

Each cache entry holds ``model.onnx`` (weights embedded), ``sample.npz`` (sample inputs under
their input names, torch reference outputs under ``ref:<output name>``) and ``export.json``
(what was exported with which versions, and how long the export took).

Run this file directly to export into a temporary directory and check the export against torch
in onnxruntime: ``python tests/real_exports.py [--cache DIR] [--attn eager|sdpa]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

#: Tiny Whisper: 2 decoder layers, d_model 64, 4 heads (head_dim 16). The special token ids must
#: fall inside the small vocabulary (the defaults are ~50k), and the suppress lists are dropped
#: because they name token ids of the real vocabulary.
WHISPER_CONFIG: dict[str, Any] = {
    "vocab_size": 128,
    "d_model": 64,
    "decoder_layers": 2,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 128,
    "encoder_layers": 1,
    "encoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "num_mel_bins": 16,
    "max_source_positions": 32,
    "max_target_positions": 32,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
}
#: Sample shapes: all different so a mixed-up dim shows in the outputs' shapes.
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_ENC_LEN = 2, 5, 12
INPUT_NAMES = ("input_ids", "encoder_hidden_states")
OUTPUT_NAMES = ("logits",)
OPSET = 18
SEED = 0
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
#: Distributions whose versions go into the cache key.
EXPORT_LIBRARIES = ("torch", "transformers", "onnx", "onnxscript")


def export_whisper_decoder(cache_dir: Path, attn_implementation: str = "eager") -> Path:
    """Export (or reuse) a tiny Whisper decoder + vocab head; return the path of its model.onnx.

    The graph has inputs ``input_ids`` int64 [batch, seq] and ``encoder_hidden_states`` float32
    [batch, enc_len, 64], output ``logits`` [batch, seq, 128], no KV cache, and dynamic batch,
    seq and enc_len. ``attn_implementation`` ("eager" or "sdpa") picks transformers' attention
    code and so the spelling of attention in the graph; each is cached separately.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}")
    options = {"attn_implementation": attn_implementation, "opset": OPSET, "seed": SEED}
    entry = Path(cache_dir) / f"whisper_decoder-{_cache_key(WHISPER_CONFIG, options)}"
    model_path = entry / "model.onnx"
    if model_path.is_file() and (entry / "sample.npz").is_file():
        return model_path
    return _export_atomically(entry, lambda tmp: _export_whisper(tmp, options)) / "model.onnx"


def read_sample(model_path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Sample inputs and torch reference outputs stored next to an exported ``model.onnx``."""
    inputs: dict[str, np.ndarray] = {}
    references: dict[str, np.ndarray] = {}
    with np.load(Path(model_path).parent / "sample.npz", allow_pickle=False) as data:
        for key in data.files:
            if key.startswith("ref:"):
                references[key[len("ref:") :]] = data[key]
            else:
                inputs[key] = data[key]
    return inputs, references


def _cache_key(config: dict[str, Any], options: dict[str, Any]) -> str:
    """Short hash of everything that can change the exported graph."""
    material = {
        "versions": _versions(),
        "config": config,
        "options": options,
        # This file's text: editing the recipe must not silently reuse an old export.
        "recipe": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _export_atomically(entry: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then move ``tmp_dir`` to ``entry`` in one rename.

    An interrupted export leaves at most a hidden temp dir, never a half-written entry. If a
    concurrent process (e.g. another pytest-xdist worker) finished first, its entry is kept.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / "model.onnx").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def _build_whisper(attn_implementation: str):
    """Tiny WhisperForConditionalGeneration with seeded random weights, in eval mode."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(**WHISPER_CONFIG)
    config._attn_implementation = attn_implementation
    torch.manual_seed(SEED)
    model = WhisperForConditionalGeneration(config)
    _randomize(model)
    return model.eval()


def _randomize(model) -> None:
    """Redraw every parameter from a seeded generator.

    transformers initialises with std 0.02 and zero biases, which makes attention nearly uniform
    and hides a dropped bias; these draws give O(1) attention scores and non-zero biases.
    """
    import torch

    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator)
            if "layer_norm" in name and name.endswith(".weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.1 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:  # projections: keep activations O(1) whatever the fan-in
                param.copy_(noise * param.shape[-1] ** -0.5)


def _decoder_with_head(model):
    """Wrap the decoder and vocab head as ``forward(input_ids, encoder_hidden_states) -> logits``."""
    import torch

    class WhisperDecoderWithHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = model.get_decoder()
            self.proj_out = model.proj_out

        def forward(self, input_ids, encoder_hidden_states):
            hidden = self.decoder(
                input_ids=input_ids,
                encoder_hidden_states=encoder_hidden_states,
                use_cache=False,  # no KV cache: one graph over the whole decoder sequence
                return_dict=True,
            ).last_hidden_state
            return self.proj_out(hidden)

    return WhisperDecoderWithHead().eval()


def _whisper_sample() -> dict[str, np.ndarray]:
    """Seeded sample inputs keyed by input name."""
    rng = np.random.default_rng(SEED)
    vocab, d_model = WHISPER_CONFIG["vocab_size"], WHISPER_CONFIG["d_model"]
    return {
        "input_ids": rng.integers(0, vocab, (SAMPLE_BATCH, SAMPLE_SEQ), dtype=np.int64),
        "encoder_hidden_states": rng.standard_normal(
            (SAMPLE_BATCH, SAMPLE_ENC_LEN, d_model)
        ).astype(np.float32),
    }


def _export_whisper(out_dir: Path, options: dict[str, Any]) -> None:
    """Export the wrapped decoder into ``out_dir`` with its sample and an export.json record."""
    import torch
    from torch.export import Dim

    wrapper = _decoder_with_head(_build_whisper(options["attn_implementation"]))
    inputs = _whisper_sample()
    args = tuple(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)
    with torch.no_grad():
        reference = wrapper(*args).numpy()

    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=WHISPER_CONFIG["max_target_positions"])
    enc_len = Dim("enc_len", min=1, max=4096)
    start = time.perf_counter()
    program = torch.onnx.export(
        wrapper,
        args,
        dynamo=True,
        opset_version=options["opset"],
        input_names=list(INPUT_NAMES),
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={
            "input_ids": {0: batch, 1: seq},
            "encoder_hidden_states": {0: batch, 1: enc_len},
        },
        external_data=False,
    )
    seconds = time.perf_counter() - start
    # The proto in memory always holds its weights, so this file never has external data.
    (out_dir / "model.onnx").write_bytes(program.model_proto.SerializeToString())
    with open(out_dir / "sample.npz", "wb") as f:  # a file object lets keys contain ':'
        np.savez(f, **inputs, **{f"ref:{OUTPUT_NAMES[0]}": reference})
    record = {
        "model": "whisper_decoder",
        "config": WHISPER_CONFIG,
        "options": options,
        "versions": _versions(),
        "export_seconds": round(seconds, 2),
    }
    (out_dir / "export.json").write_text(json.dumps(record, indent=2) + "\n")


def _versions() -> dict[str, str]:
    """Versions of the libraries that shape the export.

    Read from the installed metadata so that a cache hit does not have to import torch.
    """
    return {name: metadata.version(name) for name in EXPORT_LIBRARIES}


def _check(cache_dir: Path, attn_implementation: str) -> None:
    """Export, then check the graph with onnx.checker and onnxruntime against torch."""
    import collections

    import onnx
    import onnxruntime as ort

    start = time.perf_counter()
    path = export_whisper_decoder(cache_dir, attn_implementation)
    print(f"{path} ready in {time.perf_counter() - start:.1f}s ({path.stat().st_size} bytes)")
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    histogram = collections.Counter(node.op_type for node in model.graph.node)
    print(f"{len(model.graph.node)} nodes: {dict(histogram.most_common())}")
    for value in (*model.graph.input, *model.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        print(f"  {value.name}: {dims}")

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    inputs, references = read_sample(path)
    _compare(session, inputs, references)

    # The dims must really be dynamic: other shapes, including the 1s torch.export likes to
    # specialise and the longest decoder sequence, against a freshly built torch model.
    import torch

    wrapper = _decoder_with_head(_build_whisper(attn_implementation))
    rng = np.random.default_rng(SEED + 1)
    for batch, seq, enc_len in ((1, 1, 1), (3, WHISPER_CONFIG["max_target_positions"], 40)):
        other = {
            "input_ids": rng.integers(0, WHISPER_CONFIG["vocab_size"], (batch, seq)),
            "encoder_hidden_states": rng.standard_normal((batch, enc_len, 64), np.float32),
        }
        with torch.no_grad():
            ref = wrapper(*(torch.from_numpy(other[n]) for n in INPUT_NAMES)).numpy()
        _compare(session, other, {"logits": ref})


def _compare(session, inputs: dict[str, np.ndarray], references: dict[str, np.ndarray]) -> None:
    """Run ``session`` and assert its outputs match ``references`` at fp32 export tolerance."""
    outputs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, inputs), strict=True)
    )
    shapes = {name: value.shape for name, value in inputs.items()}
    for name, ref in references.items():
        atol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        np.testing.assert_allclose(outputs[name], ref, rtol=1e-3, atol=atol)
        diff = np.abs(outputs[name] - ref).max()
        print(f"  {shapes}: {name} max |diff| {diff:.3g} (atol {atol:.3g})")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Export and check the cached test models.")
    parser.add_argument("--cache", type=Path, default=None, help="cache dir (default: a temp dir)")
    parser.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, default="eager")
    cli = parser.parse_args()
    if cli.cache is None:
        with tempfile.TemporaryDirectory() as tmp:
            _check(Path(tmp), cli.attn)
    else:
        _check(cli.cache, cli.attn)
