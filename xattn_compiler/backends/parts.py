"""What to build: one model, or the projector and decoder of a ``split-kv`` directory.

A split model deploys as two engines: the projector runs once per request (static inputs ->
every cross-attention's K/V) and the decoder runs per step with those K/V as inputs. Their
profiles must agree on shared dims (batch, the encoder length that is the K/V length), so the
projector's profile is derived first and its symbol ranges are handed to the decoder's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import InputError
from ..io import load
from .profiles import InputShapes, Profile, Range, derive_profile, input_dims, parse_override


@dataclass
class Part:
    name: str                 # "model", or "kv_projector" / "decoder"
    path: Path
    model: onnx.ModelProto
    context_inputs: list[str] | None
    role: str                 # one line for the emitted commands

    def engine_in(self, engine: Path, split: bool) -> Path:
        return engine / f"{self.name}.plan" if split else engine


def load_parts(source: str | Path) -> list[Part]:
    """One part for an ONNX file; projector and decoder for a split directory."""
    source = Path(source)
    if not source.is_dir():
        return [Part("model", source, load(source), None, "the model")]
    spec = read_split_spec(source)
    parts = []
    if spec.projector is not None:
        parts.append(Part("kv_projector", spec.projector, load(spec.projector),
                          list(spec.static_inputs),
                          "runs once per request: static inputs -> cross-attention K/V"))
    parts.append(Part("decoder", spec.decoder, load(spec.decoder), list(spec.kv_names),
                      "runs once per step, reading the projector's K/V"))
    return parts


#: A split.json is a few hundred bytes; anything far larger is not one.
MAX_SPLIT_JSON_BYTES = 1 << 20


@dataclass(frozen=True)
class SplitSpec:
    """A checked ``split.json``: the part files (inside the directory) and the K/V names."""

    projector: Path | None
    decoder: Path
    static_inputs: tuple[str, ...]
    kv_names: tuple[str, ...]


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


def part_profiles(parts: list[Part], overrides: Iterable[str] = (),
                  dim_ranges: Mapping[str, Range] | None = None) -> list[Profile]:
    """One profile per part; shared symbols get the same range in every part."""
    parsed = [parse_override(text) for text in overrides]
    known = {name for part in parts for name in input_dims(part.model)}
    unknown = [o.name for o in parsed if o.name not in known]
    if unknown:
        raise InputError(f"--profile names {unknown}, which no part has as an input "
                         f"(inputs: {', '.join(sorted(known))})")
    shared: dict[str, Range] = dict(dim_ranges or {})
    profiles = []
    for part in parts:
        mine: list[InputShapes] = [o for o in parsed if o.name in input_dims(part.model)]
        profile = derive_profile(part.model, mine, shared, context_inputs=part.context_inputs)
        for symbol, value in profile.symbols.items():
            shared.setdefault(symbol, value)
        profiles.append(profile)
    return profiles
