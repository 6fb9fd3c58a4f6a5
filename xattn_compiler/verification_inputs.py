"""The inputs a verification runs on: sizes for the symbolic dims, values drawn at those sizes,
and ``.npz`` files read without trusting them.

One draw at one size proves little: with every dim at 3 and batch at 2, masks all ones and
floats of standard-normal size, a rewrite that swaps two dims, breaks at a sequence length of
1, ignores the mask or changes only large values passes. So :func:`input_sets` draws several
sets, one per *binding* (a size for each symbolic dim):

``distinct``
    every dim > 1 and no two dims equal: batch 2, the others 3, 5, 7, 11... in order of
    appearance; floats standard normal.
``decode-step``
    batch 1 and every length 1 (one new token), except dims named as a context, a cache or an
    encoder output (``encoder``, ``past``, ``total``, ``kv``...), which keep their ``distinct``
    sizes; single booleans the other way round.
``reversed``
    batch 3 and other distinct sizes in the reverse order (even numbers, so no size equals one
    of ``distinct``'s); floats spread from 2**-8 to a few units with both signs, the extremes
    always present; integers not bounded by a table drawn from a wider range.

Integers that index a Gather over a constant table span the whole table, first and last rows
included; masks hold both 0 and 1 (position 0 of every row kept, the last masked, so no row
is fully masked); booleans hold both values. Dims whose names are arithmetic over other dims
(``past_sequence_length + 1``, ``2*batch``) get the value of their expression.

A binding the reference model cannot run (two differently named dims that must agree, a
table shorter than a size) falls back to a safer one: ``distinct`` to ``legacy`` (batch 2,
every other dim 3, masks all ones, integers below 4: the single draw of earlier versions),
``decode-step`` to every dim 1, ``reversed`` to batch 3 and every other dim 5.
"""

from __future__ import annotations

import ast
import itertools
import logging
import math
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16/float8 with numpy)
import numpy as np
import onnx

from .errors import InputError, ModelLoadError, first_line

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike

#: Size of a batch dim in the legacy binding (the fallback of ``distinct``).
DEFAULT_BATCH = 2
#: Size of any other named dim in the legacy binding.
DEFAULT_DIM = 3
#: Size of a dim that has neither a value nor a name in the legacy binding.
ANONYMOUS_DIM = 2
#: Integer inputs with no better clue are drawn from [0, DEFAULT_INT_HIGH) (``spread``: 4x that).
DEFAULT_INT_HIGH = 4
#: The input sets :func:`input_sets` draws by profile: ``thorough`` (the default of ``verify``
#: and the CLI) and ``quick`` (one set, for property tests that run verify thousands of times
#: on inputs drawn by their own strategies).
PROFILES = {"thorough": ("distinct", "decode-step", "reversed"), "quick": ("distinct",)}
#: Largest uncompressed size of one ``.npz`` member whose shape the model leaves open.
MAX_MEMBER_BYTES = 2 << 30
#: Largest uncompressed size of all the members read from one ``.npz``.
MAX_TOTAL_BYTES = 8 << 30

_DISTINCT = (3, 5, 7, 11, 13, 17, 19, 23)
_REVERSED = (4, 6, 8, 10, 12, 14, 16, 18)
# Names of dims that are not the new tokens' length: a decode step keeps them above 1.
_CONTEXT_WORDS = ("encoder", "enc_", "past", "total", "context", "memory", "cache", "kv",
                  "key", "src", "source", "all_")
# Largest magnitude of the spread float draw, by how many mantissa bits the type keeps: big
# enough to cross thresholds a normal draw never reaches, small enough that attention scores
# stay well inside the type's range and precision.
_SPREAD_MAX = {"float64": 8.0, "float32": 8.0, "float16": 4.0, "bfloat16": 4.0}
_SPREAD_MAX_NARROW = 2.0
_SPREAD_MIN_EXP = -8
# Ops that carry index values through unchanged, so an input reaching a Gather's indices
# through them must still respect the table's size.
_INDEX_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})


class BindingError(Exception):
    """A binding gives some dim an impossible size (an expression below 0)."""


@dataclass(frozen=True)
class Binding:
    """Sizes for the symbolic dims and how values are drawn at them.

    ``values`` is ``normal``, ``spread`` or ``legacy``; ``flag`` is the value of single-element
    boolean inputs; ``anonymous`` the size of dims with neither a value nor a name;
    ``replaces`` names the binding this one stands in for when the reference could not run it.
    """

    name: str
    dims: dict[str, int]
    values: str = "normal"
    flag: bool = True
    anonymous: int = ANONYMOUS_DIM
    replaces: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class InputSet:
    """One set of arrays for the model's inputs and the binding they were drawn at (``dims``
    is empty for arrays the caller gave)."""

    name: str
    dims: dict[str, int]
    feeds: dict[str, np.ndarray]
    replaces: str | None = None
    input_shapes: dict[str, tuple] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shapes",
                           {name: tuple(a.shape) for name, a in self.feeds.items()})


# --- bindings -----------------------------------------------------------------------------

def binding_plan(model: ModelLike, dims: Mapping[str, int] | None = None,
                 profile: str = "thorough") -> list[list[Binding]]:
    """For each input set of ``profile``, the binding to try first and its fallbacks.

    ``dims`` pins sizes by dim name in every binding. Raises :class:`InputError` for an
    unknown profile or a pinned size that is not a non-negative integer.
    """
    if profile not in PROFILES:
        raise InputError(f"unknown verification profile {profile!r} "
                         f"(known: {', '.join(PROFILES)})")
    pinned = _checked_dims(dims)
    names, expressions = _symbols(_graph_inputs(_model_proto(model)))
    unused = sorted(set(pinned) - set(names) - set(expressions))
    if unused:
        log.warning("dims %s name no dynamic dim of the model's inputs", ", ".join(unused))
    makers = {"distinct": _distinct_plan, "decode-step": _decode_plan, "reversed": _reversed_plan}
    return [[_finish(b, expressions, pinned) for b in makers[name](names)]
            for name in PROFILES[profile]]


def _distinct_plan(names: list[str]) -> list[Binding]:
    sizes = _spread_sizes(names, batch=2, values=_DISTINCT)
    legacy = {n: DEFAULT_BATCH if _is_batch(n) else DEFAULT_DIM for n in names}
    return [Binding("distinct", sizes, "normal", True, 2),
            Binding("legacy", legacy, "legacy", True, ANONYMOUS_DIM, replaces="distinct")]


def _decode_plan(names: list[str]) -> list[Binding]:
    distinct = _spread_sizes(names, batch=2, values=_DISTINCT)
    sizes = {n: distinct[n] if _is_context(n) else 1 for n in names}
    ones = dict.fromkeys(names, 1)
    return [Binding("decode-step", sizes, "normal", False, 1),
            Binding("all-ones", ones, "legacy", False, 1, replaces="decode-step")]


def _reversed_plan(names: list[str]) -> list[Binding]:
    others = [n for n in names if not _is_batch(n)]
    ordered = tuple(reversed(_REVERSED[:len(others)])) or _REVERSED
    sizes = _spread_sizes(names, batch=3, values=ordered)
    uniform = {n: 3 if _is_batch(n) else 5 for n in names}
    return [Binding("reversed", sizes, "spread", True, 3),
            Binding("uniform", uniform, "legacy", True, 3, replaces="reversed")]


def _spread_sizes(names: list[str], batch: int, values: tuple[int, ...]) -> dict[str, int]:
    """Batch dims get ``batch``; the others ``values`` in order (cycling past the end)."""
    others = itertools.cycle(values)
    return {n: batch if _is_batch(n) else next(others) for n in names}


def _finish(binding: Binding, expressions: dict[str, ast.expr], pinned: dict[str, int]
            ) -> Binding:
    sizes = {**binding.dims, **{n: v for n, v in pinned.items() if n in binding.dims}}
    _tie_total_length(sizes, pinned)
    problem = None
    for text, tree in expressions.items():
        try:
            sizes[text] = pinned[text] if text in pinned else _evaluate(tree, sizes)
        except BindingError as exc:
            problem = str(exc)
    return Binding(binding.name, sizes, binding.values, binding.flag, binding.anonymous,
                   binding.replaces, problem)


def _tie_total_length(sizes: dict[str, int], pinned: Mapping[str, int]) -> None:
    """A KV-cache decoder's mask spans the cache and the new tokens: exporters name that dim
    ``total_sequence_length`` (``total``, ...) beside ``past_sequence_length`` and
    ``sequence_length``, and the model only runs when total = past + new. With exactly one
    dim of each kind (and total not pinned), total gets that sum; otherwise nothing is tied
    (a mask of any other length made the reference fail on every set)."""
    totals = [n for n in sizes if "total" in n.lower()]
    pasts = [n for n in sizes if "past" in n.lower() and n not in totals]
    news = [n for n in sizes if not _is_batch(n) and not _is_context(n)]
    if len(totals) == len(pasts) == len(news) == 1 and totals[0] not in pinned:
        sizes[totals[0]] = sizes[pasts[0]] + sizes[news[0]]


def _is_batch(name: str) -> bool:
    return "batch" in name.lower()


def _is_context(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in _CONTEXT_WORDS)


def _checked_dims(dims: Mapping[str, int] | None) -> dict[str, int]:
    for name, size in (dims or {}).items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise InputError(f"dims['{name}'] must be a non-negative integer, not {size!r}")
    return {name: int(size) for name, size in (dims or {}).items()}


def _symbols(values: list[onnx.ValueInfoProto]) -> tuple[list[str], dict[str, ast.expr]]:
    """The atomic dim names in order of appearance, and the names that are expressions over
    other names (each parsed), so that ``past + 1`` follows ``past``."""
    names: list[str] = []
    expressions: dict[str, ast.expr] = {}
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_param") or dim.dim_param in expressions:
                continue
            tree = _expression(dim.dim_param)
            atoms = [dim.dim_param] if tree is None else [
                node.id for node in ast.walk(tree) if isinstance(node, ast.Name)]
            if tree is not None:
                expressions[dim.dim_param] = tree
            names.extend(atom for atom in atoms if atom not in names)
    return names, expressions


def _expression(text: str) -> ast.expr | None:
    """``text`` parsed when it is arithmetic (+ - * //) over names and integers, else None."""
    try:
        tree = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError):
        return None
    allowed = (ast.BinOp, ast.Name, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv,
               ast.Load)
    if not isinstance(tree, ast.BinOp):
        return None
    for node in ast.walk(tree):
        if not isinstance(node, allowed) or (
                isinstance(node, ast.Constant) and type(node.value) is not int):
            return None
    return tree


def _evaluate(tree: ast.expr, sizes: Mapping[str, int]) -> int:
    if isinstance(tree, ast.Name):
        return sizes[tree.id]
    if isinstance(tree, ast.Constant):
        return int(tree.value)
    left, right = _evaluate(tree.left, sizes), _evaluate(tree.right, sizes)
    if isinstance(tree.op, ast.Add):
        value = left + right
    elif isinstance(tree.op, ast.Sub):
        value = left - right
    elif isinstance(tree.op, ast.Mult):
        value = left * right
    else:
        if right == 0:
            raise BindingError(f"dim '{ast.unparse(tree)}' divides by 0")
        value = left // right
    if value < 0:
        raise BindingError(f"dim '{ast.unparse(tree)}' would be {value}")
    return value


# --- drawing ------------------------------------------------------------------------------

def input_sets(model: ModelLike, *, seed: int = 0, dims: Mapping[str, int] | None = None,
               profile: str = "thorough") -> list[list[InputSet]]:
    """For each input set of ``profile``, the arrays drawn at its binding and at each fallback,
    in order (bindings that cannot be evaluated left out): the first one the reference runs
    is the set that counts. :func:`~xattn_compiler.verification.verify` draws the same sets
    lazily with :func:`draw_set`."""
    proto = _model_proto(model)
    return [[draw_set(proto, binding, seed, index, attempt)
             for attempt, binding in enumerate(choices) if binding.problem is None]
            for index, choices in enumerate(binding_plan(proto, dims, profile))]


def draw_set(model: ModelLike, binding: Binding, seed: int, index: int, attempt: int = 0
             ) -> InputSet:
    """Arrays for every graph input at ``binding``, from a generator seeded by
    ``(seed, index, attempt)``: a set does not change when another is added."""
    proto = _model_proto(model)
    rng = np.random.default_rng((seed, index, attempt))
    bounds = _gather_bounds(proto.graph)
    feeds = {v.name: _draw(v, binding, rng, bounds.get(v.name)) for v in _graph_inputs(proto)}
    return InputSet(binding.name, binding.dims, feeds, binding.replaces)


def random_inputs(model: ModelLike, *, seed: int = 0, dims: Mapping[str, int] | None = None
                  ) -> dict[str, np.ndarray]:
    """Seeded random values for the model's graph inputs (initializers excluded), in graph
    order, at the ``distinct`` binding (see the module docstring): batch 2 and the other
    symbolic dims 3, 5, 7... by order of appearance, ``dims`` overriding; dims with neither a
    value nor a name get the batch size. Floats are standard normal, booleans and masks hold
    both values, integers indexing a Gather over a constant table span its rows, positions
    count along the last axis, other integers are in ``[0, 4)``. Raises :class:`InputError`
    for inputs it cannot invent (strings, sequences, unknown rank): pass those explicitly.
    """
    proto = _model_proto(model)
    choices = binding_plan(proto, dims, "quick")[0]
    binding = next((b for b in choices if b.problem is None), None)
    if binding is None:
        raise InputError(f"cannot size the model's inputs: {choices[0].problem}")
    rng = np.random.default_rng(seed)
    bounds = _gather_bounds(proto.graph)
    drawn = {v.name: _draw(v, binding, rng, bounds.get(v.name)) for v in _graph_inputs(proto)}
    log.debug("random inputs (seed %d): %s", seed,
              ", ".join(f"{n} {a.dtype}{list(a.shape)}" for n, a in drawn.items()))
    return drawn


def _graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {tensor.name for tensor in proto.graph.initializer}
    return [value for value in proto.graph.input if value.name not in initializers]


def _draw(value: onnx.ValueInfoProto, binding: Binding, rng: np.random.Generator,
          bound: int | None) -> np.ndarray:
    dtype, shape = _input_spec(value, binding)
    name = value.name.lower()
    legacy = binding.values == "legacy"
    if _is_float(dtype):
        if binding.values == "spread":
            return _draw_spread(shape, rng, dtype)
        return np.asarray(rng.standard_normal(shape)).astype(dtype)
    if dtype != np.bool_ and dtype.kind not in "iu":
        raise InputError(f"cannot invent a value for input '{value.name}' of type {dtype}; "
                         "pass it in inputs")
    if "mask" in name and not (legacy and dtype == np.bool_):
        return (np.ones(shape, np.int64) if legacy else _draw_mask(shape, rng)).astype(dtype)
    if dtype == np.bool_:
        return _draw_flags(shape, rng, None if legacy else binding.flag)
    if "position" in name:
        positions = np.arange(shape[-1] if shape else 1)
        if bound:
            positions %= bound  # stay inside a position-embedding table shorter than the input
        return np.broadcast_to(positions, shape or (1,)).reshape(shape).astype(dtype)
    if bound is not None:
        return _draw_indices(shape, rng, max(bound, 1), not legacy).astype(dtype)
    if binding.values != "spread":
        return np.asarray(rng.integers(0, DEFAULT_INT_HIGH, size=shape)).astype(dtype)
    # Wider, with the top always drawn: a rewrite wrong only for larger counts shows here.
    high = 4 * DEFAULT_INT_HIGH
    values = np.asarray(rng.integers(0, high, size=shape))
    values.reshape(-1)[:1] = high - 1
    return values.astype(dtype)


def _draw_mask(shape: tuple, rng: np.random.Generator) -> np.ndarray:
    """0/1 with both values in every row longer than one: position 0 of the last axis kept
    (so no row is fully masked, and a causal row still sees its first key), the last masked."""
    bits = np.asarray(rng.random(shape) < 0.5).astype(np.int64)
    if bits.ndim == 0:
        return np.ones(shape, np.int64)
    if bits.size:
        bits[..., 0] = 1
        if shape[-1] > 1:
            bits[..., -1] = 0
    return bits


def _draw_flags(shape: tuple, rng: np.random.Generator, flag: bool | None) -> np.ndarray:
    """Booleans: fair coins; unless ``flag`` is None, a single element is ``flag`` and larger
    arrays hold both values."""
    bits = np.asarray(rng.random(shape) < 0.5)
    if flag is None or bits.size == 0:
        return bits
    if bits.size == 1:
        return np.full(shape, flag, np.bool_)
    flat = bits.reshape(-1)
    flat[0], flat[-1] = flag, not flag
    return bits


def _draw_indices(shape: tuple, rng: np.random.Generator, rows: int, ends: bool
                  ) -> np.ndarray:
    """Rows of a table in ``[0, rows)``; with ``ends``, the first and the last row both drawn."""
    ids = np.asarray(rng.integers(0, rows, size=shape))
    if ends and ids.size >= 2:
        flat = ids.reshape(-1)
        flat[0], flat[-1] = 0, rows - 1
    return ids


def _draw_spread(shape: tuple, rng: np.random.Generator, dtype: np.dtype) -> np.ndarray:
    """Magnitudes log-uniform from 2**-8 to the dtype's spread maximum, random signs; the
    largest value of each sign is always present."""
    top = _SPREAD_MAX.get(dtype.name, _SPREAD_MAX_NARROW)
    exponent = rng.uniform(_SPREAD_MIN_EXP, np.log2(top), size=shape)
    signs = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    values = np.asarray(signs * np.exp2(exponent))
    flat = values.reshape(-1)
    flat[:2] = [top, -top][:flat.size]
    return values.astype(dtype)


def _input_spec(value: onnx.ValueInfoProto, binding: Binding) -> tuple[np.dtype, tuple]:
    if not value.type.HasField("tensor_type"):
        raise InputError(f"input '{value.name}' is not a tensor; pass its value in inputs")
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise InputError(f"input '{value.name}' has unknown rank; pass its value in inputs")
    dtype = _elem_dtype(value)
    shape = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            shape.append(binding.dims[dim.dim_param])
        else:
            shape.append(binding.anonymous)
    return dtype, tuple(shape)


def _elem_dtype(value: onnx.ValueInfoProto) -> np.dtype:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"input '{value.name}' has an unsupported element type") from exc


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes floats (bfloat16, float8_*) have numpy kind "V", so look at the name too.
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def _gather_bounds(graph: onnx.GraphProto) -> dict[str, int]:
    """For each graph input that indexes a Gather over a constant table, the table's size
    along the gathered axis (the smallest, if it indexes several).

    Index values pass through Cast/Reshape/Unsqueeze and the like unchanged, so the walk
    follows those ops' data input; anything else may transform the values, so it stops.
    """
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, index))
    tables = _constant_shapes(graph)
    bounds: dict[str, int] = {}
    for value in graph.input:
        stack, seen = [value.name], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for node, index in consumers.get(tensor, []):
                if node.domain not in _DEFAULT_DOMAINS:
                    continue
                if node.op_type == "Gather" and index == 1 and node.input[0] in tables:
                    rows = _gathered_size(node, tables[node.input[0]])
                    if rows is not None:
                        bounds[value.name] = min(rows, bounds.get(value.name, rows))
                elif node.op_type in _INDEX_PASS_THROUGH and index == 0:
                    stack.extend(node.output)
    return bounds


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    shapes = {tensor.name: list(tensor.dims) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _gathered_size(node: onnx.NodeProto, table_shape: list[int]) -> int | None:
    axis = next((attr.i for attr in node.attribute if attr.name == "axis"), 0)
    rank = len(table_shape)
    if not -rank <= axis < rank:
        return None
    return table_shape[axis % rank]


def _model_proto(model: ModelLike) -> onnx.ModelProto:
    """The model's graph; weights are not read from disk because only their shapes matter."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(path, "no such file")
    try:
        return onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf and onnx raise assorted types for a corrupt file
        raise ModelLoadError(path, f"not a valid ONNX model ({first_line(exc)})") from exc


# --- given inputs -------------------------------------------------------------------------

def check_given(given: Mapping[str, np.ndarray], model: ModelLike, names: list[str],
                source: str = "inputs") -> dict[str, np.ndarray]:
    """The arrays for ``names`` out of ``given`` (other keys are ignored), each checked
    against the model's declared input: same element type, same rank, same static sizes.
    ``source`` names where the arrays came from in errors (a file, or "inputs")."""
    missing = [name for name in names if name not in given]
    if missing:
        raise InputError(
            f"{source}: no array for input(s) " + ", ".join(f"'{n}'" for n in missing)
            + f" (the model needs {', '.join(names)})")
    declared = {value.name: value for value in _graph_inputs(_model_proto(model))}
    arrays = {}
    for name in names:
        array = np.asarray(given[name])
        if name in declared:
            array = _conforming(array, declared[name], source)
        arrays[name] = array
    return arrays


def _conforming(array: np.ndarray, value: onnx.ValueInfoProto, source: str) -> np.ndarray:
    """``array`` if it fits the declared input ``value``, else an :class:`InputError`; raw
    2-byte and 1-byte void arrays (how ``np.save`` stores bfloat16 and float8) are viewed as
    the declared type."""
    if not value.type.HasField("tensor_type"):
        return array
    expected = _elem_dtype(value)
    if array.dtype != expected and array.dtype.kind == "V" and not array.dtype.fields \
            and array.dtype.itemsize == expected.itemsize:
        array = array.view(expected)
    declared = _declared_shape(value)
    problems = []
    if array.dtype != expected:
        problems.append(f"element type {array.dtype.name}, the model takes {expected.name}")
    if declared is not None and array.ndim != len(declared):
        problems.append(f"rank {array.ndim} {list(array.shape)}, the model takes rank "
                        f"{len(declared)} {_fmt_declared(declared)}")
    elif declared is not None and any(isinstance(want, int) and want != have
                                      for want, have in zip(declared, array.shape, strict=True)):
        problems.append(f"shape {list(array.shape)}, the model takes {_fmt_declared(declared)}")
    if problems:
        raise InputError(f"{source}: input '{value.name}' has " + "; ".join(problems))
    return array


def _declared_shape(value: onnx.ValueInfoProto) -> list[int | str | None] | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
            for d in tensor_type.shape.dim]


def _fmt_declared(shape: list[int | str | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def load_inputs(path: str | os.PathLike, model: ModelLike | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, by key; with ``model``, only those naming its inputs,
    each checked against the declared input (element type, rank, static sizes).

    The archive is not trusted: pickled (object) arrays are refused, and each member's
    declared uncompressed size is checked before anything is decompressed: against the exact
    size a fully static input needs, else :data:`MAX_MEMBER_BYTES` (and all members together
    against :data:`MAX_TOTAL_BYTES`). Every failure is an :class:`InputError` naming the file
    and the member.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such inputs file")
    declared = None
    if model is not None:
        declared = {value.name: value for value in _graph_inputs(_model_proto(model))}
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: not an .npz archive of named arrays "
                         f"({first_line(exc)})") from exc
    with archive:
        members = _members(archive, declared)
        total = sum(info.file_size for info in members.values())
        if total > MAX_TOTAL_BYTES:
            raise InputError(f"{path}: members would unpack to {total} bytes, more than the "
                             f"{MAX_TOTAL_BYTES}-byte limit for inputs")
        return {key: _read_member(path, archive, info, declared.get(key) if declared else None)
                for key, info in members.items()}


def _members(archive: zipfile.ZipFile, declared: dict | None) -> dict[str, zipfile.ZipInfo]:
    """The archive's members by key (the name without ``.npy``); with ``declared``, only the
    model's inputs: other members are never decompressed."""
    members = {}
    for info in archive.infolist():
        if info.is_dir():
            continue
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        if declared is None or key in declared:
            members[key] = info
    return members


def _read_member(path: Path, archive: zipfile.ZipFile, info: zipfile.ZipInfo,
                 value: onnx.ValueInfoProto | None) -> np.ndarray:
    where = f"{path}: member '{info.filename}'"
    limit = _member_limit(value)
    if info.file_size > limit:
        raise InputError(f"{where} would unpack to {info.file_size} bytes, more than the "
                         f"{limit} bytes {'its input takes' if limit < MAX_MEMBER_BYTES else 'allowed'}")
    try:
        with archive.open(info) as stream:
            dtype, shape, header = _npy_header(stream)
            _check_header(where, dtype, shape, header, info.file_size)
        with archive.open(info) as stream:
            array = np.lib.format.read_array(stream, allow_pickle=False)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, KeyError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile, zlib.error) as exc:
        raise InputError(f"{where}: cannot read ({first_line(exc)})") from exc
    if value is not None:
        array = _conforming(array, value, where)
    return array


def _member_limit(value: onnx.ValueInfoProto | None) -> int:
    """The uncompressed size a member may have: what the input takes when all its sizes are
    static (plus room for the .npy header), else :data:`MAX_MEMBER_BYTES`."""
    if value is None:
        return MAX_MEMBER_BYTES
    declared = _declared_shape(value)
    if declared is None or not all(isinstance(d, int) for d in declared):
        return MAX_MEMBER_BYTES
    try:
        itemsize = _elem_dtype(value).itemsize
    except InputError:
        return MAX_MEMBER_BYTES
    header_room = 64 * 1024
    return min(MAX_MEMBER_BYTES, math.prod(declared) * itemsize + header_room)


def _npy_header(stream) -> tuple[np.dtype, tuple, int]:
    """The dtype, shape and header length of an ``.npy`` stream, reading only the header."""
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported")
    return dtype, tuple(shape), stream.tell()


def _check_header(where: str, dtype: np.dtype, shape: tuple, header: int, size: int) -> None:
    if dtype.hasobject:
        raise InputError(f"{where} is an array of Python objects (pickled); only numeric "
                         "arrays are accepted")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: a lying shape cannot overflow
    if any(d < 0 for d in shape) or header + nbytes != size:
        raise InputError(f"{where} is corrupt: its header declares {dtype.name}"
                         f"{list(shape)} ({nbytes} bytes) but the member holds "
                         f"{size - header} bytes of data")
