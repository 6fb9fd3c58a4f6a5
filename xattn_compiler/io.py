"""Loading and saving models: every check that turns a bad file into one clear line.

``load`` resolves external data (refusing references that leave the model's folder or do not
fit their tensor), checks the IR version and opsets, checks the graph's structure
(every edge produced, no cycles, every domain imported; If/Loop/Scan bodies included) and runs
``onnx.checker``. ``save`` writes atomically, switches to external data for models whose weights
do not fit a 2 GB protobuf, and refuses to write over a protected path (the input).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from . import outputs
from .errors import GraphStructureError, ModelLoadError, OutputError, first_line
from .ir import iter_tensors, packed_nbytes, tensor_nbytes  # noqa: F401  (packed_nbytes: public here too)
from .structure import check_structure
from .validate import check_values
from .weights import DETACH_TENSOR_BYTES, FileRange, WeightStore, has_stubs, is_stub, source_of

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

    Every external data reference is checked first, as ONNX Runtime would: a relative
    location inside the model's folder once symlinks are resolved, a regular file, an integer
    offset and length within it, and exactly the bytes the tensor's type and dims take.

    With ``lazy_weights`` the external data of tensors of :data:`INLINE_BYTES` or more is not
    read: they become detached weights (:mod:`xattn_compiler.weights`) that point into the data
    files, read only where a pass needs values, and streamed from there by :func:`save`. The
    files must then stay unchanged while the model is used. Smaller ones (shapes, axes,
    scales: values a rewrite reads) are read in.

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
            check_values(model)
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
    """Read every external tensor's bytes into the model, or (``read=False``) only those
    under :data:`INLINE_BYTES` and stub the rest. Every reference is checked first: inside
    the model's folder, a regular file, a byte range that exists and fits the tensor."""
    folder = _real(path.parent)
    files: dict[str, Path] = {}
    store = None
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        file, offset, length = _external_range(tensor, path, folder, files)
        if read or length < INLINE_BYTES:
            _read_inline(tensor, path, file, offset, length)
        else:
            store = store or WeightStore(pinned=True)
            store.stub(tensor, FileRange(file, offset, length, tensor.data_type,
                                         tuple(tensor.dims)))


#: Lazily loaded external tensors smaller than this are read at load: shapes, axes and scales
#: are values the passes must see (a stub hides them), and cost nothing to keep inline.
INLINE_BYTES = DETACH_TENSOR_BYTES


def _external_range(tensor: onnx.TensorProto, path: Path, folder: Path,
                    files: dict[str, Path]) -> tuple[Path, int, int]:
    """The checked (file, offset, length) of an external tensor; :class:`ModelLoadError`
    naming the tensor (and its location) for anything ONNX Runtime would refuse or misread."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    name = tensor.name
    location = entries.get("location", "")
    if not location:
        raise ModelLoadError(path, f"tensor '{name}' is stored externally but has no location")
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        raise ModelLoadError(path, f"tensor '{name}' of type "
                             f"{onnx.TensorProto.DataType.Name(tensor.data_type)} cannot be "
                             "stored externally")
    if location not in files:
        files[location] = _external_file(name, location, path, folder)
    file = files[location]
    size = file.stat().st_size
    offset = _external_int(entries, "offset", 0, name, path)
    if offset > size:
        raise ModelLoadError(path, f"tensor '{name}': external data offset {offset} is past the "
                             f"end of '{location}' ({size} bytes)")
    length = _external_int(entries, "length", size - offset, name, path)
    if offset + length > size:
        raise ModelLoadError(path, f"tensor '{name}': its external data ends at byte "
                             f"{offset + length}, past the end of '{location}' ({size} bytes; "
                             "truncated?)")
    expected = packed_nbytes(tensor)
    if expected is not None and length != expected:
        raise ModelLoadError(path, f"tensor '{name}': external data in '{location}' has "
                             f"{length} bytes, but a {_type_text(tensor)} tensor takes "
                             f"{expected}")
    return file, offset, length


def _external_file(name: str, location: str, path: Path, folder: Path) -> Path:
    where = f"tensor '{name}': external data location '{location}'"
    if os.path.isabs(location) or location.startswith(("/", "\\")):
        raise ModelLoadError(path, f"{where} is an absolute path; external data must be in the "
                             f"model's folder ({folder}), named relative to it")
    try:
        file = _real(path.parent / location)
    except ValueError as exc:
        raise ModelLoadError(path, f"{where} is not a valid path ({exc})") from exc
    if file != folder and folder not in file.parents:
        raise ModelLoadError(path, f"{where} is outside the model's folder {folder} (it "
                             f"resolves to {file}); refusing to read it")
    if not file.exists():
        raise ModelLoadError(path, f"tensor '{name}' refers to external data file "
                             f"'{location}', which is missing (looked for {path.parent / location})")
    if not file.is_file():
        raise ModelLoadError(path, f"{where} is not a regular file")
    return file


def _external_int(entries: dict[str, str], key: str, default: int, name: str,
                  path: Path) -> int:
    text = entries.get(key)
    if text is None:
        return default
    try:
        value = int(text, 10)
    except ValueError:
        value = -1
    if value < 0:
        raise ModelLoadError(path, f"tensor '{name}': external data {key} {text!r} is not a "
                             "non-negative integer")
    return value


def _read_inline(tensor: onnx.TensorProto, path: Path, file: Path, offset: int,
                 length: int) -> None:
    try:
        with open(file, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as exc:
        raise ModelLoadError(path, f"tensor '{tensor.name}': cannot read its external data "
                             f"({exc.strerror or exc})") from exc
    if len(data) != length:  # the file shrank since it was checked
        raise ModelLoadError(path, f"tensor '{tensor.name}': cannot read its external data "
                             f"(got {len(data)} of {length} bytes)")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.raw_data = data
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.DEFAULT


def _type_text(tensor: onnx.TensorProto) -> str:
    kind = onnx.TensorProto.DataType.Name(tensor.data_type)
    return f"{kind}{list(tensor.dims)}"


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


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
        raise ModelLoadError(path, f"invalid model: {first_line(exc)}") from exc


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
    protect: str | os.PathLike | Iterable[str | os.PathLike] | outputs.Guard = (),
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``protect`` lists paths that must never be written (the input model; one path may be given
    bare); writing to one of them, through any spelling or link, or to an external data file of
    one of them, raises :class:`OutputError`, as does an existing ``path`` that is not a
    regular file (:mod:`xattn_compiler.outputs`). ``external_data`` defaults to "when the
    weights do not fit one protobuf"; the data file is ``<name>.data`` beside the model.
    ``model`` is not modified. The model (and data) file is written to a staging folder beside
    ``path`` and renamed into place, so a failure leaves any previous files at ``path`` as they
    were and no temporary file behind. An ``OSError`` (no space, no permission) becomes an
    ``OutputError``.
    """
    path = Path(path)
    _refuse_unloaded_external_data(model, path)
    stubbed = has_stubs(model)
    if external_data is None or stubbed:  # detached weights are written from where they are
        external_data = stubbed or weight_bytes(model) >= PROTOBUF_LIMIT
    data_name = f"{path.name}.data"
    with outputs.staged(path.parent, protect, name=path) as stage:
        tmp_model = stage.path(path.name)
        if stubbed:
            _save_detached(model, tmp_model, stage.path(data_name).name)
        elif external_data:
            _save_external(model, tmp_model, stage.path(data_name).name)
        else:
            _write_file(tmp_model, _serialize(model))
        stage.commit()
    return path


def _serialize(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


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
            if raw is None:
                continue
            if len(raw) < EXTERNAL_THRESHOLD:
                if source is not None:  # a small stub: its bytes go inline, not to a stub path
                    _put_inline(tensor, raw)
                continue
            offset = _align(data) if len(raw) >= ALIGN_THRESHOLD else data.tell()
            data.write(raw)
            _point_to_external(tensor, data_name, offset, len(raw))
            del raw
    _write_file(tmp_model, _serialize(out))


def _put_inline(tensor: onnx.TensorProto, raw: bytes | memoryview) -> None:
    del tensor.external_data[:]
    tensor.ClearField("data_location")
    tensor.raw_data = bytes(raw)


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
