"""Control-flow rules: each on a hand-built graph where it applies and where it must refuse.

Every rewrite is checked with all pass properties (valid, equivalent in ONNX Runtime, idempotent,
deterministic, input untouched); refusals leave the model byte for byte and give their reason
in ``details["refused"]``. Then nested control flow, drawn graphs wrapped in If/Loop, the zoo's
control-flow exports and an Optimum-style merged decoder specialised both ways.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from xattn_compiler.passes.control_flow import (
    InlineConstantIf,
    SpecializeInputs,
    UnrollControlFlow,
    UnrollLoops,
    parse_values,
    specialize,
    verify_specialized,
)

from xattn_compiler.attention import find_attention
from xattn_compiler.errors import InputError
from xattn_compiler.ir import op_histogram
from xattn_compiler.passmanager import Pipeline
from xattn_compiler.registry import default_registry
from xattn_compiler.testing.assertions import (
    assert_deterministic,
    assert_idempotent,
    assert_pass_properties,
    assert_valid,
    model_bytes,
)
from xattn_compiler.testing.merged_decoder import (
    MergedDecoderConfig,
    merged_decoder,
    merged_decoder_inputs,
)
from xattn_compiler.testing.strategies import Wrap, attention_models, wrap_example

FLOAT, INT64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
CONTROL_FLOW = {"If", "Loop", "Scan"}


# --- building graphs -----------------------------------------------------------------------------

def model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    built.ir_version = 8
    onnx.checker.check_model(built, full_check=True)
    return built


def value(name, shape, dtype=FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def node(op, inputs, outputs, name=None, **attrs):
    return helper.make_node(op, inputs, outputs, name=name or outputs[0], **attrs)


def body(nodes, inputs, outputs, name="body"):
    return helper.make_graph(nodes, name, inputs, outputs)


def if_model(condition_nodes=(), inputs=(), initializers=(), cond="cond") -> onnx.ModelProto:
    """``y = If(cond, then: x + bias, else: x - bias)`` with ``x`` of shape [2, 3]."""
    then = body([node("Add", ["x", "bias"], ["then_y"], "then_add")], [], [value("then_y", None)],
                "then")
    other = body([node("Sub", ["x", "bias"], ["else_y"], "else_sub")], [], [value("else_y", None)],
                 "else")
    return model([*condition_nodes, node("If", [cond], ["y"], "choose", then_branch=then,
                                         else_branch=other)],
                 [value("x", [2, 3]), *inputs], [value("y", [2, 3])],
                 [const("bias", np.arange(3, dtype=np.float32)), *initializers])


def loop_model(trips=3, *, trips_input=False, omit_trips=False, cond_out=None, first=True,
               scan=True, extra=()) -> onnx.ModelProto:
    """``acc += step * i`` over ``trips`` iterations (node ``accumulate``), each iteration's
    ``acc`` stacked as a scan output; the body reads the outer ``step``."""
    nodes = [node("Cast", ["i"], ["i_f"], "counter", to=FLOAT),
             node("Mul", ["step", "i_f"], ["inc"], "scale"),
             node("Add", ["acc_in", "inc"], ["acc_out"], "accumulate")]
    if cond_out is None:
        nodes.append(node("Identity", ["cond_in"], ["cond_out"], "keep_going"))
    else:
        nodes.extend(cond_out)
    outputs = [value("cond_out", [], BOOL), value("acc_out", [2])]
    if scan:
        nodes.append(node("Identity", ["acc_out"], ["acc_seen"], "observe"))
        outputs.append(value("acc_seen", [2]))
    loop_body = body(nodes, [value("i", [], INT64), value("cond_in", [], BOOL),
                             value("acc_in", [2])], outputs)
    inits = [const("step", np.array([0.5, -1.0], np.float32)), const("keep", np.array(first)),
             *extra]
    inputs = [value("x", [2])]
    if trips_input:
        inputs.append(value("trips", [], INT64))
    elif not omit_trips:
        inits.append(const("trips", np.array(trips, np.int64)))
    outs = ["y", "ys"] if scan else ["y"]
    graph_outputs = [value("y", [2])] + ([value("ys", [None, 2])] if scan else [])
    return model([node("Loop", ["" if omit_trips else "trips", "keep", "x"], outs, "repeat",
                       body=loop_body)], inputs, graph_outputs, inits)


def scan_model(length=4, *, reverse_in=0, reverse_out=0, dynamic=False) -> onnx.ModelProto:
    """A running sum over axis 1 of ``x [2, length]`` (Scan ``cumsum``), sums stacked on axis 0."""
    scan_body = body([node("Add", ["sum_in", "x_t"], ["sum_out"], "add"),
                      node("Identity", ["sum_out"], ["sum_seen"], "observe")],
                     [value("sum_in", [2]), value("x_t", [2])],
                     [value("sum_out", [2]), value("sum_seen", [2])])
    return model([node("Scan", ["zero", "x"], ["total", "sums"], "cumsum", body=scan_body,
                       num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[0],
                       scan_input_directions=[reverse_in], scan_output_directions=[reverse_out])],
                 [value("x", [2, "n" if dynamic else length])],
                 [value("total", [2]), value("sums", [None, 2])],
                 [const("zero", np.zeros(2, np.float32))])


def ops(m) -> dict[str, int]:
    return op_histogram(m)


def node_names(m) -> set[str]:
    return {n.name for n in m.graph.node}


def refused(pass_, m) -> str:
    """The pass leaves ``m`` byte for byte and gives one reason; the reason."""
    result = pass_(m)
    assert not result.changed, result.counts
    assert model_bytes(result.model) == model_bytes(m)
    (refusal,) = result.details["refused"]
    return refusal["reason"]


# --- If ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("taken, kept, gone", [(True, "then_add", "else_sub"),
                                                (False, "else_sub", "then_add")])
def test_if_with_a_constant_condition_becomes_the_branch_it_takes(taken, kept, gone):
    m = if_model(initializers=[const("cond", np.array(taken))])
    result = assert_pass_properties(InlineConstantIf(), m)
    assert result.counts == {"ifs_inlined": 1}
    assert "If" not in ops(result.model)
    # The branch's node keeps its name and writes the If's output.
    (only,) = result.model.graph.node
    assert only.name == kept and list(only.output) == ["y"] and gone not in node_names(result.model)


def test_if_condition_computed_from_static_shapes_is_known():
    # cond = Shape(x)[0] == 2: constant once x's shape is static, with no folding pass first.
    nodes = [node("Shape", ["x"], ["x_shape"]), node("Gather", ["x_shape", "zero"], ["rows"]),
             node("Equal", ["rows", "two"], ["cond"])]
    m = if_model(nodes, initializers=[const("zero", np.array(0, np.int64)),
                                      const("two", np.array(2, np.int64))])
    result = assert_pass_properties(InlineConstantIf(), m)
    assert set(ops(result.model)) == {"Add"}


def test_if_condition_from_a_dynamic_shape_is_refused_naming_the_tensor():
    nodes = [node("Shape", ["z"], ["z_shape"]), node("Gather", ["z_shape", "zero"], ["rows"]),
             node("Equal", ["rows", "two"], ["cond"])]
    m = if_model(nodes, [value("z", ["batch"])], [const("zero", np.array(0, np.int64)),
                                                   const("two", np.array(2, np.int64))])
    reason = refused(InlineConstantIf(), m)
    assert "condition 'cond' is not known" in reason and "shape of 'z' is not static" in reason


def test_if_on_a_graph_input_is_refused_with_the_specialise_hint():
    reason = refused(InlineConstantIf(), if_model(inputs=[value("cond", [], BOOL)]))
    assert "'cond' is a graph or body input" in reason
    assert "--specialize cond=VALUE" in reason


def test_branch_returning_its_own_initializer_keeps_the_graph_output_name():
    # No node writes the branch's output (an initializer of the branch): an Identity named
    # after the If and the output writes y.
    then = helper.make_graph([], "then", [], [value("then_c", [2, 3])],
                             [const("then_c", np.full((2, 3), 7.0, np.float32))])
    other = body([node("Sub", ["x", "bias"], ["else_y"], "else_sub")], [], [value("else_y", None)],
                 "else")
    m = model([node("If", ["cond"], ["y"], "choose", then_branch=then, else_branch=other)],
              [value("x", [2, 3])], [value("y", [2, 3])],
              [const("bias", np.arange(3, dtype=np.float32)), const("cond", np.array(True))])
    result = assert_pass_properties(InlineConstantIf(), m)
    (identity,) = result.model.graph.node
    assert (identity.op_type, identity.name) == ("Identity", "choose.y")
    assert list(identity.input) == ["then_c"] and list(identity.output) == ["y"]


# --- Loop ----------------------------------------------------------------------------------------

def test_loop_unrolls_threading_carried_values_and_stacking_scan_outputs():
    m = loop_model(3)
    result = assert_pass_properties(UnrollLoops(), m)
    assert result.counts == {"loops_unrolled": 1, "iterations": 3}
    assert "Loop" not in ops(result.model)
    names = node_names(result.model)
    assert {f"accumulate.iter{i}" for i in range(3)} <= names
    # The counter is a constant per copy; the last copy writes the Loop's output directly.
    counters = {t.name: int(numpy_helper.to_array(t)) for t in result.model.graph.initializer
                if t.name.startswith("i.iter")}
    assert counters == {"i.iter0": 0, "i.iter1": 1, "i.iter2": 2}
    last = next(n for n in result.model.graph.node if n.name == "accumulate.iter2")
    assert list(last.output) == ["y"]
    assert ops(result.model)["Concat"] == 1


def test_loop_whose_condition_starts_false_runs_zero_times():
    result = assert_pass_properties(UnrollLoops(), loop_model(3, first=False, scan=False))
    assert result.counts == {"loops_unrolled": 1, "iterations": 0}
    assert ops(result.model) == {"Identity": 1}   # y = x: the graph output keeps its name


@pytest.mark.parametrize("build, pass_, reason", [
    (lambda: loop_model(trips_input=True), UnrollLoops(),
     "trip count or condition not known at compile time ('trips' is a graph or body input); "
     "specialise it: --specialize trips=VALUE"),
    (lambda: loop_model(omit_trips=True, scan=False), UnrollLoops(), "no trip count M"),
    (lambda: loop_model(3), UnrollLoops(max_trip_count=2), "trip count 3 exceeds max-trip-count 2"),
    (lambda: loop_model(3, cond_out=[node("Less", ["i", "lim"], ["cond_out"], "while_i_small")],
                        extra=[const("lim", np.array(5, np.int64))]),
     UnrollLoops(), "the body computes its condition 'cond_out' (a while loop)"),
    (lambda: loop_model(0), UnrollLoops(), "zero iterations with scan outputs"),
], ids=["dynamic-trip-count", "while-loop", "over-the-bound", "computed-condition",
        "zero-trips-with-scan"])
def test_loop_refusals_leave_the_model_and_say_why(build, pass_, reason):
    assert reason in refused(pass_, build())


def test_body_condition_that_is_a_constant_true_unrolls():
    cond = [node("Constant", [], ["cond_out"], "always", value=helper.make_tensor(
        "t", BOOL, [], [True]))]
    result = assert_pass_properties(UnrollLoops(), loop_model(2, cond_out=cond))
    assert result.counts["iterations"] == 2


# --- Scan ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse_in, reverse_out", [(0, 0), (1, 0), (0, 1)])
def test_scan_with_a_static_length_unrolls_in_either_direction(reverse_in, reverse_out):
    m = scan_model(4, reverse_in=reverse_in, reverse_out=reverse_out)
    result = assert_pass_properties(UnrollLoops(), m)
    assert result.counts == {"scans_unrolled": 1, "iterations": 4}
    assert "Scan" not in ops(result.model) and ops(result.model)["Gather"] == 4
    assert {f"add.iter{t}" for t in range(4)} <= node_names(result.model)


def test_scan_over_a_dynamic_length_is_refused():
    assert "dynamic length ('n' on axis 1)" in refused(UnrollLoops(), scan_model(dynamic=True))


# --- nesting -------------------------------------------------------------------------------------

def counter_if_loop(trips=3) -> onnx.ModelProto:
    """A Loop whose body holds ``If(i == 0, then: acc + step, else: acc * 2)``: the condition
    reads the iteration counter, so it is known only in the unrolled copies."""
    then = body([node("Add", ["acc_in", "step"], ["first"], "start")], [], [value("first", None)],
                "then")
    other = body([node("Mul", ["acc_in", "two"], ["later"], "double")], [], [value("later", None)],
                 "else")
    nodes = [node("Equal", ["i", "zero"], ["is_first"], "is_first"),
             node("If", ["is_first"], ["acc_out"], "first_step", then_branch=then,
                  else_branch=other),
             node("Identity", ["cond_in"], ["cond_out"], "keep_going")]
    loop_body = body(nodes, [value("i", [], INT64), value("cond_in", [], BOOL),
                             value("acc_in", [2])],
                     [value("cond_out", [], BOOL), value("acc_out", [2])])
    return model([node("Loop", ["trips", "", "x"], ["y"], "repeat", body=loop_body)],
                 [value("x", [2])], [value("y", [2])],
                 [const("trips", np.array(trips, np.int64)), const("zero", np.array(0, np.int64)),
                  const("step", np.array([1.0, 2.0], np.float32)),
                  const("two", np.array(2.0, np.float32))])


def test_if_on_the_iteration_counter_is_inlined_in_each_unrolled_copy():
    result = assert_pass_properties(UnrollControlFlow(), counter_if_loop())
    assert not CONTROL_FLOW & set(ops(result.model))
    assert result.counts == {"loops_unrolled": 1, "iterations": 3, "ifs_inlined": 3}
    # Iteration 0 took the then-branch, the others the else-branch, each under a readable name.
    assert {"start.iter0", "double.iter1", "double.iter2"} <= node_names(result.model)


def test_unrolling_alone_leaves_valid_renamed_copies_of_a_nested_if():
    result = assert_pass_properties(UnrollLoops(), counter_if_loop())
    ifs = [n for n in result.model.graph.node if n.op_type == "If"]
    assert [n.name for n in ifs] == ["first_step.iter0", "first_step.iter1", "first_step.iter2"]
    # Each copy's branches compute their own tensors (SSA across the whole model).
    outputs = [o for n in ifs for a in n.attribute for b in [a.g] for o in b.output]
    assert len({o.name for o in outputs}) == 6


def test_if_with_constant_condition_inside_a_loop_body_is_inlined_first():
    m = counter_if_loop(2)
    m.graph.node[0].attribute[0].g.node[0].CopyFrom(
        node("Equal", ["zero", "zero"], ["is_first"], "is_first"))   # always the then-branch
    result = assert_pass_properties(UnrollControlFlow(), m)
    assert result.counts["ifs_inlined"] == 1   # once, in the body, before the copies are made
    assert {"start.iter0", "start.iter1"} <= node_names(result.model)


def test_refusals_inside_a_body_name_the_body():
    m = counter_if_loop()
    trips = next(t for t in m.graph.initializer if t.name == "trips")
    m.graph.initializer.remove(trips)
    m.graph.input.append(value("trips", [], INT64))
    result = UnrollControlFlow()(m)
    assert not result.changed and model_bytes(result.model) == model_bytes(m)
    inner, outer = result.details["refused"]   # innermost first
    assert (inner["node"], inner["graph"]) == ("first_step", "/repeat/body")
    assert "'i' is a graph or body input" in inner["reason"]
    assert (outer["node"], outer["graph"]) == ("repeat", "")


def test_loop_inside_a_loop_body_unrolls_innermost_first_with_stacked_suffixes():
    inner = loop_model(2, scan=False).graph.node[0]
    inner_body = inner.attribute[0].g
    outer_body = body([helper.make_node("Loop", ["trips", "keep", "acc_in"], ["acc_out"],
                                        name="inner", body=inner_body),
                       node("Identity", ["cond_in"], ["cond_out"], "keep_going")],
                      [value("j", [], INT64), value("cond_in", [], BOOL), value("acc_in", [2])],
                      [value("cond_out", [], BOOL), value("acc_out", [2])], "outer_body")
    m = model([node("Loop", ["trips", "keep", "x"], ["y"], "outer", body=outer_body)],
              [value("x", [2])], [value("y", [2])],
              [const("trips", np.array(2, np.int64)), const("keep", np.array(True)),
               const("step", np.array([0.5, -1.0], np.float32))])
    result = assert_pass_properties(UnrollControlFlow(), m)
    # Inner first (2 copies in the body), then the outer loop copies that body twice.
    assert result.counts == {"loops_unrolled": 2, "iterations": 4}
    assert "accumulate.iter1.iter0" in node_names(result.model)


# --- specialising --------------------------------------------------------------------------------

def test_specialising_the_condition_input_inlines_the_if_and_keeps_inputs_still_read():
    m = if_model(inputs=[value("cond", [], BOOL)])
    result = specialize(m, {"cond": True})
    assert "If" not in ops(result.model)
    assert [i.name for i in result.model.graph.input] == ["x"]
    assert result.counts == {"inputs_specialized": 1, "ifs_inlined": 1, "inputs_removed": 0}
    feeds = {"x": np.ones((2, 3), np.float32), "cond": np.array(True)}
    assert verify_specialized(m, result.model, {"cond": True}, inputs=feeds).ok


def test_a_trip_count_input_specialised_lets_the_loop_unroll():
    m = loop_model(trips_input=True)
    pass_ = Pipeline.parse("specialize-inputs{values=trips=4}").passes[0]
    assert str(Pipeline([pass_])) == "specialize-inputs{values=trips=4}"
    result = pass_(m)
    assert result.counts["iterations"] == 4 and "Loop" not in ops(result.model)
    assert_valid(result.model)
    assert verify_specialized(m, result.model, {"trips": 4}, seed=3).ok
    # The input is gone, so a second run has nothing to do (and says which name it missed).
    again = pass_(result.model)
    assert not again.changed and again.details["not_inputs"] == ["trips"]


def test_verifying_a_specialisation_against_another_value_fails():
    m = loop_model(trips_input=True)
    result = specialize(m, {"trips": 4})
    assert not verify_specialized(m, result.model, {"trips": 3}).ok


@pytest.mark.parametrize("text, message", [
    ("cond", "'cond' is not written NAME=VALUE"),
    ("cond=", "'cond=' is not written NAME=VALUE"),
])
def test_values_text_must_be_name_equals_value(text, message):
    with pytest.raises(InputError, match=message):
        parse_values(text)


def test_values_text_reads_several_pairs():
    assert parse_values("use_cache_branch=false, n=3") == {"use_cache_branch": "false", "n": "3"}


def test_specialise_errors_name_the_input():
    with pytest.raises(InputError, match=r"no graph input 'nope' \(inputs: x, cond\)"):
        specialize(if_model(inputs=[value("cond", [], BOOL)]), {"nope": 1})
    with pytest.raises(InputError, match="cannot read 'maybe' as bool for input 'cond'"):
        specialize(if_model(inputs=[value("cond", [], BOOL)]), {"cond": "maybe"})
    with pytest.raises(InputError, match=r"input 'x' has no static shape \(\['batch'\]\)"):
        specialize(loop_model_dynamic_x(), {"x": 1.0})


def loop_model_dynamic_x() -> onnx.ModelProto:
    return model([node("Relu", ["x"], ["y"])], [value("x", ["batch"])], [value("y", ["batch"])])


# --- drawn graphs wrapped in control flow --------------------------------------------------------

@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(ex=attention_models(max_layers=2), op=st.sampled_from(("if", "loop")),
       initializers=st.sampled_from(("outer", "inner")))
def test_attention_in_a_wrapped_graph_is_found_after_unrolling(ex, op, initializers):
    wrapped = wrap_example(ex, Wrap(op, initializers))
    result = assert_pass_properties(UnrollControlFlow(), wrapped.model, wrapped.samples)
    assert not CONTROL_FLOW & set(ops(result.model))
    # Matched as the pipeline matches: Einsum cores after normalize-spellings.
    found = find_attention(default_registry().get("normalize-spellings")().run(
        result.model).model)
    assert sorted((b.kind, b.num_heads, b.head_dim) for b in found) == sorted(
        (t.kind, t.num_heads, t.head_dim) for t in ex.blocks)
    assert all(b.subgraph == "" for b in found)


# --- the merged decoder --------------------------------------------------------------------------

PAST_INPUTS = [f"past_key_values.{i}.{p}.{k}" for i in range(2) for p in ("decoder", "encoder")
               for k in ("key", "value")]


def test_merged_decoder_has_attention_in_both_branches():
    m = merged_decoder()
    blocks = find_attention(m)
    by_branch = {(b.subgraph.rsplit("/", 1)[-1], b.kind) for b in blocks}
    assert by_branch == {(branch, kind) for branch in ("then_branch", "else_branch")
                         for kind in ("self", "cross")}
    assert len(blocks) == 8


@pytest.mark.parametrize("use_cache, kept_inputs", [
    (False, ["input_ids", "encoder_hidden_states"]),
    (True, ["input_ids", *PAST_INPUTS]),
], ids=["first-step", "with-past"])
def test_merged_decoder_specialised_either_way_matches_the_original(use_cache, kept_inputs):
    m = merged_decoder()
    values = {"use_cache_branch": use_cache}
    result = specialize(m, values)
    assert not CONTROL_FLOW & set(ops(result.model))
    assert [i.name for i in result.model.graph.input] == kept_inputs
    assert [o.name for o in result.model.graph.output] == [o.name for o in m.graph.output]
    assert_valid(result.model)
    for seed, sizes in enumerate([{}, {"seq": 1, "past": 7}]):
        feeds = merged_decoder_inputs(use_cache, seed=seed, **sizes)
        check = verify_specialized(m, result.model, values, inputs=feeds)
        assert check.ok, check.summary()
    blocks = find_attention(result.model)
    assert sorted(b.kind for b in blocks) == ["cross", "cross", "self", "self"]
    assert all(b.subgraph == "" and (b.num_heads, b.head_dim) == (4, 8) for b in blocks)


def test_merged_decoder_specialisation_is_idempotent_and_deterministic():
    pass_ = SpecializeInputs(values="use_cache_branch=false")
    m = merged_decoder(MergedDecoderConfig(num_layers=1))
    first = assert_deterministic(pass_, m)
    assert first.details["removed_inputs"] == PAST_INPUTS[:4]
    assert_idempotent(pass_, m, first)


def test_unrolling_without_the_value_refuses_the_merged_decoder_if():
    reason = refused(UnrollControlFlow(), merged_decoder(MergedDecoderConfig(num_layers=1)))
    assert "--specialize use_cache_branch=VALUE" in reason


# --- the zoo's control-flow exports (cached real exports) -----------------------------------------

def _zoo(name, export_cache):
    from xattn_compiler import io as xio
    from xattn_compiler.zoo import cached_export, get_model
    from xattn_compiler.zoo.export import requirements_missing

    missing = requirements_missing(get_model(name))
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    exported = cached_export(name, export_cache)
    return exported, xio.load(exported.path)


def test_zoo_control_flow_family_is_what_these_tests_cover():
    from xattn_compiler import zoo

    names = sorted(m.name for m in zoo.all_models() if m.family == "control-flow")
    assert names == ["if-cross-attention", "loop-cross-attention"]


@pytest.mark.slow
def test_zoo_loop_unrolls_and_its_attention_is_found_three_times(export_cache):
    exported, m = _zoo("loop-cross-attention", export_cache)
    inputs, _ = exported.sample()
    result = assert_pass_properties(UnrollControlFlow(), m, inputs)
    assert not CONTROL_FLOW & set(ops(result.model))
    assert result.counts == {"loops_unrolled": 1, "iterations": 3}
    blocks = find_attention(result.model)
    assert sorted(b.kind for b in blocks) == ["cross"] * 3 + ["self"] * 3
    assert all(b.subgraph == "" for b in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("use_cache", [True, False])
def test_zoo_if_specialised_matches_the_original_on_its_sample(use_cache, export_cache):
    exported, m = _zoo("if-cross-attention", export_cache)
    inputs, _ = exported.sample()
    values = {"use_cache_branch": use_cache}
    result = specialize(m, values)
    assert not CONTROL_FLOW & set(ops(result.model))
    assert [i.name for i in result.model.graph.input] == ["x", "context"]
    check = verify_specialized(m, result.model, values, inputs=inputs)
    assert check.ok, check.summary()
    assert sorted(b.kind for b in find_attention(result.model)) == ["cross", "self"]


@pytest.mark.slow
def test_zoo_if_without_a_value_is_refused_with_the_hint(export_cache):
    _, m = _zoo("if-cross-attention", export_cache)
    assert "--specialize use_cache_branch=VALUE" in refused(UnrollControlFlow(), m)


# --- the docs ------------------------------------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "control-flow.md"


def test_the_docs_specialising_example_runs():
    first = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    exec(first, {})  # noqa: S102 - the documented example, asserting what the doc says


def test_the_docs_command_lines_are_valid_pipelines():
    commands = re.findall(r"--passes \"([^\"]+)\"", DOC.read_text())
    assert len(commands) == 2
    for text in commands:
        assert str(Pipeline.parse(text)) == text
