"""What to build: one model, or the projector and decoder of a ``split-kv`` directory.

A split model deploys as two engines: the projector runs once per request (static inputs ->
every cross-attention's K/V) and the decoder runs per step with those K/V as inputs. Their
profiles must agree on shared dims (batch, the encoder length that is the K/V length), so the
projector's profile is derived first and its symbol ranges are handed to the decoder's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from ..errors import InputError
from ..io import load
from ..split_spec import read_split_spec
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
