"""``simplify-reshapes``: remove the shape bookkeeping exporters leave around every layer.

    Reshape(Reshape(x, s1), s2)      -> Reshape(x, s2')    the middle tensor has no other reader;
                                                           s2's 0s (copies of the middle dims)
                                                           resolved against the middle shape
    Reshape(x, s)                    -> x                  shape(out) == shape(x), dim by dim
                                                           (equal ints or the same symbol)
    Reshape(x, Concat(Shape(x)...))  -> Reshape(x, c)      c constant: ints, 0 where the dim is
                                                           provably x's dim at that position,
                                                           at most one -1 (the element count
                                                           fixes it)
    Squeeze(Unsqueeze(x, a), a)      -> x
    Unsqueeze(Squeeze(x, a), a)      -> x                  x's dims at a are provably 1
    Cast(x, to=dtype(x))             -> x
    Cast(Cast(x, T), dtype(x))       -> x                  T holds every value of dtype(x)
                                                           (fp16 -> fp32 -> fp16; never
                                                           fp32 -> fp16 -> fp32)
    Identity(x)                      -> x

Facts come from ONNX shape inference (symbolic dims, data propagation), which the base runs
right before the rewrite, from the structure of computed targets (``Gather(Shape(x), i)`` is
x's dim ``i``) and from constant targets themselves (``Reshape(x, [0, -1, 4])`` of a
``[B, S, 4]`` x is an identity whatever S is; ONNX cannot propagate an outer constant into an
If/Loop body, so the output shapes it leaves unknown there are filled in from the target).
Symbols are trusted as exporters and shape inference write them: two dims with the same name
are equal. What cannot be proved is left alone.

Dims ONNX cannot infer are filled in (``shapes_refined``), so the passes after this one can
prove what TorchScript exports compute at run time: a computed target read as products of
dims (``Mul(Gather(Shape(h), 0), 4)`` is ``4*B``) names the -1 of a head merge
(``numel(x) / (4*B*D)``); ``Expand`` by a shape built as ``Where(Equal(s, -1), 1, s)``
(torch's ``expand(B, -1)``) keeps its symbols; a broadcast read by a Reshape to exactly as
many elements as one of its inputs has that input's shape. The dims below a refined tensor
are inferred again. ``allowzero`` keeps its meaning: a target with
a literal 0 dim keeps ``allowzero=1``, and a 0 meaning "copy" is only ever written into a
target read with ``allowzero=0``. (A -1 cannot be inferred when another dim is 0, so a target
made constant with a -1 fails on empty tensors where the computed one did not; exporters write
-1 themselves all the time.)

Graph outputs and graph inputs never change: a rewrite that would rename an output is skipped.
A worklist visits each candidate node once, plus once per rewrite next to it, so the pass is
linear in the graph's size. (The base runs the pass again on its output until nothing changes:
what it made constant can make shapes known that were not, so a second call is a no-op.)
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.analysis import constant_eval
from xattn_compiler.ir import (
    constant_value,
    detach,
    fresh_name,
    is_graph_output,
    live_nodes,
    producer,
)
from xattn_compiler.rewrite import GraphPass, only_consumer

log = logging.getLogger(__name__)

_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Cast", "Identity", "Expand"})
#: How deep the walk through a computed target goes (exporters use 3-4 levels).
_MAX_TARGET_DEPTH = 8
#: ``(source, widened)`` ONNX element types where every source value is exact in ``widened``,
#: so casting there and back is the identity.
_F, _D, _H, _BF = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                   onnx.TensorProto.BFLOAT16)
_I8, _I16, _I32, _I64 = (onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                         onnx.TensorProto.INT64)
_U8, _U16, _U32, _U64 = (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                         onnx.TensorProto.UINT32, onnx.TensorProto.UINT64)
_BOOL = onnx.TensorProto.BOOL
_LOSSLESS = {
    _H: {_F, _D}, _BF: {_F, _D}, _F: {_D},
    _I8: {_I16, _I32, _I64, _H, _F, _D}, _U8: {_U16, _U32, _U64, _I16, _I32, _I64, _H, _F, _D},
    _I16: {_I32, _I64, _F, _D}, _U16: {_U32, _U64, _I32, _I64, _F, _D},
    _I32: {_I64, _D}, _U32: {_U64, _I64, _D},
    _BOOL: {_I8, _I16, _I32, _I64, _U8, _U16, _U32, _U64, _H, _BF, _F, _D},
}

#: A target entry: ``("lit", n)`` the literal size n, ``("copy",)`` the input's dim at the
#: same position (a 0 read with allowzero=0), ``("any",)`` the one size a -1 infers.
Entry = tuple


# --- facts about dims ---------------------------------------------------------------------------

def same_dim(a, b) -> bool:
    """Whether two dims are provably equal: the same int, or the same non-empty symbol."""
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return int(a) == int(b) and int(a) >= 0
    return isinstance(a, str) and isinstance(b, str) and bool(a) and a == b


def same_product(a: list, b: list) -> bool:
    """Whether two lists of dims provably multiply to the same: each dim an int, a symbol, or
    a product of them as exporters name dims (``4*b``); ``[b, 4]`` and ``[4*b]`` do."""
    left, right = _named_product(a), _named_product(b)
    return left is not None and left == right


def _named_product(dims: list) -> Monomial | None:
    """The product of ``dims`` as a monomial, reading a symbol named ``4*b`` as ``4 * b``
    (a sum, a quotient or a power in a name is not provable: None)."""
    total: Monomial | None = (1, ())
    for size in dims:
        if isinstance(size, str) and "*" in size:
            factors = [f.strip() for f in size.split("*")]
            if not all(f.isdigit() or f.isidentifier() for f in factors):
                return None
            for factor in factors:
                total = _times(total, _monomial(int(factor) if factor.isdigit() else factor))
        else:
            total = _times(total, _monomial(size))
    return total


def same_shape(a, b) -> bool:
    """Whether two shapes are provably equal dim by dim (both known, same rank)."""
    return (a is not None and b is not None and len(a) == len(b)
            and all(same_dim(x, y) for x, y in zip(a, b, strict=True)))


def dim(tensor: gs.Tensor, axis: int):
    """Dim ``axis`` of ``tensor`` (an int, a symbol or None), None when out of range."""
    shape = tensor.shape
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    return shape[axis]


def rank(tensor: gs.Tensor) -> int | None:
    """The tensor's rank, or None when shape inference does not know it."""
    return len(tensor.shape) if tensor.shape is not None else None


def onnx_dtype(tensor: gs.Tensor) -> int | None:
    """The tensor's ONNX element type, or None when unknown."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, (int, np.integer)):
        return int(dtype)
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    except (KeyError, TypeError, ValueError):
        return None


class Names:
    """Fresh tensor and node names for one graph, derived from a hint (deterministic).

    Collecting a graph's names walks the whole graph; a pass that edits many blocks does it
    once per graph inside ``with Names.shared():`` and gets the same instance from
    :meth:`of` for every block (all its new names must then come from it).
    """

    _scope: ClassVar[dict[int, Names] | None] = None

    def __init__(self, graph: gs.Graph):
        self._graph = graph
        self._taken: tuple[set[str], set[str]] | None = None

    def _collect(self) -> tuple[set[str], set[str]]:
        # Deferred to the first fresh name: most rounds on a large graph need none, and the
        # walk over every tensor is a large share of a round that finds nothing to do.
        if self._taken is None:
            graph = self._graph
            tensors = {t.name for t in (*graph.inputs, *graph.outputs)}
            for node in graph.nodes:
                tensors.update([t.name for t in node.inputs])
                tensors.update([t.name for t in node.outputs])
            self._taken = (tensors, {node.name for node in graph.nodes if node.name})
        return self._taken

    @classmethod
    def of(cls, graph: gs.Graph) -> Names:
        """The graph's shared instance inside :meth:`shared`, else a fresh one."""
        if cls._scope is None:
            return cls(graph)
        if id(graph) not in cls._scope:
            cls._scope[id(graph)] = cls(graph)
        return cls._scope[id(graph)]

    @classmethod
    @contextlib.contextmanager
    def shared(cls) -> Iterator[None]:
        outer, cls._scope = cls._scope, {}
        try:
            yield
        finally:
            cls._scope = outer

    def fresh(self, hint: str, node: bool = False) -> str:
        """An unused tensor name (node name with ``node``) starting with ``hint``."""
        tensors, nodes = self._collect()
        return fresh_name(hint, nodes if node else tensors)


# --- edits ------------------------------------------------------------------------------------
# graphsurgeon keeps each tensor's reader list in sync by ``list.remove``, which compares nodes
# with a deep ``__eq__``: editing the readers of a widely shared tensor (a target constant every
# layer reads) becomes quadratic. These edits unlink by identity instead.

# A constant read all over the graph (the axes of every Unsqueeze) would still cost one scan
# of its reader list per unlinked reader; inside :func:`deferred_unlinks` those unlinks are
# collected and applied in one filter per constant. Only constants: nothing a rewrite decides
# depends on how many readers a constant has, while a computed tensor's reader count decides
# whether two nodes may merge.
_SHARED_READERS = 16
_deferred: dict[int, tuple[gs.Tensor, collections.Counter]] | None = None


@contextlib.contextmanager
def deferred_unlinks() -> Iterator[None]:
    """Unlink readers of widely shared constants when the block ends, all at once."""
    global _deferred
    outer, _deferred = _deferred, {}
    try:
        yield
    finally:
        pending, _deferred = _deferred, outer
        for tensor, gone in pending.values():
            kept = []
            for reader in tensor.outputs:
                if gone[id(reader)] > 0:  # a node reading it twice is unlinked twice
                    gone[id(reader)] -= 1
                else:
                    kept.append(reader)
            list.clear(tensor.outputs)
            list.extend(tensor.outputs, kept)


def _unlink(tensor: gs.Tensor, node: gs.Node) -> None:
    """Drop ``node`` from ``tensor``'s readers (by identity)."""
    if (_deferred is not None and isinstance(tensor, gs.Constant)
            and len(tensor.outputs) > _SHARED_READERS):
        _deferred.setdefault(id(tensor), (tensor, collections.Counter()))[1][id(node)] += 1
        return
    readers = tensor.outputs
    for index, reader in enumerate(readers):  # graph order: the edited reader is usually early
        if reader is node:
            list.pop(readers, index)
            return


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """``node.inputs[index] = tensor``, keeping both tensors' reader lists right."""
    old = node.inputs[index]
    if old is tensor:
        return
    list.__setitem__(node.inputs, index, tensor)
    list.append(tensor.outputs, node)
    _unlink(old, node)


def disconnect(node: gs.Node) -> None:
    """Detach ``node`` from every tensor it reads and writes (it is dead or bypassed)."""
    for tensor in node.inputs:
        _unlink(tensor, node)
    list.clear(node.inputs)
    for tensor in node.outputs:
        _unlink_producer(tensor, node)
    list.clear(node.outputs)


def _unlink_producer(tensor: gs.Tensor, node: gs.Node) -> None:
    """Drop ``node`` as ``tensor``'s producer (by identity)."""
    producers = tensor.inputs
    for index, writer in enumerate(producers):
        if writer is node:
            list.pop(producers, index)
            return


def move_readers(old: gs.Tensor, new: gs.Tensor, graph: gs.Graph) -> bool:
    """Make every reader of ``old`` read ``new`` (readers in bodies too); False, and nothing
    changes, when ``old`` is a graph output (its name must stay)."""
    if is_graph_output(old, graph):
        return False
    for reader in list(old.outputs):
        for index, tensor in enumerate(reader.inputs):
            if tensor is old:
                set_input(reader, index, new)
    return True


def sweep_dead(graph: gs.Graph, clean: bool = False) -> set[int]:
    """Remove the nodes of ``graph`` no graph output depends on; returns the ids of the nodes
    left. A dead reader (a Shape nobody uses) would make a tensor look shared.

    One walk up from the outputs (linear, unlike a full cleanup and export); values read from
    inside an If/Loop body keep their producers alive.
    """
    local = {id(node) for node in graph.nodes}
    if clean:  # the caller just removed the dead nodes
        return local
    live = live_nodes(graph, local=local)
    if len(live) != len(graph.nodes):
        detach([node for node in graph.nodes if id(node) not in live])
        graph.nodes = [node for node in graph.nodes if id(node) in live]
    return live


# --- computed targets -------------------------------------------------------------------------

def target_elements(target: gs.Tensor) -> list | None:
    """What each element of a 1-D shape tensor is: an int, ``(tensor, axis)`` (that tensor's
    dim, read with Shape), or None (computed some other way); None when the length is unknown.
    """
    return _elements(target, 0)


def _elements(tensor: gs.Tensor, depth: int) -> list | None:
    """:func:`target_elements` of ``tensor``, ``depth`` ops below the target."""
    value = constant_value(tensor)
    node = producer(tensor)
    if value is None and node is not None and node.op not in _STRUCTURAL:
        value = constant_eval(tensor)  # arithmetic on static dims, say
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    if node is None or depth > _MAX_TARGET_DEPTH or len(node.outputs) != 1:
        return _unknown(tensor)
    if node.op == "Shape":
        return _shape_elements(node) or _unknown(tensor)
    if node.op == "Concat":
        parts = [_elements(t, depth + 1) for t in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if node.op in ("Unsqueeze", "Squeeze", "Reshape", "Identity", "Flatten") or (
            node.op == "Cast" and node.attrs.get("to") in (_I32, _I64)):
        # These keep the elements and their order (a shape's ints fit in int32).
        found = _elements(node.inputs[0], depth + 1)
        return found if found is not None else _unknown(tensor)
    if node.op in ("Gather", "Slice"):
        data = _elements(node.inputs[0], depth + 1)
        picked = _pick(node, data) if data is not None else None
        return picked if picked is not None else _unknown(tensor)
    if node.op == "Where" and _is_expand_shape(node):
        # torch's expand(-1) exported: Where(Equal(shape, -1), 1, shape); -1 keeps a dim.
        found = _elements(node.inputs[2], depth + 1)
        if found is not None:
            return [1 if e == -1 else e for e in found]
    if node.op == "Mul" and len(node.inputs) == 2:
        # TorchScript writes a head merge's B*H as Mul(Gather(Shape(x), 0), H).
        left, right = (_elements(t, depth + 1) for t in node.inputs)
        if left is not None and right is not None and (
                len(left) == len(right) or 1 in (len(left), len(right))):
            width = max(len(left), len(right))
            return [Product((left[i if len(left) > 1 else 0], right[i if len(right) > 1 else 0]))
                    for i in range(width)]
    return _unknown(tensor)


def _is_expand_shape(node: gs.Node) -> bool:
    """Whether ``node`` is ``Where(Equal(shape, -1), 1, shape)`` (-1 and 1 constant)."""
    if len(node.inputs) != 3:
        return False
    cond, ones, shape = node.inputs
    test = producer(cond)
    if test is None or test.op != "Equal" or shape not in test.inputs:
        return False
    minus = test.inputs[1] if test.inputs[0] is shape else test.inputs[0]
    minus, ones = constant_eval(minus), constant_eval(ones)
    return (minus is not None and ones is not None and minus.size > 0 and ones.size > 0
            and bool(np.all(minus == -1)) and bool(np.all(ones == 1)))


@dataclass(frozen=True)
class Product:
    """A target element computed as the product of two others (ints, dims, products)."""

    factors: tuple


#: A size as a product of known factors: ``(coefficient, sorted symbols)``; ``[B, H*S]``'s
#: second dim with H=4 is ``(4, ("S",))``.
Monomial = tuple


def _monomial(size) -> Monomial | None:
    """An int or a symbol as a :data:`Monomial` (None when unknown)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size >= 0:
        return int(size), ()
    return (1, (size,)) if isinstance(size, str) and size else None


def _times(a: Monomial | None, b: Monomial | None) -> Monomial | None:
    return None if a is None or b is None else (a[0] * b[0], tuple(sorted(a[1] + b[1])))


def _divided(a: Monomial, b: Monomial) -> Monomial | None:
    """``a / b`` when it is a monomial (b's coefficient divides, b's symbols are among a's)."""
    rest = collections.Counter(a[1])
    rest.subtract(b[1])
    if b[0] == 0 or a[0] % b[0] or any(n < 0 for n in rest.values()):
        return None
    return a[0] // b[0], tuple(sorted(rest.elements()))


def numel(tensor: gs.Tensor) -> Monomial | None:
    """The element count of ``tensor`` as a monomial of its dims (None when one is unknown)."""
    total: Monomial | None = (1, ())
    for size in tensor.shape if tensor.shape is not None else [None]:
        total = _times(total, _monomial(size))
    return total


def _element_size(element) -> Monomial | None:
    """What a :func:`target_elements` entry other than 0 and -1 is worth, as a monomial."""
    if isinstance(element, Product):
        return _times(*(_element_size(f) for f in element.factors))
    if isinstance(element, tuple):
        return _monomial(dim(*element))
    return _monomial(element) if isinstance(element, int) else None


def _as_dim(size: Monomial | None):
    """A monomial as a dim (an int or one symbol), or None when it is a product of symbols."""
    if size is None:
        return None
    coefficient, symbols = size
    if not symbols:
        return coefficient
    return symbols[0] if coefficient == 1 and len(symbols) == 1 else None


#: Ops whose output elements :func:`target_elements` follows one by one.
_STRUCTURAL = frozenset({"Shape", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Identity",
                         "Flatten", "Cast", "Gather", "Slice"})


def _unknown(tensor: gs.Tensor) -> list | None:
    """As many unknown elements as a 1-D ``tensor`` of static length has (None otherwise)."""
    shape = tensor.shape
    if shape is not None and len(shape) <= 1 and all(isinstance(d, int) for d in shape):
        return [None] * (shape[0] if shape else 1)
    return None


def _shape_elements(node: gs.Node) -> list | None:
    """``(source, axis)`` for each dim a Shape node returns (its start/end applied)."""
    source = node.inputs[0]
    if source.shape is None:
        return None
    size = len(source.shape)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", size)
    start = min(max(start + size if start < 0 else start, 0), size)
    end = min(max(end + size if end < 0 else end, 0), size)
    return [(source, axis) for axis in range(start, end)]


def _pick(node: gs.Node, data: list) -> list | None:
    """The elements a Gather or Slice on axis 0 of a 1-D ``data`` selects."""
    args = [constant_eval(t) if t.name else None for t in node.inputs[1:]]
    if node.op == "Slice" and "starts" in node.attrs:  # opset < 10 keeps them as attributes
        args = [np.asarray(node.attrs.get(key)) if key in node.attrs else None
                for key in ("starts", "ends", "axes")]
    if len(args) < (1 if node.op == "Gather" else 2) or any(a is None for a in args[:2]):
        return None
    if node.op == "Gather":
        if node.attrs.get("axis", 0) not in (0, -1):
            return None
        indices = [int(i) for i in np.asarray(args[0]).reshape(-1)]
        if any(not -len(data) <= i < len(data) for i in indices):
            return None
        return [data[i] for i in indices]
    starts, ends = (np.asarray(a).reshape(-1) for a in args[:2])
    axes = args[2] if len(args) > 2 and args[2] is not None else np.zeros(1, np.int64)
    steps = args[3] if len(args) > 3 and args[3] is not None else np.ones(1, np.int64)
    if len(starts) != 1 or int(np.asarray(axes).reshape(-1)[0]) not in (0, -1):
        return None
    step = int(np.asarray(steps).reshape(-1)[0])
    # Python's slice clamps out-of-range bounds the way ONNX Slice does for a 1-D tensor.
    return data[slice(int(starts[0]), int(ends[0]), step)] if step != 0 else None


def _entry(position: int, element, data: gs.Tensor, out: gs.Tensor, allowzero: int) -> Entry:
    """What target element ``element`` at ``position`` provably is, for Reshape(data) -> out."""
    if isinstance(element, int):
        if element > 0 or (element == 0 and allowzero):
            return ("lit", element)
        return ("copy",) if element == 0 else ("any",)
    if isinstance(element, tuple):
        source, axis = element
        if source is data and axis == position:
            return ("copy",)
        size = dim(source, axis)
        if isinstance(size, int) and size >= 0:
            return ("lit", size)
        if isinstance(size, str) and same_dim(size, dim(data, position)):
            return ("copy",)
    # The element is computed; shape inference may still know the size it has.
    size = dim(out, position) if position < (rank(out) or 0) else None
    if isinstance(size, int) and size > 0:
        return ("lit", size)
    if isinstance(size, str) and position < (rank(data) or 0) and same_dim(size, dim(data, position)):
        return ("copy",)
    return ("any",)


def encode_target(entries: list[Entry], allowzero: int) -> tuple[np.ndarray, int] | None:
    """A constant target and the allowzero to read it with, or None when it cannot be written:
    two unknown sizes, a -1 or a copy next to a literal 0, or a literal 0 read as a copy."""
    unknown = sum(1 for e in entries if e[0] == "any")
    literal_zero = any(e == ("lit", 0) for e in entries)
    copies = any(e[0] == "copy" for e in entries)
    if unknown > 1 or (literal_zero and (unknown or copies or not allowzero)):
        return None
    values = [e[1] if e[0] == "lit" else 0 if e[0] == "copy" else -1 for e in entries]
    # A 0 that copies needs allowzero=0; without literal zeros that reads every other entry alike.
    return np.array(values, np.int64), (0 if copies else allowzero)


# --- the pass ---------------------------------------------------------------------------------

class SimplifyReshapes(GraphPass):
    """Merge Reshape chains, drop identity Reshapes, make computed targets constant, cancel
    Squeeze/Unsqueeze pairs and drop round-trip or no-op Casts and Identities."""

    name = "simplify-reshapes"
    description = ("merge Reshape chains, make computed Reshape targets constant, drop identity "
                   "Reshapes, Squeeze/Unsqueeze pairs, lossless Cast round trips and Identities")

    def rewrite(self, graph: gs.Graph, path: str) -> dict[str, int]:
        """Simplify one graph (the base calls this for the top level and each body)."""
        return _Simplifier(graph, starts_clean=self.starts_clean).run()


class _Simplifier:
    """One graph's worklist of Reshape/Squeeze/Unsqueeze/Cast nodes."""

    def __init__(self, graph: gs.Graph, starts_clean: bool = False):
        self.graph, self.starts_clean = graph, starts_clean
        self.local: set[int] = set()  # the graph's own live nodes, set by run()
        self.names = Names(graph)
        self.queue: deque[gs.Node] = deque()
        self.queued: set[int] = set()
        self.counts = {"reshape_chains_merged": 0, "identity_reshapes_removed": 0,
                       "computed_targets_made_constant": 0, "squeeze_unsqueeze_cancelled": 0,
                       "casts_removed": 0, "identities_removed": 0, "shapes_refined": 0}
        #: Tensors given dims ONNX could not infer (exported only when a count says so).
        self.refined: list[gs.Tensor] = []
        #: Sources whose new readers were reading a removed node's output.
        self.rewired: list[gs.Tensor] = []

    def run(self) -> dict[str, int]:
        """Visit every candidate, and again whatever a rewrite puts next to another candidate."""
        with deferred_unlinks():
            return self._run()

    def _run(self) -> dict[str, int]:
        self.local = sweep_dead(self.graph, clean=self.starts_clean)
        self.push(self.graph.nodes)
        while self.queue:
            node = self.queue.popleft()
            self.queued.discard(id(node))
            if node.outputs and node.inputs:  # a bypassed node is left disconnected
                self.visit(node)
        if self.refined or self.rewired:
            forget_stale_shapes(self.refined + self.rewired, self.local)
            self.counts["shapes_refined"] += len({id(t) for t in self.refined})
        if any(self.counts.values()):
            log.debug("simplify-reshapes: %s", self.counts)
        return self.counts

    def push(self, nodes: Iterable[gs.Node]) -> None:
        """Queue the candidates among ``nodes`` that are not queued already."""
        for node in nodes:
            if node.op in _OPS and id(node) in self.local and id(node) not in self.queued:
                self.queued.add(id(node))
                self.queue.append(node)

    def visit(self, node: gs.Node) -> None:
        """Try the rewrites that apply to ``node``'s op."""
        if node.op == "Reshape":
            self.reshape(node)
        elif node.op == "Expand":
            self.refined.extend(refine_expand(node, self.graph))
        elif node.op in ("Squeeze", "Unsqueeze"):
            source = _squeeze_pair_source(node, self.local)
            if source is not None:
                self.forward(node, source, "squeeze_unsqueeze_cancelled")
        elif node.op == "Cast":
            source = _cast_source(node, self.local)
            if source is not None:
                self.forward(node, source, "casts_removed")
        elif node.op == "Identity" and node.inputs[0].name:
            # Identity separates a Reshape or Transpose from its partner as well as a Cast does.
            self.forward(node, node.inputs[0], "identities_removed")

    def forward(self, node: gs.Node, source: gs.Tensor, count: str) -> bool:
        """Make ``node``'s readers read ``source`` (equal to its output) and drop it."""
        if not move_readers(node.outputs[0], source, self.graph):
            return False
        disconnect(node)
        self.counts[count] += 1
        # The readers' outputs may carry symbols inferred through the node (a -1 that hid
        # the batch); ONNX would keep them over what it infers from the source.
        self.rewired.append(source)
        if producer(source) is not None and producer(source).op in _OPS:
            self.push(source.outputs)  # a reader may now pair with the source's producer
        return True

    def reshape(self, node: gs.Node) -> None:
        """Constant target, then merge with a Reshape producer, then drop if an identity."""
        if len(node.inputs) < 2:
            return
        if constant_value(node.inputs[1]) is None and self.make_constant(node):
            self.counts["computed_targets_made_constant"] += 1
        if self.merge(node):
            self.counts["reshape_chains_merged"] += 1
            self.push([node])  # its new producer may be a Reshape too
        self.refined.extend(refine_reshape_shape(node, self.graph))
        if is_identity_reshape(node):
            self.forward(node, node.inputs[0], "identity_reshapes_removed")
            return
        consumer = only_consumer(node.outputs[0], self.graph)
        if consumer is not None:
            self.push([consumer])

    def make_constant(self, node: gs.Node) -> bool:
        """Replace a computed target with a constant one, when every entry is proved."""
        allowzero = node.attrs.get("allowzero", 0)
        elements = target_elements(node.inputs[1])
        if elements is None or (rank(node.outputs[0]) not in (None, len(elements))):
            return False
        data, out = node.inputs[0], node.outputs[0]
        entries = [_entry(i, e, data, out, allowzero) for i, e in enumerate(elements)]
        encoded = encode_target(entries, allowzero)
        if encoded is None:
            return False
        self.retarget(node, *encoded)
        return True

    def merge(self, node: gs.Node) -> bool:
        """Reshape(Reshape(x, s1), s2) -> Reshape(x, s2') when nothing else reads the middle."""
        middle = node.inputs[0]
        first = producer(middle)
        target = constant_value(node.inputs[1])
        if (first is None or first.op != "Reshape" or id(first) not in self.local
                or target is None or only_consumer(middle, self.graph) is not node):
            return False
        allowzero = node.attrs.get("allowzero", 0)
        source = first.inputs[0]
        entries = [_resolve_against(i, int(v), middle, source, node.outputs[0], allowzero)
                   for i, v in enumerate(target.reshape(-1))]
        encoded = encode_target(entries, allowzero)
        if encoded is None:
            return False
        set_input(node, 0, source)
        self.retarget(node, *encoded)
        return True

    def retarget(self, node: gs.Node, values: np.ndarray, allowzero: int) -> None:
        """Give Reshape ``node`` the constant target ``values``, read with ``allowzero``."""
        old = node.inputs[1]
        name = self.names.fresh(f"{node.outputs[0].name}_target")
        set_input(node, 1, gs.Constant(name, values))
        self.drop_dead(old)
        if allowzero:
            node.attrs["allowzero"] = allowzero
        else:
            node.attrs.pop("allowzero", None)  # the default, and absent before opset 14

    def drop_dead(self, tensor: gs.Tensor) -> None:
        """Disconnect the nodes that computed ``tensor`` once nothing reads it, so the tensors
        they read (a Shape's input) lose a reader now rather than at the final cleanup."""
        stack = [tensor]
        while stack:
            current = stack.pop()
            node = producer(current)
            if (node is None or id(node) not in self.local or any(out.outputs for out in node.outputs)
                    or any(is_graph_output(out, self.graph) for out in node.outputs)):
                continue
            inputs = list(node.inputs)
            disconnect(node)
            stack.extend(inputs)
            for source in inputs:  # a reader left alone may now merge with its producer
                if len(source.outputs) == 1:
                    self.push(source.outputs)


def _unknown_dim(size) -> bool:
    """Whether a dim is unknown: None, or a name ONNX shape inference made up ("unk__<n>")."""
    return size is None or (isinstance(size, str) and size.startswith("unk__"))


def refine_reshape_shape(node: gs.Node, graph: gs.Graph | None = None) -> list[gs.Tensor]:
    """Fill the output dims shape inference left unknown from a constant target.

    ONNX propagates no values into If/Loop bodies, so a Reshape there whose target is an outer
    constant gets an unknown shape; the target and the input's shape still say what it is.
    Computed targets are read by :func:`refine_computed_reshape`.
    """
    target = constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
    out, data = node.outputs[0], node.inputs[0]
    if target is None and len(node.inputs) > 1:
        return refine_computed_reshape(node, graph) if graph is not None else []
    if target is None or target.ndim != 1 or (out.shape is not None
                                             and not any(_unknown_dim(d) for d in out.shape)):
        return []
    allowzero = node.attrs.get("allowzero", 0)
    dims = []
    for i, value in enumerate(int(v) for v in target):
        if value > 0 or (value == 0 and allowzero):
            dims.append(value)
        elif value == 0:
            dims.append(dim(data, i) if i < (rank(data) or 0) else None)
        else:
            dims.append(None)
    if -1 in target.tolist() and data.shape is not None and all(
            isinstance(d, int) for d in data.shape) and sum(d is None for d in dims) == 1:
        known = int(np.prod([d for d in dims if d is not None]))
        total = int(np.prod(data.shape))
        dims = [total // known if d is None and known else d for d in dims]
    old = out.shape if out.shape is not None and len(out.shape) == len(dims) else [None] * len(dims)
    out.shape = [new if _unknown_dim(was) and new is not None else was
                 for was, new in zip(old, dims, strict=True)]
    return []  # ONNX infers the same once the target reaches the body: nothing to count


def refine_computed_reshape(node: gs.Node, graph: gs.Graph) -> list[gs.Tensor]:
    """Fill unknown dims of a Reshape whose target is computed from shapes, as a product of
    symbols, and the shape of the broadcast that feeds it.

    TorchScript's head merge ``view(B*H, -1, D)`` of ``x[B,H,S,D]`` computes ``B*H`` as
    ``Mul(Gather(Shape(h), 0), H)``; ONNX cannot name the -1 (it would have to divide
    symbols), but ``numel(x) / (B*H*D)`` is ``S``, x's own symbol. The same holds for any
    entry: an entry worth one symbol or an int becomes that dim.
    """
    elements = target_elements(node.inputs[1])
    out, data = node.outputs[0], node.inputs[0]
    if elements is None or node.attrs.get("allowzero", 0):
        return []
    sizes: list[Monomial | None] = []
    for position, element in enumerate(elements):
        if element == 0:
            sizes.append(_monomial(dim(data, position)))
        else:
            sizes.append(None if element == -1 else _element_size(element))
    free = [i for i, e in enumerate(elements) if e == -1]
    total = numel(data)
    if len(free) == 1 and total is not None and all(
            size is not None for i, size in enumerate(sizes) if i != free[0]):
        known: Monomial = (1, ())
        for i, size in enumerate(sizes):
            if i != free[0]:
                known = _times(known, size)
        sizes[free[0]] = _divided(total, known)
    refined = []
    old = out.shape if out.shape is not None else [None] * len(sizes)
    new = [_as_dim(size) if _unknown_dim(was) and _as_dim(size) is not None else was
           for was, size in zip(old, sizes, strict=True)] if len(old) == len(sizes) else old
    if new != out.shape and not is_graph_output(out, graph):
        out.shape = new
        refined.append(out)
    if None not in sizes and -1 not in elements:
        total_out: Monomial | None = (1, ())
        for size in sizes:
            total_out = _times(total_out, size)
        if not is_graph_output(data, graph) and refine_broadcast(data, total_out):
            refined.append(data)
    return refined


def refine_expand(node: gs.Node, graph: gs.Graph) -> list[gs.Tensor]:
    """Fill unknown dims of ``Expand(x, shape)`` when the shape is computed from dims.

    TorchScript exports ``x.expand(B, -1)`` with the shape built at run time (see
    :func:`_is_expand_shape`), which ONNX cannot read: BART's positions lose the batch symbol
    there, and with it every head merge downstream that reads B from the hidden states.
    """
    elements = target_elements(node.inputs[1]) if len(node.inputs) > 1 else None
    data, out = node.inputs[0], node.outputs[0]
    if elements is None or data.shape is None or is_graph_output(out, graph):
        return []
    width = max(len(data.shape), len(elements))
    dims = [1] * (width - len(data.shape)) + list(data.shape)
    wanted = [1] * (width - len(elements)) + [
        _as_dim(_element_size(e)) if e != 0 else None for e in elements]
    new = []
    for have, want in zip(dims, wanted, strict=True):
        if same_dim(want, 1) or same_dim(have, want):
            new.append(have)
        else:
            new.append(want if same_dim(have, 1) else None)
    old = out.shape if out.shape is not None and len(out.shape) == width else [None] * width
    merged = [n if _unknown_dim(o) and n is not None else o for o, n in zip(old, new, strict=True)]
    if merged == out.shape:
        return []
    out.shape = merged
    return [out]


#: Elementwise ops whose output is the broadcast of their inputs.
_BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Where"})


def refine_broadcast(tensor: gs.Tensor, count: Monomial | None) -> bool:
    """Give an elementwise op's output the shape of an input with as many elements.

    A broadcast's output dims are at least its inputs' (a dim of 1 grows, others stay), so an
    output that a Reshape proves to hold exactly ``numel(input)`` elements has that input's
    shape: a scores tensor ``[B,H,Sq,Sk]`` plus a mask whose shape came through an ``Expand``
    ONNX could not read. (Empty tensors excepted: a 0 dim hides what the others are.)
    """
    node = producer(tensor)
    if (count is None or node is None or node.op not in _BROADCASTING
            or (tensor.shape is not None and not any(_unknown_dim(d) for d in tensor.shape))):
        return False
    ranks = [rank(t) for t in node.inputs]
    if None in ranks:
        return False
    for source in node.inputs:
        if rank(source) == max(ranks) and numel(source) == count:
            if same_shape(tensor.shape, source.shape):
                return False
            tensor.shape = list(source.shape)
            return True
    return False


def forget_stale_shapes(refined: list[gs.Tensor], local: set[int]) -> None:
    """Blank the unknown dims below ``refined`` (ranks stay), so inference recomputes them.

    ONNX keeps a symbol a tensor already has over the one it infers, so a MatMul reading a
    refined head merge would keep its stale ``unk__`` dims for good.
    """
    seen = {id(t) for t in refined}
    stack = list(refined)
    while stack:
        for reader in stack.pop().outputs:
            if id(reader) not in local:
                continue
            for out in reader.outputs:
                if id(out) in seen:
                    continue
                seen.add(id(out))
                if out.shape is not None and any(_unknown_dim(d) for d in out.shape):
                    out.shape = [None if _unknown_dim(d) else d for d in out.shape]
                stack.append(out)


def is_identity_reshape(node: gs.Node) -> bool:
    """Whether Reshape ``node`` provably returns its input unchanged: the shapes are equal dim
    by dim, or the target keeps every dim (0 copies, or the same int) but at most one -1,
    which the element count then makes equal too."""
    data, out = node.inputs[0], node.outputs[0]
    if same_shape(data.shape, out.shape):
        return True
    target = constant_value(node.inputs[1])
    if target is None or target.ndim != 1 or rank(data) != target.size:
        return False
    allowzero = node.attrs.get("allowzero", 0)
    free = 0
    for i, value in enumerate(int(v) for v in target):
        if value == -1:
            free += 1
        elif not ((value == 0 and not allowzero) or same_dim(value, dim(data, i))):
            return False
    return free <= 1


def _resolve_against(position: int, value: int, middle: gs.Tensor, source: gs.Tensor,
                     out: gs.Tensor, allowzero: int) -> Entry:
    """Entry ``value`` of the second target of a chain, rewritten to read ``source``: a 0 that
    copied the middle tensor's dim, or the -1, becomes the size it stands for when that is
    known, or a copy of the source's dim when it is the same."""
    if value > 0 or (value == 0 and allowzero):
        return ("lit", value)
    shown = middle if value == 0 else out
    size = dim(shown, position) if position < (rank(shown) or 0) else None
    if isinstance(size, int) and size > 0:
        return ("lit", size)
    if position < (rank(source) or 0) and same_dim(size, dim(source, position)):
        return ("copy",)
    return ("any",)


# --- Squeeze/Unsqueeze and Cast ----------------------------------------------------------------

def _axes(node: gs.Node) -> list[int] | None:
    """The axes input (opset 13+) or attribute (older); None when absent or not constant."""
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = constant_eval(node.inputs[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    axes = node.attrs.get("axes")
    return [int(a) for a in axes] if axes is not None else None


def _normalized(axes: list[int], size: int | None) -> set[int] | None:
    """``axes`` as non-negative positions in a rank-``size`` tensor; None when not knowable
    or repeated."""
    if any(a < 0 for a in axes):
        if size is None:
            return None
        axes = [a + size if a < 0 else a for a in axes]
    return set(axes) if len(set(axes)) == len(axes) else None


def _squeeze_pair_source(node: gs.Node, local: set[int]) -> gs.Tensor | None:
    """x when ``node`` undoes its producer: Squeeze(Unsqueeze(x, a), a) or
    Unsqueeze(Squeeze(x, a), a) with x's dims at a provably 1."""
    inner = producer(node.inputs[0])
    pair = {"Squeeze": "Unsqueeze", "Unsqueeze": "Squeeze"}[node.op]
    if inner is None or inner.op != pair or id(inner) not in local:
        return None
    x = inner.inputs[0]
    if node.op == "Squeeze":
        size = rank(node.inputs[0])
        expanded = _normalized(_axes(inner) or [], size)
        axes = _axes(node)
        if axes is None:  # squeeze every 1: only the inserted ones may be 1
            ok = x.shape is not None and all(isinstance(d, int) and d != 1 for d in x.shape)
            return x if ok and expanded else None
        return x if expanded and expanded == _normalized(axes, size) else None
    size = rank(x)
    squeezed = _axes(inner)
    if squeezed is None and x.shape is not None and all(isinstance(d, int) for d in x.shape):
        squeezed = [i for i, d in enumerate(x.shape) if d == 1]
    squeezed_set = _normalized(squeezed, size) if squeezed else None
    axes = _axes(node)
    if not squeezed_set or axes is None or _normalized(axes, size) != squeezed_set:
        return None
    return x if all(dim(x, a) == 1 for a in squeezed_set) else None


def _cast_source(node: gs.Node, local: set[int]) -> gs.Tensor | None:
    """x when a Cast is a no-op: to x's own type, or back from a lossless widening of x."""
    to = node.attrs.get("to")
    x = node.inputs[0]
    if to is not None and onnx_dtype(x) == to:
        return x
    inner = producer(x)
    if inner is None or inner.op != "Cast" or id(inner) not in local:
        return None
    source = inner.inputs[0]
    original = onnx_dtype(source)
    widened = inner.attrs.get("to")
    if original is not None and original == to and widened in _LOSSLESS.get(original, ()):
        return source
    return None


__all__ = [
    "Names", "SimplifyReshapes", "dim", "disconnect", "encode_target",
    "is_identity_reshape", "move_readers", "rank", "refine_reshape_shape", "same_dim",
    "same_shape", "set_input", "sweep_dead", "target_elements",
]
