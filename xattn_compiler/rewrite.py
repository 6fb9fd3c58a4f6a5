"""What graph-rewriting passes share: a base that runs a rewrite on every (sub)graph, and edits.

A :class:`GraphPass` implements ``rewrite(graph, path) -> counts`` on one onnx-graphsurgeon
graph (the top level, then each If/Loop/Scan body, innermost first so a body is clean before
the node that owns it is looked at). The base imports the model with fresh shape information,
runs the rewrite, removes what became dead, exports, re-infers shapes, and reports
``changed`` when any count is non-zero. A rewrite never touches its input model.

Edits keep graph outputs and graph inputs: :func:`replace_uses` refuses to rename a graph
output, so a rewrite that would have to is skipped rather than changing the model's interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from .ir import (
    export_model,
    import_with_shapes,
    infer_shapes,
    is_graph_output,
    iter_graphs,
    refresh_shapes,
)
from .passmanager import Pass, PassResult, paused_gc


class GraphPass(Pass):
    """A pass that rewrites each graph and body in place and counts what it did.

    It runs again on its own output until that changes nothing (at most ``max_rounds``): a
    round trip can teach shape inference something it could not see before (a body reading an
    outer initializer gets shapes only once the export moved the initializer into the body),
    and a second call must find nothing left to do.
    """

    max_rounds: ClassVar[int] = 4
    #: Set by a caller that removes dead nodes before each call (remove-layout-clutter), so a
    #: rewrite that needs the live nodes may skip its own liveness walk.
    starts_clean: bool = False

    def rewrite(self, graph: gs.Graph, path: str) -> dict[str, int]:
        raise NotImplementedError

    def run(self, model: onnx.ModelProto) -> PassResult:
        with paused_gc():
            return self._run(model)

    def _run(self, model: onnx.ModelProto) -> PassResult:
        # One import for all rounds: after a round's export and shape inference the graph only
        # takes the new shapes (refresh_shapes), which costs a fraction of a fresh import.
        graph = import_with_shapes(model)
        totals: dict[str, int] = {}
        changed = False
        for _ in range(self.max_rounds):
            counts = self._rewrite_all(graph)
            for key, value in counts.items():
                totals[key] = totals.get(key, 0) + value
            if not any(counts.values()):
                break
            changed = True
            model = infer_shapes(export_model(graph, model), in_place=True)
            refresh_shapes(graph, model)
        return PassResult(model, changed, totals)

    def _rewrite_all(self, graph: gs.Graph) -> dict[str, int]:
        totals: dict[str, int] = {}
        for path, body in reversed(list(iter_graphs(graph))):
            for key, value in self.rewrite(body, path).items():
                totals[key] = totals.get(key, 0) + value
        return totals


def replace_uses(old: gs.Tensor, new: gs.Tensor, graph: gs.Graph) -> bool:
    """Make every reader of ``old`` read ``new``; False (nothing changed) if ``old`` is an output.

    Readers inside nested bodies are consumers too, so they follow.
    """
    if is_graph_output(old, graph):
        return False
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new
    return True


def bypass(node: gs.Node, graph: gs.Graph, index: int = 0) -> bool:
    """Remove a one-output node whose output equals its input ``index``; False if it must stay."""
    if not replace_uses(node.outputs[0], node.inputs[index], graph):
        return False
    node.inputs.clear()
    node.outputs.clear()
    return True


def only_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The single node reading ``tensor``, when it has exactly one and is not an output."""
    if len(tensor.outputs) != 1 or is_graph_output(tensor, graph):
        return None
    return tensor.outputs[0]


def static_shape(tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The shape when every dim is a known integer."""
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(shape)


def compose_perms(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """The single perm equal to Transpose(first) then Transpose(second)."""
    return [first[axis] for axis in second]


def invert_perm(perm: Sequence[int]) -> list[int]:
    inverse = [0] * len(perm)
    for position, axis in enumerate(perm):
        inverse[axis] = position
    return inverse


def is_identity_perm(perm: Sequence[int]) -> bool:
    return list(perm) == list(range(len(perm)))


def transpose_perm(node: gs.Node) -> list[int] | None:
    """A Transpose's perm (the default reverses the axes when the rank is known)."""
    perm = node.attrs.get("perm")
    if perm is not None:
        return list(perm)
    shape = node.inputs[0].shape
    return list(reversed(range(len(shape)))) if shape is not None else None
