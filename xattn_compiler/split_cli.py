"""The ``split-kv`` command: a K/V projector and a decoder from one model.

    xattn-compiler split-kv MODEL -o DIR [--static-inputs NAME,...] [--verify]

writes ``DIR/kv_projector.onnx``, ``DIR/decoder.onnx`` and ``DIR/split.json`` (DESIGN.md).
The lead wires :func:`add_split_commands` into ``cli.build_parser``; handlers take the parsed
arguments and return an exit code, and raise :class:`InputError` (exit 2) for bad input or
:class:`CheckFailed` (exit 1) when ``--verify`` finds a mismatch, in which case nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .errors import CheckFailed, OutputError
from .io import load
from .text import printable

EXIT_OK = 0


def add_split_commands(subparsers: Any, common_parent_parser: argparse.ArgumentParser) -> None:
    """Add ``split-kv`` to the CLI's subcommands."""
    cmd = subparsers.add_parser(
        "split-kv", parents=[common_parent_parser],
        help="split off a K/V projector that runs once per context",
        description=("Write DIR/kv_projector.onnx (static inputs -> every cross-attention's K "
                     "and V), DIR/decoder.onnx (those K/V as inputs) and DIR/split.json. "
                     "Constant contexts are folded into the decoder instead."))
    cmd.add_argument("model", help="the ONNX model to split")
    cmd.add_argument("-o", "--output", required=True, metavar="DIR",
                     help="directory to write the projector, the decoder and split.json into")
    cmd.add_argument("--static-inputs", metavar="NAME,...",
                     help="graph inputs that are fixed per context (default: the inputs that "
                          "feed only cross-attention K/V)")
    cmd.add_argument("--verify", action="store_true",
                     help="run projector then decoder against the model with ONNX Runtime; "
                          "exit 1 and write nothing on mismatch")
    cmd.add_argument("--inputs", metavar="NPZ", help="inputs for --verify (default: random)")
    cmd.set_defaults(handler=run_split_kv)


def run_split_kv(args: argparse.Namespace) -> int:
    """Split ``args.model`` into ``args.output``; 0 on success."""
    from .split import PROJECTOR_FILE, split_static_kv, verify_split
    from .verification import as_stored

    model_path, output = Path(args.model), Path(args.output)
    if output.exists() and output.resolve() == model_path.resolve():
        raise OutputError(f"{output}: refusing to write over the input model")
    # Weights in external data files stay there (stubs), as in optimize: a 3 GB model is not
    # read into memory to be split.
    model = load(model_path, lazy_weights=True)
    names = None
    if args.static_inputs is not None:
        names = [name.strip() for name in args.static_inputs.split(",") if name.strip()]
    result = split_static_kv(model, names)

    def verify_saved(staged: Path) -> None:
        # The files as written, read back from disk: what a user will run.
        check = verify_split(as_stored(model, model_path), staged, inputs=args.inputs)
        if not check.ok:
            print(printable(check.summary(), multiline=True), file=sys.stderr)
            raise CheckFailed(f"verification failed: projector then decoder differ from "
                              f"{model_path}; nothing was written to {output}")

    result.save(output, protect=[model_path], check_saved=verify_saved if args.verify else None)
    if not getattr(args, "quiet", False):
        print(printable(_summary(result, output, PROJECTOR_FILE, args.verify)), file=sys.stderr)
    return EXIT_OK


def _summary(result: Any, output: Path, projector_file: str, verified: bool) -> str:
    report = result.report
    if result.projector is None:
        text = (f"wrote {output}: folded the K/V of {len(report['folded'])} constant-context "
                f"cross-attention(s) into the decoder (no projector)")
    else:
        text = (f"wrote {output}: {projector_file} ({', '.join(result.static_inputs)} -> "
                f"{len(report['cut'])} K/V tensors), decoder.onnx "
                f"({report['original']['nodes']} -> {report['decoder']['nodes']} nodes)")
        if report.get("folded"):
            text += f"; folded {len(report['folded'])} constant-context K/V"
    return text + (", verified" if verified else "")
