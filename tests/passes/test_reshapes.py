"""simplify-reshapes: each rewrite on a hand-built graph that matches and on one that must not.

Every rewritten model is checked against the original in ONNX Runtime at two sizes of its
dynamic dims (a constant target that froze a dynamic dim fails the second), run twice (the
second run changes nothing, byte for byte) and on copies (same bytes). Real exports from the
zoo close the file (marked slow).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.passes.reshapes import SimplifyReshapes

from tests.models import small_zoo_export, small_zoo_names
from xattn_compiler.attention import find_attention
from xattn_compiler.ir import op_histogram
from xattn_compiler.testing import AttentionSpec, attention_model
from xattn_compiler.testing.assertions import assert_pass_properties, model_bytes
from xattn_compiler.testing.strategies import Layer, Recipe, Wrap, build_example
from xattn_compiler.verification import random_inputs, verify

FLOAT, FLOAT16, INT32, INT64 = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32,
                                TensorProto.INT64)


# --- building graphs -----------------------------------------------------------------------------

def model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    built.ir_version = 8
    onnx.checker.check_model(built)
    return built


def value(name, shape, dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def ints(name, values):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def node(op, inputs, outputs, **attrs):
    return helper.make_node(op, inputs, outputs, name=outputs[0], **attrs)


def reshape(src, target, dst, **attrs):
    return node("Reshape", [src, target], [dst], **attrs)


def shape_dim(src, axis, dst):
    """``Unsqueeze(Gather(Shape(src), axis))``: one dim of ``src`` as a 1-D tensor, the way
    exporters compute a target entry."""
    return [node("Shape", [src], [f"{dst}.shape"]),
            node("Gather", [f"{dst}.shape", f"{dst}.axis"], [f"{dst}.dim"], axis=0),
            node("Unsqueeze", [f"{dst}.dim", "zero_axis"], [dst])], \
        [numpy_helper.from_array(np.array(axis, np.int64), f"{dst}.axis")]


def sizes(m: onnx.ModelProto, *dims: dict) -> list[dict]:
    """Random inputs at each of ``dims`` (symbol -> size): one input set per size."""
    return [random_inputs(m, seed=i, dims=d) for i, d in enumerate(dims)]


def simplified(m, *dims):
    """Run the pass with every property checked (at each size in ``dims``); the result."""
    return assert_pass_properties(SimplifyReshapes(), m, sizes(m, *dims) if dims else None)


def unchanged(m):
    result = SimplifyReshapes()(m)
    assert not result.changed, result.counts
    assert model_bytes(result.model) == model_bytes(m)
    return result


def ops(m):
    return op_histogram(m)


def targets(m) -> list[list[int]]:
    """Every Reshape's constant target, in graph order (None when computed)."""
    inits = {t.name: numpy_helper.to_array(t).tolist() for t in m.graph.initializer}
    return [inits.get(n.input[1]) for n in m.graph.node if n.op_type == "Reshape"]


def allowzero(m) -> list[int]:
    return [next((a.i for a in n.attribute if a.name == "allowzero"), 0)
            for n in m.graph.node if n.op_type == "Reshape"]


SMALL, LARGE = {"batch": 2, "seq": 3}, {"batch": 3, "seq": 5}


# --- Reshape(Reshape(x, s1), s2) -> Reshape(x, s2') ----------------------------------------------

def test_a_chain_of_two_reshapes_becomes_one():
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "b"), node("Relu", ["b"], ["y"])],
              [value("x", ["batch", "seq", 8])], [value("y", ["batch", "seq", 8])],
              [ints("s1", [0, 0, 2, 4]), ints("s2", [0, 0, 8])])
    result = simplified(m, SMALL, LARGE)
    # Reshape(x, [0,0,8]) keeps x's shape, so the merged Reshape is an identity and goes too.
    assert ops(result.model) == {"Relu": 1}
    assert result.counts["reshape_chains_merged"] == 1
    assert result.counts["identity_reshapes_removed"] == 1


def test_a_chain_of_three_merges_in_one_run():
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "b"), reshape("b", "s3", "y")],
              [value("x", ["batch", 24])], [value("y", ["batch", 4, 6])],
              [ints("s1", [0, 2, 12]), ints("s2", [0, 3, 8]), ints("s3", [0, 4, 6])])
    result = simplified(m, SMALL, LARGE)
    assert ops(result.model) == {"Reshape": 1}
    assert targets(result.model) == [[0, 4, 6]]
    assert result.counts["reshape_chains_merged"] == 2


def test_a_zero_copying_a_middle_dim_that_differs_from_the_source_becomes_that_size():
    # x [6, n] -> a [2, 3, n] -> b: the 0 in [0, -1] copies a's dim 0 (2), not x's (6).
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "b"), node("Relu", ["b"], ["y"])],
              [value("x", [6, "n"])], [value("y", [2, "m"])],
              [ints("s1", [2, 3, -1]), ints("s2", [0, -1])])
    result = simplified(m, {"n": 2}, {"n": 5})
    assert targets(result.model) == [[2, -1]]


def test_a_zero_copying_a_symbolic_middle_dim_equal_to_the_source_dim_stays_a_copy():
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "y")],
              [value("x", ["batch", "seq", 8])], [value("y", ["batch", "seq", 4, 2])],
              [ints("s1", [0, 0, 2, 4]), ints("s2", [0, 0, 4, 2])])
    result = simplified(m, SMALL, LARGE)
    assert targets(result.model) == [[0, 0, 4, 2]]


def test_a_zero_copying_an_unprovable_middle_dim_becomes_the_one_minus_one():
    # The middle dim 1 is seq*2, which is not x's dim 1: the element count still fixes it.
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "y")],
              [value("x", ["batch", "seq", 8])], [value("y", ["batch", None, 4])],
              [ints("s1", [0, -1, 4]), ints("s2", [0, 0, 4])])
    result = simplified(m, SMALL, LARGE)
    assert targets(result.model) == [[0, -1, 4]]


def test_a_literal_zero_keeps_allowzero():
    # allowzero=1: the 0 is an empty dim, not a copy; the merged Reshape must read it the same.
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "y", allowzero=1)],
              [value("x", ["n", 3])], [value("y", [0, 3, "m"])],
              [ints("s1", [-1]), ints("s2", [0, 3, 0])])
    empty = {"x": np.zeros((0, 3), np.float32)}
    result = assert_pass_properties(SimplifyReshapes(), m, [empty])
    assert targets(result.model) == [[0, 3, 0]]
    assert allowzero(result.model) == [1]


def test_no_merge_when_the_middle_tensor_has_another_reader():
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "y"), node("Relu", ["a"], ["r"])],
              [value("x", ["batch", 8])], [value("y", ["batch", 4, 2]), value("r", ["batch", 2, 4])],
              [ints("s1", [0, 2, 4]), ints("s2", [0, 4, 2])])
    unchanged(m)


def test_no_merge_when_the_middle_tensor_is_a_graph_output():
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "y")],
              [value("x", ["batch", 8])], [value("y", ["batch", 4, 2]), value("a", ["batch", 2, 4])],
              [ints("s1", [0, 2, 4]), ints("s2", [0, 4, 2])])
    unchanged(m)


def test_no_merge_when_two_sizes_would_be_unknown():
    # x [a, b, 6] -> [a, 6b] -> [a/2, 6b, 2]: from x, both a/2 and 6b are unknown sizes.
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "y")],
              [value("x", ["a", "b", 6])], [value("y", [None, None, 2])],
              [ints("s1", [0, -1]), ints("s2", [-1, 0, 2])])
    unchanged(m)


def test_a_minus_one_of_known_size_lets_a_chain_merge():
    # x [b, s, 8] -> [b*s, 8] -> [b*s, 2, 4]: the -1 is 2, so b*s can be the merged -1.
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "y")],
              [value("x", ["batch", "seq", 8])], [value("y", [None, 2, 4])],
              [ints("s1", [-1, 8]), ints("s2", [0, -1, 4])])
    result = simplified(m, SMALL, LARGE)
    assert targets(result.model) == [[-1, 2, 4]]


# --- identity Reshapes ---------------------------------------------------------------------------

def test_a_reshape_to_the_same_static_shape_goes():
    m = model([node("Relu", ["x"], ["r"]), reshape("r", "s", "a"), node("Neg", ["a"], ["y"])],
              [value("x", [2, 3, 4])], [value("y", [2, 3, 4])], [ints("s", [2, -1, 4])])
    result = simplified(m)
    assert ops(result.model) == {"Neg": 1, "Relu": 1}
    assert result.counts["identity_reshapes_removed"] == 1


def test_a_reshape_to_the_same_symbolic_shape_goes():
    m = model([reshape("x", "s", "a"), node("Neg", ["a"], ["y"])],
              [value("x", ["batch", "seq", 4])], [value("y", ["batch", "seq", 4])],
              [ints("s", [0, -1, 4])])
    result = simplified(m, SMALL, LARGE)
    assert ops(result.model) == {"Neg": 1}


def test_a_reshape_that_only_may_be_an_identity_stays():
    # [batch, seq] -> [seq, batch] is an identity only when batch == seq.
    m = model([node("Shape", ["x"], ["sh"]), node("Gather", ["sh", "one"], ["d1"], axis=0),
               node("Gather", ["sh", "zero"], ["d0"], axis=0),
               node("Unsqueeze", ["d1", "zero_axis"], ["u1"]),
               node("Unsqueeze", ["d0", "zero_axis"], ["u0"]),
               node("Concat", ["u1", "u0"], ["t"], axis=0), reshape("x", "t", "y")],
              [value("x", ["batch", "seq"])], [value("y", [None, None])],
              [ints("one", 1), ints("zero", 0), ints("zero_axis", [0])])
    unchanged(m)


def test_an_identity_reshape_writing_a_graph_output_stays():
    m = model([node("Relu", ["x"], ["r"]), reshape("r", "s", "y")],
              [value("x", [2, 3])], [value("y", [2, 3])], [ints("s", [2, 3])])
    unchanged(m)


# --- computed targets -> constant targets -------------------------------------------------------

def test_a_target_computed_from_the_input_shape_becomes_constant_zeros():
    pieces, axes = [], []
    for axis in (0, 1):
        nodes, inits = shape_dim("x", axis, f"d{axis}")
        pieces += nodes
        axes += inits
    m = model(pieces + [node("Concat", ["d0", "d1", "heads"], ["t"], axis=0),
                        reshape("x", "t", "a"), node("Relu", ["a"], ["y"])],
              [value("x", ["batch", "seq", 8])], [value("y", ["batch", "seq", 2, 4])],
              axes + [ints("zero_axis", [0]), ints("heads", [2, 4])])
    result = simplified(m, SMALL, LARGE)
    assert targets(result.model) == [[0, 0, 2, 4]]
    assert ops(result.model) == {"Relu": 1, "Reshape": 1}
    assert result.counts["computed_targets_made_constant"] == 1


def test_dims_read_from_another_tensor_with_the_same_symbol_become_copies():
    # Exporters read the batch off the query stream to split K: K's dim 0 has the same symbol.
    nodes, inits = shape_dim("q", 0, "b")
    m = model(nodes + [node("Concat", ["b", "rest"], ["t"], axis=0), reshape("k", "t", "y")],
              [value("q", ["batch", "seq", 8]), value("k", ["batch", "kv", 8])],
              [value("y", ["batch", "kv", 2, 4])],
              inits + [ints("zero_axis", [0]), ints("rest", [-1, 2, 4])])
    result = simplified(m, {"batch": 2, "seq": 3, "kv": 4}, {"batch": 3, "seq": 2, "kv": 7})
    assert targets(result.model) == [[0, -1, 2, 4]]


def test_a_product_of_dims_becomes_the_one_minus_one():
    # [B, S, 8] -> [B*S, 8]: the product is the one unknown, written -1.
    nodes0, inits0 = shape_dim("x", 0, "d0")
    nodes1, inits1 = shape_dim("x", 1, "d1")
    m = model(nodes0 + nodes1 + [node("Mul", ["d0", "d1"], ["bs"]),
                                 node("Concat", ["bs", "eight"], ["t"], axis=0),
                                 reshape("x", "t", "y")],
              [value("x", ["batch", "seq", 8])], [value("y", [None, 8])],
              inits0 + inits1 + [ints("zero_axis", [0]), ints("eight", [8])])
    result = simplified(m, SMALL, LARGE)
    assert targets(result.model) == [[-1, 8]]


def test_a_computed_target_with_two_unprovable_sizes_stays():
    # [B, H, S, D] -> [B*H, S, D] reads S from position 2 into position 1: no 0 can copy it, and
    # B*H is already the one -1.
    nodes0, inits0 = shape_dim("x", 0, "d0")
    nodes2, inits2 = shape_dim("x", 2, "d2")
    m = model(nodes0 + nodes2 + [node("Mul", ["d0", "heads"], ["bh"]),
                                 node("Concat", ["bh", "d2", "dim"], ["t"], axis=0),
                                 reshape("x", "t", "y")],
              [value("x", ["batch", 2, "seq", 4])], [value("y", [None, None, 4])],
              inits0 + inits2 + [ints("zero_axis", [0]), ints("heads", [2]), ints("dim", [4])])
    unchanged(m)


def test_a_target_from_an_unrelated_tensor_stays():
    nodes, inits = shape_dim("other", 0, "d0")
    m = model(nodes + [node("Concat", ["d0", "rest"], ["t"], axis=0), reshape("x", "t", "y")],
              [value("x", ["n", 6]), value("other", ["m"])], [value("y", [None, 2])],
              inits + [ints("zero_axis", [0]), ints("rest", [-1, 2])])
    unchanged(m)


def test_allowzero_is_dropped_when_the_constant_target_copies_dims():
    # A dynamo export reads with allowzero=1; the constant target copies with 0, so it must not.
    nodes, inits = shape_dim("x", 0, "d0")
    m = model(nodes + [node("Concat", ["d0", "rest"], ["t"], axis=0),
                       reshape("x", "t", "y", allowzero=1)],
              [value("x", ["batch", 8])], [value("y", ["batch", 2, 4])],
              inits + [ints("zero_axis", [0]), ints("rest", [2, 4])])
    result = simplified(m, SMALL, LARGE)
    assert targets(result.model) == [[0, 2, 4]]
    assert allowzero(result.model) == [0]


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_computed_targets_of_an_attention_block_become_constant(kind):
    built = attention_model(AttentionSpec(kind=kind, shape_style="computed"))
    other = {name: size + 2 for name, size in built.sizes.items() if name in built.dynamic}
    result = assert_pass_properties(SimplifyReshapes(), built.model,
                                    [built.inputs, built.sample(seed=3, **other)[0]])
    assert all(t is not None for t in targets(result.model))
    assert ops(result.model).get("Shape", 0) == 0
    assert len(find_attention(result.model)) == len(built.blocks)


# --- Squeeze / Unsqueeze -------------------------------------------------------------------------

@pytest.mark.parametrize("opset", [11, 18])
def test_squeeze_of_unsqueeze_on_the_same_axes_cancels(opset):
    if opset >= 13:
        nodes = [node("Unsqueeze", ["x", "axes"], ["u"]), node("Squeeze", ["u", "neg_axes"], ["s"])]
        inits = [ints("axes", [1, 3]), ints("neg_axes", [-2, 1])]
    else:
        nodes = [node("Unsqueeze", ["x"], ["u"], axes=[1, 3]),
                 node("Squeeze", ["u"], ["s"], axes=[-2, 1])]
        inits = []
    m = model(nodes + [node("Relu", ["s"], ["y"])], [value("x", ["batch", 4, 5])],
              [value("y", ["batch", 4, 5])], inits, opset=opset)
    result = simplified(m, {"batch": 2}, {"batch": 3})
    assert ops(result.model) == {"Relu": 1}
    assert result.counts["squeeze_unsqueeze_cancelled"] == 1


def test_squeeze_of_unsqueeze_on_other_axes_stays():
    m = model([node("Unsqueeze", ["x", "a1"], ["u"]), node("Squeeze", ["u", "a0"], ["y"])],
              [value("x", [1, 4])], [value("y", [1, 4])], [ints("a1", [1]), ints("a0", [0])])
    unchanged(m)


def test_unsqueeze_of_squeeze_cancels_when_the_dim_is_one():
    m = model([node("Squeeze", ["x", "axes"], ["s"]), node("Unsqueeze", ["s", "axes"], ["u"]),
               node("Relu", ["u"], ["y"])],
              [value("x", ["batch", 1, 8])], [value("y", ["batch", 1, 8])], [ints("axes", [1])])
    result = simplified(m, {"batch": 2}, {"batch": 5})
    assert ops(result.model) == {"Relu": 1}


def test_unsqueeze_of_squeeze_stays_when_the_dim_may_not_be_one():
    # Squeeze with axes would fail at run time for a dim other than 1; without proof, keep it.
    m = model([node("Squeeze", ["x", "axes"], ["s"]), node("Unsqueeze", ["s", "axes"], ["y"])],
              [value("x", ["batch", "one", 8])], [value("y", ["batch", 1, 8])],
              [ints("axes", [1])])
    unchanged(m)


def test_squeeze_without_axes_of_unsqueeze_cancels_only_when_no_other_dim_is_one():
    ok = model([node("Unsqueeze", ["x", "axes"], ["u"]), node("Squeeze", ["u"], ["s"]),
                node("Relu", ["s"], ["y"])],
               [value("x", [2, 3])], [value("y", [2, 3])], [ints("axes", [0])])
    assert simplified(ok).counts["squeeze_unsqueeze_cancelled"] == 1
    kept = model([node("Unsqueeze", ["x", "axes"], ["u"]), node("Squeeze", ["u"], ["s"]),
                  node("Relu", ["s"], ["y"])],
                 [value("x", [2, 1])], [value("y", [2])], [ints("axes", [0])])
    unchanged(kept)


# --- Casts ---------------------------------------------------------------------------------------

def cast_model(source, chain):
    nodes, current = [], "x"
    for i, to in enumerate(chain):
        nodes.append(node("Cast", [current], [f"c{i}"], to=to))
        current = f"c{i}"
    nodes.append(node("Identity", [current], ["y"]))
    return model(nodes, [value("x", ["n", 4], source)], [value("y", ["n", 4], chain[-1])])


def test_a_cast_to_the_type_it_has_goes():
    result = simplified(cast_model(FLOAT, [FLOAT]), {"n": 2}, {"n": 3})
    assert ops(result.model) == {"Identity": 1}
    assert result.counts["casts_removed"] == 1


@pytest.mark.parametrize("source, wide", [(FLOAT16, FLOAT), (INT32, INT64), (TensorProto.BOOL, FLOAT),
                                          (TensorProto.UINT8, FLOAT16)],
                         ids=["fp16-fp32-fp16", "i32-i64-i32", "bool-fp32-bool", "u8-fp16-u8"])
def test_a_lossless_round_trip_goes(source, wide):
    result = simplified(cast_model(source, [wide, source]), {"n": 2}, {"n": 3})
    assert ops(result.model) == {"Identity": 1}
    assert result.counts["casts_removed"] == 1


@pytest.mark.parametrize("source, narrow", [(FLOAT, FLOAT16), (INT64, INT32), (FLOAT, INT64),
                                            (FLOAT, TensorProto.BFLOAT16)],
                         ids=["fp32-fp16-fp32", "i64-i32-i64", "fp32-i64-fp32", "fp32-bf16-fp32"])
def test_a_narrowing_round_trip_stays(source, narrow):
    unchanged(cast_model(source, [narrow, source]))


def test_the_narrowing_round_trip_changes_values():
    # Why it stays: fp32 -> fp16 -> fp32 rounds 1 + 2^-20 to 1.
    m = cast_model(FLOAT, [FLOAT16, FLOAT])
    x = np.full((1, 4), 1 + 2.0 ** -20, np.float32)
    check = verify(m, cast_model(FLOAT, [FLOAT]), inputs={"x": x}, rtol=0, atol=0)
    assert not check.ok


def test_a_cast_writing_a_graph_output_keeps_the_output():
    m = model([node("Cast", ["x"], ["y"], to=FLOAT)], [value("x", [2])], [value("y", [2])])
    unchanged(m)


# --- interface, bodies, determinism --------------------------------------------------------------

def test_graph_inputs_and_outputs_keep_their_names_and_order():
    m = model([reshape("x", "s1", "a"), reshape("a", "s2", "b"), node("Cast", ["b"], ["y"], to=FLOAT),
               node("Relu", ["z"], ["w"])],
              [value("x", ["batch", 8]), value("z", [3])],
              [value("w", [3]), value("y", ["batch", 8])],
              [ints("s1", [0, 2, 4]), ints("s2", [0, 8])])
    result = simplified(m, {"batch": 2}, {"batch": 4})
    assert [v.name for v in result.model.graph.input] == ["x", "z"]
    assert [v.name for v in result.model.graph.output] == ["w", "y"]


@pytest.mark.parametrize("wrap", [Wrap("if", "outer"), Wrap("if", "inner"), Wrap("loop", "outer"),
                                  Wrap("loop", "inner")], ids=lambda w: f"{w.op}-{w.initializers}")
def test_computed_targets_inside_if_and_loop_bodies_become_constant(wrap):
    ex = build_example(Recipe(layers=(Layer((AttentionSpec(kind="self", shape_style="computed"),)),),
                              dynamic=True, batch=2, q_len=3, kv_len=4, wrap=wrap))
    result = assert_pass_properties(SimplifyReshapes(), ex.model, ex.samples)
    assert result.counts["computed_targets_made_constant"] > 0
    assert ops(result.model).get("Shape", 0) == 0


def test_a_reshape_chain_inside_an_if_body_merges():
    ex = build_example(Recipe(layers=(Layer((AttentionSpec(kind="self", projection="gemm"),)),),
                              dynamic=True, batch=2, q_len=3, kv_len=4, wrap=Wrap("if", "outer")))
    result = assert_pass_properties(SimplifyReshapes(), ex.model, ex.samples)
    # Gemm's un-flatten [B*S, E] -> [B, S, E] runs straight into the head split [B, S, H, D].
    assert result.counts["reshape_chains_merged"] > 0


def test_a_model_without_candidates_is_returned_untouched():
    m = model([node("Relu", ["x"], ["y"])], [value("x", [2])], [value("y", [2])])
    result = unchanged(m)
    assert result.model is m


def test_the_pass_declares_its_name_description_and_counts():
    assert SimplifyReshapes.name == "simplify-reshapes" and SimplifyReshapes.description
    counts = SimplifyReshapes()(cast_model(FLOAT, [FLOAT])).counts
    assert set(counts) == {"reshape_chains_merged", "identity_reshapes_removed",
                           "computed_targets_made_constant", "squeeze_unsqueeze_cancelled",
                           "casts_removed", "identities_removed", "shapes_refined"}


def test_an_identity_between_a_reshape_and_its_partner_goes():
    m = model([reshape("x", "flat_shape", "flat"), node("Identity", ["flat"], ["kept"]),
               reshape("kept", "back_shape", "back"), node("Relu", ["back"], ["y"])],
              [value("x", [2, 3, 8])], [value("y", [2, 3, 8])],
              [ints("flat_shape", [2, 24]), ints("back_shape", [2, 3, 8])])
    result = simplified(m)
    assert result.counts["identities_removed"] == 1
    assert "Identity" not in op_histogram(result.model)
    assert "Reshape" not in op_histogram(result.model)


# --- dims ONNX cannot infer (TorchScript's computed targets) -----------------------------------

def dims_of(m: onnx.ModelProto, name: str) -> list:
    """``name``'s dims as the model records them (an int, a symbol, or None)."""
    for info in m.graph.value_info:
        if info.name == name:
            return [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                    for d in info.type.tensor_type.shape.dim]
    raise AssertionError(f"no value_info for {name}")


def torchscript_head_merge():
    """BART 4.x: ``h.view(B, S, 4, 8).transpose(1, 2).view(B * 4, -1, 8)``, B read off ``h``."""
    nodes, inits = shape_dim("h", 0, "b")
    nodes += [reshape("h", "split_shape", "heads"),
              node("Transpose", ["heads"], ["q"], perm=[0, 2, 1, 3]),
              node("Mul", ["b", "four"], ["bh"]),
              node("Concat", ["bh", "rest"], ["t"], axis=0),
              reshape("q", "t", "merged"), node("Relu", ["merged"], ["y"])]
    return model(nodes, [value("h", ["batch", "seq", 32])], [value("y", [None, None, 8])],
                 inits + [ints("zero_axis", [0]), ints("split_shape", [0, 0, 4, 8]),
                          ints("four", [4]), ints("rest", [-1, 8])])


def test_a_torchscript_head_merge_gets_the_sequence_symbol():
    # numel(q) / (B*4*8) is seq: the -1 ONNX leaves unknown is q's own symbol.
    m = torchscript_head_merge()
    result = simplified(m, SMALL, LARGE)
    assert result.counts["shapes_refined"] >= 1
    assert dims_of(result.model, "merged")[1:] == ["seq", 8]


def test_a_reshape_writing_a_graph_output_keeps_its_declared_shape():
    m = torchscript_head_merge()
    m.graph.node.pop()  # the Relu: the merge now writes y itself
    m.graph.node[-1].output[0] = "y"
    result = SimplifyReshapes()(m)
    assert [d.dim_param or d.dim_value or None
            for d in result.model.graph.output[0].type.tensor_type.shape.dim] == [None, None, 8]


def test_a_torchscript_expand_keeps_the_batch_symbol():
    # positions.expand(B, -1): Where(Equal(shape, -1), 1, shape) as the shape, which ONNX
    # cannot read; -1 keeps the positions' length.
    nodes, inits = shape_dim("ids", 0, "b")
    nodes += [node("Concat", ["b", "minus_one"], ["wanted"], axis=0),
              node("Equal", ["wanted", "minus_ones"], ["keep"]),
              node("Where", ["keep", "ones", "wanted"], ["shape"]),
              node("Expand", ["positions", "shape"], ["expanded"]),
              node("Add", ["expanded", "ids"], ["y"])]
    m = model(nodes, [value("ids", ["batch", "seq"], INT64), value("positions", [1, "seq"], INT64)],
              [value("y", ["batch", "seq"], INT64)],
              inits + [ints("zero_axis", [0]), ints("minus_one", [-1]),
                       ints("minus_ones", [-1, -1]), ints("ones", [1, 1])])
    result = simplified(m, SMALL, LARGE)
    assert dims_of(result.model, "expanded") == ["batch", "seq"]


def test_a_removed_identity_reshape_leaves_no_stale_symbol_below_it():
    # Whisper 4.x: input_ids.view(-1, S) before the embedding. ONNX names the -1 unk__0, and
    # keeps that name on the embedding once the Reshape is gone unless it is inferred again.
    nodes, inits = shape_dim("ids", 1, "s")
    nodes += [node("Concat", ["minus_one", "s"], ["t"], axis=0), reshape("ids", "t", "flat"),
              node("Gather", ["table", "flat"], ["embedded"], axis=0),
              node("Relu", ["embedded"], ["y"])]
    m = model(nodes, [value("ids", ["batch", "seq"], INT64)], [value("y", [None, None, 4])],
              inits + [ints("zero_axis", [0]), ints("minus_one", [-1]),
                       numpy_helper.from_array(np.ones((8, 4), np.float32), "table")])
    result = simplified(m, SMALL, LARGE)
    assert result.counts["identity_reshapes_removed"] == 1
    assert dims_of(result.model, "embedded") == ["batch", "seq", 4]


def test_a_mask_sum_reshaped_back_to_the_scores_count_has_the_scores_shape():
    # BART 4.x: (scores.view(B, 4, T, S) + mask).view(B*4, T, S). The sum broadcasts, so its
    # dims are at least the scores'; the view back proves it holds no more elements.
    nodes = []
    inits = [ints("zero_axis", [0]), ints("four", [4])]
    for axis in (0, 2, 3):
        part, part_inits = shape_dim("scores", axis, f"d{axis}")
        nodes += part
        inits += part_inits
    nodes += [node("Add", ["scores", "mask"], ["masked"]),
              node("Mul", ["d0", "four"], ["bh"]),
              node("Concat", ["bh", "d2", "d3"], ["t"], axis=0),
              reshape("masked", "t", "batched"), node("Relu", ["batched"], ["y"])]
    m = model(nodes, [value("scores", ["batch", 4, "seq", "seq"]),
                      value("mask", ["mask_batch", 1, "mask_rows", "seq"])],
              [value("y", [None, None, None])], inits)
    dims = {"batch": 2, "seq": 3, "mask_batch": 2, "mask_rows": 3}
    result = simplified(m, dims, {**dims, "mask_rows": 1})
    assert dims_of(result.model, "masked") == ["batch", 4, "seq", "seq"]


# --- real exports -------------------------------------------------------------------------------

def other_sizes(m: onnx.ModelProto, sample: dict) -> dict[str, int]:
    """Every dynamic dim of ``m``'s inputs one larger than in ``sample``."""
    dims = {}
    for graph_input in m.graph.input:
        for axis, d in enumerate(graph_input.type.tensor_type.shape.dim):
            if d.dim_param and graph_input.name in sample:
                dims[d.dim_param] = sample[graph_input.name].shape[axis] + 1
    return dims


@pytest.fixture(scope="module", params=small_zoo_names())
def exported(request, export_cache):
    exp = small_zoo_export(request.param, export_cache)
    return onnx.load(exp.path), exp.sample()[0]


@pytest.mark.slow
def test_real_exports_stay_equivalent_at_every_size_with_no_more_reshapes(exported):
    original, inputs = exported
    first = SimplifyReshapes()(original)
    for check in (verify(original, first.model, inputs=inputs),
                  verify(original, first.model, dims=other_sizes(original, inputs), seed=3)):
        assert check.ok, check.summary()
    before, after = ops(original), ops(first.model)
    for op in ("Reshape", "Squeeze", "Unsqueeze", "Cast"):
        assert after.get(op, 0) <= before.get(op, 0), op
    assert len(find_attention(first.model)) == len(find_attention(original))
    second = SimplifyReshapes()(first.model)
    assert not second.changed, second.counts
    assert model_bytes(second.model) == model_bytes(first.model)


def test_same_product_reads_the_products_exporters_name_dims_with():
    # torch's dynamo exporter names a merged batch '4*b'; BLOOM's scores unbatch checks
    # [b, 4] against it. Sums, quotients and powers are not provable this way.
    from xattn_compiler.passes.reshapes import same_product

    assert same_product(["b", 4], ["4*b"]) and same_product([2, "s", "b"], ["b*s", 2])
    assert not same_product(["b", 3], ["4*b"])
    assert not same_product(["s"], ["((s**2)//s)"]) and not same_product(["b", None], ["b"])
