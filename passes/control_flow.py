"""Control flow unrolled and specialised, so attention in bodies is seen by every later pass.

``c`` is a value known at compile time (a constant, or computed from constants and static
shapes; :mod:`.control_flow_eval`), ``x.iter<i>`` a body tensor or node copied for iteration
``i``::

    inline-constant-if
        If(c, then=T, else=E) -> T if c else E      the branch's nodes join the owning graph
                                                    under their own names, its outputs become
                                                    the If's outputs

    unroll-loops                                    (up to max-trip-count iterations)
        Loop(M=c, cond, v0..., body(i, cond_in, v...) -> (cond_out, v'..., s...))
            -> body.iter0(0, true, v0...) ; body.iter1(1, true, v'.iter0...) ; ...
               final v = v'.iter<M-1>,  s stacked = Concat(Unsqueeze(s.iter<i>, 0) for each i)
            when cond is absent or c, and cond_out is a constant true or cond_in passed
            through (so the condition never changes); cond = false: zero iterations
        Scan(v0..., x..., body(v..., x_t...) -> (v'..., y_t...))
            -> body.iter<t>(v..., Gather(x, t, axis)...) for t < L, L static;
               y = Concat(Unsqueeze(y.iter<t>, axis) ...) (directions honoured)

    specialize-inputs{values=NAME=VALUE,...}
        graph input NAME -> constant VALUE (its shape must be static), then both rules
        above; graph inputs no longer read afterwards are removed

    unroll-control-flow{values=... max-trip-count=N}
        all of the above, in one graph, to a fixpoint

Bodies are handled innermost first, so an If inside a Loop body is inlined before the Loop is
unrolled; an If whose condition reads the iteration counter becomes inlinable once the copies
hold the counter as a constant (the next round). Tensors a body reads from outer scopes stay
shared by every copy. A rule that cannot apply (condition or trip count not known, a while
loop, more iterations than the bound, a scan length that is not static) leaves the node as
it is and says why in ``details["refused"]``; nothing is rewritten half way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.errors import InputError
from xattn_compiler.ir import (
    export_model,
    import_graph,
    infer_shapes,
    iter_graphs,
    iter_nodes,
    refresh_shapes,
    remove_dead_nodes,
)
from xattn_compiler.passmanager import Option, Pass, PassResult

from .control_flow_clone import Names, bind, clone_nodes, discard_bodies, release, seed_outputs
from .control_flow_eval import Unknown, as_bool, compile_time_value
from .control_flow_loops import unroll_loop, unroll_scan
from .control_flow_specialize import (
    parse_values,
    pin_inputs,
    remove_unread_inputs,
    verify_specialized,
)

__all__ = ["InlineConstantIf", "SpecializeInputs", "UnrollControlFlow", "UnrollLoops",
           "parse_values", "run_rules", "specialize", "verify_specialized"]

log = logging.getLogger(__name__)

DEFAULT_MAX_TRIP_COUNT = 64
_MAX_ROUNDS = 8


@dataclass
class Context:
    """One run of the rules: the options, fresh names, counts and refusals of the round."""

    top: gs.Graph
    inline_ifs: bool
    unroll: bool
    max_trip_count: int
    counts: dict[str, int] = field(default_factory=dict)
    refused: list[dict[str, str]] = field(default_factory=list)
    _names: Names | None = None

    @property
    def names(self) -> Names:
        if self._names is None:
            self._names = Names(self.top)
        return self._names

    @property
    def opset(self) -> int:
        """The default domain's opset (bodies share the model's imports)."""
        return self.top.opset or 1

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def hint(self, *tensors: gs.Tensor) -> str:
        """How to make a graph input among ``tensors`` known: specialise it."""
        inputs = [t.name for t in tensors if any(t is i for i in self.top.inputs)]
        return f"; specialise it: --specialize {inputs[0]}=VALUE" if inputs else ""

    def refuse(self, node: gs.Node, path: str, reason: str) -> None:
        self.refused.append({"node": node.name, "op": node.op, "graph": path, "reason": reason})
        log.info("%s '%s'%s left as it is: %s", node.op, node.name,
                 f" (in {path})" if path else "", reason)


# --- the driver -----------------------------------------------------------------------------------

def _rewrite_graph(graph: gs.Graph, path: str, ctx: Context) -> None:
    """Apply the rules to each control-flow node of one graph (its bodies were done before)."""
    for node in list(graph.nodes):
        if node.op == "If" and ctx.inline_ifs:
            new = _inline_if(node, graph, path, ctx)
        elif node.op == "Loop" and ctx.unroll:
            new = unroll_loop(node, graph, path, ctx)
        elif node.op == "Scan" and ctx.unroll:
            new = unroll_scan(node, graph, path, ctx)
        else:
            continue
        if new is not None:
            index = next(i for i, n in enumerate(graph.nodes) if n is node)
            graph.nodes[index:index + 1] = new


def _has_control_flow(graph: gs.Graph) -> bool:
    return any(node.op in ("If", "Loop", "Scan") for _, body in iter_graphs(graph)
               for node in body.nodes)


def _round(graph: gs.Graph, ctx: Context) -> None:
    for path, body in reversed(list(iter_graphs(graph))):
        _rewrite_graph(body, path, ctx)


def run_rules(model: onnx.ModelProto, *, inline_ifs: bool = True, unroll: bool = True,
              max_trip_count: int = DEFAULT_MAX_TRIP_COUNT,
              values: Mapping[str, Any] | None = None) -> PassResult:
    """Specialise ``values`` (graph input name -> value), then apply the rules to a fixpoint.

    Rounds repeat on one graph: a round's rewrites can make a condition known (the copies of
    an iteration counter) or expose a body that the next round unrolls.
    """
    if not values and not any(node.op_type in ("If", "Loop", "Scan")
                              for node in iter_nodes(model.graph)):
        # Nothing to do, and nothing to import: a large model without control flow costs
        # this pass one walk over its nodes.
        return PassResult(model, False, {}, {"specialized": [], "not_inputs": [], "refused": []})
    # A copy: unrolling renames cloned constants, which graphsurgeon would write back into
    # the tensors of the model it imported.
    graph = import_graph(infer_shapes(model))
    remove_dead_nodes(graph)
    read_before = {t.name for t in graph.inputs if t.outputs}
    pinned, details = pin_inputs(graph, values or {})
    totals: dict[str, int] = {"inputs_specialized": len(pinned)} if values else {}
    changed = stale = bool(pinned)   # stale: edited since shapes were last inferred
    refused: list[dict[str, str]] = []
    for _ in range(_MAX_ROUNDS):
        ctx = Context(graph, inline_ifs, unroll, max_trip_count)
        _round(graph, ctx)
        refused = ctx.refused
        for key, value in ctx.counts.items():
            totals[key] = totals.get(key, 0) + value
        changed |= bool(ctx.counts)
        stale |= bool(ctx.counts)
        if not stale or not _has_control_flow(graph):
            break
        # Fresh shapes can make a refused rule apply (a scan length, Shape of a copy's
        # tensor): infer them and go again. Exports of big models dominate, so only then.
        model = infer_shapes(export_model(graph, model), in_place=True)
        refresh_shapes(graph, model)
        stale = False
    if values is not None:
        removed = remove_unread_inputs(graph, read_before)
        totals["inputs_removed"] = len(removed)
        details["removed_inputs"] = removed
        changed |= bool(removed)
    if changed:
        model = infer_shapes(export_model(graph, model), in_place=True)
    details["refused"] = refused
    return PassResult(model, changed, totals, details)


# --- If -------------------------------------------------------------------------------------------

def _inline_if(node: gs.Node, graph: gs.Graph, path: str, ctx: Context) -> list[gs.Node] | None:
    condition = node.inputs[0]
    try:
        taken = as_bool(compile_time_value(condition, ctx.opset), "the condition")
    except Unknown as why:
        ctx.refuse(node, path, f"condition '{condition.name}' is not known at compile time "
                               f"({why}){ctx.hint(condition)}")
        return None
    branch = node.attrs["then_branch" if taken else "else_branch"]
    outputs = list(node.outputs)
    if len(branch.outputs) != len(outputs):
        ctx.refuse(node, path, f"the {'then' if taken else 'else'} branch has "
                               f"{len(branch.outputs)} outputs, the If {len(outputs)}")
        return None
    release(node)
    mapping = seed_outputs(branch.outputs, outputs, branch)
    new = clone_nodes(branch.nodes, mapping, _same, _same)
    new += bind(outputs, [mapping.get(id(t), t) for t in branch.outputs], graph, node.name)
    discard_bodies(node)
    ctx.count("ifs_inlined")
    return new


def _same(name: str) -> str:
    return name


# --- specialising inputs ----------------------------------------------------------------------------

def specialize(model: onnx.ModelProto, values: Mapping[str, Any], *,
               max_trip_count: int = DEFAULT_MAX_TRIP_COUNT) -> PassResult:
    """``model`` with graph inputs fixed to ``values`` (name -> value or text), control flow
    inlined and unrolled, and inputs that are no longer read removed.

    Unlike the pass (which must run twice without complaint), a name that is not a graph
    input is an :class:`InputError` naming the inputs there are.
    """
    names = [value.name for value in model.graph.input]
    unknown = [name for name in values if name not in names]
    if unknown:
        raise InputError(f"specialise: no graph input {', '.join(repr(u) for u in unknown)} "
                         f"(inputs: {', '.join(names)})")
    return run_rules(model, max_trip_count=max_trip_count, values=values)


# --- the passes ---------------------------------------------------------------------------------

_MAX_TRIPS = Option("max-trip-count", int, DEFAULT_MAX_TRIP_COUNT,
                    "unroll a Loop or Scan only up to this many iterations")
_VALUES = Option("values", str, "", "graph inputs to fix, NAME=VALUE separated by commas "
                                    "(e.g. use_cache_branch=false)")


class InlineConstantIf(Pass):
    """If with a condition known at compile time -> the nodes of the branch it takes."""

    name = "inline-constant-if"
    description = "inline each If whose condition is known at compile time"

    def run(self, model: onnx.ModelProto) -> PassResult:
        return run_rules(model, unroll=False)


class UnrollLoops(Pass):
    """Loop with a static trip count and an unchanging condition, Scan with a static length ->
    one copy of the body per iteration."""

    name = "unroll-loops"
    description = "unroll Loop and Scan with a static trip count, up to max-trip-count"
    options = (_MAX_TRIPS,)

    def run(self, model: onnx.ModelProto) -> PassResult:
        return run_rules(model, inline_ifs=False, max_trip_count=self.option("max-trip-count"))


class SpecializeInputs(Pass):
    """Graph inputs fixed to given values, then If inlined and Loop/Scan unrolled; inputs no
    longer read are removed."""

    name = "specialize-inputs"
    description = "fix graph inputs to values (use_cache_branch=false), inline and unroll"
    options = (_VALUES, _MAX_TRIPS)

    def run(self, model: onnx.ModelProto) -> PassResult:
        return run_rules(model, max_trip_count=self.option("max-trip-count"),
                         values=parse_values(self.option("values")))


class UnrollControlFlow(Pass):
    """Every control-flow rule (specialise, inline If, unroll Loop/Scan) to a fixpoint."""

    name = "unroll-control-flow"
    description = "specialise inputs, inline constant If, unroll static Loop/Scan (fixpoint)"
    options = (_VALUES, _MAX_TRIPS)

    def run(self, model: onnx.ModelProto) -> PassResult:
        values = parse_values(self.option("values"))
        return run_rules(model, max_trip_count=self.option("max-trip-count"),
                         values=values or None)
