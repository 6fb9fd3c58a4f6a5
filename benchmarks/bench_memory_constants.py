"""Peak memory of ``xattn-compiler optimize`` against the model's size, for large constants.

    python benchmarks/bench_memory_constants.py [--out benchmarks/results] [--sizes 16,64]
                                                [--verify] [--large]

Each model holds one large tensor of the given size (MB) and adds it to, or multiplies it
with, a graph input; each is optimized by the CLI in a child process, whose peak resident set
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``, read by a fresh wrapper process per run so runs do
not mix) is reported with its ratio to the model's size on disk:

* ``1d-initializer``: a 1-D float32 initializer, ``y = x + table`` with ``x`` as long;
* ``1d-constant``: the same tensor as a ``Constant`` node;
* ``matmul-weight``: a square float32 weight, ``y = x @ W`` (the case that was always fine).

ONNX's data propagation once expanded every long 1-D tensor into one symbolic dim per
element: the 64 MB 1-D models peaked at about 3.8 GB (58x) and a 512 MB one passed 24 GB.
``--large`` adds 512 MB models (external data; needs ~3 GB free), ``--verify`` adds
``--verify`` to each run (ONNX Runtime then holds inputs and outputs of every input set).
Writes ``memory_constants.md`` and ``memory_constants.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MB = 1 << 20
_CLI = "import sys; from xattn_compiler.cli import main; sys.exit(main(sys.argv[1:]))"
_WRAPPER = ("import resource, subprocess, sys\n"
            "code = subprocess.run(sys.argv[1:], capture_output=True).returncode\n"
            "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")


def build(kind: str, megabytes: int) -> onnx.ModelProto:
    FLOAT = TensorProto.FLOAT
    if kind == "matmul-weight":
        side = int((megabytes * MB // 4) ** 0.5)
        weight = numpy_helper.from_array(np.ones((side, side), np.float32), "W")
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")], "g",
            [helper.make_tensor_value_info("x", FLOAT, ["batch", side])],
            [helper.make_tensor_value_info("y", FLOAT, ["batch", side])], [weight])
    else:
        floats = megabytes * MB // 4
        table = numpy_helper.from_array(np.ones(floats, np.float32), "table")
        nodes = [helper.make_node("Add", ["x", "table"], ["y"], name="add")]
        initializers = [table]
        if kind == "1d-constant":
            nodes.insert(0, helper.make_node("Constant", [], ["table"], value=table, name="c"))
            initializers = []
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", FLOAT, [floats])],
            [helper.make_tensor_value_info("y", FLOAT, [floats])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def measure(model_path: Path, out: Path, verify: bool) -> dict:
    size = sum(p.stat().st_size for p in model_path.parent.iterdir())  # the model and its data
    command = [sys.executable, "-c", _CLI, "optimize", str(model_path), "-o", str(out)]
    if verify:
        command.append("--verify")
    done = subprocess.run([sys.executable, "-c", _WRAPPER, *command], capture_output=True,
                          text=True, check=True)
    code, peak_kb = (int(v) for v in done.stdout.split())
    return {"exit": code, "model_mb": round(size / MB, 1), "peak_mb": round(peak_kb / 1024),
            "ratio": round(peak_kb * 1024 / size, 1)}


def run(sizes: list[int], verify: bool) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for megabytes in sizes:
            for kind in ("1d-initializer", "1d-constant", "matmul-weight"):
                folder = Path(tmp) / f"{kind}-{megabytes}"
                folder.mkdir()
                path = folder / "model.onnx"
                # A Constant node's tensor cannot live in a data file; the others do at 512 MB.
                external = megabytes >= 512 and kind != "1d-constant"
                onnx.save(build(kind, megabytes), path, save_as_external_data=external,
                          location="model.onnx.data")
                row = {"kind": kind, "megabytes": megabytes, "verify": verify,
                       **measure(path, folder / "out.onnx", verify)}
                print(json.dumps(row), file=sys.stderr)
                rows.append(row)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_constants.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Peak memory of `optimize` with large constants", "",
             "| model | size MB | --verify | exit | peak RSS MB | peak / size |",
             "|---|---:|---|---:|---:|---:|"]
    footer = ["", "Peak RSS includes the Python process with its imports (about 130 MB)."]
    lines += [f"| {r['kind']} | {r['model_mb']} | {r['verify']} | {r['exit']} | {r['peak_mb']} "
              f"| {r['ratio']}x |" for r in rows]
    (out / "memory_constants.md").write_text("\n".join(lines + footer) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--sizes", default="16,64", help="tensor sizes in MB")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--large", action="store_true", help="also 512 MB")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.large:
        sizes.append(512)
    write(run(sizes, args.verify), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
