"""From a Q, K or V operand of the core up to its projection and source.

    q_BHSD = layout*(Add(MatMul(x_BSE, W), b))     a projection: MatMul [+ bias], Gemm, Einsum
    q_BHSD = layout*(x)                             no projection: K/V read from an input

``layout`` is any chain of head split/merge and bookkeeping ops: Reshape (shape constant or
computed), Transpose, Squeeze/Unsqueeze, Cast, Identity, Expand (GQA's repeat_kv) or Tile
(``Tensor.repeat``) of K/V heads, a scalar Mul/Div (a scale applied before the MatMul),
Split/Slice/Gather (fused QKV or KV), and Concat with a cached past (a KV cache). The walk
takes as many as it can, so an exporter that reorders or adds such ops still matches.

The walk's end is the operand's ``source`` (the projection's input when there is one). Whether
Q and K are one sequence is decided by data provenance (``xattn_compiler/provenance.py``),
which walks on from where this walk stops (RoPE, per-head norms) to the projection's input.

Captures are prefixed by the operand (``q_src``, ``k_w``, ``v_past``) so one block's three
walks bind distinct names. Each layout step says what it is (``meaning=``, :mod:`.steps`); the
scales among them are what a fused op's ``scale`` can take over.
"""

from __future__ import annotations

from xattn_compiler.pattern import REST, Any, Chain, Const, Op, Or, Pattern, Scalar

from .steps import Cast, Identity, Layout, Part, Scale


def layout_steps(p: str) -> tuple[Pattern, ...]:
    return (
        Op("Transpose", REST, meaning=Layout),
        Op("Reshape", REST, Any(), meaning=Layout),
        Op(("Squeeze", "Unsqueeze"), REST, ..., meaning=Layout),
        Op("Cast", REST, meaning=Cast),
        Op("Identity", REST, meaning=Identity),
        Op("Expand", REST, Any(), meaning=Layout),
        Op("Tile", REST, Any(), meaning=Layout),
        Op("Mul", REST, Scalar(), commutative=True, meaning=Scale),
        Op("Div", REST, Scalar(), meaning=Scale),
        Op("Split", REST, ..., output=None, meaning=Part),
        Op("Slice", REST, ..., meaning=Part),
        Op("Gather", REST, Scalar(), meaning=Part),
        Op("Concat", Any(f"{p}_past*"), REST, check=_concat_on_sequence, meaning=Layout),
    )


def _concat_on_sequence(node) -> bool:
    # A KV cache appends along the sequence axis (-2 in [B,H,S,D], 1 in [B,S,E]).
    return len(node.inputs) == 2 and node.attrs.get("axis") in (-2, 1, 2)


def _flattened(p: str) -> Pattern:
    # Gemm is 2-D: exporters flatten [B, S, E] to [B*S, E] first; the source is before that.
    flatten = Op("Reshape", Any(f"{p}_src"), Any(), check=_to_2d, name=f"{p}_flatten")
    return Or(flatten, Any(f"{p}_src"))


def _to_2d(node) -> bool:
    shape = node.outputs[0].shape
    return shape is not None and len(shape) == 2


def _weight_op(p: str, name: str) -> Pattern:
    return Or(
        Op("MatMul", _flattened(p), Const(f"{p}_w"), name=name),
        Op("Gemm", _flattened(p), Const(f"{p}_w"), ..., name=name),
        Op("Einsum", Any(f"{p}_src"), Const(f"{p}_w"), name=name),
    )


def projection(p: str) -> Pattern:
    """``x @ W [+ b]`` as MatMul, Gemm (on a flattened x) or Einsum, the bias as an Add."""
    return Or(
        Op("Add", _weight_op(p, f"{p}_matmul"), Const(f"{p}_b"), commutative=True,
           name=f"{p}_proj"),
        _weight_op(p, f"{p}_proj"),
    )


def operand(p: str) -> Pattern:
    """The walk from a core operand to its projection, or to where the layout ops end."""
    return Chain(layout_steps(p), until=projection(p), otherwise=Any(f"{p}_src"), max_steps=12)


Q_OPERAND, K_OPERAND, V_OPERAND = operand("q"), operand("k"), operand("v")
#: The walk on from where an operand's walk stopped (a rotation's input, say) to a projection.
ORIGIN_OPERAND = operand("origin")
