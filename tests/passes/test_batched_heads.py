"""collapse-batched-heads: attention cores on [B*H,S,D] run on [B,H,S,D]; detours go.

Cores come from the builders (every 3-D spelling the matcher knows) and from hand-built graphs
for what the builders do not plant: a [B*H,Sq,Sk] mask (diffusers' baddbmm), a batched context
read by something other than its split, the cases that must be refused. Every rewritten model
is checked against the original in ONNX Runtime at two sizes of its dynamic dims, run twice
(no change the second time, byte for byte) and on copies. Real exports close the file (slow).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.passes.batched_heads import CollapseBatchedHeads
from xattn_compiler.passes.reshapes import SimplifyReshapes

from tests.models import small_zoo_export, small_zoo_names
from xattn_compiler.attention import find_attention
from xattn_compiler.ir import op_histogram
from xattn_compiler.testing import AttentionSpec, attention_model
from xattn_compiler.testing.assertions import assert_pass_properties, model_bytes
from xattn_compiler.testing.strategies import Layer, Recipe, Wrap, build_example
from xattn_compiler.verification import random_inputs, verify

from .test_reshapes import other_sizes

FLOAT = TensorProto.FLOAT


# --- building graphs -----------------------------------------------------------------------------

def model(nodes, inputs, outputs, initializers=(), value_info=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers),
                              value_info=list(value_info))
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


def merge(src, dst):
    """``Reshape(src[B,H,S,D], [-1, S, D])`` with S and D read off ``src`` (dynamic S)."""
    return [node("Shape", [src], [f"{dst}.sd"], start=2),
            node("Concat", ["minus_one", f"{dst}.sd"], [f"{dst}.target"], axis=0),
            node("Reshape", [src, f"{dst}.target"], [dst])]


def split(src, heads_of, dst):
    """``Reshape(src[B*H,S,D], [B, H, S, D])`` with B and H read off ``heads_of``."""
    return [node("Shape", [heads_of], [f"{dst}.bh"], start=0, end=2),
            node("Shape", [src], [f"{dst}.sd"], start=1),
            node("Concat", [f"{dst}.bh", f"{dst}.sd"], [f"{dst}.target"], axis=0),
            node("Reshape", [src, f"{dst}.target"], [dst])]


def batched_core(*, mask=None, q_heads=("batch", 2), k_heads=("batch", 2), extra_nodes=(),
                 extra_outputs=(), context_reader="Relu"):
    """softmax(merge(q) merge(k)^T / 2 [+ mask]) merge(v), split back to [B,H,Sq,4].

    ``mask`` is the mask input's shape; the merged tensors are annotated [bh, S, 4] the way
    dynamo exports annotate them, which is what proves a [bh, Sq, Sk] mask has B*H rows.
    """
    nodes = merge("q", "q3") + merge("k", "k3") + merge("v", "v3") + [
        node("Transpose", ["k3"], ["kt3"], perm=[0, 2, 1]),
        node("MatMul", ["q3", "kt3"], ["scores"]),
        node("Div", ["scores", "two"], ["scaled"])]
    logits = "scaled"
    if mask is not None:
        nodes.append(node("Add", ["scaled", "mask"], ["masked"]))
        logits = "masked"
    nodes += [node("Softmax", [logits], ["probs"], axis=-1), node("MatMul", ["probs", "v3"], ["ctx"])]
    nodes += split("ctx", "q", "ctx4") + [node(context_reader, ["ctx4"], ["y"])] + list(extra_nodes)
    inputs = [value("q", [*q_heads, "seq", 4]), value("k", [*k_heads, "kv", 4]),
              value("v", [*k_heads, "kv", 4])]
    if mask is not None:
        inputs.append(value("mask", list(mask)))
    annotations = [value("q3", ["bh", "seq", 4]), value("k3", ["bh", "kv", 4]),
                   value("v3", ["bh", "kv", 4])]
    outputs = [value("y", [*q_heads, "seq", 4]), *extra_outputs]
    return model(nodes, inputs, outputs, [ints("minus_one", [-1]),
                 numpy_helper.from_array(np.array(2.0, np.float32), "two")], annotations)


SIZES = ({"batch": 2, "seq": 3, "kv": 5, "bh": 4}, {"batch": 3, "seq": 4, "kv": 2, "bh": 6})


def at_two_sizes(m, sizes=SIZES):
    return [random_inputs(m, seed=i, dims=d) for i, d in enumerate(sizes)]


def collapsed(m, inputs):
    return assert_pass_properties(CollapseBatchedHeads(), m, inputs)


def unchanged(m):
    result = CollapseBatchedHeads()(m)
    assert not result.changed, result.counts
    assert model_bytes(result.model) == model_bytes(m)
    return result


def ops(m):
    return op_histogram(m)


def layouts(m):
    return [block.layout for block in find_attention(m)]


# --- cores the builders plant ------------------------------------------------------------------

SPELLINGS = [
    {"kind": "self"}, {"kind": "cross"},
    {"kind": "cross", "k_transpose": "fused"}, {"kind": "cross", "k_transpose": "pre_split"},
    {"kind": "self", "mask": "add_input"}, {"kind": "cross", "mask": "where_bool"},
    {"kind": "self", "mask": "add_bias_input"}, {"kind": "self", "mask": "add_causal_const"},
    {"kind": "cross", "scale": "sdpa_qk"}, {"kind": "self", "scale": "mul_after"},
    {"kind": "cross", "shape_style": "computed"},
    {"kind": "self", "shape_style": "computed", "mask": "add_input"},
    {"kind": "cross", "softmax_cast": True, "dtype": "float16"},
    {"kind": "self", "projection": "fused_split"}, {"kind": "cross", "projection": "gemm"},
]


def _spelling_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("options", SPELLINGS, ids=_spelling_id)
def test_every_batched_spelling_runs_on_four_dims(options):
    built = attention_model(AttentionSpec(head_layout="3d", **options))
    other = {name: size + 2 for name, size in built.sizes.items() if name in built.dynamic}
    result = collapsed(built.model, [built.inputs, built.sample(seed=3, **other)[0]])
    assert result.counts["blocks_collapsed"] == len(built.blocks)
    assert layouts(result.model) == ["BHSD"] * len(built.blocks)
    assert ops(result.model)["Reshape"] < ops(built.model)["Reshape"]


def test_a_decoder_stack_collapses_every_block():
    spec = AttentionSpec(kind="cross", head_layout="3d", mask="add_input")
    built = attention_model(spec, self_spec=AttentionSpec(kind="self", head_layout="3d"),
                            layers=2)
    other = {name: size + 2 for name, size in built.sizes.items() if name in built.dynamic}
    result = collapsed(built.model, [built.inputs, built.sample(seed=2, **other)[0]])
    assert result.counts["blocks_collapsed"] == 4
    assert layouts(result.model) == ["BHSD"] * 4


def test_the_unbatch_around_a_four_dim_mask_goes_too():
    # Whisper's eager attention: [B*H,Sq,Sk] -> [B,H,Sq,Sk] + mask -> [B*H,Sq,Sk] -> Softmax.
    built = attention_model(AttentionSpec(kind="self", head_layout="3d", mask="add_input"))
    result = CollapseBatchedHeads()(built.model)
    # q, k, v merges, the two Reshapes around the mask and the context split: six.
    assert result.counts["reshapes_removed"] == 6
    assert ops(result.model)["Reshape"] == ops(built.model)["Reshape"] - 6


def test_then_simplify_reshapes_makes_what_is_left_constant():
    built = attention_model(AttentionSpec(kind="self", head_layout="3d", shape_style="computed"))
    out = SimplifyReshapes()(CollapseBatchedHeads()(built.model).model).model
    assert ops(out)["Reshape"] == 4  # head splits of Q, K, V and the head merge
    assert ops(out).get("Shape", 0) == 0
    assert verify(built.model, out, inputs=built.sample(seed=1, batch=3, q_len=6)[0]).ok


def test_a_batched_core_loses_its_merges_and_its_split():
    m = batched_core()
    result = collapsed(m, at_two_sizes(m))
    assert result.counts == {"blocks_collapsed": 1, "detours_collapsed": 0, "reshapes_removed": 4}
    # The Shapes that computed the Reshape targets went with them.
    assert ops(result.model) == {"Div": 1, "MatMul": 2, "Relu": 1, "Softmax": 1, "Transpose": 1}


# --- masks ---------------------------------------------------------------------------------------

def test_a_mask_with_b_times_h_rows_is_reshaped_to_four_dims():
    m = batched_core(mask=["bh", "seq", "kv"])
    result = collapsed(m, at_two_sizes(m))
    assert result.counts["blocks_collapsed"] == 1
    adds = [n for n in result.model.graph.node if n.op_type == "Add"]
    assert [n.input[1] for n in adds] != ["mask"]  # the Add reads Reshape(mask), not the mask
    assert layouts(result.model) == ["BHSD"]


def test_a_static_mask_gets_a_constant_target():
    built = batched_core(mask=["bh", 3, 5])
    sizes = ({"batch": 2, "seq": 3, "kv": 5, "bh": 4}, {"batch": 5, "seq": 3, "kv": 5, "bh": 10})
    result = collapsed(built, at_two_sizes(built, sizes))
    assert ops(result.model).get("Concat", 0) == ops(built).get("Concat", 0) - 4


@pytest.mark.parametrize("shape", [[1, "seq", "kv"], ["seq", "kv"], [1, 1, "kv"]],
                         ids=["1xSqxSk", "SqxSk", "1x1xSk"])
def test_a_mask_that_broadcasts_stays_as_it_is(shape):
    m = batched_core(mask=shape)
    result = collapsed(m, at_two_sizes(m))
    add = next(n for n in result.model.graph.node if n.op_type == "Add")
    assert list(add.input) == ["scaled", "mask"]


def test_a_mask_whose_rows_cannot_be_proved_leaves_the_block_batched():
    m = batched_core(mask=["rows", "seq", "kv"])
    unchanged(m)


# --- the batched context ---------------------------------------------------------------------------

def test_a_context_split_writing_a_graph_output_keeps_it_and_reads_a_rebatched_context():
    # The split's output is the graph output: it cannot go, so it reads Reshape(ctx, [-1,Sq,D]).
    m = batched_core(context_reader="Identity")
    nodes = [n for n in m.graph.node if n.output[0] != "y"]
    m = model(nodes, list(m.graph.input), [value("ctx4", ["batch", 2, "seq", 4])],
              list(m.graph.initializer), list(m.graph.value_info))
    result = collapsed(m, at_two_sizes(m))
    assert result.counts["blocks_collapsed"] == 1
    assert [o.name for o in result.model.graph.output] == ["ctx4"]


def test_a_context_read_by_something_else_gets_a_batched_copy():
    m = batched_core(extra_nodes=[node("Neg", ["ctx"], ["ctx_neg"])],
                     extra_outputs=[value("ctx_neg", ["bh", "seq", 4])])
    result = collapsed(m, at_two_sizes(m))
    assert result.counts["blocks_collapsed"] == 1
    neg = next(n for n in result.model.graph.node if n.op_type == "Neg")
    assert neg.input[0] != "ctx"


# --- refusals -------------------------------------------------------------------------------------

def test_q_and_k_with_different_head_counts_stay_batched():
    # [2,4,S,D] and [4,2,S,D] both merge to [8,S,D]; on four dims they would not line up.
    m = batched_core(q_heads=(2, 4), k_heads=(4, 2))
    unchanged(m)


def test_a_scores_tensor_read_outside_the_block_stays_batched():
    m = batched_core(extra_nodes=[node("Identity", ["scores"], ["scores_out"])],
                     extra_outputs=[value("scores_out", ["bh", "seq", "kv"])])
    unchanged(m)


def test_a_batched_operand_read_by_a_shape_stays_batched():
    # kt3 would change rank: its Shape would change value.
    m = batched_core(extra_nodes=[node("Shape", ["kt3"], ["kt3_shape"])],
                     extra_outputs=[value("kt3_shape", [3], TensorProto.INT64)])
    unchanged(m)


def test_batched_inputs_without_a_merge_stay():
    built = attention_model(AttentionSpec(kind="cross", head_layout="3d", projection="none"))
    unchanged(built.model)


# --- detours --------------------------------------------------------------------------------------

def detour(split_heads=2, reader="Relu"):
    """SDPA decompositions transpose K on three dims: merge, Transpose(0,2,1), split."""
    nodes = merge("k", "k3") + [
        node("Transpose", ["k3"], ["kt3"], perm=[0, 2, 1]),
        node("Shape", ["kt3"], ["kt3.dkv"], start=1),
        node("Concat", ["heads", "kt3.dkv"], ["kt.target"], axis=0),
        node("Reshape", ["kt3", "kt.target"], ["kt"]), node(reader, ["kt"], ["y"])]
    return model(nodes, [value("k", ["batch", 2, "kv", 4])],
                 [value("y", [None, split_heads, 4, "kv"])],
                 [ints("minus_one", [-1]), ints("heads", [-1, split_heads])],
                 [value("k3", ["bh", "kv", 4])])


def test_a_detour_through_three_dims_becomes_one_transpose():
    m = detour()
    sizes = ({"batch": 2, "kv": 4}, {"batch": 3, "kv": 4})
    result = collapsed(m, at_two_sizes(m, sizes))
    assert ops(result.model) == {"Relu": 1, "Transpose": 1}
    perm = next(a.ints for n in result.model.graph.node for a in n.attribute if a.name == "perm")
    assert list(perm) == [0, 1, 3, 2]
    assert result.counts == {"blocks_collapsed": 0, "detours_collapsed": 1, "reshapes_removed": 2}


def test_a_detour_splitting_other_heads_stays():
    # [2,2,kv,4] -> [4,kv,4] -> [4,4,kv] -> [1,4,4,kv] mixes batch and heads: not a detour.
    m = detour(split_heads=4)
    unchanged(m)


# --- control flow, interface ------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", [Wrap("if", "inner"), Wrap("loop", "inner")],
                         ids=lambda w: w.op)
def test_a_batched_core_inside_a_body_collapses(wrap):
    ex = build_example(Recipe(layers=(Layer((AttentionSpec(kind="self", head_layout="3d",
                                                           mask="add_input"),)),),
                              dynamic=True, batch=2, q_len=3, kv_len=4, wrap=wrap))
    result = collapsed(ex.model, ex.samples)
    assert result.counts["blocks_collapsed"] == len(ex.blocks)
    assert layouts(result.model) == ["BHSD"] * len(ex.blocks)


def test_a_body_whose_targets_live_outside_is_left_alone():
    # ONNX shape inference propagates no values into bodies: with the Reshape targets in the
    # outer graph, nothing about the head dims is provable, so nothing changes.
    ex = build_example(Recipe(layers=(Layer((AttentionSpec(kind="self", head_layout="3d"),)),),
                              dynamic=True, batch=2, q_len=3, kv_len=4, wrap=Wrap("if", "outer")))
    unchanged(ex.model)


def test_the_pass_declares_its_name_description_and_counts():
    assert CollapseBatchedHeads.name == "collapse-batched-heads"
    assert CollapseBatchedHeads.description
    counts = CollapseBatchedHeads()(detour()).counts
    assert set(counts) == {"blocks_collapsed", "detours_collapsed", "reshapes_removed"}


# --- real exports -------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=small_zoo_names())
def exported(request, export_cache):
    exp = small_zoo_export(request.param, export_cache)
    return request.param, onnx.load(exp.path), exp.sample()[0]


def _equivalent_at_two_sizes(original, rewritten, inputs):
    for check in (verify(original, rewritten, inputs=inputs),
                  verify(original, rewritten, dims=other_sizes(original, inputs), seed=3)):
        assert check.ok, check.summary()


@pytest.mark.slow
def test_real_exports_stay_equivalent_at_every_size_with_no_more_reshapes(exported):
    name, original, inputs = exported
    first = CollapseBatchedHeads()(original)
    _equivalent_at_two_sizes(original, first.model, inputs)
    assert ops(first.model).get("Reshape", 0) <= ops(original).get("Reshape", 0)
    blocks = find_attention(first.model)
    assert len(blocks) == len(find_attention(original))
    assert "(BH)SD" not in [block.layout for block in blocks]
    if name == "unet2d-tiny-eager":  # diffusers' eager AttnProcessor: every core is batched
        assert first.counts["blocks_collapsed"] == len(blocks) == 8
    second = CollapseBatchedHeads()(first.model)
    assert not second.changed, second.counts
    assert model_bytes(second.model) == model_bytes(first.model)


@pytest.mark.slow
def test_real_exports_through_both_passes(exported):
    _, original, inputs = exported
    out = SimplifyReshapes()(CollapseBatchedHeads()(original).model).model
    _equivalent_at_two_sizes(original, out, inputs)
    assert ops(out).get("Reshape", 0) <= ops(original).get("Reshape", 0)
    assert len(find_attention(out)) == len(find_attention(original))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nn-mha-time-major", "nn-mha-time-major-torchscript"])
def test_time_major_mha_cross_attention_runs_on_four_dims(name, export_cache):
    """nn.MultiheadAttention with batch_first=False and kdim/vdim splits heads time-major,
    Transpose([1,0,2] / K^T [1,2,0]) of Reshape([S,B,E] -> [S,B*H,D]), and merges the context
    back through Transpose [1,0,2]; both cross cores go to [B,H,S,D] with no extra Reshape."""
    exp = small_zoo_export(name, export_cache)
    original, inputs = onnx.load(exp.path), exp.sample()[0]
    result = CollapseBatchedHeads()(original)
    assert result.counts["blocks_collapsed"] == 2
    assert [b.layout for b in find_attention(result.model)] == ["BHSD"] * 4
    assert ops(result.model).get("Reshape", 0) <= ops(original).get("Reshape", 0)
    _equivalent_at_two_sizes(original, result.model, inputs)
