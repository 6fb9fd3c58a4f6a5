"""normalize-spellings and its steps, einsum-to-matmul and div-to-mul.

Hand-built graphs for each Einsum equation the pass rewrites (checked in ONNX Runtime against
the Einsum at two sizes of the dynamic dims, valid, deterministic and idempotent) and for each
it refuses (left byte for byte, the reason counted); Divs by constants; the composed pass on
one import. Real torch exports close the file: an LDM ``CrossAttention`` written with
``torch.einsum`` the way CompVis/latent-diffusion writes it, found and fused.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.passes import DivToMul, EinsumToMatMul, NormalizeSpellings
from xattn_compiler.passes.normalize_einsum import Refused, parse_equation, plan_einsum

import xattn_compiler as xc
from xattn_compiler.ir import op_histogram
from xattn_compiler.pipeline import DEFAULT_PIPELINE
from xattn_compiler.testing.assertions import assert_pass_properties, model_bytes
from xattn_compiler.verification import random_inputs
from xattn_compiler.zoo.families.einsum import _ldm_classes

FLOAT, FLOAT16, INT64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64


# --- building graphs -----------------------------------------------------------------------------

def model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    built.ir_version = 8
    onnx.checker.check_model(built)
    return built


def value(name, shape, dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def einsum_model(equation: str, a_shape, b_shape, opset=18, dtype=FLOAT) -> onnx.ModelProto:
    """``out = Einsum(a, b)``, both graph inputs; shapes may hold symbolic dims."""
    terms, out = parse_equation(equation)
    dots = max(len(shape) - len(t.replace("*", ""))
               for shape, t in zip((a_shape, b_shape), terms, strict=True))
    out_shape = [None] * (len(out.replace("*", "")) + (dots if "*" in out else 0))
    return model([helper.make_node("Einsum", ["a", "b"], ["out"], name="einsum",
                                   equation=equation)],
                 [value("a", a_shape, dtype), value("b", b_shape, dtype)],
                 [value("out", out_shape, dtype)], opset=opset)


def sizes(m: onnx.ModelProto) -> list[dict]:
    """Two input sets at different sizes of the symbolic dims (a frozen dim fails one)."""
    return [random_inputs(m, seed=0), random_inputs(m, seed=1, dims={"B": 3, "S": 4, "T": 6})]


def rewritten(pass_, m):
    """The pass's result on ``m``, with every property checked at two sizes."""
    result = assert_pass_properties(pass_, m, sizes(m))
    assert result.changed
    return result


# --- einsum-to-matmul: what it rewrites ----------------------------------------------------------

#: (equation, shape of a, shape of b, Transposes and Unsqueezes the MatMul needs)
REWRITTEN = [
    ("bid,bjd->bij", ["B", "S", 8], ["B", "T", 8], 1),                   # Q.K^T, 3-D heads
    ("b i d, b j d -> b i j", ["B", "S", 8], ["B", "T", 8], 1),          # torch keeps spaces
    ("bhid,bhjd->bhij", ["B", 2, "S", 8], ["B", 2, "T", 8], 1),          # Q.K^T on [B,H,S,D]
    ("bnqd,bnkd->bnqk", ["B", 2, "S", 8], ["B", 2, "T", 8], 1),
    ("bij,bjd->bid", ["B", "S", "T"], ["B", "T", 8], 0),                 # P.V
    ("bhij,bhjd->bhid", ["B", 2, "S", "T"], ["B", 2, "T", 8], 0),
    ("...id,...jd->...ij", ["B", 2, "S", 8], ["B", 2, "T", 8], 1),       # leading ellipsis
    ("...id,...jd->...ij", ["B", "S", 8], ["B", "T", 8], 1),
    ("...id,...jd->...ji", ["B", 2, "S", 8], ["B", 2, "T", 8], 1),      # K.Q^T: swapped
    ("bsd,de->bse", ["B", "S", 8], [8, 6], 0),                           # projection
    ("bsd,ed->bse", ["B", "S", 8], [6, 8], 1),                           # [out, in] weight
    ("de,bsd->bse", [8, 6], ["B", "S", 8], 0),                           # operands swapped
    ("bhqk,bkhd->bqhd", ["B", 2, "S", "T"], ["B", "T", 2, 8], 2),        # P.V into the merge
    ("bhid,bjd->bhij", ["B", 2, "S", 8], ["B", "T", 8], 2),              # K shared by heads
    ("bid,bjd->bji", ["B", "S", 8], ["B", "T", 8], 1),                   # K.Q^T
    ("ij,jk", ["S", 8], [8, 6], 0),                                      # implicit output
    ("bhsd,hde->bhse", ["B", 2, "S", 8], [2, 8, 6], 0),                  # per-head weights
    # several contracted labels: each side lays them out last and merges them (Reshape);
    # the right side is laid out [.., j, k...] and swaps its last two after the merge
    ("bhnd,hde->bne", ["B", 2, "S", 8], [2, 8, 6], 5),                   # head merge + out proj
    ("bijk,bjkl->bil", ["B", 2, 3, 4], ["B", 3, 4, 5], 4),
]


@pytest.mark.parametrize("equation, a_shape, b_shape, extra", REWRITTEN,
                         ids=[f"{r[0]}|{len(r[1])}" for r in REWRITTEN])
def test_einsum_becomes_matmul(equation, a_shape, b_shape, extra):
    m = einsum_model(equation, a_shape, b_shape)
    result = rewritten(EinsumToMatMul(), m)
    ops = op_histogram(result.model)
    assert "Einsum" not in ops and ops["MatMul"] == 1
    assert sum(ops.values()) - 1 == extra, ops
    assert (result.counts["einsums_rewritten"], result.counts["einsums_skipped"]) == (1, 0)
    assert [o.name for o in result.model.graph.output] == ["out"]


@pytest.mark.parametrize("equation, shape, op", [
    ("bhnd->bnhd", ["B", 2, "S", 8], "Transpose"),        # a head merge's transpose
    ("b n h d -> b h n d", ["B", "S", 2, 8], "Transpose"),
    ("...nd->...dn", ["B", 2, "S", 8], "Transpose"),
    ("bnd->bnd", ["B", "S", 8], "Identity"),
])
def test_einsum_of_one_operand_that_permutes_becomes_transpose(equation, shape, op):
    out_rank = len(shape)
    m = model([helper.make_node("Einsum", ["a"], ["out"], name="einsum", equation=equation)],
              [value("a", shape)], [value("out", [None] * out_rank)])
    result = rewritten(EinsumToMatMul(), m)
    assert op_histogram(result.model) == {op: 1}


def test_einsum_of_one_operand_that_reduces_stays():
    m = model([helper.make_node("Einsum", ["a"], ["out"], name="einsum", equation="bnd->bn")],
              [value("a", ["B", "S", 8])], [value("out", [None] * 2)])
    result = EinsumToMatMul()(m)
    assert not result.changed
    assert result.details["skipped"] == {"einsum": "labels summed out of the operand (a reduction)"}


def test_einsum_at_opset_12_unsqueezes_with_the_axes_attribute():
    m = einsum_model("bhid,bjd->bhij", ["B", 2, "S", 8], ["B", "T", 8], opset=12)
    result = rewritten(EinsumToMatMul(), m)
    (unsqueeze,) = [n for n in result.model.graph.node if n.op_type == "Unsqueeze"]
    assert len(unsqueeze.input) == 1 and unsqueeze.attribute[0].name == "axes"


def test_einsum_in_float16_with_a_constant_weight():
    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((6, 8)).astype(np.float16), "w")
    m = model([helper.make_node("Einsum", ["x", "w"], ["y"], equation="bsd,ed->bse")],
              [value("x", ["B", "S", 8], FLOAT16)], [value("y", ["B", "S", 6], FLOAT16)], [weight])
    result = rewritten(EinsumToMatMul(), m)
    assert op_histogram(result.model) == {"MatMul": 1}
    (laid_out,) = result.model.graph.initializer  # w, transposed once; the original dropped
    assert numpy_helper.to_array(laid_out).dtype == np.float16
    assert np.array_equal(numpy_helper.to_array(laid_out), numpy_helper.to_array(weight).T)


def test_einsum_weights_are_laid_out_once_as_initializers():
    """A head merge into W_o ('bhnd,hde->bne') and a per-head projection ('bnd,dhk->bhnk'):
    the weights' Transpose/Reshape/Unsqueeze become new initializers, one per weight and
    layout, and the weights nothing else reads are dropped."""
    rng = np.random.default_rng(1)
    wo = numpy_helper.from_array(rng.standard_normal((2, 8, 6)).astype(np.float32), "wo")
    wq = numpy_helper.from_array(rng.standard_normal((6, 2, 8)).astype(np.float32), "wq")
    m = model([helper.make_node("Einsum", ["o", "wo"], ["y1"], equation="bhnd,hde->bne"),
               helper.make_node("Einsum", ["o", "wo"], ["y2"], equation="bhnd,hde->bne"),
               helper.make_node("Einsum", ["x", "wq"], ["q"], equation="bnd,dhk->bhnk")],
              [value("o", ["B", 2, "S", 8]), value("x", ["B", "S", 6])],
              [value("y1", ["B", "S", 6]), value("y2", ["B", "S", 6]),
               value("q", ["B", 2, "S", 8])], [wo, wq])
    result = rewritten(EinsumToMatMul(), m)
    weights = {t.name: numpy_helper.to_array(t).shape for t in result.model.graph.initializer
               if t.data_type == TensorProto.FLOAT}
    assert sorted(weights.values()) == [(2, 1, 6, 8), (16, 6)]  # wq [h, 1, d, k]; wo [h*d, e]
    ops = op_histogram(result.model)
    assert ops["MatMul"] == 3 and "Unsqueeze" not in ops


def test_einsum_with_an_ellipsis_over_unrecorded_shapes_asks_shape_inference():
    """The operands are computed and the model records no shapes: the ranks an ellipsis
    needs come from shape inference, run on demand."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["y"], ["b"]),
             helper.make_node("Einsum", ["a", "b"], ["out"], equation="...id,...jd->...ij")]
    m = model(nodes, [value("x", ["B", 2, "S", 8]), value("y", ["B", 2, "T", 8])],
              [value("out", [None] * 4)])
    assert not m.graph.value_info
    result = rewritten(EinsumToMatMul(), m)
    assert "Einsum" not in op_histogram(result.model)


def test_einsum_inside_an_if_branch():
    branch = helper.make_graph(
        [helper.make_node("Einsum", ["a", "b"], ["r"], equation="bid,bjd->bij")], "then", [],
        [value("r", [None] * 3)])
    other = helper.make_graph([helper.make_node("Identity", ["a"], ["r2"])], "else", [],
                              [value("r2", [None] * 3)])
    m = model([helper.make_node("If", ["c"], ["out"], then_branch=branch, else_branch=other)],
              [value("a", [2, 3, 4]), value("b", [2, 4, 4]), value("c", [], TensorProto.BOOL)],
              [value("out", [None] * 3)])
    result = rewritten(EinsumToMatMul(), m)
    assert "Einsum" not in op_histogram(result.model)


def test_einsum_projection_into_heads_keeps_the_activation_as_the_matmul_input():
    """'bnd,dhk->bhnk' with a weight: the Unsqueeze MatMul's broadcasting needs goes on the
    weight (folded later), not on x. On x it hid MatMul(x, W) from the matcher, one Unsqueeze
    per projection, so a self-attention's Q and K looked like two sources (reported cross)."""
    w = numpy_helper.from_array(np.ones((8, 2, 4), np.float32), "w")
    m = model([helper.make_node("Einsum", ["x", "w"], ["out"], equation="bnd,dhk->bhnk")],
              [value("x", ["B", "S", 8])], [value("out", ["B", 2, "S", 4])], [w])
    result = rewritten(EinsumToMatMul(), m)
    (matmul,) = [n for n in result.model.graph.node if n.op_type == "MatMul"]
    assert matmul.input[0] == "x"
    assert plan_einsum("bnd,dhk->bhnk", (3, 3)).left.unsqueeze == (-3,)  # no weight: as before


# --- einsum-to-matmul: what it leaves alone ------------------------------------------------------

#: (equation, shape of a, shape of b, the reason starts with)
REFUSED = [
    ("bii,bij->bj", ["B", 4, 4], ["B", 4, 6], "label 'i' repeated in one operand"),
    ("bid,bjd->bi", ["B", "S", 8], ["B", "T", 8], "label 'j' summed out of one operand"),
    ("bi,bj->bij", ["B", "S"], ["B", "T"], "0 contracted labels"),
    ("...ijk,...jkl->...il", ["B", 2, 3, 4], ["B", 3, 4, 5], "2 contracted labels under an"),
    ("bid,bd->bi", ["B", "S", 8], ["B", 8], "no free label on one side"),
    ("i...d,j...d->...ij", [3, 2, 8], [4, 2, 8], "an ellipsis not leading"),
    ("bid,bjd->bij", ["B", "S", 8, 1], ["B", "T", 8], "'bid' labels 3 dims of a rank-4"),
]


@pytest.mark.parametrize("equation, a_shape, b_shape, reason", REFUSED,
                         ids=[r[0] for r in REFUSED])
def test_einsum_that_is_no_batched_matmul_stays(equation, a_shape, b_shape, reason):
    m = einsum_model(equation, a_shape, b_shape)
    result = EinsumToMatMul()(m)
    assert not result.changed
    assert model_bytes(result.model) == model_bytes(m)
    assert (result.counts["einsums_rewritten"], result.counts["einsums_skipped"]) == (0, 1)
    assert result.details["skipped"]["einsum"].startswith(reason)


def test_einsum_with_three_operands_stays():
    m = model([helper.make_node("Einsum", ["a", "b", "c"], ["out"], name="einsum",
                                equation="ij,jk,kl->il")],
              [value(n, [3, 3]) for n in "abc"], [value("out", [None, None])])
    result = EinsumToMatMul()(m)
    assert not result.changed and result.details["skipped"] == {"einsum": "3 operands, not 2"}


def test_einsum_ellipsis_over_an_unknown_rank_stays():
    reshape = helper.make_node("Reshape", ["x", "shape"], ["a"])  # a target of unknown length
    m = model([reshape, helper.make_node("Einsum", ["a", "b"], ["out"], name="einsum",
                                         equation="...id,...jd->...ij")],
              [value("x", [2, 3, 4]), value("shape", [None], INT64), value("b", [2, 3, 4])],
              [value("out", [None] * 3)])
    result = EinsumToMatMul()(m)
    assert not result.changed
    assert result.details["skipped"]["einsum"] == "an ellipsis over an operand of unknown rank"


def test_einsum_on_integers_of_no_matmul_type_stays():
    m = einsum_model("bid,bjd->bij", [2, 3, 4], [2, 5, 4], dtype=TensorProto.INT8)
    result = EinsumToMatMul()(m)
    assert not result.changed and "INT8" in result.details["skipped"]["einsum"]


def test_plan_refuses_what_it_cannot_read():
    with pytest.raises(Refused, match="cannot read"):
        plan_einsum("b1d,bjd->bij", (3, 3))
    with pytest.raises(Refused, match="cannot read"):
        plan_einsum("...i...,...i...->...", (3, 3))


# --- div-to-mul -------------------------------------------------------------------------------

def div_model(divisor: np.ndarray, dtype=FLOAT, shape=("B", "S", 4)) -> onnx.ModelProto:
    return model([helper.make_node("Div", ["x", "c"], ["y"], name="div")],
                 [value("x", list(shape), dtype)], [value("y", list(shape), dtype)],
                 [numpy_helper.from_array(divisor, "c")])


@pytest.mark.parametrize("divisor", [
    np.array(np.sqrt(8.0), np.float32),                       # 1/sqrt(d): not exact, 1 ulp
    np.array([2.0, 3.0, 0.7, -5.0], np.float32),              # a tensor, broadcast
    np.array([[8.0]], np.float16),
    np.array(3.0, np.float64),
], ids=["sqrt-d", "tensor", "float16", "float64"])
def test_div_by_a_constant_becomes_mul(divisor):
    dtype = helper.np_dtype_to_tensor_dtype(divisor.dtype)
    m = div_model(divisor, dtype)
    result = rewritten(DivToMul(), m)
    assert op_histogram(result.model) == {"Mul": 1}
    (r,) = result.model.graph.initializer
    assert numpy_helper.to_array(r).dtype == divisor.dtype
    assert (result.counts["divs_rewritten"], result.counts["divs_skipped"]) == (1, 0)


def test_div_by_a_power_of_two_is_bit_exact():
    m = div_model(np.array([0.25, 4.0, 2.0 ** -10, 64.0], np.float32))
    result = rewritten(DivToMul(), m)
    inputs = random_inputs(m, seed=3)
    import onnxruntime as ort

    def run(proto):
        session = ort.InferenceSession(proto.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        return session.run(None, inputs)[0]

    assert np.array_equal(run(m), run(result.model))


def test_div_by_a_constant_node_and_a_shared_divisor():
    c = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        np.array(7.0, np.float32)))
    m = model([c, helper.make_node("Div", ["x", "c"], ["y1"]),
               helper.make_node("Div", ["x", "c"], ["y2"])],
              [value("x", ["B", 4])], [value("y1", ["B", 4]), value("y2", ["B", 4])])
    result = rewritten(DivToMul(), m)
    assert op_histogram(result.model) == {"Mul": 2}
    assert len(result.model.graph.initializer) == 1  # one reciprocal for both


def test_div_by_a_constant_node_holding_value_float():
    c = helper.make_node("Constant", [], ["c"], value_float=3.0)
    m = model([c, helper.make_node("Div", ["x", "c"], ["y"])], [value("x", ["B", 4])],
              [value("y", ["B", 4])])
    assert op_histogram(rewritten(DivToMul(), m).model) == {"Mul": 1}


def test_div_by_a_body_input_that_shares_an_outer_constant_name_stays():
    """Inside a Loop body, 'c' is the body's own input, not the outer initializer 'c'."""
    body = helper.make_graph(
        [helper.make_node("Div", ["x", "c"], ["q"]), helper.make_node("Identity", ["cond"], ["co"])],
        "body", [value("i", [], INT64), value("cond", [], TensorProto.BOOL), value("c", [4])],
        [value("co", [], TensorProto.BOOL), value("c_out", [4]), value("q", [4])])
    body.node.append(helper.make_node("Identity", ["c"], ["c_out"]))
    loop = helper.make_node("Loop", ["n", "", "x"], ["final", "qs"], body=body)
    m = model([loop], [value("n", [], INT64), value("x", [4])],
              [value("final", [4]), value("qs", [None, 4])],
              [numpy_helper.from_array(np.array(2.0, np.float32), "c")])
    result = DivToMul()(m)
    assert not result.changed


@pytest.mark.parametrize("divisor, reason", [
    (np.array([1.0, 0.0], np.float32), "the divisor holds a zero"),
    (np.array(np.inf, np.float32), "the divisor holds an infinity or a NaN"),
    (np.array(1e38, np.float32), "a reciprocal is not a normal number"),
    (np.array(1e-5, np.float16), "a reciprocal is not a normal number"),
], ids=["zero", "inf", "subnormal-reciprocal", "float16-overflow"])
def test_div_whose_reciprocal_is_not_exact_enough_stays(divisor, reason):
    m = div_model(divisor, helper.np_dtype_to_tensor_dtype(divisor.dtype),
                  shape=("B", divisor.size))
    result = DivToMul()(m)
    assert not result.changed and model_bytes(result.model) == model_bytes(m)
    assert result.details["skipped"]["div"].startswith(reason)


def test_div_that_is_no_float_constant_division_is_no_candidate():
    ints = model([helper.make_node("Div", ["x", "c"], ["y"])], [value("x", [3], INT64)],
                 [value("y", [3], INT64)], [numpy_helper.from_array(np.array(2, np.int64), "c")])
    by_input = model([helper.make_node("Div", ["x", "c"], ["y"])],
                     [value("x", [3]), value("c", [3])], [value("y", [3])])
    for m in (ints, by_input):
        result = DivToMul()(m)
        assert not result.changed and not result.details["skipped"]


# --- normalize-spellings: the steps on one import ------------------------------------------------

def attention_core(scale_op: str = "Div") -> onnx.ModelProto:
    """softmax(einsum(q, k) / sqrt(8)) then einsum with v, on [B*H, S, D] heads."""
    nodes = [
        helper.make_node("Einsum", ["q", "k"], ["scores"], equation="b i d, b j d -> b i j"),
        helper.make_node(scale_op, ["scores", "c"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("Einsum", ["probs", "v"], ["out"], equation="b i j, b j d -> b i d"),
    ]
    c = np.array(np.sqrt(8.0) if scale_op == "Div" else 8 ** -0.5, np.float32)
    return model(nodes, [value("q", ["B", "S", 8]), value("k", ["B", "T", 8]),
                         value("v", ["B", "T", 8])],
                 [value("out", ["B", "S", 8])], [numpy_helper.from_array(c, "c")])


def test_normalize_spellings_runs_both_steps_without_an_import(monkeypatch):
    from xattn_compiler import ir

    def no_import(*args, **kwargs):
        raise AssertionError("a spelling normalisation imported the graph")

    monkeypatch.setattr(ir, "import_graph", no_import)
    m = attention_core()
    result = NormalizeSpellings()(m)
    assert op_histogram(result.model) == {"MatMul": 2, "Transpose": 1, "Mul": 1, "Softmax": 1}
    assert result.counts == {"einsum-to-matmul.einsums_rewritten": 2,
                             "div-to-mul.divs_rewritten": 1,
                             "einsum-to-matmul.einsums_skipped": 0, "div-to-mul.divs_skipped": 0}
    again = NormalizeSpellings()(result.model)
    assert not again.changed and again.model is result.model


def test_a_model_without_candidates_is_returned_uncopied():
    m = model([helper.make_node("Relu", ["x"], ["y"])], [value("x", [2])], [value("y", [2])])
    assert NormalizeSpellings()(m).model is m


def test_normalize_spellings_properties():
    rewritten(NormalizeSpellings(), attention_core())


@pytest.mark.parametrize("scale_op", ["Div", "Mul"])
def test_einsum_attention_core_is_found_with_its_scale(scale_op):
    m = attention_core(scale_op)
    assert xc.find_attention(m) == []
    (block,) = xc.find_attention(NormalizeSpellings()(m).model)
    assert block.scale == pytest.approx(8 ** -0.5, rel=1e-6)
    assert block.head_dim == 8


def test_the_default_pipeline_normalizes_spellings_after_canonicalize():
    names = [item.split("{")[0] for item in DEFAULT_PIPELINE.split(",")]
    assert names.index("normalize-spellings") == names.index("canonicalize") + 1
    assert names.index("normalize-spellings") < names.index("fuse-attention")


# --- real exports: LDM's CrossAttention written with torch.einsum ---------------------------------

def _ldm_cross_attention():
    """CompVis/latent-diffusion ``ldm/modules/attention.py`` CrossAttention, as the zoo's
    ``ldm-transformer-einsum`` writes it (einops' rearrange as reshape/permute)."""
    return _ldm_classes()[0]


#: heads and head dim of the exported blocks (the truth the matcher must report)
HEADS, HEAD_DIM = 4, 8


def _export_ldm(kind: str, path: Path) -> None:
    import torch

    torch.manual_seed(0)
    cross = kind == "cross"
    module = _ldm_cross_attention()(32, 24 if cross else None, heads=HEADS,
                                    dim_head=HEAD_DIM).eval()
    x = torch.randn(2, 10, 32)
    args, names = (x,), ["x"]
    shapes = {"x": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    if cross:
        args, names = (x, torch.randn(2, 7, 24)), ["x", "context"]
        shapes["context"] = {0: shapes["x"][0], 1: torch.export.Dim("ctx")}
    torch.onnx.export(module, args, str(path), dynamo=True, input_names=names,
                      output_names=["out"], dynamic_shapes=shapes, external_data=False)


def _cached_ldm(kind: str, cache: Path) -> Path:
    """The export of ``kind`` (``cross`` or ``self``), cached by the recipe's source and the
    libraries' versions; written to a temporary file and renamed into place."""
    import torch

    recipe = inspect.getsource(_ldm_classes) + inspect.getsource(_export_ldm)
    key = hashlib.sha256(f"{recipe}{torch.__version__}{onnx.__version__}{kind}".encode())
    path = cache / f"ldm-einsum-{kind}-{key.hexdigest()[:12]}.onnx"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            _export_ldm(kind, Path(tmp) / "m.onnx")
            os.replace(Path(tmp) / "m.onnx", path)
    return path


@pytest.fixture(scope="module", params=["cross", "self"])
def ldm_export(request, export_cache):
    pytest.importorskip("torch")
    return request.param, _cached_ldm(request.param, export_cache)


def test_ldm_einsum_attention_is_found_and_fused(ldm_export):
    kind, path = ldm_export
    raw = onnx.load(path)
    assert op_histogram(raw)["Einsum"] == 2  # the exporter kept torch.einsum as Einsum
    assert xc.find_attention(raw) == []  # as written: the matcher sees no MatMul core
    (block,) = xc.find_attention(xc.optimize(raw, "canonicalize,normalize-spellings,"
                                                  "remove-layout-clutter").model)
    assert (block.kind, block.num_heads, block.head_dim) == (kind, HEADS, HEAD_DIM)
    result = xc.optimize(raw)
    assert op_histogram(result.model).get("Attention") == 1
    assert "Einsum" not in op_histogram(result.model)
    assert xc.verify(raw, result.model).ok


def test_ldm_einsum_attention_through_the_cli(ldm_export, tmp_path, capsys):
    from xattn_compiler.cli import main

    kind, path = ldm_export
    assert main(["inspect", str(path), "--json"]) == 0
    import json

    found = json.loads(capsys.readouterr().out)
    assert found["summary"] == {"self": int(kind == "self"), "cross": int(kind == "cross")}
    (record,) = found["attention"]
    assert (record["num_heads"], record["head_dim"]) == (HEADS, HEAD_DIM)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    assert main(["optimize", str(path), "-o", str(out), "--verify", "--report", str(report),
                 "-q"]) == 0
    data = json.loads(report.read_text())
    assert data["after"]["ops"].get("Attention") == 1 and data["verify"]["ok"]


# --- real exports: transformers' ProphetNet (Einsum in every attention) ---------------------------

PROPHETNET = dict(vocab_size=100, hidden_size=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
                  num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=4,
                  num_decoder_attention_heads=4, max_position_embeddings=64, ngram=2,
                  num_buckets=8, relative_max_distance=16)


def _export_prophetnet(path: Path) -> None:
    import torch
    from transformers import ProphetNetConfig, ProphetNetModel

    torch.manual_seed(0)
    model = ProphetNetModel(ProphetNetConfig(**PROPHETNET)).eval()

    class Hidden(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, decoder_input_ids):
            return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids,
                              use_cache=False).last_hidden_state

    args = (torch.randint(0, 100, (2, 7)), torch.randint(0, 100, (2, 5)))
    torch.onnx.export(Hidden(), args, str(path), dynamo=True, external_data=False,
                      input_names=["input_ids", "decoder_input_ids"])


@pytest.fixture(scope="module")
def prophetnet_export(export_cache):
    pytest.importorskip("transformers")
    import torch
    import transformers

    recipe = inspect.getsource(_export_prophetnet) + repr(sorted(PROPHETNET.items()))
    key = hashlib.sha256(f"{recipe}{torch.__version__}{transformers.__version__}"
                         f"{onnx.__version__}".encode()).hexdigest()[:12]
    path = export_cache / f"prophetnet-einsum-{key}.onnx"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=export_cache) as tmp:
            _export_prophetnet(Path(tmp) / "m.onnx")
            os.replace(Path(tmp) / "m.onnx", path)
    return path


def test_prophetnet_einsum_attention_is_found(prophetnet_export):
    """Config truth: encoder self-attention per encoder layer; per decoder layer a main-stream
    and an n-gram predict-stream self-attention and a cross-attention."""
    raw = onnx.load(prophetnet_export)
    assert op_histogram(raw)["Einsum"] >= 4 and xc.find_attention(raw) == []
    blocks = xc.find_attention(xc.optimize(raw, "canonicalize,normalize-spellings,"
                                                "remove-layout-clutter").model)
    layers = PROPHETNET["num_encoder_layers"], PROPHETNET["num_decoder_layers"]
    assert sum(b.kind == "self" for b in blocks) == layers[0] + 2 * layers[1]
    assert sum(b.kind == "cross" for b in blocks) == layers[1]
    assert {(b.num_heads, b.head_dim) for b in blocks} == {(4, 8)}
    result = xc.optimize(raw)
    assert op_histogram(result.model).get("Attention", 0) >= 2  # encoder self and cross
    assert xc.verify(raw, result.model).ok
