"""The ``zoo`` subcommands: ``zoo list [--json]`` and ``zoo export NAME -o DIR [--size S]``.

Wired into the main parser by :func:`add_zoo_commands`. Handlers take the parsed arguments
and return an exit code; bad input raises :class:`~xattn_compiler.errors.InputError`, which
the main CLI turns into exit code 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..text import printable
from .spec import SIZES, ZooModel


def add_zoo_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """Add ``zoo`` with its ``list`` and ``export`` subcommands to ``commands``."""
    zoo = commands.add_parser(
        "zoo", parents=[common], help="list and export the bundled model zoo",
        description="Real architectures built from configs with seeded random weights "
                    "(nothing is downloaded), exported to ONNX with torch.")
    actions = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", parents=[common], help="list the zoo models",
                                 description="List the zoo models and how they export.")
    listing.add_argument("--json", action="store_true", help="print the list as JSON")
    listing.set_defaults(handler=run_zoo_list)

    export = actions.add_parser(
        "export", parents=[common], help="export one zoo model (needs torch)",
        description="Build and export one zoo model into DIR: model.onnx, sample.npz "
                    "(sample inputs and torch's outputs) and manifest.json.")
    export.add_argument("name", help="the zoo model's name (see 'zoo list')")
    export.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="directory to write the export into")
    export.add_argument("--size", choices=SIZES, default="small",
                        help="small (tests, seconds) or bench (realistic sizes)")
    export.set_defaults(handler=run_zoo_export)


def _describe(model: ZooModel) -> dict[str, Any]:
    return {"name": model.name, "family": model.family, "exporter": model.exporter,
            "opset": model.opset, "dtype": model.dtype, "sizes": list(model.sizes),
            "description": model.description}


def run_zoo_list(args: argparse.Namespace) -> int:
    """Print the zoo models, one line each (or JSON)."""
    from . import all_models

    rows = [_describe(model) for model in all_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no zoo models")
        return 0
    cells = [[row["name"], row["family"], row["exporter"], f"opset {row['opset']}",
              row["dtype"], ",".join(row["sizes"])] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    for line, row in zip(cells, rows, strict=True):
        padded = "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        print(f"{padded}  {row['description']}")
    return 0


def run_zoo_export(args: argparse.Namespace) -> int:
    """Export one model and print the path of its manifest."""
    from . import export

    out = Path(args.output)
    # Checked before the (long) export, and again by the OS when writing.
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out}: exists and is not a directory; -o names the folder to "
                          "export into")
    # An unknown name, a size the model lacks or a missing library raise InputError.
    try:
        exported = export(args.name, out, size=args.size)
    except OSError as exc:
        raise OutputError(f"{exc.filename or out}: cannot write the export "
                          f"({exc.strerror or exc})") from exc
    print(printable(exported.directory / "manifest.json"))
    return 0
