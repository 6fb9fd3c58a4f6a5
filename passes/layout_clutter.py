"""``remove-layout-clutter``: the layout clean-ups, repeated until none changes the graph.

    cancel-transposes        Transpose(Transpose(x)) -> Transpose(x) | x
    sink-transposes          Transposes moved through elementwise ops until they meet and cancel
    canonical-key-transpose  K^T as one Transpose from the head-split layout
    simplify-reshapes        Reshape chains merged, computed targets made constant,
                             Squeeze/Unsqueeze pairs and no-op Casts removed
    collapse-batched-heads   the [B*H, S, D] attention core run on [B, H, S, D]
    fold-batch-axes          a [B, N, H, S, D] attention core run on [B*N, H, S, D]

Each step is a pass of its own (usable alone, listed by ``xattn-compiler passes``); this one
runs them in that order on one graph per round, rounds to a fixpoint, and adds up their
counts, so a rewrite that exposes another (a collapsed core leaving two Transposes to cancel)
is taken in the same call.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from xattn_compiler.ir import remove_dead_nodes
from xattn_compiler.passmanager import Pass
from xattn_compiler.rewrite import GraphPass

from .batched_heads import CollapseBatchedHeads
from .fold_batch_axes import FoldBatchAxes
from .reshapes import SimplifyReshapes
from .transposes import CancelTransposes, CanonicalKeyTranspose, SinkTransposes

STEPS: tuple[type[Pass], ...] = (CancelTransposes, SinkTransposes, CanonicalKeyTranspose,
                                 SimplifyReshapes, CollapseBatchedHeads, FoldBatchAxes)


class RemoveLayoutClutter(GraphPass):
    """Every layout clean-up, to a fixpoint."""

    name = "remove-layout-clutter"
    description = "cancel/merge/sink Transposes, simplify Reshapes, collapse batched heads"
    max_rounds = 8

    def __init__(self, **values):
        super().__init__(**values)
        self.steps = [step() for step in STEPS]
        for step in self.steps:
            step.starts_clean = True  # rewrite() below keeps the graph free of dead nodes

    def rewrite(self, graph: gs.Graph, path: str) -> dict[str, int]:
        # One import and one export per round for all six steps: the graphsurgeon round trip,
        # not the rewrites, is what costs on large graphs. A step that needs a shape an earlier
        # step invalidated leaves that spot alone; the next round (fresh shapes) takes it.
        totals: dict[str, int] = {}
        remove_dead_nodes(graph)
        for step in self.steps:
            counts = step.rewrite(graph, path)
            for key, value in counts.items():
                totals[f"{step.name}.{key}"] = totals.get(f"{step.name}.{key}", 0) + value
            if any(counts.values()):
                remove_dead_nodes(graph)
        return totals
