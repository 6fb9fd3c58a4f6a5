"""``normalize-spellings``: the spelling normalisations, on one copy of the model.

    einsum-to-matmul   Einsum(a, b) that is a batched matmul -> [Transpose] MatMul [Transpose]
    div-to-mul         Div(x, c) -> Mul(x, 1/c) for a float constant c

Each step is a pass of its own (usable alone, listed by ``xattn-compiler passes``); this one
runs them in that order on one copy of the model, so the pipeline pays one copy and one walk
per step for all of them (no graph import, no export, no shape inference: see
``passes/_normalize.py``), and nothing at all when the model holds none of the ops they
rewrite. The matcher after it sees one spelling of the score MatMul and of the scale. Counts
are the steps' counts prefixed with the step's name; the details list, per step, every
candidate it left alone with the reason. No step makes work for an earlier one, so one round
is a fixpoint: a second run changes nothing.
"""

from __future__ import annotations

import onnx

from xattn_compiler.passmanager import PassResult

from ._normalize import ModelEdit, NormalizingPass, has_ops
from .normalize_div import DivToMul
from .normalize_einsum import EinsumToMatMul

STEPS: tuple[type[NormalizingPass], ...] = (EinsumToMatMul, DivToMul)


class NormalizeSpellings(NormalizingPass):
    """Every spelling normalisation, on one copy of the model."""

    name = "normalize-spellings"
    description = "Einsum as MatMul, Div by a constant as Mul: one spelling for the matcher"

    def __init__(self, **values):
        super().__init__(**values)
        self.steps = [step() for step in STEPS]

    def has_candidates(self, model: onnx.ModelProto) -> bool:
        return has_ops(model, frozenset().union(*(step.candidate_ops for step in self.steps)))

    def run(self, model: onnx.ModelProto) -> PassResult:
        for step in self.steps:
            step.skipped = {}
        done = {step.name: 0 for step in self.steps}
        if self.has_candidates(model):
            edit = ModelEdit(model)
            done = {step.name: step.apply(edit) for step in self.steps}
            if any(done.values()):
                model = edit.model
        counts: dict[str, int] = {}
        details: dict[str, dict[str, str]] = {}
        for step in self.steps:
            counts[f"{step.name}.{step.rewritten_key}"] = done[step.name]
            counts[f"{step.name}.{step.skipped_key}"] = len(step.skipped)
            details[f"{step.name}.skipped"] = dict(sorted(step.skipped.items()))
        return PassResult(model, any(done.values()), counts, details)


__all__ = ["STEPS", "NormalizeSpellings"]
