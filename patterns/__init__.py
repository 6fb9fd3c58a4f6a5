"""The attention pattern library: how exporters spell attention, as pattern data.

- :mod:`.scores`: the core MatMul -> [scale|mask|cast]* -> Softmax -> MatMul;
- :mod:`.operands`: from each core operand up through head split/merge to the projection;
- :mod:`.fused`: blocks that already are one op (ONNX Attention, com.microsoft, plugins);
- :mod:`.steps`: what each step means (scale, mask, cast, layout...), the typed steps a match
  lists and every reader of a block builds from.

Adding an exporter's variant is a step (with its meaning) or an alternative here, not a new
pass.
"""

from .fused import FUSED_ATTENTION_OPS, fused_operands
from .operands import K_OPERAND, ORIGIN_OPERAND, Q_OPERAND, V_OPERAND
from .scores import ATTENTION_CORE, PROBS_MAX_STEPS, PROBS_OPS

__all__ = ["ATTENTION_CORE", "FUSED_ATTENTION_OPS", "K_OPERAND", "PROBS_MAX_STEPS", "PROBS_OPS",
           "ORIGIN_OPERAND", "Q_OPERAND", "V_OPERAND", "fused_operands"]
