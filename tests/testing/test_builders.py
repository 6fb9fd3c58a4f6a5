"""The attention graph builders: valid models that ONNX Runtime runs to the numpy reference,
with ground truth that holds in the graph (checked structurally and numerically here, without
the attention matcher)."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from xattn_compiler.testing import (
    CONTEXT_KINDS,
    DTYPES,
    HEAD_LAYOUTS,
    K_TRANSPOSES,
    KINDS,
    MASKS,
    PROJECTIONS,
    SCALES,
    SHAPE_STYLES,
    AttentionSpec,
    BuiltModel,
    GraphBuilder,
    StaticShapeRequired,
    add_attention,
    attention_model,
    classifier_model,
    cnn_model,
    kv_input_shapes,
    softmax_between_weights_model,
    spec_conflicts,
)
from xattn_compiler.testing.builders import CORES, MERGES, ROPE_TABLES, ROPES, SOFTMAX_AXES

OTHER_SIZES = {"batch": 3, "q_len": 4, "kv_len": 9, "seq": 6, "past_len": 5}
ORT_ERRORS = (ort.capi.onnxruntime_pybind11_state.Fail,
              ort.capi.onnxruntime_pybind11_state.RuntimeException,
              ort.capi.onnxruntime_pybind11_state.InvalidArgument)


# --- helpers --------------------------------------------------------------------------------

def run(model: onnx.ModelProto, inputs: dict, extra: tuple[str, ...] = ()) -> dict:
    """Run with ORT's optimizations off, so the graph as written is judged; ``extra`` are
    intermediate tensors exposed as outputs."""
    if extra:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in extra)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(None, inputs), strict=True))


def assert_close(got: dict, reference: dict, dtype: str) -> None:
    rtol, atol = (2e-2, 2e-2) if dtype == "float16" else (1e-3, 1e-4)
    bad = []
    for name, ref in reference.items():
        value = np.asarray(got[name], dtype=np.float64)
        limit = atol * max(1.0, float(np.abs(ref).max()))
        if value.shape != ref.shape or not np.allclose(value, ref, rtol=rtol, atol=limit):
            err = np.abs(value - ref).max() if value.shape == ref.shape else "shape"
            bad.append(f"{name}: max error {err} (shape {value.shape} vs {ref.shape})")
    assert not bad, "; ".join(bad)


def dtype_of(built: BuiltModel) -> str:
    return built.blocks[0].spec.dtype if built.blocks else "float32"


def check_runs(built: BuiltModel) -> None:
    """Checker (full), ORT vs the numpy reference, and every block's output/result tensors."""
    onnx.checker.check_model(built.model, full_check=True)
    names = tuple(dict.fromkeys(n for t in built.blocks for n in (t.output, t.result)))
    env = built.evaluate(built.inputs)
    assert set(names) <= set(env), f"the reference never computes {set(names) - set(env)}"
    got = run(built.model, built.inputs, names)
    assert_close(got, {**built.reference, **{n: env[n] for n in names}}, dtype_of(built))


def check_other_sizes(built: BuiltModel) -> None:
    """Every dynamic size changed at once: the graph must still match the reference."""
    sizes = {name: OTHER_SIZES[name] for name in built.dynamic}
    inputs, reference = built.sample(seed=7, **sizes)
    assert_close(run(built.model, inputs), reference, dtype_of(built))


def value_graph(model: onnx.ModelProto) -> tuple[dict, dict]:
    """Edges tensor -> consumers' outputs, ignoring Shape (it reads no values), both ways."""
    down: dict[str, set[str]] = {}
    up: dict[str, set[str]] = {}
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        for src in filter(None, node.input):
            down.setdefault(src, set()).update(node.output)
            for out in node.output:
                up.setdefault(out, set()).add(src)
    return down, up


def reach(edges: dict, start: str, cut: set[str] = frozenset()) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in cut or name == start:
            stack.extend(edges.get(name, ()))
    return seen


def check_truth(built: BuiltModel) -> None:
    """Each BlockTruth agrees with the graph: names exist, sources feed the block, the K/V
    binding kind and static inputs follow from the value edges."""
    graph = built.model.graph
    inputs = {v.name for v in graph.input}
    tensors = inputs | {i.name for i in graph.initializer} | {o for n in graph.node
                                                              for o in n.output}
    down, up = value_graph(built.model)
    cross = [t for t in built.blocks if t.kind == "cross"]
    cuts = {t.output for t in cross}
    for t in built.blocks:
        named = (t.output, t.result, t.q_source, t.k_source, t.v_source, *t.mask_inputs)
        assert set(named) <= tensors, f"{t.name}: unknown tensors {set(named) - tensors}"
        feeding = reach(up, t.output)
        assert t.output in reach(up, t.result), f"{t.name}: output does not feed result"
        if t.spec.head_layout != "time_major":  # whose result is transposed back to [B,S,E]
            assert (t.output == t.result) != t.spec.out_projection, t.name
        assert {t.q_source, t.k_source, t.v_source} <= feeding, f"{t.name}: a source does not feed"
        if t.spec.rope == "none":  # with RoPE, Q and K start at the rotated heads
            assert (t.kind == "self") == (t.q_source == t.k_source == t.v_source), t.name
        else:  # ... computed from V's source
            assert t.kind == "self" and {t.q_source, t.k_source} <= reach(down, t.v_source), \
                t.name
        kv_inputs = (reach(up, t.k_source) | reach(up, t.v_source)) & inputs
        via_attention = {b.output for b in built.blocks if b is not t} & (
            reach(up, t.k_source) | reach(up, t.v_source))
        expected = ("constant" if not kv_inputs else
                    "graph_input" if t.kind == "cross" and kv_inputs <= set(t.static_inputs)
                    and not via_attention else "internal")
        assert t.kv_source_kind == expected, f"{t.name}: {t.kv_source_kind} != {expected}"
        for name in t.static_inputs:
            assert name in kv_inputs, f"{t.name}: static input {name} does not feed K/V"
            reached = reach(down, name, cuts)
            leaks = reached & ({o.name for o in graph.output} | {b.q_source for b in cross})
            assert not leaks, f"{t.name}: static input {name} reaches {leaks} around K/V"


def valid_specs(grid: dict, others: dict) -> list[AttentionSpec]:
    """Every valid combination of ``grid``; the ``others`` options drawn per combination from
    a fixed-seed generator (redrawn on a clash), so a product over a few options still mixes
    in all the rest."""
    rng = random.Random(",".join(grid))
    specs = []
    for combo in itertools.product(*grid.values()):
        for _ in range(20):  # redraw the others when they clash with this combination
            drawn = {name: rng.choice(values) for name, values in others.items()}
            options = {**drawn, **dict(zip(grid, combo, strict=True))}
            if not spec_conflicts(**options):
                specs.append(AttentionSpec(**options))
                break
    return specs


# --- every spelling builds, runs and matches --------------------------------------------------

STRUCTURE = valid_specs(
    {"kind": KINDS, "projection": PROJECTIONS, "head_layout": HEAD_LAYOUTS,
     "k_transpose": K_TRANSPOSES},
    {"scale": SCALES, "mask": MASKS, "shape_style": SHAPE_STYLES, "dtype": DTYPES,
     "softmax_cast": (False, True), "out_projection": (True, True, False)})

SCORES = valid_specs(
    {"scale": SCALES, "mask": MASKS, "head_layout": HEAD_LAYOUTS, "dtype": DTYPES},
    {"kind": KINDS, "projection": PROJECTIONS, "k_transpose": K_TRANSPOSES,
     "shape_style": SHAPE_STYLES, "softmax_cast": (False, True), "out_projection": (True, False)})

PAIRS = valid_specs(
    {"projection": PROJECTIONS, "scale": SCALES, "mask": MASKS},
    {"kind": KINDS, "head_layout": HEAD_LAYOUTS, "k_transpose": K_TRANSPOSES,
     "shape_style": SHAPE_STYLES, "dtype": DTYPES, "softmax_cast": (False, True),
     "out_projection": (True, False)})


@pytest.mark.parametrize("spec", STRUCTURE + SCORES + PAIRS, ids=lambda s: s.label)
def test_spelling_is_valid_and_matches_reference(spec):
    built = attention_model(spec)
    check_runs(built)
    check_truth(built)
    check_other_sizes(built)
    (truth,) = built.blocks
    assert (truth.kind, truth.num_heads, truth.head_dim) == (spec.kind, 2, 8)


#: The spellings drawn since issue 17 (Einsum cores and merges, RoPE, KV caches, GQA, the
#: Softmax axis), each against every kind and mixed with all the rest.
NEW_SPELLINGS = valid_specs(
    {"kind": KINDS, "core": CORES, "rope": ROPES, "kv_cache": (False, True)},
    {"merge": MERGES, "rope_table": ROPE_TABLES, "kv_groups": (1, 2),
     "softmax_axis": SOFTMAX_AXES, "projection": PROJECTIONS, "head_layout": HEAD_LAYOUTS,
     "scale": SCALES, "mask": MASKS, "shape_style": SHAPE_STYLES, "dtype": DTYPES,
     "softmax_cast": (False, True)}) + valid_specs(
    {"merge": MERGES, "kv_groups": (1, 2), "softmax_axis": SOFTMAX_AXES,
     "rope_table": ROPE_TABLES},
    {"kind": KINDS, "rope": ROPES, "kv_cache": (False, True), "projection": PROJECTIONS,
     "scale": SCALES, "mask": MASKS, "shape_style": SHAPE_STYLES})


@pytest.mark.parametrize("spec", NEW_SPELLINGS, ids=lambda s: s.label)
def test_new_spelling_is_valid_and_matches_reference(spec):
    built = attention_model(spec)
    check_runs(built)
    check_truth(built)
    check_other_sizes(built)
    (truth,) = built.blocks
    assert (truth.kind, truth.num_heads, truth.head_dim) == (spec.kind, 2, 8)


def test_option_grids_cover_every_value():
    specs = STRUCTURE + SCORES + PAIRS + NEW_SPELLINGS
    for name, values in {"kind": KINDS, "projection": PROJECTIONS, "head_layout": HEAD_LAYOUTS,
                         "k_transpose": K_TRANSPOSES, "scale": SCALES, "mask": MASKS,
                         "shape_style": SHAPE_STYLES, "dtype": DTYPES,
                         "softmax_cast": (False, True), "out_projection": (False, True),
                         "core": CORES, "merge": MERGES, "rope": ROPES,
                         "rope_table": ROPE_TABLES, "kv_cache": (False, True),
                         "kv_groups": (1, 2), "softmax_axis": SOFTMAX_AXES}.items():
        assert {getattr(s, name) for s in specs} == set(values), name


COMPUTED = valid_specs(
    {"kind": KINDS, "projection": PROJECTIONS, "head_layout": HEAD_LAYOUTS,
     "k_transpose": K_TRANSPOSES},
    {"shape_style": ("computed",), "mask": ("none", "add_input", "add_bias_input", "where_bool"),
     "scale": SCALES[:5]})


@pytest.mark.parametrize("spec", COMPUTED, ids=lambda s: s.label)
def test_computed_shapes_keep_every_size_dynamic(spec):
    built = attention_model(spec)
    expected = ("batch", "q_len") if spec.kind == "self" else ("batch", "q_len", "kv_len")
    assert built.dynamic == expected
    onnx.checker.check_model(built.model, full_check=True)
    check_other_sizes(built)
    # The same graph at a second size must not reuse anything from the first.
    inputs, reference = built.sample(seed=3, **{n: OTHER_SIZES[n] + 2 for n in built.dynamic})
    assert_close(run(built.model, inputs), reference, spec.dtype)


def test_const_targets_that_need_static_lengths_pin_them():
    built = attention_model(AttentionSpec(head_layout="3d"))  # [-1, S, D] needs a static S
    assert built.dynamic == ("batch",)
    check_other_sizes(built)
    with pytest.raises(StaticShapeRequired, match="shape_style='const'"):
        add_attention(*_dynamic_block_args(AttentionSpec(head_layout="3d")))
    with pytest.raises(StaticShapeRequired, match="add_causal_const"):
        add_attention(*_dynamic_block_args(AttentionSpec(mask="add_causal_const")))
    assert attention_model(AttentionSpec(), dynamic=False).dynamic == ()


def _dynamic_block_args(spec):
    b = GraphBuilder(seed=0)
    query = b.input("x", ("batch", "q_len", spec.inner), spec.dtype)
    context = b.input("ctx", ("batch", "kv_len", spec.inner), spec.dtype)
    return b, spec, query, context, "attn"


@pytest.mark.parametrize("dtype,cast,out", list(itertools.product(DTYPES, (False, True),
                                                                    (False, True))))
def test_casts_and_out_projection(dtype, cast, out):
    spec = AttentionSpec(dtype=dtype, softmax_cast=cast, out_projection=out)
    built = attention_model(spec)
    check_runs(built)
    ops = [n.op_type for n in built.model.graph.node]
    assert ops.count("Cast") == (2 if cast else 0)
    (truth,) = built.blocks
    assert (truth.output == truth.result) != out


# --- the reference is the math, not the spelling ----------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_spellings_of_one_block_share_one_reference(kind):
    """Weights are drawn in the same order for every spelling, so the numpy reference must be
    identical while the graphs differ; each graph is checked against it."""
    base = AttentionSpec(kind=kind)
    variants = [replace(base, projection=p) for p in PROJECTIONS if p not in ("matmul", "none")]
    variants += [replace(base, scale=s) for s in SCALES if s != "none"]
    variants += [replace(base, head_layout="3d", k_transpose=k) for k in K_TRANSPOSES]
    first = attention_model(base)
    for spec in variants:
        built = attention_model(spec)
        np.testing.assert_array_equal(built.reference["output"], first.reference["output"])
        assert_close(run(built.model, built.inputs), first.reference, "float32")
    # "folded" changes the stored Q weight, not the reference.
    folded = attention_model(replace(base, scale="folded"))
    name = f"layers.0.{kind}_attn.q_proj.weight"
    stored = [{i.name: numpy_helper.to_array(i) for i in m.model.graph.initializer}[name]
              for m in (first, folded)]
    np.testing.assert_allclose(stored[1], stored[0] * 8 ** -0.5, rtol=1e-6)


@pytest.mark.parametrize("q_len,kv_len", [(5, 5), (3, 6)])
def test_causal_mask_hides_only_later_keys(q_len, kv_len):
    spec = AttentionSpec(kind="self" if q_len == kv_len else "cross", mask="add_causal_const")
    built = attention_model(spec, q_len=q_len, kv_len=kv_len)
    (mask,) = [numpy_helper.to_array(i) for i in built.model.graph.initializer
               if i.name.endswith("causal_mask")]
    shift = kv_len - q_len  # the last query sees every key
    for i, j in itertools.product(range(q_len), range(kv_len)):
        assert (mask[i, j] == -np.inf) == (j > i + shift) and mask[i, j] in (0, -np.inf)
    check_runs(built)


def test_scale_truth_is_what_the_graph_applies():
    for scale in SCALES:
        (truth,) = attention_model(AttentionSpec(scale=scale, head_dim=16)).blocks
        assert truth.scale == (1.0 if scale in ("none", "folded") else 0.25), scale


# --- context kinds and stacked layers -------------------------------------------------------

EXPECTED_KV = {"input": ("graph_input", ("encoder_hidden_states",)),
               "constant": ("constant", ()),
               "encoded": ("graph_input", ("encoder_input",)),
               "internal": ("internal", ("encoder_input",)),
               "initializer": ("constant", ())}


@pytest.mark.parametrize("context_kind,layers,decoder",
                         list(itertools.product(CONTEXT_KINDS, (1, 2), (False, True))))
def test_context_kinds_and_layers(context_kind, layers, decoder):
    spec = AttentionSpec(projection="fused_split", mask="add_input")
    self_spec = AttentionSpec(kind="self", mask="add_causal_const") if decoder else None
    built = attention_model(spec, self_spec=self_spec, layers=layers, context_kind=context_kind,
                            context_embed=24)
    check_runs(built)
    check_truth(built)
    check_other_sizes(built)
    encoder = [t for t in built.blocks if t.name.startswith("encoder.")]
    decoder_blocks = [t for t in built.blocks if t not in encoder]
    assert len(encoder) == (context_kind == "internal")
    assert [t.kind for t in decoder_blocks] == (["self", "cross"] if decoder else ["cross"]) * layers
    for t in decoder_blocks:
        if t.kind == "cross":
            assert (t.kv_source_kind, t.static_inputs) == EXPECTED_KV[context_kind]
        else:
            assert (t.kv_source_kind, t.static_inputs) == ("internal", ())
    if context_kind in ("constant", "initializer"):
        assert "kv_len" not in built.dynamic


def test_projection_none_reads_per_layer_kv_inputs():
    spec = AttentionSpec(projection="none", k_transpose="fused", head_layout="3d")
    built = attention_model(spec, layers=2)
    check_runs(built)
    check_truth(built)
    for layer, truth in enumerate(built.blocks):
        names = (f"cross_key_{layer}", f"cross_value_{layer}")
        assert (truth.k_source, truth.v_source) == names
        assert truth.static_inputs == names and truth.kv_source_kind == "graph_input"
    key, value = kv_input_shapes(spec, "batch", "kv_len")
    assert key == ("batch", "kv_len", 2, 8) and value == ("batch*2", "kv_len", 8)


def test_add_attention_into_a_custom_graph():
    """Blocks compose in a hand-built graph; the default K/V truth follows the context."""
    spec = AttentionSpec(kind="cross", shape_style="computed")
    b = GraphBuilder("custom", seed=3)
    x = b.input("x", ("batch", "n", 16))
    memory = b.input("memory", ("batch", "m", 12))
    first = add_attention(b, spec, x, memory, "first")
    second = add_attention(b, spec, x, first.result, "second")
    b.output(second.result, ("batch", "n", 16))
    built = b.finish([first, second], {"batch": 2, "n": 3, "m": 4})
    assert built.dynamic == ("batch", "n", "m") and list(built.reference) == [second.result]
    assert (first.kv_source_kind, first.static_inputs) == ("graph_input", ("memory",))
    assert (second.kv_source_kind, second.static_inputs) == ("internal", ())
    check_runs(built)
    check_truth(built)


def test_shape_inference_gives_block_outputs_their_shape():
    for spec in STRUCTURE[::3]:
        built = attention_model(spec)
        inferred = onnx.shape_inference.infer_shapes(built.model, check_type=True,
                                                     strict_mode=True, data_prop=True)
        shapes = {v.name: v.type.tensor_type.shape for v in inferred.graph.value_info}
        for truth in built.blocks:
            dims = shapes[truth.output].dim
            assert len(dims) == 3 and dims[2].dim_value == spec.inner, spec.label


# --- look-alikes ----------------------------------------------------------------------------

@pytest.mark.parametrize("factory,softmax", [(classifier_model, True),
                                             (softmax_between_weights_model, True),
                                             (cnn_model, False)])
def test_look_alikes_run_and_hold_no_attention(factory, softmax):
    built = factory()
    assert built.blocks == []
    check_runs(built)
    check_other_sizes(built)
    ops = {n.op_type for n in built.model.graph.node}
    assert ("Softmax" in ops) == softmax


def test_softmax_between_weights_has_only_constant_operands():
    graph = softmax_between_weights_model().model.graph
    weights = {i.name for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 2 and all(n.input[1] in weights for n in matmuls)


# --- options that do not go together --------------------------------------------------------

@pytest.mark.parametrize("options,fragments", [
    ({"kind": "self", "projection": "none"}, ["projection='none'", "kind='self'"]),
    ({"projection": "fused_gather", "k_transpose": "fused"},
     ["projection='fused_gather'", "k_transpose='fused'"]),
    ({"scale": "sqrt"}, ["scale='sqrt'", "div_after"]),
    ({"num_heads": 0}, ["num_heads=0"]),
    ({"dtype": "bfloat16", "mask": "causal"}, ["dtype='bfloat16'", "mask='causal'"]),
])
def test_conflicting_spec_options_raise(options, fragments):
    with pytest.raises(ValueError) as error:
        AttentionSpec(**options)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert spec_conflicts(**options)
    assert spec_conflicts() == [] and spec_conflicts(bogus=1) != []


@pytest.mark.parametrize("spec,kwargs,fragments", [
    (AttentionSpec(kind="self"), {"context_kind": "constant"}, ["context_kind='constant'",
                                                                "kind='cross'"]),
    (AttentionSpec(projection="none"), {"context_kind": "encoded"}, ["projection='none'",
                                                                     "context_kind"]),
    (AttentionSpec(), {"self_spec": AttentionSpec()}, ["self_spec must have kind='self'"]),
    (AttentionSpec(kind="self"), {"self_spec": AttentionSpec(kind="self")},
     ["spec.kind must be 'cross'"]),
    (AttentionSpec(), {"self_spec": AttentionSpec(kind="self", dtype="float16")}, ["dtype"]),
    (AttentionSpec(out_projection=False), {"embed": 24}, ["out_projection=False", "24"]),
    (AttentionSpec(), {"layers": 0}, ["layers=0"]),
    (AttentionSpec(), {"opset": 13}, ["opset 13"]),
])
def test_conflicting_model_options_raise(spec, kwargs, fragments):
    with pytest.raises(ValueError) as error:
        attention_model(spec, **kwargs)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_add_attention_rejects_mismatched_operands():
    b, spec, query, context, _ = _dynamic_block_args(AttentionSpec(shape_style="computed"))
    with pytest.raises(ValueError, match="takes no context"):
        add_attention(b, replace(spec, kind="self"), query, context)
    with pytest.raises(ValueError, match="needs context=\\(key, value\\)"):
        add_attention(b, replace(spec, projection="none"), query, context)
    with pytest.raises(ValueError, match="no known shape"):
        add_attention(b, spec, query, "nowhere")
    with pytest.raises(ValueError, match="spec says float16"):
        add_attention(b, replace(spec, dtype="float16"), query, context)
    other = b.input("other", (3, "kv_len", 16))
    with pytest.raises(ValueError, match="context batch"):
        add_attention(b, spec, query, other)
    one = b.input("one", (1, "kv_len", 16))  # broadcasts over [B,H,S,D] heads only
    with pytest.raises(ValueError, match="broadcasts over the batch only"):
        add_attention(b, replace(spec, head_layout="3d"), query, one)


def test_sampled_masks_always_keep_a_key():
    built = attention_model(AttentionSpec(mask="where_bool"), batch=64, kv_len=2)
    mask = built.inputs["encoder_attention_mask_bool"]
    assert mask.dtype == bool and mask[..., 0].all() and not mask.all()
    additive = attention_model(AttentionSpec(mask="add_input"), batch=64, kv_len=2)
    values = additive.inputs["encoder_attention_mask"]
    assert set(np.unique(values)) == {0.0, -1e4} and (values[..., 0] == 0).all()


def test_sample_refuses_static_and_unknown_sizes():
    built = attention_model(AttentionSpec(mask="add_causal_const"))
    assert built.dynamic == ("batch",)
    with pytest.raises(ValueError, match="q_len is static"):
        built.sample(q_len=9)
    with pytest.raises(ValueError, match="unknown size"):
        built.sample(width=3)


# --- the builder itself ----------------------------------------------------------------------

def test_builder_names_are_unique_and_models_deterministic():
    b = GraphBuilder()
    assert [b.unique("w"), b.unique("w"), b.unique("w")] == ["w", "w_1", "w_2"]
    b.input("x", ("batch", 4))
    assert b.input("x", ("batch", 4)) == "x"
    with pytest.raises(ValueError, match="already declared"):
        b.input("x", ("batch", 5))
    with pytest.raises(ValueError, match="opset"):
        GraphBuilder(opset=12)
    spec = AttentionSpec(projection="fused_gather", mask="where_bool")
    one, two = attention_model(spec, seed=4), attention_model(spec, seed=4)
    assert one.model.SerializeToString() == two.model.SerializeToString()
    assert attention_model(spec, seed=5).model.SerializeToString() != \
        one.model.SerializeToString()
    assert one.model.ir_version == 10 and one.model.opset_import[0].version == 18
    names = [n.name for n in one.model.graph.node]
    assert len(names) == len(set(names)) and all(names)


# --- the checks above can fail ----------------------------------------------------------------

def test_numeric_check_catches_a_changed_weight():
    built = attention_model(AttentionSpec(kind="self"))
    init = next(i for i in built.model.graph.initializer if i.name.endswith("k_proj.weight"))
    array = numpy_helper.to_array(init).copy()
    array[0, 0] += 0.05
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    with pytest.raises(AssertionError, match="max error"):
        check_runs(built)


def test_numeric_check_catches_a_wrong_scale():
    plain = attention_model(AttentionSpec(scale="none"))
    scaled = attention_model(AttentionSpec())
    with pytest.raises(AssertionError, match="output"):
        assert_close(run(scaled.model, scaled.inputs), plain.reference, "float32")


def test_dynamic_check_catches_a_static_reshape():
    built = attention_model(AttentionSpec(shape_style="computed"))
    target = next(n for n in built.model.graph.node if n.name.endswith("merge"))
    frozen = built.model.graph.initializer.add()
    frozen.CopyFrom(numpy_helper.from_array(np.array([2, 5, 16], dtype=np.int64), "frozen"))
    target.input[1] = "frozen"
    check_runs(built)  # at the sizes it was built for, the frozen target still fits
    with pytest.raises(ORT_ERRORS, match="merge"):
        check_other_sizes(built)


@pytest.mark.parametrize("change", [
    {"output": "layers.0.cross_attn.q_proj.add_bias"},
    {"static_inputs": ()},
    {"static_inputs": ("hidden_states",)},
    {"kv_source_kind": "constant"},
    {"k_source": "hidden_states"},
    {"kind": "self"},
])
def test_truth_check_catches_a_wrong_truth(change):
    built = attention_model(AttentionSpec())
    check_truth(built)
    built.blocks = [replace(built.blocks[0], **change)]
    with pytest.raises(AssertionError):
        check_truth(built)


def test_checks_catch_output_swapped_with_result():
    built = attention_model(AttentionSpec())
    truth = built.blocks[0]
    built.blocks = [replace(truth, output=truth.result, result=truth.output)]
    with pytest.raises(AssertionError, match="output does not feed result"):
        check_truth(built)
    built.blocks = [replace(truth, output="layers.0.cross_attn.scores")]
    with pytest.raises(AssertionError, match="never computes"):
        check_runs(built)
