"""Time to export the whole small zoo from an empty cache (the issue's bound: 10 minutes).

    python benchmarks/bench_zoo_export.py [--cache DIR]

Exports every small model into a fresh cache directory, one after another in this process, and
writes zoo_export.json / zoo_export.md with the time of each export and the total.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from xattn_compiler.zoo import all_models, cached_export
from xattn_compiler.zoo.export import requirements_missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cache", type=Path, default=None, help="an empty directory")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    cache = args.cache or Path(tempfile.mkdtemp(prefix="xattn-zoo-"))
    rows, start = [], time.perf_counter()
    for model in all_models():
        if "small" not in model.sizes or requirements_missing(model):
            continue
        t0 = time.perf_counter()
        exported = cached_export(model.name, cache)
        rows.append({"name": model.name, "seconds": round(time.perf_counter() - t0, 2),
                     "nodes": exported.manifest["num_nodes"]})
    total = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_export.json").write_text(json.dumps({"total_s": total, "rows": rows},
                                                         indent=2) + "\n")
    lines = ["# Exporting the small zoo from an empty cache", "",
             "Command: `python benchmarks/bench_zoo_export.py`", "",
             "| model | seconds | nodes |", "|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['seconds']:.1f} | {r['nodes']} |" for r in rows]
    lines += ["", f"Total: {total:.0f} s for {len(rows)} models (one process, 2 cores)."]
    (args.out / "zoo_export.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
