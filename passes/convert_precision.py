"""``convert-precision``: the model computes in fp16 or bf16, fp32 kept only where it is needed.

TensorRT 11 builds strongly typed networks only: every layer runs in the type the ONNX file
gives it, so the precision step happens here, in the graph. Each node gets a precision (the
half type, or fp32 with a reason), each float tensor the type its producer computes in, and a
Cast goes wherever a reader computes in another type::

    x(fp32 input) -> Cast(half) -> MatMul(half W) -> ... -> LayerNorm(fp32) -> ... -> Cast(fp32) -> y

fp32 stays where half precision breaks the result, and only there:

* ``normalization``: LayerNormalization, RMSNormalization, GroupNormalization,
  InstanceNormalization (their mean and variance reduce many values; ``x^2`` overflows fp16
  past 256);
* ``norm-statistics``: the same written out (``ReduceMean(Pow(x - mean, 2))``, ``rsqrt``, the
  normalising Div/Mul): the statistics chain, not the weight and bias after it;
* ``softmax``: a Softmax that no attention core or fused node owns (its sum accumulates in the
  type it runs in); the Softmax of an attention core stays half so the core fuses;
* ``index-arithmetic``: float values computed from integers only (positions, rotary angles,
  masks built from bool): fp16 holds integers exactly only up to 2048, and a mask's ``finfo.min``
  does not fit; they join the half graph through a saturating Cast;
* ``no-half-kernel``: the op's ONNX schema (at the model's opset) or TensorRT's parser has no
  kernel in the half type; ``no-schema``: an op the ONNX schemas do not know;
* ``escape``: an attention block the audit (:mod:`xattn_compiler.precision_audit`) moved to
  fp32 accumulation (Cast Q/K/V to fp32 around the Attention and the output back; TensorRT
  11.3+); a block it moved to bf16 runs in bf16 between Casts instead.

Graph inputs and outputs stay fp32 (Casts at the boundary) unless ``convert-io``; integer and
bool tensors are never touched; a ``Cast(to=float)`` inside the graph is retargeted to the half
type where its reader computes in half. Float constants are converted once, fp16 clipping values
beyond +-65504 (reported). Weights held as stubs (detached or lazily read external data) are
converted one at a time into the collecting store, so the fp32 and half copies of the whole
model are never both in memory. If/Loop/Scan bodies convert with their node: their float inputs
and outputs are half.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from xattn_compiler.io import default_opset
from xattn_compiler.ir import fresh_name, infer_shapes, iter_graph_protos
from xattn_compiler.passmanager import Option, Pass, PassResult
from xattn_compiler.weights import _COLLECTING, _InMemory, is_stub, values_of

log = logging.getLogger(__name__)

FLOAT, FLOAT16, BFLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16
HALF_TYPES = {"fp16": FLOAT16, "bf16": BFLOAT16}
FP16_MAX = 65504.0
_TYPE_STR = {FLOAT: "tensor(float)", FLOAT16: "tensor(float16)", BFLOAT16: "tensor(bfloat16)"}
_SHORT = {FLOAT: "fp32", FLOAT16: "fp16", BFLOAT16: "bf16"}

_NORM_OPS = frozenset({"LayerNormalization", "RMSNormalization", "GroupNormalization",
                       "InstanceNormalization", "LpNormalization", "MeanVarianceNormalization",
                       "SimplifiedLayerNormalization", "SkipLayerNormalization",
                       "SkipSimplifiedLayerNormalization"})
_SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})
_ATTENTION_OPS = frozenset({("", "Attention"), ("com.microsoft", "MultiHeadAttention"),
                            ("com.microsoft", "GroupQueryAttention"),
                            ("com.microsoft", "Attention")})
_CONTROL_OPS = frozenset({"If", "Loop", "Scan"})
# TensorRT's ONNX parser (operators.md, 10.15): ops with no fp16 or no bf16 kernel.
_TRT_FP32_ONLY = frozenset({"STFT"})
_TRT_NO_BF16 = frozenset({"BlackmanWindow", "HammingWindow", "HannWindow", "DeformConv",
                          "GridSample", "Mish", "NonMaxSuppression", "NonZero", "RoiAlign"})
# Inputs whose type never has to match the node's: the op reads any type.
_ANY_TYPE_INPUTS = {"Cast": (0,), "CastLike": (0, 1), "Shape": (0,), "Size": (0,),
                    "EyeLike": (0,)}
# Statistic steps of a written-out norm after the reduction.
_STAT_STEPS = frozenset({"Add", "Sqrt", "Reciprocal", "Div", "Mul", "Pow", "Cast", "Sub"})
# Outputs bounded by 1 in magnitude: no saturation needed before a fp16 Cast.
_BOUNDED_OPS = frozenset({"Sin", "Cos", "Tanh", "Sigmoid", "Softmax"})
# Table lookups read learned or precomputed values by index (an embedding, a rotary table cut
# to the sequence length): the table's values, not index arithmetic.
_LOOKUPS = frozenset({"Gather", "GatherElements", "GatherND", "Slice"})
_INT_TYPES = frozenset({TensorProto.INT64, TensorProto.INT32, TensorProto.INT16,
                        TensorProto.INT8, TensorProto.UINT8, TensorProto.UINT16,
                        TensorProto.UINT32, TensorProto.UINT64, TensorProto.BOOL})


class ConvertPrecision(Pass):
    """Weights and activations in fp16 or bf16; fp32 only where a rule says why."""

    name = "convert-precision"
    description = ("convert weights and activations to fp16/bf16, keeping fp32 for norms, "
                   "softmax outside attention cores, index arithmetic and ops with no half kernel")
    options = (
        Option("precision", str, "fp16", "fp16 or bf16"),
        Option("convert-io", bool, False, "also convert float graph inputs and outputs"),
        Option("escapes", tuple, (),
               "attention nodes (by output name) as NAME:fp32 or NAME:bf16, chosen by the audit"),
        Option("audit", bool, False,
               "measure every attention block on sample inputs, escape those that overflow or "
               "fail the precision's tolerance"),
        Option("inputs", str, "", "NPZ of sample inputs for the audit (default: drawn)"),
        Option("seed", int, 0, "seed of the drawn audit inputs"),
    )
    # After fusion: a fused core converts whole (one Attention node with half Q/K/V), and the
    # matcher never has to see the Casts this pass adds.
    run_after = ("fuse-attention", "guard-precision")
    # Both half types under the registered-pass properties (bf16 rounds 8x coarser).
    property_variants = ({"precision": "fp16"}, {"precision": "bf16"})

    def run(self, model: onnx.ModelProto) -> PassResult:
        precision = self.option("precision")
        if precision not in HALF_TYPES:
            from xattn_compiler.errors import InputError

            raise InputError(f"convert-precision: unknown precision {precision!r} (fp16 or bf16)")
        escapes = parse_escapes(self.option("escapes"))
        audit, skipped = None, None
        if self.option("audit"):
            audit, skipped = _audit(model, precision, self.option("inputs") or None,
                                    self.option("seed"))
        if audit is not None:
            escapes = {**parse_escapes(audit.escapes()), **escapes}
        out, report = _Converter(model, HALF_TYPES[precision], self.option("convert-io"),
                                 escapes).run()
        if audit is not None:
            out, report = self._check(model, out, report, audit, escapes)
        elif skipped:
            report.audit = {"skipped": skipped}
        counts = {"nodes_converted": report.nodes_converted,
                  "kept_fp32": sum(report.kept.values()),
                  "casts_inserted": report.casts,
                  "constants_converted": report.constants,
                  "constants_clipped": len(report.clipped),
                  "attention_half": report.attention.get("half", 0),
                  "attention_escaped": report.attention.get("fp32", 0)
                  + report.attention.get("bf16", 0)}
        return PassResult(out, report.changed, counts, report.details(precision))


    def check_equivalent(self, reference: onnx.ModelProto, candidate: onnx.ModelProto,
                         inputs=None):
        """What semantics preservation means for this pass (the property tests use it): not
        bitwise, but the outputs within the precision's stated tolerance of the fp32 original
        (:func:`~xattn_compiler.precision_audit.verify_precision`, half kernels emulated)."""
        from xattn_compiler.precision_audit import verify_precision

        return verify_precision(reference, candidate, self.option("precision"), inputs=inputs,
                                seed=self.option("seed"))

    def _check(self, model, out, report, audit, escapes):
        """Each block's output against fp32; a failing one gets fp32 accumulation, once."""
        from xattn_compiler.precision_audit import check_blocks, sample_feeds

        precision = self.option("precision")
        names = [block.name for block in audit.blocks]
        feeds = sample_feeds(model, self.option("inputs") or None, self.option("seed"))
        checked = check_blocks(model, out, feeds, names, audit.tolerance)
        failed = [name for name, row in checked.items()
                  if not row["ok"] and escapes.get(name) != FLOAT]
        if failed:
            log.info("convert-precision: blocks over tolerance, fp32 accumulation: %s", failed)
            escapes = {**escapes, **dict.fromkeys(failed, FLOAT)}
            out, report = _Converter(model, HALF_TYPES[precision], self.option("convert-io"),
                                     escapes).run()
            checked.update(check_blocks(model, out, feeds, failed, audit.tolerance))
        report.audit = {**audit.to_dict(), "block_check": checked,
                        "escaped_after_check": failed}
        return out, report


def _audit(model, precision, inputs, seed):
    """The audit, or None and the reason when ONNX Runtime cannot run the model on drawn
    inputs (plugin nodes, say): conversion goes on without escapes and the report says so.
    Inputs the user gave that do not fit stay an error."""
    from xattn_compiler.errors import InputError
    from xattn_compiler.precision_audit import audit_model

    try:
        return audit_model(model, precision, inputs, seed=seed), None
    except InputError as exc:
        if inputs is not None:
            raise
        log.warning("convert-precision: no audit (%s)", exc)
        return None, str(exc)


def parse_escapes(items) -> dict[str, int]:
    """``NAME:fp32`` / ``NAME:bf16`` items -> attention output name -> type."""
    out: dict[str, int] = {}
    for item in items:
        name, _, kind = str(item).rpartition(":")
        types = {"fp32": FLOAT, "bf16": BFLOAT16}
        if not name or kind not in types:
            from xattn_compiler.errors import InputError

            raise InputError(f"convert-precision: escape {item!r} is not NAME:fp32 or NAME:bf16")
        out[name] = types[kind]
    return out


@dataclass
class _Report:
    nodes_converted: int = 0
    kept: Counter = field(default_factory=Counter)
    kept_nodes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    casts: int = 0
    constants: int = 0
    clipped: list[dict] = field(default_factory=list)
    attention: Counter = field(default_factory=Counter)
    escaped: dict[str, str] = field(default_factory=dict)
    changed: bool = False
    audit: dict | None = None

    def details(self, precision: str) -> dict:
        return {"precision": precision,
                "kept_fp32": dict(sorted(self.kept.items())),
                "kept_fp32_nodes": {k: v[:20] for k, v in sorted(self.kept_nodes.items())},
                "constants_clipped": self.clipped[:20],
                "attention": dict(self.attention), "escapes": self.escaped,
                **({"audit": self.audit} if self.audit is not None else {})}


# --- analysis: the precision of each node ---------------------------------------------------

@dataclass
class _Plan:
    """Node precision (by id of the NodeProto) and the reason for each fp32 node."""

    precision: dict[int, int] = field(default_factory=dict)
    reason: dict[int, str] = field(default_factory=dict)
    derived: set[str] = field(default_factory=set)  # index-arithmetic tensors (fp32)


class _Converter:
    def __init__(self, model: onnx.ModelProto, half: int, convert_io: bool,
                 escapes: dict[str, int]):
        self.model, self.half, self.convert_io, self.escapes = model, half, convert_io, escapes
        self.opset = default_opset(model) or 18
        self.report = _Report()
        self._schemas: dict = {}

    def run(self) -> tuple[onnx.ModelProto, _Report]:
        typed = infer_shapes(_light_copy(self.model), in_place=True)
        self.types = _elem_types(typed.graph)
        self.last_dims = _last_dims(typed.graph)
        cores, fused = _attention_nodes(self.model)
        self.core_softmax, self.fused = cores, fused
        out = _light_copy(self.model)
        # One namespace for the whole model: Casts made in sibling bodies (both If branches
        # casting the same outer weight) must not define the same name twice.
        self.names = {n for g in iter_graph_protos(out.graph) for node in g.node
                      for n in node.output}
        self.names |= {v.name for g in iter_graph_protos(out.graph) for v in g.input}
        self.names |= {t.name for g in iter_graph_protos(out.graph) for t in g.initializer}
        self._graph(out.graph, outer={}, renames={}, top=True)
        if self.report.changed:
            try:
                infer_shapes(out, in_place=True)
            except Exception as exc:  # types are set by hand; shapes are a bonus
                log.debug("shape inference after convert-precision: %s", exc)
        return out, self.report

    # -- per node ---------------------------------------------------------------------------

    def _schema(self, node: onnx.NodeProto):
        key = (node.op_type, node.domain)
        if key not in self._schemas:
            try:
                version = self.opset if node.domain in ("", "ai.onnx") else 1
                self._schemas[key] = onnx.defs.get_schema(node.op_type, version, node.domain)
            except Exception:
                self._schemas[key] = None
        return self._schemas[key]

    def _formal(self, node: onnx.NodeProto, index: int, is_input: bool) -> set[str] | None:
        """The type strings formal ``index`` allows; None when the schema does not say."""
        schema = self._schema(node)
        if schema is None:
            return None
        formals = schema.inputs if is_input else schema.outputs
        if not formals:
            return None
        last = formals[-1]
        if index >= len(formals) and last.option != onnx.defs.OpSchema.FormalParameterOption.Variadic:
            return None
        formal = formals[min(index, len(formals) - 1)]
        for constraint in schema.type_constraints:
            if constraint.type_param_str == formal.type_str:
                return set(constraint.allowed_type_strs)
        return {formal.type_str}

    def _follows(self, node: onnx.NodeProto, index: int, is_input: bool) -> bool:
        """True when a float at this position takes the node's computing type."""
        if node.op_type in _CONTROL_OPS or self._is_fused(node):
            return True
        if is_input and index in _ANY_TYPE_INPUTS.get(node.op_type, ()):
            return False
        allowed = self._formal(node, index, is_input)
        return allowed is not None and _TYPE_STR[FLOAT] in allowed and len(allowed) > 1

    def _is_fused(self, node: onnx.NodeProto) -> bool:
        return (node.domain, node.op_type) in _ATTENTION_OPS or (
            bool(node.output) and node.output[0] in self.fused)

    def _kernel_reason(self, node: onnx.NodeProto) -> str | None:
        """Why ``node`` has no kernel in the half type, or None."""
        if node.op_type in _TRT_FP32_ONLY or (self.half == BFLOAT16 and node.op_type in _TRT_NO_BF16):
            return "no-half-kernel"
        if node.op_type in _CONTROL_OPS or self._is_fused(node):
            return None
        schema = self._schema(node)
        if schema is None:
            return "no-schema"
        want = _TYPE_STR[self.half]
        for index, name in enumerate(node.input):
            if name and self.types.get(name) == FLOAT:
                allowed = self._formal(node, index, True)
                if allowed and _TYPE_STR[FLOAT] in allowed and len(allowed) > 1 and want not in allowed:
                    return "no-half-kernel"
        return None

    # -- plan -----------------------------------------------------------------------------------

    def _plan(self, graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
              outer_derived: set[str]) -> _Plan:
        plan = _Plan()
        producers = {out: node for node in nodes for out in node.output if out}
        readers = _readers(nodes)
        stats = _norm_statistics(graph, nodes, producers, readers)
        plan.derived = self._index_arithmetic(graph, nodes, outer_derived)
        for node in nodes:
            reason = None
            escape = self.escapes.get(node.output[0]) if node.output else None
            if escape is not None and self._is_fused(node):
                plan.precision[id(node)] = escape
                if escape == FLOAT:
                    reason = "escape"
                else:
                    continue
            elif node.op_type in _NORM_OPS:
                reason = "normalization"
            elif node.op_type in _SOFTMAX_OPS and node.output[0] not in self.core_softmax:
                reason = "softmax"
            elif id(node) in stats:
                reason = "norm-statistics"
            elif any(out in plan.derived for out in node.output):
                reason = "index-arithmetic"
            else:
                reason = self._kernel_reason(node)
            plan.precision[id(node)] = FLOAT if reason else self.half
            if reason:
                plan.reason[id(node)] = reason
        graph_outputs = {o.name for o in graph.output}
        for node in nodes:
            # A Cast to float read only by fp32 nodes stays fp32: no round trip through half.
            if (node.op_type == "Cast" and self.types.get(node.output[0]) == FLOAT
                    and node.output[0] not in graph_outputs and readers[node.output[0]]
                    and all(plan.precision.get(id(r)) == FLOAT for r in readers[node.output[0]])):
                plan.precision[id(node)] = FLOAT
        return plan

    def _index_arithmetic(self, graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
                          outer: set[str]) -> set[str]:
        """Float tensors computed from integers only; Casts read only by half nodes leave."""
        derived = set(outer)
        constants = {t.name for t in graph.initializer}
        for node in nodes:
            floats = [n for n in node.input if n and self.types.get(n) == FLOAT]
            outs = [o for o in node.output if self.types.get(o) == FLOAT]
            if node.op_type == "Constant":
                constants.update(node.output)
            elif node.op_type == "Cast" and outs and self.types.get(node.input[0]) in _INT_TYPES:
                derived.update(outs)
            elif node.op_type == "Cast" and node.input[0] in constants:
                # A converted constant's fp32 copy (a first run's Cast of the half weight)
                # is the constant it was: a second run plans as the first did.
                constants.update(node.output)
            elif node.op_type in _CONTROL_OPS or self._is_fused(node) or self._is_layer(node):
                continue
            elif floats and any(n in derived for n in floats) and all(
                    n in derived or n in constants for n in floats):
                derived.update(outs)
            elif outs and node.op_type not in _LOOKUPS and all(n in constants for n in floats) and any(
                    self.types.get(n) in _INT_TYPES and n not in constants for n in node.input):
                derived.update(outs)  # constants picked by ints: Where(keep, 0, finfo.min)
        readers = _readers(nodes)
        graph_outputs = {o.name for o in graph.output}
        for node in nodes:
            if node.op_type == "Cast" and node.output[0] in derived:
                out = node.output[0]
                if out not in graph_outputs and not any(
                        any(o in derived for o in r.output) for r in readers[out]):
                    derived.discard(out)  # a Cast straight into half readers: retarget it
        return derived

    def _is_layer(self, node: onnx.NodeProto) -> bool:
        """A learned layer (weights contracted over more than one element): the end of index
        arithmetic. ``positions[:, None] @ inv_freq[None]`` (contraction 1) is arithmetic."""
        if node.op_type in ("Gemm", "Conv", "ConvTranspose", "Einsum"):
            return True
        return node.op_type == "MatMul" and self.last_dims.get(node.input[0]) != 1

    # -- rewrite --------------------------------------------------------------------------------

    def _graph(self, graph: onnx.GraphProto, outer: dict[str, int], renames: dict[str, str],
               top: bool, outer_derived: frozenset = frozenset()) -> None:
        # One list of node objects throughout: the plan is keyed by their ids.
        nodes = list(graph.node)
        plan = self._plan(graph, nodes, set(outer_derived))
        scope = _Scope(self, graph, nodes, outer, renames, plan, top)
        scope.inputs(top)
        scope.constants()
        del graph.node[:]
        for node in nodes:
            scope.node(node)
        scope.outputs(top)


class _Scope:
    """One graph being rewritten: current types of its float tensors, its casts."""

    def __init__(self, conv: _Converter, graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
                 outer: dict[str, int], renames: dict[str, str], plan: _Plan, top: bool):
        self.conv, self.graph, self.plan, self.top = conv, graph, plan, top
        self.current: dict[str, int] = dict(outer)
        self.renames = dict(renames)
        self.casts: dict[tuple[str, int], str] = {}
        self.names = conv.names
        self.readers = _readers(nodes)
        self.producer_op = {out: node.op_type for node in nodes for out in node.output}
        self.outputs_of_graph = {o.name for o in graph.output}

    def fresh(self, base: str) -> str:
        return fresh_name(base, self.names)

    # -- boundary ---------------------------------------------------------------------------

    def inputs(self, top: bool) -> None:
        half = self.conv.half
        for value in self.graph.input:
            if value.type.tensor_type.elem_type != FLOAT:
                continue
            if top and not self.conv.convert_io:
                self.current[value.name] = FLOAT
            else:
                value.type.tensor_type.elem_type = half
                self.current[value.name] = half
                self.conv.report.changed = True

    def outputs(self, top: bool) -> None:
        """Top-level outputs keep their names and type (fp32 unless convert-io): a half
        producer was renamed (:meth:`_define`) and a Cast restores the name. Body outputs are
        half: a Cast under a new name where the value is not."""
        for value in self.graph.output:
            name = value.name
            if value.type.tensor_type.elem_type != FLOAT:
                continue
            want = self._output_type(top)
            inner = self.name_of(name)
            have = self.current.get(inner, FLOAT)
            if inner != name:
                self._emit_cast(inner, want, name)
            elif have != want and not top:
                value.name = self.fresh(f"{name}_{_SHORT[want]}")
                self._emit_cast(name, want, value.name)
            value.type.tensor_type.elem_type = want if (inner != name or not top) else have
        for value in self.graph.value_info:
            current = self.current.get(value.name)
            if current is not None and value.type.tensor_type.elem_type == FLOAT:
                value.type.tensor_type.elem_type = current

    def _output_type(self, top: bool) -> int:
        return FLOAT if top and not self.conv.convert_io else self.conv.half

    # -- constants --------------------------------------------------------------------------

    def constants(self) -> None:
        """Initializers in the type their readers compute in (half if any reader does)."""
        for tensor in list(self.graph.initializer):
            if tensor.data_type != FLOAT:
                continue
            if self._wants_half(tensor.name):
                self._convert_tensor(tensor)
                self.current[tensor.name] = self.conv.half
            else:
                self.current[tensor.name] = FLOAT

    def _wants_half(self, name: str) -> bool:
        if name in self.outputs_of_graph and not self.conv.convert_io:
            return False
        readers = self.readers.get(name, [])
        half = self.conv.half
        for node in readers:
            if self.plan.precision.get(id(node)) != FLOAT and any(
                    n == name and self.conv._follows(node, i, True)
                    for i, n in enumerate(node.input)):
                if self.plan.precision.get(id(node)) == half or node.op_type in _CONTROL_OPS:
                    return True
        # read only inside bodies (no direct reader here): bodies compute in half
        return not readers

    def _convert_tensor(self, tensor: onnx.TensorProto) -> None:
        values = values_of(tensor)
        converted, clipped = _to_half(values, self.conv.half)
        if clipped:
            self.conv.report.clipped.append(
                {"tensor": tensor.name, "values": clipped,
                 "max_abs": float(np.nanmax(np.abs(values[np.isfinite(values)])))})
        _replacevalues_of(tensor, converted, self.conv.half)
        self.conv.report.constants += 1
        self.conv.report.changed = True

    # -- nodes ------------------------------------------------------------------------------

    def name_of(self, name: str) -> str:
        return self.renames.get(name, name)

    def node(self, node: onnx.NodeProto) -> None:
        conv, plan = self.conv, self.plan
        p = plan.precision.get(id(node), conv.half)
        carries_float = any(conv.types.get(n) == FLOAT for n in [*node.input, *node.output] if n)
        for index, name in enumerate(node.input):
            if not name:
                continue
            node.input[index] = self.name_of(name)
            if conv.types.get(name) != FLOAT:
                continue
            if conv._follows(node, index, True):
                want = conv.half if node.op_type in _CONTROL_OPS else p
            elif index in _ANY_TYPE_INPUTS.get(node.op_type, ()):
                continue
            else:
                want = FLOAT  # a fixed float input (Resize scales)
            # the renamed tensor's type: a half graph output read here lives as ``<out>_fp16``
            have = self.current.get(node.input[index], FLOAT)
            if have != want:
                node.input[index] = self._cast_for(node.input[index], name, want)
        if node.op_type == "Constant":
            self._constant_node(node)
        elif node.op_type == "ConstantOfShape":
            self._constant_of_shape(node)
        elif node.op_type in _CONTROL_OPS:
            self._bodies(node)
        self._set_outputs(node, p)
        self.graph.node.append(node)  # a copy: every edit of the node comes before
        if carries_float and node.op_type not in ("Constant", "Cast"):
            self._count(node, p)

    def _count(self, node: onnx.NodeProto, p: int) -> None:
        report = self.conv.report
        label = node.name or node.output[0]
        if self.conv._is_fused(node):
            kind = "half" if p == self.conv.half else _SHORT[p]
            report.attention[kind] += 1
            if kind != "half":
                report.escaped[node.output[0]] = _SHORT[p]  # as the escapes option names it
        if p == FLOAT:
            reason = self.plan.reason.get(id(node), "escape")
            report.kept[reason] += 1
            report.kept_nodes[reason].append(label)
        elif any(self.conv.types.get(o) == FLOAT for o in node.output):
            report.nodes_converted += 1

    def _set_outputs(self, node: onnx.NodeProto, p: int) -> None:
        conv = self.conv
        if node.op_type == "Cast":
            to = helper.get_attribute_value(next(a for a in node.attribute if a.name == "to"))
            source = conv.types.get(node.input[0])
            if self.top and node.output[0] in self.outputs_of_graph:
                p = self._output_type(True)  # a graph output keeps its type (convert-io aside)
            if to == FLOAT and source not in (FLOAT16, BFLOAT16) and p != FLOAT:
                _set_attr(node, "to", p)  # retargeted: its readers compute in half
                conv.report.changed = True
            if to == FLOAT:
                self.current[node.output[0]] = p if source not in (FLOAT16, BFLOAT16) else FLOAT
            return
        for index, out in enumerate(node.output):
            if not out or conv.types.get(out) != FLOAT:
                continue
            if node.op_type in _CONTROL_OPS:
                have = conv.half
            elif node.op_type in ("Constant", "ConstantOfShape"):
                have = self.current.get(out, FLOAT)
            elif node.op_type == "CastLike":
                have = self.current.get(node.input[1], FLOAT)
            elif conv._follows(node, index, False):
                have = p
            else:
                have = FLOAT
            self._define(node, index, have)

    def _define(self, node: onnx.NodeProto, index: int, have: int) -> None:
        out = node.output[index]
        if have != FLOAT:
            self.conv.report.changed = True
        if self.top and out in self.outputs_of_graph and have != self._output_type(True):
            inner = self.fresh(f"{out}_{_SHORT[have]}")
            node.output[index] = inner
            self.renames[out] = inner
            self.current[inner] = have
            return
        self.current[out] = have

    def _constant_node(self, node: onnx.NodeProto) -> None:
        for attr in node.attribute:
            if attr.name == "value" and attr.t.data_type == FLOAT:
                if self._wants_half(node.output[0]):
                    self._convert_tensor(attr.t)
                    self.current[node.output[0]] = self.conv.half
                else:
                    self.current[node.output[0]] = FLOAT
            elif attr.name in ("value_float", "value_floats") and self._wants_half(node.output[0]):
                values = np.asarray(helper.get_attribute_value(attr), np.float32)
                tensor = numpy_helper.from_array(values.reshape(() if attr.name == "value_float" else -1))
                node.ClearField("attribute")
                node.attribute.append(helper.make_attribute("value", tensor))
                self._convert_tensor(node.attribute[0].t)
                self.current[node.output[0]] = self.conv.half
                return

    def _constant_of_shape(self, node: onnx.NodeProto) -> None:
        out = node.output[0]
        if self.conv.types.get(out) != FLOAT:
            return
        if not self._wants_half(out):
            self.current[out] = FLOAT
            return
        attr = next((a for a in node.attribute if a.name == "value"), None)
        if attr is None:
            node.attribute.append(helper.make_attribute(
                "value", numpy_helper.from_array(np.zeros(1, np.float32))))
            attr = node.attribute[-1]
        self._convert_tensor(attr.t)
        self.current[out] = self.conv.half

    def _bodies(self, node: onnx.NodeProto) -> None:
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                self.conv._graph(body, self.current, self.renames, top=False,
                                 outer_derived=frozenset(self.plan.derived))

    # -- casts ------------------------------------------------------------------------------

    def _cast_for(self, name: str, original: str, to: int) -> str:
        key = (name, to)
        if key not in self.casts:
            out = self.fresh(f"{name}_{_SHORT[to]}")
            source = name
            if (to == FLOAT16 and original in self.plan.derived
                    and not self._bounded(original)):
                source = self._saturate(name)
            self._emit_cast(source, to, out)
            self.casts[key] = out
            self.current[out] = to
        return self.casts[key]

    def _bounded(self, name: str) -> bool:
        return self.producer_op.get(name) in _BOUNDED_OPS

    def _saturate(self, name: str) -> str:
        """``Clip(x, -65504, 65504)`` in fp32: a mask's finfo.min becomes -65504, not -inf."""
        low = self.fresh(f"{name}_fp16_min")
        high = self.fresh(f"{name}_fp16_max")
        out = self.fresh(f"{name}_saturated")
        for const, value in ((low, -FP16_MAX), (high, FP16_MAX)):
            self.graph.node.append(helper.make_node(
                "Constant", [], [const], name=const,
                value=numpy_helper.from_array(np.array(value, np.float32))))
        self.graph.node.append(helper.make_node("Clip", [name, low, high], [out], name=out))
        self.current[out] = FLOAT
        return out

    def _emit_cast(self, source: str, to: int, out: str) -> None:
        self.graph.node.append(self._cast_node(source, to, out))

    def _cast_node(self, source: str, to: int, out: str) -> onnx.NodeProto:
        self.conv.report.casts += 1
        self.conv.report.changed = True
        return helper.make_node("Cast", [source], [out], name=self.fresh(f"{out}_cast"), to=to)


# --- helpers ----------------------------------------------------------------------------------

def _readers(nodes: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            readers[name].append(node)
    return readers


def _norm_statistics(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], producers: dict,
                     readers: dict) -> set[int]:
    """Nodes of written-out norms' statistics: ``ReduceMean(Pow(x - mean, 2))`` or
    ``ReduceMean(x * x)``, the rsqrt after it and the normalising step."""
    stats: set[int] = set()
    constants = {t.name for t in graph.initializer} | {
        o for n in nodes if n.op_type == "Constant" for o in n.output}
    for node in nodes:
        if node.op_type not in ("ReduceMean", "ReduceSum"):
            continue
        square = producers.get(node.input[0])
        if square is None or not _is_square(square, constants):
            continue
        stats.update({id(node), id(square)})
        centred = producers.get(square.input[0])
        if centred is not None and centred.op_type == "Sub":
            mean = producers.get(centred.input[1])
            if mean is not None and mean.op_type == "ReduceMean" and mean.input[0] == centred.input[0]:
                stats.update({id(centred), id(mean)})
        _walk_statistics(node.output[0], readers, constants, stats)
    return stats


def _is_square(node: onnx.NodeProto, constants: set[str]) -> bool:
    if node.op_type == "Mul":
        return len(node.input) == 2 and node.input[0] == node.input[1]
    return node.op_type == "Pow" and node.input[1] in constants


def _walk_statistics(tensor: str, readers: dict, constants: set[str], stats: set[int]) -> None:
    for _ in range(6):
        steps = [r for r in readers.get(tensor, []) if r.op_type in _STAT_STEPS]
        if len(steps) != 1:
            return
        step = steps[0]
        stats.add(id(step))
        others = [n for n in step.input if n and n != tensor]
        if any(n not in constants for n in others):
            return  # the normalising step: x * rsqrt(var + eps)
        tensor = step.output[0]


def _attention_nodes(model: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """Softmax outputs of unfused attention cores; output names of fused attention nodes."""
    from xattn_compiler.attention import find_attention

    cores, fused = set(), set()
    try:
        blocks = find_attention(model)
    except Exception as exc:  # a graph the matcher cannot read: every Softmax stays fp32
        log.warning("convert-precision: attention matching failed (%s)", exc)
        return cores, fused
    for block in blocks:
        if block.fused and block.nodes:
            fused.add(block.nodes[0].outputs[0].name)
        elif block.core is not None:
            cores.add(block.core["softmax.node"].outputs[0].name)
    return cores, fused


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for body in iter_graph_protos(graph):
        for value in (*body.input, *body.value_info, *body.output):
            if value.type.HasField("tensor_type"):
                types.setdefault(value.name, value.type.tensor_type.elem_type)
        for tensor in body.initializer:
            types.setdefault(tensor.name, tensor.data_type)
        for node in body.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        types.setdefault(node.output[0], attr.t.data_type)
                    elif attr.name in ("value_float", "value_floats"):
                        types.setdefault(node.output[0], FLOAT)
    return types


def _last_dims(graph: onnx.GraphProto) -> dict[str, int | None]:
    dims: dict[str, int | None] = {}
    for body in iter_graph_protos(graph):
        for value in (*body.input, *body.value_info, *body.output):
            shape = value.type.tensor_type.shape
            if value.type.HasField("tensor_type") and shape.dim:
                last = shape.dim[-1]
                dims[value.name] = last.dim_value if last.HasField("dim_value") else None
        for tensor in body.initializer:
            dims[tensor.name] = tensor.dims[-1] if tensor.dims else None
    return dims


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)  # stubs and small tensors: large models run detached (weights.py)
    return out


def _to_half(values: np.ndarray, half: int) -> tuple[np.ndarray, int]:
    """``values`` in the half type; fp16 saturates finite values beyond its range."""
    clipped = 0
    if half == FLOAT16:
        over = np.isfinite(values) & (np.abs(values) > FP16_MAX)
        clipped = int(over.sum())
        if clipped:
            values = np.where(over, np.sign(values) * FP16_MAX, values)
        return values.astype(np.float16), clipped
    import ml_dtypes

    return values.astype(ml_dtypes.bfloat16), 0


def _replacevalues_of(tensor: onnx.TensorProto, values: np.ndarray, half: int) -> None:
    """``tensor`` holding ``values``; a stub becomes a stub of the collecting store."""
    was_stub = is_stub(tensor)
    new = onnx.TensorProto()
    new.name, new.data_type = tensor.name, half
    new.dims.extend(tensor.dims)
    new.raw_data = values.tobytes()
    if was_stub and _COLLECTING:
        _COLLECTING[-1].stub(tensor, _InMemory(new))
        tensor.data_type = half
        return
    for name in ("float_data", "raw_data", "external_data", "int32_data"):
        tensor.ClearField(name)
    tensor.ClearField("data_location")
    tensor.data_type = half
    tensor.raw_data = new.raw_data


def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for attr in node.attribute:
        if attr.name == name:
            attr.CopyFrom(helper.make_attribute(name, value))
            return
    node.attribute.append(helper.make_attribute(name, value))


__all__ = ["FP16_MAX", "HALF_TYPES", "ConvertPrecision", "parse_escapes"]
