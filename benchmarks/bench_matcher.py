"""Matcher scaling: time to find attention in decoders of 1k, 10k and 100k nodes.

    python benchmarks/bench_matcher.py [--out benchmarks/results]

Each phase is timed separately (ONNX shape inference, onnx-graphsurgeon import, matching) so a
regression points at its phase. The fitted exponent of time against node count says whether
the cost is linear (1.0). Writes matcher.json and matcher.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import decoder, fitted_exponent  # noqa: E402

from xattn_compiler.attention import analyze_attention  # noqa: E402
from xattn_compiler.ir import count_nodes, import_graph, infer_shapes  # noqa: E402

LAYERS = (25, 250, 2500)  # about 1k, 10k and 100k nodes


def measure(layers: int) -> dict:
    model = decoder(layers)
    start = time.perf_counter()
    inferred = infer_shapes(model)
    shapes = time.perf_counter()
    graph = import_graph(inferred)
    imported = time.perf_counter()
    report = analyze_attention(graph)
    matched = time.perf_counter()
    expected = 2 * layers
    if len(report.blocks) != expected:
        raise SystemExit(f"{layers} layers: found {len(report.blocks)} blocks, expected {expected}")
    return {"layers": layers, "nodes": count_nodes(model), "blocks": len(report.blocks),
            "shape_inference_s": shapes - start, "import_s": imported - shapes,
            "match_s": matched - imported, "total_s": matched - start}


def exponent(rows: list[dict], key: str) -> float:
    return fitted_exponent([r["nodes"] for r in rows], [r[key] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--layers", type=int, nargs="*", default=list(LAYERS))
    args = parser.parse_args()
    rows = [measure(layers) for layers in args.layers]
    fits = {key: exponent(rows, key) for key in ("match_s", "total_s")}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "matcher.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "rows": rows,
         "exponents": fits}, indent=2) + "\n")
    lines = ["# Matcher scaling", "", "Command: `python benchmarks/bench_matcher.py`", "",
             "| nodes | blocks | shape inference s | import s | match s | total s |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['nodes']} | {r['blocks']} | {r['shape_inference_s']:.2f} | "
              f"{r['import_s']:.2f} | {r['match_s']:.2f} | {r['total_s']:.2f} |" for r in rows]
    lines += ["", f"Fitted exponent of time against nodes: matching {fits['match_s']:.2f}, "
              f"total {fits['total_s']:.2f} (1.0 is linear)."]
    (args.out / "matcher.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
