"""A split-kv directory's ``split.json``, read without trust: a bounded read, every field of
the right kind, the part files inside the directory (a ``"decoder": "../x.onnx"`` must not
make verify, build or triton-repo read a model outside it)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

#: A split.json is a few hundred bytes; anything far larger is not one.
MAX_SPLIT_JSON_BYTES = 1 << 20


@dataclass(frozen=True)
class SplitSpec:
    """A checked ``split.json``: the part files (inside the directory) and the K/V names."""

    projector: Path | None
    decoder: Path
    static_inputs: tuple[str, ...]
    kv_names: tuple[str, ...]
    table: dict[str, Any]     # the whole file, for fields only reports read


def read_split_spec(directory: str | Path) -> SplitSpec:
    """Read and check ``directory/split.json``; :class:`InputError` naming the file and the
    field for a missing, oversized or malformed file, or a part outside the directory."""
    directory = Path(directory)
    path = directory / "split.json"
    if not path.is_file():
        raise InputError(f"{directory}: a directory must be a split-kv output (no split.json)")
    try:
        if path.stat().st_size > MAX_SPLIT_JSON_BYTES:
            raise InputError(f"{path}: {path.stat().st_size} bytes is too large for a split.json")
        table = json.loads(path.read_bytes())
    except OSError as exc:
        raise InputError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, deep nesting
        raise InputError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(table, dict):
        raise InputError(f"{path}: the top level must be an object")
    projector = table.get("projector")
    return SplitSpec(
        projector=_part_file(directory, path, "projector", projector) if projector else None,
        decoder=_part_file(directory, path, "decoder", table.get("decoder")),
        static_inputs=tuple(_names(path, "static_inputs", table.get("static_inputs", []))),
        kv_names=tuple(_kv_names(path, table.get("kv", []))),
        table=table,
    )


def _part_file(directory: Path, path: Path, field: str, value: object) -> Path:
    # A bare file name: a split.json must not make us read a model outside its directory.
    if not isinstance(value, str) or not value or value in (".", "..") or \
            Path(value).name != value or "\\" in value:
        raise InputError(f"{path}: field '{field}' must be the file name of a model in "
                         f"{directory}, got {value!r}")
    return directory / value


def _names(path: Path, field: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{path}: field '{field}' must be a list of tensor names")
    return value


def _kv_names(path: Path, entries: object) -> list[str]:
    if not isinstance(entries, list):
        raise InputError(f"{path}: field 'kv' must be a list of {{\"key\", \"value\"}} objects")
    names = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str)
                                                  for k in ("key", "value")):
            raise InputError(f"{path}: field 'kv[{index}]' must be an object with string "
                             "'key' and 'value'")
        names += [entry["key"], entry["value"]]
    return names


__all__ = ["MAX_SPLIT_JSON_BYTES", "SplitSpec", "read_split_spec"]
