"""``div-to-mul``: a division by a constant becomes a multiplication by its reciprocal.

    Div(x, c) -> Mul(x, r)      c a float constant (scalar or tensor, an initializer or a
                                Constant node), r = cast(1 / float64(c)) in c's element type

so the attention matcher and the fusion see a scale as ``Mul`` only (``QK / sqrt(d)`` and
``QK * d**-0.5`` are one spelling). Every Div by such a constant is rewritten, not only score
scales: the rewrite is local and keeps broadcasting (same shapes, same element type).

Exactness: for c a power of two (in every element) r is exact and ``x * r == x / c`` bit for
bit. Otherwise r is rounded once and ``x * r`` may differ from the correctly rounded ``x / c``
by one unit in the last place (rarely two): far inside ``verify``'s tolerances, and what every
exporter that writes ``* scale`` does anyway. The rewrite is refused (counted in
``divs_skipped``, with the reason in the details) when c holds a zero, an infinity or a NaN, or
when some 1/c would not be a normal number of c's type (overflow, or a subnormal that loses
precision). Integer Divs (they truncate), bfloat16 divisors and divisors whose bytes live
outside the model (detached weights) are no candidates. r is a new initializer, one per divisor
and graph; c goes when nothing else reads it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from ._normalize import DEFAULT_DOMAINS, ModelEdit, NormalizingPass, Scope, readers

log = logging.getLogger(__name__)

#: Divisor types rewritten: numpy rounds their reciprocal once from float64.
_FLOATS = (np.float16, np.float32, np.float64)


class DivToMul(NormalizingPass):
    """Div(x, c) -> Mul(x, 1/c) for a float constant c with a normal, finite reciprocal."""

    name = "div-to-mul"
    description = "Div by a float constant as Mul by its reciprocal (the scale spelled once)"
    candidate_ops = frozenset({"Div"})
    rewritten_key = "divs_rewritten"
    skipped_key = "divs_skipped"

    def __init__(self, **values):
        super().__init__(**values)
        self._divisors: set[str] = set()

    def apply(self, edit: ModelEdit) -> int:
        self._divisors = set()
        return super().apply(edit)

    def rewrite(self, graph: onnx.GraphProto, scope: Scope, edit: ModelEdit, path: str) -> int:
        done = 0
        reciprocals: dict[str, str] = {}
        for node in graph.node:
            if node.op_type != "Div" or node.domain not in DEFAULT_DOMAINS:
                continue
            if len(node.input) != 2 or len(node.output) != 1:
                continue
            divisor = node.input[1]
            value = scope.constant(divisor)
            if value is None or value.dtype not in _FLOATS:
                continue
            reason = refusal(value)
            if reason:
                self.skip(node, path, reason)
                continue
            if divisor not in reciprocals:
                reciprocals[divisor] = edit.fresh(f"{divisor}_reciprocal")
                graph.initializer.append(
                    numpy_helper.from_array(reciprocal(value), reciprocals[divisor]))
            node.op_type = "Mul"
            node.input[1] = reciprocals[divisor]
            self._divisors.add(divisor)
            done += 1
        return done

    def finish(self, edit: ModelEdit) -> None:
        """Drop the divisors nothing reads any more (initializers and Constant nodes)."""
        read = readers(edit.model)
        unread = {name for name in self._divisors if not read.get(name)}
        if not unread:
            return
        for _, graph, _ in edit.graphs():
            kept = [t for t in graph.initializer if t.name not in unread]
            if len(kept) != len(graph.initializer):
                _replace(graph.initializer, kept)
            nodes = [n for n in graph.node
                     if not (n.op_type == "Constant" and n.output and n.output[0] in unread)]
            if len(nodes) != len(graph.node):
                _replace(graph.node, nodes)


def _replace(field, items: list) -> None:
    del field[:]
    field.extend(items)


def reciprocal(value: np.ndarray) -> np.ndarray:
    """1/value computed in float64 and rounded once to value's type (same shape)."""
    with np.errstate(divide="ignore", over="ignore"):
        return np.asarray(1.0 / value.astype(np.float64)).astype(value.dtype)


def refusal(value: np.ndarray) -> str | None:
    """Why ``x * reciprocal(value)`` would not stand for ``x / value``, or None."""
    if value.size == 0:
        return "an empty divisor"
    if not np.all(np.isfinite(value)):
        return "the divisor holds an infinity or a NaN"
    if np.any(value == 0):
        return "the divisor holds a zero"
    magnitude = np.abs(reciprocal(value))
    if not np.all(np.isfinite(magnitude)) or np.any(magnitude < np.finfo(value.dtype).tiny):
        return "a reciprocal is not a normal number of the divisor's type"
    return None


__all__ = ["DivToMul", "reciprocal", "refusal"]
