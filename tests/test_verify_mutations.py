"""Mutation tests of ``verify``: deliberately broken rewrites that a single draw at one size
lets through, each caught by ``verify(reference, candidate)`` with its defaults.

Every case pairs a reference with a candidate that agrees with it except at some batch size,
sequence length, encoder length, dim order, input value range, mask or flag value. Cases
marked ``one_draw_misses`` pass the old single draw (batch 2, every other dim 3, masks all
ones, integers below 4, standard-normal floats): the test shows that draw lets them through,
so the defaults are what catches them. A correct rewrite must still pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from xattn_compiler.verification import binding_plan, draw_set, verify

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def build(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "m", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


def const(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value)))


def dim_of(tensor: str, axis: int, out: str) -> list[onnx.NodeProto]:
    """``out`` = the size of ``tensor`` along ``axis``, as a 1-element int64."""
    return [helper.make_node("Shape", [tensor], [f"{out}/shape"], start=axis, end=axis + 1),
            helper.make_node("Identity", [f"{out}/shape"], [out])]


# --- y = x + mean(enc over the encoder length) ---------------------------------------------

X = helper.make_tensor_value_info("x", FLOAT, ["batch", "seq", 4])
ENC = helper.make_tensor_value_info("enc", FLOAT, ["batch", "enc_len", 4])
Y = helper.make_tensor_value_info("y", FLOAT, ["batch", "seq", 4])


def context_model(*body: onnx.NodeProto, context: str = "ctx", out: str = "y") -> onnx.ModelProto:
    """``out`` = x + ``context``, where ``body`` computes ``context`` from x and enc; ``out``
    may be computed by ``body`` itself (then ``out`` != "y" feeds a final Identity)."""
    tail = [helper.make_node("Add", ["x", context], ["y"])] if out == "y" else [
        helper.make_node("Identity", [out], ["y"])]
    return build([const("axis1", np.array([1], np.int64)), *body, *tail], [X, ENC], [Y])


def mean_context() -> list[onnx.NodeProto]:
    return [helper.make_node("ReduceMean", ["enc", "axis1"], ["ctx"], keepdims=1)]


def reference() -> onnx.ModelProto:
    return context_model(*mean_context())


def correct_rewrite() -> onnx.ModelProto:
    """ReduceMean spelled as ReduceSum over the length read from the shape: equal everywhere."""
    return context_model(
        helper.make_node("ReduceSum", ["enc", "axis1"], ["sum"], keepdims=1),
        *dim_of("enc", 1, "len"),
        helper.make_node("Cast", ["len"], ["lenf"], to=FLOAT),
        helper.make_node("Div", ["sum", "lenf"], ["ctx"]))


def batch_mixed() -> onnx.ModelProto:
    """Averages over the batch too: right only when the batch is 1."""
    return context_model(const("axes01", np.array([0, 1], np.int64)),
                         helper.make_node("ReduceMean", ["enc", "axes01"], ["ctx"], keepdims=1))


def when_dim_is_one(tensor: str, axis: int) -> onnx.ModelProto:
    """The reference, plus 1 wherever ``tensor``'s dim ``axis`` is 1: wrong only there."""
    return context_model(
        *mean_context(), *dim_of(tensor, axis, "d"), const("one", np.array([1], np.int64)),
        helper.make_node("Equal", ["d", "one"], ["is_one"]),
        helper.make_node("Cast", ["is_one"], ["bump"], to=FLOAT),
        helper.make_node("Add", ["x", "ctx"], ["sum"]),
        helper.make_node("Add", ["sum", "bump"], ["bumped"]), out="bumped")


def first_token_only() -> onnx.ModelProto:
    """Reads only the first query position and broadcasts it: right only at sequence length 1."""
    return context_model(
        *mean_context(), const("zero", np.array([0], np.int64)),
        const("one", np.array([1], np.int64)),
        helper.make_node("Slice", ["x", "zero", "one", "axis1"], ["first"]),
        helper.make_node("Shape", ["x"], ["xshape"]),
        helper.make_node("Expand", ["first", "xshape"], ["spread"]),
        helper.make_node("Add", ["spread", "ctx"], ["out"]), out="out")


def fixed_encoder_length() -> onnx.ModelProto:
    """Divides by the encoder length seen at export (3): right only for that length."""
    return context_model(helper.make_node("ReduceSum", ["enc", "axis1"], ["sum"], keepdims=1),
                         const("three", np.array(3.0, np.float32)),
                         helper.make_node("Div", ["sum", "three"], ["ctx"]))


def above_threshold(threshold: float) -> onnx.ModelProto:
    """The reference, plus 1 where |x| > ``threshold``: wrong only for large inputs."""
    return context_model(
        *mean_context(), const("t", np.array(threshold, np.float32)),
        helper.make_node("Abs", ["x"], ["ax"]),
        helper.make_node("Greater", ["ax", "t"], ["big"]),
        helper.make_node("Cast", ["big"], ["bump"], to=FLOAT),
        helper.make_node("Add", ["x", "ctx"], ["sum"]),
        helper.make_node("Add", ["sum", "bump"], ["bumped"]), out="bumped")


# --- scores [batch, seq, enc_len], reshaped through sizes read at run time -------------------

def scores(order: tuple[int, int, int]) -> onnx.ModelProto:
    """x @ enc^T reshaped to the dims of the scores in ``order``: (0, 1, 2) is the identity,
    (0, 2, 1) swaps seq and enc_len (same data, wrong shape unless the two are equal)."""
    nodes = [helper.make_node("Transpose", ["enc"], ["encT"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "encT"], ["s"])]
    for axis in range(3):
        nodes += dim_of("s", axis, f"d{axis}")
    nodes += [helper.make_node("Concat", [f"d{axis}" for axis in order], ["target"], axis=0),
              helper.make_node("Reshape", ["s", "target"], ["y"])]
    out = helper.make_tensor_value_info("y", FLOAT, [None, None, None])
    return build(nodes, [X, ENC], [out])


# --- masks, flags, ids ---------------------------------------------------------------------

MASK = helper.make_tensor_value_info("attention_mask", INT64, ["batch", "seq"])


def masked(use_mask: bool) -> onnx.ModelProto:
    """x times the mask on the last axis; the broken rewrite drops the mask."""
    if not use_mask:
        nodes = [helper.make_node("Mul", ["x", "one"], ["y"]), const("one", np.float32(1.0))]
        return build(nodes[::-1], [X, MASK], [Y])
    nodes = [const("last", np.array([-1], np.int64)),
             helper.make_node("Cast", ["attention_mask"], ["m"], to=FLOAT),
             helper.make_node("Unsqueeze", ["m", "last"], ["m3"]),
             helper.make_node("Mul", ["x", "m3"], ["y"])]
    return build(nodes, [X, MASK], [Y])


FLAG = helper.make_tensor_value_info("use_cache", BOOL, [])


def flagged(use_flag: bool) -> onnx.ModelProto:
    """x where the flag is set, -x otherwise; the broken rewrite assumes it is always set."""
    if not use_flag:
        return build([helper.make_node("Identity", ["x"], ["y"])], [X, FLAG], [Y])
    return build([helper.make_node("Neg", ["x"], ["neg"]),
                  helper.make_node("Where", ["use_cache", "x", "neg"], ["y"])], [X, FLAG], [Y])


IDS = helper.make_tensor_value_info("input_ids", INT64, ["batch", "seq"])


def embedding(last_row_offset: float) -> onnx.ModelProto:
    """A Gather over a 50-row table; the broken rewrite changed the table's last row only."""
    table = np.arange(50 * 4, dtype=np.float32).reshape(50, 4)
    table[-1] += last_row_offset
    return build([helper.make_node("Gather", ["table", "input_ids"], ["y"], axis=0)], [IDS], [Y],
                 [numpy_helper.from_array(table, "table")])


COUNT = helper.make_tensor_value_info("count", INT64, ["batch"])
COUNT_OUT = helper.make_tensor_value_info("y", FLOAT, ["batch"])


def counted(cap: int | None) -> onnx.ModelProto:
    """2 * count as float; the broken rewrite clamps the count at ``cap`` first."""
    nodes = [helper.make_node("Cast", ["c" if cap is not None else "count"], ["f"], to=FLOAT),
             const("two", np.float32(2.0)), helper.make_node("Mul", ["f", "two"], ["y"])]
    if cap is not None:
        nodes = [const("cap", np.array(cap, np.int64)),
                 helper.make_node("Min", ["count", "cap"], ["c"]), *nodes]
    return build(nodes, [COUNT], [COUNT_OUT])


# --- the cases -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Mutation:
    reference: onnx.ModelProto
    candidate: onnx.ModelProto
    one_draw_misses: bool


MUTATIONS = {
    "batch_only": Mutation(reference(), batch_mixed(), False),
    "batch_one_only": Mutation(reference(), when_dim_is_one("x", 0), True),
    "sequence_only": Mutation(reference(), first_token_only(), False),
    "sequence_one_only": Mutation(reference(), when_dim_is_one("x", 1), True),
    "one_encoder_length": Mutation(reference(), fixed_encoder_length(), True),
    "threshold": Mutation(reference(), above_threshold(3.0), True),
    "threshold_half": Mutation(reference(), above_threshold(0.5), False),
    "swapped_dims": Mutation(scores((0, 1, 2)), scores((0, 2, 1)), True),
    "mask_ignored": Mutation(masked(True), masked(False), True),
    "flag_ignored": Mutation(flagged(True), flagged(False), False),  # a coin: half the seeds
    "last_vocabulary_row": Mutation(embedding(0.0), embedding(1.0), True),
    "integer_threshold": Mutation(counted(None), counted(3), True),
}


def one_draw(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    """A draw like the single one of earlier versions: the fallback binding of the first set."""
    legacy = binding_plan(model)[0][1]
    assert legacy.name == "legacy"
    return draw_set(model, legacy, seed=seed, index=0).feeds


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_verify_catches_broken_rewrite(case):
    mutation = MUTATIONS[case]
    result = verify(mutation.reference, mutation.candidate)
    assert not result.ok, result.summary()
    assert any(report.status == "failed" for report in result.input_sets)


@pytest.mark.parametrize("case", sorted(c for c, m in MUTATIONS.items() if m.one_draw_misses))
def test_one_draw_at_one_size_misses_what_the_defaults_catch(case):
    mutation = MUTATIONS[case]
    for seed in range(3):
        legacy = one_draw(mutation.reference, seed)
        assert verify(mutation.reference, mutation.candidate, inputs=legacy).ok


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_the_reference_passes_against_itself(case):
    reference_model = MUTATIONS[case].reference
    result = verify(reference_model, reference_model)
    assert result.ok, result.summary()
    assert result.num_input_sets == 3


def test_a_correct_rewrite_passes_on_every_input_set():
    result = verify(reference(), correct_rewrite())
    assert result.ok, result.summary()
    assert [(r.name, r.status) for r in result.input_sets] == [
        ("distinct", "passed"), ("decode-step", "passed"), ("reversed", "passed")]


def test_the_report_names_each_binding_and_the_set_that_failed():
    result = verify(reference(), fixed_encoder_length())
    by_name = {report.name: report for report in result.input_sets}
    assert by_name["distinct"].dims == {"batch": 2, "seq": 3, "enc_len": 5}
    # A decode step: one new token, batch 1; the encoder output keeps its length.
    assert by_name["decode-step"].dims == {"batch": 1, "seq": 1, "enc_len": 5}
    assert by_name["reversed"].dims == {"batch": 3, "seq": 6, "enc_len": 4}
    assert all(report.status == "failed" for report in result.input_sets)
    summary = result.summary()
    assert "input set 'distinct': batch=2 seq=3 enc_len=5: FAIL" in summary
    data = result.to_dict()
    assert data["num_input_sets"] == 3
    assert [s["dims"] for s in data["input_sets"]][0] == {"batch": 2, "seq": 3, "enc_len": 5}
    assert data["outputs"][0]["input_set"] == "distinct"
