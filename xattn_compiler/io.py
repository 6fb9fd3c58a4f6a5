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
from .ir import iter_tensors
from .structure import check_structure

log = logging.getLogger(__name__)

#: Oldest default-domain opset the pattern library is written for.
MIN_OPSET = 13
#: Protobuf's hard limit is 2 GiB; stay clear of it so the rest of the message fits.
PROTOBUF_LIMIT = 2**31 - 2**26
#: Tensors at least this large go to the external data file when a model needs one.
EXTERNAL_THRESHOLD = 1024


def load(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Read an ONNX model with its external data and check that it is usable.

    Raises :class:`ModelLoadError` or :class:`GraphStructureError` with one line naming the
    file, node or tensor at fault. An acyclic graph whose nodes are out of order is sorted.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(path, "no such file")
    if not path.is_file():
        raise ModelLoadError(path, "not a file")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(path, f"not a valid ONNX model (truncated or corrupt: {exc})") from exc
    _check_header(model, path)
    _load_external_data(model, path)
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
        raise ModelLoadError(path, f"opset {opset} is newer than this onnx package knows ({newest})")
    if opset < MIN_OPSET:
        log.warning(
            "%s: opset %d is older than %d; attention patterns are written for opset >= %d "
            "(convert with onnx.version_converter first)", path, opset, MIN_OPSET, MIN_OPSET,
        )


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    base = path.parent
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        data_file = base / info.location
        if not data_file.is_file():
            raise ModelLoadError(
                path, f"tensor '{tensor.name}' refers to external data '{info.location}', "
                f"which is not in {base}",
            )
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(base))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(path, f"tensor '{tensor.name}': {exc}") from exc
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def _run_checker(model: onnx.ModelProto, path: Path) -> None:
    try:
        if weight_bytes(model) < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(path, f"invalid model: {first}") from exc


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
    protect: Iterable[str | os.PathLike] = (),
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``protect`` lists paths that must never be written (the input model); writing to one of them,
    or to the external data file of one of them, raises :class:`OutputError`. ``external_data``
    defaults to "when the weights do not fit one protobuf"; the data file is ``<name>.data``
    beside the model. ``model`` is not modified.
    """
    path = Path(path)
    _refuse_protected(path, protect)
    if path.exists() and path.is_dir():
        raise OutputError(f"{path}: is a directory, not a model file")
    if external_data is None:
        external_data = weight_bytes(model) >= PROTOBUF_LIMIT
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        tmp_model = Path(tmp) / path.name
        data_name = f"{path.name}.data"
        if external_data:
            _refuse_protected(path.parent / data_name, protect)
            _save_external(model, tmp_model, data_name)
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        else:
            with open(tmp_model, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp_model, path)
    return path


def _refuse_protected(path: Path, protect: Iterable[str | os.PathLike]) -> None:
    target = path.resolve()
    for item in protect:
        guarded = Path(item).resolve()
        if target == guarded or (target.exists() and guarded.exists() and target.samefile(guarded)):
            raise OutputError(f"{path}: refusing to write over the input model")
        if target.parent == guarded.parent and target.name.startswith(guarded.name + "."):
            # The input's own external data file (model.onnx.data) is part of the input.
            raise OutputError(f"{path}: refusing to write over external data of the input {item}")


def _save_external(model: onnx.ModelProto, tmp_model: Path, data_name: str) -> None:
    """Serialize with large tensors in ``data_name``, restoring ``model`` afterwards."""
    moved: list[tuple[onnx.TensorProto, onnx.TensorProto]] = []
    data_path = tmp_model.parent / data_name
    try:
        with open(data_path, "wb") as data:
            for tensor in _all_tensors(model):
                raw = _raw_bytes(tensor)
                if raw is None or len(raw) < EXTERNAL_THRESHOLD:
                    continue
                backup = onnx.TensorProto()
                backup.CopyFrom(tensor)
                moved.append((tensor, backup))
                offset = _align(data)
                data.write(raw)
                _point_to_external(tensor, data_name, offset, len(raw))
        with open(tmp_model, "wb") as f:
            f.write(model.SerializeToString())
    finally:
        for tensor, backup in moved:
            tensor.CopyFrom(backup)


def _raw_bytes(tensor: onnx.TensorProto) -> bytes | None:
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()


def _align(f, alignment: int = 4096) -> int:
    # Page-aligned offsets let runtimes mmap each tensor.
    pos = f.tell()
    pad = (-pos) % alignment
    if pad:
        f.write(b"\0" * pad)
    return pos + pad


def _point_to_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                  "uint64_data", "string_data"):
        tensor.ClearField(field)
    external_data_helper.set_external_data(tensor, location, offset=offset, length=length)
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
