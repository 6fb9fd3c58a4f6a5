"""Clean-up scaling: ``remove-layout-clutter`` on cluttered decoders of 1k, 10k and 100k nodes.

    python benchmarks/bench_clutter_scale.py [--layers 15 150 1500] [--out benchmarks/results]

The graphs are :func:`synthetic.decoder` with ``clutter=True`` (computed head-split targets,
K^T as two Transposes, Unsqueeze/Squeeze pairs, same-type Casts, Identities: what eager exports
leave). The pass's time is split into its phases by timing the functions it calls: ONNX shape
inference, the graphsurgeon import, the rewrites, dead-node removal and the export, so a
regression points at its phase. The fitted exponent of time against nodes says whether the
cost is linear (1.0). Every output is checked to have lost exactly the planted clutter; the
smallest is also verified numerically. Wall time and this process's CPU time are both
reported: on a shared machine the CPU time is the steadier figure. Writes clutter_scale.json and clutter_scale.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import xattn_compiler.passes.layout_clutter as layout_clutter  # noqa: E402
from synthetic import decoder, fitted_exponent  # noqa: E402
from xattn_compiler.passes import RemoveLayoutClutter  # noqa: E402

import xattn_compiler.ir as ir  # noqa: E402
import xattn_compiler.rewrite as rewrite  # noqa: E402
from xattn_compiler.ir import count_nodes, op_histogram  # noqa: E402
from xattn_compiler.verification import verify  # noqa: E402

LAYERS = (15, 150, 1500)  # about 1k, 10k and 100k nodes
PHASES = {"shape inference": (onnx.shape_inference, "infer_shapes"), "import": (ir, "import_graph"),
          "export": (rewrite, "export_model"), "shape refresh": (rewrite, "refresh_shapes"),
          "dead nodes": (layout_clutter, "remove_dead_nodes")}


def _timed(spent: collections.Counter, phase: str, function):
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            spent[phase] += time.perf_counter() - start
    return timed


def measure(layers: int) -> dict:
    model = decoder(layers, clutter=True)
    spent: collections.Counter = collections.Counter()
    originals = {phase: getattr(module, name) for phase, (module, name) in PHASES.items()}
    for phase, (module, name) in PHASES.items():
        setattr(module, name, _timed(spent, phase, originals[phase]))
    try:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = RemoveLayoutClutter().run(model)
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        for phase, (module, name) in PHASES.items():
            setattr(module, name, originals[phase])
    before, after = op_histogram(model), op_histogram(result.model)
    # Per attention: the two K Transposes merge, the Squeeze/Unsqueeze pair, the Cast and
    # the Identity go, the computed Q target becomes a constant (Shape/Gather/Unsqueeze/Concat).
    removed = {"Transpose": 1, "Squeeze": 1, "Unsqueeze": 3, "Cast": 1, "Identity": 1,
               "Shape": 1, "Gather": 2, "Concat": 1}
    for op, per_block in removed.items():
        expected = before.get(op, 0) - per_block * 2 * layers
        if after.get(op, 0) != expected:
            raise SystemExit(f"{layers} layers: {after.get(op, 0)} {op} left, expected {expected}")
    row = {"layers": layers, "nodes": count_nodes(model), "nodes_after": count_nodes(result.model),
           "transpose_reshape": [before["Transpose"] + before["Reshape"],
                                 after["Transpose"] + after["Reshape"]],
           "total_s": total, "cpu_s": cpu}
    row.update({f"{phase}_s": spent[phase] for phase in PHASES})
    row["rewrites_s"] = total - sum(spent.values())
    if layers <= 20:
        row["verified"] = verify(model, result.model).ok
    return row


def exponent(rows: list[dict], key: str) -> float:
    return fitted_exponent([r["nodes"] for r in rows], [r[key] for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--layers", type=int, nargs="*", default=list(LAYERS))
    args = parser.parse_args()
    rows = [measure(layers) for layers in args.layers]
    fit = exponent(rows, "total_s") if len(rows) > 1 else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clutter_scale.json").write_text(json.dumps(
        {"machine": platform.processor() or platform.machine(), "rows": rows, "exponent": fit},
        indent=2) + "\n")
    phases = ["shape inference", "import", "rewrites", "dead nodes", "export", "shape refresh"]
    lines = ["# Clean-up scaling", "", "Command: `python benchmarks/bench_clutter_scale.py`", "",
             "| nodes | T+R before -> after | " + " | ".join(f"{p} s" for p in phases)
             + " | total s | CPU s |", "|---:|---:|" + "---:|" * (len(phases) + 2)]
    for r in rows:
        cells = [f"{r[p + '_s' if p != 'rewrites' else 'rewrites_s']:.2f}" for p in phases]
        lines.append(f"| {r['nodes']} | {r['transpose_reshape'][0]} -> {r['transpose_reshape'][1]} | "
                     + " | ".join(cells) + f" | {r['total_s']:.2f} | {r['cpu_s']:.2f} |")
    if fit is not None:
        lines += ["", f"Fitted exponent of total time against nodes: {fit:.2f} (1.0 is linear)."]
    (args.out / "clutter_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
