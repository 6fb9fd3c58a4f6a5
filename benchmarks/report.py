"""The benchmark report: xattn-compiler side by side with the tools users run today.

    python benchmarks/report.py [--size bench] [--models NAME ...] [--tools NAME ...]
                                [--skip runtime scaling cost] [--out benchmarks/results]

One run measures everything below on this machine, so every figure is quoted next to the
others as a ratio:

* **tools**: for each zoo model (benchmark size by default, an SD-1.5-sized UNet included), each
  tool (ours twice: the default pipeline, and with ``--qkv-layout 3d``) runs in a fresh
  process (``toolrun.py``): seconds, peak memory, nodes, Transpose+Reshape
  left, attention blocks our matcher still finds, fused attention nodes, and whether ONNX
  Runtime gives the raw export's outputs on the model's sample inputs;
* **scaling**: the default pipeline on synthetic decoders of 2 to 64 layers, fitted exponent;
* **runtime**: ONNX Runtime CPU latency of one decode or denoising step for the raw export,
  each tool's output, ours, and our split decoder (its projector runs once per request);
* **cost**: FLOPs and bytes of one step before and after the split (static cost model).

Writes ``report.json`` and ``report.md`` into ``--out``; docs/benchmarks.md quotes the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from synthetic import decoder, fitted_exponent  # noqa: E402

import xattn_compiler as xc  # noqa: E402
from xattn_compiler.attention import find_attention  # noqa: E402
from xattn_compiler.cost import estimate_cost  # noqa: E402
from xattn_compiler.ir import count_nodes, op_histogram  # noqa: E402
from xattn_compiler.zoo import all_models, cached_export  # noqa: E402

TOOLS = ("xattn-compiler", "xattn-compiler 3d", "onnxsim", "onnxslim", "onnxscript optimizer",
         "onnxscript ort_fusions", "ort transformers optimizer")
#: Nodes that are one fused attention kernel, by (domain, op).
FUSED_OPS = {("", "Attention"), ("com.microsoft", "MultiHeadAttention"),
             ("com.microsoft", "Attention"), ("com.microsoft", "PackedAttention"),
             ("com.microsoft", "DecoderMaskedMultiHeadAttention"),
             ("com.microsoft", "GroupQueryAttention"), ("", "fMHCA"), ("", "fMHA_V2")}
SCALING_LAYERS = (2, 4, 8, 16, 32, 64)
TOOL_TIMEOUT_S = 900
#: Above this many bytes of weights a model is not run in ONNX Runtime by the report (eight
#: sessions for the latency table, two per verification with optimizations off, each holding
#: the weights, do not fit this 24 GB machine for an SD-1.5-sized UNet), and ONNX Runtime's
#: transformers optimizer, which peaks at 16-20 GB on such a model, is not run either.
RUN_LIMIT_BYTES = 1 << 30


# --- tools side by side ---------------------------------------------------------------------------

def run_tool(tool: str, model_path: Path, family: str, workdir: Path) -> tuple[dict, Path]:
    out = workdir / (tool.replace(" ", "_") + ".onnx")
    command = [sys.executable, str(HERE / "toolrun.py"), tool, str(model_path), str(out),
               "--family", family]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"tool": tool, "error": f"timed out after {TOOL_TIMEOUT_S} s"}, out
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"tool": tool, "error": f"exit {done.returncode}: {tail[:200]}"}, out
    return json.loads(lines[-1]), out


def fused_nodes(model) -> int:
    from xattn_compiler.ir import iter_nodes

    return sum((node.domain or "", node.op_type) in FUSED_OPS for node in iter_nodes(model.graph))


def weight_file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def quality(model, raw, inputs, run: bool = True) -> dict[str, Any]:
    ops = op_histogram(model)
    try:
        found = len(find_attention(model))
    except Exception as exc:  # a tool's output our matcher cannot read is worth a note
        found = f"error: {type(exc).__name__}"
    if not run:
        verified = "not run (weights over 1 GB)"
    else:
        try:
            verified = xc.verify(raw, model, inputs=inputs).ok
        except Exception as exc:
            verified = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return {"nodes": count_nodes(model), "transpose_reshape": ops.get("Transpose", 0)
            + ops.get("Reshape", 0), "blocks_found": found, "fused": fused_nodes(model),
            "verified": verified}


def compare_tools(name: str, size: str, tools: list[str], workdir: Path) -> dict[str, Any]:
    exported = cached_export(name, size=size)
    run = weight_file_bytes(exported.path) < RUN_LIMIT_BYTES
    raw = xc.load(exported.path, lazy_weights=True)
    inputs, _ = exported.sample()
    blocks = exported.manifest["attention"]
    row: dict[str, Any] = {"model": name, "size": size, "family": exported.manifest["family"],
                           "blocks": blocks["self"] + blocks["cross"], "run": run,
                           "raw": quality(raw, raw, inputs, run=False), "tools": {}}
    row["raw"]["verified"] = True
    for tool in tools:
        if tool == "ort transformers optimizer" and not run:
            row["tools"][tool] = {"tool": tool, "error": "not run: peaks at 16-20 GB here"}
            continue
        record, out = run_tool(tool, exported.path, row["family"], workdir)
        if record.get("error") is None:
            try:  # unchecked: ORT's fusions write contrib ops into the default domain
                record.update(quality(xc.load(out, check=False, lazy_weights=True), raw,
                                      inputs, run=run))
                record["output"] = str(out)
            except xc.XattnError as exc:
                record["error"] = f"output unreadable: {str(exc)[:160]}"
        row["tools"][tool] = record
        print(f"  {name:32s} {tool:28s} {record.get('seconds', float('nan')):7.2f} s "
              f"{record.get('error') or ''}", file=sys.stderr)
    return row


# --- scaling --------------------------------------------------------------------------------------

def scaling(layers: tuple[int, ...] = SCALING_LAYERS) -> dict[str, Any]:
    rows = []
    for n in layers:
        model = decoder(n, clutter=True)
        start = time.perf_counter()
        xc.optimize(model)
        rows.append({"layers": n, "nodes": count_nodes(model),
                     "seconds": time.perf_counter() - start})
    return {"rows": rows, "exponent": fitted_exponent([r["nodes"] for r in rows],
                                                      [r["seconds"] for r in rows])}


# --- runtime --------------------------------------------------------------------------------------

def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency(sessions: dict[str, Any], feeds: dict[str, dict], repeats: int) -> dict[str, float]:
    """Median ms per run, the candidates interleaved so machine noise hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for name, session in sessions.items():  # warm-up
        session.run(None, feeds[name])
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds[name])
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def runtime(row: dict[str, Any], size: str, workdir: Path, repeats: int) -> dict[str, Any]:
    exported = cached_export(row["model"], size=size)
    inputs, _ = exported.sample()
    candidates = {"raw": exported.path}
    for tool, record in row["tools"].items():
        if record.get("error") is None and record.get("verified") is True:
            candidates[tool] = Path(record["output"])
    sessions, feeds, skipped = {}, {}, {}
    for name, path in candidates.items():
        try:
            sessions[name] = _session(path)
            wanted = {i.name for i in sessions[name].get_inputs()}
            feeds[name] = {k: v for k, v in inputs.items() if k in wanted}
        except Exception as exc:
            skipped[name] = str(exc).splitlines()[0][:120]
            sessions.pop(name, None)
    result: dict[str, Any] = {"model": row["model"], "ms": {}, "skipped": skipped}
    split_dir = workdir / "split"
    try:
        split = xc.split_static_kv(xc.load(candidates.get("xattn-compiler", exported.path)))
    except xc.XattnError as exc:
        result["split"] = f"not split: {exc}"
        split = None
    if split is not None and split.projector is not None:
        split.save(split_dir)
        projector = _session(split_dir / "kv_projector.onnx")
        wanted = {i.name for i in projector.get_inputs()}
        kv = projector.run(None, {k: v for k, v in inputs.items() if k in wanted})
        names = [o.name for o in projector.get_outputs()]
        step = _session(split_dir / "decoder.onnx")
        step_inputs = {**inputs, **dict(zip(names, kv, strict=True))}
        wanted = {i.name for i in step.get_inputs()}
        sessions["xattn-compiler split (step)"] = step
        feeds["xattn-compiler split (step)"] = {k: v for k, v in step_inputs.items() if k in wanted}
        once = latency({"projector": projector},
                       {"projector": {k: v for k, v in inputs.items()
                                      if k in {i.name for i in projector.get_inputs()}}},
                       max(3, repeats // 4))
        result["projector_ms"] = once["projector"]
    result["ms"] = latency(sessions, feeds, repeats)
    return result


# --- static cost ----------------------------------------------------------------------------------

def cost(row: dict[str, Any], size: str) -> dict[str, Any] | None:
    exported = cached_export(row["model"], size=size)
    model = xc.load(exported.path, lazy_weights=True)
    inputs, _ = exported.sample()
    dims: dict[str, int] = {}
    for value in model.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param and value.name in inputs:
                dims[dim.dim_param] = int(inputs[value.name].shape[axis])
    try:
        split = xc.split_static_kv(model)
    except xc.XattnError as exc:
        return {"model": row["model"], "note": f"not split: {exc}"}

    def bound(m) -> dict[str, int]:
        names = {d.dim_param for v in m.graph.input for d in v.type.tensor_type.shape.dim}
        return {k: v for k, v in dims.items() if k in names}

    before = estimate_cost(model, dims)
    step = estimate_cost(split.decoder, bound(split.decoder))
    once = estimate_cost(split.projector, bound(split.projector)) if split.projector else None
    return {"model": row["model"], "dims": dims, "before": before.to_dict(),
            "step": step.to_dict(), "projector": once.to_dict() if once else None}


# --- the report -----------------------------------------------------------------------------------

def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Benchmark report", "",
             f"Command: `python benchmarks/report.py --size {report['size']}`; machine: "
             f"{report['machine']}, {os.cpu_count()} cores; total {report['seconds']:.0f} s.", ""]
    tools = report["tool_names"]
    lines += ["## Compile time (seconds; ratio to xattn-compiler)", "",
              "| model | " + " | ".join(tools) + " |", "|---|" + "---:|" * len(tools)]
    for row in report["models"]:
        ours = row["tools"].get("xattn-compiler", {}).get("seconds")
        cells = []
        for tool in tools:
            rec = row["tools"][tool]
            if rec.get("error"):
                cells.append("failed")
            else:
                ratio = f" ({rec['seconds'] / ours:.1f}x)" if ours and tool != "xattn-compiler" else ""
                cells.append(f"{rec['seconds']:.2f}{ratio}")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    lines += ["", "## Peak memory (MB)", "", "| model | " + " | ".join(tools) + " |",
              "|---|" + "---:|" * len(tools)]
    for row in report["models"]:
        lines.append(f"| {row['model']} | " + " | ".join(
            _fmt(row["tools"][t].get("peak_rss_mb"), 0) for t in tools) + " |")
    lines += ["", "## Quality: nodes / Transpose+Reshape / attention fused (of blocks) / "
              "outputs verified", "", "| model | raw | " + " | ".join(tools) + " |",
              "|---|---|" + "---|" * len(tools)]
    for row in report["models"]:
        raw = row["raw"]
        cells = [f"{raw['nodes']} / {raw['transpose_reshape']} / {raw['fused']} of {row['blocks']}"]
        for tool in tools:
            rec = row["tools"][tool]
            if rec.get("error"):
                cells.append(f"failed: {rec['error'][:60]}")
                continue
            ok = "ok" if rec["verified"] is True else f"**{rec['verified']}**"
            cells.append(f"{rec['nodes']} / {rec['transpose_reshape']} / {rec['fused']} / {ok}")
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    if report.get("scaling"):
        s = report["scaling"]
        lines += ["", "## Scaling of the default pipeline", "", "| layers | nodes | seconds |",
                  "|---:|---:|---:|"]
        lines += [f"| {r['layers']} | {r['nodes']} | {r['seconds']:.2f} |" for r in s["rows"]]
        lines += ["", f"Fitted exponent: {s['exponent']:.2f} (1.0 is linear)."]
    if report.get("runtime"):
        lines += ["", "## ONNX Runtime CPU latency per step (ms, median; ratio to raw)", ""]
        for rt in report["runtime"]:
            raw_ms = rt["ms"].get("raw")
            cells = [f"{name}: {ms:.1f}" + (f" ({ms / raw_ms:.2f}x)" if raw_ms else "")
                     for name, ms in rt["ms"].items()]
            extra = f"; projector once: {rt['projector_ms']:.1f}" if "projector_ms" in rt else ""
            lines.append(f"- **{rt['model']}**: " + ", ".join(cells) + extra)
    if report.get("cost"):
        lines += ["", "## Static cost of one step, before and after the split", "",
                  "| model | GFLOP before | GFLOP step | GFLOP projector (once) | MB moved before "
                  "| MB moved step |", "|---|---:|---:|---:|---:|---:|"]
        for c in report["cost"]:
            if "before" not in c:
                lines.append(f"| {c['model']} | {c.get('note', '')} | | | | |")
                continue
            proj = c["projector"]["flops"] / 1e9 if c["projector"] else 0.0
            lines.append(f"| {c['model']} | {c['before']['flops'] / 1e9:.3f} | "
                         f"{c['step']['flops'] / 1e9:.3f} | {proj:.3f} | "
                         f"{c['before']['bytes_moved'] / 2**20:.1f} | "
                         f"{c['step']['bytes_moved'] / 2**20:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="bench", choices=("small", "bench"))
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--tools", nargs="*", default=list(TOOLS))
    parser.add_argument("--skip", nargs="*", default=[], choices=("runtime", "scaling", "cost"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    names = args.models or [m.name for m in all_models() if args.size in m.sizes]
    start = time.perf_counter()
    report: dict[str, Any] = {"size": args.size, "machine": platform.machine(),
                              "tool_names": args.tools, "models": []}
    with tempfile.TemporaryDirectory(prefix="xattn-report-") as tmp:
        for name in names:
            workdir = Path(tmp) / name
            workdir.mkdir()
            row = compare_tools(name, args.size, args.tools, workdir)
            report["models"].append(row)
            if "runtime" not in args.skip and row["run"]:
                report.setdefault("runtime", []).append(
                    runtime(row, args.size, workdir, args.repeats))
            if "cost" not in args.skip:
                report.setdefault("cost", []).append(cost(row, args.size))
    if "scaling" not in args.skip:
        report["scaling"] = scaling()
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "report.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
