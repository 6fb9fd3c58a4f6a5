"""Numerical proof of a rewrite: run both models in ONNX Runtime and compare every output.

``verify(reference, candidate)`` feeds both models exactly the same arrays (drawn at random from
the reference's inputs, given as a dict, or read from an ``.npz``), runs them on the CPU with
ONNX Runtime's graph optimizations switched off, and compares the outputs with dtype-aware
tolerances. A candidate that does not load or run is a failed check, not a crash; a reference
that does not load or run is the user's problem and raises :class:`InputError`.

Optimizations are off because the check must judge the graph as written: ORT's own fusions
have failed correct graphs (and could equally hide a broken one behind a rewrite of their own).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16/float8 with numpy, so np.dtype("bfloat16") works)
import numpy as np
import onnx
import onnxruntime as ort

from . import io as xio
from .errors import InputError, ModelLoadError
from .weights import has_stubs, materialize

log = logging.getLogger(__name__)

ModelLike = onnx.ModelProto | str | os.PathLike

#: Default size of a symbolic dim whose name mentions a batch.
DEFAULT_BATCH = 2
#: Default size of any other named dim (sequence lengths, heads...).
DEFAULT_DIM = 3
#: Size of a dim that has neither a value nor a name.
ANONYMOUS_DIM = 2
#: Integer inputs with no better clue are drawn from [0, DEFAULT_INT_HIGH).
DEFAULT_INT_HIGH = 4

# Ops that carry index values through unchanged, so an input reaching a Gather's indices
# through them must still respect the table's size.
_INDEX_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity"})
_DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
# Denominator floor of the relative error where the reference is 0. float32's smallest normal
# rather than float64's: float64's turns any difference above ~4 into inf, which is no number.
_REL_FLOOR = float(np.finfo(np.float32).tiny)


class _OrtFailure(Exception):
    """ONNX Runtime refused a model or failed to run it; the message is the error's first line."""


# --- results -------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutputCheck:
    """The comparison of one output. Errors are None when no elementwise comparison was made
    (dtype or shape differ, or the output is missing)."""

    name: str
    dtype: str
    shape: tuple
    max_abs_error: float | None
    max_rel_error: float | None
    rtol: float
    atol: float
    ok: bool
    reason: str | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (the shape as a list)."""
        return {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error,
            "rtol": self.rtol, "atol": self.atol, "ok": self.ok, "reason": self.reason,
        }


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of :func:`verify`.

    ``reason`` explains a failure that concerns the model as a whole (the candidate did not
    load or run, its inputs or output count differ); per-output failures are in ``outputs``.
    """

    ok: bool
    outputs: list[OutputCheck]
    input_shapes: dict[str, tuple]
    reason: str | None = None

    def to_dict(self) -> dict:
        """A JSON-serialisable dict."""
        return {
            "ok": self.ok,
            "reason": self.reason,
            "input_shapes": {name: list(shape) for name, shape in self.input_shapes.items()},
            "outputs": [check.to_dict() for check in self.outputs],
        }

    def summary(self) -> str:
        """A human-readable table: a verdict line, the input shapes, one line per output."""
        verdict = "PASS" if self.ok else "FAIL"
        lines = [f"verify: {verdict}" + (f": {self.reason}" if self.reason else "")]
        if self.input_shapes:
            shapes = ", ".join(f"{n} {_fmt_shape(s)}" for n, s in self.input_shapes.items())
            lines.append(f"inputs: {shapes}")
        if self.outputs:
            header = ("output", "dtype", "shape", "max abs err", "max rel err", "tolerance",
                      "result")
            rows = [header] + [_summary_row(check) for check in self.outputs]
            widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
            for row in rows:
                # The last column (result) is not padded: it has no column to its right.
                cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
                lines.append("  ".join(cells + [row[-1]]).rstrip())
        return "\n".join(lines)


def _summary_row(check: OutputCheck) -> tuple[str, ...]:
    tolerance = "exact" if check.rtol == 0 and check.atol == 0 else (
        f"rtol={check.rtol:.1e} atol={check.atol:.1e}")
    result = "PASS" if check.ok else "FAIL"
    if check.reason:
        result += f" ({check.reason})"
    return (check.name, check.dtype, _fmt_shape(check.shape), _fmt_err(check.max_abs_error),
            _fmt_err(check.max_rel_error), tolerance, result)


def _fmt_shape(shape: tuple) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _fmt_err(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


# --- tolerances ----------------------------------------------------------------------------

def default_tolerances(dtype) -> tuple[float, float]:
    """``(rtol, atol_factor)`` for outputs of ``dtype``; the absolute tolerance is
    ``atol_factor * max(1, max|reference|)`` so it follows the output's magnitude.

    Integers and bools compare exactly: ``(0.0, 0.0)``. ``dtype`` may be anything
    ``numpy.dtype`` accepts (bfloat16 included) or an ONNX ``TensorProto`` data type.
    """
    name = _np_dtype(dtype).name
    if name in ("float32", "float64"):
        return 1e-3, 1e-4
    if name in ("float16", "bfloat16"):
        return 2e-2, 2e-2
    if _is_float(_np_dtype(dtype)):
        # float8 and smaller keep 2-3 mantissa bits: one rounding step is 12-25 %.
        return 0.25, 0.25
    return 0.0, 0.0


def _np_dtype(dtype) -> np.dtype:
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
    return np.dtype(dtype)


def _is_float(dtype: np.dtype) -> bool:
    # ml_dtypes floats (bfloat16, float8_*) have numpy kind "V", so look at the name too.
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def _computed_precision(model: ModelLike) -> dict[str, np.dtype]:
    """Float outputs computed from a float16 or bfloat16 value -> that narrower type.

    Such an output cannot be more exact than the half-precision value it depends on: a rewrite
    that changes that computation by one half-precision rounding moves it by that much, whatever
    the output's own type. One pass over the (topologically sorted) nodes: a tensor depends on
    a half value when it is one or any input of its producer does.
    """
    try:
        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(
            str(model), load_external_data=False)
    except Exception:  # not readable here: ONNX Runtime already ran it; keep output dtypes
        return {}
    from .ir import _skeleton

    try:  # value types of intermediate tensors, from the weightless skeleton
        graph = onnx.shape_inference.infer_shapes(_skeleton(proto)).graph
    except Exception:
        graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*graph.input, *graph.value_info, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    narrow = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    half: dict[str, int] = {name: t for name, t in types.items() if t in narrow}
    for node in graph.node:
        inherited = next((half[i] for i in node.input if i in half), None)
        for out in node.output:
            if out not in half and inherited is not None:
                half[out] = inherited
    return {value.name: _np_dtype(half[value.name]) for value in graph.output
            if value.name in half and types.get(value.name) not in narrow}


# --- running models ------------------------------------------------------------------------

def run_model(model: ModelLike, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run ``model`` (a ModelProto or a path) once in ONNX Runtime on the CPU, optimizations off.

    Keys of ``inputs`` that are not inputs of the model are ignored. Returns the outputs by
    name, in graph-output order. Raises :class:`InputError` naming the model when an input is
    missing or ONNX Runtime cannot load or run it.
    """
    try:
        with _session(model) as session:
            names = [value.name for value in session.get_inputs()]
            return _run(session, _select_inputs(inputs, names))
    except _OrtFailure as exc:
        raise InputError(f"model {_describe(model)}: {exc}") from exc


@contextlib.contextmanager
def _session(model: ModelLike) -> Iterator[ort.InferenceSession]:
    """An ORT CPU session with optimizations off; temporary files live as long as the session."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # errors only: ORT's warnings are noise in a verification
    if isinstance(model, onnx.ModelProto) and has_stubs(model):
        model = materialize(model)  # ONNX Runtime needs the detached weights' bytes
    with contextlib.ExitStack() as stack:
        try:
            runnable = _without_plugins(model)
        except InputError as exc:  # a plugin node without a spec: this model cannot run here
            raise _OrtFailure(str(exc)) from exc
        source = _session_source(runnable, stack)
        try:
            session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises several unrelated pybind exception types
            raise _OrtFailure(_first_line(exc)) from exc
        yield session


def _without_plugins(model: ModelLike) -> ModelLike:
    """``model`` with TensorRT plugin nodes spelled in standard ops (ORT cannot load plugins;
    see ``xattn_compiler.plugins.decompose``); any other model unchanged."""
    from .plugins import decompose_plugins, has_plugin_nodes

    proto = model
    if not isinstance(model, onnx.ModelProto):
        if not Path(model).is_file():
            return model
        try:  # the nodes are enough to decide; the weights only when it has plugin nodes
            proto = onnx.load(str(model), load_external_data=False)
        except Exception:  # not loadable: ORT reports it in its own words
            return model
        if not has_plugin_nodes(proto):
            return model
        proto = onnx.load(str(model))
    elif not has_plugin_nodes(model):
        return model
    return decompose_plugins(proto)


def _session_source(model: ModelLike, stack: contextlib.ExitStack) -> str | bytes:
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise _OrtFailure(f"{path}: no such file")
        return str(path)
    # Looked up on the module at call time so that the limit can be lowered in tests.
    if xio.weight_bytes(model) < xio.PROTOBUF_LIMIT:
        return model.SerializeToString()
    # Too big for one protobuf message: ORT must read the weights from an external data file.
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="xattn-verify-")))
    path = xio.save(model, tmp / "model.onnx", external_data=True)
    log.debug("verify: wrote a model with external data to %s for ONNX Runtime", path)
    return str(path)


def _run(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    arrays = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
    try:
        # OrtValues (not session.run) because ORT's numpy bridge rejects bfloat16 and float8.
        feeds = {name: _to_ort_value(array) for name, array in arrays.items()}
        values = session.run_with_ort_values(None, feeds)
    except Exception as exc:  # ORT raises several unrelated pybind exception types
        raise _OrtFailure(_first_line(exc)) from exc
    names = [output.name for output in session.get_outputs()]
    return {name: _from_ort_value(name, value) for name, value in zip(names, values, strict=True)}


def _to_ort_value(array: np.ndarray) -> ort.OrtValue:
    if array.dtype.kind == "V":  # an ml_dtypes type: hand ORT the bits and the ONNX type
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        bits = array.view(np.dtype(f"u{array.dtype.itemsize}"))
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bits, elem_type)
    return ort.OrtValue.ortvalue_from_numpy(array)


def _from_ort_value(name: str, value: ort.OrtValue) -> np.ndarray:
    if not value.is_tensor():
        raise _OrtFailure(f"output '{name}' is not a tensor; only tensor outputs can be compared")
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(value.element_type()))
    if dtype.kind != "V":
        return np.array(value.numpy(), copy=True)
    # ORT cannot convert bfloat16/float8 to numpy, so copy the raw bytes out of its buffer.
    shape = tuple(value.shape())
    size = value.tensor_size_in_bytes()
    if size == 0:
        return np.empty(shape, dtype)
    raw = ctypes.string_at(value.data_ptr(), size)
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _describe(model: ModelLike) -> str:
    if isinstance(model, onnx.ModelProto):
        return f"'{model.graph.name or 'unnamed'}' (in memory)"
    return str(model)


# --- inputs --------------------------------------------------------------------------------

def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, by key. Raises :class:`InputError` if it is unreadable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such inputs file")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: cannot read inputs ({_first_line(exc)})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array has no input names
        raise InputError(f"{path}: not an .npz archive of named arrays")
    with data:
        return {key: data[key] for key in data.files}


def _resolve_inputs(
    inputs, reference: ModelLike, names: list[str], seed: int, dims: Mapping[str, int] | None
) -> dict[str, np.ndarray]:
    """The arrays both models get, keyed by the reference's input names."""
    if inputs is None:
        given = random_inputs(reference, seed=seed, dims=dims)
    elif isinstance(inputs, (str, os.PathLike)):
        given = load_inputs(inputs)
    elif isinstance(inputs, Mapping):
        given = inputs
    else:
        raise InputError(f"inputs must be None, a dict or an .npz path, not {type(inputs).__name__}")
    return _select_inputs(given, names)


def _select_inputs(given: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    missing = [name for name in names if name not in given]
    if missing:
        raise InputError(
            "inputs lack " + ", ".join(f"'{n}'" for n in missing)
            + f" (the model needs {', '.join(names)})")
    # Extra keys (such as 'ref:logits' beside the inputs in an .npz) are not inputs: drop them.
    return {name: np.asarray(given[name]) for name in names}


def random_inputs(
    model: ModelLike, *, seed: int = 0, dims: Mapping[str, int] | None = None
) -> dict[str, np.ndarray]:
    """Seeded random values for the model's graph inputs (initializers excluded), in graph order.

    Every symbolic dim gets one size shared by all inputs that name it (so batches agree):
    ``dims[name]`` if given, else 2 for names containing 'batch' and 3 otherwise; dims with
    neither a value nor a name get 2. Floats are standard normal; bools are fair coin flips.
    Integer inputs are ones when the name contains 'mask', ``arange`` along the last axis when
    it contains 'position', in ``[0, rows)`` when they index a Gather over a constant table,
    else in ``[0, 4)``. Raises :class:`InputError` for inputs it cannot invent (strings,
    sequences, unknown rank): pass those explicitly.
    """
    graph = _model_proto(model).graph
    initializers = {tensor.name for tensor in graph.initializer}
    values = [value for value in graph.input if value.name not in initializers]
    sizes = _dim_sizes(values, dict(dims or {}))
    bounds = _gather_bounds(graph)
    rng = np.random.default_rng(seed)
    drawn = {}
    for value in values:
        dtype, shape = _input_spec(value, sizes)
        drawn[value.name] = _draw(value.name, dtype, shape, rng, bounds.get(value.name))
    log.debug("random inputs (seed %d): %s", seed,
              ", ".join(f"{n} {a.dtype}{list(a.shape)}" for n, a in drawn.items()))
    return drawn


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
        raise ModelLoadError(path, f"not a valid ONNX model ({_first_line(exc)})") from exc


def _dim_sizes(values: list[onnx.ValueInfoProto], dims: dict[str, int]) -> dict[str, int]:
    for name, size in dims.items():
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise InputError(f"dims['{name}'] must be a non-negative integer, not {size!r}")
    sizes: dict[str, int] = {}
    for value in values:
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param not in sizes:
                name = dim.dim_param
                default = DEFAULT_BATCH if "batch" in name.lower() else DEFAULT_DIM
                sizes[name] = int(dims.get(name, default))
    unused = sorted(set(dims) - set(sizes))
    if unused:
        log.warning("dims %s name no dynamic dim of the model's inputs", ", ".join(unused))
    return sizes


def _input_spec(value: onnx.ValueInfoProto, sizes: dict[str, int]) -> tuple[np.dtype, tuple]:
    if not value.type.HasField("tensor_type"):
        raise InputError(f"input '{value.name}' is not a tensor; pass its value in inputs")
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise InputError(f"input '{value.name}' has unknown rank; pass its value in inputs")
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"input '{value.name}' has an unsupported element type") from exc
    shape = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif dim.HasField("dim_param"):
            shape.append(sizes[dim.dim_param])
        else:
            shape.append(ANONYMOUS_DIM)
    return dtype, tuple(shape)


def _draw(name: str, dtype: np.dtype, shape: tuple, rng: np.random.Generator,
          bound: int | None) -> np.ndarray:
    lowered = name.lower()
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)
    if _is_float(dtype):
        return np.asarray(rng.standard_normal(shape)).astype(dtype)
    if dtype.kind not in "iu":
        raise InputError(f"cannot invent a value for input '{name}' of type {dtype}; "
                         "pass it in inputs")
    if "mask" in lowered:
        return np.ones(shape, dtype)
    if "position" in lowered:
        positions = np.arange(shape[-1] if shape else 1)
        if bound:
            positions %= bound  # stay inside a position-embedding table shorter than the input
        return np.broadcast_to(positions, shape or (1,)).reshape(shape).astype(dtype)
    high = max(bound, 1) if bound is not None else DEFAULT_INT_HIGH
    return np.asarray(rng.integers(0, high, size=shape)).astype(dtype)


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


# --- verification --------------------------------------------------------------------------

def verify(
    reference: ModelLike,
    candidate: ModelLike,
    *,
    inputs=None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    dims: Mapping[str, int] | None = None,
) -> VerifyResult:
    """Run ``reference`` and ``candidate`` on the same inputs and compare every output.

    ``inputs`` is None (seeded random values, see :func:`random_inputs`; ``seed`` and ``dims``
    apply), a dict of arrays, or the path of an ``.npz`` (keys that are not inputs of the
    reference are ignored). Floats pass when ``|cand - ref| <= atol + rtol * |ref|``
    elementwise, with :func:`default_tolerances` unless ``rtol``/``atol`` are given (a given
    ``atol`` is absolute); NaNs must sit at the same places and infinities must match.
    Integers and bools compare exactly. Outputs pair up by name, or by position when the names
    differ but the counts agree.

    A candidate that ONNX Runtime cannot load or run, or whose inputs differ from the
    reference's, gives ``ok=False`` with the reason. Raises :class:`InputError` when the
    reference cannot be loaded or run or the inputs are unusable.
    """
    # One session at a time: on a multi-gigabyte model two live sessions double the peak.
    with contextlib.ExitStack() as stack:
        try:
            ref_session = stack.enter_context(_session(reference))
        except _OrtFailure as exc:
            raise InputError(
                f"reference model {_describe(reference)} does not load in ONNX Runtime: {exc}"
            ) from exc
        names = [value.name for value in ref_session.get_inputs()]
        feeds = _resolve_inputs(inputs, reference, names, seed, dims)
        try:
            ref_outputs = _run(ref_session, feeds)
        except _OrtFailure as exc:
            raise InputError(
                f"reference model {_describe(reference)} fails in ONNX Runtime: {exc}") from exc
        del ref_session
    with contextlib.ExitStack() as stack:
        cand_outputs, problem = _run_candidate(candidate, feeds, stack)
    input_shapes = {name: tuple(array.shape) for name, array in feeds.items()}
    if problem is not None:
        result = VerifyResult(False, [], input_shapes, problem)
    else:
        checks, problem = _compare_outputs(ref_outputs, cand_outputs, rtol, atol,
                                           _computed_precision(reference))
        ok = problem is None and all(check.ok for check in checks)
        result = VerifyResult(ok, checks, input_shapes, problem)
    log.info("verify %s against %s: %s", _describe(candidate), _describe(reference),
             "PASS" if result.ok else "FAIL")
    return result


def _run_candidate(
    candidate: ModelLike, feeds: dict[str, np.ndarray], stack: contextlib.ExitStack
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The candidate's outputs, or None and the reason it could not produce them."""
    try:
        session = stack.enter_context(_session(candidate))
    except _OrtFailure as exc:
        return None, f"candidate does not load in ONNX Runtime: {exc}"
    wanted = [value.name for value in session.get_inputs()]
    if set(wanted) != set(feeds):
        extra = [name for name in wanted if name not in feeds]
        lacking = [name for name in feeds if name not in wanted]
        parts = []
        if extra:
            parts.append("candidate adds input(s) " + ", ".join(f"'{n}'" for n in extra))
        if lacking:
            parts.append("candidate lacks input(s) " + ", ".join(f"'{n}'" for n in lacking))
        return None, "inputs differ from the reference's: " + "; ".join(parts)
    try:
        return _run(session, feeds), None
    except _OrtFailure as exc:
        return None, f"candidate fails in ONNX Runtime: {exc}"


def _compare_outputs(
    ref: dict[str, np.ndarray], cand: dict[str, np.ndarray],
    rtol: float | None, atol: float | None, precision: dict[str, np.dtype] | None = None,
) -> tuple[list[OutputCheck], str | None]:
    """One check per reference output, and a model-level reason if the output sets differ.

    ``precision`` names outputs computed in a narrower float type than they are returned in
    (see :func:`_computed_precision`); their tolerances are that type's."""
    precision = precision or {}
    if set(ref) == set(cand):
        return [_compare(name, ref[name], cand[name], rtol, atol,
                         precision=precision.get(name)) for name in ref], None
    if len(ref) == len(cand):
        # A rewrite may rename outputs; with equal counts, position is the faithful pairing.
        checks = []
        for ref_name, cand_name in zip(ref, cand, strict=True):
            note = None if ref_name == cand_name else (
                f"matched by position to candidate output '{cand_name}'")
            checks.append(_compare(ref_name, ref[ref_name], cand[cand_name], rtol, atol, note,
                                   precision=precision.get(ref_name)))
        return checks, None
    reason = (f"output count differs: reference has {len(ref)} ({', '.join(ref)}), "
              f"candidate has {len(cand)} ({', '.join(cand)})")
    checks = []
    for name, array in ref.items():
        if name in cand:
            checks.append(_compare(name, array, cand[name], rtol, atol))
        else:
            r, a = _tolerance(array, rtol, atol)
            checks.append(OutputCheck(name, array.dtype.name, tuple(array.shape), None, None,
                                      r, a, False, "missing from the candidate"))
    return checks, reason


def _compare(name: str, ref: np.ndarray, cand: np.ndarray, rtol: float | None,
             atol: float | None, note: str | None = None, precision: np.dtype | None = None
             ) -> OutputCheck:
    r_tol, a_tol = _tolerance(ref, rtol, atol, precision)
    dtype, shape = ref.dtype.name, tuple(ref.shape)
    problem = None
    if cand.dtype != ref.dtype:
        problem = f"dtype differs: reference {ref.dtype.name}, candidate {cand.dtype.name}"
    elif cand.shape != ref.shape:
        problem = (f"shape differs: reference {_fmt_shape(ref.shape)}, "
                   f"candidate {_fmt_shape(cand.shape)}")
    if problem is not None:
        return OutputCheck(name, dtype, shape, None, None, r_tol, a_tol, False,
                           _join(note, problem))
    if _is_float(ref.dtype):
        max_abs, max_rel, problem = _float_errors(ref, cand, r_tol, a_tol)
    else:
        max_abs, max_rel, problem = _exact_errors(ref, cand)
    return OutputCheck(name, dtype, shape, max_abs, max_rel, r_tol, a_tol, problem is None,
                       _join(note, problem))


def _tolerance(ref: np.ndarray, rtol: float | None, atol: float | None,
               precision: np.dtype | None = None) -> tuple[float, float]:
    """Effective ``(rtol, atol)`` for one output: zero for exact types, else the defaults
    (atol scaled by the output's magnitude) overridden by what the user gave. ``precision``:
    the float type the output was computed in, when narrower than its own."""
    if not _is_float(ref.dtype):
        return 0.0, 0.0
    default_rtol, atol_factor = default_tolerances(precision if precision is not None else ref.dtype)
    if atol is None:
        values = np.abs(ref.astype(np.float64))
        finite = values[np.isfinite(values)]
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        atol = atol_factor * scale
    return float(default_rtol if rtol is None else rtol), float(atol)


def _float_errors(ref: np.ndarray, cand: np.ndarray, rtol: float, atol: float
                  ) -> tuple[float, float, str | None]:
    """Max abs/rel error over positions finite in both, and the reason the output fails."""
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    nan_mismatch = np.isnan(r) != np.isnan(c)
    # Equal infinities compare equal; any other pairing with an infinity is a mismatch.
    inf_mismatch = (np.isinf(r) | np.isinf(c)) & ~(np.isnan(r) | np.isnan(c)) & (r != c)
    finite = np.isfinite(r) & np.isfinite(c)
    diff = np.zeros_like(r)
    diff[finite] = np.abs(c[finite] - r[finite])
    rel = diff / np.maximum(np.abs(np.where(finite, r, 0.0)), _REL_FLOOR)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    outside = finite & (diff > atol + rtol * np.abs(np.where(finite, r, 0.0)))
    problems = []
    if nan_mismatch.any():
        problems.append(f"NaN mismatch at {_count(nan_mismatch)}, "
                        f"first at {_first_index(nan_mismatch)}")
    if inf_mismatch.any():
        problems.append(f"inf mismatch at {_count(inf_mismatch)}, "
                        f"first at {_first_index(inf_mismatch)}")
    if outside.any():
        worst = tuple(int(i) for i in
                      np.unravel_index(int(np.argmax(np.where(outside, diff, -1.0))), r.shape))
        problems.append(f"{_count(outside)} out of tolerance, worst at {list(worst)}: "
                        f"reference {r[worst]:.6g}, candidate {c[worst]:.6g}")
    return max_abs, max_rel, "; ".join(problems) or None


def _exact_errors(ref: np.ndarray, cand: np.ndarray) -> tuple[float | None, float | None,
                                                                 str | None]:
    unequal = ref != cand
    problem = None
    if np.any(unequal):
        where = tuple(_first_index(unequal))
        problem = (f"{_count(unequal)} differ (exact comparison), first at {list(where)}: "
                   f"reference {ref[where].item()!r}, candidate {cand[where].item()!r}")
    if ref.dtype.kind not in "biu":
        return None, None, problem  # strings and the like have no numeric error
    diff = np.abs(cand.astype(np.float64) - ref.astype(np.float64))
    rel = diff / np.maximum(np.abs(ref.astype(np.float64)), _REL_FLOOR)
    return (float(diff.max()) if diff.size else 0.0,
            float(rel.max()) if rel.size else 0.0, problem)


def _count(mask: np.ndarray) -> str:
    return f"{int(np.count_nonzero(mask))} of {mask.size} elements"


def _first_index(mask: np.ndarray) -> list[int]:
    return [int(i) for i in np.unravel_index(int(np.flatnonzero(mask)[0]), mask.shape)]


def _join(*parts: str | None) -> str | None:
    text = "; ".join(part for part in parts if part)
    return text or None
