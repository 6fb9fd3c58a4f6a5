"""Layout clutter left by each tool on every small zoo model: Transpose + Reshape counts.

    python benchmarks/bench_clutter.py [--pipeline TEXT] [--out benchmarks/results]

Side by side in one run: the raw export, onnxsim, onnxslim, onnxscript's optimizer (with its
default rewrite rules) and xattn-compiler's clutter pipeline. Ours is also checked with
``verify`` against the raw export on the model's sample inputs. Writes clutter.md and
clutter.json; docs/clutter.md quotes the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tools import run_tool  # noqa: E402

import xattn_compiler as xc  # noqa: E402
from xattn_compiler.ir import op_histogram  # noqa: E402
from xattn_compiler.verification import verify  # noqa: E402
from xattn_compiler.zoo import all_models, cached_export  # noqa: E402
from xattn_compiler.zoo.export import requirements_missing  # noqa: E402

COMPARED = ("onnxsim", "onnxslim", "onnxscript optimizer")
PIPELINE = "canonicalize,remove-layout-clutter"


def clutter(model) -> int:
    ops = op_histogram(model)
    return ops.get("Transpose", 0) + ops.get("Reshape", 0)


def measure(name: str, pipeline: str) -> dict:
    exported = cached_export(name)
    model = xc.load(exported.path)
    row: dict = {"model": name, "raw": clutter(model)}
    for tool in COMPARED:
        out, error = run_tool(tool, model)
        row[tool] = clutter(out) if out is not None else f"failed ({error})"
    start = time.perf_counter()
    ours = xc.optimize(model, pipeline).model
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["xattn-compiler"] = clutter(ours)
    inputs, _ = exported.sample()
    row["verified"] = verify(model, ours, inputs=inputs).ok
    counts = [v for k, v in row.items() if k in COMPARED and isinstance(v, int)]
    row["best_other"] = min(counts) if counts else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pipeline", default=PIPELINE)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    names = [m.name for m in all_models() if "small" in m.sizes and not requirements_missing(m)]
    rows = [measure(name, args.pipeline) for name in names]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clutter.json").write_text(json.dumps(rows, indent=2) + "\n")
    header = ["model", "raw", *COMPARED, "xattn-compiler", "verified"]
    lines = [f"# Transpose + Reshape count after each tool (pipeline `{args.pipeline}`)", "",
             "Command: `python benchmarks/bench_clutter.py`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(row[h]) for h in header) + " |")
    beaten = sum(1 for r in rows if r["best_other"] is None or r["xattn-compiler"] <= r["best_other"])
    lines += ["", f"xattn-compiler is at or below the best other tool on {beaten} of {len(rows)} "
              "models."]
    (args.out / "clutter.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
