"""Per-step latency before and after ``split-kv``, against an ideal split, with ONNX Runtime CPU.

    python benchmarks/bench_split.py [--out benchmarks/results] [--threads 2] [--reps 30]

Two models, each measured per step (one decoder call / one denoising step):

* **Whisper-base-like decoder** (the zoo's ``whisper-decoder-eager`` at bench size: d_model
  512, 6 layers, 8 heads, vocab 51865), batch 1, 1500 encoder frames, a 16-token prefix, no
  self-attention cache (the export has none). Three graphs run side by side: the original
  (projects the encoder states at every step), the split decoder (reads the projected K/V),
  and the **ideal**: the same transformers decoder with the same weights exported by dynamo
  with its cross-attention cache filled (``EncoderDecoderCache`` with an empty self-attention
  cache and the cross K/V as inputs), so it never projects the encoder states.
* **SD-UNet-like UNet** (``UNet2DConditionModel``, a mid-size config defined below: the
  SD-1.5 layout at 128/256/512/512 channels, 32x32 latents, batch 2 for classifier-free
  guidance, 77 context tokens of width 768): original against split.

ONNX Runtime runs on the CPU with ``--threads`` intra-op threads and its default graph
optimizations (this is a runtime measurement, not a verification). The graphs of a model run in
one process, interleaved in a rotating order, ``--reps`` times after a warm-up; the table gives
medians and the ratio of the per-repetition times. The projector's one-time cost is measured
the same way. Beside each ratio stands the FLOP model's prediction: MatMul/Gemm (and, for the
UNet, Conv) FLOPs per step at the benchmark sizes, as a plain FLOP ratio and calibrated by the
projector's own throughput on the removed work. Writes ``split.md`` and ``split.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import xattn_compiler.io as xio
from xattn_compiler.split import split_static_kv
from xattn_compiler.zoo import cached_export
from xattn_compiler.zoo.cache import default_cache_dir

log = logging.getLogger("bench_split")

WHISPER = {"batch": 1, "seq": 16, "enc_len": 1500}
UNET = {"batch": 2, "ctx_len": 77}
#: SD-1.5's UNet layout (3 cross-attention levels, 2 layers a block, context width 768) at
#: 128/256/512/512 channels instead of 320/640/1280/1280 and 32x32 latents instead of 64x64:
#: a denoising step takes a fraction of a second on 2 CPU threads instead of many seconds.
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
}
HEAVY_FLOP_OPS = ("MatMul", "Gemm")
#: Bump when the ideal decoder's recipe changes, so its cached export is redone.
IDEAL_RECIPE = "whisper-bench-eager-cross-cache-v1"


# --- the ideal Whisper split: transformers' own cross-attention cache -------------------------------

def ideal_whisper(cache: Path) -> Path:
    """The bench Whisper decoder exported with its cross-attention cache as inputs (cached)."""
    import torch
    import transformers

    key = hashlib.sha256(json.dumps([torch.__version__, transformers.__version__,
                                     IDEAL_RECIPE]).encode()).hexdigest()[:12]
    path = cache / f"bench-split-whisper-ideal-{key}" / "model.onnx"
    if path.is_file():
        return path
    module, args, dynamic = _ideal_module()
    names = ["input_ids"] + [f"past_{role}_cross_{i}" for i in range(len(args[1:]) // 2)
                             for role in ("key", "value")]
    start = time.perf_counter()
    program = torch.onnx.export(module, args, dynamo=True, opset_version=18,
                                dynamic_shapes=dynamic, input_names=names,
                                output_names=["logits"])
    log.info("exported the ideal decoder in %.0f s", time.perf_counter() - start)
    xio.save(program.model_proto, path)
    return path


def _ideal_module() -> tuple[Any, tuple, tuple]:
    """The zoo's bench Whisper decoder (same seed, same weights) reading cross K/V from a
    filled ``EncoderDecoderCache``; example arguments and dynamic shapes for the export."""
    import torch
    from torch import nn
    from torch.export import Dim
    from torch.nn import functional
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    from xattn_compiler.zoo.families.whisper import build_decoder

    class CrossCachedDecoder(nn.Module):
        """``forward(input_ids, k_0, v_0, ..., k_5, v_5) -> logits``; K/V are [B, H, S, D]."""

        def __init__(self, decoder: nn.Module):
            super().__init__()
            self.decoder = decoder

        def forward(self, input_ids, *cross_kv):
            pairs = [(cross_kv[i], cross_kv[i + 1]) for i in range(0, len(cross_kv), 2)]
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache(pairs))
            # Only marks the layers as cross-attention: with the cache filled they read K/V
            # from it and never project these states.
            marker = cross_kv[0][:, 0, :1, :1].expand(-1, 1, self.decoder.config.d_model)
            hidden = self.decoder(input_ids=input_ids, encoder_hidden_states=marker,
                                  cache=cache, use_cache=True).last_hidden_state
            return functional.linear(hidden, self.decoder.embed_tokens.weight)

    built = build_decoder("bench", "eager")
    decoder = built.module.decoder
    states = built.inputs["encoder_hidden_states"]
    heads = decoder.config.decoder_attention_heads
    shape = (states.shape[0], -1, heads, decoder.config.d_model // heads)
    with torch.no_grad():
        kv = [proj(states).view(shape).transpose(1, 2).contiguous()
              for layer in decoder.layers for proj in (layer.encoder_attn.k_proj,
                                                       layer.encoder_attn.v_proj)]
    batch, seq, enc_len = Dim("batch"), Dim("seq"), Dim("enc_len")
    dynamic = ({0: batch, 1: seq}, tuple({0: batch, 2: enc_len} for _ in kv))
    return CrossCachedDecoder(decoder).eval(), (built.inputs["input_ids"], *kv), dynamic


# --- the mid-size UNet --------------------------------------------------------------------------------

def mid_unet(cache: Path) -> Path:
    """The mid-size UNet exported by dynamo (cached by config and library versions)."""
    import diffusers
    import torch

    from xattn_compiler.zoo.export import export_model
    from xattn_compiler.zoo.spec import ZooModel

    key = hashlib.sha256(json.dumps([torch.__version__, diffusers.__version__, UNET_CONFIG,
                                     UNET], sort_keys=True).encode()).hexdigest()[:12]
    directory = cache / f"bench-split-unet-mid-{key}"
    if not (directory / "model.onnx").is_file():
        recipe = ZooModel("unet2d-mid", "bench", "mid-size SD-like UNet", build_mid_unet,
                          sizes=("bench",), requires=("torch", "diffusers"))
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=cache))
        try:
            export_model(recipe, tmp, "bench")
            tmp.rename(directory)  # appears complete or not at all
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory / "model.onnx"


def build_mid_unet(size: str) -> Any:
    """``UNET_CONFIG`` with seeded weights, wrapped to return the sample tensor."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch import nn

    from xattn_compiler.zoo.export import randomize_parameters
    from xattn_compiler.zoo.families.unet import attention_truth
    from xattn_compiler.zoo.spec import Built

    class Step(nn.Module):
        def __init__(self, unet: nn.Module):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    randomize_parameters(unet, 0)
    generator = torch.Generator().manual_seed(1)
    side, batch = UNET_CONFIG["sample_size"], UNET["batch"]
    inputs = {"sample": torch.randn(batch, 4, side, side, generator=generator),
              "timestep": torch.tensor([10, 500][:batch], dtype=torch.int64),
              "encoder_hidden_states": torch.randn(batch, UNET["ctx_len"], 768,
                                                   generator=generator)}
    return Built(module=Step(unet).eval(), inputs=inputs, output_names=["out_sample"],
                 attention=attention_truth(UNET_CONFIG),
                 static_inputs=["encoder_hidden_states"],
                 dynamic_dims={"sample": {0: "batch"}, "timestep": {0: "batch"},
                               "encoder_hidden_states": {0: "batch", 1: "ctx_len"}},
                 config=dict(UNET_CONFIG))


# --- measuring ----------------------------------------------------------------------------------------

def session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    """A CPU session at ONNX Runtime's default optimization level with ``threads`` threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle sessions must not spin: with several sessions side by side on few cores, one
    # session's spinning thread pool steals the cores another is measured on.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def only_inputs(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]
                ) -> dict[str, np.ndarray]:
    """The arrays of ``feeds`` that ``sess`` takes."""
    return {i.name: feeds[i.name] for i in sess.get_inputs()}


def run_named(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name, from the arrays of ``feeds`` the session takes."""
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, only_inputs(sess, feeds)), strict=True))


def side_by_side(runs: dict[str, tuple[ort.InferenceSession, dict]], reps: int,
                 warmup: int = 3) -> dict[str, list[float]]:
    """Seconds per run of each session, interleaved in a rotating order so that drift in the
    machine's speed (other processes, thermal state) hits every graph alike."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name][0].run(None, runs[name][1])
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            sess, feeds = runs[name]
            start = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return times


def summary(times: dict[str, list[float]], base: str) -> dict[str, Any]:
    """Median ms per graph, and the median of per-repetition ratios to ``base``."""
    out: dict[str, Any] = {}
    for name, values in times.items():
        ratios = [b / v for b, v in zip(times[base], values, strict=True)]
        out[name] = {"median_ms": 1e3 * float(np.median(values)),
                     "p10_ms": 1e3 * float(np.percentile(values, 10)),
                     "p90_ms": 1e3 * float(np.percentile(values, 90)),
                     "speedup_vs_original": float(np.median(ratios))}
    return out


def flops(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """MatMul/Gemm and Conv FLOPs of one run on ``feeds``, from the shapes the run produces
    (shape inference leaves some dims of computed reshapes unknown; a run does not)."""
    shapes = runtime_shapes(model, feeds, {name for node in model.graph.node
                                           if node.op_type in (*HEAVY_FLOP_OPS, "Conv")
                                           for name in (node.input[0], node.output[0])})
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    totals = {"matmul": 0.0, "conv": 0.0}
    for node in model.graph.node:
        if node.op_type in (*HEAVY_FLOP_OPS, "Conv"):
            totals["conv" if node.op_type == "Conv" else "matmul"] += _node_flops(node, shapes)
    return totals


def runtime_shapes(model: onnx.ModelProto, feeds: dict[str, np.ndarray],
                   names: set[str]) -> dict[str, list[int]]:
    """The shapes tensors ``names`` take in one run of ``model`` (optimizations off)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    initializers = {t.name for t in probe.graph.initializer}
    wanted = sorted(names - initializers)
    del probe.graph.output[:]
    for index, name in enumerate(wanted):
        probe.graph.node.append(onnx.helper.make_node("Shape", [name], [f"bench_shape_{index}"]))
        probe.graph.output.append(onnx.helper.make_tensor_value_info(
            f"bench_shape_{index}", onnx.TensorProto.INT64, [None]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    values = sess.run(None, only_inputs(sess, feeds))
    return {name: [int(d) for d in value] for name, value in zip(wanted, values, strict=True)}


def _node_flops(node: onnx.NodeProto, shapes: dict[str, list]) -> float:
    out, a = shapes[node.output[0]], shapes[node.input[0]]
    if node.op_type == "Conv":
        return 2.0 * float(np.prod(out)) * float(np.prod(shapes[node.input[1]][1:]))
    if node.op_type == "Gemm":
        trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
        return 2.0 * float(np.prod(out)) * (a[0] if trans_a else a[-1])
    return 2.0 * float(np.prod(out)) * a[-1]


# --- the two benchmarks -------------------------------------------------------------------------------

def bench_whisper(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Original, split and ideal Whisper decoder steps, side by side."""
    original_path = cached_export("whisper-decoder-eager", cache, size="bench").path
    original = xio.load(original_path)
    start = time.perf_counter()
    split = split_static_kv(original)
    split_seconds = time.perf_counter() - start
    ideal_path = ideal_whisper(cache)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 51865, (WHISPER["batch"], WHISPER["seq"])),
             "encoder_hidden_states": rng.standard_normal(
                 (WHISPER["batch"], WHISPER["enc_len"], 512)).astype(np.float32)}
    threads = args.threads
    sessions = {"original": session(original, threads), "split": session(split.decoder, threads),
                "projector": session(split.projector, threads)}
    projected = run_named(sessions["projector"], feeds)
    ideal = session(ideal_path, threads)
    ideal_feeds = {"input_ids": feeds["input_ids"], **_ideal_feeds(split.mapping, projected)}
    decoder_feeds = {"input_ids": feeds["input_ids"], **projected}
    reference = sessions["original"].run(None, feeds)[0]
    agreement = {name: _max_relative(reference, sess.run(None, f)[0]) for name, (sess, f) in
                 {"split": (sessions["split"], decoder_feeds),
                  "ideal": (ideal, ideal_feeds)}.items()}
    times = side_by_side({"original": (sessions["original"], feeds),
                          "split": (sessions["split"], decoder_feeds),
                          "ideal": (ideal, ideal_feeds),
                          "projector": (sessions["projector"],
                                        only_inputs(sessions["projector"], feeds))}, args.reps)
    projector_times = times.pop("projector")
    counted = {"original": flops(original, feeds), "split": flops(split.decoder, decoder_feeds),
               "ideal": flops(xio.load(ideal_path), ideal_feeds),
               "projector": flops(split.projector, feeds)}
    return _result("whisper-base-like decoder", WHISPER, split, split_seconds, times,
                   projector_times, agreement, counted)


def _ideal_feeds(mapping: list[dict[str, Any]], projected: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """The projector's K/V as the ideal decoder's cache inputs: K back to [B, H, S, D]."""
    feeds = {}
    for index, entry in enumerate(mapping):
        key, value = projected[entry["key"]], projected[entry["value"]]
        if key.shape[-1] != value.shape[-1]:  # the split hands over K^T, [B, H, D, S]
            key = np.ascontiguousarray(np.swapaxes(key, -1, -2))
        feeds[f"past_key_cross_{index}"], feeds[f"past_value_cross_{index}"] = key, value
    return feeds


def bench_unet(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Original and split UNet denoising steps, side by side."""
    original_path = mid_unet(cache)
    original = xio.load(original_path)
    start = time.perf_counter()
    split = split_static_kv(original)
    split_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    side = UNET_CONFIG["sample_size"]
    feeds = {"sample": rng.standard_normal((UNET["batch"], 4, side, side)).astype(np.float32),
             "timestep": np.array([10, 500][:UNET["batch"]], np.int64),
             "encoder_hidden_states": rng.standard_normal(
                 (UNET["batch"], UNET["ctx_len"], 768)).astype(np.float32)}
    sessions = {name: session(model, args.threads) for name, model in
                {"original": original, "split": split.decoder,
                 "projector": split.projector}.items()}
    projected = run_named(sessions["projector"], feeds)
    step_feeds = {k: v for k, v in feeds.items() if k != "encoder_hidden_states"}
    decoder_feeds = {**step_feeds, **projected}
    agreement = {"split": _max_relative(sessions["original"].run(None, feeds)[0],
                                        sessions["split"].run(None, decoder_feeds)[0])}
    reps = max(5, args.reps // 3)
    times = side_by_side({"original": (sessions["original"], feeds),
                          "split": (sessions["split"], decoder_feeds),
                          "projector": (sessions["projector"],
                                        only_inputs(sessions["projector"], feeds))}, reps)
    projector_times = times.pop("projector")
    counted = {"original": flops(original, feeds), "split": flops(split.decoder, decoder_feeds),
               "projector": flops(split.projector, feeds)}
    return _result("SD-UNet-like (mid-size) denoising step", {**UNET, "latents": f"{side}x{side}",
                   "channels": list(UNET_CONFIG["block_out_channels"])}, split, split_seconds,
                   times, projector_times, agreement, counted)


def _max_relative(reference: np.ndarray, candidate: np.ndarray) -> float:
    scale = max(1.0, float(np.abs(reference).max()))
    return float(np.abs(reference - candidate).max() / scale)


def _result(title: str, sizes: dict[str, Any], split: Any, split_seconds: float,
            times: dict[str, list[float]], projector: list[float],
            agreement: dict[str, float], counted: dict[str, dict[str, float]]) -> dict[str, Any]:
    timing = summary(times, "original")
    heavy = {name: c["matmul"] + c["conv"] for name, c in counted.items()}
    # The projector runs the removed work alone, so its time per FLOP calibrates the model:
    # a step should get faster by the removed FLOPs at the projector's throughput.
    seconds_per_flop = float(np.median(projector)) / heavy["projector"]
    original_ms = timing["original"]["median_ms"]
    for name, entry in timing.items():
        entry["gflop"] = heavy[name] / 1e9
        entry["flop_model_speedup"] = heavy["original"] / heavy[name]
        removed = heavy["original"] - heavy[name]
        entry["calibrated_prediction_ms"] = original_ms - 1e3 * removed * seconds_per_flop
    if "ideal" in times:
        ratios = [s / i for s, i in zip(times["split"], times["ideal"], strict=True)]
        timing["split"]["vs_ideal"] = float(np.median(ratios))
    return {"title": title, "sizes": sizes, "split_seconds": split_seconds,
            "cut": [r["name"] for r in split.report["cut"]], "steps": timing,
            "projector_once_ms": 1e3 * float(np.median(projector)),
            "projector_gflop": heavy["projector"] / 1e9, "flops": counted,
            "max_relative_error_vs_original": agreement}


# --- report -------------------------------------------------------------------------------------------

def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["# Static K/V split: per-step latency", "",
             "Command: `python benchmarks/bench_split.py"
             + (f" --reps {args.reps}" if args.reps != 30 else "") + "`", "",
             f"ONNX Runtime {ort.__version__} CPU, {args.threads} intra-op threads, default graph "
             f"optimizations; {platform.processor() or platform.machine()}, "
             f"Python {platform.python_version()}; load average {args.load[0]:.1f} before, "
             f"{args.load[1]:.1f} after (the machine is shared: absolute times move with it, "
             "ratios of interleaved runs much less). Median of "
             f"{args.reps} interleaved runs, the projector's included "
             "(UNet: a third as many); speedups are medians of per-repetition ratios. FLOPs are "
             "MatMul/Gemm (and Conv) FLOPs of one step at the sizes run. FLOP-ratio speedup is "
             "original FLOPs over the graph's; the calibrated prediction takes the original's "
             "time minus the removed FLOPs at the throughput the projector achieves on exactly "
             "that work (the projector runs it alone).", ""]
    for result in results:
        lines += [f"## {result['title']}", "",
                  "Sizes: " + ", ".join(f"{k} {v}" for k, v in result["sizes"].items()) + ".",
                  "", "| graph | median ms | p10-p90 ms | speedup | GFLOP/step | FLOP-ratio "
                  "speedup | calibrated prediction |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, step in result["steps"].items():
            predicted = step["calibrated_prediction_ms"]
            lines.append(f"| {name} | {step['median_ms']:.1f} | {step['p10_ms']:.1f}-"
                         f"{step['p90_ms']:.1f} | {step['speedup_vs_original']:.2f}x | "
                         f"{step['gflop']:.2f} | {step['flop_model_speedup']:.2f}x | "
                         f"{predicted:.1f} ms ({result['steps']['original']['median_ms'] / predicted:.2f}x) |")
        lines += ["", f"Projector, once per context: {result['projector_once_ms']:.1f} ms "
                  f"({result['projector_gflop']:.2f} GFLOP). Splitting took "
                  f"{result['split_seconds']:.1f} s; {len(result['cut'])} tensors cross the cut. "
                  "Largest relative difference from the original's output: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in
                              result["max_relative_error_vs_original"].items()) + ".", ""]
        if "ideal" in result["steps"]:
            split, ideal = result["steps"]["split"], result["steps"]["ideal"]
            lines += [f"Split against ideal: {split['vs_ideal']:.2f}x the ideal's per-step "
                      f"latency, run by run ({split['median_ms'] / ideal['median_ms']:.2f}x "
                      "by medians; 1.00 is the ideal, the goal is within 1.10).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip-unet", action="store_true", help="only the Whisper decoder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    log.setLevel(logging.INFO)
    cache = default_cache_dir()
    load_before = os.getloadavg()[0]
    results = [bench_whisper(args, cache)]
    if not args.skip_unet:
        results.append(bench_unet(args, cache))
    args.load = (load_before, os.getloadavg()[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps(
        {"threads": args.threads, "reps": args.reps, "onnxruntime": ort.__version__,
         "load_average": list(args.load),
         "results": results}, indent=2) + "\n")
    (out / "split.md").write_text(markdown(results, args) + "\n")
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
