"""Loading and saving models: every check that turns a bad file into one clear line.

``load`` resolves external data, checks the IR version and opsets, checks the graph's structure
(every edge produced, no cycles, every domain imported; If/Loop/Scan bodies included) and runs
``onnx.checker``. ``save`` writes atomically, switches to external data for models whose weights
do not fit a 2 GB protobuf, and refuses to write over a protected path (the input).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import GraphStructureError, ModelLoadError, OutputError
from .ir import iter_tensors, tensor_nbytes
from .structure import check_structure
from .weights import has_stubs, is_stub, source_of, stub_external_data

log = logging.getLogger(__name__)

#: Oldest default-domain opset the pattern library is written for.
MIN_OPSET = 13
#: Protobuf's hard limit is 2 GiB; stay clear of it so the rest of the message fits.
PROTOBUF_LIMIT = 2**31 - 2**26
#: Tensors at least this large go to the external data file when a model needs one.
EXTERNAL_THRESHOLD = 1024
#: Tensors at least this large start at an aligned offset of the data file (mmap-able);
#: smaller ones are packed, so many small tensors do not bloat the file with padding.
ALIGN_THRESHOLD = 2**20


def load(path: str | os.PathLike, *, check: bool = True, lazy_weights: bool = False
         ) -> onnx.ModelProto:
    """Read an ONNX model with its external data and check that it is usable.

    With ``lazy_weights`` the external data is not read: its tensors become detached weights
    (:mod:`xattn_compiler.weights`) that point into the data files, read only where a pass
    needs values, and streamed from there by :func:`save`. The files must then stay unchanged
    while the model is used.

    Raises :class:`ModelLoadError` (an :class:`InputError`) whose one-line message names the
    file and the node, tensor or field at fault; a structural problem keeps the
    :class:`GraphStructureError` as ``__cause__``. An acyclic graph whose nodes are out of order
    (bodies included) is sorted.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(path, "no such file")
    if not path.is_file():
        raise ModelLoadError(path, "not a file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read the file ({exc.strerror or exc})") from exc
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(path, f"not a valid ONNX model (truncated or corrupt: {exc})") from exc
    _check_header(model, path)
    _load_external_data(model, path, read=not lazy_weights)
    if check:
        try:
            check_structure(model)
        except GraphStructureError as exc:
            raise ModelLoadError(path, str(exc)) from exc
        _run_checker(model, path)
    return model


def _check_header(model: onnx.ModelProto, path: Path) -> None:
    # A protobuf parser accepts many non-ONNX byte strings as a message with unknown fields,
    # so "it parsed" proves little: a real model has an IR version and a graph.
    if model.ir_version == 0 or not model.HasField("graph"):
        raise ModelLoadError(path, "not an ONNX model (no IR version or no graph)")
    if model.ir_version > onnx.IR_VERSION:
        raise ModelLoadError(
            path,
            f"IR version {model.ir_version} is newer than this onnx package supports "
            f"({onnx.IR_VERSION}); upgrade onnx",
        )
    opset = default_opset(model)
    if opset is None:
        raise ModelLoadError(path, "the model imports no default-domain ('ai.onnx') opset")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ModelLoadError(
            path, f"opset {opset} is newer than this onnx package knows ({newest}); upgrade onnx"
        )
    if opset < MIN_OPSET:
        log.warning(
            "%s: opset %d is older than %d; attention patterns are written for opset >= %d "
            "(convert with onnx.version_converter first)", path, opset, MIN_OPSET, MIN_OPSET,
        )


def _load_external_data(model: onnx.ModelProto, path: Path, read: bool = True) -> None:
    base = path.parent
    if not read:
        _check_external_files(model, path)
        stub_external_data(model, base)
        return
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        try:
            location = external_data_helper.ExternalDataInfo(tensor).location
            if not (base / location).is_file():
                raise ModelLoadError(
                    path, f"tensor '{tensor.name}' refers to external data file '{location}', "
                    f"which is missing (looked for {base / location})",
                )
            external_data_helper.load_external_data_for_tensor(tensor, str(base))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelLoadError(
                path, f"tensor '{tensor.name}': cannot read its external data: {exc}"
            ) from exc
        # Older onnx releases leave these to the caller.
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _check_external_files(model: onnx.ModelProto, path: Path) -> None:
    for tensor in _all_tensors(model):
        if external_data_helper.uses_external_data(tensor) and not is_stub(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            file = path.parent / info.location
            if not file.is_file():
                raise ModelLoadError(
                    path, f"tensor '{tensor.name}' refers to external data file "
                    f"'{info.location}', which is missing (looked for {file})")
            end = (info.offset or 0) + (info.length or 0)
            if end > file.stat().st_size:
                raise ModelLoadError(
                    path, f"tensor '{tensor.name}': its external data ends at byte {end}, past "
                    f"the end of '{info.location}' ({file.stat().st_size} bytes)")


#: Models with this many bytes of weights or more are checked as a view without their large
#: weights (each weight checked on its own): ``check_model`` serialises its argument, one more
#: copy of every weight at load, the peak of a whole run on a decoder stored inline.
CHECK_VIEW_BYTES = 64 << 20
_VIEW_THRESHOLD = 2**20


def _run_checker(model: onnx.ModelProto, path: Path) -> None:
    try:
        if weight_bytes(model) < CHECK_VIEW_BYTES and not has_stubs(model):
            onnx.checker.check_model(model)
        else:
            # A view without the large weights (re-checking the file would see the graph as
            # stored, before any sorting); the weights the view leaves out, one at a time.
            for tensor in model.graph.initializer:
                if not is_stub(tensor) and tensor_nbytes(tensor) >= _VIEW_THRESHOLD:
                    onnx.checker.check_tensor(tensor)
            onnx.checker.check_model(checker_view(model, _VIEW_THRESHOLD))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(path, f"invalid model: {first}") from exc


def checker_view(model: onnx.ModelProto, threshold: int = 2**20) -> onnx.ModelProto:
    """A copy of ``model`` whose top-level initializers of ``threshold`` bytes or more, and
    detached weights (:mod:`xattn_compiler.weights`), are graph inputs of the same type and
    shape (all the checker needs); the weights are not copied.
    """
    view = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(view, field, value)
    inputs = {v.name for v in model.graph.input}
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(view.graph, field, value)
    for tensor in model.graph.initializer:
        if tensor_nbytes(tensor) < threshold and not is_stub(tensor):
            view.graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in inputs:
            view.graph.input.append(
                onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            )
    return view


def _copy_field(target, field, value) -> None:
    # Told apart by behaviour: FieldDescriptor.label is gone from recent protobuf releases.
    current = getattr(target, field.name)
    if hasattr(current, "extend"):
        current.extend(value)
    elif hasattr(current, "CopyFrom"):
        current.CopyFrom(value)
    else:
        setattr(target, field.name, value)


def default_opset(model: onnx.ModelProto) -> int | None:
    """The model's default-domain opset version, or None when it imports none."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    protect: str | os.PathLike | Iterable[str | os.PathLike] = (),
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``protect`` lists paths that must never be written (the input model; one path may be given
    bare); writing to one of them, through any spelling or link, or to an external data file of
    one of them, raises :class:`OutputError`. ``external_data`` defaults to "when the weights
    do not fit one protobuf"; the data file is ``<name>.data`` beside the model. ``model`` is
    not modified. The model (and data) file is written to a temporary folder beside ``path``
    and renamed into place, so a failure leaves any previous file at ``path`` as it was and no
    temporary file behind. An ``OSError`` (no space, no permission) becomes an ``OutputError``.
    """
    path = Path(path)
    if isinstance(protect, (str, os.PathLike)):
        protect = [protect]
    guarded = _protected_files(protect)
    _refuse_protected(path, guarded)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, not a model file")
    _refuse_unloaded_external_data(model, path)
    stubbed = has_stubs(model)
    if external_data is None or stubbed:  # detached weights are written from where they are
        external_data = stubbed or weight_bytes(model) >= PROTOBUF_LIMIT
    data_name = f"{path.name}.data"
    data_path = path.parent / data_name
    if external_data:
        _refuse_protected(data_path, guarded)
        if data_path.is_dir():
            raise OutputError(f"{data_path}: is a directory, not an external data file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
            tmp_model = Path(tmp) / path.name
            if stubbed:
                _save_detached(model, tmp_model, data_name)
                os.replace(Path(tmp) / data_name, data_path)
            elif external_data:
                _save_external(model, tmp_model, data_name)
                os.replace(Path(tmp) / data_name, data_path)
            else:
                _write_file(tmp_model, _serialize(model))
            os.replace(tmp_model, path)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write the model ({exc.strerror or exc})") from exc
    return path


def _serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _protected_files(protect: Iterable[str | os.PathLike]) -> list[tuple[str, Path]]:
    """``(why, path)`` for every protected model and every external data file it refers to."""
    files: list[tuple[str, Path]] = []
    for item in protect:
        model_path = Path(item)
        files.append(("the input model", model_path))
        files.append((f"external data of the input {item}", model_path.with_name(
            model_path.name + ".data")))
        for location in _external_locations(model_path):
            files.append((f"external data of the input {item}", model_path.parent / location))
    return files


def _external_locations(model_path: Path) -> set[str]:
    """External data files a model refers to; empty when it is not a readable ONNX file.

    A model with external data has a small protobuf, so one larger than the limit below holds
    its weights inline and is not parsed again just to find none.
    """
    try:
        if not model_path.is_file() or model_path.stat().st_size > 64 * 2**20:
            return set()
        model = onnx.load_model(str(model_path), load_external_data=False)
    except (OSError, DecodeError, RuntimeError, ValueError):
        return set()
    return {
        external_data_helper.ExternalDataInfo(t).location
        for t in _all_tensors(model)
        if external_data_helper.uses_external_data(t)
    }


def _refuse_protected(path: Path, guarded: list[tuple[str, Path]]) -> None:
    target = path.resolve()
    for why, item in guarded:
        resolved = item.resolve()
        if target == resolved or (
            target.exists() and resolved.exists() and target.samefile(resolved)
        ):
            raise OutputError(f"{path}: refusing to write over {why}")


def _refuse_unloaded_external_data(model: onnx.ModelProto, path: Path) -> None:
    for tensor in _all_tensors(model):
        if external_data_helper.uses_external_data(tensor) and not is_stub(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            raise OutputError(
                f"{path}: tensor '{tensor.name}' still refers to external data '{location}' "
                "(load the model with xattn_compiler.io.load, which reads external data)"
            )


def _save_external(model: onnx.ModelProto, tmp_model: Path, data_name: str) -> None:
    """Serialize with large tensors in ``data_name``, restoring ``model`` afterwards.

    The moved bytes are not kept in memory (a copy of every weight would double the peak for
    exactly the models that need external data). The data file is written and synced first,
    without touching ``model``; only then are tensors pointed at it for serialisation, and each
    gets its bytes back from that complete file. Tensors that held typed fields instead of
    ``raw_data`` (rare for large weights) are backed up whole instead.
    """
    data_path = tmp_model.parent / data_name
    placed: list[tuple[onnx.TensorProto, int, int]] = []
    with open(data_path, "wb") as data:
        for tensor in _all_tensors(model):
            raw = _raw_bytes(tensor)
            if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                continue
            offset = _align(data) if len(raw) >= ALIGN_THRESHOLD else data.tell()
            data.write(raw)
            placed.append((tensor, offset, len(raw)))
            del raw
        data.flush()
        os.fsync(data.fileno())
    moved: list[tuple[onnx.TensorProto, int, int, int | None, onnx.TensorProto | None]] = []
    try:
        for tensor, offset, length in placed:
            backup = None
            if not tensor.HasField("raw_data"):
                backup = onnx.TensorProto()
                backup.CopyFrom(tensor)
            location = tensor.data_location if tensor.HasField("data_location") else None
            moved.append((tensor, offset, length, location, backup))
            _point_to_external(tensor, data_name, offset, length)
        _write_file(tmp_model, _serialize(model))
    finally:
        _restore(moved, data_path)


def _save_detached(model: onnx.ModelProto, tmp_model: Path, data_name: str) -> None:
    """Serialize a model with detached weights: each weight's bytes go from where they are (the
    original tensor or the input's data file) straight into ``data_name``; the protobuf written
    is a copy of the (light) model pointing there. No full protobuf is ever built."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    data_path = tmp_model.parent / data_name
    with open(data_path, "wb") as data:
        for tensor in _all_tensors(out):
            source = source_of(tensor)
            raw = source.raw() if source is not None else _raw_bytes(tensor)
            if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                continue
            offset = _align(data) if len(raw) >= ALIGN_THRESHOLD else data.tell()
            data.write(raw)
            _point_to_external(tensor, data_name, offset, len(raw))
            del raw
        data.flush()
        os.fsync(data.fileno())
    _write_file(tmp_model, _serialize(out))


def _restore(moved, data_path: Path) -> None:
    if not moved:
        return
    with open(data_path, "rb") as data:
        for tensor, offset, length, location, backup in moved:
            if backup is not None:
                tensor.CopyFrom(backup)
                continue
            data.seek(offset)
            tensor.raw_data = data.read(length)
            del tensor.external_data[:]
            if location is None:
                tensor.ClearField("data_location")
            else:
                tensor.data_location = location


def _raw_bytes(tensor: onnx.TensorProto) -> bytes | None:
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()


def _align(f, alignment: int = 65536) -> int:
    # Offsets aligned to the allocation granularity (64 KiB on Windows, a multiple of the page
    # size elsewhere) let runtimes mmap each large tensor.
    pos = f.tell()
    pad = (-pos) % alignment
    if pad:
        f.write(b"\0" * pad)
    return pos + pad


def _point_to_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key = key
        entry.value = str(value)
    tensor.data_location = onnx.TensorProto.EXTERNAL


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes held by initializers and Constant values, subgraphs included."""
    total = 0
    for tensor in _all_tensors(model):
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:
            total += tensor.ByteSize()
    return total


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from iter_tensors(model)
