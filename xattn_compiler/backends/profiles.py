"""Optimization profiles: a MIN/OPT/MAX shape for every dynamic input, from the model's dims.

TensorRT picks kernels for OPT and keeps them valid over [MIN, MAX]; every dynamic input needs
a range. They are derived per *symbol*, not per input, so inputs that share a dim (``batch`` in
``input_ids`` and ``encoder_hidden_states``) always agree:

1. A symbol gets a class from its name and from where it appears: ``batch`` (names like
   ``batch``, ``batch_size``, ``N``), ``context`` (a dim of an input that feeds only
   cross-attention K/V, or of a split decoder's K/V inputs: the encoder length, the prompt
   length; or a name like ``enc_len``, ``mem_len``, ``ctx_len``) or ``sequence`` (the rest).
   A dim with no name is a symbol of its own: ``batch`` on axis 0, else ``sequence``.
2. Ranges come, first match wins, from per-input overrides (``NAME:MIN:OPT:MAX`` with shapes
   like ``1x1x512``; the symbols an override covers follow it in every other input), from
   per-symbol overrides (``enc_len=1500:1500:1500``), then from the class defaults.
3. A default range is capped where the model cannot go further: a learned position table
   (a Gather from a constant table, indexed by a ``Range`` over the dim plus constant
   offsets) of R rows caps the dim at R minus the offsets (Whisper's 448 positions, BART's
   1024 + 2).

Pin a length that never changes (77 text tokens, 1500 audio frames) with MIN=OPT=MAX: kernel
choice improves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx

from ..errors import InputError
from ..ir import constant_value

Range = tuple[int, int, int]
Shape = tuple[int, ...]

_BATCH = re.compile(r"^(n|b|bs|batch.*|.*_batch|.*batch_size.*)$", re.I)
_CONTEXT = re.compile(r"(enc|ctx|context|mem|memory|src|kv|past|cross|frames|hw|pixels)", re.I)


@dataclass(frozen=True)
class DimDefaults:
    """Default MIN/OPT/MAX per dim class; override any of them."""

    batch: Range = (1, 1, 8)
    sequence: Range = (1, 64, 512)
    context: Range = (1, 256, 2048)

    def of(self, kind: str) -> Range:
        return getattr(self, kind)


@dataclass(frozen=True)
class InputShapes:
    """One input's MIN/OPT/MAX shapes."""

    name: str
    min: Shape
    opt: Shape
    max: Shape

    def as_tuple(self) -> tuple[Shape, Shape, Shape]:
        return self.min, self.opt, self.max


@dataclass
class Profile:
    """One optimization profile: shapes of every dynamic input, and where each range came from."""

    inputs: dict[str, InputShapes]
    symbols: dict[str, Range] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)      # symbol -> why this range

    def spec(self, which: str) -> str:
        """trtexec's ``--minShapes``-style spec: ``a:1x64,b:1x1x512`` (``which``: min/opt/max)."""
        return ",".join(f"{name}:{format_shape(getattr(shapes, which))}"
                        for name, shapes in self.inputs.items())

    def to_dict(self) -> dict[str, Any]:
        return {"inputs": {n: {"min": list(s.min), "opt": list(s.opt), "max": list(s.max)}
                           for n, s in self.inputs.items()},
                "symbols": {k: list(v) for k, v in self.symbols.items()},
                "origins": dict(self.origins)}


def format_shape(shape: Iterable[int]) -> str:
    return "x".join(str(d) for d in shape)


def parse_shape(text: str, where: str) -> Shape:
    """``"1x1x512"`` as ``(1, 1, 512)``; an empty text is a scalar."""
    if text == "":
        return ()
    if text.startswith("-") or "x-" in text:
        raise InputError(f"{where}: shape '{text}' has a negative dim")
    # ASCII digits only: int() also takes '1_0', ' 1' and other scripts' digits.
    if not all(_DIM.fullmatch(part) for part in text.split("x")):
        raise InputError(f"{where}: shape '{text}' is not dims joined by 'x' (like 1x1x512)")
    # Length first: int() refuses texts of thousands of digits with its own ValueError.
    dims = tuple(int(part) if len(part) <= 10 else MAX_DIM + 1 for part in text.split("x"))
    if any(d > MAX_DIM for d in dims):
        raise InputError(f"{where}: shape '{text}' has a dim above {MAX_DIM}")
    return dims


_DIM = re.compile(r"[0-9]+")
#: TensorRT's dims are 64-bit, but no real tensor has an axis past int32.
MAX_DIM = 2**31 - 1


def parse_override(text: str) -> InputShapes:
    """``NAME:MIN:OPT:MAX`` (shapes like ``1x1x512``); NAME may itself contain ':'."""
    parts = text.rsplit(":", 3)
    if len(parts) != 4 or not parts[0]:
        raise InputError(f"--profile '{text}': expected NAME:MIN:OPT:MAX with shapes like 1x1x512")
    name = parts[0]
    shapes = [parse_shape(part, f"--profile {name}") for part in parts[1:]]
    if len({len(s) for s in shapes}) != 1:
        raise InputError(f"--profile {name}: MIN, OPT and MAX have different ranks")
    _check_order(name, *shapes)
    return InputShapes(name, *shapes)


def parse_dim_range(text: str) -> tuple[str, Range]:
    """``SYMBOL=MIN:OPT:MAX`` as ``(symbol, (min, opt, max))``."""
    symbol, sep, rest = text.partition("=")
    values = rest.split(":")
    if not sep or not symbol or len(values) != 3 or not all(_DIM.fullmatch(v) for v in values):
        raise InputError(f"--dim '{text}': expected SYMBOL=MIN:OPT:MAX (like enc_len=1:1500:1500)")
    low, opt, high = (int(v) if len(v) <= 10 else MAX_DIM + 1 for v in values)
    if high > MAX_DIM:
        raise InputError(f"--dim {symbol}: {high} is above {MAX_DIM}")
    if not low <= opt <= high:
        raise InputError(f"--dim {symbol}: needs MIN <= OPT <= MAX, got {low}:{opt}:{high}")
    return symbol, (low, opt, high)


def _check_order(name: str, low: Shape, opt: Shape, high: Shape) -> None:
    for axis, (a, b, c) in enumerate(zip(low, opt, high, strict=True)):
        if not a <= b <= c:
            raise InputError(f"--profile {name}: axis {axis} needs MIN <= OPT <= MAX, "
                             f"got {a}, {b}, {c}")


def input_dims(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """Each real graph input's dims: an int, a symbol name, or None for an unnamed dynamic dim."""
    initializers = {t.name for t in model.graph.initializer}
    dims: dict[str, list[int | str | None]] = {}
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        dims[value.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0
                            else (d.dim_param or None) for d in shape.dim]
    return dims


def dynamic_inputs(model: onnx.ModelProto) -> dict[str, list[int | str | None]]:
    """The inputs with at least one dim that is not a fixed number."""
    return {n: d for n, d in input_dims(model).items() if any(not isinstance(x, int) for x in d)}


def classify(symbol: str, axis: int, in_context: bool) -> str:
    """``batch``, ``context`` or ``sequence`` for a dim (see the module docstring)."""
    if _BATCH.match(symbol) or (symbol.endswith(f"[{axis}]") and axis == 0):
        return "batch"
    if in_context or _CONTEXT.search(symbol.split("[")[0]):
        return "context"
    return "sequence"


def derive_profile(
    model: onnx.ModelProto,
    overrides: Iterable[str | InputShapes] = (),
    dim_ranges: Mapping[str, Range] | None = None,
    *,
    defaults: DimDefaults = DimDefaults(),
    context_inputs: Iterable[str] | None = None,
) -> Profile:
    """The profile for ``model``'s dynamic inputs (see the module docstring for the rules).

    ``context_inputs`` names the inputs whose non-batch dims are context lengths; by default
    the inputs that feed only cross-attention K/V (``find_attention``'s static inputs).
    """
    dims = input_dims(model)
    parsed = [o if isinstance(o, InputShapes) else parse_override(o) for o in overrides]
    pinned, origins = _pinned_symbols(parsed, dims)
    for symbol, value in (dim_ranges or {}).items():
        if symbol not in pinned:
            pinned[symbol], origins[symbol] = value, f"--dim {symbol}"
    if context_inputs is None:
        context_inputs = _static_inputs(model)
    context = set(context_inputs)
    caps = position_limits(model)
    by_override = {o.name: o for o in parsed}
    shapes: dict[str, InputShapes] = {}
    symbols: dict[str, Range] = {}
    for name, input_dim in dims.items():
        if name in by_override:
            shapes[name] = by_override[name]
            symbols.update({d: pinned[d] for d in input_dim if isinstance(d, str) and d})
            continue
        if all(isinstance(d, int) for d in input_dim):
            continue
        ranges = []
        for axis, dim in enumerate(input_dim):
            if isinstance(dim, int):
                ranges.append((dim, dim, dim))
                continue
            symbol = dim or f"{name}[{axis}]"
            if symbol not in pinned:
                kind = classify(symbol, axis, name in context and axis > 0)
                pinned[symbol], origins[symbol] = defaults.of(kind), f"default {kind}"
                if symbol in caps and caps[symbol][0] < pinned[symbol][2]:
                    cap, table = caps[symbol]
                    pinned[symbol] = tuple(min(v, cap) for v in pinned[symbol])
                    origins[symbol] += f", capped at {cap} by position table '{table}'"
            symbols[symbol] = pinned[symbol]
            ranges.append(pinned[symbol])
        shapes[name] = InputShapes(name, *(tuple(r[i] for r in ranges) for i in range(3)))
    return Profile(shapes, symbols, {s: origins[s] for s in symbols})


def _pinned_symbols(parsed: list[InputShapes], dims: Mapping[str, list]) -> tuple[dict, dict]:
    pinned: dict[str, Range] = {}
    origins: dict[str, str] = {}
    for override in parsed:
        if override.name not in dims:
            known = ", ".join(dims) or "none"
            raise InputError(f"--profile names '{override.name}', which is not an input of the "
                             f"model (inputs: {known})")
        model_dims = dims[override.name]
        if len(model_dims) != len(override.min):
            raise InputError(f"--profile {override.name}: rank {len(override.min)} but the input "
                             f"has rank {len(model_dims)} ({model_dims})")
        for axis, dim in enumerate(model_dims):
            value = (override.min[axis], override.opt[axis], override.max[axis])
            if isinstance(dim, int):
                if value != (dim, dim, dim):
                    raise InputError(f"--profile {override.name}: axis {axis} is fixed at {dim} "
                                     f"in the model, got {value}")
                continue
            if not dim:
                continue
            if dim in pinned and pinned[dim] != value:
                raise InputError(f"--profile {override.name}: dim '{dim}' (axis {axis}) is "
                                 f"{value} but {origins[dim]} gives {pinned[dim]}")
            pinned[dim], origins[dim] = value, f"--profile {override.name}"
    return pinned, origins


def _static_inputs(model: onnx.ModelProto) -> list[str]:
    from ..attention import find_attention

    names: list[str] = []
    for block in find_attention(model):
        names.extend(n for n in block.static_inputs if n not in names)
    return names


_POSITION_PATH_OPS = {"Add", "Expand", "Unsqueeze", "Squeeze", "Tile", "Cast", "Reshape", "Slice",
                      "Range"}


def position_limits(model: onnx.ModelProto) -> dict[str, tuple[int, str]]:
    """``symbol -> (largest valid size, table node)`` from learned position tables.

    A table is a Gather/GatherND whose data is a constant of R rows and whose indices come
    from a ``Range`` through reshaping ops and constant ``Add``s; the dims of the indices (and
    the dim the Range's limit reads through ``Shape``) can then reach at most R minus the
    constant offsets and the Range's start.
    """
    from ..ir import import_graph, infer_shapes

    graph = import_graph(infer_shapes(model))
    # Only the inputs' symbols matter to a profile (inference invents others, like unk__0).
    named = {d for dims in input_dims(model).values() for d in dims if isinstance(d, str)}
    limits: dict[str, tuple[int, str]] = {}
    for node in graph.nodes:
        if node.op not in ("Gather", "GatherND") or node.attrs.get("axis", 0) != 0:
            continue
        table = constant_value(node.inputs[0])
        found = _range_offset(node.inputs[1]) if table is not None else None
        if found is None:
            continue
        offset, range_node = found
        cap = int(table.shape[0]) - offset
        symbols = {d for d in node.inputs[1].shape or () if isinstance(d, str)}
        symbols |= {_limit_symbol(range_node.inputs[1])} - {None}
        for dim in symbols & named:
            if not _BATCH.match(dim) and cap > 0 and (dim not in limits or cap < limits[dim][0]):
                limits[dim] = (cap, node.name or node.op)
    return limits


def _range_offset(tensor: Any, depth: int = 0) -> tuple[int, Any] | None:
    """``(constant added to a Range, the Range)`` on the way to ``tensor``, else None."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op not in _POSITION_PATH_OPS or depth > 8:
        return None
    if node.op == "Range":
        start = constant_value(node.inputs[0])
        return (int(start), node) if start is not None and start.size == 1 else None
    if node.op != "Add":
        # Reshaping ops carry the positions in input 0; their other inputs are shapes.
        return _range_offset(node.inputs[0], depth + 1)
    values = [constant_value(t) for t in node.inputs]
    if sum(v is None for v in values) != 1:
        return None
    addend = next(v for v in values if v is not None)
    below = _range_offset(node.inputs[values.index(None)], depth + 1)
    if below is None or addend.size != 1:
        return None
    return below[0] + int(addend.reshape(-1)[0]), below[1]


def _limit_symbol(tensor: Any, depth: int = 0) -> str | None:
    """The symbolic dim a Range limit reads: ``Gather(Shape(x), k)`` through casts/squeezes."""
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or depth > 4:
        return None
    if node.op in ("Squeeze", "Unsqueeze", "Cast", "Reshape"):
        return _limit_symbol(node.inputs[0], depth + 1)
    if node.op == "Gather" and node.inputs[0].inputs and node.inputs[0].inputs[0].op == "Shape":
        index = constant_value(node.inputs[1])
        shape = node.inputs[0].inputs[0].inputs[0].shape
        if index is not None and index.size == 1 and shape is not None:
            dim = shape[int(index.reshape(-1)[0])]
            return dim if isinstance(dim, str) else None
    return None
