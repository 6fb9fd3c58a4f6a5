"""Layout clutter left after fusion: ours against onnxscript's ONNX Runtime fusions.

    python benchmarks/bench_clutter_fused.py [--out benchmarks/results]

Side by side in one run on every small zoo model: Transpose + Reshape nodes and fused attention
nodes after onnxscript's ``optimizer.optimize`` + ``rewriter.ort_fusions.optimize_for_ort``,
and after xattn-compiler's default pipeline with three fusions: ``onnx-attention`` (4-D Q/K/V,
the default, what TensorRT 10.14 parses), ``onnx-attention{qkv-layout=3d}`` and ``ort-mha``.
Every output is checked with ``verify`` against the raw export on the model's sample inputs
(onnxscript's too: it runs in ONNX Runtime). Writes clutter_fused.md and clutter_fused.json;
docs/clutter.md quotes the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tools import run_tool  # noqa: E402

import xattn_compiler as xc  # noqa: E402
from xattn_compiler.ir import iter_nodes, op_histogram  # noqa: E402
from xattn_compiler.verification import verify  # noqa: E402
from xattn_compiler.zoo import all_models, cached_export  # noqa: E402
from xattn_compiler.zoo.export import requirements_missing  # noqa: E402

OURS = {"ours 4d": {}, "ours 3d": {"qkv_layout": "3d"}, "ours ort-mha": {"target": "ort-mha"}}
THEIRS = "onnxscript ort_fusions"


def clutter(model) -> int:
    ops = op_histogram(model)
    return ops.get("Transpose", 0) + ops.get("Reshape", 0)


def fused(model) -> int:
    """Attention ops of any domain: ONNX Attention, com.microsoft (Multi)HeadAttention, ..."""
    return sum(1 for node in iter_nodes(model.graph) if node.op_type.endswith("Attention"))


def measure(name: str) -> dict:
    exported = cached_export(name)
    model = xc.load(exported.path)
    inputs, _ = exported.sample()
    row: dict = {"model": name, "raw": clutter(model)}
    theirs, error = run_tool(THEIRS, model)
    if theirs is None:
        row[THEIRS] = {"error": error}
    else:
        row[THEIRS] = {"clutter": clutter(theirs), "fused": fused(theirs),
                       "verified": verify(model, theirs, inputs=inputs).ok}
    for label, options in OURS.items():
        ours = xc.optimize(model, **options).model
        row[label] = {"clutter": clutter(ours), "fused": fused(ours),
                      "verified": verify(model, ours, inputs=inputs).ok}
    return row


def cell(entry: dict) -> str:
    if "error" in entry:
        return "failed"
    mark = "" if entry["verified"] else " (wrong outputs)"
    return f"{entry['clutter']} ({entry['fused']} fused){mark}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    names = [m.name for m in all_models() if "small" in m.sizes and not requirements_missing(m)]
    rows = [measure(name) for name in names]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clutter_fused.json").write_text(json.dumps(rows, indent=2) + "\n")
    header = ["model", "raw", THEIRS, *OURS]
    lines = ["# Transpose + Reshape left after fusion (fused attention nodes in brackets)", "",
             "Command: `python benchmarks/bench_clutter_fused.py`", "",
             "| " + " | ".join(header) + " |", "|---|---:|" + "---:|" * (len(header) - 2)]
    for row in rows:
        cells = [row["model"], str(row["raw"]), cell(row[THEIRS]), *(cell(row[k]) for k in OURS)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for label in OURS:
        below = sum(1 for r in rows if "error" in r[THEIRS]
                    or r[label]["clutter"] < r[THEIRS]["clutter"])
        at_most = sum(1 for r in rows if "error" in r[THEIRS]
                      or r[label]["clutter"] <= r[THEIRS]["clutter"])
        totals = (sum(r["raw"] for r in rows), sum(r[label]["clutter"] for r in rows))
        lines.append(f"- {label}: below {THEIRS} on {below} of {len(rows)} models, at most on "
                     f"{at_most}; {totals[0]} -> {totals[1]} in all.")
    theirs_total = sum(r[THEIRS]["clutter"] for r in rows if "error" not in r[THEIRS])
    lines.append(f"- {THEIRS}: {theirs_total} in all (models it failed on left out).")
    (args.out / "clutter_fused.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
