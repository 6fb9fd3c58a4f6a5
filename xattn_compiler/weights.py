"""Weights kept out of the graph while passes run: detached tensors and lazily read files.

Passes exchange ``onnx.ModelProto`` and every pass imports and exports the graph. With the
weights inside the protobuf, each export copies them (about 10 s and a few GB per pass on an
SD-1.5-sized UNet's 3.4 GB); passes never change a large weight, they only move it along. So
large initializers are *detached*: the model passes carry a stub per tensor (name, type, dims,
``data_location=EXTERNAL`` with a ``location`` of :data:`STUB_PREFIX`...), and a
:class:`WeightStore` holds where the bytes really are:

* in memory, the original tensor of the model that was detached (no copy is made);
* on disk, a byte range of an external data file (``load(path, lazy_weights=True)``), read
  through ``numpy.memmap`` only if something needs the values.

Reading a stub's values works everywhere graphsurgeon is used (its lazily loaded constants
resolve stubs through the store), so a pass that does need a weight (interleaving K and V for a
plugin) reads it as usual. ONNX Runtime and ``onnx.checker`` never see stubs: the checker runs
on a view with stubs as graph inputs (``io.checker_view``), and ``materialize`` or ``save`` put
the bytes back (``save`` streams them into the output's data file without building the full
protobuf).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

#: Stubs' ``location``; the rest is ``<store id>/<tensor index>``.
STUB_PREFIX = "xattn-detached-weights/"
#: Tensors at least this large are detached: weights, never a shape or a scale a rewrite reads
#: (at 1 MB, an fp16 decoder kept a quarter of its weights inline, copied by every export).
DETACH_TENSOR_BYTES = 64 << 10
#: Models with at least this many bytes in such tensors run their passes detached; below it
#: the copies cost less than the bookkeeping.
DETACH_MODEL_BYTES = 64 << 20

_STORES: weakref.WeakValueDictionary[str, WeightStore] = weakref.WeakValueDictionary()
_PINNED: dict[str, WeightStore] = {}  # stores of lazily loaded files: a few bytes each
_IDS = itertools.count()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class _InMemory:
    tensor: onnx.TensorProto  # a tensor of the model that was detached, never modified

    @property
    def nbytes(self) -> int:
        return len(self.tensor.raw_data) if self.tensor.HasField("raw_data") else self.tensor.ByteSize()

    def array(self) -> np.ndarray:
        return numpy_helper.to_array(self.tensor)

    def raw(self) -> bytes | memoryview:
        if self.tensor.HasField("raw_data"):
            return self.tensor.raw_data
        return numpy_helper.to_array(self.tensor).tobytes()


@dataclass(frozen=True)
class FileRange:
    """A checked byte range of an external data file (``io.load`` checks it fits)."""

    path: Path
    offset: int
    length: int
    data_type: int
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.length

    def array(self) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.data_type)
        count = int(np.prod(self.dims)) if self.dims else 1
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset,
                         shape=(self.length,))
        return np.frombuffer(data, dtype=dtype, count=count).reshape(self.dims)

    def raw(self) -> memoryview:
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.offset,
                         shape=(self.length,))
        return memoryview(data)


class WeightStore:
    """Where the bytes of a model's stubs are; resolves a stub to its values."""

    def __init__(self, pinned: bool = False):
        with _LOCK:
            self.id = f"{next(_IDS)}-{id(self):x}"
        self.sources: list[_InMemory | FileRange] = []
        _STORES[self.id] = self
        if pinned:
            _PINNED[self.id] = self

    def stub(self, target: onnx.TensorProto, source: _InMemory | FileRange) -> None:
        """Turn ``target`` (name, type and dims already set) into a stub for ``source``."""
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                      "uint64_data", "string_data"):
            target.ClearField(field)
        del target.external_data[:]
        entry = target.external_data.add()
        entry.key, entry.value = "location", f"{STUB_PREFIX}{self.id}/{len(self.sources)}"
        target.data_location = onnx.TensorProto.EXTERNAL
        self.sources.append(source)

    @property
    def nbytes(self) -> int:
        return sum(source.nbytes for source in self.sources)


def source_of(tensor: onnx.TensorProto) -> _InMemory | FileRange | None:
    """The bytes behind a stub; None for any other tensor. A stub whose store is gone is an
    error that says so, not a missing file."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    if not location.startswith(STUB_PREFIX):
        return None
    store_id, _, index = location[len(STUB_PREFIX):].rpartition("/")
    store = _STORES.get(store_id)
    if store is None:
        raise RuntimeError(f"tensor '{tensor.name}' is a detached weight whose store no longer "
                           "exists: keep the OptimizeResult (or call materialize) while using it")
    return store.sources[int(index)]


def values_of(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values: a stub's read from its store (memory-mapped for a file range)."""
    source = source_of(tensor) if is_stub(tensor) else None
    if source is not None:
        return np.asarray(source.array())
    return numpy_helper.to_array(tensor)


def is_stub(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value.startswith(STUB_PREFIX) for e in tensor.external_data)


def stubs(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from .ir import iter_tensors

    return (tensor for tensor in iter_tensors(model) if is_stub(tensor))


def has_stubs(model: onnx.ModelProto) -> bool:
    return next(stubs(model), None) is not None


def detachable_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer
               if len(t.raw_data) >= DETACH_TENSOR_BYTES)


def detach(model: onnx.ModelProto, store: WeightStore | None = None
           ) -> tuple[onnx.ModelProto, WeightStore]:
    """A copy of ``model`` whose large top-level initializers are stubs, and their store.

    Built field by field so the weights are never copied; ``model`` is not modified and must
    stay alive (the store reads its tensors).
    """
    from .io import _copy_field

    store = store or WeightStore()
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(light.graph, field, value)
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) >= DETACH_TENSOR_BYTES:
            stub = light.graph.initializer.add()
            stub.name, stub.data_type = tensor.name, tensor.data_type
            stub.dims.extend(tensor.dims)
            if tensor.doc_string:
                stub.doc_string = tensor.doc_string
            store.stub(stub, _InMemory(tensor))
        else:
            light.graph.initializer.add().CopyFrom(tensor)
    return light, store


_COLLECTING: list[WeightStore] = []


@contextlib.contextmanager
def collecting(store: WeightStore | None) -> Iterator[None]:
    """While passes run on a detached model: large constants they compute go to ``store``
    (:func:`new_constant`) rather than into the graph. ``None``: nothing changes."""
    if store is None:
        yield
        return
    _COLLECTING.append(store)
    try:
        yield
    finally:
        _COLLECTING.pop()


def new_constant(name: str, values: np.ndarray):
    """A graphsurgeon constant for values a pass computed (a weight transposed, say): inside
    :func:`collecting` and at least :data:`DETACH_TENSOR_BYTES`, a stub of the collecting store,
    so the exports after it move a stub instead of copying the values; else a plain constant."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues

    values = np.asarray(values, order="C")  # ascontiguousarray would make a scalar 1-d
    if not _COLLECTING or values.nbytes < DETACH_TENSOR_BYTES:
        return gs.Constant(name, values)
    tensor = numpy_helper.from_array(values, name)
    stub = onnx.TensorProto()
    stub.name, stub.data_type = name, tensor.data_type
    stub.dims.extend(tensor.dims)
    _COLLECTING[-1].stub(stub, _InMemory(tensor))
    return gs.Constant(name, LazyValues(stub), data_location=onnx.TensorProto.EXTERNAL)


def materialize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every stub holding its bytes again (one copy of the weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for tensor in stubs(out):
        source = source_of(tensor)
        del tensor.external_data[:]
        tensor.ClearField("data_location")
        tensor.raw_data = bytes(source.raw())
    return out


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    from .ir import iter_tensors

    return iter_tensors(model)


def _install_graphsurgeon_hook() -> None:
    """Let graphsurgeon's lazily loaded constants read stubs (through their store)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    if getattr(LazyValues.load, "_xattn_stub_aware", False):
        return
    original = LazyValues.load

    def load(self):
        source = source_of(self.tensor)
        if source is not None:
            return np.array(source.array())
        return original(self)

    load._xattn_stub_aware = True
    LazyValues.load = load


_install_graphsurgeon_hook()
