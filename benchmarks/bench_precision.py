"""Half precision for TensorRT 11: ``optimize --precision`` beside ModelOpt AutoCast, one run.

    python benchmarks/bench_precision.py [--models decoder-10k unet-sd15] [--precision fp16]
        [--autocast-python /path/to/python] [--max-rss-gib 16] [--workdir DIR] [--out DIR]

TensorRT 11 builds strongly typed networks: a layer runs in the type the ONNX file gives it,
so the precision step is a graph rewrite. Two tools do it here, each in its own process on the
same file (wall time and peak RSS of the child, ``ru_maxrss``):

* ``xattn-compiler optimize MODEL -o OUT --precision fp16`` (the default pipeline: clean-up,
  fusion, then the precision pass; weights stay on disk until written);
* ModelOpt AutoCast, ``python -m modelopt.onnx.autocast -t fp16 --keep_io_types`` with its
  default ``data_max`` of 512 (it runs the fp32 model with ONNX Runtime to decide), when the
  interpreter given by ``--autocast-python`` (or ``XATTN_AUTOCAST_PYTHON``) can import it.
  AutoCast does not fuse: its row shows what a user gets who converts the export as it is.

Each output is then read back: the attention blocks in it (fused nodes and unfused cores) and
the type their Q operand has. "Blocks left fp32" is what TensorRT 11 would run without a
half-precision fused kernel.

Models: ``decoder-10k`` (the synthetic 10k-node cluttered decoder of ``synthetic.py``) and
``unet-sd15`` (the zoo UNet at its bench size: SD-1.5's layout, 3.4 GB of external weights;
exported once into the zoo cache, which takes a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import decoder  # noqa: E402
from xattn_compiler.passes.reshapes import onnx_dtype  # noqa: E402

import xattn_compiler as xc  # noqa: E402
from xattn_compiler.attention import find_attention  # noqa: E402
from xattn_compiler.verification import verify  # noqa: E402

MODELS = ("decoder-10k", "unet-sd15")
HALF = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}


def model_path(name: str, workdir: Path) -> tuple[Path, Path | None]:
    """The model's file and its sample inputs (None: verification draws them)."""
    if name == "decoder-10k":
        path = workdir / "decoder_10k.onnx"
        onnx.save(decoder(150, clutter=True), path)
        return path, None
    if name == "unet-sd15":
        from xattn_compiler.zoo import cached_export

        path = Path(cached_export("unet2d-tiny", size="bench").path)
        return path, path.with_name("sample.npz")
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def timed(argv: list[str], max_rss_gib: float) -> dict:
    """Run ``argv`` in a child process; its wall time, peak RSS and the tail of its stderr.
    A child above ``max_rss_gib`` is killed (a row that says so, not a machine out of memory)."""
    start = time.perf_counter()
    killed, peak = False, 0.0
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        while True:  # wait4 with WNOHANG reaps the child and returns its own rusage
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            rss, high_water = _memory_gib(child.pid)
            peak = max(peak, high_water)
            if not killed and rss > max_rss_gib:
                child.kill()
                killed = True
            time.sleep(0.5)
        err.seek(0)
        tail = err.read().decode(errors="replace").strip().splitlines()[-1:]
    code = os.waitstatus_to_exitcode(status)
    error = (f"killed above {max_rss_gib} GiB RSS" if killed
             else None if code == 0 else (tail or ["failed"])[0])
    # VmHWM is the exec'd tool's own high-water mark; ru_maxrss of a child started by fork
    # carries this process's peak over (6.8 GB for a 0.4 GB tool after the UNet rows).
    # Polled every 0.5 s, so growth in a tool's last half second is missed.
    return {"seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mib": round(peak * 1024), "error": error}


def _memory_gib(pid: int) -> tuple[float, float]:
    """The process's resident size and its high-water mark (0 once it is gone)."""
    fields = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 2**20
    except OSError:
        pass
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def error_vs_fp32(source: Path, converted: Path, inputs: Path | None) -> dict:
    """The largest error of any output against the fp32 model, ONNX Runtime CPU, one input set
    (its CPU kernels compute half Attention in fp32: a floor on what a GPU kernel gives)."""
    result = verify(source, converted, inputs=inputs, profile="quick")
    worst = max(result.outputs, key=lambda c: c.max_abs_error or 0.0)
    return {"max_abs_error": worst.max_abs_error, "max_rel_error": worst.max_rel_error,
            "worst_output": worst.name}


def block_precisions(path: Path) -> dict:
    """The attention blocks of the file at ``path`` by kind (fused or not) and Q's type."""
    model = xc.load(path, lazy_weights=True)
    counts: Counter = Counter()
    for block in find_attention(model):
        precision = HALF.get(onnx_dtype(block.q.tensor), "fp32")
        counts[f"{'fused' if block.fused else 'unfused'} {precision}"] += 1
    return {"blocks": sum(counts.values()), "by_kind": dict(sorted(counts.items())),
            "left_fp32": sum(n for key, n in counts.items() if key.endswith("fp32"))}


def checked(source: Path, converted: Path, inputs: Path | None) -> dict:
    return {**block_precisions(converted), **error_vs_fp32(source, converted, inputs)}


def autocast_python(given: str | None) -> str | None:
    python = given or os.environ.get("XATTN_AUTOCAST_PYTHON")
    if not python:
        return None
    probe = subprocess.run([python, "-c", "import modelopt.onnx.autocast"], capture_output=True)
    return python if probe.returncode == 0 else None


def measure(name: str, precision: str, workdir: Path, autocast: str | None,
            max_rss_gib: float) -> list[dict]:
    source, inputs = model_path(name, workdir)
    rows = []
    ours = workdir / f"{name}-xattn-{precision}.onnx"
    run = timed([str(Path(sys.executable).with_name("xattn-compiler")), "optimize", str(source),
                 "-o", str(ours), "--precision", precision], max_rss_gib)
    rows.append({"model": name, "tool": f"xattn-compiler --precision {precision}", **run,
                 **(checked(source, ours, inputs) if run["error"] is None else {})})
    if autocast is not None:
        theirs = workdir / f"{name}-autocast-{precision}.onnx"
        run = timed([autocast, "-m", "modelopt.onnx.autocast", "--onnx_path", str(source),
                     "--output_path", str(theirs), "-t", precision, "--keep_io_types",
                     "--providers", "cpu", "--log_level", "WARNING"], max_rss_gib)
        rows.append({"model": name, "tool": f"ModelOpt AutoCast -t {precision}", **run,
                     **(checked(source, theirs, inputs) if run["error"] is None else {})})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def _fmt(value) -> str:
    return "" if value is None else f"{value:.2e}"


def markdown(rows: list[dict], note: str) -> str:
    lines = ["# Precision for TensorRT 11: xattn-compiler vs ModelOpt AutoCast", "", note, "",
             "| model | tool | seconds | peak RSS (MiB) | attention blocks | left fp32 | blocks by kind | max abs error vs fp32 | error |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k}: {v}" for k, v in r.get("by_kind", {}).items())
        lines.append(f"| {r['model']} | {r['tool']} | {r['seconds']} | {r['peak_rss_mib']} | "
                     f"{r.get('blocks', '')} | {r.get('left_fp32', '')} | {kinds} | "
                     f"{_fmt(r.get('max_abs_error'))} | {r['error'] or ''} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--precision", default="fp16", choices=("fp16", "bf16"))
    parser.add_argument("--autocast-python", default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--max-rss-gib", type=float, default=16.0,
                        help="kill a tool above this resident size (default 16: the machine has 24)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    autocast = autocast_python(args.autocast_python)
    note = ("ModelOpt AutoCast: " + (f"run with {autocast}" if autocast else
                                     "not importable here, its rows are missing"))
    with tempfile.TemporaryDirectory(prefix="xattn-precision-", dir=args.workdir) as tmp:
        rows = [row for name in args.models
                for row in measure(name, args.precision, Path(tmp), autocast, args.max_rss_gib)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "precision.json").write_text(json.dumps({"rows": rows, "note": note}, indent=2) + "\n")
    (args.out / "precision.md").write_text(markdown(rows, note))
    print(markdown(rows, note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
