"""What a user waits for: ``load`` (every check at the door) and the default ``optimize`` of a
saved file, on synthetic decoders of 1k and 10k nodes.

    python benchmarks/bench_load_optimize.py [--layers 15 150] [--out benchmarks/results]
    python benchmarks/compare_revisions.py REV -- bench_load_optimize.py --layers 150

``load`` is timed apart from the pipeline because the reliability checks (external data
references, attribute ranges and tensor sizes with their own shape inference, body scopes)
all run there, on every command. Each figure is the best of ``--repeat`` runs in this process.
Writes load_optimize.json (``rows[*].total_s`` is load + optimize, what compare_revisions
reads) and load_optimize.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import decoder  # noqa: E402

import xattn_compiler as xc  # noqa: E402


def _best(repeat: int, work) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(layers: int, repeat: int, folder: Path) -> dict:
    path = folder / f"decoder_{layers}.onnx"
    onnx.save(decoder(layers, clutter=True), path)
    load_s, model = _best(repeat, lambda: xc.load(path))
    optimize_s, result = _best(repeat, lambda: xc.optimize(model))
    return {"layers": layers, "nodes": len(model.graph.node), "load_s": round(load_s, 3),
            "optimize_s": round(optimize_s, 3), "total_s": round(load_s + optimize_s, 3),
            "nodes_after": len(result.model.graph.node)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[15, 150])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xattn-load-") as tmp:
        rows = [measure(layers, args.repeat, Path(tmp)) for layers in args.layers]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load_optimize.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = ["| nodes | load (s) | optimize (s) | nodes after |", "|---|---|---|---|"]
    lines += [f"| {r['nodes']} | {r['load_s']} | {r['optimize_s']} | {r['nodes_after']} |"
              for r in rows]
    (args.out / "load_optimize.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(" ".join(f"{r['nodes']} nodes: load {r['load_s']} s + optimize {r['optimize_s']} s"
                   for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
