"""Every registered pass, on drawn graphs: its output is valid and equivalent (ONNX Runtime, on
each sample size), it is idempotent and deterministic byte for byte, and it leaves its input
alone. A new pass gets these tests by being registered; one that needs options to do anything
declares them in a ``property_options`` class attribute (a dict of option values).

Deliberately broken passes below check that the properties catch each kind of mistake, with a
shrunk counterexample that reads as a description and pastes into ``@example``.
"""

from __future__ import annotations

import os
import re

import onnx
import pytest
from hypothesis import HealthCheck, Phase, event, example, given, note, settings
from hypothesis.control import currently_in_test_context
from onnx import helper

from xattn_compiler.errors import XattnError
from xattn_compiler.passmanager import Pass, PassResult
from xattn_compiler.registry import default_registry
from xattn_compiler.testing import AttentionSpec
from xattn_compiler.testing import strategies as xst
from xattn_compiler.testing.assertions import assert_pass_properties
from xattn_compiler.testing.strategies import Clutter, Layer, Recipe, Wrap, build_example
from xattn_compiler.verification import random_inputs

PASSES = list(default_registry())


def make_pass(cls: type[Pass], options: dict | None = None) -> Pass:
    """An instance with the options the pass asks its property tests to use."""
    return cls(**(getattr(cls, "property_options", {}) if options is None else options))


def _variants(cls: type[Pass]) -> list[dict | None]:
    """Option sets a pass is tested under: ``property_variants`` (one test each, e.g. every
    fusion target), else its ``property_options``."""
    return list(getattr(cls, "property_variants", [None]))


#: Every registered pass under each of its option variants.
PASS_CASES = [pytest.param(cls, options, id=cls.name + "".join(
    f"[{v}]" for v in (options or {}).values())) for cls in PASSES for options in _variants(cls)]


def _graphs(model: onnx.ModelProto):
    stack = [model.graph]
    while stack:
        graph = stack.pop()
        yield graph
        for node in graph.node:
            stack.extend(attr.g for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH)


def check_pass(pass_: Pass, ex: xst.Example) -> None:
    """The property: every pass property on one example (the description goes in the report)."""
    note(f"{pass_.name} on: {ex.description}")
    outcome = assert_pass_properties(pass_, ex.model, ex.samples)
    if isinstance(outcome, XattnError):
        note(f"{pass_.name} refused the model: {outcome}")
    if currently_in_test_context():  # statistics: what was drawn and what the pass did
        event(ex.category)
        event("refused" if isinstance(outcome, XattnError) else
              "changed" if outcome.changed else "unchanged")


def _has_sliced_shape(ex: xst.Example) -> bool:
    return any(node.op_type == "Shape" and any(a.name in ("start", "end") for a in node.attribute)
               for graph in _graphs(ex.model) for node in graph.node)


def _wrapped_with_computed_targets(ex: xst.Example) -> bool:
    r = ex.recipe
    specs = [s for layer in r.layers for s in layer.attention] + ([r.encoder] if r.encoder else [])
    return r.wrap is not None and any(s.shape_style == "computed" for s in specs)


#: Bugs in registered passes, by pass: a minimal reproduction (shrunk by hypothesis) and the
#: kind of example it covers. The reproductions are strict xfails, so fixing a bug fails them
#: until the entry goes; the property excuses only matching examples (unless
#: XATTN_STRICT_PROPERTIES=1). Report new ones rather than adding them silently.
KNOWN_PASS_BUGS: dict = {}

#: Bugs the properties found and that are fixed: their shrunk reproductions stay as
#: ``@example`` regression cases of every registered pass.
FIXED_PASS_BUGS = {
    # onnx-graphsurgeon's fold_shapes folds Shape(x, start=0, end=1) to the whole shape of x
    # (canonicalize now folds sliced Shapes itself and hides the rest from graphsurgeon).
    ("canonicalize", "shape-start-end-folded-whole"): (
        Recipe(layers=(Layer((AttentionSpec(kind="self", head_dim=4),)),
                       Layer((AttentionSpec(kind="cross"),))),
               context="constant", batch=1, q_len=1, kv_len=1),
        _has_sliced_shape),
    # One run folded what it could and stopped; inside If/Loop bodies (no ONNX data
    # propagation) the folded targets make more shapes known, so a second run folded 14 more
    # nodes (canonicalize now repeats to a fixpoint).
    ("canonicalize", "no-fixpoint-in-bodies"): (
        Recipe(layers=(Layer((AttentionSpec(kind="cross", shape_style="computed"),)),),
               context="internal", encoder=AttentionSpec(kind="self"),
               batch=1, q_len=1, kv_len=1, wrap=Wrap()),
        _wrapped_with_computed_targets),
    # (thorough profile) An fp16 block whose Softmax already ran in float32 got a Cast back to
    # float16 after it anyway: its readers, typed float32, received float16.
    ("guard-precision", "cast-back-after-an-fp32-softmax"): (
        Recipe(layers=(Layer((AttentionSpec(kind="self", softmax_cast=True, dtype="float16"),)),),
               dtype="float16", batch=1, q_len=1, kv_len=1,
               clutter=(Clutter(kind="identity", tensor="layers.0.self_attn.probs",
                                region="probs"),)),
        lambda ex: any(s.softmax_cast for layer in ex.recipe.layers for s in layer.attention)),
    # (thorough profile) Not idempotent: after the first run's Cast, a probabilities chain with
    # clutter was longer than the matcher walks, the block was not found, and the second run
    # dropped the fp32 layer list the first had recorded.
    ("guard-precision", "layer-list-dropped-when-the-block-hides"): (
        Recipe(layers=(Layer((AttentionSpec(kind="self", head_dim=4, dtype="float16"),)),),
               dtype="float16", batch=1, q_len=1, kv_len=1,
               clutter=(Clutter(kind="identity", tensor="layers.0.self_attn.probs", region="probs"),
                        Clutter(kind="cast_roundtrip", tensor="layers.0.self_attn.probs",
                                region="probs"),
                        Clutter(kind="identity", tensor="layers.0.self_attn.probs", region="probs"))),
        lambda ex: bool(ex.recipe.clutter)),
    # (thorough profile, bf16) Not idempotent: a rotary table Gathered by one layer and
    # Sliced to the sequence length by another; the Slice stayed fp32 reading an fp32 Cast of
    # the converted table, which a second run did not take for the constant it was.
    ("convert-precision", "shared-rotary-table-sliced-by-shape"): (
        Recipe(layers=(Layer((AttentionSpec(kind="self", head_layout="3d", rope="rotate_half"),)),
                       Layer((AttentionSpec(kind="self", projection="fused_split",
                                            head_layout="3d", rope="rotate_half",
                                            rope_table="constant"),))),
               batch=1, q_len=1, kv_len=1),
        lambda ex: True),
    # (thorough profile) Not idempotent: with nothing to fold, the pass returned its own
    # export of the model (shapes re-inferred: a stale 'unk__1' became 1 on the second run)
    # while reporting no change. An unchanged run returns the input now.
    ("split-static-kv", "unchanged-run-returned-a-re-export"): (
        Recipe(layers=(Layer((AttentionSpec(kind="self", head_layout="3d", k_transpose="fused"),)),
                       Layer((AttentionSpec(kind="self", head_dim=1, projection="fused_split"),)),
                       Layer((AttentionSpec(kind="cross", k_transpose="fused",
                                            shape_style="computed"),))),
               context="initializer", q_len=1, kv_len=1,
               clutter=(Clutter("identity", "layers.2.cross_attn.k.split_heads.shape_of",
                                region="shape"),)),
        lambda ex: True),
}
STRICT = os.environ.get("XATTN_STRICT_PROPERTIES") == "1"


def known_pass_bug(pass_name: str, ex: xst.Example) -> str | None:
    """The name of the known bug of pass ``pass_name`` that ``ex`` may hit, if any."""
    return next((bug for (name, bug), (_, covers) in KNOWN_PASS_BUGS.items()
                 if name == pass_name and covers(ex)), None)


def _regressions(test):
    """Every known bug's reproduction as an ``@example``: excused while the bug is listed,
    a regression case once it is fixed and removed from the list."""
    for recipe, _ in [*KNOWN_PASS_BUGS.values(), *FIXED_PASS_BUGS.values()]:
        test = example(ex=build_example(recipe))(test)
    return test


@pytest.mark.parametrize("pass_cls, options", PASS_CASES)
@given(ex=xst.examples())
@_regressions
def test_registered_pass_properties(pass_cls, options, ex):
    try:
        check_pass(make_pass(pass_cls, options), ex)
    except AssertionError:
        bug = known_pass_bug(pass_cls.name, ex)
        if STRICT or bug is None:
            raise
        event(f"excused: known bug {bug}")


@pytest.mark.xfail(strict=True, reason="known pass bug; remove it from KNOWN_PASS_BUGS once fixed")
@pytest.mark.parametrize("key", sorted(KNOWN_PASS_BUGS), ids="/".join)
def test_known_pass_bug(key):
    recipe, covers = KNOWN_PASS_BUGS[key]
    ex = build_example(recipe)
    assert covers(ex)
    check_pass(make_pass(default_registry().get(key[0])), ex)


class PassMachine(xst.GraphMachine):
    """Random op-table graphs (Softmax, Tanh, Casts, reshapes, clutter, attention) for every
    registered pass, besides the attention stacks."""

    def check(self, model: onnx.ModelProto) -> None:
        inputs = random_inputs(model, seed=0)
        for cls in PASSES:
            for options in _variants(cls):
                assert_pass_properties(make_pass(cls, options), model, inputs)


TestPassMachine = PassMachine.TestCase
# Every run checks every pass: a quarter of the profile's examples keeps it in proportion.
TestPassMachine.settings = settings(settings.default, max_examples=max(
    5, settings.default.max_examples // 4))


# --- the properties catch broken passes ----------------------------------------------------------

class SoftmaxOverBatch(Pass):
    """Broken: normalizes every Softmax over axis 0 (a wrong rewrite: changes values)."""

    name = "softmax-over-batch"

    def run(self, model):
        out = onnx.ModelProto.FromString(model.SerializeToString())
        changed = False
        for graph in _graphs(out):
            for node in graph.node:
                axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
                if node.op_type == "Softmax" and axis != 0:
                    del node.attribute[:]
                    node.attribute.append(helper.make_attribute("axis", 0))
                    changed = True
        return PassResult(out, changed)


class RenamesAtRandom(Pass):
    """Broken: gives the first node a name from a process-wide counter (not deterministic)."""

    name = "renames-at-random"
    calls = 0

    def run(self, model):
        RenamesAtRandom.calls += 1
        out = onnx.ModelProto.FromString(model.SerializeToString())
        out.graph.node[0].name = f"renamed_{RenamesAtRandom.calls}"
        return PassResult(out, True)


class AppendsIdentity(Pass):
    """Broken: puts one more Identity in front of the first output on every run (never done)."""

    name = "appends-identity"

    def run(self, model):
        out = onnx.ModelProto.FromString(model.SerializeToString())
        graph = out.graph
        name = graph.output[0].name
        producer = next(n for n in graph.node if name in n.output)
        fresh = f"{name}_{len(graph.node)}"
        producer.output[list(producer.output).index(name)] = fresh
        graph.node.append(helper.make_node("Identity", [fresh], [name], name=fresh + "_id"))
        return PassResult(out, True)


class DropsTransposePairs(Pass):
    """Broken: takes any Transpose read only by a Transpose for a pair that cancels, and
    removes both (right only when the second perm inverts the first)."""

    name = "drops-transpose-pairs"

    def run(self, model):
        out = onnx.ModelProto.FromString(model.SerializeToString())
        graph, changed = out.graph, False
        readers = {}
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node)
        for first in list(graph.node):
            after = readers.get(first.output[0], [])
            if first.op_type != "Transpose" or len(after) != 1 or after[0].op_type != "Transpose":
                continue
            second = after[0]
            if second.output[0] in {v.name for v in graph.output}:
                continue
            for node in graph.node:
                node.input[:] = [first.input[0] if n == second.output[0] else n
                                 for n in node.input]
            graph.node.remove(second)
            graph.node.remove(first)
            changed = True
            break  # one pair per run, so a second run finds the next one
        return PassResult(out, changed)


def falsify(pass_: Pass) -> AssertionError:
    """Run the property on ``pass_`` until it fails; the error, with hypothesis's notes."""

    # No explain phase: it reruns the failure many times to list the lines it ran.
    @settings(settings.default, database=None, derandomize=True, print_blob=False,
              suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate, Phase.shrink], report_multiple_bugs=False)
    @given(ex=xst.examples())
    def prop(ex):
        check_pass(pass_, ex)

    with pytest.raises(AssertionError) as info:
        prop()
    return info.value


def shrunk_example(error: AssertionError) -> tuple[str, str]:
    """The falsifying example's repr and description, from the failure report."""
    notes = "\n".join(getattr(error, "__notes__", []))
    # "    ex=build_example(Recipe(...)),  # or any other generated value" (the comment when
    # every example fails).
    call = re.search(r"^\s*ex=(build_example\(.*\)),?(\s+#.*)?$", notes, re.M)
    described = re.search(r"^\S+ on: (.*)$", notes, re.M)
    assert call and described, notes
    return call.group(1), described.group(1)


@pytest.mark.parametrize("broken, message", [
    (SoftmaxOverBatch, "the models are not equivalent"),
    (DropsTransposePairs, "not equivalent|invalid model"),
    (RenamesAtRandom, "is not deterministic"),
    (AppendsIdentity, "is not idempotent"),
], ids=lambda value: value.name if isinstance(value, type) else "")
def test_a_broken_pass_is_caught_with_a_shrunk_readable_counterexample(broken, message):
    error = falsify(broken())
    assert re.search(message, str(error)), str(error)
    text, description = shrunk_example(error)
    note_text = "\n".join(error.__notes__)
    print(f"{broken.name}: {error}\n{note_text}")  # what a developer sees (pytest -s)
    # Shrunk to the simplest model that still fails: one layer or a look-alike, no clutter,
    # no wrapper.
    assert description.startswith(("1 layer(s)", "look-alike")), description
    assert "no clutter" in description and "wrapped" not in description
    again = eval(text, {**vars(xst), "AttentionSpec": AttentionSpec})  # noqa: S307
    assert again.description == description
    with pytest.raises(AssertionError, match=message):
        assert_pass_properties(broken(), again.model, again.samples)
