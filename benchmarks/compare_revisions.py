"""A benchmark against an earlier revision of xattn-compiler, side by side in one run.

    python benchmarks/compare_revisions.py REV [--repeat 2] -- bench_clutter_scale.py --layers 1500

The package as it was at ``REV`` (``git archive``, with ``passes/`` and ``patterns/`` put where
the installed package has them) is put first on ``PYTHONPATH`` of one process and the working
tree's on the other's; the two run the same benchmark script (from the working tree) in turn,
``--repeat`` times each, alternating so that load on a shared machine hits both alike. Prints
each run's last line (the benchmark's own summary) and, for scripts that write JSON with a
``rows[*].total_s``, the best time of each side and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_at(revision: str, into: Path) -> Path:
    """The importable package of ``revision`` under ``into``; returns the path to put first."""
    archive = into / "source.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision], check=True)
    source = into / "source"
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="data")
    package = into / "site" / "xattn_compiler"
    shutil.copytree(source / "xattn_compiler", package)
    for sub in ("passes", "patterns"):
        shutil.copytree(source / sub, package / sub)
    return into / "site"


def run(script: list[str], path: Path | None, out: Path) -> dict:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    command = [sys.executable, str(ROOT / "benchmarks" / script[0]), *script[1:], "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    results = {"last": lines[-1] if lines else ""}
    for found in out.glob("*.json"):
        data = json.loads(found.read_text())
        if isinstance(data, dict) and data.get("rows"):
            results["total_s"] = [row.get("total_s") for row in data["rows"]]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revision")
    parser.add_argument("--repeat", type=int, default=2)
    argv = sys.argv[1:]
    if "--" not in argv:
        parser.error("give the benchmark after --, e.g. -- bench_clutter_scale.py --layers 1500")
    split = argv.index("--")
    args, script = parser.parse_args(argv[:split]), argv[split + 1:]
    with tempfile.TemporaryDirectory() as scratch:
        old_path = package_at(args.revision, Path(scratch))
        best: dict[str, list[float]] = {}
        for attempt in range(args.repeat):
            for label, path in ((args.revision, old_path), ("working tree", None)):
                out = Path(scratch) / f"{label.replace(' ', '_')}_{attempt}"
                result = run(script, path, out)
                print(f"{label} (run {attempt + 1}): {result['last']}", flush=True)
                totals = result.get("total_s")
                if totals:
                    best[label] = [min(a, b) for a, b in zip(best[label], totals, strict=True)] \
                        if label in best else totals
        if len(best) == 2:
            old, new = best[args.revision], best["working tree"]
            for index, (a, b) in enumerate(zip(old, new, strict=True)):
                print(f"row {index}: {args.revision} {a:.2f} s, working tree {b:.2f} s, "
                      f"{a / b:.2f}x faster")


if __name__ == "__main__":
    main()
