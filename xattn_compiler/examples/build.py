"""Rebuild the bundled example model: a tiny Whisper-style decoder exported with torch dynamo.

Run ``python -m xattn_compiler.examples.build [--out DIR]``. It writes three files:

* ``whisper_tiny_decoder.onnx``: the exported graph with its weights embedded;
* ``whisper_tiny_decoder.npz``: sample inputs under their input names and the torch reference
  outputs under ``ref:<output name>``;
* ``whisper_tiny_decoder.json``: the manifest read by :func:`xattn_compiler.examples.example_manifest`.

The attention is written out by hand (separate q/k/v projections, explicit scale, softmax,
matmul, head split and merge) because that eager spelling is what users' exports contain and what
the compiler's patterns have to recognise. torch is imported only inside the functions so that
importing this module, or the package, never needs torch.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from xattn_compiler.zoo.export import strip_source_locations

NAME = "whisper_tiny_decoder"

# Architecture. Small enough that the .onnx stays well under 2 MB with its weights embedded.
D_MODEL = 64
NUM_HEADS = 4
HEAD_DIM = D_MODEL // NUM_HEADS
NUM_LAYERS = 2
FFN_DIM = 4 * D_MODEL
VOCAB = 256
MAX_TARGET_POSITIONS = 64
MAX_SOURCE_POSITIONS = 1500  # only bounds the dynamic encoder length, as in Whisper

OPSET = 18
SEED = 0
# Sample shapes: deliberately all different so a dim mix-up shows in the outputs' shapes.
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_ENC_LEN = 2, 5, 12
# Symbolic names given to the dynamic dims, in the graph and in the manifest.
DIM_BATCH, DIM_SEQ, DIM_ENC = "batch", "seq", "enc_len"


def _define_modules():
    """Define the torch modules; a function so that torch is imported only when building."""
    import torch
    from torch import nn

    class Attention(nn.Module):
        """Multi-head attention spelled out as Whisper's eager implementation does."""

        def __init__(self) -> None:
            super().__init__()
            self.scaling = HEAD_DIM**-0.5
            # Whisper gives q and v a bias but not k (a bias on k cancels in the softmax).
            self.q_proj = nn.Linear(D_MODEL, D_MODEL, bias=True)
            self.k_proj = nn.Linear(D_MODEL, D_MODEL, bias=False)
            self.v_proj = nn.Linear(D_MODEL, D_MODEL, bias=True)
            self.out_proj = nn.Linear(D_MODEL, D_MODEL, bias=True)

        @staticmethod
        def _split_heads(x: torch.Tensor) -> torch.Tensor:
            # [batch, len, d_model] -> [batch, heads, len, head_dim]
            batch, length, _ = x.shape
            return x.view(batch, length, NUM_HEADS, HEAD_DIM).transpose(1, 2)

        def forward(
            self,
            hidden: torch.Tensor,
            key_value_states: torch.Tensor | None = None,
            mask: torch.Tensor | None = None,
        ) -> torch.Tensor:
            batch, length, _ = hidden.shape
            # Cross-attention takes K/V from the encoder states, self-attention from itself.
            kv_source = hidden if key_value_states is None else key_value_states
            q = self._split_heads(self.q_proj(hidden) * self.scaling)
            k = self._split_heads(self.k_proj(kv_source))
            v = self._split_heads(self.v_proj(kv_source))
            scores = torch.matmul(q, k.transpose(2, 3))
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            context = torch.matmul(probs, v)
            context = context.transpose(1, 2).reshape(batch, length, D_MODEL)
            return self.out_proj(context)

    class DecoderLayer(nn.Module):
        """Pre-LN layer: causal self-attention, cross-attention, GELU MLP."""

        def __init__(self) -> None:
            super().__init__()
            self.self_attn_layer_norm = nn.LayerNorm(D_MODEL)
            self.self_attn = Attention()
            self.encoder_attn_layer_norm = nn.LayerNorm(D_MODEL)
            self.encoder_attn = Attention()
            self.final_layer_norm = nn.LayerNorm(D_MODEL)
            self.fc1 = nn.Linear(D_MODEL, FFN_DIM)
            self.fc2 = nn.Linear(FFN_DIM, D_MODEL)

        def forward(
            self, hidden: torch.Tensor, encoder_hidden_states: torch.Tensor, mask: torch.Tensor
        ) -> torch.Tensor:
            hidden = hidden + self.self_attn(self.self_attn_layer_norm(hidden), mask=mask)
            hidden = hidden + self.encoder_attn(
                self.encoder_attn_layer_norm(hidden), key_value_states=encoder_hidden_states
            )
            mlp = self.fc2(nn.functional.gelu(self.fc1(self.final_layer_norm(hidden))))
            return hidden + mlp

    class TinyWhisperDecoder(nn.Module):
        """Token embedding + learned positions, decoder layers, final LayerNorm, tied vocab head."""

        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(VOCAB, D_MODEL)
            self.embed_positions = nn.Embedding(MAX_TARGET_POSITIONS, D_MODEL)
            self.layers = nn.ModuleList(DecoderLayer() for _ in range(NUM_LAYERS))
            self.layer_norm = nn.LayerNorm(D_MODEL)

        def forward(
            self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor
        ) -> torch.Tensor:
            seq = input_ids.shape[1]
            # Whisper slices the position table rather than looking up arange(seq).
            hidden = self.embed_tokens(input_ids) + self.embed_positions.weight[:seq]
            # Additive causal mask, built from the (dynamic) sequence length.
            mask = torch.full((seq, seq), float("-inf"), device=input_ids.device).triu(1)
            for layer in self.layers:
                hidden = layer(hidden, encoder_hidden_states, mask)
            hidden = self.layer_norm(hidden)
            # Tied output projection, as Whisper's proj_out shares embed_tokens' weight.
            return hidden @ self.embed_tokens.weight.t()

    # Give the classes a stable, import-path-independent name: the exporter records it in every
    # node's metadata, and "__main__._define_modules.<locals>.X" would change with how build runs.
    for cls in (Attention, DecoderLayer, TinyWhisperDecoder):
        cls.__module__ = "xattn_compiler.examples.build"
        cls.__qualname__ = cls.__name__
    return TinyWhisperDecoder


def build_model():
    """Return the example decoder with seeded random weights, in eval mode."""
    import torch

    torch.manual_seed(SEED)
    model = _define_modules()()
    # Default init leaves biases and LayerNorm affine at 0/1; randomise them too so that a pass
    # which drops a bias or a LayerNorm scale changes the outputs and gets caught.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "layer_norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def sample_inputs(
    batch: int = SAMPLE_BATCH,
    seq: int = SAMPLE_SEQ,
    enc_len: int = SAMPLE_ENC_LEN,
    seed: int = SEED,
) -> dict[str, np.ndarray]:
    """Deterministic sample inputs keyed by graph input name (default batch 2, seq 5, enc 12)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, VOCAB, size=(batch, seq), dtype=np.int64)
    encoder = rng.standard_normal((batch, enc_len, D_MODEL)).astype(np.float32)
    return {"input_ids": input_ids, "encoder_hidden_states": encoder}


def torch_reference(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The torch model's logits for ``inputs``."""
    import torch

    with torch.no_grad():
        args = (torch.from_numpy(inputs[k]) for k in ("input_ids", "encoder_hidden_states"))
        return model(*args).numpy()


def export_onnx(model, inputs: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Export with torch dynamo at opset 18 with batch, seq and enc_len dynamic."""
    import torch
    from torch.export import Dim

    batch = Dim(DIM_BATCH, min=1, max=1024)
    seq = Dim(DIM_SEQ, min=1, max=MAX_TARGET_POSITIONS)
    enc_len = Dim(DIM_ENC, min=1, max=MAX_SOURCE_POSITIONS)
    args = tuple(torch.from_numpy(inputs[k]) for k in ("input_ids", "encoder_hidden_states"))
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        opset_version=OPSET,
        input_names=["input_ids", "encoder_hidden_states"],
        output_names=["logits"],
        dynamic_shapes={
            "input_ids": {0: batch, 1: seq},
            "encoder_hidden_states": {0: batch, 1: enc_len},
        },
        external_data=False,
    )
    # Take the proto straight from the program so weights are embedded, never external.
    return strip_source_locations(program.model_proto)


def _value_info_entry(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """Describe a graph input or output for the manifest (symbolic dims as strings)."""
    tensor = value.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "dtype": dtype, "shape": shape}


def build_manifest(model: onnx.ModelProto) -> dict[str, Any]:
    """The JSON manifest describing the exported example."""
    import torch

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "name": NAME,
        "description": (
            "Whisper-style decoder, 2 pre-LN layers, d_model 64, 4 heads: causal self-attention, "
            "cross-attention on encoder_hidden_states, GELU MLP, tied vocab projection (256). "
            "Eager attention spelling, seeded random weights, exported with torch dynamo."
        ),
        "exporter": "torch.onnx dynamo",
        "opset": opset,
        "torch_version": torch.__version__,
        "inputs": [_value_info_entry(v) for v in model.graph.input],
        "outputs": [_value_info_entry(v) for v in model.graph.output],
        "attention": {
            "self": NUM_LAYERS,
            "cross": NUM_LAYERS,
            "num_heads": NUM_HEADS,
            "head_dim": HEAD_DIM,
        },
        "static_inputs": ["encoder_hidden_states"],
        "sample": f"{NAME}.npz",
    }


def run_onnxruntime(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the model in onnxruntime with graph optimisations off (checks the graph as written)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, inputs)


def check_matches(actual: np.ndarray, reference: np.ndarray) -> None:
    """Raise AssertionError unless ``actual`` matches ``reference`` at fp32 export tolerance."""
    atol = 1e-4 * max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(actual, reference, rtol=1e-3, atol=atol)


def build(out_dir: Path) -> dict[str, Path]:
    """Build, export, check and write the example into ``out_dir``; return the written paths."""
    model = build_model()
    inputs = sample_inputs()
    reference = torch_reference(model, inputs)

    onnx_model = export_onnx(model, inputs)
    onnx.checker.check_model(onnx_model, full_check=True)
    (logits,) = run_onnxruntime(onnx_model, inputs)
    check_matches(logits, reference)
    # The dims must really be dynamic: run shapes unlike the export's, including the 1s that
    # torch.export likes to specialise, and the longest decoder sequence.
    for batch, seq, enc_len in ((1, 1, 1), (3, MAX_TARGET_POSITIONS, 40)):
        other = sample_inputs(batch, seq, enc_len, seed=SEED + 1)
        (logits,) = run_onnxruntime(onnx_model, other)
        check_matches(logits, torch_reference(model, other))

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "onnx": out_dir / f"{NAME}.onnx",
        "sample": out_dir / f"{NAME}.npz",
        "manifest": out_dir / f"{NAME}.json",
    }
    paths["onnx"].write_bytes(onnx_model.SerializeToString(deterministic=True))
    _write_npz(paths["sample"], {**inputs, "ref:logits": reference})
    manifest = build_manifest(onnx_model)
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an uncompressed npz; np.savez needs a file object to accept ':' in key names."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: ``python -m xattn_compiler.examples.build [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory to write the example files into (default: the examples folder)",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = build(args.out)
    elapsed = time.perf_counter() - start
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    print(f"built in {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
