"""Small, valid ONNX graphs with attention blocks spelled the ways exporters spell them.

One attention block can be written in dozens of ways: the scale before or after the score
MatMul (or folded into the weights), heads split into 4-D ``[B,H,S,D]`` or batched 3-D
``[B*H,S,D]``, K transposed on its own or inside the head split, fused QKV projections cut by
Split, Slice or Gather, masks added or selected with ``Where``, reshape targets as constants or
computed from ``Shape`` at run time. :class:`AttentionSpec` names one spelling;
:func:`add_attention` emits it into a :class:`GraphBuilder` and returns a :class:`BlockTruth`
(what a matcher should report); :func:`attention_model` wraps blocks into a runnable model
whose reference outputs come from a plain numpy implementation of the math, never from
running the graph.

Shape legend used in names and comments: ``B`` batch, ``Sq``/``Sk`` query and key lengths,
``E`` embedding, ``H`` heads, ``D`` head dim, ``inner = H*D``. Operand layouts: ``BSE``
(projected, ``[B,S,inner]``), ``BSHD``, ``BHSD`` (heads), ``BHDS`` (K transposed), and the
batched-heads forms ``HSD`` = ``[B*H,S,D]`` and ``HDS`` = ``[B*H,D,S]``.

Look-alikes for no-match tests: :func:`classifier_model`, :func:`softmax_between_weights_model`
and :func:`cnn_model` (no attention anywhere).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = [
    "CONTEXT_KINDS", "DTYPES", "HEAD_LAYOUTS", "KINDS", "K_TRANSPOSES", "MASKS", "PROJECTIONS",
    "SCALES", "SHAPE_STYLES", "AttentionSpec", "BlockTruth", "BuiltModel", "GraphBuilder",
    "StaticShapeRequired", "add_attention", "attention_model", "classifier_model", "cnn_model",
    "kv_input_shapes", "softmax_between_weights_model", "spec_conflicts",
    "CORES", "MERGES", "ROPES", "ROPE_TABLES", "SOFTMAX_AXES",
]

KINDS = ("self", "cross")
PROJECTIONS = ("matmul_bias", "matmul", "gemm", "einsum", "fused_split", "fused_slice",
               "fused_gather", "none", "fused_per_head")
HEAD_LAYOUTS = ("4d", "3d", "time_major")
K_TRANSPOSES = ("separate", "fused", "pre_split")
SCALES = ("div_after", "mul_after", "mul_q", "sdpa_qk", "none", "folded", "mul_q_heads")
MASKS = ("none", "add_input", "add_causal_const", "add_bias_input", "where_bool",
         "where_bool_inv", "add_rel_bias")
SHAPE_STYLES = ("const", "computed")
DTYPES = ("float32", "float16")
CORES = ("matmul", "einsum")
MERGES = ("reshape", "einsum")
ROPES = ("none", "rotate_half", "interleaved")
ROPE_TABLES = ("position_ids", "constant")
SOFTMAX_AXES = ("last", "positive")
#: Where cross-attention K/V come from in :func:`attention_model`.
CONTEXT_KINDS = ("input", "constant", "encoded", "internal", "initializer")

_CHOICES = {"kind": KINDS, "projection": PROJECTIONS, "head_layout": HEAD_LAYOUTS,
            "k_transpose": K_TRANSPOSES, "scale": SCALES, "mask": MASKS,
            "shape_style": SHAPE_STYLES, "dtype": DTYPES, "core": CORES, "merge": MERGES,
            "rope": ROPES, "rope_table": ROPE_TABLES, "softmax_axis": SOFTMAX_AXES}
#: The RoPE tables' rows: the largest position id plus one.
ROPE_POSITIONS = 64
#: The past length of a KV cache in the sample inputs (when not symbolic).
PAST_LEN = 3
#: Ops whose output depends on an input's shape only (as in the binding-time analysis).
_SHAPE_ONLY = frozenset({"Shape", "Size"})
_MIN_OPSET = 17  # LayerNormalization


class StaticShapeRequired(ValueError):
    """The spelling asked for needs a size that the model declares dynamic.

    Raised for ``shape_style="const"`` targets with two unknown dims (Reshape allows one ``-1``)
    and for constant causal masks; :func:`attention_model` catches it and pins the lengths.
    """


# --- options ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionSpec:
    """One spelling of an attention block. Invalid combinations raise ``ValueError``.

    - ``kind``: ``"self"`` (Q, K, V from one tensor) or ``"cross"`` (K, V from a context).
    - ``projection``: ``matmul_bias`` (MatMul + Add), ``matmul`` (no bias), ``gemm`` (Reshape to
      2-D, Gemm ``transB=1``, Reshape back), ``einsum`` (``bse,ef->bsf`` + Add), ``fused_split`` /
      ``fused_slice`` (one MatMul to 3*inner for self, or Q separate and one to 2*inner for cross,
      cut by Split / Slice), ``fused_gather`` (that MatMul reshaped to ``[B,S,n,H,D]``, transposed
      to ``[n,B,H,S,D]`` and cut by Gather), ``none`` (cross only: K/V are graph inputs already in
      head layout, see :func:`kv_input_shapes`), ``fused_per_head`` (the fused MatMul reshaped
      to ``[B,S,H,n*D]`` and Split per head on the last axis, GPT-NeoX/Bloom).
    - ``head_layout``: ``4d`` (Reshape ``[B,S,H,D]`` + Transpose to ``[B,H,S,D]``) or ``3d`` (then
      Reshape to ``[B*H,S,D]``) or ``time_major`` (``nn.MultiheadAttention``: Transpose to
      ``[S,B,E]``, Reshape to ``[S,B*H,D]``, Transpose to ``[B*H,S,D]``); the merge mirrors it.
    - ``k_transpose``: ``separate`` (K to ``[B,H,S,D]``, then Transpose ``[0,1,3,2]``; 3-D
      ``[0,2,1]``), ``fused`` (one Transpose ``[0,2,3,1]`` from ``[B,S,H,D]``), ``pre_split``
      (the projected ``[B,S,inner]`` K is transposed ``[0,2,1]`` and then split into
      ``[B,H,D,S]``, so K^T comes straight out of the head split).
    - ``scale``: ``div_after`` / ``mul_after`` (the scores by sqrt(D) / D^-0.5), ``mul_q`` (Q by
      D^-0.5 before the head split, BART/Whisper), ``mul_q_heads`` (Q by D^-0.5 after the head
      split), ``sdpa_qk`` (Q and K^T each by D^-0.25, the
      SDPA decomposition), ``none`` (T5: no scaling at all), ``folded`` (D^-0.5 folded into the
      Q weights and bias).
    - ``mask``: ``none``, ``add_input`` (float ``[B,1,Sq,Sk]`` input added), ``add_causal_const``
      (constant ``[Sq,Sk]`` with -inf above the diagonal; static lengths), ``add_bias_input``
      (``[1,H,Sq,Sk]`` position-bias input added), ``where_bool`` (``Where(keep[B,1,1,Sk],
      scores, dtype-min)``), ``where_bool_inv`` (``Where(masked[B,1,1,Sk], dtype-min,
      scores)``, the other polarity), ``add_rel_bias`` (T5/ALiBi-like relative-position bias
      computed in the graph: a ``[2M+1,H]`` table gathered by ``clip(j - i)`` from ``Range``).
    - ``softmax_cast``: Cast the scores to float32 before Softmax and back after.
    - ``shape_style``: ``const`` reshape targets (``[0,0,H,D]``, a ``-1``) or ``computed`` ones
      (Shape -> Gather/Slice -> Unsqueeze -> Concat), as exporters emit for dynamic dims.
    - ``out_projection``: MatMul (+ bias) after the head merge.
    - ``core``: ``matmul`` (MatMul on K^T) or ``einsum`` (``bhid,bhjd->bhij`` on K itself and
      ``bhij,bhjd->bhid``; ``bid,bjd->bij`` / ``bij,bjd->bid`` on batched heads).
    - ``merge``: ``reshape`` (Transpose + Reshape, then the out projection) or ``einsum`` (the
      head merge and out projection in one ``bhsd,hde->bse``, no merged tensor).
    - ``rope`` (self only): ``rotate_half`` (Slice/Neg/Concat, Llama) or ``interleaved``
      (every-two Slices with step 2, Neg, Unsqueeze/Concat/Reshape, GPT-J) on Q and K heads;
      ``rope_table``: cos/sin Gathered by a ``position_ids[B,Sq]`` input or Sliced from constant
      tables by the length.
    - ``kv_cache`` (self only): ``past_key``/``past_value`` inputs ``[B,Hkv,P,D]`` Concat'ed
      with the new K/V; the Concats are graph outputs (present K/V) and the core reads them.
    - ``kv_groups``: query heads per K/V head (GQA; ``repeat_kv`` by Unsqueeze, Expand,
      Reshape after the cache).
    - ``softmax_axis``: ``last`` (-1) or ``positive`` (3 on 4-D scores, 2 on 3-D).
    """

    kind: str = "cross"
    num_heads: int = 2
    head_dim: int = 8
    projection: str = "matmul_bias"
    head_layout: str = "4d"
    k_transpose: str = "separate"
    scale: str = "div_after"
    mask: str = "none"
    softmax_cast: bool = False
    shape_style: str = "const"
    dtype: str = "float32"
    out_projection: bool = True
    core: str = "matmul"
    merge: str = "reshape"
    rope: str = "none"
    rope_table: str = "position_ids"
    kv_cache: bool = False
    kv_groups: int = 1
    softmax_axis: str = "last"

    def __post_init__(self):
        problems = _conflicts(self)
        if problems:
            raise ValueError("invalid AttentionSpec: " + "; ".join(problems))

    @property
    def inner(self) -> int:
        """``num_heads * head_dim``: the width of the projected Q, K and V."""
        return self.num_heads * self.head_dim

    @property
    def kv_heads(self) -> int:
        """Heads of K and V before ``repeat_kv`` (``num_heads / kv_groups``)."""
        return max(self.num_heads // self.kv_groups, 1)

    @property
    def batched(self) -> bool:
        """The core runs on 3-D ``[B*H,S,D]`` heads (``3d`` and ``time_major``)."""
        return self.head_layout != "4d"

    @property
    def label(self) -> str:
        """A short id for test names, listing the options that differ from the defaults."""
        parts = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
                 if getattr(self, f.name) != f.default]
        return ",".join(parts) or "default"


def spec_conflicts(**options) -> list[str]:
    """Why these :class:`AttentionSpec` options cannot go together (empty when they can).

    Takes the same keywords as :class:`AttentionSpec`, so a property-test strategy can filter
    drawn options without catching exceptions.
    """
    unknown = sorted(set(options) - {f.name for f in fields(AttentionSpec)})
    if unknown:
        return [f"unknown option(s) {unknown}"]
    defaults = {f.name: f.default for f in fields(AttentionSpec)}
    return _conflicts(SimpleNamespace(**{**defaults, **options}))


def _conflicts(spec) -> list[str]:
    problems = [f"{name}={getattr(spec, name)!r} is not one of {allowed}"
                for name, allowed in _CHOICES.items() if getattr(spec, name) not in allowed]
    for name in ("num_heads", "head_dim", "kv_groups"):
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{name}={value!r} must be a positive int")
    if spec.projection == "none" and spec.kind == "self":
        problems.append("projection='none' reads K/V from graph inputs already in head layout, "
                        "which needs kind='cross' (got kind='self')")
    if spec.projection == "fused_gather" and spec.k_transpose != "separate":
        problems.append("projection='fused_gather' already yields K as [B,H,S,D], so it needs "
                        f"k_transpose='separate' (got k_transpose={spec.k_transpose!r})")
    problems += _new_spelling_conflicts(spec)
    return problems


def _new_spelling_conflicts(spec) -> list[str]:
    """Conflicts of the spellings drawn since issue 17 (each says what it needs)."""
    problems = []
    needs_separate = [name for name, on in (
        ("core='einsum'", spec.core == "einsum"), ("rope", spec.rope != "none"),
        ("kv_cache", spec.kv_cache), ("kv_groups>1", spec.kv_groups != 1),
        ("head_layout='time_major'", spec.head_layout == "time_major")) if on]
    if needs_separate and spec.k_transpose != "separate":
        problems.append(f"{needs_separate[0]} reads K as [B,H,S,D], so it needs "
                        f"k_transpose='separate' (got {spec.k_transpose!r})")
    if spec.merge == "einsum" and (spec.head_layout != "4d" or not spec.out_projection):
        problems.append("merge='einsum' contracts [B,H,S,D] heads with the out projection, so "
                        "it needs head_layout='4d' and out_projection=True")
    if (spec.rope != "none" or spec.kv_cache) and spec.kind != "self":
        problems.append("rope and kv_cache are self-attention spellings (kind='self')")
    if spec.rope != "none" and isinstance(spec.head_dim, int) and spec.head_dim % 2:
        problems.append(f"rope rotates pairs, so head_dim must be even (got {spec.head_dim})")
    if spec.rope != "none" and spec.kv_cache and spec.rope_table == "constant":
        problems.append("rope with a kv_cache needs position ids (a constant table slice "
                        "starts at 0)")
    if spec.head_layout == "time_major" and (
            spec.projection in ("none", "fused_gather", "fused_per_head")
            or spec.rope != "none" or spec.kv_cache or spec.kv_groups != 1):
        problems.append("head_layout='time_major' splits a projected [B,S,E] operand itself: "
                        "no head-layout projection, rope, kv_cache or kv_groups")
    if spec.kv_cache and spec.head_layout != "4d":
        problems.append("kv_cache concatenates [B,H,S,D] heads, so it needs head_layout='4d'")
    if spec.kv_groups != 1 and (spec.projection not in _LINEAR_STYLES or (
            isinstance(spec.num_heads, int) and isinstance(spec.kv_groups, int)
            and spec.num_heads % spec.kv_groups)):
        problems.append("kv_groups needs separate K/V projections and heads divisible by it")
    if spec.projection == "fused_per_head" and spec.k_transpose == "pre_split":
        problems.append("projection='fused_per_head' yields K as [B,S,H,D], so it cannot take "
                        "k_transpose='pre_split'")
    return problems


# --- ground truth and built models -------------------------------------------------------------

@dataclass(frozen=True)
class BlockTruth:
    """What a matcher should report for one emitted block.

    ``scale`` is the softmax scale the graph itself applies (exactly 1/sqrt(D), 1.0 for ``none``
    and ``folded``; the stored constants are rounded to the dtype). Sources are the tensors the
    block's projections read (for ``projection="none"`` the K/V graph inputs; with RoPE, Q's
    and K's are the rotated heads, and a scale applied before the rotation counts as part of
    them). ``static_inputs`` are graph inputs that feed nothing but cross-attention K/V;
    ``kv_source_kind`` is ``graph_input``, ``constant`` or ``internal`` (self-attention, or K/V
    computed through another attention block). ``output`` is the merged-heads tensor before
    the out projection (``[Sq,B,inner]`` for time-major heads, the ``[B,H,Sq,D]`` context for
    an Einsum merge), ``result`` the tensor after it (the same when there is none).
    """

    name: str
    kind: str
    num_heads: int
    head_dim: int
    scale: float
    q_source: str
    k_source: str
    v_source: str
    static_inputs: tuple[str, ...]
    kv_source_kind: str
    output: str
    result: str
    mask_inputs: tuple[str, ...]
    spec: AttentionSpec


@dataclass
class BuiltModel:
    """A checker-valid model, its blocks' ground truth, sample inputs and reference outputs.

    ``reference`` comes from numpy (float64) applied to the same weights, not from the graph.
    ``sizes`` are the sample sizes and ``dynamic`` the ones the model declares symbolic;
    :meth:`sample` draws inputs (and their reference) at other sizes.
    """

    model: onnx.ModelProto
    blocks: list[BlockTruth]
    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    sizes: dict[str, int] = field(default_factory=dict)
    dynamic: tuple[str, ...] = ()
    builder: GraphBuilder | None = field(default=None, repr=False)

    def sample(self, seed: int = 1, **sizes: int) -> tuple[dict[str, np.ndarray],
                                                            dict[str, np.ndarray]]:
        """Fresh inputs at ``sizes`` (e.g. ``batch=3, q_len=4``) and their reference outputs."""
        merged = {**self.sizes, **sizes}
        for name, value in sizes.items():
            if name not in self.sizes:
                raise ValueError(f"unknown size {name!r}; this model has {sorted(self.sizes)}")
            if name not in self.dynamic and value != self.sizes[name]:
                raise ValueError(f"{name} is static ({self.sizes[name]}) in this model; "
                                 f"dynamic sizes: {list(self.dynamic)}")
        inputs = self.builder.sample_inputs(merged, seed)
        env = self.builder.evaluate(inputs)
        return inputs, {name: env[name] for name in self.builder.output_names}

    def evaluate(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every tensor the numpy reference computes (block outputs included), by graph name."""
        return self.builder.evaluate(inputs)


# --- graph builder -----------------------------------------------------------------------------

Dim = int | str  # a static size, or a symbol such as "batch" or "batch*2"


class GraphBuilder:
    """Collects nodes, inputs, initializers and a numpy reference program for one graph.

    Names are unique (a clash gets a ``_1`` suffix); weights are drawn from one seeded
    generator, so the same calls build the same model. Each tensor records the graph inputs
    its values depend on (``Shape`` reads only the shape), which gives blocks a default
    ``kv_source_kind``.
    """

    def __init__(self, name: str = "xattn_test", *, seed: int = 0, opset: int = 18):
        if not _MIN_OPSET <= opset <= onnx.defs.onnx_opset_version():
            raise ValueError(f"opset {opset} is outside the supported range "
                             f"{_MIN_OPSET}..{onnx.defs.onnx_opset_version()}")
        self.name, self.opset = name, opset
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[Dim, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.deps: dict[str, frozenset[str]] = {}
        self.input_kinds: dict[str, str] = {}
        self.steps: list[Callable[[dict[str, np.ndarray]], None]] = []
        self._used: set[str] = set()
        self._consts: dict[tuple, str] = {}

    @property
    def output_names(self) -> list[str]:
        """The declared graph outputs, in order."""
        return [value.name for value in self.outputs]

    def unique(self, hint: str) -> str:
        """``hint``, or ``hint_<n>`` if that name is taken; the result is reserved."""
        name, n = hint, 0
        while name in self._used:
            n += 1
            name = f"{hint}_{n}"
        self._used.add(name)
        return name

    def input(self, name: str, shape: Sequence[Dim], dtype: str = "float32",
              kind: str = "normal") -> str:
        """Declare a graph input (again with the same shape is a no-op, so layers can share one).

        ``kind`` picks how :meth:`sample_inputs` draws it: ``normal``, ``additive_mask``
        (0 or -1e4), ``bool_mask`` (True = attend; key 0 always attended) or ``bias``.
        """
        shape = tuple(shape)
        if name in self.input_kinds:
            if self.shapes[name] != shape or self.dtypes[name] != dtype:
                raise ValueError(f"input {name!r} already declared as {self.dtypes[name]}"
                                 f"{list(self.shapes[name])}, not {dtype}{list(shape)}")
            return name
        if name in self._used:
            raise ValueError(f"input name {name!r} is already used by another tensor")
        self._used.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, _onnx_type(dtype), list(shape)))
        self.shapes[name], self.dtypes[name], self.input_kinds[name] = shape, dtype, kind
        self.deps[name] = frozenset({name})
        return name

    def describe(self, name: str, shape: Sequence[Dim], dtype: str) -> str:
        """Record the shape and dtype of a tensor the builder cannot infer (block inputs)."""
        self.shapes[name], self.dtypes[name] = tuple(shape), dtype
        return name

    def output(self, name: str, shape: Sequence[Dim] | None = None, dtype: str | None = None):
        """Declare an existing tensor as a graph output."""
        dtype = dtype or self.dtypes[name]
        dims = list(shape) if shape is not None else None
        self.outputs.append(helper.make_tensor_value_info(name, _onnx_type(dtype), dims))

    def initializer(self, hint: str, array: np.ndarray) -> str:
        """Store ``array`` as an initializer under a unique name derived from ``hint``."""
        name = self.unique(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        self.dtypes[name] = str(np.asarray(array).dtype)
        self.deps[name] = frozenset()
        return name

    def const(self, values, dtype: str = "int64", hint: str = "const") -> str:
        """A small constant (shape targets, scales), shared by every block asking for it."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self.initializer(hint, array)
        return self._consts[key]

    def random(self, shape: Sequence[int], dtype: str, std: float) -> np.ndarray:
        """Seeded normal values rounded to ``dtype`` and returned as float64 (what is stored)."""
        return (self.rng.standard_normal(tuple(shape)) * std).astype(dtype).astype(np.float64)

    def node(self, op: str, inputs: Sequence[str], hint: str, *, outputs: int | Sequence[str] = 1,
             **attrs) -> str | list[str]:
        """Append a node named after ``hint``; returns its output name (a list if several)."""
        name = self.unique(hint)
        if isinstance(outputs, int):
            names = [name] if outputs == 1 else [self.unique(f"{name}_{i}") for i in range(outputs)]
        else:
            names = [self._reserve(out) for out in outputs]
        self.nodes.append(helper.make_node(op, list(inputs), names, name=name, **attrs))
        deps = frozenset() if op in _SHAPE_ONLY else frozenset().union(
            *(self.deps.get(t, frozenset()) for t in inputs if t))
        for out in names:
            self.deps[out] = deps
        return names[0] if len(names) == 1 else names

    def _reserve(self, name: str) -> str:
        if name in self._used:
            raise ValueError(f"tensor name {name!r} is already used")
        self._used.add(name)
        return name

    def reference(self, step: Callable[[dict[str, np.ndarray]], None]) -> None:
        """Add a numpy step to the reference program; it reads and writes ``env[name]``."""
        self.steps.append(step)

    def evaluate(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the reference program (float64) on ``inputs``; returns every computed tensor."""
        env = {name: value.astype(np.float64) if value.dtype.kind == "f" else value
               for name, value in inputs.items()}
        for step in self.steps:
            step(env)
        return env

    def sample_inputs(self, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Draw every graph input, resolving symbolic dims from ``sizes``."""
        rng = np.random.default_rng(seed)
        return {value.name: _draw(rng, self.input_kinds[value.name],
                                  tuple(_resolve(d, sizes) for d in self.shapes[value.name]),
                                  self.dtypes[value.name])
                for value in self.inputs}

    def finish(self, blocks: Sequence[BlockTruth], sizes: dict[str, int],
               seed: int = 0) -> BuiltModel:
        """The model with sample inputs drawn at ``sizes`` (symbol -> size) and their reference.

        Every declared output gets a reference value; ``dynamic`` lists the symbols the inputs use.
        """
        symbols = {part for value in self.inputs for dim in self.shapes[value.name]
                   if isinstance(dim, str) for term in dim.split("+")
                   for part in term.split("*") if not part.isdigit()}
        inputs = self.sample_inputs(sizes, seed)
        env = self.evaluate(inputs)
        return BuiltModel(model=self.make_model(), blocks=list(blocks), inputs=inputs,
                          reference={name: env[name] for name in self.output_names},
                          sizes=dict(sizes), dynamic=tuple(n for n in sizes if n in symbols),
                          builder=self)

    def make_model(self, producer: str = "xattn_compiler.testing") -> onnx.ModelProto:
        """The model (IR 10, default domain at ``opset``), checked by ``onnx.checker``."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers)
        model = helper.make_model(graph, producer_name=producer,
                                  opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 10
        onnx.checker.check_model(model)
        return model


def _onnx_type(dtype: str) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _resolve(dim: Dim, sizes: dict[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    return sum(math.prod(int(p) if p.isdigit() else sizes[p] for p in term.split("*"))
               for term in dim.split("+"))


def _mul_dim(dim: Dim, factor: int) -> Dim:
    return dim * factor if isinstance(dim, int) else f"{dim}*{factor}"


def _add_dim(a: Dim, b: Dim) -> Dim:
    return a + b if isinstance(a, int) and isinstance(b, int) else f"{a}+{b}"


def _draw(rng: np.random.Generator, kind: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if kind in ("additive_mask", "bool_mask", "bool_mask_inv"):
        # Attend to about 3/4 of the keys, always to key 0, so no softmax row is empty.
        keep = rng.random(shape) < 0.75
        keep[..., 0] = True
        if kind != "additive_mask":
            return keep if kind == "bool_mask" else ~keep
        return np.where(keep, 0.0, -1e4).astype(dtype)
    if kind == "position_ids":  # consecutive positions from a random start per sequence
        start = rng.integers(0, ROPE_POSITIONS // 2, size=shape[:-1] + (1,))
        return (start + np.arange(shape[-1])).astype(np.int64)
    std = 0.5 if kind == "bias" else 1.0
    return (rng.standard_normal(shape) * std).astype(dtype)


# --- reshape targets -----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Dim:
    """A run-time size: axis ``axis`` of ``source`` (static ``size`` or a symbol) times ``factor``."""

    source: str
    axis: int
    size: Dim
    factor: int = 1

    def times(self, factor: int) -> _Dim:
        return replace(self, factor=self.factor * factor)

    @property
    def static(self) -> int | None:
        return self.size * self.factor if isinstance(self.size, int) else None


def _target(b: GraphBuilder, style: str, entries: Sequence[int | _Dim], copy: Sequence[int],
            hint: str, shapes: dict[str, str]) -> str:
    """A Reshape target for ``entries`` spelled as constants or computed from ``Shape``.

    ``const``: a symbolic dim at a position in ``copy`` (same axis of the data) becomes 0, one
    other unknown becomes -1; a second unknown cannot be spelled and raises. ``computed``:
    Shape -> Gather -> Unsqueeze per dim (Slice for runs of axes of one tensor), Mul for
    ``B*H``, Concat with the constant parts; ``shapes`` caches one Shape node per tensor.
    """
    if style == "const":
        values, unknown = [], []
        for i, entry in enumerate(entries):
            if isinstance(entry, int) or entry.static is not None:
                values.append(entry if isinstance(entry, int) else entry.static)
            elif i in copy and entry.factor == 1:
                values.append(0)
            else:
                values.append(-1)
                unknown.append(_mul_dim(entry.size, entry.factor))
        if values.count(-1) > 1:
            raise StaticShapeRequired(
                f"{hint}: shape_style='const' cannot spell a Reshape to {len(entries)}-D with "
                f"dynamic sizes {unknown} (Reshape allows one -1); use shape_style='computed' "
                "or static sizes")
        return b.const(values, hint=f"{hint}.shape")
    if all(isinstance(entry, int) for entry in entries):
        return b.const(list(entries), hint=f"{hint}.shape")
    pieces = [_computed_piece(b, run, hint, shapes) for run in _runs(entries)]
    return b.node("Concat", pieces, f"{hint}.shape", axis=0)


def _runs(entries: Sequence[int | _Dim]) -> list[list]:
    """Group entries: consecutive ints; consecutive axes of one tensor (factor 1); the rest."""
    runs: list[list] = []
    for entry in entries:
        last = runs[-1][-1] if runs else None
        if isinstance(entry, int) and isinstance(last, int):
            runs[-1].append(entry)
        elif (isinstance(entry, _Dim) and isinstance(last, _Dim) and entry.factor == 1
              and last.factor == 1 and entry.source == last.source
              and entry.axis == last.axis + 1):
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _computed_piece(b: GraphBuilder, run: list, hint: str, shapes: dict[str, str]) -> str:
    if isinstance(run[0], int):
        return b.const(run, hint=f"{hint}.const")
    first = run[0]
    if first.source not in shapes:
        shapes[first.source] = b.node("Shape", [first.source], f"{hint}.shape_of")
    shape = shapes[first.source]
    if len(run) > 1:  # exporters slice a run of sizes (e.g. x.shape[:2]) in one go
        return b.node("Slice", [shape, b.const([first.axis]), b.const([run[-1].axis + 1]),
                                b.const([0])], f"{hint}.dims")
    size = b.node("Gather", [shape, b.const(first.axis)], f"{hint}.dim", axis=0)
    size = b.node("Unsqueeze", [size, b.const([0])], f"{hint}.dim_1d")
    if first.factor != 1:
        size = b.node("Mul", [size, b.const([first.factor])], f"{hint}.dim_times")
    return size


# --- one attention block -----------------------------------------------------------------------

@dataclass
class _Weights:
    """Unfolded weights as float64 copies of the stored values: what the reference uses."""

    wq: np.ndarray
    bq: np.ndarray | None
    wk: np.ndarray | None
    bk: np.ndarray | None
    wv: np.ndarray | None
    bv: np.ndarray | None
    wo: np.ndarray | None
    bo: np.ndarray | None


@dataclass(frozen=True)
class _Operand:
    name: str
    layout: str  # BSE, BSHD, BHSD, BHDS, HSD, HDS (see the module legend)


@dataclass
class _Block:
    """Everything the emitters of one block share."""

    b: GraphBuilder
    spec: AttentionSpec
    prefix: str
    query: str
    context: str | tuple[str, str] | None
    batch: _Dim
    q_len: _Dim
    kv_len: _Dim
    weights: _Weights
    shapes: dict[str, str] = field(default_factory=dict)
    kv_batch: _Dim | None = None  # the K/V source's batch (1 for an initializer context)
    past_len: Dim = PAST_LEN
    pasts: dict[str, str] = field(default_factory=dict)  # "key"/"value" -> past input
    presents: dict[str, str] = field(default_factory=dict)  # "key"/"value" -> present output
    rope: dict[str, Any] = field(default_factory=dict)  # cos/sin names and stored tables
    rel_bias: np.ndarray | None = None  # the [2M+1, H] relative-position table as stored

    def hint(self, suffix: str) -> str:
        return f"{self.prefix}.{suffix}"

    def node(self, op: str, inputs: Sequence[str], suffix: str, **attrs):
        return self.b.node(op, inputs, self.hint(suffix), **attrs)

    def reshape(self, data: str, entries: Sequence[int | _Dim], copy: Sequence[int],
                suffix: str) -> str:
        target = _target(self.b, self.spec.shape_style, entries, copy, self.hint(suffix),
                         self.shapes)
        return self.node("Reshape", [data, target], suffix)

    def scalar(self, value: float, suffix: str) -> str:
        return self.b.const(value, self.spec.dtype, hint=self.hint(suffix))

    @property
    def kv_source(self) -> str:
        return self.query if self.context is None else (
            self.context if isinstance(self.context, str) else self.context[0])


def kv_input_shapes(spec: AttentionSpec, batch: Dim, kv_len: Dim) -> tuple[tuple, tuple]:
    """Shapes of the K and V graph inputs that ``projection="none"`` reads.

    V is ``[B,H,Sk,D]`` (3-D layout: ``[B*H,Sk,D]``); K is laid out as V for
    ``k_transpose="separate"``, ``[B,Sk,H,D]`` for ``fused`` and already transposed,
    ``[B,H,D,Sk]`` / ``[B*H,D,Sk]``, for ``pre_split``.
    """
    heads, dim = spec.num_heads, spec.head_dim
    three = spec.head_layout == "3d"
    value = (_mul_dim(batch, heads), kv_len, dim) if three else (batch, heads, kv_len, dim)
    key = {"separate": value, "fused": (batch, kv_len, heads, dim),
           "pre_split": ((_mul_dim(batch, heads), dim, kv_len) if three
                         else (batch, heads, dim, kv_len))}[spec.k_transpose]
    return key, value


def _kv_layouts(spec: AttentionSpec) -> tuple[str, str, int]:
    """Layouts of the ``projection="none"`` K and V inputs and the axis of Sk in K."""
    three = spec.head_layout == "3d"
    value = "HSD" if three else "BHSD"
    return {"separate": (value, value, 1 if three else 2), "fused": ("BSHD", value, 1),
            "pre_split": ("HDS" if three else "BHDS", value, 2 if three else 3)}[spec.k_transpose]


def add_attention(b: GraphBuilder, spec: AttentionSpec, query: str,
                  context: str | tuple[str, str] | None = None,
                  prefix: str = "attn", past_len: Dim = PAST_LEN) -> BlockTruth:
    """Emit one attention block spelled as ``spec`` into ``b`` and return its ground truth.

    ``query`` (and ``context`` for cross-attention) are ``[B,S,E]`` tensors whose shape and
    dtype ``b`` knows (graph inputs, or tensors registered with :meth:`GraphBuilder.describe`);
    the context's batch must equal the query's. For ``projection="none"`` the context is a
    ``(key, value)`` pair of tensors shaped as :func:`kv_input_shapes` says. The block's
    result is registered with the builder and computed by its numpy reference program.

    The truth's ``kv_source_kind``/``static_inputs`` default from what the block sees: a
    context that is a graph input is ``graph_input`` (assumed to feed only K/V), one that
    depends on no input is ``constant``, anything else ``internal``; callers that know more
    (see :func:`attention_model`) fix them with ``dataclasses.replace``. With ``kv_cache`` the
    past K/V inputs are ``past_len`` long (a size or a symbol) and the presents are declared
    graph outputs.
    """
    blk = _open_block(b, spec, query, context, prefix)
    blk.past_len = past_len
    ops = _project(blk)
    q = ops["q"]
    if spec.scale == "mul_q":  # BART/Whisper: the projected Q times D^-0.5, before its split
        q = _Operand(blk.node("Mul", [q.name, blk.scalar(spec.head_dim ** -0.5, "scaling")],
                              "q.scaled"), q.layout)
    q_heads, k_t = _heads(blk, q, blk.q_len, "q"), _keys_t(blk, ops["k"])
    if spec.scale == "mul_q_heads":  # the split Q times D^-0.5 (SDPA with a scale on Q)
        q_heads = blk.node("Mul", [q_heads, blk.scalar(spec.head_dim ** -0.5, "scaling")],
                           "q.scaled")
    if spec.scale == "sdpa_qk":  # torch SDPA decomposed: sqrt of the scale on each side
        quarter = blk.scalar(spec.head_dim ** -0.25, "scale_sqrt")
        q_heads = blk.node("Mul", [q_heads, quarter], "q.scaled")
        k_t = blk.node("Mul", [k_t, quarter], "k.scaled")
    v_heads = _heads(blk, ops["v"], blk.kv_len, "v")
    if spec.kv_cache:  # from here on the keys are the past and the new ones
        blk.kv_len = _Dim(blk.presents["key"], 2, _add_dim(past_len, blk.kv_len.size))
    probs, masks = _probabilities(blk, q_heads, k_t)
    if spec.core == "einsum":
        context = blk.node("Einsum", [probs, v_heads], "context",
                           equation="bij,bjd->bid" if spec.batched else "bhij,bhjd->bhid")
    else:
        context = blk.node("MatMul", [probs, v_heads], "context")
    if spec.merge == "einsum":  # heads merged by the out projection itself
        merged = b.describe(context, (blk.batch.size, spec.num_heads, blk.q_len.size,
                                      spec.head_dim), spec.dtype)
        result = _einsum_merge(blk, context)
    else:
        rows = (blk.q_len, blk.batch) if spec.head_layout == "time_major" else \
            (blk.batch, blk.q_len)
        merged = b.describe(_merge(blk, context), (rows[0].size, rows[1].size, spec.inner),
                            spec.dtype)
        result = merged
        if spec.out_projection:
            style = spec.projection if spec.projection in _LINEAR_STYLES else "matmul_bias"
            result = _linear(blk, merged, blk.weights.wo, blk.weights.bo, "out_proj", style,
                             rows)
        if spec.head_layout == "time_major":  # back to batch first after the out projection
            result = blk.node("Transpose", [result], "batch_first", perm=[1, 0, 2])
    e_out = spec.inner if not spec.out_projection else blk.weights.wo.shape[1]
    b.describe(result, (blk.batch.size, blk.q_len.size, e_out), spec.dtype)
    _add_reference(blk, merged, result, masks)
    return _truth(blk, merged, result, masks)


def _einsum_merge(blk: _Block, context: str) -> str:
    """``bhsd,hde->bse`` with the out projection's weight viewed as ``[H,D,E]``, then its bias."""
    spec, w = blk.spec, blk.weights
    weight = blk.b.initializer(blk.hint("out_proj.weight"), w.wo.reshape(
        spec.num_heads, spec.head_dim, -1).astype(spec.dtype))
    y = blk.node("Einsum", [context, weight], "out_proj", equation="bhsd,hde->bse")
    if w.bo is None:
        return y
    bias = blk.b.initializer(blk.hint("out_proj.bias"), w.bo.astype(spec.dtype))
    return blk.node("Add", [y, bias], "out_proj.add_bias")


_LINEAR_STYLES = ("matmul_bias", "matmul", "gemm", "einsum")


def _open_block(b: GraphBuilder, spec: AttentionSpec, query: str, context, prefix: str) -> _Block:
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    q_shape = _known(b, query, spec.dtype, 3)
    if spec.kind == "self":
        if context is not None:
            raise ValueError(f"{prefix}: kind='self' takes no context (got {context!r})")
        kv_len, e_kv = _Dim(query, 1, q_shape[1]), q_shape[2]
    elif spec.projection == "none":
        if not (isinstance(context, tuple) and len(context) == 2):
            raise ValueError(f"{prefix}: projection='none' needs context=(key, value), tensors "
                             f"shaped as kv_input_shapes(spec, ...) (got {context!r})")
        axis = _kv_layouts(spec)[2]
        kv_len, e_kv = _Dim(context[0], axis, _known(b, context[0], spec.dtype)[axis]), None
        expected = kv_input_shapes(spec, q_shape[0], kv_len.size)
        actual = (b.shapes[context[0]], _known(b, context[1], spec.dtype))
        if actual != expected:
            raise ValueError(f"{prefix}: key/value shapes {actual} do not match the spec's head "
                             f"layout; expected {expected}")
    else:
        if not isinstance(context, str):
            raise ValueError(f"{prefix}: kind='cross' needs a context tensor (got {context!r})")
        c_shape = _known(b, context, spec.dtype, 3)
        if c_shape[0] not in (q_shape[0], 1):
            raise ValueError(f"{prefix}: context batch {c_shape[0]!r} differs from the query's "
                             f"{q_shape[0]!r}; Expand the context to the query's batch first")
        if c_shape[0] != q_shape[0] and spec.batched:
            raise ValueError(f"{prefix}: a batch-1 context broadcasts over the batch only with "
                             f"head_layout='4d' (got {spec.head_layout!r})")
        kv_len, e_kv = _Dim(context, 1, c_shape[1]), c_shape[2]
    blk = _Block(b, spec, prefix, query, context, _Dim(query, 0, q_shape[0]),
                  _Dim(query, 1, q_shape[1]), kv_len, _make_weights(b, spec, q_shape[2], e_kv))
    source = blk.kv_source
    # Exporters read K/V's batch off the query stream (HF's ``bsz`` from hidden_states), which
    # split-kv must rewire; only a batch-1 context (an initializer) has a batch of its own.
    own_batch = spec.projection != "none" and b.shapes[source][0] != q_shape[0]
    blk.kv_batch = _Dim(source, 0, b.shapes[source][0]) if own_batch else blk.batch
    return blk


def _known(b: GraphBuilder, name: str, dtype: str, rank: int | None = None) -> tuple[Dim, ...]:
    if name not in b.shapes:
        raise ValueError(f"tensor {name!r} has no known shape; declare it with "
                         "GraphBuilder.input or GraphBuilder.describe")
    shape = b.shapes[name]
    if rank is not None and len(shape) != rank:
        raise ValueError(f"tensor {name!r} is {len(shape)}-D {list(shape)}; expected {rank}-D")
    if b.dtypes.get(name) != dtype:
        raise ValueError(f"tensor {name!r} is {b.dtypes.get(name)}, the spec says {dtype}")
    if rank is not None and not isinstance(shape[-1], int):  # the feature width sizes weights
        raise ValueError(f"tensor {name!r} needs a static feature width, got {shape[-1]!r}")
    return shape


def _make_weights(b: GraphBuilder, spec: AttentionSpec, e_q: int, e_kv: int | None) -> _Weights:
    dtype, inner = spec.dtype, spec.inner
    has_bias = spec.projection != "matmul"

    def weight(n_in: int, n_out: int) -> np.ndarray:
        return b.random((n_in, n_out), dtype, n_in ** -0.5)  # keeps activations near unit scale

    def bias(n: int) -> np.ndarray | None:
        return b.random((n,), dtype, 0.1) if has_bias else None

    wq, bq = weight(e_q, inner), bias(inner)
    wk = bk = wv = bv = wo = bo = None
    if e_kv is not None:
        kv_inner = spec.kv_heads * spec.head_dim
        wk, bk = weight(e_kv, kv_inner), bias(kv_inner)
        wv, bv = weight(e_kv, kv_inner), bias(kv_inner)
    if spec.out_projection:
        wo, bo = weight(inner, e_q), bias(e_q)
    return _Weights(wq, bq, wk, bk, wv, bv, wo, bo)


def _linear(blk: _Block, x: str, w: np.ndarray, bias: np.ndarray | None, suffix: str,
            style: str, rows: tuple[_Dim, _Dim]) -> str:
    """``x[B,S,Ein] @ w (+ bias)`` spelled as ``style``; ``rows`` are B and S of ``x``."""
    b, dtype = blk.b, blk.spec.dtype
    weight = b.initializer(blk.hint(f"{suffix}.weight"),
                           (w.T if style == "gemm" else w).astype(dtype))
    bias_name = None if bias is None else b.initializer(blk.hint(f"{suffix}.bias"),
                                                        bias.astype(dtype))
    if style == "gemm":  # 2-D Gemm: flatten the rows, transB=1 on a [out, in] weight
        flat = blk.reshape(x, [-1, w.shape[0]], (), f"{suffix}.flatten")
        y = blk.node("Gemm", [flat, weight] + ([bias_name] if bias_name else []), suffix,
                     transB=1)
        return blk.reshape(y, [rows[0], rows[1], w.shape[1]], (), f"{suffix}.unflatten")
    if style == "einsum":
        y = blk.node("Einsum", [x, weight], suffix, equation="bse,ef->bsf")
    else:
        y = blk.node("MatMul", [x, weight], suffix)
    return y if bias_name is None else blk.node("Add", [y, bias_name], f"{suffix}.add_bias")


def _project(blk: _Block) -> dict[str, _Operand]:
    """Q, K and V as operands in whatever layout the projection spelling leaves them."""
    spec, w = blk.spec, blk.weights
    fold = spec.head_dim ** -0.5 if spec.scale == "folded" else 1.0
    wq, bq = w.wq * fold, None if w.bq is None else w.bq * fold
    kv_rows = (blk.kv_batch, blk.kv_len)
    if spec.projection.startswith("fused"):
        return _fused(blk, wq, bq, kv_rows)
    style = spec.projection if spec.projection in _LINEAR_STYLES else "matmul_bias"
    q = _linear(blk, blk.query, wq, bq, "q_proj", style, (blk.batch, blk.q_len))
    ops = {"q": _Operand(q, "BSE")}
    if spec.projection == "none":
        k_layout, v_layout, _ = _kv_layouts(spec)
        ops["k"], ops["v"] = _Operand(blk.context[0], k_layout), _Operand(blk.context[1], v_layout)
        return ops
    for name, weight, bias in (("k", w.wk, w.bk), ("v", w.wv, w.bv)):
        ops[name] = _Operand(_linear(blk, blk.kv_source, weight, bias, f"{name}_proj", style,
                                     kv_rows), "BSE")
    return ops


def _fused(blk: _Block, wq: np.ndarray, bq: np.ndarray, kv_rows: tuple[_Dim, _Dim]):
    """One MatMul for QKV (self) or KV (cross), cut by Split, Slice or Gather."""
    spec, w, b = blk.spec, blk.weights, blk.b
    names = ["q", "k", "v"] if spec.kind == "self" else ["k", "v"]
    weights, biases = [w.wk, w.wv], [w.bk, w.bv]
    ops: dict[str, _Operand] = {}
    if spec.kind == "self":
        weights, biases = [wq, *weights], [bq, *biases]
    else:
        ops["q"] = _Operand(_linear(blk, blk.query, wq, bq, "q_proj", "matmul_bias",
                                    (blk.batch, blk.q_len)), "BSE")
    fused = "qkv_proj" if spec.kind == "self" else "kv_proj"
    n, inner = len(names), spec.inner
    if spec.projection == "fused_per_head":  # columns ordered (head, q/k/v, dim)
        def per_head(parts: list[np.ndarray]) -> np.ndarray:
            stacked = np.stack([p.reshape(*p.shape[:-1], spec.num_heads, spec.head_dim)
                                for p in parts], axis=-2)
            return stacked.reshape(*stacked.shape[:-3], -1)

        weight, bias = per_head(weights), per_head(biases)
    else:
        weight, bias = np.concatenate(weights, axis=1), np.concatenate(biases)
    y = _linear(blk, blk.kv_source, weight, bias, fused, "matmul_bias", kv_rows)
    if spec.projection == "fused_per_head":
        heads = blk.reshape(y, [kv_rows[0], kv_rows[1], spec.num_heads, n * spec.head_dim],
                            (0, 1), f"{fused}.split_heads")
        parts = blk.node("Split", [heads, b.const([spec.head_dim] * n)], f"{fused}.split",
                         outputs=n, axis=-1)
        layout = "BSHD"
    elif spec.projection == "fused_split":
        parts = blk.node("Split", [y, b.const([inner] * n)], f"{fused}.split", outputs=n, axis=-1)
        layout = "BSE"
    elif spec.projection == "fused_slice":
        parts = [blk.node("Slice", [y, b.const([i * inner]), b.const([(i + 1) * inner]),
                                    b.const([-1])], f"{name}.slice")
                 for i, name in enumerate(names)]
        layout = "BSE"
    else:  # fused_gather: [B,S,n,H,D] -> [n,B,H,S,D] -> Gather along the stacked axis
        heads = blk.reshape(y, [kv_rows[0], kv_rows[1], n, spec.num_heads, spec.head_dim],
                            (0, 1), f"{fused}.split_heads")
        stacked = blk.node("Transpose", [heads], f"{fused}.transpose", perm=[2, 0, 3, 1, 4])
        parts = [blk.node("Gather", [stacked, b.const(i)], f"{name}.gather", axis=0)
                 for i, name in enumerate(names)]
        layout = "BHSD"
    ops.update({name: _Operand(part, layout) for name, part in zip(names, parts, strict=True)})
    return ops


def _heads(blk: _Block, op: _Operand, seq: _Dim, suffix: str) -> str:
    """Q, K or V in the core's layout: ``[B,H,S,D]`` (4d) or ``[B*H,S,D]`` (3d, time-major).

    In ``[B,H,S,D]`` on the way: RoPE (Q and K), the KV cache's Concat and ``repeat_kv``.
    """
    spec = blk.spec
    batch = blk.batch if suffix == "q" else blk.kv_batch
    heads = spec.num_heads if suffix == "q" else spec.kv_heads
    name, layout = op.name, op.layout
    if spec.head_layout == "time_major" and layout == "BSE":  # nn.MultiheadAttention
        name = blk.node("Transpose", [name], f"{suffix}.time_major", perm=[1, 0, 2])
        name = blk.reshape(name, [seq, batch.times(heads), spec.head_dim], (0,),
                           f"{suffix}.split_heads")
        return blk.node("Transpose", [name], f"{suffix}.transpose", perm=[1, 0, 2])
    if layout == "BSE":
        name = blk.reshape(name, [batch, seq, heads, spec.head_dim], (0, 1),
                           f"{suffix}.split_heads")
        layout = "BSHD"
    if layout == "BSHD":
        name = blk.node("Transpose", [name], f"{suffix}.transpose", perm=[0, 2, 1, 3])
        layout = "BHSD"
    if layout == "BHSD":
        name, seq = _in_heads(blk, name, seq, suffix)
        if spec.batched:
            name = blk.reshape(name, [batch.times(spec.num_heads), seq, spec.head_dim], (),
                               f"{suffix}.batch_heads")
    return name


def _in_heads(blk: _Block, name: str, seq: _Dim, suffix: str) -> tuple[str, _Dim]:
    """RoPE, cache and GQA on ``[B,H,S,D]`` heads, in the order Llama applies them."""
    spec = blk.spec
    if spec.rope != "none" and suffix in ("q", "k"):
        name = _rope(blk, name, suffix)
    if spec.kv_cache and suffix in ("k", "v"):
        name, seq = _cache(blk, name, seq, "key" if suffix == "k" else "value")
    if spec.kv_groups != 1 and suffix in ("k", "v"):
        b = blk.b
        x = blk.node("Unsqueeze", [name, b.const([2])], f"{suffix}.repeat_kv.unsqueeze")
        x = blk.node("Expand", [x, b.const([1, 1, spec.kv_groups, 1, 1])],
                     f"{suffix}.repeat_kv.expand")
        name = blk.reshape(x, [blk.kv_batch, spec.num_heads, seq, spec.head_dim], (0,),
                           f"{suffix}.repeat_kv")
    return name, seq


def _cache(blk: _Block, new: str, seq: _Dim, role: str) -> tuple[str, _Dim]:
    """``Concat(past, new)`` on the sequence axis; the result is the present output too."""
    spec, b = blk.spec, blk.b
    batch, heads, dim = blk.kv_batch.size, spec.kv_heads, spec.head_dim
    past = b.input(f"{blk.prefix}.past_{role}", (batch, heads, blk.past_len, dim), spec.dtype)
    present = b.node("Concat", [past, new], blk.hint(f"present_{role}"),
                     outputs=[f"present.{blk.prefix}.{role}"], axis=2)
    total = _add_dim(blk.past_len, seq.size)
    b.describe(present, (batch, heads, total, dim), spec.dtype)
    b.output(present, (batch, heads, total, dim), spec.dtype)
    blk.pasts[role], blk.presents[role] = past, present
    return present, _Dim(present, 2, total)


def _rope(blk: _Block, x: str, suffix: str) -> str:
    """``x * cos + rotate(x) * sin`` on ``[B,H,S,D]`` heads."""
    spec, b, dim = blk.spec, blk.b, blk.spec.head_dim
    cos, sin = _rope_tables(blk, x)
    if spec.rope == "rotate_half":  # Llama: cat(-x2, x1) of the two halves
        half = dim // 2
        x1 = blk.node("Slice", [x, b.const([0]), b.const([half]), b.const([-1])],
                      f"{suffix}.rope.x1")
        x2 = blk.node("Slice", [x, b.const([half]), b.const([dim]), b.const([-1])],
                      f"{suffix}.rope.x2")
        rotated = blk.node("Concat", [blk.node("Neg", [x2], f"{suffix}.rope.neg"), x1],
                           f"{suffix}.rope.rotate", axis=-1)
    else:  # GPT-J: stack(-x[..., 1::2], x[..., ::2]) flattened back
        even = blk.node("Slice", [x, b.const([0]), b.const([dim]), b.const([-1]), b.const([2])],
                        f"{suffix}.rope.even")
        odd = blk.node("Slice", [x, b.const([1]), b.const([dim]), b.const([-1]), b.const([2])],
                       f"{suffix}.rope.odd")
        pair = blk.node("Concat", [
            blk.node("Unsqueeze", [blk.node("Neg", [odd], f"{suffix}.rope.neg"),
                                   b.const([-1])], f"{suffix}.rope.neg_pair"),
            blk.node("Unsqueeze", [even, b.const([-1])], f"{suffix}.rope.even_pair")],
            f"{suffix}.rope.pairs", axis=-1)
        shape = blk.node("Shape", [x], f"{suffix}.rope.shape")
        rotated = blk.node("Reshape", [pair, shape], f"{suffix}.rope.rotate")
    out = blk.node("Add", [blk.node("Mul", [x, cos], f"{suffix}.rope.cos"),
                           blk.node("Mul", [rotated, sin], f"{suffix}.rope.sin")],
                   f"{suffix}.rope")
    blk.rope[f"{suffix}_out"] = out
    return out


def _rope_tables(blk: _Block, x: str) -> tuple[str, str]:
    """cos/sin broadcastable to ``[B,H,S,D]`` (once per block): Gathered by position ids
    (``[B,1,S,D]``) or Sliced to the length from constant tables (``[S,D]``)."""
    if "cos" in blk.rope:
        return blk.rope["cos"], blk.rope["sin"]
    spec, b, dim = blk.spec, blk.b, blk.spec.head_dim
    inv_freq = 10000.0 ** (-np.arange(0, dim, 2) / dim)
    angles = np.arange(ROPE_POSITIONS)[:, None] * inv_freq[None, :]
    emb = (np.concatenate([angles, angles], axis=-1) if spec.rope == "rotate_half"
           else np.repeat(angles, 2, axis=-1))
    names = {}
    for fn in ("cos", "sin"):
        table = getattr(np, fn)(emb).astype(spec.dtype)
        blk.rope[f"{fn}_table"] = table.astype(np.float64)
        stored = b.const(table, spec.dtype, hint=f"rope.{fn}_table.{spec.rope}")
        if spec.rope_table == "position_ids":
            ids = b.input("position_ids", (blk.batch.size, blk.q_len.size), "int64",
                          kind="position_ids")
            rows = blk.node("Gather", [stored, ids], f"rope.{fn}", axis=0)
            names[fn] = blk.node("Unsqueeze", [rows, b.const([1])], f"rope.{fn}.heads")
        else:
            length = blk.node("Shape", [x], f"rope.{fn}.length", start=2, end=3)
            names[fn] = blk.node("Slice", [stored, b.const([0]), length, b.const([0])],
                                 f"rope.{fn}")
    blk.rope.update(names)
    return names["cos"], names["sin"]


def _keys_t(blk: _Block, op: _Operand) -> str:
    """K^T in the core's layout: ``[B,H,D,Sk]`` (4d) or ``[B*H,D,Sk]`` (3d); K itself
    (``[B,H,Sk,D]``) for an Einsum core."""
    spec, three = blk.spec, blk.spec.batched
    heads, dim = spec.num_heads, spec.head_dim
    batch = blk.kv_batch
    if op.layout in ("BHDS", "HDS"):  # a K input that is stored transposed already
        return op.name
    if spec.k_transpose == "separate" or op.layout in ("BHSD", "HSD"):
        k = _heads(blk, op, blk.kv_len, "k")
        if spec.core == "einsum":
            return k
        return blk.node("Transpose", [k], "k.transpose_t", perm=[0, 2, 1] if three else [0, 1, 3, 2])
    if spec.k_transpose == "fused":  # GPT-2: one permute from [B,S,H,D] straight to K^T
        k = op.name
        if op.layout == "BSE":
            k = blk.reshape(k, [batch, blk.kv_len, heads, dim], (0, 1), "k.split_heads")
        k = blk.node("Transpose", [k], "k.transpose_t", perm=[0, 2, 3, 1])
        if three:
            k = blk.reshape(k, [batch.times(heads), dim, blk.kv_len], (), "k.batch_heads")
        return k
    # pre_split: transpose the projected [B,Sk,inner] K, so the head split yields K^T directly
    k = blk.node("Transpose", [op.name], "k.transpose_t", perm=[0, 2, 1])
    if three:
        return blk.reshape(k, [batch.times(heads), dim, blk.kv_len], (), "k.split_heads")
    return blk.reshape(k, [batch, heads, dim, blk.kv_len], (0,), "k.split_heads")


def _probabilities(blk: _Block, q: str, k_t: str) -> tuple[str, tuple[str, ...]]:
    """Scores, scale, mask and Softmax (with the fp32 casts); returns the mask inputs too."""
    spec = blk.spec
    if spec.core == "einsum":
        scores = blk.node("Einsum", [q, k_t], "scores",
                          equation="bid,bjd->bij" if spec.batched else "bhid,bhjd->bhij")
    else:
        scores = blk.node("MatMul", [q, k_t], "scores")
    if spec.scale == "div_after":
        scores = blk.node("Div", [scores, blk.scalar(math.sqrt(spec.head_dim), "scale_divisor")],
                          "scores.scaled")
    elif spec.scale == "mul_after":
        scores = blk.node("Mul", [scores, blk.scalar(spec.head_dim ** -0.5, "scaling")],
                          "scores.scaled")
    scores, masks = _mask(blk, scores)
    if spec.softmax_cast:
        scores = blk.node("Cast", [scores], "scores.to_float", to=onnx.TensorProto.FLOAT)
    axis = (2 if spec.batched else 3) if spec.softmax_axis == "positive" else -1
    probs = blk.node("Softmax", [scores], "probs", axis=axis)
    if spec.softmax_cast:
        probs = blk.node("Cast", [probs], "probs.to_dtype", to=_onnx_type(spec.dtype))
    return probs, masks


_MASK_INPUTS = {  # mask -> (input name for self, for cross, dtype or None for the spec's, kind)
    "add_input": ("attention_mask", "encoder_attention_mask", None, "additive_mask"),
    "add_bias_input": ("position_bias", "encoder_position_bias", None, "bias"),
    "where_bool": ("attention_mask_bool", "encoder_attention_mask_bool", "bool", "bool_mask"),
    "where_bool_inv": ("attention_mask_inv", "encoder_attention_mask_inv", "bool",
                       "bool_mask_inv"),
}
#: Relative positions beyond this share the table's first or last row (``add_rel_bias``).
REL_BIAS_DISTANCE = 4


def _mask(blk: _Block, scores: str) -> tuple[str, tuple[str, ...]]:
    spec, b = blk.spec, blk.b
    if spec.mask == "none":
        return scores, ()
    sq, sk = blk.q_len.size, blk.kv_len.size
    if spec.mask == "add_causal_const":
        if not (isinstance(sq, int) and isinstance(sk, int)):
            raise StaticShapeRequired(f"{blk.prefix}: mask='add_causal_const' is a constant "
                                      f"[Sq,Sk], so it needs static lengths (got {sq!r}, {sk!r})")
        mask = b.initializer(blk.hint("causal_mask"), _causal(sq, sk).astype(spec.dtype))
        return blk.node("Add", [scores, mask], "scores.masked"), ()
    heads, batch = spec.num_heads, blk.batch.size
    three = spec.batched
    if three:  # the mask has a batch (or head) dim: unbatch the heads around it, as Whisper does
        scores = blk.reshape(scores, [blk.batch, heads, blk.q_len, blk.kv_len], (),
                             "scores.unbatch_heads")
    masks: tuple[str, ...] = ()
    if spec.mask == "add_rel_bias":
        scores = blk.node("Add", [scores, _relative_bias(blk, scores)], "scores.masked")
    else:
        self_name, cross_name, dtype, kind = _MASK_INPUTS[spec.mask]
        name = self_name if spec.kind == "self" else cross_name
        if spec.kv_cache:  # its key length is the past's plus the new one's
            name += "_with_past"
        shape = {"add_input": (batch, 1, sq, sk), "add_bias_input": (1, heads, sq, sk),
                 "where_bool": (batch, 1, 1, sk), "where_bool_inv": (batch, 1, 1, sk)}[spec.mask]
        mask = b.input(name, shape, dtype or spec.dtype, kind)
        masks = (mask,)
        fill = blk.scalar(float(np.finfo(spec.dtype).min), "mask_fill") \
            if spec.mask.startswith("where") else None
        if spec.mask == "where_bool":
            scores = blk.node("Where", [mask, scores, fill], "scores.masked")
        elif spec.mask == "where_bool_inv":
            scores = blk.node("Where", [mask, fill, scores], "scores.masked")
        else:
            scores = blk.node("Add", [scores, mask], "scores.masked")
    if three:
        scores = blk.reshape(scores, [blk.batch.times(heads), blk.q_len, blk.kv_len], (),
                             "scores.batch_heads")
    return scores, masks


def _relative_bias(blk: _Block, scores: str) -> str:
    """``table[clip(j - i, -M, M) + M]`` as ``[1,H,Sq,Sk]``, positions from ``Range`` over the
    scores' lengths (T5-style buckets reduced to a clip)."""
    spec, b, m = blk.spec, blk.b, REL_BIAS_DISTANCE
    table = b.random((2 * m + 1, spec.num_heads), spec.dtype, 0.5)
    blk.rel_bias = table
    stored = b.initializer(blk.hint("rel_bias.table"), table.astype(spec.dtype))
    shape = blk.node("Shape", [scores], "rel_bias.shape")
    positions = []
    for axis, label in ((2, "q"), (3, "k")):
        length = blk.node("Gather", [shape, b.const(axis)], f"rel_bias.{label}_len", axis=0)
        positions.append(blk.node("Range", [b.const(0), length, b.const(1)],
                                  f"rel_bias.{label}_pos"))
    rel = blk.node("Sub", [blk.node("Unsqueeze", [positions[1], b.const([0])], "rel_bias.k_row"),
                           blk.node("Unsqueeze", [positions[0], b.const([1])], "rel_bias.q_col")],
                   "rel_bias.distance")
    index = blk.node("Add", [blk.node("Clip", [rel, b.const(-m), b.const(m)], "rel_bias.clip"),
                             b.const(m)], "rel_bias.index")
    bias = blk.node("Gather", [stored, index], "rel_bias.gather", axis=0)
    bias = blk.node("Transpose", [bias], "rel_bias.heads_first", perm=[2, 0, 1])
    return blk.node("Unsqueeze", [bias, b.const([0])], "rel_bias")


def _causal(q_len: int, kv_len: int) -> np.ndarray:
    """-inf above the diagonal, aligned to the last key so every row keeps key 0."""
    offset = max(kv_len - q_len, 0)
    return np.where(np.triu(np.ones((q_len, kv_len), dtype=bool), k=1 + offset), -np.inf, 0.0)


def _merge(blk: _Block, context: str) -> str:
    """``[B,H,Sq,D]`` (or ``[B*H,Sq,D]``) back to ``[B,Sq,inner]``."""
    spec = blk.spec
    if spec.head_layout == "time_major":  # [B*H,Sq,D] -> [Sq,B*H,D] -> [Sq,B,inner]
        context = blk.node("Transpose", [context], "merge.time_major", perm=[1, 0, 2])
        return blk.reshape(context, [blk.q_len, blk.batch, spec.inner], (0,), "merge")
    if spec.head_layout == "3d":
        context = blk.reshape(context, [blk.batch, spec.num_heads, blk.q_len, spec.head_dim], (),
                              "merge.unbatch_heads")
    context = blk.node("Transpose", [context], "merge.transpose", perm=[0, 2, 1, 3])
    return blk.reshape(context, [blk.batch, blk.q_len, spec.inner], (0, 1), "merge")


def _truth(blk: _Block, merged: str, result: str, masks: tuple[str, ...]) -> BlockTruth:
    spec, b = blk.spec, blk.b
    if blk.context is None:
        k_source = v_source = blk.query
    elif isinstance(blk.context, str):
        k_source = v_source = blk.context
    else:
        k_source, v_source = blk.context
    sources = tuple(dict.fromkeys((k_source, v_source)))
    deps = frozenset().union(*(b.deps[s] for s in sources))
    static: tuple[str, ...] = ()
    if not deps:
        kv_kind = "constant"
    elif spec.kind == "cross" and all(s in b.input_kinds for s in sources):
        kv_kind, static = "graph_input", sources
    else:
        kv_kind = "internal"
    scale = 1.0 if spec.scale in ("none", "folded") else spec.head_dim ** -0.5
    q_source = blk.query
    if spec.rope != "none":
        # RoPE is no part of the block: Q and K start at the rotated heads (a scale applied
        # before the rotation is in them already); the kind is still decided by provenance.
        q_source, k_source = blk.rope["q_out"], blk.rope["k_out"]
        if spec.scale in ("mul_q", "folded"):
            scale = 1.0
    return BlockTruth(
        name=blk.prefix, kind=spec.kind, num_heads=spec.num_heads, head_dim=spec.head_dim,
        scale=scale, q_source=q_source, k_source=k_source, v_source=v_source,
        static_inputs=static, kv_source_kind=kv_kind, output=merged, result=result,
        mask_inputs=masks, spec=spec)


# --- numpy reference ---------------------------------------------------------------------------

def _add_reference(blk: _Block, merged: str, result: str, masks: tuple[str, ...]) -> None:
    spec, weights, query, context = blk.spec, blk.weights, blk.query, blk.context
    pasts, presents, rope, rel_bias = dict(blk.pasts), dict(blk.presents), blk.rope, blk.rel_bias

    def step(env: dict[str, np.ndarray]) -> None:
        if context is None or isinstance(context, str):
            kv = None if context is None else env[context]
        else:
            kv = (env[context[0]], env[context[1]])
        extra = {"past_" + role: env[name] for role, name in pasts.items()}
        if spec.rope != "none":
            extra["cos"], extra["sin"] = _np_rope_tables(spec, rope, env, env[query].shape[1])
        extra["rel_bias"] = rel_bias
        out = _np_attention(spec, weights, env[query], kv, [env[m] for m in masks], extra)
        env[merged], env[result] = out["merged"], out["result"]
        for role, name in presents.items():
            env[name] = out["present_" + role]

    blk.b.reference(step)


def _np_rope_tables(spec: AttentionSpec, rope: dict, env: dict, length: int):
    """cos/sin rows as the graph reads them: by ``position_ids`` or the first ``length``."""
    if spec.rope_table == "position_ids":
        ids = env["position_ids"]
        return rope["cos_table"][ids][:, None], rope["sin_table"][ids][:, None]
    return rope["cos_table"][:length], rope["sin_table"][:length]


def _np_rotate(spec: AttentionSpec, x: np.ndarray) -> np.ndarray:
    if spec.rope == "rotate_half":
        half = x.shape[-1] // 2
        return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return np.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)


def _np_attention(spec: AttentionSpec, w: _Weights, xq: np.ndarray, kv, masks: list,
                  extra: dict | None = None) -> dict[str, np.ndarray]:
    """softmax(scale * Q K^T + mask) V with heads, in float64: ``merged`` (the heads merged,
    or ``[B,H,Sq,D]`` for an Einsum merge), ``result`` and the ``present_*`` K/V of a cache."""
    extra = extra or {}
    heads, dim = spec.num_heads, spec.head_dim
    batch, q_len, _ = xq.shape

    def split(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        y = x @ weight + (0.0 if bias is None else bias)
        return y.reshape(x.shape[0], x.shape[1], -1, dim).transpose(0, 2, 1, 3)

    q = split(xq, w.wq, w.bq)
    if spec.projection == "none":
        k, v = _np_kv_inputs(spec, kv[0], kv[1], batch)
    else:
        source = xq if kv is None else kv
        k, v = split(source, w.wk, w.bk), split(source, w.wv, w.bv)
    out: dict[str, np.ndarray] = {}
    if spec.rope != "none":
        cos, sin = extra["cos"], extra["sin"]
        q = q * cos + _np_rotate(spec, q) * sin
        k = k * cos + _np_rotate(spec, k) * sin
    if spec.kv_cache:
        k = np.concatenate([extra["past_key"], k], axis=2)
        v = np.concatenate([extra["past_value"], v], axis=2)
        out["present_key"], out["present_value"] = k, v
    k, v = np.repeat(k, spec.kv_groups, axis=1), np.repeat(v, spec.kv_groups, axis=1)
    scale = 1.0 if spec.scale == "none" else dim ** -0.5
    scores = (q @ k.swapaxes(-1, -2)) * scale
    if spec.mask == "add_causal_const":  # written apart from _causal so neither can hide a bug
        rows, cols = np.indices(scores.shape[-2:])
        scores = np.where(cols > rows + max(k.shape[-2] - q_len, 0), -np.inf, scores)
    elif spec.mask == "where_bool":
        scores = np.where(masks[0], scores, float(np.finfo(spec.dtype).min))
    elif spec.mask == "where_bool_inv":
        scores = np.where(masks[0], float(np.finfo(spec.dtype).min), scores)
    elif spec.mask == "add_rel_bias":
        rows, cols = np.indices(scores.shape[-2:])
        index = np.clip(cols - rows, -REL_BIAS_DISTANCE, REL_BIAS_DISTANCE) + REL_BIAS_DISTANCE
        scores = scores + extra["rel_bias"][index].transpose(2, 0, 1)[None]
    elif masks:
        scores = scores + masks[0]
    context = _np_softmax(scores) @ v
    merged = context.transpose(0, 2, 1, 3).reshape(batch, q_len, heads * dim)
    out["result"] = merged if not spec.out_projection else \
        merged @ w.wo + (0.0 if w.bo is None else w.bo)
    if spec.head_layout == "time_major":
        merged = merged.transpose(1, 0, 2)
    out["merged"] = context if spec.merge == "einsum" else merged
    return out


def _np_kv_inputs(spec: AttentionSpec, key: np.ndarray, value: np.ndarray, batch: int):
    """The ``projection="none"`` K/V inputs as ``[B,H,Sk,D]``."""
    heads, dim = spec.num_heads, spec.head_dim
    three = spec.head_layout == "3d"
    v = value.reshape(batch, heads, -1, dim) if three else value
    if spec.k_transpose == "separate":
        k = key.reshape(batch, heads, -1, dim) if three else key
    elif spec.k_transpose == "fused":
        k = key.transpose(0, 2, 1, 3)
    else:
        k = (key.reshape(batch, heads, dim, -1) if three else key).swapaxes(-1, -2)
    return k, v


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray) -> np.ndarray:
    centered = x - x.mean(axis=-1, keepdims=True)
    return centered / np.sqrt((centered ** 2).mean(axis=-1, keepdims=True) + 1e-5) * gamma + beta


# --- whole models ------------------------------------------------------------------------------

_SIZE_NAMES = ("batch", "q_len", "kv_len")


def attention_model(spec: AttentionSpec, *, self_spec: AttentionSpec | None = None,
                    layers: int = 1, context_kind: str | None = None, batch: int = 2,
                    q_len: int = 5, kv_len: int = 7, embed: int | None = None,
                    context_embed: int | None = None, seed: int = 0, opset: int = 18,
                    dynamic: bool = True) -> BuiltModel:
    """A runnable model of ``layers`` layers of ``spec`` blocks, with ground truth and reference.

    Input ``hidden_states[B,Sq,embed]`` (``embed`` defaults to ``num_heads*head_dim``), output
    ``output``. Every block is followed by a residual Add and LayerNormalization (post-norm);
    with ``self_spec`` each layer is decoder style: a ``self_spec`` self-attention block, then
    the ``spec`` cross-attention block. ``context_kind`` (cross only) says where K/V come from:

    - ``input`` (default): graph input ``encoder_hidden_states[B,Sk,context_embed]``;
    - ``constant``: an initializer ``latents[1,Sk,E]`` Expanded to the query's batch;
    - ``encoded``: ``encoder_input`` through LayerNorm + MatMul + Add. K/V still depend on
      nothing but that input, so the truth is ``graph_input`` with it as the static input;
    - ``internal``: ``encoder_input`` through an encoder self-attention layer (a block of its
      own, listed first), so K/V are computed through attention.

    ``projection="none"`` reads K/V from inputs ``cross_key_<layer>``/``cross_value_<layer>``.
    ``batch``/``q_len``/``kv_len`` are the sample sizes. With ``dynamic`` they are symbolic dims
    (``batch``, ``q_len``, ``kv_len``) except where the spelling needs them static (constant
    causal masks, ``const`` targets with two unknowns): then the lengths are pinned, and
    :attr:`BuiltModel.dynamic` says which stayed dynamic.
    """
    embed = embed or spec.inner
    context_embed = context_embed or embed
    _check_model_options(spec, self_spec, layers, context_kind, embed, context_embed)
    sizes = {"batch": batch, "q_len": q_len, "kv_len": kv_len}
    if any(s is not None and s.kv_cache for s in (spec, self_spec)):
        sizes["past_len"] = PAST_LEN
    attempts = [(*_SIZE_NAMES, "past_len"), ("batch",)] if dynamic else [()]
    for i, symbolic in enumerate(attempts):
        try:
            b, blocks = _attention_graph(spec, self_spec, layers, context_kind, sizes, symbolic,
                                         embed, context_embed, seed, opset)
        except StaticShapeRequired:
            if i == len(attempts) - 1:
                raise
            continue
        if spec.kind == "self":  # no context: kv_len means nothing here
            sizes.pop("kv_len")
        return b.finish(blocks, sizes, seed)
    raise AssertionError("unreachable")


def _check_model_options(spec, self_spec, layers, context_kind, embed, context_embed) -> None:
    problems = []
    if not isinstance(layers, int) or layers < 1:
        problems.append(f"layers={layers!r} must be a positive int")
    if self_spec is not None:
        if self_spec.kind != "self":
            problems.append(f"self_spec must have kind='self' (got {self_spec.kind!r})")
        if spec.kind != "cross":
            problems.append("self_spec builds decoder layers (self, then cross), so spec.kind "
                            f"must be 'cross' (got {spec.kind!r})")
        if self_spec.dtype != spec.dtype:
            problems.append(f"self_spec dtype {self_spec.dtype!r} differs from spec dtype "
                            f"{spec.dtype!r}")
    if context_kind is not None:
        if context_kind not in CONTEXT_KINDS:
            problems.append(f"context_kind={context_kind!r} is not one of {CONTEXT_KINDS}")
        if spec.kind == "self":
            problems.append(f"context_kind={context_kind!r} needs kind='cross' (got 'self')")
        if context_kind == "initializer" and spec.batched:
            problems.append("context_kind='initializer' broadcasts a batch-1 context, which "
                            f"needs head_layout='4d' (got {spec.head_layout!r})")
        if spec.projection == "none" and context_kind != "input":
            problems.append("projection='none' reads K/V from graph inputs, so context_kind "
                            f"must be 'input' (got {context_kind!r})")
    widths = [(spec, embed, "spec"), (self_spec, embed, "self_spec")]
    if context_kind == "internal":
        widths.append((_encoder_spec(spec, self_spec), context_embed, "the encoder block"))
    for block, width, name in widths:
        if block is not None and not block.out_projection and block.inner != width:
            problems.append(f"{name} has out_projection=False, so it yields inner="
                            f"{block.inner} features, but its residual needs {width}")
    if problems:
        raise ValueError("invalid attention_model options: " + "; ".join(problems))


def _encoder_spec(spec: AttentionSpec, self_spec: AttentionSpec | None) -> AttentionSpec:
    """The self-attention spelling of the ``internal`` context's encoder (unmasked)."""
    base = self_spec or replace(spec, kind="self", projection=(
        "matmul_bias" if spec.projection == "none" else spec.projection))
    return replace(base, mask="none", rope="none", kv_cache=False)


def _attention_graph(spec, self_spec, layers, context_kind, sizes, symbolic, embed,
                     context_embed, seed, opset) -> tuple[GraphBuilder, list[BlockTruth]]:
    b = GraphBuilder("attention_model", seed=seed, opset=opset)
    batch, q_len, kv_len = (n if n in symbolic else sizes[n] for n in _SIZE_NAMES)
    past_len = "past_len" if "past_len" in symbolic else PAST_LEN
    h = b.input("hidden_states", (batch, q_len, embed), spec.dtype)
    blocks: list[BlockTruth] = []
    context, fixed = None, None
    if spec.kind == "cross" and spec.projection != "none":
        context, fixed = _context(b, spec, self_spec, context_kind or "input", batch, kv_len,
                                  sizes["kv_len"], context_embed, blocks)
    role = "cross_attn" if spec.kind == "cross" else "self_attn"
    for layer in range(layers):
        if self_spec is not None:
            h = _residual_block(b, self_spec, h, None, f"layers.{layer}.self_attn", blocks,
                                past_len=past_len)
        if spec.projection == "none":
            key_shape, value_shape = kv_input_shapes(spec, batch, kv_len)
            context = (b.input(f"cross_key_{layer}", key_shape, spec.dtype),
                       b.input(f"cross_value_{layer}", value_shape, spec.dtype))
        h = _residual_block(b, spec, h, context, f"layers.{layer}.{role}", blocks, fixed,
                            out="output" if layer == layers - 1 else None, past_len=past_len)
    b.output("output", (batch, q_len, embed))
    return b, blocks


def _context(b: GraphBuilder, spec, self_spec, kind: str, batch: Dim, kv_len: Dim,
             kv_size: int, width: int, blocks: list[BlockTruth]):
    """The cross-attention context tensor and the (kv_source_kind, static_inputs) it implies."""
    dtype = spec.dtype
    if kind == "input":
        return b.input("encoder_hidden_states", (batch, kv_len, width), dtype), None
    if kind == "constant":  # learned latents, broadcast over the batch like latents.expand(B,-1,-1)
        latents = b.random((1, kv_size, width), dtype, 1.0)
        name = b.initializer("latents", latents.astype(dtype))
        target = _target(b, "computed", [_Dim("hidden_states", 0, batch), 1, 1], (),
                         "latents.expand", {})
        context = b.describe(b.node("Expand", [name, target], "latents.expand"),
                             (batch, kv_size, width), dtype)
        b.reference(lambda env: env.__setitem__(context, np.broadcast_to(
            latents, (env["hidden_states"].shape[0], *latents.shape[1:]))))
        return context, None
    if kind == "initializer":  # K/V projections read a [1,Sk,E] constant, broadcast in the core
        latents = b.random((1, kv_size, width), dtype, 1.0)
        name = b.describe(b.initializer("context", latents.astype(dtype)), (1, kv_size, width),
                          dtype)
        b.reference(lambda env: env.__setitem__(name, latents))
        return name, None
    x = b.input("encoder_input", (batch, kv_len, width), dtype)
    if kind == "encoded":
        return _dense(b, _layer_norm(b, x, "encoder.norm"), width, "encoder.proj"), \
            ("graph_input", (x,))
    context = _residual_block(b, _encoder_spec(spec, self_spec), x, None, "encoder.self_attn",
                              blocks)
    return context, ("internal", (x,))


def _residual_block(b: GraphBuilder, spec: AttentionSpec, h: str, context, prefix: str,
                    blocks: list[BlockTruth], fixed: tuple | None = None,
                    out: str | None = None, past_len: Dim = PAST_LEN) -> str:
    """``LayerNorm(h + attention(h, context))``; appends the block's truth to ``blocks``."""
    truth = add_attention(b, spec, h, context, prefix, past_len)
    if fixed is not None:
        truth = replace(truth, kv_source_kind=fixed[0], static_inputs=fixed[1])
    blocks.append(truth)
    total = b.describe(b.node("Add", [h, truth.result], f"{prefix}.residual"),
                       b.shapes[h], spec.dtype)
    _ref(b, total, np.add, h, truth.result)
    return _layer_norm(b, total, f"{prefix}.norm", out)


def _layer_norm(b: GraphBuilder, x: str, hint: str, out: str | None = None) -> str:
    dtype, width = b.dtypes[x], b.shapes[x][-1]
    gamma = (1.0 + b.random((width,), dtype, 0.1)).astype(dtype).astype(np.float64)
    beta = b.random((width,), dtype, 0.1)
    y = b.node("LayerNormalization", [x, b.initializer(f"{hint}.weight", gamma.astype(dtype)),
                                      b.initializer(f"{hint}.bias", beta.astype(dtype))],
               hint, outputs=[out] if out else 1, axis=-1, epsilon=1e-5)
    _ref(b, y, lambda v: _np_layer_norm(v, gamma, beta), x)
    return b.describe(y, b.shapes[x], dtype)


def _dense(b: GraphBuilder, x: str, width: int, hint: str, act: str | None = None,
           out: str | None = None) -> str:
    """``x @ W + bias`` (then ``act``) on the last axis, with its reference step."""
    dtype, fan_in = b.dtypes[x], b.shapes[x][-1]
    weight = b.random((fan_in, width), dtype, fan_in ** -0.5)
    bias = b.random((width,), dtype, 0.1)
    y = b.node("MatMul", [x, b.initializer(f"{hint}.weight", weight.astype(dtype))], hint)
    last = {"outputs": [out]} if out else {}
    y = b.node("Add", [y, b.initializer(f"{hint}.bias", bias.astype(dtype))], f"{hint}.add_bias",
               **({} if act else last))
    fns = {None: lambda v: v, "Relu": lambda v: np.maximum(v, 0.0), "Softmax": _np_softmax}
    if act is not None:
        y = b.node(act, [y], f"{hint}.{act.lower()}", **last,
                   **({"axis": -1} if act == "Softmax" else {}))
    _ref(b, y, lambda v: fns[act](v @ weight + bias), x)
    return b.describe(y, (*b.shapes[x][:-1], width), dtype)


def _ref(b: GraphBuilder, out: str, fn: Callable[..., np.ndarray], *inputs: str) -> None:
    b.reference(lambda env: env.__setitem__(out, fn(*(env[name] for name in inputs))))


# --- look-alikes without attention ---------------------------------------------------------------

def classifier_model(*, batch: int = 2, features: int = 16, hidden: int = 32, classes: int = 10,
                     seed: int = 0, dynamic: bool = True) -> BuiltModel:
    """An MLP with a Softmax classifier head: ``softmax(relu(x W1 + b1) W2 + b2)``. No attention.

    Input ``features[B, features]``, output ``probs[B, classes]``.
    """
    b = GraphBuilder("classifier", seed=seed)
    x = b.input("features", ("batch" if dynamic else batch, features))
    h = _dense(b, x, hidden, "fc1", "Relu")
    probs = _dense(b, h, classes, "head", "Softmax", out="probs")
    b.output(probs, b.shapes[probs])
    return b.finish([], {"batch": batch}, seed)


def softmax_between_weights_model(*, batch: int = 2, seq: int = 5, embed: int = 16,
                                  hidden: int = 8, seed: int = 0,
                                  dynamic: bool = True) -> BuiltModel:
    """``softmax(x W1) W2``: a Softmax between two *weight* MatMuls, which is not attention.

    Input ``x[B, S, embed]``, output ``y[B, S, embed]``; W1 is ``[embed, hidden]``.
    """
    b = GraphBuilder("softmax_between_weights", seed=seed)
    x = b.input("x", ("batch" if dynamic else batch, "seq" if dynamic else seq, embed))
    w1 = b.random((embed, hidden), "float32", embed ** -0.5)
    w2 = b.random((hidden, embed), "float32", hidden ** -0.5)
    scores = b.node("MatMul", [x, b.initializer("w1", w1.astype(np.float32))], "gate")
    probs = b.node("Softmax", [scores], "gate.softmax", axis=-1)
    y = b.node("MatMul", [probs, b.initializer("w2", w2.astype(np.float32))], "mix", outputs=["y"])
    _ref(b, y, lambda v: _np_softmax(v @ w1) @ w2, x)
    b.output(y, b.shapes[x], "float32")
    return b.finish([], {"batch": batch, "seq": seq}, seed)


def cnn_model(*, batch: int = 2, channels: int = 3, size: int = 8, filters: int = 4,
              classes: int = 5, seed: int = 0, dynamic: bool = True) -> BuiltModel:
    """Conv -> Relu -> MaxPool -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm.

    No Softmax anywhere. Input ``image[B, channels, size, size]`` (``size`` even), output
    ``logits[B, classes]``.
    """
    if size % 2:
        raise ValueError(f"size={size} must be even (a 2x2 max pool halves it)")
    b = GraphBuilder("cnn", seed=seed)
    x = b.input("image", ("batch" if dynamic else batch, channels, size, size))
    h = _conv_relu(b, x, channels, filters, "conv1")
    pooled = b.node("MaxPool", [h], "pool", kernel_shape=[2, 2], strides=[2, 2])
    _ref(b, pooled, lambda v: v.reshape(*v.shape[:2], size // 2, 2, size // 2, 2).max((3, 5)), h)
    h = _conv_relu(b, pooled, filters, filters, "conv2")
    gap = b.node("GlobalAveragePool", [h], "gap")
    flat = b.node("Flatten", [gap], "flatten", axis=1)
    _ref(b, flat, lambda v: v.mean(axis=(2, 3)), h)
    weight = b.random((classes, filters), "float32", filters ** -0.5)
    bias = b.random((classes,), "float32", 0.1)
    logits = b.node("Gemm", [flat, b.initializer("fc.weight", weight.astype(np.float32)),
                             b.initializer("fc.bias", bias.astype(np.float32))], "fc",
                    outputs=["logits"], transB=1)
    _ref(b, logits, lambda v: v @ weight.T + bias, flat)
    b.output(logits, (b.shapes[x][0], classes), "float32")
    return b.finish([], {"batch": batch}, seed)


def _conv_relu(b: GraphBuilder, x: str, c_in: int, c_out: int, hint: str) -> str:
    weight = b.random((c_out, c_in, 3, 3), "float32", (9 * c_in) ** -0.5)
    bias = b.random((c_out,), "float32", 0.1)
    y = b.node("Conv", [x, b.initializer(f"{hint}.weight", weight.astype(np.float32)),
                        b.initializer(f"{hint}.bias", bias.astype(np.float32))], hint,
               kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    y = b.node("Relu", [y], f"{hint}.relu")
    _ref(b, y, lambda v: np.maximum(_np_conv3x3(v, weight, bias), 0.0), x)
    return y


def _np_conv3x3(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """A stride-1, pad-1 3x3 convolution via sliding windows."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    return np.einsum("bchwij,ocij->bohw", windows, weight) + bias[None, :, None, None]
