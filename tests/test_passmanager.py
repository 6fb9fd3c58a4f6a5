"""The pass manager: options, pipeline text, order, fixpoint, failures named by pass."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from xattn_compiler.errors import PassError, UnknownPassError
from xattn_compiler.passmanager import (
    Listener,
    Option,
    Pass,
    PassResult,
    Pipeline,
    PipelineError,
    split_pipeline_text,
)
from xattn_compiler.registry import PassRegistry


def relu_chain(length: int) -> onnx.ModelProto:
    """x -> Relu -> Relu -> ... -> y (``length`` nodes)."""
    names = ["x"] + [f"t{i}" for i in range(length - 1)] + ["y"]
    nodes = [helper.make_node("Relu", [names[i]], [names[i + 1]], name=f"relu{i}")
             for i in range(length)]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


class DropOneRelu(Pass):
    """Relu(Relu(x)) -> Relu(x), one pair per run: needs a fixpoint to finish."""

    name = "drop-one-relu"
    description = "remove one of two stacked Relus"

    def run(self, model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        nodes = out.graph.node
        for first, second in zip(nodes, nodes[1:], strict=False):
            if first.op_type == second.op_type == "Relu" and second.input[0] == first.output[0]:
                second.input[0] = first.input[0]
                nodes.remove(first)
                return PassResult(out, True, {"removed": 1})
        return PassResult(out, False, {"removed": 0})


class Tagged(Pass):
    """Records its run order in a shared list; options of every type."""

    name = "tagged"
    description = "records that it ran"
    options = (
        Option("label", str, "a", "a name"),
        Option("times", int, 1, "a count"),
        Option("ratio", float, 0.5, "a float"),
        Option("strict", bool, False, "a flag"),
        Option("inputs", tuple, (), "a list"),
    )
    log: list[str] = []

    def run(self, model):
        Tagged.log.append(self.option("label"))
        return PassResult(model, False)


class Crashes(Pass):
    name = "crashes"
    description = "raises"

    def run(self, model):
        raise ZeroDivisionError("boom")


class BreaksGraph(Pass):
    """Leaves a node reading a tensor nobody produces."""

    name = "breaks-graph"
    description = "writes an invalid graph"

    def run(self, model):
        out = onnx.ModelProto()
        out.CopyFrom(model)
        out.graph.node[0].input[0] = "nowhere"
        return PassResult(out, True)


class AfterTagged(Pass):
    name = "after-tagged"
    description = "must run after tagged"
    run_after = ("tagged",)

    def run(self, model):
        return PassResult(model, False)


REGISTRY = PassRegistry([DropOneRelu, Tagged, Crashes, BreaksGraph, AfterTagged])


@pytest.fixture(autouse=True)
def _clear_log():
    Tagged.log.clear()


# --- pipeline text ---------------------------------------------------------------------------

def test_pipeline_text_splits_passes_and_options():
    assert split_pipeline_text("a, b{x=1 y=p,q},c") == [
        ("a", {}), ("b", {"x": "1", "y": "p,q"}), ("c", {})]


@pytest.mark.parametrize("text", [
    "tagged",
    "tagged{label=b}",
    "tagged{label=b times=3 ratio=0.25 strict=true inputs=enc,mask},drop-one-relu",
])
def test_pipeline_text_round_trips(text):
    assert str(Pipeline.parse(text, REGISTRY)) == text


def test_default_options_are_not_printed():
    assert str(Pipeline.parse("tagged{label=a times=1}", REGISTRY)) == "tagged"


def test_options_are_typed():
    (pass_,) = Pipeline.parse("tagged{times=3 ratio=2 strict=1 inputs=a,b}", REGISTRY).passes
    assert pass_.values == {"label": "a", "times": 3, "ratio": 2.0, "strict": True,
                            "inputs": ("a", "b")}


@pytest.mark.parametrize("text, message", [
    ("tagged{times=three}", "cannot read 'three' as int"),
    ("tagged{colour=red}", "has no option 'colour'"),
    ("taged", "did you mean 'tagged'"),
    ("tagged{label=b", "never closed"),
    ("tagged{label}", "key=value"),
    ("", "empty"),
])
def test_bad_pipeline_text_names_the_problem(text, message):
    with pytest.raises((UnknownPassError, PipelineError), match=message):
        Pipeline.parse(text, REGISTRY)


def test_pass_names_must_be_kebab_case():
    with pytest.raises(TypeError, match="kebab-case"):
        type("Bad", (Pass,), {"name": "Bad_Name"})


# --- running ---------------------------------------------------------------------------------

def test_passes_run_in_the_order_written():
    Pipeline.parse("tagged{label=1},tagged{label=2},tagged{label=3}", REGISTRY).run(relu_chain(1))
    assert Tagged.log == ["1", "2", "3"]


def test_listener_sees_every_pass():
    seen = []

    class Record(Listener):
        def pass_started(self, index, total, pass_):
            seen.append(("start", index, total, pass_.name))

        def pass_finished(self, index, total, record):
            seen.append(("end", index, total, record.name))

    Pipeline.parse("tagged,drop-one-relu", REGISTRY).run(relu_chain(2), Record())
    assert seen == [("start", 0, 2, "tagged"), ("end", 0, 2, "tagged"),
                    ("start", 1, 2, "drop-one-relu"), ("end", 1, 2, "drop-one-relu")]


def test_a_single_run_stops_after_one_round():
    result = Pipeline([DropOneRelu()]).run(relu_chain(4))
    assert len(result.model.graph.node) == 3
    assert result.iterations == 1


def test_fixpoint_repeats_until_nothing_changes():
    result = Pipeline([DropOneRelu()], fixpoint=True).run(relu_chain(4))
    assert len(result.model.graph.node) == 1
    assert result.iterations == 4  # three changing rounds and the one that proves the fixpoint
    assert [r.changed for r in result.records] == [True, True, True, False]


def test_fixpoint_stops_at_the_iteration_cap():
    result = Pipeline([DropOneRelu()], fixpoint=True, max_iterations=2).run(relu_chain(6))
    assert result.iterations == 2
    assert len(result.model.graph.node) == 4


def test_report_counts_nodes_and_time():
    report = Pipeline([DropOneRelu()]).run(relu_chain(3)).report()
    (entry,) = report["passes"]
    assert (entry["name"], entry["changed"], entry["nodes_before"], entry["nodes_after"]) == (
        "drop-one-relu", True, 3, 2)
    assert entry["details"]["counts"] == {"removed": 1}
    assert entry["seconds"] >= 0
    assert (report["nodes_before"], report["nodes_after"]) == (3, 2)


def test_a_crashing_pass_is_named_with_the_passes_before_it():
    pipeline = Pipeline.parse("tagged{label=x},drop-one-relu,crashes", REGISTRY)
    with pytest.raises(PassError) as info:
        pipeline.run(relu_chain(3))
    assert info.value.pass_name == "crashes"
    assert info.value.ran_before == ["tagged{label=x}", "drop-one-relu"]
    assert "ZeroDivisionError: boom" in str(info.value)


def test_debug_mode_names_the_pass_that_broke_the_graph():
    pipeline = Pipeline.parse("tagged,breaks-graph,drop-one-relu", REGISTRY, debug=True)
    with pytest.raises(PassError, match="pass 'breaks-graph' failed: left an invalid graph"):
        pipeline.run(relu_chain(2))


def test_without_debug_a_broken_graph_passes_through():
    result = Pipeline.parse("breaks-graph", REGISTRY).run(relu_chain(2))
    assert result.model.graph.node[0].input[0] == "nowhere"


def test_reproducer_saves_the_failing_input_and_the_rest_of_the_pipeline(tmp_path):
    pipeline = Pipeline.parse("drop-one-relu,crashes,tagged", REGISTRY, reproducer=tmp_path)
    with pytest.raises(PassError):
        pipeline.run(relu_chain(3))
    saved = onnx.load(tmp_path / "input.onnx")
    assert len(saved.graph.node) == 2  # the model as drop-one-relu left it
    assert (tmp_path / "pipeline.txt").read_text().strip() == "crashes,tagged"


def test_passes_do_not_modify_their_input():
    model = relu_chain(3)
    before = model.SerializeToString()
    Pipeline([DropOneRelu()], fixpoint=True).run(model)
    assert model.SerializeToString() == before


def test_declared_order_is_checked():
    with pytest.raises(PipelineError, match="'after-tagged' must run after 'tagged'"):
        Pipeline.parse("after-tagged,tagged", REGISTRY)
    Pipeline.parse("tagged,after-tagged", REGISTRY)  # the right order builds
