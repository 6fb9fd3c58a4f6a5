"""Split a model at its static/dynamic boundary: a K/V projector that runs once, a decoder per step.

Cross-attention K and V depend only on the encoder output (or a fixed context), yet a decoder
or UNet export recomputes them at every decode or denoising step. ``split_static_kv`` cuts the
model in two:

* the **projector** (``kv_projector.onnx``): static inputs -> the cut tensors, normally every
  cross-attention's K and V in head layout (with a full encoder-decoder export the encoder is in
  here too);
* the **decoder** (``decoder.onnx``): the other inputs plus the cut tensors as new inputs named
  ``cross_kv.{i}.key`` / ``cross_kv.{i}.value`` (``i`` counts cross-attention blocks in graph
  order); the static inputs and everything computed only from them are gone.

The algorithm:

1. Match attention (:mod:`xattn_compiler.attention`). Cross-attention inside If/Loop bodies is
   refused, naming the node: inline it first (the control-flow pass).
2. Static inputs default to the graph inputs that feed only cross-attention K/V.
3. Cross-attention whose K/V depend on no input at all (learned latents, a prompt buffer) is
   folded instead: Expands of a constant to the batch are moved below the projections (MatMul
   and elementwise ops with constant operands commute with a broadcast), then the constant
   region is evaluated with ONNX Runtime and its cut tensors become initializers.
4. Binding times: a tensor is *static* when its values depend on the static inputs and on
   nothing else (shape reads do not count as values: see :data:`analysis.SHAPE_ONLY_OPS`).
5. The cut is a minimum cut over the static region (networkx): each static tensor ``t`` is an
   edge ``t_in -> t_out`` whose capacity is its estimated size (symbolic dims bound to
   representative sizes) plus a small tie-breaker that prefers tensors nearer the consumers;
   infinite edges keep a node's inputs on its side and force every heavy op (MatMul, Gemm,
   Conv, Einsum, ...) into the projector. So layout ops land on the cheaper side: K in head
   layout crosses rather than the projection output, while an Expand (GQA repeat) or an up-cast
   stays in the decoder because its output is larger than its input.
6. Both models are cut out of the original graph by name. A shape read (``Shape``/``Size``) of
   a tensor the model no longer has is rebuilt from dims of tensors it does have, matched by
   symbolic dim name (``enc_len`` from the key's shape); when no tensor carries the dim the
   split refuses, naming the node.
7. Where ONNX shape inference left dims unknown (TorchScript exports compute reshape targets at
   run time), the model is run twice at different small sizes and each such dim is named by
   example (a constant, an input's symbolic dim, a multiple or product of them) before 4-6.

Each model keeps only the initializers it reads; dims stay symbolic; ``save`` writes large
models with external data. ``verify_split`` runs projector then decoder against the original.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import io as xio
from . import outputs
from .analysis import SHAPE_ONLY_OPS
from .attention import AttentionMatch, analyze_attention
from .errors import InputError, OutputError, PassError, first_line
from .ir import constant_value, export_model, import_graph, infer_shapes, producer
from .outputs import staged

log = logging.getLogger(__name__)

PROJECTOR_FILE, DECODER_FILE, SPLIT_FILE = "kv_projector.onnx", "decoder.onnx", "split.json"
#: Ops whose cost grows with the weights or the data: they must not run per step on static data.
HEAVY_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger", "ConvInteger",
    "QLinearMatMul", "QLinearConv", "FusedMatMul", "Attention", "MultiHeadAttention",
    "LSTM", "GRU", "RNN",
})
#: Representative sizes of symbolic dims for the byte estimates of the cut.
BATCH_SIZE, DIM_SIZE = 4, 64
#: A cut at a static input itself (a pass-through) costs this many times its bytes.
_PASSTHROUGH_PENALTY = 64
#: Capacities are ``bytes * _TIE + distance``: integers, so the flow is exact.
_TIE = 1024
#: Elementwise ops that commute with an Expand when their other operands are constants.
_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Cast", "Relu", "Gelu", "Sigmoid", "Tanh", "Erf", "Sqrt",
    "Neg", "Identity", "Softplus", "Exp", "Log",
})


class SplitError(InputError):
    """The model cannot be split as asked; the message names the node, tensor or input."""


@dataclass
class SplitResult:
    """The two models of a split and how they connect.

    ``projector`` is None when nothing is left to project (every cross-attention context was a
    constant and got folded into the decoder). ``mapping`` is ``split.json``'s ``kv`` list: one
    entry per cross-attention, ``{"attention": "attn_3", "key": name, "value": name}``.
    """

    projector: onnx.ModelProto | None
    decoder: onnx.ModelProto
    mapping: list[dict[str, Any]]
    static_inputs: list[str]
    report: dict[str, Any] = field(default_factory=dict)

    def split_json(self) -> dict[str, Any]:
        """The contents of ``split.json`` (DESIGN.md)."""
        return {"static_inputs": list(self.static_inputs), "kv": [dict(m) for m in self.mapping],
                "projector": PROJECTOR_FILE if self.projector is not None else None,
                "decoder": DECODER_FILE, "mode": self.report.get("mode"),
                "cut": self.report.get("cut", []), "folded": self.report.get("folded", [])}

    def save(self, directory: str | os.PathLike, *,
             protect: str | os.PathLike | Iterable[str | os.PathLike] = (),
             check_saved: Callable[[Path], None] | None = None) -> Path:
        """Write ``kv_projector.onnx``, ``decoder.onnx`` and ``split.json`` into ``directory``.

        Every target is checked against ``protect`` (the input model) before anything is
        written. The files are written to a staging folder inside ``directory``, each model is
        checked there by ``onnx.checker``, ``check_saved`` (if given) gets the staging folder
        to read the split back from disk (``--verify``), and only then do the files replace
        the old ones together, ``split.json`` last. A refusal leaves ``directory`` as it was.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise OutputError(f"{directory}: exists and is not a directory")
        guarded = [protect] if isinstance(protect, (str, os.PathLike)) else list(protect)
        files = [(DECODER_FILE, self.decoder)]
        if self.projector is not None:
            files.insert(0, (PROJECTOR_FILE, self.projector))
        targets = [directory / name for name, _ in files] + [directory / SPLIT_FILE]
        guard = outputs.Guard(guarded)
        for target in targets:  # refused before anything is written (a model and its data)
            outputs.check(target, guard)
            outputs.check(target.with_name(target.name + ".data"), guard)
        existed = directory.exists()
        try:
            with staged(directory, guarded) as stage:
                for name, model in files:
                    path = stage.path(name)
                    xio.save(model, path, protect=guarded)
                    _check_written(path)
                text = json.dumps(self.split_json(), indent=2) + "\n"
                stage.path(SPLIT_FILE).write_text(text)
                if check_saved is not None:
                    check_saved(stage.stage)
                stage.commit()
        except BaseException:
            if not existed:  # refused: leave no trace, not even the folder the staging made
                with contextlib.suppress(OSError):
                    directory.rmdir()
            raise
        stale = directory / PROJECTOR_FILE
        if self.projector is None and stale.exists():
            stale.unlink()  # a projector of an earlier split would contradict split.json
        log.info("wrote the split into %s", directory)
        return directory


def _check_written(path: Path) -> None:
    """Every model the split writes passes ``onnx.checker``: one that does not is a bug here."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise PassError("split-kv", f"{path.name} as written fails onnx.checker: "
                                    f"{first_line(exc)}") from exc


# --- the public entry points -------------------------------------------------------------------

def split_static_kv(model: onnx.ModelProto | str | os.PathLike,
                    static_inputs: Sequence[str] | None = None, *,
                    dims: Mapping[str, int] | None = None) -> SplitResult:
    """Split ``model`` into a K/V projector and a decoder reading the projected K/V.

    ``static_inputs`` overrides the default (the graph inputs that feed only cross-attention
    K/V). ``dims`` binds symbolic dims for the byte estimates that choose the cut (default:
    batch-like dims 4, others 64). Constant contexts are folded into the decoder (see the
    module docstring); the report says which. Raises :class:`SplitError` (an InputError) for a
    model without cross-attention, an unknown static input, cross-attention inside control
    flow, or a shape read that cannot be rebuilt, naming the node, tensor or input.
    """
    source = xio.load(model) if isinstance(model, (str, os.PathLike)) else model
    # Spellings the matcher does not read (an Einsum core) written its way first, as
    # optimize and inspect do: otherwise an Einsum model "has no cross-attention".
    from xattn_compiler.passes.normalize_spellings import NormalizeSpellings

    work = infer_shapes(NormalizeSpellings()(source).model)
    graph = import_graph(work)
    report = analyze_attention(graph)
    cross = _cross_blocks(report.blocks, graph=graph)
    names = _static_input_names(graph, cross, static_inputs)
    folded: list[dict[str, Any]] = []
    constant_blocks = [b for b in cross if b.kv_source_kind == "constant"]
    if constant_blocks:
        work, folded = _fold(work, cross)
        graph = None  # the fold exported a new model
    if not names:
        result = _folded_only(work, cross, folded)
    else:
        result = _split(work, graph, cross, names, dims or {}, source)
        result.report["folded"] = folded
        result.report["mode"] = "split+folded" if folded else "split"
        _merge_folded(result.mapping, folded)
    _log_summary(result)
    return result


def fold_constant_kv(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """``model`` with the K/V of every constant-context cross-attention folded to initializers.

    Returns the new model and one record per folded block (empty when there was nothing to
    fold). The pass form of the split (``split-static-kv``) runs this.
    """
    work = infer_shapes(model)
    cross = _cross_blocks(analyze_attention(import_graph(work)).blocks, required=False)
    if not any(b.kv_source_kind == "constant" for b in cross):
        return model, []
    return _fold(work, cross)


def static_heavy_nodes(model: onnx.ModelProto, inputs: Iterable[str]) -> list[str]:
    """Heavy nodes (MatMul, Gemm, Conv, ...) whose every input's values depend only on
    ``inputs`` and constants: work a split decoder must not redo per step.

    With ``inputs`` the decoder's cut inputs, an empty list proves the split moved every
    projection of static data out of the decoder (and, with no inputs, that constant
    contexts were folded).
    """
    graph = import_graph(model)
    allowed = frozenset(inputs)
    values, _ = _dependencies(graph)
    found = []
    for node in graph.nodes:
        if node.op in HEAVY_OPS and all(values[id(t)] <= allowed for t in node.inputs
                                        if not _is_empty(t)):
            found.append(node.name or f"{node.op}->{node.outputs[0].name}")
    return found


# --- choosing what to split ------------------------------------------------------------------

def _cross_blocks(blocks: list[AttentionMatch], required: bool = True,
                  graph: gs.Graph | None = None) -> list[AttentionMatch]:
    """The cross-attention blocks, refusing those inside control flow (their K/V projections
    run in a body the split cannot cut)."""
    cross = [b for b in blocks if b.kind == "cross"]
    if not cross and required:
        raise SplitError("the model has no cross-attention: there are no K/V to project once")
    for block in cross:
        if block.subgraph:
            owner = _body_owner(graph, block.graph) if graph is not None else None
            op = owner.op if owner is not None else "control-flow"
            name = owner.name if owner is not None else block.subgraph
            advice = ("inline the If first (unroll-control-flow, e.g. --specialize "
                      "use_cache_branch=false)" if op == "If" else
                      "unroll the Loop first (unroll-control-flow)")
            raise SplitError(
                f"cross-attention {block.id} is inside a body of {op} node '{name}' "
                f"({block.subgraph}); the split cannot cut control-flow bodies: {advice}")
    return cross


def _body_owner(graph: gs.Graph, body: gs.Graph) -> gs.Node | None:
    """The node (at any depth) one of whose attributes is ``body``."""
    for node in graph.nodes:
        for inner in _bodies(node):
            if inner is body:
                return node
            found = _body_owner(inner, body)
            if found is not None:
                return found
    return None


def _static_input_names(graph: gs.Graph, cross: list[AttentionMatch],
                        given: Sequence[str] | None) -> list[str]:
    inputs = [t.name for t in graph.inputs]
    if given is not None:
        given = [name for name in given if name]
        unknown = [name for name in given if name not in inputs]
        if unknown:
            raise SplitError(f"static input '{unknown[0]}' is not a graph input "
                             f"(inputs: {', '.join(inputs)})")
        if not given:
            raise SplitError("no static inputs given")
        return [name for name in inputs if name in set(given)]
    wanted = {name for block in cross for name in block.static_inputs}
    names = [name for name in inputs if name in wanted]
    if not names and not any(b.kv_source_kind == "constant" for b in cross):
        block = cross[0]
        raise SplitError(
            f"no graph input feeds only cross-attention K/V (the K of {block.id} comes from "
            f"'{block.k.source.name}'); name the static inputs with --static-inputs")
    return names


# --- binding times ------------------------------------------------------------------------------

def _dependencies(graph: gs.Graph) -> tuple[dict[int, frozenset], dict[int, frozenset]]:
    """Per tensor (by id): the graph inputs its values depend on, and those it needs at all
    (shape reads included). Bodies of If/Loop/Scan count through the outer values they read."""
    values: dict[int, frozenset] = {}
    needs: dict[int, frozenset] = {}
    empty: frozenset = frozenset()
    for tensor in graph.inputs:
        values[id(tensor)] = needs[id(tensor)] = frozenset({tensor.name})

    def get(table: dict[int, frozenset], tensor: gs.Tensor) -> frozenset:
        return table.get(id(tensor), empty)

    for node in graph.nodes:
        reads = list(node.inputs) + _outer_reads(node)
        need = empty.union(*(get(needs, t) for t in reads))
        value = empty if node.op in SHAPE_ONLY_OPS else empty.union(
            *(get(values, t) for t in reads))
        for out in node.outputs:
            values[id(out)], needs[id(out)] = value, need
    for tensor in graph.tensors().values():
        values.setdefault(id(tensor), empty)
        needs.setdefault(id(tensor), empty)
    return values, needs


def _outer_reads(node: gs.Node) -> list[gs.Tensor]:
    """Tensors of enclosing scopes that the bodies of ``node`` read."""
    found: list[gs.Tensor] = []
    for body in _bodies(node):
        local = {id(t) for t in body.inputs}
        for inner in body.nodes:
            local.update(id(t) for t in inner.outputs)
        for inner in body.nodes:
            found.extend(t for t in inner.inputs if id(t) not in local
                         and not isinstance(t, gs.Constant))
            found.extend(t for t in _outer_reads(inner) if id(t) not in local)
        found.extend(t for t in body.outputs if id(t) not in local
                     and not isinstance(t, gs.Constant))
    return found


def _bodies(node: gs.Node) -> list[gs.Graph]:
    return [item for value in node.attrs.values()
            for item in (value if isinstance(value, list) else [value])
            if isinstance(item, gs.Graph)]


def _is_empty(tensor: gs.Tensor) -> bool:
    """An omitted optional input."""
    return not tensor.name and not tensor.inputs and not isinstance(tensor, gs.Constant)


# --- the cut --------------------------------------------------------------------------------------

@dataclass
class _Region:
    """The static region: its nodes, its tensors (the static inputs included), the tensors
    something outside the region reads by value or the graph outputs (the frontier)."""

    nodes: list[gs.Node]
    tensors: dict[int, gs.Tensor]
    frontier: list[gs.Tensor]
    sources: list[gs.Tensor]


def _region(graph: gs.Graph, is_static, sources: list[gs.Tensor]) -> _Region:
    """Nodes whose outputs are static, and the static tensors something outside reads by value."""
    owner = _owners(graph)
    nodes = [n for n in graph.nodes if n.outputs and all(is_static(t) for t in n.outputs)]
    inside = {id(n) for n in nodes}
    tensors = {id(t): t for t in sources}
    tensors.update({id(t): t for n in nodes for t in n.outputs})
    outputs = {id(t) for t in graph.outputs}
    frontier = []
    for tensor in tensors.values():
        readers = [owner.get(id(c), c) for c in tensor.outputs]
        if id(tensor) in outputs or any(id(r) not in inside and r.op not in SHAPE_ONLY_OPS
                                        for r in readers):
            frontier.append(tensor)
    return _Region(nodes, tensors, frontier, sources)


def _owners(graph: gs.Graph) -> dict[int, gs.Node]:
    """Each node inside a body, mapped to the top-level node that owns the body."""
    owner: dict[int, gs.Node] = {}

    def visit(top: gs.Node, node: gs.Node) -> None:
        for body in _bodies(node):
            for inner in body.nodes:
                owner[id(inner)] = top
                visit(top, inner)

    for node in graph.nodes:
        visit(node, node)
    return owner


def _choose_cut(region: _Region, sizes: Mapping[str, int]) -> list[gs.Tensor]:
    """The static tensors to hand from the projector to the decoder: a minimum cut.

    Each static tensor ``t`` has two vertices: ``("in", t)`` on the source side means the
    projector computes ``t``; ``("out", t)`` on the sink side means the decoder has ``t``.
    The edge between them is cut exactly when ``t`` crosses, at its size. Uncapacitated
    (infinite) edges encode the rest: the decoder has what it computes; a node computed in the
    projector has its inputs computed there, one computed in the decoder has its inputs there
    too; a node's outputs stay together; heavy nodes and static inputs are in the projector;
    the frontier (read outside the static region) must reach the decoder.
    """
    flow = nx.DiGraph()
    distance = _distances(region)
    memo: dict[int, int] = {}
    for key, tensor in region.tensors.items():
        weight = _bytes(tensor, sizes, memo) * _TIE + min(distance.get(key, _TIE - 1), _TIE - 1)
        if any(tensor is s for s in region.sources):
            weight *= _PASSTHROUGH_PENALTY
            flow.add_edge("s", ("in", key))
        flow.add_edge(("in", key), ("out", key), capacity=weight)
        flow.add_edge(("out", key), ("in", key))  # available in the decoder if computed there
    for tensor in region.frontier:
        flow.add_edge(("out", id(tensor)), "t")
    for node in region.nodes:
        _add_node_edges(flow, node, region)
    if "t" not in flow or "s" not in flow:
        return []
    _, (source_side, _) = nx.minimum_cut(flow, "s", "t")
    return [t for key, t in region.tensors.items()
            if ("in", key) in source_side and ("out", key) not in source_side]


def _add_node_edges(flow: nx.DiGraph, node: gs.Node, region: _Region) -> None:
    """A node runs on one side: its inputs are computed there (projector) or available there
    (decoder); its outputs go together; a heavy node runs in the projector."""
    outs = [id(t) for t in node.outputs]
    reads = [t for t in list(node.inputs) + _outer_reads(node) if id(t) in region.tensors]
    for out in outs:
        for tensor in reads:
            flow.add_edge(("out", id(tensor)), ("in", out))
            flow.add_edge(("in", out), ("in", id(tensor)))
        for other in outs:
            if other != out:
                flow.add_edge(("in", out), ("in", other))
        if node.op in HEAVY_OPS or _bodies(node):
            flow.add_edge("s", ("in", out))


def _distances(region: _Region) -> dict[int, int]:
    """How many static nodes lie between each static tensor and the nearest frontier tensor."""
    distance = {id(t): 0 for t in region.frontier}
    frontier = list(region.frontier)
    while frontier:
        following = []
        for tensor in frontier:
            node = producer(tensor)
            if node is None:
                continue
            for source in node.inputs:
                if id(source) in region.tensors and id(source) not in distance:
                    distance[id(source)] = distance[id(tensor)] + 1
                    following.append(source)
        frontier = following
    return distance


def _bytes(tensor: gs.Tensor, sizes: Mapping[str, int], memo: dict[int, int] | None = None,
           depth: int = 0) -> int:
    """Estimated size of ``tensor``: symbolic dims bound to ``sizes`` or representative values.

    When shape inference left dims unknown (``unk__`` names, computed reshape targets), a
    layout op's output is as large as its input and an elementwise op's as its largest input,
    so the estimate follows the producer instead of guessing; ties in the cut then still
    resolve towards the consumers.
    """
    memo = {} if memo is None else memo
    if id(tensor) in memo:
        return memo[id(tensor)]
    itemsize = _itemsize(tensor)
    node = producer(tensor)
    if _shape_known(tensor) or node is None or depth > 32:
        count = 1
        for dim in tensor.shape if tensor.shape is not None else (None,) * 3:
            count *= _dim_size(dim, sizes)
        estimate = max(count, 1) * itemsize
    elif node.op in _SAME_SIZE_OPS:
        source = node.inputs[0]
        estimate = _bytes(source, sizes, memo, depth + 1) * itemsize // _itemsize(source)
    elif node.op in _ELEMENTWISE or node.op == "Where":
        estimate = max(_bytes(t, sizes, memo, depth + 1) * itemsize // _itemsize(t)
                       for t in node.inputs)
    else:
        estimate = _bytes(tensor, sizes, memo, 33)
    memo[id(tensor)] = estimate
    return estimate


#: Ops whose output holds as many elements as their (first) input.
_SAME_SIZE_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                            "Identity", "Cast", "Softmax"})


def _itemsize(tensor: gs.Tensor) -> int:
    try:
        return np.dtype(tensor.dtype).itemsize if tensor.dtype is not None else 4
    except TypeError:
        return 4


def _shape_known(tensor: gs.Tensor) -> bool:
    """Every dim an int or a named symbol (not one shape inference made up)."""
    return tensor.shape is not None and all(
        (isinstance(d, (int, np.integer)) and d >= 0) or (
            isinstance(d, str) and d and not d.startswith("unk__")) for d in tensor.shape)


def _dim_size(dim: Any, sizes: Mapping[str, int]) -> int:
    if isinstance(dim, (int, np.integer)) and dim >= 0:
        return int(dim)
    if not isinstance(dim, str) or not dim:
        return DIM_SIZE
    if dim in sizes:
        return int(sizes[dim])

    def symbol(match: re.Match) -> str:
        name = match.group(0)
        return str(sizes.get(name, BATCH_SIZE if "batch" in name.lower() else DIM_SIZE))

    expression = re.sub(r"[A-Za-z_][A-Za-z0-9_]*", symbol, dim)
    if re.fullmatch(r"[0-9+\-*/() ]+", expression):
        try:
            return max(int(eval(expression, {"__builtins__": {}}, {})), 1)  # digits and operators only
        except (SyntaxError, ZeroDivisionError, ValueError):
            pass
    return DIM_SIZE


# --- naming -----------------------------------------------------------------------------------

def _name_cut(cut: list[gs.Tensor], cross: list[AttentionMatch], walkable,
              taken: set[str]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Readable, stable names for the cut tensors (by the cross-attention each feeds) and the
    ``kv`` mapping of ``split.json``."""
    cut_ids = {id(t): t for t in cut}
    roles: dict[int, list[tuple[int, str]]] = {id(t): [] for t in cut}
    feeders: list[dict[str, list[gs.Tensor]]] = []
    for index, block in enumerate(cross):
        found = {role: _cut_feeders(operand.tensor, cut_ids, walkable)
                 for role, operand in (("key", block.k), ("value", block.v))}
        feeders.append(found)
        for role, tensors in found.items():
            for tensor in tensors:
                roles[id(tensor)].append((index, role))
    names: dict[int, str] = {}
    extra = 0
    for tensor in cut:
        pairs = roles[id(tensor)]
        if not pairs:
            base, extra = f"cross_kv.extra.{extra}", extra + 1
        else:
            index, role = pairs[0]
            both = {r for i, r in pairs if i == index} == {"key", "value"}
            siblings = feeders[index][role]
            base = f"cross_kv.{index}.{'key_value' if both else role}"
            if len(siblings) > 1 and not both:
                base += f".{siblings.index(tensor)}"
        names[id(tensor)] = _unique_name(base, taken)
    mapping = [_mapping_entry(block, feeders[i], names) for i, block in enumerate(cross)]
    return {t.name: names[id(t)] for t in cut}, mapping


def _cut_feeders(tensor: gs.Tensor, cut_ids: dict[int, gs.Tensor],
                 walkable) -> list[gs.Tensor]:
    """The cut tensors ``tensor`` is computed from, walking up through ``walkable`` tensors
    (those computed from the static inputs or constants alone, so the walk stays small)."""
    found: dict[int, gs.Tensor] = {}
    stack, seen = [tensor], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if id(current) in cut_ids:
            found[id(current)] = current
            continue
        node = producer(current)
        # A shape read is no value path: V reshaped with K's shape is not computed from K.
        if node is not None and node.op not in SHAPE_ONLY_OPS and walkable(current):
            stack.extend(node.inputs)
    return sorted(found.values(), key=lambda t: t.name)


def _mapping_entry(block: AttentionMatch, feeders: dict[str, list[gs.Tensor]],
                   names: dict[int, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {"attention": block.id}
    for role in ("key", "value"):
        found = [names[id(t)] for t in feeders[role]]
        entry[role] = found[0] if len(found) == 1 else (found or None)
    return entry


def _unique_name(base: str, taken: set[str]) -> str:
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    taken.add(name)
    return name


# --- the split ------------------------------------------------------------------------------------

def _split(work: onnx.ModelProto, graph: gs.Graph | None, cross: list[AttentionMatch],
           static_names: list[str], sizes: Mapping[str, int],
           like: onnx.ModelProto) -> SplitResult:
    """Cut ``work`` (shapes inferred; ``graph`` its import and ``cross`` its blocks, if at
    hand) at the boundary of what ``static_names`` compute. ``graph`` becomes the decoder."""
    completed = _complete_shapes(work, frozenset(static_names), graph)
    if completed is not work or graph is None:
        work, graph = completed, import_graph(completed)
        cross = _cross_blocks(analyze_attention(graph).blocks)
    values, _ = _dependencies(graph)
    static = frozenset(static_names)
    sources = [t for t in graph.inputs if t.name in static]
    region = _region(graph, lambda t: bool(values[id(t)]) and values[id(t)] <= static, sources)
    cut = _choose_cut(region, sizes)
    if not cut:
        raise SplitError(f"nothing outside the static inputs' own computation reads "
                         f"{', '.join(repr(n) for n in static_names)}: there is nothing to split")
    _refuse_empty_split(cross, values, static_names)
    names, mapping = _name_cut(cut, cross, lambda t: values[id(t)] <= static,
                               set(graph.tensors()))
    kept = sorted(n.name or n.op for n in _decoder_side(region, cut))
    records = [_cut_record(t, names[t.name], mapping, sizes) for t in cut]
    note = not [t for t in graph.inputs if t.name not in static]
    projector, rewired_p = _build_projector(work, static_names, names, like)
    decoder, rewired_d = _build_decoder(graph, static_names, names, like)  # reuses ``graph``
    report = {
        "static_inputs": list(static_names),
        "cut": records, "kept_in_decoder": kept,
        "rewired_shape_reads": rewired_p + rewired_d,
        "projector": _model_facts(projector), "decoder": _model_facts(decoder),
        "original": _model_facts(like),
    }
    report["cut"].sort(key=lambda r: _name_order(r["name"]))
    if note:
        report["note"] = ("every output depends only on the static inputs: the projector "
                          "computes them and the decoder passes them on (there is no per-step "
                          "input to split off)")
        log.warning("%s", report["note"])
    return SplitResult(projector, decoder, mapping, list(static_names), report)


def _refuse_empty_split(cross: list[AttentionMatch], values: dict[int, frozenset],
                        static_names: list[str]) -> None:
    """A split whose projector computes no cross-attention's K and V is no split: the decoder
    would still compute every K/V itself (from whatever the cut moved)."""
    static = set(static_names)

    def beyond(tensor: gs.Tensor) -> list[str]:
        return sorted(values.get(id(tensor), frozenset()) - static)

    if any(not beyond(b.k.tensor) and not beyond(b.v.tensor) for b in cross):
        return
    named = ", ".join(repr(n) for n in static_names)
    role, block = next((r, b) for b in cross for r, o in (("K", b.k), ("V", b.v))
                       if beyond(o.tensor))
    others = beyond(block.k.tensor if role == "K" else block.v.tensor)
    wanted = ",".join([*static_names, *others])
    raise SplitError(
        f"the static inputs {named} determine no cross-attention K/V: the {role} of "
        f"{block.id} also depends on {', '.join(repr(n) for n in others)}; if that is fixed "
        f"per context too, use --static-inputs {wanted}")


def _decoder_side(region: _Region, cut: list[gs.Tensor]) -> list[gs.Node]:
    """Static nodes the decoder still runs: those computing from the cut (layout ops)."""
    cut_ids = {id(t) for t in cut}
    downstream: set[int] = set(cut_ids)
    kept = []
    for node in region.nodes:  # graph order is topological
        if any(id(t) in downstream for t in node.inputs):
            kept.append(node)
            downstream.update(id(t) for t in node.outputs)
    return kept


def _cut_record(tensor: gs.Tensor, name: str, mapping: list[dict[str, Any]],
                sizes: Mapping[str, int]) -> dict[str, Any]:
    attention = [m["attention"] for m in mapping if name in _as_list(m["key"])
                 + _as_list(m["value"])]
    return {"name": name, "tensor": tensor.name, "attention": attention,
            "dtype": np.dtype(tensor.dtype).name if tensor.dtype is not None else None,
            "shape": [d if isinstance(d, (int, str)) else None for d in tensor.shape]
            if tensor.shape is not None else None,
            "bytes_estimate": _bytes(tensor, sizes)}


def _as_list(value: Any) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _name_order(name: str) -> tuple:
    # Numbered parts sort by number ("cross_kv.10" after "cross_kv.9"); a part is tagged by
    # kind so a number never meets a word ("cross_kv.0.key" beside "cross_kv.extra.0").
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def _model_facts(model: onnx.ModelProto | None) -> dict[str, Any] | None:
    if model is None:
        return None
    heavy = sum(1 for n in model.graph.node if n.op_type in HEAVY_OPS)
    return {"nodes": len(model.graph.node), "heavy_nodes": heavy,
            "initializers": len(model.graph.initializer),
            "weight_bytes": xio.weight_bytes(model),
            "inputs": [i.name for i in model.graph.input],
            "outputs": [o.name for o in model.graph.output]}


def _build_projector(work: onnx.ModelProto, static_names: list[str], names: dict[str, str],
                     like: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Static inputs -> cut tensors, renamed; nothing else."""
    graph = import_graph(work)
    tensors = graph.tensors()
    inputs = [tensors[name] for name in static_names]
    outputs = []
    for old, new in sorted(names.items(), key=lambda item: _name_order(item[1])):
        tensor = tensors[old]
        if any(tensor is t for t in inputs):  # a pass-through: the decoder needs it as is
            copy = gs.Variable(new, dtype=tensor.dtype, shape=tensor.shape)
            graph.nodes.append(gs.Node("Identity", name=f"split_kv/{new}", inputs=[tensor],
                                       outputs=[copy]))
            tensor = copy
        tensor.name = new
        outputs.append(tensor)
    graph.inputs, graph.outputs = inputs, outputs
    _prune(graph)
    rewired = _rewire_shape_reads(graph, "projector")
    return export_model(graph, like), rewired


def _build_decoder(graph: gs.Graph, static_names: list[str], names: dict[str, str],
                   like: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """The original (``graph``, edited in place) with each cut tensor replaced by a new input
    and the static inputs gone."""
    tensors = graph.tensors()
    fresh = []
    for old, new in sorted(names.items(), key=lambda item: _name_order(item[1])):
        tensor = tensors[old]
        variable = gs.Variable(new, dtype=tensor.dtype, shape=tensor.shape)
        _replace_uses(graph, tensor, variable)
        fresh.append(variable)
    static = set(static_names)
    graph.inputs = [t for t in graph.inputs if t.name not in static] + fresh
    _prune(graph)
    rewired = _rewire_shape_reads(graph, "decoder")
    return export_model(graph, like), rewired


def _replace_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> None:
    """Every reader of ``old`` (bodies included) reads ``new``; a graph output keeps its name
    through an Identity."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new
    for index, tensor in enumerate(graph.outputs):
        if tensor is old:
            node = producer(old)
            if node is not None:  # the output is recomputed from ``new``: detach the old producer
                node.outputs[node.outputs.index(old)] = gs.Variable(f"{old.name}__replaced")
            graph.nodes.append(gs.Node("Identity", name=f"split_kv/{old.name}", inputs=[new],
                                       outputs=[old]))
            graph.outputs[index] = old


# --- shape reads of tensors a model no longer has ------------------------------------------------

def _rewire_shape_reads(graph: gs.Graph, label: str) -> list[dict[str, Any]]:
    """Rebuild each ``Shape``/``Size`` of a tensor ``graph`` cannot compute from dims of its
    inputs with the same symbolic names; refuse any other read of such a tensor.

    What a model lacks is found in one forward walk; a node computing from a missing tensor
    is only a problem if something still needs it once the shape reads are rebuilt (a
    ``Transpose`` whose output only a ``Shape`` read goes away with it).
    """
    missing = _missing_tensors(graph)
    rewired = []
    dims: dict[tuple[int, int], gs.Tensor] = {}  # one Shape+Gather per input dim
    found, stuck, live = _needed_shape_reads(graph, missing)
    inner = set(_owners(graph))
    for node in found:
        rewired.append(_rebuild_shape(graph, node, label, dims, (live, inner)))
    _prune(graph)
    missing = _missing_tensors(graph)
    for node in graph.nodes:
        lacking = [t for t in list(node.inputs) + _outer_reads(node) if id(t) in missing]
        if not lacking:
            continue
        if stuck:  # the real cause: a shape read whose dims nothing here carries
            read = stuck[0]
            raise SplitError(
                f"{read.op} node '{read.name}' reads the shape of '{read.inputs[0].name}' "
                f"{_shape_text(read.inputs[0])}, which the {label} does not have, and no "
                f"input of the {label} carries the dims it uses")
        raise SplitError(
            f"{node.op} node '{node.name}' reads '{lacking[0].name}', which the {label} "
            "does not have (it is computed only in the other model); split with other "
            "--static-inputs")
    return rewired


def _needed_shape_reads(graph: gs.Graph, missing: set[int]
                        ) -> tuple[list[gs.Node], list[gs.Node], set[int]]:
    """Shape reads of missing tensors that the outputs need (those that can be rebuilt, and
    those that cannot, nearest the outputs first), and the nodes that stay live.

    Nodes are visited from the outputs back (reverse topological order), so a read is judged
    with only its live readers: a rebuilt read makes everything upstream of its input dead,
    which may be what made another read look like it needed a dim nothing carries.
    """
    needed = {id(t) for t in graph.outputs}
    inner = set(_owners(graph))
    live: set[int] = set()
    found: list[gs.Node] = []
    stuck: list[gs.Node] = []
    for node in reversed(list(graph.nodes)):
        if not any(id(t) in needed for t in node.outputs):
            continue
        live.add(id(node))
        if node.op in SHAPE_ONLY_OPS and id(node.inputs[0]) in missing:
            if _read_dims(graph, node, live, inner) is not None:
                found.append(node)
                continue
            stuck.append(node)  # perhaps its input only misses a shape itself: look further
        needed.update(id(t) for t in list(node.inputs) + _outer_reads(node))
    return found, stuck, live


def _missing_tensors(graph: gs.Graph) -> set[int]:
    """Ids of the tensors ``graph`` cannot compute: those depending on a tensor that is
    neither an input, a constant nor computed in the graph."""
    available = {id(t) for t in graph.inputs}
    missing: set[int] = set()
    for node in graph.nodes:  # topological order
        reads = list(node.inputs) + _outer_reads(node)
        lacking = [t for t in reads if id(t) not in available and not _is_free(t)]
        if lacking:
            missing.update(id(t) for t in lacking)
            missing.update(id(t) for t in node.outputs)
        else:
            available.update(id(t) for t in node.outputs)
    return missing


def _prune(graph: gs.Graph) -> None:
    """Drop the nodes no output needs and sort the rest, in linear time.

    onnx-graphsurgeon's ``cleanup`` disconnects each removed node from its tensors, and a
    tensor read by hundreds of nodes (the encoder states of every layer's projections) makes
    each disconnection a linear search: quadratic on deep decoders. Removed nodes stay listed
    as readers of their tensors here; nothing downstream goes by those lists unchecked, and
    export writes only ``graph.nodes``.
    """
    ordered = _toposorted(graph)
    needed = {id(t) for t in graph.outputs}
    keep: set[int] = set()
    for node in reversed(ordered):
        if any(id(t) in needed for t in node.outputs):
            keep.add(id(node))
            needed.update(id(t) for t in list(node.inputs) + _outer_reads(node))
    graph.nodes = [node for node in ordered if id(node) in keep]


def _toposorted(graph: gs.Graph) -> list[gs.Node]:
    """The nodes of ``graph`` in a topological order (Kahn's algorithm, stable)."""
    producers = {id(t): n for n in graph.nodes for t in n.outputs}
    waiting = {id(n): len({id(producers[id(t)]) for t in list(n.inputs) + _outer_reads(n)
                           if id(t) in producers} - {id(n)}) for n in graph.nodes}
    readers: dict[int, list[gs.Node]] = {}
    for node in graph.nodes:
        for source in {id(producers[id(t)]) for t in list(node.inputs) + _outer_reads(node)
                       if id(t) in producers} - {id(node)}:
            readers.setdefault(source, []).append(node)
    ready = deque(n for n in graph.nodes if waiting[id(n)] == 0)
    ordered: list[gs.Node] = []
    while ready:
        node = ready.popleft()
        ordered.append(node)
        for reader in readers.get(id(node), ()):
            waiting[id(reader)] -= 1
            if waiting[id(reader)] == 0:
                ready.append(reader)
    if len(ordered) != len(graph.nodes):
        raise SplitError("the graph has a cycle")
    return ordered


def _is_free(tensor: gs.Tensor) -> bool:
    """Constants, omitted optional inputs and outputs of input-free nodes need nothing."""
    return isinstance(tensor, gs.Constant) or _is_empty(tensor) or (
        producer(tensor) is not None and producer(tensor).op == "Constant")


def _rebuild_shape(graph: gs.Graph, node: gs.Node, label: str,
                   cache: dict[tuple[int, int], gs.Tensor],
                   live: tuple[set[int], set[int]]) -> dict[str, Any]:
    """Turn ``Shape(x)`` into ``Concat`` of constants and ``Gather(Shape(carrier), axis)``."""
    source, result = node.inputs[0], node.outputs[0]
    dims = _read_dims(graph, node, *live)
    if dims is None:
        raise SplitError(
            f"{node.op} node '{node.name}' reads the shape of '{source.name}', which the "
            f"{label} does not have, and no input of the {label} carries its dims "
            f"{_shape_text(source)}")
    parts, carriers = [], []
    for dim in dims:
        if isinstance(dim, str):
            carrier = _carrier(graph, dim)
            parts.append(_gather_dim(graph, *carrier, cache))
            carriers.append(f"{carrier[0].name}[{carrier[1]}]")
        else:  # a static dim, or 0 where no reader looks
            parts.append(gs.Constant(f"split_kv/{result.name}/dim_{len(parts)}",
                                     np.array([0 if dim is _UNREAD else dim], np.int64)))
    node.outputs.clear()
    vector = result if node.op == "Shape" else gs.Variable(f"{result.name}/shape", np.int64)
    graph.nodes.append(gs.Node("Concat", name=f"split_kv/{result.name}", attrs={"axis": 0},
                               inputs=parts, outputs=[vector]))
    if node.op == "Size":
        graph.nodes.append(gs.Node("ReduceProd", name=f"split_kv/{result.name}/size",
                                   attrs={"keepdims": 0}, inputs=[vector], outputs=[result]))
    log.debug("%s: %s '%s' of '%s' now reads %s", label, node.op, node.name, source.name,
              ", ".join(carriers) or "constants")
    return {"model": label, "node": node.name, "tensor": source.name, "reads": carriers}


#: A dim of a rebuilt shape that no reader looks at.
_UNREAD = object()


def _read_dims(graph: gs.Graph, node: gs.Node, live: set[int], inner: set[int]
               ) -> list | None:
    """The dims ``node`` (Shape or Size) reads, each an int, a symbol some input of ``graph``
    carries, or ``_UNREAD``; None when a dim that is read cannot be rebuilt."""
    source = node.inputs[0]
    if source.shape is None:
        return None
    dims = list(source.shape)
    used = None
    if node.op == "Shape":
        rank = len(dims)
        start, end = node.attrs.get("start", 0), node.attrs.get("end", rank)
        start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
        dims = dims[start:end]
        used = _used_positions(node, len(dims), live, inner)
    out: list = []
    for position, dim in enumerate(dims):
        if used is not None and position not in used:
            out.append(_UNREAD)
        elif isinstance(dim, (int, np.integer)) and dim >= 0:
            out.append(int(dim))
        elif isinstance(dim, str) and dim and _carrier(graph, dim) is not None:
            out.append(dim)
        else:
            return None
    return out


def _used_positions(node: gs.Node, rank: int, live: set[int], inner: set[int]
                    ) -> set[int] | None:
    """Positions of a shape vector its live readers look at, when all of them are Gathers or
    Slices with constant indices (a reshape target built from one dim of the other stream).
    Readers that cleanup dropped are still listed on the tensor, hence ``live``; a reader in a
    control-flow body counts as reading everything."""
    vector, used = node.outputs[0], set()
    for reader in vector.outputs:
        if id(reader) in inner:
            return None
        if id(reader) not in live:
            continue
        if reader.inputs[0] is not vector:
            return None
        args = [constant_value(t) for t in reader.inputs[1:]]
        if reader.op == "Gather" and reader.attrs.get("axis", 0) == 0 and args[0] is not None:
            used.update(int(i) % rank for i in np.asarray(args[0]).reshape(-1) if -rank <= i < rank)
        elif reader.op == "Slice" and all(a is not None for a in args) and all(
                int(a) == 0 for a in np.asarray(args[2] if len(args) > 2 else [0]).reshape(-1)) \
                and all(int(a) == 1 for a in np.asarray(args[3] if len(args) > 3 else [1]).reshape(-1)):
            begin, stop = (int(np.asarray(a).reshape(-1)[0]) for a in args[:2])
            begin, stop = (max(0, min(rank, v + rank if v < 0 else v)) for v in (begin, stop))
            used.update(range(begin, stop))
        else:
            return None
    return used


def _shape_text(tensor: gs.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in tensor.shape) + "]" if tensor.shape is not None \
        else "(rank unknown)"


def _carrier(graph: gs.Graph, dim: str) -> tuple[gs.Tensor, int] | None:
    """A graph input with the symbolic dim ``dim``, and its axis."""
    for tensor in graph.inputs:
        for axis, own in enumerate(tensor.shape or ()):
            if own == dim:
                return tensor, axis
    return None


def _gather_dim(graph: gs.Graph, tensor: gs.Tensor, axis: int,
                cache: dict[tuple[int, int], gs.Tensor]) -> gs.Tensor:
    if (id(tensor), axis) in cache:
        return cache[id(tensor), axis]
    shape = gs.Variable(f"split_kv/{tensor.name}/shape_{axis}", np.int64, [len(tensor.shape)])
    dim = gs.Variable(f"split_kv/{tensor.name}/dim_{axis}", np.int64, [1])
    graph.nodes.append(gs.Node("Shape", name=f"split_kv/shape/{tensor.name}/{axis}",
                               inputs=[tensor], outputs=[shape]))
    graph.nodes.append(gs.Node("Gather", name=f"split_kv/gather/{tensor.name}/{axis}",
                               attrs={"axis": 0},
                               inputs=[shape, gs.Constant(f"split_kv/{tensor.name}/axis_{axis}",
                                                          np.array([axis], np.int64))],
                               outputs=[dim]))
    cache[id(tensor), axis] = dim
    return dim


# --- constant contexts: fold instead of split ---------------------------------------------------

def _fold(work: onnx.ModelProto, cross: list[AttentionMatch]
          ) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Fold the K/V of every constant-context cross-attention into initializers."""
    wanted = {b.k.tensor.name for b in cross if b.kv_source_kind == "constant"} | {
        b.v.tensor.name for b in cross if b.kv_source_kind == "constant"}
    original, graph = work, import_graph(work)
    moved = _sink_expands(graph, wanted)
    if moved:
        work = infer_shapes(export_model(graph, work))
        graph = import_graph(work)
    cross = _cross_blocks(analyze_attention(graph).blocks)
    values, needs = _dependencies(graph)
    tensors = graph.tensors()
    upstream = _upstream_ids([tensors[name] for name in sorted(wanted)])
    region = _region(graph, lambda t: id(t) in upstream and not needs[id(t)], [])
    cut = _choose_cut(region, {})
    names, mapping = _name_cut(cut, cross, lambda t: not values[id(t)], set(tensors))
    arrays = _evaluate(work, [t.name for t in cut])
    for tensor in cut:
        _replace_uses(graph, tensor, gs.Constant(names[tensor.name], arrays[tensor.name]))
    renamed = _name_constant_operands(graph, cross, mapping)
    _prune(graph)
    _refuse_unfolded(graph, wanted, cross)
    records = []
    for block, entry in zip(cross, mapping, strict=True):
        if block.kv_source_kind == "constant" and (entry["key"] or entry["value"]):
            how = ("already constant in the export" if block.id in renamed
                   else "projection folded" + (" (the batch Expand moved below it first)"
                                               if moved else ""))
            records.append({**entry, "how": how})
    if not records:  # nothing left to fold (a folded model, folded again)
        return original, []
    log.info("folded the K/V of %d constant-context cross-attention(s)", len(records))
    return export_model(graph, work), records


def _upstream_ids(tensors: list[gs.Tensor]) -> set[int]:
    """Ids of ``tensors`` and every tensor they are computed from."""
    seen: set[int] = set()
    stack = list(tensors)
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        node = producer(tensor)
        if node is not None:
            stack.extend(node.inputs)
    return seen


def _evaluate(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of the input-free tensors ``names`` of ``model``, computed by ONNX Runtime."""
    if not names:
        return {}
    from .verification import run_model

    graph = import_graph(model)
    tensors = graph.tensors()
    graph.inputs, graph.outputs = [], [tensors[name] for name in names]
    _prune(graph)
    return run_model(export_model(graph, model), {})


def _name_constant_operands(graph: gs.Graph, cross: list[AttentionMatch],
                            mapping: list[dict[str, Any]]) -> set[str]:
    """Give K/V operands that the exporter already folded their ``cross_kv`` names."""
    renamed = set()
    taken = set(graph.tensors())
    for index, (block, entry) in enumerate(zip(cross, mapping, strict=True)):
        if block.kv_source_kind != "constant":
            continue
        for role, operand in (("key", block.k), ("value", block.v)):
            tensor = operand.tensor
            if entry[role] is not None or not isinstance(tensor, gs.Constant) or \
                    tensor.name.startswith("cross_kv."):
                continue
            name = _unique_name(f"cross_kv.{index}.{role}", taken)
            _replace_uses(graph, tensor, gs.Constant(name, np.asarray(tensor.values)))
            entry[role] = name
            renamed.add(block.id)
    return renamed


def _refuse_unfolded(graph: gs.Graph, wanted: set[str], cross: list[AttentionMatch]) -> None:
    """A heavy op left computing constant-context K/V per step means the fold failed."""
    values, _ = _dependencies(graph)
    tensors = graph.tensors()
    upstream = _upstream_ids([tensors[n] for n in sorted(wanted) if n in tensors])
    for node in graph.nodes:
        if node.op in HEAVY_OPS and id(node.outputs[0]) in upstream and not any(
                values[id(t)] for t in node.inputs):
            culprit = next((producer(t) for t in node.inputs if producer(t) is not None
                            and producer(t).op == "Expand"), None)
            why = (f"its input is broadcast by Expand '{culprit.name}', which cannot be moved "
                   "below it" if culprit is not None else "its input takes its shape from the "
                   "run-time batch (an Expand reshaped before the projection cannot be moved "
                   "below it)")
            raise SplitError(f"cannot fold the constant-context K/V projection {node.op} "
                             f"'{node.name}': {why}")


def _sink_expands(graph: gs.Graph, wanted: set[str]) -> int:
    """Move Expands of constants below the MatMuls and elementwise ops that follow them on the
    way to ``wanted`` tensors, so the projections no longer depend on the batch size:
    ``MatMul(Expand(c, t), W) -> Expand(MatMul(c, W), t[:-1] + [1])`` and
    ``f(Expand(c, t), k) -> Expand(f(c, k), t)`` for elementwise ``f`` and constants ``k``."""
    moved = 0
    for _ in range(64):  # each round moves every movable Expand one op down
        tensors = graph.tensors()
        upstream = _upstream_ids([tensors[n] for n in sorted(wanted) if n in tensors])
        _, needs = _dependencies(graph)
        step = 0
        for node in list(graph.nodes):
            # Nodes this round rewrote into Expands have no entry yet: next round.
            if node.op != "Expand" or id(node.outputs[0]) not in upstream or \
                    needs.get(id(node.inputs[0]), {"?"}):
                continue
            for consumer in list(node.outputs[0].outputs):
                if id(consumer.outputs[0]) in upstream and _commute(graph, node, consumer, needs):
                    step += 1
        if not step:
            break
        moved += step
        _prune(graph)
    return moved


def _commute(graph: gs.Graph, expand: gs.Node, consumer: gs.Node,
             needs: dict[int, frozenset]) -> bool:
    """Rewrite ``consumer(Expand(c, t), ...)`` as ``Expand(consumer(c, ...), t')`` if valid."""
    data, target, expanded = expand.inputs[0], expand.inputs[1], expand.outputs[0]
    others = [t for t in consumer.inputs if t is not expanded]
    if len(consumer.outputs) != 1 or len(others) != len(consumer.inputs) - 1 or any(
            needs.get(id(t), {"?"}) for t in others):
        return False
    if consumer.op in ("MatMul", "Einsum"):
        if not _matmul_commutes(consumer, data, expanded):
            return False
        target = _last_dim_one(graph, expand)
    elif consumer.op == "LayerNormalization":
        if not _norm_commutes(consumer, data, expanded):
            return False
    elif consumer.op not in _ELEMENTWISE:
        return False
    out = consumer.outputs[0]
    inner = gs.Variable(f"{out.name}/before_expand", dtype=out.dtype)
    graph.nodes.append(gs.Node(consumer.op, name=f"{consumer.name}/before_expand",
                               attrs=dict(consumer.attrs),
                               inputs=[data if t is expanded else t for t in consumer.inputs],
                               outputs=[inner]))
    consumer.op, consumer.attrs, consumer.domain = "Expand", {}, ""
    consumer.inputs = [inner, target]
    return True


def _matmul_commutes(node: gs.Node, data: gs.Tensor, expanded: gs.Tensor) -> bool:
    """``MatMul(Expand(c), W)`` with a 2-D W and c's last dim the full contraction dim (an
    Einsum counts when it is that matmul: ``bse,ef->bsf`` or ``bse,fe->bsf``)."""
    weight = node.inputs[1]
    if node.inputs[0] is not expanded or weight.shape is None or len(weight.shape) != 2:
        return False
    contraction = 0
    if node.op == "Einsum":
        contraction = _projection_contraction(node.attrs.get("equation", ""))
        if contraction is None:
            return False
    shape = data.shape
    return (shape is not None and len(shape) >= 2 and isinstance(shape[-1], int)
            and shape[-1] == weight.shape[contraction] and shape[-1] > 1)


def _projection_contraction(equation: str) -> int | None:
    """For an Einsum that is a projection (``...c,cn->...n`` or ``...c,nc->...n``: the last
    letter of input 0 contracted with a 2-D input 1, every other letter kept in place), the
    axis of input 1 that is contracted; None for any other equation."""
    text = equation.replace(" ", "")
    if "..." in text or "->" not in text:
        return None
    inputs, output = text.split("->")
    parts = inputs.split(",")
    if len(parts) != 2 or len(parts[1]) != 2 or not parts[0]:
        return None
    prefix, contracted = parts[0][:-1], parts[0][-1]
    kept = parts[1].replace(contracted, "", 1)
    if (contracted not in parts[1] or len(kept) != 1 or kept in parts[0]
            or output != prefix + kept or len(set(parts[0])) != len(parts[0])):
        return None
    return parts[1].index(contracted)


def _norm_commutes(node: gs.Node, data: gs.Tensor, expanded: gs.Tensor) -> bool:
    """LayerNormalization over the last axis of a tensor whose last dim is not broadcast."""
    shape = data.shape
    if node.inputs[0] is not expanded or shape is None or len(node.outputs) != 1:
        return False
    axis = node.attrs.get("axis", -1)
    return axis in (-1, len(shape) - 1) and isinstance(shape[-1], int) and shape[-1] > 1


def _last_dim_one(graph: gs.Graph, expand: gs.Node) -> gs.Tensor:
    """``t[:-1] + [1]`` for Expand's target ``t``: the projection changes the last dim."""
    name = f"{expand.outputs[0].name}/target_last_1"
    existing = graph.tensors().get(name)
    if existing is not None:
        return existing
    head = gs.Variable(f"{name}/head", np.int64)
    out = gs.Variable(name, np.int64)
    graph.nodes.append(gs.Node("Slice", name=f"{name}/slice", inputs=[
        expand.inputs[1], gs.Constant(f"{name}/starts", np.array([0], np.int64)),
        gs.Constant(f"{name}/ends", np.array([-1], np.int64)),
        gs.Constant(f"{name}/axes", np.array([0], np.int64))], outputs=[head]))
    graph.nodes.append(gs.Node("Concat", name=f"{name}/concat", attrs={"axis": 0}, inputs=[
        head, gs.Constant(f"{name}/one", np.array([1], np.int64))], outputs=[out]))
    return out


def _folded_only(work: onnx.ModelProto, cross: list[AttentionMatch],
                 folded: list[dict[str, Any]]) -> SplitResult:
    """Every context was constant: no projector, the decoder holds the folded K/V."""
    if not folded:
        raise SplitError("no static inputs and no constant context: nothing to split")
    by_id = {record["attention"]: record for record in folded}
    mapping = [{k: v for k, v in by_id[b.id].items() if k != "how"} for b in cross
               if b.id in by_id]
    report = {"mode": "folded", "static_inputs": [], "cut": [], "folded": folded,
              "kept_in_decoder": [], "rewired_shape_reads": [], "projector": None,
              "decoder": _model_facts(work)}
    return SplitResult(None, work, mapping, [], report)


def _merge_folded(mapping: list[dict[str, Any]], folded: list[dict[str, Any]]) -> None:
    """In a model with both kinds of context, folded blocks take their names from the fold."""
    by_id = {record["attention"]: record for record in folded}
    for entry in mapping:
        record = by_id.get(entry["attention"])
        if record is not None:
            entry["key"] = entry["key"] or record["key"]
            entry["value"] = entry["value"] or record["value"]


def _log_summary(result: SplitResult) -> None:
    report = result.report
    if report["mode"] == "folded":
        log.info("folded the K/V of %d cross-attention(s) into constants; no projector",
                 len(report["folded"]))
        return
    log.info("split at %d tensor(s) (%s); projector %d nodes, decoder %d nodes",
             len(report["cut"]), ", ".join(r["name"] for r in report["cut"]),
             report["projector"]["nodes"], report["decoder"]["nodes"])


# --- files ------------------------------------------------------------------------------------------

def load_split(directory: str | os.PathLike, *, lazy_weights: bool = False) -> SplitResult:
    """A split written by :meth:`SplitResult.save` (or ``split-kv``), models loaded (checked;
    with ``lazy_weights`` external weights stay in their files, as for :func:`io.load`)."""
    from .split_spec import read_split_spec

    spec = read_split_spec(directory)  # checked: parts inside the directory, fields typed
    projector = (xio.load(spec.projector, lazy_weights=lazy_weights)
                 if spec.projector is not None else None)
    decoder = xio.load(spec.decoder, lazy_weights=lazy_weights)
    report = {k: spec.table.get(k) for k in ("mode", "cut", "folded")}
    return SplitResult(projector, decoder, list(spec.table.get("kv", [])),
                       list(spec.static_inputs), report)


def _runnable_parts(candidate: SplitResult | str | os.PathLike):
    """The split, and what ONNX Runtime opens for its projector and decoder: a directory's
    files where they run as stored (a 2.4 GB split is not copied into memory to be run)."""
    from . import verification as ver
    from .split_spec import read_split_spec

    if isinstance(candidate, SplitResult):
        return candidate, candidate.projector, candidate.decoder
    split = load_split(candidate, lazy_weights=True)
    spec = read_split_spec(candidate)
    projector = (ver.as_stored(split.projector, spec.projector)
                 if split.projector is not None else None)
    return split, projector, ver.as_stored(split.decoder, spec.decoder)


# --- verification ---------------------------------------------------------------------------------

def verify_split(reference: onnx.ModelProto | str | os.PathLike,
                 candidate: SplitResult | str | os.PathLike, *, inputs=None,
                 rtol: float | None = None, atol: float | None = None, seed: int = 0,
                 dims: Mapping[str, int] | None = None):
    """Run the projector on the static inputs, then the decoder on the other inputs plus the
    projected K/V, and compare the decoder's outputs with ``reference``'s.

    ``candidate`` is a :class:`SplitResult` or a split-kv directory. Inputs, tolerances, seed
    and dims mean what they mean for :func:`xattn_compiler.verification.verify`; the result is
    a :class:`~xattn_compiler.verification.VerifyResult`. A projector or decoder that does not
    run is a failed check; a reference that does not run raises :class:`InputError`.
    """
    from . import verification as ver

    split, projector, decoder = _runnable_parts(candidate)
    leaked = [n for n in _input_names(split.decoder) if n in set(split.static_inputs)]
    with contextlib.ExitStack() as stack:
        sessions = {}

        def part(name: str, model):
            # Opened on first use, kept for every input set; a part that does not load fails
            # the check (the candidate), it does not stop verification.
            if name not in sessions:
                sessions[name] = stack.enter_context(ver.model_runner(model))
            return sessions[name]

        def run(feeds):
            if leaked:
                raise ver.CandidateError(f"the decoder still takes static input '{leaked[0]}'")
            try:
                projected = part("projector", projector)(feeds) if projector is not None else {}
            except InputError as exc:
                raise ver.CandidateError(f"the projector fails: {exc}") from exc
            try:
                return part("decoder", decoder)({**feeds, **projected})
            except InputError as exc:
                raise ver.CandidateError(f"the decoder fails: {exc}") from exc

        # Every input set verify draws (several bindings of the dims), not one draw of its own.
        result = ver.verify_with(reference, run, inputs=inputs, rtol=rtol, atol=atol,
                                 seed=seed, dims=dims)
    log.info("verify split against %s: %s", ver._describe(reference),
             "PASS" if result.ok else "FAIL")
    return result


def _input_names(model: onnx.ModelProto) -> list[str]:
    initializers = {t.name for t in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in initializers]


__all__ = [
    "DECODER_FILE", "HEAVY_OPS", "PROJECTOR_FILE", "SPLIT_FILE", "SplitError", "SplitResult",
    "fold_constant_kv", "load_split", "split_static_kv", "static_heavy_nodes", "verify_split",
]


# --- shapes that shape inference left unknown -----------------------------------------------------

#: Sizes the probe binds symbolic input dims to: two runs, every symbol distinct within a run
#: and different between runs, all small so position tables and limits are never exceeded.
_PROBE_BATCH = (2, 3)
_PROBE_DIMS = ((5, 6), (7, 9), (11, 10), (13, 14), (8, 12), (15, 4), (17, 19), (21, 18))


def _complete_shapes(work: onnx.ModelProto, static: frozenset,
                     graph: gs.Graph | None = None) -> onnx.ModelProto:
    """``work`` with the dims shape inference could not name recovered by example.

    TorchScript exports compute reshape targets at run time, so ONNX shape inference leaves
    dims unknown (``unk__3``), and a K reshape may read the batch size off the query stream.
    Two runs of the model at different input sizes tell each such dim apart: equal in both
    runs it is a constant, equal to a symbolic input dim (or a multiple of one) in both it is
    that symbol. The cut and the rebuilt shape reads then work from names as for other
    exports. Dims that match nothing stay unknown; a model that does not run keeps its shapes.
    Only the tensors the split looks at count (computed from ``static`` inputs alone, or read
    by a Shape): the probe computes nothing else, and runs not at all when they are known.
    ``graph`` is ``work`` imported, when at hand. Returns ``work`` itself when nothing changed.
    """
    graph = graph if graph is not None else import_graph(work)
    values, _ = _dependencies(graph)
    targets = [t for node in graph.nodes for t in node.outputs
               if not _shape_known(t) and t.dtype is not None and (
                   (values[id(t)] and values[id(t)] <= static)
                   or any(reader.op in SHAPE_ONLY_OPS for reader in t.outputs))]
    if not targets:
        return work
    bindings = _probe_bindings(graph)
    try:
        runs = _probe_runs(work, [t.name for t in targets], bindings)
    except InputError as exc:
        log.warning("could not run the model to recover unknown dims (%s); keeping them", exc)
        return work
    recovered = {}
    for index, tensor in enumerate(targets):
        first, second = (run[f"split_kv/probe/{index}"] for run in runs)
        if len(first) == len(second):
            recovered[tensor.name] = [_name_dim(int(a), int(b), bindings, old) for a, b, old in
                                      zip(first, second, tensor.shape or [None] * len(first),
                                          strict=True)]
    log.info("recovered the shapes of %d tensor(s) by running the model twice", len(recovered))
    return _with_shapes(work, recovered, {t.name: t.dtype for t in targets})


def _probe_bindings(graph: gs.Graph) -> list[dict[str, int]]:
    symbols = []
    for tensor in graph.inputs:
        for dim in tensor.shape or ():
            if isinstance(dim, str) and dim and dim not in symbols:
                symbols.append(dim)
    bindings: list[dict[str, int]] = [{}, {}]
    others = iter(_PROBE_DIMS + tuple((23 + 2 * i, 24 + 2 * i) for i in range(len(symbols))))
    for symbol in symbols:
        pair = _PROBE_BATCH if "batch" in symbol.lower() else next(others)
        bindings[0][symbol], bindings[1][symbol] = pair
    return bindings


def _probe_runs(work: onnx.ModelProto, names: list[str],
                bindings: list[dict[str, int]]) -> list[dict[str, np.ndarray]]:
    """The shapes of the tensors ``names`` in two runs on random inputs (``bindings``)."""
    from .verification import random_inputs, run_model

    graph = import_graph(work)
    tensors = graph.tensors()
    outputs = []
    for index, name in enumerate(names):
        out = gs.Variable(f"split_kv/probe/{index}", np.int64, [None])
        graph.nodes.append(gs.Node("Shape", name=f"split_kv/probe/{index}",
                                   inputs=[tensors[name]], outputs=[out]))
        outputs.append(out)
    graph.outputs = outputs
    probe = export_model(graph, work)
    return [run_model(probe, random_inputs(probe, seed=seed, dims=binding))
            for seed, binding in enumerate(bindings)]


def _name_dim(first: int, second: int, bindings: list[dict[str, int]], old: Any) -> Any:
    """A dim's name from its sizes in the two probe runs."""
    if first == second:
        return first
    symbols = list(bindings[0])
    for symbol in symbols:
        size, other = bindings[0][symbol], bindings[1][symbol]
        if (first, second) == (size, other):
            return symbol
        if first % size == 0 and first // size > 1 and second == other * (first // size):
            return f"{first // size}*{symbol}"
    for i, one in enumerate(symbols):  # a flattened pair, such as batch*seq
        for two in symbols[i + 1:]:
            if (first, second) == (bindings[0][one] * bindings[0][two],
                                   bindings[1][one] * bindings[1][two]):
                return f"{one}*{two}"
    return old


def _with_shapes(work: onnx.ModelProto, shapes: dict[str, list], dtypes: dict[str, Any]
                 ) -> onnx.ModelProto:
    """A copy of ``work`` whose value_info holds ``shapes``."""
    out = onnx.ModelProto()
    out.CopyFrom(work)
    infos = {v.name: v for v in out.graph.value_info}
    infos.update({v.name: v for v in out.graph.output})
    for name, dims in shapes.items():
        info = infos.get(name)
        if info is None:
            elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[name]))
            info = out.graph.value_info.add()
            info.CopyFrom(onnx.helper.make_tensor_value_info(name, elem, None))
        shape = info.type.tensor_type.shape
        shape.ClearField("dim")
        for dim in dims:
            entry = shape.dim.add()
            if isinstance(dim, (int, np.integer)) and dim >= 0:
                entry.dim_value = int(dim)
            elif isinstance(dim, str) and dim:
                entry.dim_param = dim
    return out
