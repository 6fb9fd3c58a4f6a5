"""``optimize --verify`` on a model past protobuf's 2 GB: time, peak memory, and a fresh check.

    python benchmarks/bench_large_external.py [--dim 12288] [--workdir DIR] [--out benchmarks/results]

Builds a cross-attention block (Q/K/V/O projections of ``dim x dim`` float32, 4 x 604 MB at the
default 12288) whose weights are streamed into one external data file: only the first rows of
each weight are written, the rest is left as holes of the sparse file (zeros), so building
takes seconds and little disk. Then, each in its own process:

1. ``xattn-compiler optimize MODEL -o OUT --verify`` (the weights stay in their files while
   the passes run; the output is written beside OUT, loaded back from disk and compared with
   the input by ONNX Runtime before it replaces anything);
2. a fresh ONNX Runtime session on OUT, whose outputs are compared with the input's;
3. ``xattn-compiler verify MODEL OUT``;
4. ``xattn-compiler split-kv MODEL -o DIR --verify`` (the K/V projections of ``e`` move to the
   projector; both parts are checked as written), then ``verify MODEL DIR``.

Reports wall time and peak RSS of each step (``ru_maxrss`` of the child) and writes
``large_external.md`` and ``large_external.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

#: Rows of each weight that hold values; the rest of the weight is zeros (holes).
ROWS = 64
ALIGN = 65536


def write_model(folder: Path, dim: int, heads: int, seq: int = 8, context: int = 12,
                seed: int = 0) -> Path:
    """Write ``folder/model.onnx`` (a cross-attention block: queries from ``x``, keys and
    values from the encoder states ``e``; opset 18) and ``model.onnx.data``.

    The four ``dim x dim`` weights go to the data file at 64 KiB aligned offsets; only their
    first :data:`ROWS` rows are written, so the file is sparse. Shape constants and the scale
    stay inline. Never holds a weight in memory.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    head_dim = dim // heads
    nbytes = dim * dim * 4
    weights = []
    with open(folder / "model.onnx.data", "wb") as data:
        offset = 0
        for name in ("Wq", "Wk", "Wv", "Wo"):
            rows = rng.standard_normal((min(ROWS, dim), dim)) / np.sqrt(ROWS)
            data.seek(offset)
            data.write(rows.astype(np.float32).tobytes())
            weights.append(_external(name, dim, offset, nbytes))
            offset = -(-(offset + nbytes) // ALIGN) * ALIGN
        data.truncate(offset)
    split = helper.make_tensor("split_shape", TensorProto.INT64, [4], [0, 0, heads, head_dim])
    merge = helper.make_tensor("merge_shape", TensorProto.INT64, [3], [0, 0, dim])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [], [head_dim ** -0.5])
    node = helper.make_node
    nodes = [
        node("MatMul", ["x", "Wq"], ["q"]), node("MatMul", ["e", "Wk"], ["k"]),
        node("MatMul", ["e", "Wv"], ["v"]),
        node("Reshape", ["q", "split_shape"], ["q4"]), node("Reshape", ["k", "split_shape"], ["k4"]),
        node("Reshape", ["v", "split_shape"], ["v4"]),
        node("Transpose", ["q4"], ["q_BHSD"], perm=[0, 2, 1, 3]),
        node("Transpose", ["k4"], ["k_BHDS"], perm=[0, 2, 3, 1]),
        node("Transpose", ["v4"], ["v_BHSD"], perm=[0, 2, 1, 3]),
        node("MatMul", ["q_BHSD", "k_BHDS"], ["scores"]),
        node("Mul", ["scores", "scale"], ["scaled"]),
        node("Softmax", ["scaled"], ["probs"], axis=-1),
        node("MatMul", ["probs", "v_BHSD"], ["ctx_BHSD"]),
        node("Transpose", ["ctx_BHSD"], ["ctx_BSHD"], perm=[0, 2, 1, 3]),
        node("Reshape", ["ctx_BSHD", "merge_shape"], ["ctx"]),
        node("MatMul", ["ctx", "Wo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "large_attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, dim]),
         helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, context, dim])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])],
        weights + [split, merge, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def _external(name: str, dim: int, offset: int, length: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[dim, dim])
    for key, value in (("location", "model.onnx.data"), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def _timed(argv: list[str]) -> dict:
    """Run ``argv``; its wall time, exit code and peak RSS (``wait4``: this child alone)."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().strip().splitlines()[-3:]
    return {"argv": argv[1:], "exit": child.returncode, "seconds": round(seconds, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "stderr": tail}


_COMPARE = """
import sys, numpy as np, onnxruntime as ort
source, out, dim = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(1)
feeds = {"x": rng.standard_normal((1, 8, dim)).astype(np.float32),
         "e": rng.standard_normal((1, 12, dim)).astype(np.float32)}
run = lambda p: ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
expected = run(source)
got = run(out)
err = float(np.abs(got - expected).max())
print(err)
sys.exit(0 if err <= 1e-4 * max(1.0, float(np.abs(expected).max())) else 1)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=12288)
    parser.add_argument("--heads", type=int, default=96)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="xattn-large-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        source = write_model(tmp / "in", args.dim, args.heads)
        build_seconds = time.perf_counter() - start
        data = tmp / "in" / "model.onnx.data"
        out = tmp / "out" / "model.onnx"
        cli = [sys.executable, "-m", "xattn_compiler.cli"]
        optimize = _timed([*cli, "optimize", str(source), "-o", str(out), "--verify"])
        written = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else []
        out_data = out.with_name(out.name + ".data")
        check = _timed([sys.executable, "-c", _COMPARE, str(source), str(out), str(args.dim)])
        verify = _timed([*cli, "verify", str(source), str(out)])
        split_plain = _timed([*cli, "split-kv", str(source), "-o", str(tmp / "split-plain")])
        split_dir = tmp / "split"
        split = _timed([*cli, "split-kv", str(source), "-o", str(split_dir), "--verify"])
        verify_split = _timed([*cli, "verify", str(source), str(split_dir)])
        result = {
            "dim": args.dim, "heads": args.heads,
            "weights_bytes": data.stat().st_size, "build_seconds": round(build_seconds, 1),
            "optimize": optimize, "written": written,
            "output_data_bytes": out_data.stat().st_size if out_data.exists() else None,
            "fresh_ort_check": check, "verify": verify, "split_kv_plain": split_plain,
            "split_kv": split,
            "verify_split": verify_split,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "large_external.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "large_external.md").write_text(_markdown(result))
    print(_markdown(result))
    steps = (optimize, check, verify, split_plain, split, verify_split)
    return 0 if all(step["exit"] == 0 for step in steps) else 1


def _markdown(r: dict) -> str:
    gib = r["weights_bytes"] / 2**30
    rows = [("optimize --verify (from disk)", r["optimize"]), ("fresh ORT check", r["fresh_ort_check"]),
            ("verify MODEL OUT", r["verify"]), ("split-kv", r["split_kv_plain"]),
            ("split-kv --verify (from disk)", r["split_kv"]),
            ("verify MODEL SPLIT_DIR", r["verify_split"])]
    lines = [f"# A {gib:.2f} GiB model with external data (dim {r['dim']}, {r['heads']} heads)", "",
             "| step | exit | seconds | peak RSS (MiB) |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['exit']} | {s['seconds']} | {s['peak_rss_mib']} |" for name, s in rows]
    lines += ["", f"Written: {', '.join(r['written'])} (data {r['output_data_bytes']} bytes)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
