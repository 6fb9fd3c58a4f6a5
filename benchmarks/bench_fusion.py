"""ONNX Runtime CPU latency per zoo family, before and after ``fuse-attention``.

    python benchmarks/bench_fusion.py [--out benchmarks/results] [--threads 2] [--reps 30]

One model per family (the bench size for the decoders, small for the rest: see FAMILIES). Each is prepared by
``canonicalize,remove-layout-clutter`` (the pipeline before fusion): that graph is "before";
"after" adds ``fuse-attention`` with ``target=onnx-attention`` (ONNX Attention, opset 23) and
with ``target=ort-mha`` (com.microsoft MultiHeadAttention). Every fused graph is first checked
with ``verify`` against "before" on the export's sample inputs.

ONNX Runtime runs on the CPU with ``--threads`` intra-op threads and its default graph
optimizations (a runtime measurement, not a verification). The three graphs of a model run in
one process, interleaved in a rotating order, ``--reps`` times after a warm-up; the table gives
the median per graph and the median of the per-repetition ratios after/before (below 1: the
fused graph is faster). Writes ``fusion.md`` and ``fusion.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import onnxruntime as ort

import xattn_compiler as xc
from xattn_compiler.ir import op_histogram
from xattn_compiler.passmanager import Pipeline
from xattn_compiler.verification import verify
from xattn_compiler.zoo import all_models, cached_export
from xattn_compiler.zoo.export import requirements_missing

#: One model per family (the most common spelling of its attention) and its size. The UNet's
#: bench size is SD-1.5's (3.4 GB of weights; three sessions of it do not fit this machine).
FAMILIES = {
    "whisper": ("whisper-decoder-eager", "bench"),
    "bart": ("bart-decoder-eager", "bench"),
    "t5": ("t5-decoder-eager", "bench"),
    "unet": ("unet2d-tiny", "small"),
    "detr": ("detr-decoder", "small"),
    "torch-nn": ("nn-transformer-decoder-batch-first", "small"),
    "constant-context": ("constant-context-cross-attention", "small"),
    "control-flow": ("if-cross-attention", "small"),
}
PREPARE = "canonicalize,remove-layout-clutter"
TARGETS = ("onnx-attention", "ort-mha")


def session(model, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def measure(name: str, size: str, threads: int, reps: int) -> dict:
    exported = cached_export(name, size=size)
    # The passes run through Pipeline directly: xc.optimize's detached weights came back
    # without their data for the bart bench export (a tied embedding) when this was written.
    before = Pipeline.parse(PREPARE).run(xc.load(exported.path)).model
    inputs, _ = exported.sample()
    graphs = {"before": before}
    row: dict = {"model": name, "size": size}
    for target in TARGETS:
        result = Pipeline.parse(f"fuse-attention{{target={target}}}").run(before)
        check = verify(before, result.model, inputs=inputs)
        if not check.ok:
            raise SystemExit(f"{name}: {target} does not verify\n{check.summary()}")
        ops = op_histogram(result.model)
        row[f"{target} nodes"] = ops.get("Attention", 0) + ops.get("MultiHeadAttention", 0)
        graphs[target] = result.model
    sessions = {key: session(model, threads) for key, model in graphs.items()}
    feeds = {key: {i.name: inputs[i.name] for i in s.get_inputs()} for key, s in sessions.items()}
    for key, s in sessions.items():  # warm-up
        for _ in range(3):
            s.run(None, feeds[key])
    times: dict[str, list[float]] = {key: [] for key in sessions}
    order = list(sessions)
    for rep in range(reps):
        for key in order[rep % len(order):] + order[:rep % len(order)]:
            start = time.perf_counter()
            sessions[key].run(None, feeds[key])
            times[key].append(time.perf_counter() - start)
    row["before ms"] = round(statistics.median(times["before"]) * 1e3, 3)
    for target in TARGETS:
        row[f"{target} ms"] = round(statistics.median(times[target]) * 1e3, 3)
        ratios = [t / b for t, b in zip(times[target], times["before"], strict=True)]
        row[f"{target} ratio"] = round(statistics.median(ratios), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    models = {m.name: m for m in all_models()}
    rows = []
    for family, (name, size) in FAMILIES.items():
        spec = models[name]
        if requirements_missing(spec):
            print(f"skipping {name}: needs {', '.join(requirements_missing(spec))}", file=sys.stderr)
            continue
        row = {"family": family, **measure(name, size, args.threads, args.reps)}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    meta = {"onnxruntime": ort.__version__, "threads": args.threads, "reps": args.reps,
            "machine": platform.machine(), "cpus": os.cpu_count()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fusion.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    header = ["family", "model", "size", "before ms", *(f"{t} {c}" for t in TARGETS
                                                        for c in ("nodes", "ms", "ratio"))]
    lines = ["# ONNX Runtime CPU latency before and after fuse-attention", "",
             f"Command: `python benchmarks/bench_fusion.py --threads {args.threads} "
             f"--reps {args.reps}` (onnxruntime {ort.__version__}, {args.threads} threads, "
             f"{os.cpu_count()} CPUs shared with other work; medians of interleaved runs; "
             "ratio = median of per-repetition after/before, below 1 is faster).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[h]) for h in header) + " |")
    (args.out / "fusion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
