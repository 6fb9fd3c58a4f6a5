"""Unrolling ``Loop`` and ``Scan``: one copy of the body per iteration (see :mod:`.control_flow`).

Each rule checks everything first (trip count, condition, bound, lengths) and records a refusal
on the context when one fails; only then does it release the node and build the copies, so a
refused node is left exactly as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from xattn_compiler.ir import producer

from .control_flow_clone import (
    bind,
    clone_nodes,
    computed_in,
    discard_bodies,
    release,
    seed_outputs,
)
from .control_flow_eval import Unknown, as_bool, as_int, compile_time_value

if TYPE_CHECKING:
    from .control_flow import Context


# --- Loop -----------------------------------------------------------------------------------------

def unroll_loop(node: gs.Node, graph: gs.Graph, path: str, ctx: Context
                 ) -> list[gs.Node] | None:
    trips = _loop_trips(node, ctx.opset, path, ctx)
    if trips is None:
        return None
    body = node.attrs["body"]
    n_carried = len(node.inputs) - 2
    n_scan = len(body.outputs) - 1 - n_carried
    if trips == 0 and n_scan:
        ctx.refuse(node, path, "zero iterations with scan outputs: their element shape is "
                               "not known without running the body")
        return None
    outputs = list(node.outputs)
    carried = list(node.inputs[2:])
    release(node)
    new: list[gs.Node] = []
    scans: list[list[gs.Tensor]] = []
    counter, cond_in = body.inputs[0], body.inputs[1]
    for i in range(trips):
        mapping: dict[int, gs.Tensor] = {
            id(counter): gs.Constant(ctx.names.fresh(f"{counter.name}.iter{i}"),
                                     np.array(i, np.int64)),
            id(cond_in): gs.Constant(ctx.names.fresh(f"{cond_in.name}.iter{i}"),
                                     np.array(True)),
        }
        mapping.update({id(inner): value for inner, value in zip(body.inputs[2:], carried,
                                                                 strict=True)})
        if i == trips - 1:
            for inner, outer in seed_outputs(body.outputs[1:1 + n_carried],
                                              outputs[:n_carried], body).items():
                mapping.setdefault(inner, outer)
        new += clone_nodes(body.nodes, mapping, _iteration_names(ctx, i),
                           lambda name, i=i: f"{name}.iter{i}")
        carried = [mapping.get(id(t), t) for t in body.outputs[1:1 + n_carried]]
        scans.append([mapping.get(id(t), t) for t in body.outputs[1 + n_carried:]])
    new += bind(outputs[:n_carried], carried, graph, node.name)
    for k, target in enumerate(outputs[n_carried:]):
        new += _stack([scan[k] for scan in scans], target, 0, node.name, k, graph, ctx)
    discard_bodies(node)
    ctx.count("loops_unrolled")
    ctx.count("iterations", trips)
    return new


def _iteration_names(ctx: Context, i: int):
    return lambda name: ctx.names.fresh(f"{name}.iter{i}")


def _loop_trips(node: gs.Node, opset: int, path: str, ctx: Context) -> int | None:
    """How many times the Loop runs, or None (refused, with the reason recorded)."""
    limit, condition = node.inputs[0], node.inputs[1]
    if not limit.name:
        ctx.refuse(node, path, "no trip count M: a while loop runs until its condition fails")
        return None
    try:
        trips = max(0, as_int(compile_time_value(limit, opset), "the trip count"))
        first = True if not condition.name else as_bool(
            compile_time_value(condition, opset), "the condition")
    except Unknown as why:
        ctx.refuse(node, path, f"trip count or condition not known at compile time ({why})"
                               f"{ctx.hint(limit, condition)}")
        return None
    if not first:
        return 0
    body = node.attrs["body"]
    if not _condition_stays_true(body, opset):
        ctx.refuse(node, path, f"the body computes its condition '{body.outputs[0].name}' "
                               "(a while loop): only a constant true or the incoming "
                               "condition passed through unrolls")
        return None
    if trips > ctx.max_trip_count:
        ctx.refuse(node, path, f"trip count {trips} exceeds max-trip-count "
                               f"{ctx.max_trip_count}")
        return None
    return trips


def _condition_stays_true(body: gs.Graph, opset: int) -> bool:
    out = body.outputs[0]
    while producer(out) is not None and producer(out).op == "Identity" \
            and computed_in(out, body):
        out = producer(out).inputs[0]
    if out is body.inputs[1]:
        return True
    try:
        return as_bool(compile_time_value(out, opset), "the body's condition")
    except Unknown:
        return False


def _stack(pieces: list[gs.Tensor], target: gs.Tensor, axis: int, owner: str, k: int,
           graph: gs.Graph, ctx: Context) -> list[gs.Node]:
    """``target = Concat(Unsqueeze(piece, axis)...)``: scan outputs stacked along ``axis``."""
    if not target.name:  # an optional output nobody asked for
        return []
    opset = ctx.opset
    axes = gs.Constant(ctx.names.fresh(f"{owner}.stack{k}.axes"), np.array([axis], np.int64))
    nodes, parts = [], []
    for i, piece in enumerate(pieces):
        last = len(pieces) == 1
        out = target if last else gs.Variable(ctx.names.fresh(f"{target.name}.iter{i}"),
                                              dtype=piece.dtype)
        if opset >= 13:
            nodes.append(gs.Node("Unsqueeze", f"{owner}.stack{k}.iter{i}", inputs=[piece, axes],
                                 outputs=[out]))
        else:
            nodes.append(gs.Node("Unsqueeze", f"{owner}.stack{k}.iter{i}", {"axes": [axis]},
                                 inputs=[piece], outputs=[out]))
        parts.append(out)
    if len(pieces) > 1:
        nodes.append(gs.Node("Concat", f"{owner}.stack{k}", {"axis": axis}, inputs=parts,
                             outputs=[target]))
    return nodes


# --- Scan -----------------------------------------------------------------------------------------

def unroll_scan(node: gs.Node, graph: gs.Graph, path: str, ctx: Context
                 ) -> list[gs.Node] | None:
    opset = ctx.opset
    if opset < 9:
        ctx.refuse(node, path, f"Scan of opset {opset} (with a batch axis) is not unrolled")
        return None
    body = node.attrs["body"]
    n_in = node.attrs["num_scan_inputs"]
    n_state = len(node.inputs) - n_in
    xs = list(node.inputs[n_state:])
    in_axes = list(node.attrs.get("scan_input_axes", [0] * n_in))
    in_dirs = list(node.attrs.get("scan_input_directions", [0] * n_in))
    n_out = len(body.outputs) - n_state
    out_axes = list(node.attrs.get("scan_output_axes", [0] * n_out))
    out_dirs = list(node.attrs.get("scan_output_directions", [0] * n_out))
    length = _scan_length(xs, in_axes)
    if isinstance(length, str):
        ctx.refuse(node, path, length)
        return None
    if length > ctx.max_trip_count:
        ctx.refuse(node, path, f"sequence length {length} exceeds max-trip-count "
                               f"{ctx.max_trip_count}")
        return None
    if length == 0 and n_out:
        ctx.refuse(node, path, "an empty sequence with scan outputs: their element shape is "
                               "not known without running the body")
        return None
    outputs = list(node.outputs)
    states = list(node.inputs[:n_state])
    release(node)
    new: list[gs.Node] = []
    scans: list[list[gs.Tensor]] = []
    for t in range(length):
        mapping = {id(inner): value for inner, value in zip(body.inputs[:n_state], states,
                                                            strict=True)}
        for m, (x, axis, reverse) in enumerate(zip(xs, in_axes, in_dirs, strict=True)):
            step = length - 1 - t if reverse else t
            index = gs.Constant(ctx.names.fresh(f"{node.name}.index{step}"),
                                np.array(step, np.int64))
            element = body.inputs[n_state + m]
            piece = gs.Variable(ctx.names.fresh(f"{element.name}.iter{t}"), dtype=element.dtype)
            new.append(gs.Node("Gather", f"{node.name}.input{m}.iter{t}", {"axis": axis},
                               inputs=[x, index], outputs=[piece]))
            mapping[id(element)] = piece
        if t == length - 1:
            for inner, outer in seed_outputs(body.outputs[:n_state], outputs[:n_state],
                                              body).items():
                mapping.setdefault(inner, outer)
        new += clone_nodes(body.nodes, mapping, _iteration_names(ctx, t),
                           lambda name, t=t: f"{name}.iter{t}")
        states = [mapping.get(id(v), v) for v in body.outputs[:n_state]]
        scans.append([mapping.get(id(v), v) for v in body.outputs[n_state:]])
    new += bind(outputs[:n_state], states, graph, node.name)
    for k, target in enumerate(outputs[n_state:]):
        pieces = [scan[k] for scan in scans]
        new += _stack(pieces[::-1] if out_dirs[k] else pieces, target, out_axes[k], node.name,
                      k, graph, ctx)
    discard_bodies(node)
    ctx.count("scans_unrolled")
    ctx.count("iterations", length)
    return new


def _scan_length(xs: list[gs.Tensor], axes: list[int]) -> int | str:
    """The common static length of the scan inputs along their axes, or why there is none."""
    lengths = set()
    for x, axis in zip(xs, axes, strict=True):
        shape = x.shape
        if shape is None or not -len(shape) <= axis < len(shape):
            return f"scan input '{x.name}' has no known shape"
        dim = shape[axis]
        if not isinstance(dim, int) or dim < 0:
            return f"scan input '{x.name}' has a dynamic length ({dim!r} on axis {axis})"
        lengths.add(dim)
    if len(lengths) != 1:
        return f"scan inputs differ in length ({sorted(lengths)})" if lengths else \
            "no scan inputs"
    return lengths.pop()
