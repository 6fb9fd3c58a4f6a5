"""What each step of an attention pattern means, declared once.

A step Op in ``patterns/`` says what it is with ``meaning=``::

    Op("Div", REST, Scalar(), meaning=Scale)        # the scores divided by a constant
    Op("Add", REST, Any(), meaning=MaskAdd)         # an additive mask or bias

and a match lists its steps in data-flow order (``Match.steps``), each as one of the types
below, read off its node when the match is made. The core's list runs from the score MatMul to
the context MatMul with the :class:`Softmax` in it (:func:`core_steps` splits it there); an
operand's runs from its projection to the core. Whatever consumes a match (``attention.py``'s
scale and mask, ``fusion.operands.plan_core``, ``collapse-batched-heads``) builds from these
lists and never walks the chain again, so a new exporter spelling is a step with one of these
meanings, nothing elsewhere.

Each type knows the tensor the chain flows through (``data``), the other inputs a rewrite must
carry along (``side_inputs``), and why a fused op could not compute it (``problem``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from xattn_compiler.ir import producer

#: Reads a constant tensor's value (None when it is computed from shapes only).
ValueOf = Callable[[gs.Tensor], "np.ndarray | None"]

#: A fill or floor at or below this is a mask value: exp(value + score) underflows to 0 in
#: float32 and float16 for any score a trained model produces.
MASK_FILL_LIMIT = -1e4


def at_mask_value(value: np.ndarray) -> bool:
    """A ``Scalar(check=)``: the constant is a mask value (at most :data:`MASK_FILL_LIMIT`)."""
    return float(value.reshape(-1)[0]) <= MASK_FILL_LIMIT


def _scalar(tensor: gs.Tensor, value: ValueOf) -> float | None:
    array = value(tensor)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(-1)[0])


def _others(node: gs.Node, data: gs.Tensor) -> list[gs.Tensor]:
    inputs = list(node.inputs)
    inputs.pop(next(i for i, t in enumerate(inputs) if t is data))
    return [t for t in inputs if t.name]


@dataclass(eq=False)
class Step:
    """One node of a chain: ``node`` computes the next tensor from ``data``."""

    node: gs.Node
    data: gs.Tensor

    @classmethod
    def read(cls, node: gs.Node, data: gs.Tensor, value: ValueOf) -> Step:
        return cls(node, data)

    @property
    def output(self) -> gs.Tensor:
        return self.node.outputs[0]

    @property
    def side_inputs(self) -> list[gs.Tensor]:
        """Inputs besides ``data`` that are data of the same shape family (masks, factors)."""
        return _others(self.node, self.data)

    def problem(self) -> str | None:
        """Why a fused op cannot compute this step as its meaning says, or None."""
        return None


@dataclass(eq=False)
class Scale(Step):
    """``x * c`` or ``x / c`` with a one-element constant ``c``."""

    constant: gs.Tensor | None = None
    divide: bool = False
    value: float | None = None            # c; None when computed from shapes

    @classmethod
    def read(cls, node, data, value):
        [constant] = _others(node, data)
        return cls(node, data, constant, node.op == "Div", _scalar(constant, value))

    @property
    def factor(self) -> float | None:
        """What the step multiplies by (1/c for a division); None when unknown."""
        if self.value is None or (self.divide and self.value == 0):
            return None
        return 1.0 / self.value if self.divide else self.value

    def problem(self):
        if not self.factor:
            return f"{self.node.op} '{self.node.name}' does not scale the scores by a constant"
        return None


@dataclass(eq=False)
class MaskAdd(Step):
    """``x + m``: an additive mask or position bias ``m``."""

    mask: gs.Tensor | None = None

    @classmethod
    def read(cls, node, data, value):
        others = _others(node, data)
        return cls(node, data, others[0] if others else data)


@dataclass(eq=False)
class KeepWhere(Step):
    """A boolean mask: ``Where(cond, x, fill)`` keeps ``x`` where ``cond`` holds;
    ``negate``: ``Where(cond, fill, x)`` keeps it where ``cond`` does not."""

    cond: gs.Tensor | None = None
    fill: gs.Tensor | None = None
    negate: bool = False
    fill_value: float | None = None

    @classmethod
    def read(cls, node, data, value):
        negate = node.inputs[2] is data
        fill = node.inputs[1] if negate else node.inputs[2]
        return cls(node, data, node.inputs[0], fill, negate, _scalar(fill, value))

    def problem(self):
        if self.fill_value is None:
            return (f"Where '{self.node.name}' fills masked scores with a value that is not "
                    "constant")
        return None


@dataclass(eq=False)
class Softcap(Step):
    """``tanh`` of the scores: logit softcapping, ``c * tanh(s / c)`` (Gemma 2, Grok), the
    ``c`` and ``1/c`` around it being Scale steps. ONNX's Attention has a ``softcap``
    attribute, TensorRT's parser takes none, so no fused target computes it."""

    def problem(self):
        return (f"Tanh '{self.node.name}' caps the scores (logit softcapping): the Attention "
                "TensorRT parses has no softcap")


@dataclass(eq=False)
class Cast(Step):
    """A change of precision (``to``: the ONNX type)."""

    @property
    def to(self) -> int | None:
        return self.node.attrs.get("to")

    @property
    def side_inputs(self):
        return []


@dataclass(eq=False)
class Layout(Step):
    """Moves or regroups values without computing: Reshape, Transpose, Squeeze, Split, a
    KV-cache Concat... A fused op computes none of them inside the scores chain."""

    def problem(self):
        return f"{self.node.op} '{self.node.name}' in the scores chain"


@dataclass(eq=False)
class Part(Layout):
    """Takes one part of a fused projection (QKV, KV, streams chunked apart): Split, Slice,
    Gather. Where the other parts are read outside the block, the part is the operand's
    source."""


@dataclass(eq=False)
class Identity(Step):
    """Leaves every value a fused op computes as it is: ``Identity``, or ``max(x, c)`` with
    ``c`` at a mask value (it only raises scores that are masked already)."""


@dataclass(eq=False)
class Dropout(Step):
    """Dropout, the identity at inference (unless ``training_mode`` may be true)."""

    training: float | None = 0.0         # None: computed, may be on

    @classmethod
    def read(cls, node, data, value):
        flag = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        return cls(node, data, 0.0 if flag is None else _scalar(flag, value))

    @property
    def side_inputs(self):
        return []

    def problem(self):
        if self.training != 0.0:
            return f"Dropout '{self.node.name}' may run in training mode"
        return None


@dataclass(eq=False)
class Guard(Step):
    """``Where(IsNaN(p), fill, p)``: HF's SDPA export zeroing fully masked rows."""

    isnan: gs.Node | None = None
    fill_value: float | None = None

    @classmethod
    def read(cls, node, data, value):
        return cls(node, data, producer(node.inputs[0]), _scalar(node.inputs[1], value))

    @property
    def side_inputs(self):
        return [self.node.inputs[1]]

    def problem(self):
        if self.fill_value != 0.0:
            return (f"Where '{self.node.name}' replaces NaN probabilities by {self.fill_value}, "
                    "not 0")
        return None


@dataclass(eq=False)
class Softmax(Step):
    """The Softmax between the scores and the probabilities."""

    @property
    def axis(self) -> int:
        return self.node.attrs.get("axis", -1)


def core_steps(steps: list[Step]) -> tuple[list[Step], Softmax, list[Step]]:
    """A core match's steps as (scores -> Softmax, the Softmax, Softmax -> context)."""
    at = next(i for i, step in enumerate(steps) if isinstance(step, Softmax))
    return steps[:at], steps[at], steps[at + 1:]


def branching(steps: list[Step], nodes: list[gs.Node]) -> gs.Tensor | None:
    """The first tensor of the chain that two of ``nodes`` read (an IsNaN guard aside): the
    steps then are not one chain a fused op or a rewrite can take as a whole."""
    inside = {id(node) for node in nodes}
    for step in steps:
        readers = [n for n in step.data.outputs if id(n) in inside and n.op != "IsNaN"]
        if len(readers) != 1:
            return step.data
    return None


__all__ = ["MASK_FILL_LIMIT", "Cast", "Dropout", "Guard", "Identity", "KeepWhere", "Layout",
           "MaskAdd", "Part", "Scale", "Softcap", "Softmax", "Step", "at_mask_value", "branching", "core_steps"]
