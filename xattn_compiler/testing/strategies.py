"""Hypothesis strategies for random valid ONNX graphs that carry their ground truth.

Every strategy draws a :class:`Recipe` (plain data: the attention spellings per layer, MLPs,
norms, sizes, clutter, control flow) and builds it with :func:`build_example` into an
:class:`Example`: the model, the blocks a matcher must find (kind, heads, head dim, scale,
sources, static inputs, where K/V come from), sample inputs and the numpy reference outputs.
An example's ``repr`` is the Python expression that rebuilds it, so a shrunk counterexample
pastes straight into ``@example(...)``; its ``description`` says in words what was drawn.

- :func:`attention_specs`: one block's spelling, respecting
  :func:`~xattn_compiler.testing.spec_conflicts`: projections (MatMul, Gemm, Einsum, fused
  QKV/KV cut by Split, Slice, Gather or per head), 4-D, batched 3-D or time-major heads,
  MatMul or Einsum cores and merges, every scale placement, additive, boolean (both
  polarities), causal and relative-position masks, RoPE, KV caches, GQA, the Softmax axis.
- :func:`recipes` / :func:`attention_models`: 1..3 layers of self, cross or decoder-style
  (self then cross) blocks with residuals and LayerNorm (post- or pre-norm), optional MLPs
  (MatMul + bias + Relu/Gelu + MatMul), every cross-attention context kind (a batch-1
  initializer context included), fp32 or fp16,
  static or dynamic dims.
- :func:`lookalike_models`: graphs with a Softmax but no attention (no block may be found).
- :func:`cluttered`: value-preserving clutter from :mod:`xattn_compiler.testing.clutter` on
  tensors outside blocks and where the pattern library allows it inside them.
- :func:`control_flow`: the whole graph as the then-branch of an ``If`` with a constant true
  condition (the else-branch a copy) or as the body of a ``Loop`` with trip count 1.
- :func:`examples`: all of the above mixed, the clean models first (they shrink there).
- :class:`GraphMachine`: a stateful machine growing a graph from a bundle of values with the op
  table, attention blocks and MLPs; its invariants check validity, the shape functions, the
  values against numpy and the matcher against the planted blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

import numpy as np
import onnx
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
)
from onnx import helper, numpy_helper

from .builders import (
    CONTEXT_KINDS,
    CORES,
    DTYPES,
    HEAD_LAYOUTS,
    K_TRANSPOSES,
    KINDS,
    MASKS,
    MERGES,
    PAST_LEN,
    PROJECTIONS,
    ROPE_TABLES,
    ROPES,
    SCALES,
    SHAPE_STYLES,
    SOFTMAX_AXES,
    AttentionSpec,
    BlockTruth,
    BuiltModel,
    GraphBuilder,
    StaticShapeRequired,
    add_attention,
    classifier_model,
    cnn_model,
    kv_input_shapes,
    softmax_between_weights_model,
    spec_conflicts,
)
from .clutter import CLUTTER, OPS, clutter_sites, emit_chain, insert_clutter, tensor_types

__all__ = [
    "LOOKALIKES", "Clutter", "Example", "GraphMachine", "Layer", "Recipe", "Wrap",
    "attention_models", "attention_specs", "build_example", "cluttered", "control_flow",
    "examples", "lookalike_models", "recipes",
]

#: Look-alike models: a Softmax (or none) but no attention.
LOOKALIKES = ("classifier", "softmax_between_weights", "cnn")
MLP_ACTIVATIONS = ("relu", "gelu")
_SIZE_NAMES = ("batch", "q_len", "kv_len")
#: Sizes the extra sample uses for the dims a model keeps dynamic.
_OTHER_SIZES = {"batch": 3, "q_len": 4, "kv_len": 9, "seq": 6, "past_len": 2}


# --- recipes: what was drawn, as data that rebuilds it ------------------------------------------

def _spec_repr(spec: AttentionSpec) -> str:
    """``AttentionSpec(kind='self', projection='gemm')``: only what differs from the default."""
    parts = [f"{f.name}={getattr(spec, f.name)!r}" for f in fields(spec)
             if f.name == "kind" or getattr(spec, f.name) != f.default]
    return f"AttentionSpec({', '.join(parts)})"


def _compact_repr(obj: Any) -> str:
    """The dataclass's constructor call with the fields that differ from their defaults."""
    parts = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.default is not MISSING and value == f.default:
            continue
        if isinstance(value, AttentionSpec):
            text = _spec_repr(value)
        elif isinstance(value, tuple) and value and isinstance(value[0], AttentionSpec):
            text = "(" + ", ".join(_spec_repr(s) for s in value) + ",)"
        else:
            text = repr(value)
        parts.append(f"{f.name}={text}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def _pretty(self, printer, cycle: bool) -> None:
    # Hypothesis prints dataclasses field by field; the compact repr is what pastes into
    # an @example, so print that.
    printer.text(repr(self))


@dataclass(frozen=True, repr=False)
class Layer:
    """One layer: ``attention`` blocks in order (each with residual and norm), then an MLP."""

    attention: tuple[AttentionSpec, ...]
    mlp: str | None = None

    __repr__ = _compact_repr
    _repr_pretty_ = _pretty


@dataclass(frozen=True, repr=False)
class Clutter:
    """Clutter ``kind`` (a key of :data:`~xattn_compiler.testing.clutter.CLUTTER`) on ``tensor``.

    ``region`` (where :func:`~xattn_compiler.testing.clutter.clutter_sites` put the tensor)
    is for the description only.
    """

    kind: str
    tensor: str
    choice: Any = None
    region: str = ""

    __repr__ = _compact_repr
    _repr_pretty_ = _pretty


@dataclass(frozen=True, repr=False)
class Wrap:
    """A control-flow wrapper: ``op`` ``"if"`` (the then-branch; the else-branch is a copy with
    every local name suffixed ``.else``) or ``"loop"`` (trip count 1); initializers stay in the
    ``"outer"`` graph or move into the bodies (``"inner"``).

    The else-branch cannot reuse the then-branch's names: ONNX shape inference with data
    propagation (what :func:`xattn_compiler.ir.infer_shapes` runs) shares one table between
    sibling branches and fails with "Data for input 0 already exists".
    """

    op: str = "if"
    initializers: str = "outer"

    __repr__ = _compact_repr
    _repr_pretty_ = _pretty


@dataclass(frozen=True, repr=False)
class Recipe:
    """Everything drawn for one example; :func:`build_example` turns it into the model.

    ``layers`` of blocks over ``hidden_states[batch, q_len, embed]``; cross-attention reads the
    ``context`` (one of :data:`~xattn_compiler.testing.CONTEXT_KINDS`, ``context_embed`` wide;
    ``encoder`` is the self-attention spelling of the ``internal`` context). ``norm`` is
    ``post`` or ``pre``. With ``dynamic`` the sizes are symbolic where the spellings allow.
    ``lookalike`` (one of :data:`LOOKALIKES`) builds a model without attention instead.
    ``clutter`` is applied in order, then ``wrap``.
    """

    layers: tuple[Layer, ...] = ()
    embed: int = 8
    dtype: str = "float32"
    context: str = "input"
    context_embed: int | None = None
    encoder: AttentionSpec | None = None
    norm: str = "post"
    dynamic: bool = False
    batch: int = 2
    q_len: int = 5
    kv_len: int = 7
    seed: int = 0
    lookalike: str | None = None
    clutter: tuple[Clutter, ...] = ()
    wrap: Wrap | None = None

    __repr__ = _compact_repr
    _repr_pretty_ = _pretty


# --- examples -------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False, repr=False)
class Example:
    """A model built from ``recipe``, with its ground truth.

    ``blocks[i]`` is found in the graph named ``block_graphs[i]`` (``""`` top level, else the
    attribute of the wrapping node: ``then_branch``, ``else_branch``, ``body``). ``inputs`` are
    sample inputs, ``reference`` the numpy outputs for them, ``samples`` every input set worth
    checking (``inputs`` first, then other sizes of the dynamic dims). ``aliases`` map a
    clutter output to the tensor whose value it repeats (see :meth:`root`).
    """

    recipe: Recipe
    model: onnx.ModelProto
    blocks: tuple[BlockTruth, ...]
    block_graphs: tuple[str, ...]
    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    samples: tuple[dict[str, np.ndarray], ...]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def description(self) -> str:
        """What was drawn, in words: spellings per layer, sizes, clutter, control flow."""
        return describe(self.recipe)

    @property
    def category(self) -> str:
        """``clean``, ``cluttered``, ``wrapped`` or ``cluttered+wrapped``, with ``look-alike``
        in front for models without attention (for ``hypothesis.event`` statistics)."""
        parts = [p for p, on in (("cluttered", self.recipe.clutter),
                                 ("wrapped", self.recipe.wrap)) if on]
        text = "+".join(parts) or "clean"
        return f"look-alike {text}" if self.recipe.lookalike else text

    def root(self, name: str) -> str:
        """The tensor whose value ``name`` repeats through clutter (``name`` if none)."""
        seen = set()
        while name in self.aliases and name not in seen:
            seen.add(name)
            name = self.aliases[name]
        return name

    def __repr__(self) -> str:
        return f"build_example({self.recipe!r})"

    _repr_pretty_ = _pretty


def describe(recipe: Recipe) -> str:
    """A one-paragraph account of a recipe (what :attr:`Example.description` returns)."""
    r = recipe
    if r.lookalike:
        text = f"look-alike '{r.lookalike}' (no attention), batch={r.batch}"
    else:
        dims = "dynamic" if r.dynamic else "static"
        text = (f"{len(r.layers)} layer(s), {r.dtype}, embed={r.embed}, {r.norm}-norm, {dims} "
                f"dims (batch={r.batch}, q_len={r.q_len}, kv_len={r.kv_len})")
        if any(s.kind == "cross" for layer in r.layers for s in layer.attention):
            text += f", context={r.context}"
            if r.context == "internal" and r.encoder is not None:
                text += f" via encoder {_spec_label(r.encoder)}"
        for i, layer in enumerate(r.layers):
            parts = [_spec_label(spec) for spec in layer.attention]
            parts += [f"mlp({layer.mlp})"] if layer.mlp else []
            text += f"; layer {i}: " + " + ".join(parts)
    if r.clutter:
        text += "; clutter: " + ", ".join(
            f"{c.kind}{'' if c.choice is None else f'({c.choice})'} on '{c.tensor}'"
            + (f" [{c.region}]" if c.region else "") for c in r.clutter)
    else:
        text += "; no clutter"
    if r.wrap is not None:
        w = r.wrap
        text += ("; wrapped as the then-branch of If(true) (else-branch a renamed copy)"
                 if w.op == "if" else "; wrapped as the body of Loop(trip count 1)")
        text += f", initializers {w.initializers}"
    return text


def _spec_label(spec: AttentionSpec) -> str:
    parts = [f"heads={spec.num_heads}", f"head_dim={spec.head_dim}"]
    parts += [f"{f.name}={getattr(spec, f.name)}" for f in fields(spec)
              if f.name not in ("kind", "num_heads", "head_dim", "dtype")
              and getattr(spec, f.name) != f.default]
    return f"{spec.kind}({', '.join(parts)})"


def build_example(recipe: Recipe) -> Example:
    """Build the model a recipe describes, with its truth, inputs and reference outputs."""
    built = _build_lookalike(recipe) if recipe.lookalike else _build_stack(recipe)
    samples = [built.inputs]
    if built.dynamic:
        other, _ = built.sample(seed=recipe.seed + 1,
                                **{n: _OTHER_SIZES[n] for n in built.dynamic})
        samples.append(other)
    example = Example(recipe=replace(recipe, clutter=(), wrap=None), model=built.model,
                      blocks=tuple(built.blocks), block_graphs=("",) * len(built.blocks),
                      inputs=built.inputs, reference=built.reference, samples=tuple(samples))
    for item in recipe.clutter:
        example = add_clutter(example, item)
    if recipe.wrap is not None:
        example = wrap_example(example, recipe.wrap)
    return example


def _build_lookalike(recipe: Recipe) -> BuiltModel:
    build = {"classifier": classifier_model, "cnn": cnn_model,
             "softmax_between_weights": softmax_between_weights_model}[recipe.lookalike]
    return build(batch=recipe.batch, seed=recipe.seed, dynamic=recipe.dynamic)


# --- the stacked model ------------------------------------------------------------------------

def _build_stack(recipe: Recipe) -> BuiltModel:
    """Layers of attention (+ MLP) over ``hidden_states``; sizes symbolic where they can be."""
    if not recipe.layers:
        raise ValueError("a recipe without lookalike needs at least one layer")
    attempts = [(*_SIZE_NAMES, "past_len"), ("batch",), ()] if recipe.dynamic else [()]
    sizes = {"batch": recipe.batch, "q_len": recipe.q_len, "kv_len": recipe.kv_len}
    if any(spec.kv_cache for layer in recipe.layers for spec in layer.attention):
        sizes["past_len"] = PAST_LEN
    for i, symbolic in enumerate(attempts):
        try:
            b, blocks = _stack_graph(recipe, symbolic)
        except StaticShapeRequired:
            # A constant causal mask or a constant target with two unknowns pins the lengths.
            if i == len(attempts) - 1:
                raise
            continue
        if not _has_cross(recipe):
            sizes.pop("kv_len")
        return b.finish(blocks, sizes, recipe.seed)
    raise AssertionError("unreachable")


def _has_cross(recipe: Recipe) -> bool:
    return any(spec.kind == "cross" for layer in recipe.layers for spec in layer.attention)


def _stack_graph(r: Recipe, symbolic: Sequence[str]) -> tuple[GraphBuilder, list[BlockTruth]]:
    b = GraphBuilder("xattn_example", seed=r.seed)
    batch, q_len, kv_len = (n if n in symbolic else getattr(r, n) for n in _SIZE_NAMES)
    past_len = "past_len" if "past_len" in symbolic else PAST_LEN
    h = b.input("hidden_states", (batch, q_len, r.embed), r.dtype)
    blocks: list[BlockTruth] = []
    context = fixed = None
    if any(s.kind == "cross" and s.projection != "none" for layer in r.layers
           for s in layer.attention):
        context, fixed = _context(b, r, batch, kv_len, h, blocks)
    for i, layer in enumerate(r.layers):
        for j, spec in enumerate(layer.attention):
            role = "self_attn" if spec.kind == "self" else "cross_attn"
            prefix = f"layers.{i}.{role}" + (f"_{j}" if j else "")
            if spec.kind == "self":
                h = _attention_sublayer(b, r.norm, spec, h, None, prefix, blocks,
                                        past_len=past_len)
            elif spec.projection == "none":
                # Beside constant latents the key length is static: masks share one shape.
                length = r.kv_len if r.context in ("constant", "initializer") else kv_len
                key_shape, value_shape = kv_input_shapes(spec, batch, length)
                kv = (b.input(f"{prefix}.key", key_shape, r.dtype),
                      b.input(f"{prefix}.value", value_shape, r.dtype))
                h = _attention_sublayer(b, r.norm, spec, h, kv, prefix, blocks)
            else:
                h = _attention_sublayer(b, r.norm, spec, h, context, prefix, blocks, fixed)
        if layer.mlp:
            x = _layer_norm(b, h, f"layers.{i}.mlp.pre_norm") if r.norm == "pre" else h
            y = _mlp(b, x, layer.mlp, f"layers.{i}.mlp")
            h = _residual(b, h, y, f"layers.{i}.mlp", r.norm)
    out = _layer_norm(b, h, "final_norm", out="output")
    b.output(out, (batch, q_len, r.embed))
    return b, blocks


def _context(b: GraphBuilder, r: Recipe, batch, kv_len, h: str, blocks: list[BlockTruth]):
    """Cross-attention's context, and the (kv_source_kind, static_inputs) truth it implies."""
    width = r.context_embed or r.embed
    if r.context == "input":
        return b.input("encoder_hidden_states", (batch, kv_len, width), r.dtype), None
    if r.context == "constant":  # learned latents broadcast over the batch
        latents = b.random((1, r.kv_len, width), r.dtype, 1.0)
        name = b.initializer("latents", latents.astype(r.dtype))
        size = b.node("Shape", [h], "latents.batch", start=0, end=1)
        target = b.node("Concat", [size, b.const([1, 1])], "latents.target", axis=0)
        context = b.describe(b.node("Expand", [name, target], "latents.expand"),
                             (batch, r.kv_len, width), r.dtype)
        b.reference(lambda env: env.__setitem__(context, np.broadcast_to(
            latents, (env[h].shape[0], *latents.shape[1:]))))
        return context, None
    if r.context == "initializer":  # K/V projections read a [1,Sk,E] constant directly
        latents = b.random((1, r.kv_len, width), r.dtype, 1.0)
        context = b.describe(b.initializer("context", latents.astype(r.dtype)),
                             (1, r.kv_len, width), r.dtype)
        b.reference(lambda env: env.__setitem__(context, latents))
        return context, None
    x = b.input("encoder_input", (batch, kv_len, width), r.dtype)
    if r.context == "encoded":  # K/V still depend on that input alone: it is static
        return _dense(b, _layer_norm(b, x, "encoder.norm"), width, "encoder.proj"), \
            ("graph_input", (x,))
    encoder = r.encoder or AttentionSpec(kind="self", dtype=r.dtype)
    return _attention_sublayer(b, r.norm, encoder, x, None, "encoder.self_attn", blocks), \
        ("internal", (x,))


def _attention_sublayer(b: GraphBuilder, norm: str, spec: AttentionSpec, h: str, context,
                        prefix: str, blocks: list[BlockTruth], fixed=None,
                        past_len=PAST_LEN) -> str:
    x = _layer_norm(b, h, f"{prefix}.pre_norm") if norm == "pre" else h
    truth = add_attention(b, spec, x, context, prefix, past_len)
    if fixed is not None:
        truth = replace(truth, kv_source_kind=fixed[0], static_inputs=fixed[1])
    blocks.append(truth)
    return _residual(b, h, truth.result, prefix, norm)


def _residual(b: GraphBuilder, h: str, y: str, prefix: str, norm: str) -> str:
    total = b.describe(b.node("Add", [h, y], f"{prefix}.residual"), b.shapes[h], b.dtypes[h])
    _ref(b, total, np.add, h, y)
    return total if norm == "pre" else _layer_norm(b, total, f"{prefix}.norm")


def _ref(b: GraphBuilder, out: str, fn, *inputs: str) -> None:
    b.reference(lambda env: env.__setitem__(out, fn(*(env[name] for name in inputs))))


def _layer_norm(b: GraphBuilder, x: str, hint: str, out: str | None = None) -> str:
    dtype, width = b.dtypes[x], b.shapes[x][-1]
    gamma = 1.0 + b.random((width,), dtype, 0.1)
    beta = b.random((width,), dtype, 0.1)
    y = b.node("LayerNormalization", [x, b.initializer(f"{hint}.weight", gamma.astype(dtype)),
                                      b.initializer(f"{hint}.bias", beta.astype(dtype))],
               hint, outputs=[out] if out else 1, axis=-1, epsilon=1e-5)

    def norm(v: np.ndarray) -> np.ndarray:
        centered = v - v.mean(axis=-1, keepdims=True)
        return centered / np.sqrt((centered ** 2).mean(axis=-1, keepdims=True) + 1e-5) \
            * gamma + beta

    _ref(b, y, norm, x)
    return b.describe(y, b.shapes[x], dtype)


def _dense(b: GraphBuilder, x: str, width: int, hint: str) -> str:
    """``x @ W + bias`` on the last axis."""
    dtype, fan_in = b.dtypes[x], b.shapes[x][-1]
    weight = b.random((fan_in, width), dtype, fan_in ** -0.5)
    bias = b.random((width,), dtype, 0.1)
    y = b.node("MatMul", [x, b.initializer(f"{hint}.weight", weight.astype(dtype))], hint)
    y = b.node("Add", [y, b.initializer(f"{hint}.bias", bias.astype(dtype))], f"{hint}.add_bias")
    _ref(b, y, lambda v: v @ weight + bias, x)
    return b.describe(y, (*b.shapes[x][:-1], width), dtype)


_erf = np.vectorize(math.erf)


def _mlp(b: GraphBuilder, x: str, activation: str, prefix: str) -> str:
    """fc1 (to twice the width), Relu or erf-Gelu spelled as exporters do, fc2 (back)."""
    dtype, width = b.dtypes[x], b.shapes[x][-1]
    h = _dense(b, x, 2 * width, f"{prefix}.fc1")
    if activation == "relu":
        y = b.node("Relu", [h], f"{prefix}.act")
        _ref(b, y, lambda v: np.maximum(v, 0.0), h)
    elif activation == "gelu":  # x * 0.5 * (1 + erf(x / sqrt(2))), as torch's exporter spells it
        t = b.node("Div", [h, b.const(math.sqrt(2.0), dtype, f"{prefix}.sqrt2")], f"{prefix}.div")
        t = b.node("Erf", [t], f"{prefix}.erf")
        t = b.node("Add", [t, b.const(1.0, dtype, f"{prefix}.one")], f"{prefix}.add_one")
        t = b.node("Mul", [h, t], f"{prefix}.mul")
        y = b.node("Mul", [t, b.const(0.5, dtype, f"{prefix}.half")], f"{prefix}.act")
        _ref(b, y, lambda v: v * 0.5 * (1.0 + _erf(v / math.sqrt(2.0))), h)
    else:
        raise ValueError(f"mlp activation {activation!r} is not one of {MLP_ACTIVATIONS}")
    b.describe(y, b.shapes[h], dtype)
    return _dense(b, y, width, f"{prefix}.fc2")


# --- clutter and control flow on built examples ----------------------------------------------------

def add_clutter(example: Example, item: Clutter) -> Example:
    """``example`` with one more piece of clutter (before any control-flow wrapper)."""
    if example.recipe.wrap is not None:
        raise ValueError("clutter goes on the top-level graph: add it before the wrapper")
    hint = f"clutter{len(example.recipe.clutter)}"
    model, new, old = insert_clutter(example.model, item.kind, item.tensor, item.choice, hint)
    recipe = replace(example.recipe, clutter=(*example.recipe.clutter, item))
    return replace(example, recipe=recipe, model=model, aliases={**example.aliases, new: old})


_COND, _TRIP, _AXES = "xattn.wrap.cond", "xattn.wrap.trip", "xattn.wrap.axes"


def wrap_example(example: Example, wrap: Wrap) -> Example:
    """``example`` with its whole graph inside an ``If`` or ``Loop`` (see :class:`Wrap`)."""
    if example.recipe.wrap is not None:
        raise ValueError("the example is wrapped already")
    graph = example.model.graph
    inner = wrap.initializers == "inner"
    outputs = [value.name for value in graph.output]
    local = [out for node in graph.node for out in node.output if out]
    local += [t.name for t in graph.initializer] if inner else []
    suffix = ".body" if wrap.op == "loop" else ".then"
    first = {name: name + suffix for name in outputs}
    branches = [(first, "body" if wrap.op == "loop" else "then_branch", "")]
    if wrap.op == "if":
        branches.append(({n: n + ".else" for n in local}, "else_branch", ".else"))
    bodies = [_branch(graph, names, inner, node_suffix) for names, _, node_suffix in branches]
    model = _wrapped_model(example.model, wrap, bodies, inner)
    blocks, labels, aliases = [], [], {}
    for names, label, _ in branches:
        for truth in example.blocks:
            blocks.append(_renamed_truth(truth, names))
            labels.append(label)
        aliases.update({names.get(k, k): names.get(v, v) for k, v in example.aliases.items()})
    recipe = replace(example.recipe, wrap=wrap)
    return replace(example, recipe=recipe, model=model, blocks=tuple(blocks),
                   block_graphs=tuple(labels), aliases=aliases)


def _renamed_truth(truth: BlockTruth, names: dict[str, str]) -> BlockTruth:
    def rename(name: str) -> str:
        return names.get(name, name)

    return replace(truth, q_source=rename(truth.q_source), k_source=rename(truth.k_source),
                   v_source=rename(truth.v_source), output=rename(truth.output),
                   result=rename(truth.result),
                   static_inputs=tuple(map(rename, truth.static_inputs)),
                   mask_inputs=tuple(map(rename, truth.mask_inputs)))


def _branch(graph: onnx.GraphProto, names: dict[str, str], inner: bool,
            suffix: str) -> onnx.GraphProto:
    """A copy of ``graph``'s nodes (and initializers if ``inner``): tensors renamed by
    ``names``, node names given ``suffix``."""
    body = onnx.GraphProto(name=graph.name + suffix)
    for node in graph.node:
        copy = body.node.add()
        copy.CopyFrom(node)
        copy.input[:] = [names.get(n, n) for n in node.input]
        copy.output[:] = [names.get(n, n) for n in node.output]
        copy.name = node.name + suffix
    if inner:
        for tensor in graph.initializer:
            body.initializer.add().CopyFrom(tensor)
            body.initializer[-1].name = names.get(tensor.name, tensor.name)
    for value in graph.output:
        out = body.output.add()
        out.CopyFrom(value)
        out.name = names.get(value.name, value.name)
    return body


def _wrapped_model(model: onnx.ModelProto, wrap: Wrap, bodies: list[onnx.GraphProto],
                   inner: bool) -> onnx.ModelProto:
    graph = model.graph
    outputs = [value.name for value in graph.output]
    consts = [numpy_helper.from_array(np.array(True), _COND)]
    if wrap.op == "if":
        nodes = [helper.make_node("If", [_COND], outputs, name="xattn.wrap",
                                  then_branch=bodies[0], else_branch=bodies[1])]
    else:  # Loop: outputs come out stacked over the single iteration; Squeeze takes them out
        body = bodies[0]
        body.input.extend([helper.make_tensor_value_info("xattn.wrap.iter", onnx.TensorProto.INT64, []),
                           helper.make_tensor_value_info("xattn.wrap.cond_in", onnx.TensorProto.BOOL, [])])
        body.node.insert(0, helper.make_node("Identity", ["xattn.wrap.cond_in"],
                                             ["xattn.wrap.cond_out"], name="xattn.wrap.cond"))
        body.output.insert(0, helper.make_tensor_value_info("xattn.wrap.cond_out",
                                                            onnx.TensorProto.BOOL, []))
        stacked = [f"{name}.stacked" for name in outputs]
        nodes = [helper.make_node("Loop", [_TRIP, _COND], stacked, name="xattn.wrap", body=body)]
        nodes += [helper.make_node("Squeeze", [s, _AXES], [o], name=f"xattn.wrap.unstack.{o}")
                  for s, o in zip(stacked, outputs, strict=True)]
        consts += [numpy_helper.from_array(np.array(1, np.int64), _TRIP),
                   numpy_helper.from_array(np.array([0], np.int64), _AXES)]
    initializers = consts + ([] if inner else list(graph.initializer))
    new_graph = helper.make_graph(nodes, graph.name, list(graph.input), list(graph.output),
                                  initializers)
    out = helper.make_model(new_graph, opset_imports=list(model.opset_import),
                            producer_name=model.producer_name)
    out.ir_version = model.ir_version
    return out


# --- strategies ---------------------------------------------------------------------------------

#: Values drawn per AttentionSpec field, simplest first (hypothesis shrinks towards the start).
SPEC_CHOICES: dict[str, tuple] = {
    "kind": KINDS, "num_heads": (2, 1, 3, 4), "head_dim": (4, 8, 2, 1, 6),
    "projection": PROJECTIONS, "head_layout": HEAD_LAYOUTS, "k_transpose": K_TRANSPOSES,
    "scale": SCALES, "mask": MASKS, "softmax_cast": (False, True), "shape_style": SHAPE_STYLES,
    "dtype": DTYPES, "out_projection": (True, False), "core": CORES, "merge": MERGES,
    "rope": ROPES, "rope_table": ROPE_TABLES, "kv_cache": (False, True), "kv_groups": (1, 2),
    "softmax_axis": SOFTMAX_AXES,
}


@st.composite
def attention_specs(draw, *, embed: int | None = None, **fixed: Any) -> AttentionSpec:
    """One attention spelling; ``fixed`` pins fields (``kind="self"``, ``dtype="float16"``).

    Each field is drawn from the values that :func:`~xattn_compiler.testing.spec_conflicts`
    accepts together with those drawn before it, so every combination the builders allow can
    come out and none they reject. With ``embed``, ``out_projection=False`` is only drawn when
    the block's width ``num_heads*head_dim`` equals it (its output feeds a residual).
    """
    unknown = set(fixed) - set(SPEC_CHOICES)
    if unknown:
        raise ValueError(f"unknown AttentionSpec field(s) {sorted(unknown)}")
    options = dict(fixed)
    for name, values in SPEC_CHOICES.items():
        if name in options:
            continue
        allowed = [v for v in values if not spec_conflicts(**options, **{name: v})]
        if name == "out_projection" and embed is not None \
                and options["num_heads"] * options["head_dim"] != embed:
            allowed = [True]
        options[name] = draw(st.sampled_from(allowed))
    return AttentionSpec(**options)


@st.composite
def _layer(draw, *, embed: int, dtype: str, kinds: Sequence[str], mlp: bool) -> Layer:
    structures = [s for s in (("self",), ("cross",), ("self", "cross")) if set(s) <= set(kinds)]
    structure = draw(st.sampled_from(structures))
    specs = tuple(draw(attention_specs(kind=kind, dtype=dtype, embed=embed))
                  for kind in structure)
    activation = draw(st.sampled_from((None, *MLP_ACTIVATIONS))) if mlp else None
    return Layer(specs, activation)


@st.composite
def recipes(draw, *, dtype: str | None = None, max_layers: int = 3,
            kinds: Sequence[str] = KINDS, mlp: bool = True,
            dynamic: bool | None = None) -> Recipe:
    """A :class:`Recipe` of 1..``max_layers`` layers (no clutter, no wrapper).

    ``kinds`` limits the blocks to self- or cross-attention; ``dtype`` and ``dynamic`` pin the
    precision and whether sizes are symbolic.
    """
    dtype = dtype or draw(st.sampled_from(DTYPES))
    embed = draw(st.sampled_from((8, 4, 6, 12, 16)))
    layers = draw(st.lists(_layer(embed=embed, dtype=dtype, kinds=kinds, mlp=mlp),
                           min_size=1, max_size=max_layers))
    layers = _one_bias_shape(layers)
    recipe = Recipe(
        layers=tuple(layers), embed=embed, dtype=dtype,
        norm=draw(st.sampled_from(("post", "pre"))),
        dynamic=draw(st.booleans()) if dynamic is None else dynamic,
        batch=draw(st.integers(1, 3)), q_len=draw(st.integers(1, 6)),
        kv_len=draw(st.integers(1, 8)), seed=draw(st.integers(0, 2 ** 16)))
    if any(s.kind == "cross" and s.projection != "none" for layer in layers
           for s in layer.attention):
        context = draw(st.sampled_from(CONTEXT_KINDS))
        width = draw(st.sampled_from((None, 8, 12)))
        encoder = None
        if context == "internal":
            # The encoder reads its own sequence: no position ids or cache of the decoder's.
            encoder = draw(attention_specs(kind="self", dtype=dtype, mask="none", rope="none",
                                           kv_cache=False, embed=width or embed))
        if context == "initializer":  # a batch-1 context broadcasts only over [B,H,S,D] heads
            recipe = replace(recipe, layers=tuple(
                replace(layer, attention=tuple(
                    replace(s, head_layout="4d") if s.kind == "cross" and s.projection != "none"
                    else s for s in layer.attention)) for layer in recipe.layers))
        recipe = replace(recipe, context=context, context_embed=width, encoder=encoder)
    return recipe


def _one_bias_shape(layers: list[Layer]) -> list[Layer]:
    """Position-bias inputs are shared by name per kind, so their head counts must agree:
    a later block with another head count gets an additive mask instead."""
    heads: dict[tuple, int] = {}
    out = []
    for layer in layers:
        specs = []
        for spec in layer.attention:
            if spec.mask == "add_bias_input":
                key = (spec.kind, spec.kv_cache)
                if heads.setdefault(key, spec.num_heads) != spec.num_heads:
                    spec = replace(spec, mask="add_input")
            specs.append(spec)
        out.append(replace(layer, attention=tuple(specs)))
    return out


def attention_models(**options: Any) -> st.SearchStrategy[Example]:
    """Built :class:`Example` models of attention stacks; ``options`` go to :func:`recipes`."""
    return recipes(**options).map(build_example)


@st.composite
def lookalike_models(draw) -> Example:
    """Models without attention (a classifier head, Softmax between weights, a CNN)."""
    recipe = Recipe(lookalike=draw(st.sampled_from(LOOKALIKES)), batch=draw(st.integers(1, 3)),
                    dynamic=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 16)))
    return build_example(recipe)


@st.composite
def cluttered(draw, example: Example, max_items: int = 4) -> Example:
    """``example`` with 1..``max_items`` pieces of clutter on random tensors.

    Each piece picks a region first (outside blocks, operand chains, score chain, probability
    chain, shape arithmetic), so the rarer inside-block regions are drawn as often as the rest,
    then a tensor there and a kind that applies to its type within the region's budget.
    """
    for _ in range(draw(st.integers(1, max_items))):
        sites = [site for site in clutter_sites(example.model, example.blocks) if site.kinds()]
        regions = sorted({site.region for site in sites}, key=_REGION_ORDER.index)
        region = draw(st.sampled_from(regions))
        site = draw(st.sampled_from([s for s in sites if s.region == region]))
        kind = draw(st.sampled_from(site.kinds()))
        choice = draw(st.sampled_from(CLUTTER[kind].choices(site.shape, site.dtype)))
        example = add_clutter(example, Clutter(kind, site.tensor, choice, region))
    return example


_REGION_ORDER = ["outside", "operand", "score", "probs", "shape"]


@st.composite
def control_flow(draw, example: Example) -> Example:
    """``example`` wrapped in an ``If`` (constant true) or a ``Loop`` (trip count 1)."""
    op = draw(st.sampled_from(("if", "loop")))
    initializers = draw(st.sampled_from(("outer", "inner")))
    return wrap_example(example, Wrap(op, initializers))


def examples(*, attention: bool = True, lookalikes: bool = True, clutter: bool = True,
             wrap: bool = True, **options: Any) -> st.SearchStrategy[Example]:
    """Every kind of example: clean, cluttered, wrapped, both, over attention stacks and
    look-alikes (``attention``/``lookalikes``/``clutter``/``wrap`` switch them off).

    Clean attention models come first, so failures shrink towards them. ``options`` go to
    :func:`recipes`.
    """
    bases = ([attention_models(**options)] if attention else []) + (
        [lookalike_models()] if lookalikes else [])
    if not bases:
        raise ValueError("examples() needs attention models or look-alikes")
    base = st.one_of(bases)
    mixed = [base]
    if clutter:
        mixed.append(base.flatmap(cluttered))
    if wrap:
        mixed.append(base.flatmap(control_flow))
    if clutter and wrap:
        mixed.append(base.flatmap(cluttered).flatmap(control_flow))
    return st.one_of(mixed)


# --- a stateful machine ---------------------------------------------------------------------------

def op_params(op: str, shape: tuple[int, ...], dtype: str) -> st.SearchStrategy[dict]:
    """Parameters of :data:`~xattn_compiler.testing.clutter.OPS` entry ``op`` valid for an input
    of static ``shape`` (the op's constraint must hold)."""
    rank = len(shape)
    if op == "Transpose":
        return st.one_of(st.just({}), st.permutations(range(rank)).map(
            lambda p: {"perm": tuple(p)}))
    if op == "Reshape":
        return _reshape_targets(shape).map(lambda t: {"target": t})
    if op == "Unsqueeze":
        return st.integers(0, rank).map(lambda a: {"axes": (a,)})
    if op == "Squeeze":
        return st.sampled_from([i for i, d in enumerate(shape) if d == 1]).map(
            lambda a: {"axes": (a,)})
    if op == "Cast":
        return st.sampled_from(("float32", "float16")).map(lambda t: {"to": t})
    if op == "Softmax":
        return st.integers(-rank, rank - 1).map(lambda a: {"axis": a})
    return st.just({})


@st.composite
def _reshape_targets(draw, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A target for ``shape``: a random factorization of its size, with a -1 and 0s maybe."""
    rest, dims = math.prod(shape), []
    for _ in range(draw(st.integers(0, 3))):
        dims.append(draw(st.sampled_from([d for d in range(1, rest + 1) if rest % d == 0])))
        rest //= dims[-1]
    dims.append(rest)
    if draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    # 0 copies the input's dim at the same position; use it where that is the same size.
    return tuple(0 if i < len(shape) and d == shape[i] and draw(st.booleans()) else d
                 for i, d in enumerate(dims))


class GraphMachine(RuleBasedStateMachine):
    """Grows a static-shape graph from a bundle of values, one rule at a time.

    Rules: apply an op of the table (shape function and numpy semantics from it), insert
    clutter, add a residual, a dense layer, or an attention block (self or cross) from
    the builders. At the end every value is a graph output and :meth:`teardown` checks:
    the model is valid; ONNX shape inference and ONNX Runtime agree with the shape
    functions; ORT's values match numpy; clutter outputs equal their inputs exactly; the
    matcher finds exactly the planted blocks. Subclasses add checks in :meth:`check`.
    """

    values = Bundle("values")

    def __init__(self):
        super().__init__()
        self.b = GraphBuilder("graph_machine", seed=0)
        self.shapes: dict[str, tuple[int, ...]] = {}  # by the op table's shape functions
        self.equal: list[tuple[str, str]] = []  # (clutter output, its input)
        self.blocks: list[BlockTruth] = []
        self.half: set[str] = set()  # values computed in float16 somewhere upstream

    def _value(self, name: str, shape: Sequence[int], dtype: str, *sources: str) -> str:
        self.shapes[name] = tuple(shape)
        if dtype == "float16" or self.half.intersection(sources):
            self.half.add(name)  # compared with float16 tolerances, whatever its final dtype
        return self.b.describe(name, shape, dtype)

    @initialize(target=values, batch=st.integers(1, 3), seq=st.integers(1, 5),
                width=st.sampled_from((8, 4)), dtype=st.sampled_from(("float32", "float16")))
    def first_input(self, batch, seq, width, dtype):
        return self.add_input(batch, seq, width, dtype)

    @rule(target=values, batch=st.integers(1, 3), seq=st.integers(1, 5),
          width=st.sampled_from((8, 4)), dtype=st.sampled_from(("float32", "float16")))
    def add_input(self, batch, seq, width, dtype):
        name = self.b.input(f"x{len(self.b.inputs)}", (batch, seq, width), dtype)
        return self._value(name, (batch, seq, width), dtype)

    @rule(target=values, x=values, data=st.data())
    def apply_op(self, x, data):
        shape, dtype = self.shapes[x], self.b.dtypes[x]
        ops = [op for op, spec in OPS.items() if spec.accepts(shape, dtype)
               and (len(shape) < 6 or op not in ("Unsqueeze", "Reshape"))]
        op = data.draw(st.sampled_from(ops), label="op")
        params = data.draw(op_params(op, shape, dtype), label="params")
        spec = OPS[op]
        y = spec.emit(self.b, x, params, op.lower())
        _ref(self.b, y, lambda v, p=params, f=spec.numpy: f(v, p), x)
        return self._value(y, spec.shape(shape, params), params.get("to", dtype), x)

    @rule(target=values, x=values, data=st.data())
    def add_clutter(self, x, data):
        shape, dtype = self.shapes[x], self.b.dtypes[x]
        kinds = [k for k, kind in CLUTTER.items() if kind.applies(shape, dtype)]
        kind = CLUTTER[data.draw(st.sampled_from(kinds), label="clutter")]
        choice = data.draw(st.sampled_from(kind.choices(shape, dtype)), label="choice")
        y = emit_chain(self.b, x, kind.steps(shape, dtype, choice), "clutter")
        _ref(self.b, y, lambda v: v, x)
        self.equal.append((y, x))
        return self._value(y, shape, dtype, x)

    @precondition(lambda self: len(self.shapes) >= 2)
    @rule(target=values, x=values, y=values)
    def residual(self, x, y):
        if self.shapes[x] != self.shapes[y] or self.b.dtypes[x] != self.b.dtypes[y]:
            return multiple()  # no Add between unequal shapes
        z = self.b.node("Add", [x, y], self.b.unique("add"))
        _ref(self.b, z, np.add, x, y)
        return self._value(z, self.shapes[x], self.b.dtypes[x], x, y)

    @rule(target=values, x=values, width=st.sampled_from((8, 4)))
    def dense(self, x, width):
        if len(self.shapes[x]) < 2:
            return multiple()
        y = _dense(self.b, x, width, self.b.unique("dense"))
        return self._value(y, (*self.shapes[x][:-1], width), self.b.dtypes[x], x)

    @rule(target=values, x=values, context=values, data=st.data())
    def attention(self, x, context, data):
        shape, dtype = self.shapes[x], self.b.dtypes[x]
        if len(shape) != 3:
            return multiple()
        c_shape = self.shapes[context]
        cross = (context != x and len(c_shape) == 3 and c_shape[0] == shape[0]
                 and self.b.dtypes[context] == dtype and data.draw(st.booleans()))
        # Mask and position inputs are shared by name, so blocks here take none or constant
        # ones; the matcher is checked on the graph as built (no Einsum normalisation), and
        # every output must be one of this machine's values (no present K/V).
        spec = data.draw(attention_specs(kind="cross" if cross else "self", dtype=dtype,
                                         embed=shape[2]).filter(
            lambda s: s.projection != "none" and s.mask in ("none", "add_causal_const",
                                                             "add_rel_bias")
            and s.core == "matmul" and not s.kv_cache
            and (s.rope == "none" or s.rope_table == "constant")), label="spec")
        truth = add_attention(self.b, spec, x, context if cross else None,
                              self.b.unique("attn"))
        self.blocks.append(truth)
        return self._value(truth.result, self.b.shapes[truth.result], dtype, x, context)

    def teardown(self):
        names = [n for n in self.shapes if n not in self.b.input_kinds]
        if not names:
            return
        for name in names:
            self.b.output(name, self.shapes[name], self.b.dtypes[name])
        self.check(self.b.make_model())

    def check(self, model: onnx.ModelProto) -> None:
        """Validity, shape functions, values, clutter and the matcher on the grown model."""
        from xattn_compiler.attention import find_attention
        from xattn_compiler.ir import infer_shapes
        from xattn_compiler.verification import default_tolerances, run_model

        from .assertions import assert_valid

        assert_valid(model)
        inferred = tensor_types(infer_shapes(model))
        inputs = self.b.sample_inputs({}, seed=0)
        got, want = run_model(model, inputs), self.b.evaluate(inputs)
        for name, value in got.items():
            assert value.shape == self.shapes[name], (name, value.shape, self.shapes[name])
            assert inferred[name][0] == self.shapes[name], (name, inferred[name])
            rtol, atol = default_tolerances("float16" if name in self.half else value.dtype)
            np.testing.assert_allclose(value.astype(np.float64), want[name], rtol=rtol,
                                       atol=atol * max(1.0, np.abs(want[name]).max(initial=0)),
                                       err_msg=name)
        for y, x in self.equal:
            source = got[x] if x in got else inputs[x]
            assert np.array_equal(got[y], source), f"clutter {y} changed the value of {x}"
        found = {b.output.name: b for b in find_attention(model)}
        assert sorted(found) == sorted(t.output for t in self.blocks), sorted(found)
        for truth in self.blocks:
            block = found[truth.output]
            assert (block.kind, block.num_heads, block.head_dim) == (
                truth.kind, truth.num_heads, truth.head_dim), truth.name
