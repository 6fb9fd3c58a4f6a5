"""The strategies themselves: every drawn example is valid, computes its numpy reference, and
rebuilds from its repr; clutter never changes a value; the op table's shape functions agree with
ONNX and ONNX Runtime (the stateful machine)."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, find, given, note, settings
from hypothesis import strategies as st

from xattn_compiler.testing import AttentionSpec, spec_conflicts
from xattn_compiler.testing import strategies as xst
from xattn_compiler.testing.assertions import assert_valid, model_bytes
from xattn_compiler.testing.clutter import CLUTTER, OPS, chain_shape
from xattn_compiler.testing.strategies import Clutter, Layer, Recipe, Wrap, build_example
from xattn_compiler.verification import default_tolerances, run_model

NAMESPACE = {name: getattr(xst, name) for name in ("build_example", "Recipe", "Layer", "Clutter",
                                                   "Wrap")} | {"AttentionSpec": AttentionSpec}


def rebuild(text: str):
    """The example an ``Example`` repr (or a hypothesis report quoting one) describes."""
    return eval(text, dict(NAMESPACE))  # noqa: S307 - our own repr, in a test


# Regressions: shapes the strategies got wrong once (found by these properties).
MASKED_LATENTS_AND_KV_INPUTS = Recipe(
    layers=(Layer((AttentionSpec(kind="cross", mask="add_input"),
                   AttentionSpec(kind="cross", projection="none", mask="add_input"))),),
    context="constant", dynamic=True, kv_len=1)
DYNAMIC_LOOKALIKE = Recipe(lookalike="softmax_between_weights", dynamic=True)


@given(ex=xst.examples())
@example(ex=build_example(MASKED_LATENTS_AND_KV_INPUTS))
@example(ex=build_example(DYNAMIC_LOOKALIKE))
def test_examples_are_valid_and_compute_their_reference(ex):
    note(ex.description)
    assert_valid(ex.model)
    for sample in ex.samples:
        got = run_model(ex.model, sample)
    got = run_model(ex.model, ex.inputs)
    assert set(got) == set(ex.reference)
    for name, want in ex.reference.items():
        rtol, atol = default_tolerances(got[name].dtype)
        np.testing.assert_allclose(got[name].astype(np.float64), want, rtol=rtol,
                                   atol=atol * max(1.0, np.abs(want).max()), err_msg=name)


# The same arithmetic, yet not bit for bit: ORT picks other kernels once a weight is no longer
# an initializer (float32: a few ulps, far below what a narrowing Cast would add), and its
# float16 Erf differs by an ulp on a transposed-back input, which later layers amplify to ~1 %.
CLUTTER_TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-2}


@given(data=st.data())
def test_clutter_never_changes_a_value(data):
    clean = data.draw(xst.examples(clutter=False, wrap=False), label="clean")
    noisy = data.draw(xst.cluttered(clean), label="cluttered")
    note(noisy.description)
    assert_valid(noisy.model)
    for sample in clean.samples:
        want, got = run_model(clean.model, sample), run_model(noisy.model, sample)
        for name in want:
            tol = CLUTTER_TOLERANCE[want[name].dtype.name] * max(1.0, np.abs(want[name]).max())
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=tol, err_msg=name)


@given(ex=xst.examples())
def test_an_example_rebuilds_from_its_repr(ex):
    again = rebuild(repr(ex))
    assert model_bytes(again.model) == model_bytes(ex.model)
    assert again.blocks == ex.blocks and again.block_graphs == ex.block_graphs


@given(ex=xst.examples())
def test_the_description_names_what_was_drawn(ex):
    text, recipe = ex.description, ex.recipe
    for item in recipe.clutter:
        assert f"{item.kind}" in text and f"'{item.tensor}'" in text
    assert ("wrapped" in text) == (recipe.wrap is not None)
    assert ("look-alike" in text) == (recipe.lookalike is not None)
    assert f"{len(recipe.layers)} layer(s)" in text or recipe.lookalike


@st.composite
def shapes_and_types(draw):
    """Declared shapes: static sizes, symbols, unknowns (None), ranks 0..5."""
    dims = st.one_of(st.integers(1, 4), st.sampled_from(("batch", "seq")), st.none())
    return tuple(draw(st.lists(dims, max_size=5))), draw(
        st.sampled_from(("float32", "float16", "int64", "bool")))


@given(st.sampled_from(sorted(CLUTTER)), shapes_and_types(), st.data())
def test_every_clutter_kind_is_an_identity(name, shape_and_type, data):
    """By the shape functions on the declared shape, and by numpy on a concrete one."""
    shape, dtype = shape_and_type
    kind = CLUTTER[name]
    choices = kind.choices(shape, dtype)
    if not choices:
        return
    steps = kind.steps(shape, dtype, data.draw(st.sampled_from(choices)))
    # A -1 over a merged unknown dim is unknown again: the shape functions answer None there.
    result = chain_shape(shape, steps)
    assert len(result) == len(shape)
    assert all(got == want or got is None for got, want in zip(result, shape, strict=True))
    if all(isinstance(d, int) for d in shape):
        assert result == shape
    sizes = {"batch": 2, "seq": 3, None: 3}
    value = np.arange(np.prod([d if isinstance(d, int) else sizes[d] for d in shape], dtype=int))
    value = value.reshape([d if isinstance(d, int) else sizes[d] for d in shape]).astype(dtype)
    out = value
    for op, params in steps:
        out = OPS[op].numpy(out, params)
    assert out.dtype == value.dtype and np.array_equal(out, value)


@pytest.mark.parametrize("name", [f.name for f in fields(AttentionSpec)
                                  if f.name in xst.SPEC_CHOICES])
def test_attention_specs_reach_every_value_and_no_conflict(name):
    for value in xst.SPEC_CHOICES[name]:
        spec = find(xst.attention_specs(), lambda s, v=value: getattr(s, name) == v,
                    settings=settings(max_examples=2000, database=None, derandomize=True))
        options = {f.name: getattr(spec, f.name) for f in fields(spec)}
        assert spec_conflicts(**options) == []


def test_a_wrapped_example_keeps_outer_names_and_renames_the_else_branch():
    ex = build_example(Recipe(layers=(Layer((AttentionSpec(kind="self"),)),),
                              clutter=(Clutter("identity", "hidden_states"),), wrap=Wrap()))
    then, other = ex.blocks
    assert ex.block_graphs == ("then_branch", "else_branch")
    assert then.output + ".else" == other.output
    assert then.q_source == other.q_source == "hidden_states"  # an outer name: not renamed
    clutter = next(name for name, value in ex.aliases.items() if value == "hidden_states")
    assert ex.root(clutter) == "hidden_states"


class MachineTest(xst.GraphMachine):
    """The op table, clutter, attention and MLP pieces grown at random, checked at the end."""


TestGraphMachine = MachineTest.TestCase


def test_the_testing_guide_example_runs():
    """docs/testing.md's "a few lines" snippet is a working property test."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "testing.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", guide, flags=re.S)
                 if "def test_my_pass" in b and "@given" in b)
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - our own documentation
    # A handful of examples: the snippet is checked, not the (no-op) pass in it.
    settings(settings.default, max_examples=5)(namespace["test_my_pass"])()
