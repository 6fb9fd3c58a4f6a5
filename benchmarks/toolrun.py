"""Run one tool on one model file in a fresh process and report its time and peak memory.

    python benchmarks/toolrun.py TOOL MODEL OUT [--family F] [--pipeline TEXT]

Prints one JSON line: ``{"tool", "seconds", "load_seconds", "peak_rss_mb", "error"}``. A fresh
process per run makes peak memory the tool's own (plus the interpreter and the libraries it
imports, which every user pays too), and lets a crashing tool (ONNX Runtime's optimizer has
crashed processes on valid fp16 graphs) fail one row instead of the whole report. Each tool
loads the model the way its documentation shows (by path where it accepts one, so tools that
keep weights on disk can), and its output is written next to OUT with external data when large.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import traceback
from pathlib import Path

#: ``model_type`` for ONNX Runtime's transformers optimizer, by zoo family.
ORT_MODEL_TYPES = {"whisper": "bart", "bart": "bart", "t5": "t5", "unet": "unet",
                   "torch-nn": "bert", "detr": "bert", "constant-context": "bert",
                   "control-flow": "bert", "synthetic": "bart"}


def _save(model, out: Path) -> None:
    import onnx

    large = sum(len(t.raw_data) for t in model.graph.initializer) > (1 << 30)
    onnx.save(model, str(out), save_as_external_data=large,
              location=out.name + ".data" if large else None)


def run(tool: str, model_path: Path, out: Path, family: str, pipeline: str | None) -> dict:
    start = time.perf_counter()
    load_seconds = 0.0
    if tool in ("xattn-compiler", "xattn-compiler 3d"):
        import xattn_compiler as xc

        model = xc.load(model_path, lazy_weights=True)  # as the CLI does
        load_seconds = time.perf_counter() - start
        # "3d": the default pipeline with --qkv-layout 3d (fused ops read [B,S,H*D]).
        result = (xc.optimize(model, pipeline) if tool == "xattn-compiler"
                  else xc.optimize(model, qkv_layout="3d"))
        tool_seconds = time.perf_counter() - start - load_seconds
        result.save(out)
    elif tool in ("onnxscript optimizer", "onnxscript ort_fusions"):
        import onnx_ir as ir
        import onnxscript.optimizer
        import onnxscript.rewriter

        model = ir.load(str(model_path))  # weights stay on disk until something reads them
        load_seconds = time.perf_counter() - start
        onnxscript.optimizer.optimize(model)
        if tool == "onnxscript ort_fusions":
            from onnxscript.rewriter import ort_fusions

            model, _ = ort_fusions.optimize_for_ort(model)
        else:
            model = onnxscript.rewriter.rewrite(model)
        tool_seconds = time.perf_counter() - start - load_seconds
        ir.save(model, str(out), external_data=out.name + ".data")
    elif tool == "ort transformers optimizer":
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(str(model_path), model_type=ORT_MODEL_TYPES.get(family, "bert"),
                                   num_heads=0, hidden_size=0, opt_level=0, use_gpu=False)
        tool_seconds = time.perf_counter() - start
        optimized.save_model_to_file(str(out), use_external_data_format=True)
    elif tool in ("onnxsim", "onnxslim"):
        import onnx

        model = onnx.load(str(model_path))
        load_seconds = time.perf_counter() - start
        if tool == "onnxsim":
            import onnxsim

            model, ok = onnxsim.simplify(model)
            if not ok:
                raise RuntimeError("onnxsim could not validate its result")
        else:
            import onnxslim

            model = onnxslim.slim(model)
        tool_seconds = time.perf_counter() - start - load_seconds
        _save(model, out)
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    return {"seconds": tool_seconds, "load_seconds": load_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tool")
    parser.add_argument("model", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", default="")
    parser.add_argument("--pipeline", default=None)
    args = parser.parse_args()
    record: dict = {"tool": args.tool, "error": None}
    try:
        record.update(run(args.tool, args.model, args.out, args.family, args.pipeline))
    except Exception as exc:  # a tool failing on a model is a data point
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        record["error"] = f"{type(exc).__name__}: {lines[0][:200]}"
        traceback.print_exc(file=sys.stderr)
    record["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(record))


def _peak_rss_mb() -> float:
    # VmHWM is this process image's high-water mark; ru_maxrss would count the memory of the
    # parent it was forked from (the report holds whole models), the same for every tool.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
