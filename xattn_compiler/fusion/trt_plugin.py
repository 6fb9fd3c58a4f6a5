"""The ``trt-plugin`` target: each attention block becomes one TensorRT plugin node.

Per block, the first spec whose kind and constraints fit is used: the one spec read from
``plugin_spec`` (an IPluginV3 plugin you build: the plugin path for TensorRT 10/11), or without
one the LEGACY presets (``fMHCA`` for cross-attention, ``fMHA_V2`` for self-attention), which
exist only for TensorRT 8.5 (removed in 8.6; ``lint-trt`` blocks them on later versions). What the rewrite writes, by the spec's input layout::

    q_kv_packed (fMHCA):   kv_BSN2H = Reshape(x_kv @ W_kv [+ b_kv], [0, 0, N, 2, H])
                           q_BSNH   = Transpose(q_BNSH, [0, 2, 1, 3]) [* ratio]
                           y_BSNH   = fMHCA(q_BSNH, kv_BSN2H)
    qkv_packed (fMHA_V2):  qkv_BSN3H = Reshape(x @ W_qkv [+ b_qkv], [0, 0, N, 3, H])
                           y_BSNH    = fMHA_V2(qkv_BSN3H)
    separate_bsnh/_bnsh:   y = Plugin(q, k, v) from the block's own Q, K, V
    then                   out_BSE  = Reshape(y_BSNH, [0, 0, N*H])   (or the layout block.output has)

``W_kv`` interleaves the K and V weights per head (columns ``[K_0, V_0, K_1, V_1, ...]``, each H
wide) so that one GEMM writes the packed tensor the plugin reads, as TensorRT's 8.5 Stable
Diffusion demo did; ``W_qkv`` does the same for Q, K and V. Plugins that always scale by
``1/sqrt(H)`` get the block's own scale as a factor on Q (or folded into ``W_q``).

Nodes go to the spec's domain (``trt.plugins`` by default): TensorRT's ONNX parser looks a
plugin up by op name, ``plugin_version`` and ``plugin_namespace`` and ignores the domain, while
``onnx.checker`` rejects unknown ops in the default domain. ``finish`` records the specs used in
the model's metadata so that :mod:`xattn_compiler.plugins.reference` can run the model later.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from xattn_compiler.analysis import constant_eval
from xattn_compiler.attention import AttentionMatch, Operand, reshape_target
from xattn_compiler.patterns.steps import MaskAdd, Scale, core_steps
from xattn_compiler.plugins.presets import LEGACY_PRESETS, legacy_warning
from xattn_compiler.plugins.reference import record_specs, recorded_specs
from xattn_compiler.plugins.spec import PluginSpec, load_spec

from .base import FusionTarget, register_target
from .operands import plan_core

log = logging.getLogger(__name__)

_PACKED = frozenset({"q_kv_packed", "qkv_packed"})
# Ops that may sit between a projection and the core operand without changing which column of
# the projection lands where: the head split, the transposes, identities and a scalar scale.
_PLAIN_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Identity", "Mul", "Div"})
_BNSH_TO_BSNH = [0, 2, 1, 3]
_WIDER = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE})


@register_target
class TrtPluginTarget(FusionTarget):
    """Replace each block with a TensorRT plugin node (legacy presets or a declared spec)."""

    name = "trt-plugin"
    description = ("TensorRT plugin nodes: a declared plugin spec (IPluginV3), or the LEGACY "
                   "fMHCA/fMHA_V2 presets (TensorRT 8.5 only)")

    def __init__(self, options: Mapping[str, Any]):
        super().__init__(options)
        path = self.options.get("plugin_spec") or ""
        self.specs: tuple[PluginSpec, ...] = (load_spec(path),) if path else LEGACY_PRESETS
        if not path:
            log.warning(legacy_warning())
        self.used: dict[str, PluginSpec] = {}

    def skip_reason(self, block: AttentionMatch) -> str | None:
        spec, reason = self._choose(block)
        return None if spec is not None else reason

    def _choose(self, block: AttentionMatch) -> tuple[PluginSpec | None, str]:
        """The first spec that can run ``block``, or None and why none can."""
        if self.options.get("guard_precision"):
            return None, ("guard-precision keeps Softmax and the score MatMul in fp32; a plugin "
                          "has neither")
        common = _block_problem(block)
        if common:
            return None, common
        reasons = []
        for spec in self.specs:
            problem = _spec_problem(spec, block)
            if problem is None:
                return spec, ""
            reasons.append(f"{spec.op}: {problem}")
        return None, "; ".join(reasons)

    # --- rewriting -------------------------------------------------------------------------

    def fuse(self, block: AttentionMatch) -> list[gs.Node]:
        spec, reason = self._choose(block)
        if spec is None:
            raise ValueError(f"block {block.id} cannot become a plugin node: {reason}")
        nodes = _Writer(block, spec).write()
        block.graph.nodes.extend(nodes)  # in place; the old block's nodes become dead
        self.used.setdefault(spec.op, spec)
        return nodes

    def finish(self, model: onnx.ModelProto) -> onnx.ModelProto:
        domains = {entry.domain for entry in model.opset_import}
        for spec in self.used.values():
            if spec.domain not in domains and spec.domain not in ("", "ai.onnx"):
                model.opset_import.add(domain=spec.domain, version=1)
                domains.add(spec.domain)
        # Keep what earlier runs recorded: their nodes are still in the model.
        kept = [spec for spec in recorded_specs(model) if spec.op not in self.used]
        record_specs(model, [*kept, *self.used.values()])
        return model


# --- what every plugin needs --------------------------------------------------------------

def _block_problem(block: AttentionMatch) -> str | None:
    if block.core is None:
        return "not a MatMul-Softmax-MatMul block"
    q = block.core["q"]
    if q.shape is None or len(q.shape) != 4:
        return "Q is not [B, N, S, H] (batched-heads layout); plugins need heads as an axis"
    if block.v.scales:
        return "V is scaled inside the block"
    if _scale_of(block.q) is None or _scale_of(block.k) is None or block.scale is None:
        return "the scale is not a constant"
    if _merge_chain(block) is None:
        return f"no Transpose/Reshape path from the context to '{block.output.name}'"
    # The plugin takes the scale and masks from the match's captures; an op in the scores
    # chain the shared reading does not understand would be dropped, so it refuses too.
    plan = plan_core(block)
    return plan if isinstance(plan, str) else None


def _spec_problem(spec: PluginSpec, block: AttentionMatch) -> str | None:
    if block.kind not in spec.kinds:
        return f"runs {' and '.join(spec.kinds)}-attention only, the block is {block.kind}"
    mask_problem = _mask_problem(spec, block)
    if mask_problem:
        return mask_problem
    dtype = _dtype(block.core["q"])
    if spec.constraints.dtypes and dtype not in spec.constraints.dtypes:
        return f"dtype {dtype} is not one of {list(spec.constraints.dtypes)}"
    if dtype == "float16" and not spec.constraints.softmax_fp32 and any(
            n.op == "Cast" and n.attrs.get("to") in _WIDER for n in block.core.nodes):
        return ("Softmax runs in fp32 in this fp16 block (Casts around it); the plugin's runs in "
                "fp16 (declare constraints.softmax_fp32 if it does not)")
    head_problem = spec.constraints.head_size_problem(block.head_dim)
    if head_problem:
        return head_problem
    kv_len = _static(block.core["v"].shape, 2)
    if spec.constraints.max_kv_length and kv_len and kv_len > spec.constraints.max_kv_length:
        return f"{kv_len} keys exceed the kernel's {spec.constraints.max_kv_length}"
    if spec.layout in _PACKED:
        return _packing_problem(spec, block)
    return None


def _mask_problem(spec: PluginSpec, block: AttentionMatch) -> str | None:
    if block.mask is None:
        return None
    if spec.mask == "none":
        return f"the block has a mask ({block.mask['kind']}); the plugin takes none"
    if block.mask["kind"] != "add":
        return f"the block's mask is {block.mask['kind']}; the plugin takes additive masks"
    if not _masks_after_scale(block):
        return "a mask is added before the scores are scaled; the plugin adds it after"
    return None


def _masks_after_scale(block: AttentionMatch) -> bool:
    """Whether no scale of the scores chain comes after a mask Add."""
    masked = False
    for step in core_steps(block.core.steps)[0]:
        if isinstance(step, Scale) and masked:
            return False
        masked = masked or isinstance(step, MaskAdd)
    return True


def _packing_problem(spec: PluginSpec, block: AttentionMatch) -> str | None:
    if block.num_kv_heads not in (None, block.num_heads):
        return "grouped K/V heads cannot be packed per head"
    names = ("k", "v") if spec.layout == "q_kv_packed" else ("q", "k", "v")
    operands = [getattr(block, name) for name in names]
    if any(op.source is not operands[0].source for op in operands):
        return f"{' and '.join(n.upper() for n in names)} are projected from different tensors"
    weights = []
    for name, operand in zip(names, operands, strict=True):
        problem = _projection_problem(operand, block, name)
        if problem:
            return f"{name.upper()}: {problem}"
        weights.append(id(operand.weight))
    if len(set(weights)) != len(weights):
        return "a fused projection (one weight split into Q/K/V) is not supported"
    return None


def _projection_problem(operand: Operand, block: AttentionMatch, name: str) -> str | None:
    proj = operand.projection
    if proj is None or operand.weight is None:
        return "no projection weight to interleave"
    matmul = _matmul_of(operand)
    if matmul.op not in ("MatMul", "Gemm"):
        return f"the projection is {matmul.op}; only MatMul or Gemm weights are interleaved"
    if matmul.op == "Gemm" and (matmul.attrs.get("alpha", 1.0) != 1.0 or
                                matmul.attrs.get("beta", 1.0) != 1.0 or matmul.attrs.get("transA", 0)):
        return "a Gemm with alpha, beta or transA is not interleaved"
    weight = _weight(operand)
    if weight is None or weight.ndim != 2 or weight.shape[1] != block.num_heads * block.head_dim:
        return f"weight '{operand.weight.name}' is not [E, N*H]"
    bias = _bias_tensor(operand)
    if bias is not None and _bias(operand) is None:
        return f"bias '{bias.name}' is not a constant of N*H values"
    if operand.source.shape is not None and len(operand.source.shape) != 3:
        return f"source '{operand.source.name}' is not [B, S, E]"
    layout = _chain_layout(operand)
    wanted = [0, 2, 3, 1] if name == "k" else _BNSH_TO_BSNH
    if layout is None or layout[1] != wanted or layout[0] != [block.num_heads, block.head_dim]:
        return "the head split is not Reshape [B, S, N, H] + Transpose"
    return None


# --- the rewrite --------------------------------------------------------------------------

class _Writer:
    """Builds the plugin node and its inputs for one block."""

    def __init__(self, block: AttentionMatch, spec: PluginSpec):
        self.block, self.spec = block, spec
        self.nodes: list[gs.Node] = []
        self.n, self.h = block.num_heads, block.head_dim
        self.prefix = _fresh_prefix(block.graph, f"{block.id}_{spec.op}")
        self.dtype = block.core["q"].dtype

    def write(self) -> list[gs.Node]:
        inputs, applied = self._inputs()
        remaining = self.block.scale / applied
        facts = {"num_heads": self.n, "num_kv_heads": self.n, "head_dim": self.h,
                 "scale": remaining, "causal": 0}
        if self.spec.scale == "inverse_sqrt_head_dim":
            ratio = remaining * math.sqrt(self.h)
            if not math.isclose(ratio, 1.0, rel_tol=1e-6):
                inputs[0] = self._op("Mul", [inputs[0], self._const("ratio", np.array(
                    ratio, dtype=self.dtype))], "q_scaled")
        if self.spec.mask == "additive" and self.block.mask is not None:
            inputs.append(self._mask())
        out = self._tensor(f"{self.spec.op}_out")
        node = gs.Node(self.spec.op, name=self.prefix, domain=self.spec.domain,
                       attrs=self.spec.node_attributes(facts), inputs=inputs, outputs=[out])
        self.nodes.append(node)
        self._to_block_output(out)
        return self.nodes

    def _inputs(self) -> tuple[list[gs.Tensor], float]:
        """The plugin's inputs and the scale already applied inside them."""
        core, block = self.block.core, self.block
        s_q, s_k = _scale_of(block.q), _scale_of(block.k)
        if self.spec.layout == "qkv_packed":
            fold = self.spec.scale == "inverse_sqrt_head_dim"
            packed = self._packed((block.q, block.k, block.v), fold)
            return [packed], block.scale * math.sqrt(self.h) if fold else 1.0
        q = core["q"]
        if self.spec.layout != "separate_bnsh":
            q = self._op("Transpose", [q], "q_BSNH", perm=_BNSH_TO_BSNH)
        if self.spec.layout == "q_kv_packed":
            return [q, self._packed((block.k, block.v))], s_q
        k = self._op("Transpose", [core["k_t"]], "k_BNSH", perm=[0, 1, 3, 2])
        v = core["v"]
        if self.spec.layout == "separate_bsnh":
            k = self._op("Transpose", [k], "k_BSNH", perm=_BNSH_TO_BSNH)
            v = self._op("Transpose", [v], "v_BSNH", perm=_BNSH_TO_BSNH)
        return [q, k, v], s_q * s_k

    def _packed(self, operands: tuple[Operand, ...], fold: bool = False) -> gs.Tensor:
        """One projection whose output, reshaped to [B, S, N, P, H], packs the operands.

        ``fold``: Q is packed too and cannot be scaled apart, so the block's scale over the
        plugin's 1/sqrt(H) goes into Q's weights and bias."""
        weights = [_weight(op) for op in operands]
        biases = [_bias(op) for op in operands]
        if fold:
            ratio = self.block.scale * math.sqrt(self.h)
            weights[0] = weights[0] * ratio
            biases[0] = biases[0] * ratio if biases[0] is not None else None
        e = weights[0].shape[0]
        w = np.stack([x.reshape(e, self.n, self.h) for x in weights], axis=2)
        tag = "kv" if len(operands) == 2 else "qkv"
        proj = self._op("MatMul", [operands[0].source, self._const(
            f"W_{tag}", w.reshape(e, -1).astype(weights[0].dtype))], f"{tag}_proj")
        if any(b is not None for b in biases):
            b = np.stack([x if x is not None else np.zeros(self.n * self.h, weights[0].dtype)
                          for x in biases], axis=0)
            b = b.reshape(len(operands), self.n, self.h).transpose(1, 0, 2).reshape(-1)
            proj = self._op("Add", [proj, self._const(f"b_{tag}", b.astype(weights[0].dtype))],
                            f"{tag}_biased")
        shape = np.array([0, 0, self.n, len(operands), self.h], dtype=np.int64)
        return self._op("Reshape", [proj, self._const(f"{tag}_shape", shape)], f"{tag}_packed")

    def _mask(self) -> gs.Tensor:
        """The block's additive masks summed into one (T5 adds a position bias and a mask)."""
        masks = [step.mask for step in core_steps(self.block.core.steps)[0]
                 if isinstance(step, MaskAdd)]
        total = masks[0]
        for index, extra in enumerate(masks[1:]):
            total = self._op("Add", [total, extra], f"mask_sum{index}")
        return total

    def _to_block_output(self, out: gs.Tensor) -> None:
        """Bring the plugin's output to ``block.output``'s layout and make it produce it."""
        target = self.block.output
        layout = _output_layout(self.block)
        steps: list[tuple[str, dict[str, Any], list[gs.Tensor]]] = []
        # The plugin writes BSNH or BNSH; the same perm swaps either way.
        wanted = {"BSE": "BSNH", None: "BNSH"}.get(layout, layout)
        if self.spec.output_layout != wanted:
            steps.append(("Transpose", {"perm": _BNSH_TO_BSNH}, []))
        if layout == "BSE":
            shape = np.array([0, 0, self.n * self.h], dtype=np.int64)
            steps.append(("Reshape", {}, [self._const("merge_shape", shape)]))
        elif layout is None:  # an unusual head merge (seq-first, 2-D): replay it
            steps += [(n.op, dict(n.attrs), list(n.inputs[1:])) for n in _merge_chain(self.block)]
        target.inputs.clear()
        if not steps:  # the plugin's output already is the block's value
            plugin = self.nodes[-1]
            plugin.outputs.clear()
            plugin.outputs.append(target)
            return
        for index, (op, attrs, extra) in enumerate(steps):
            last = index == len(steps) - 1
            result = target if last else self._tensor(f"{op}_{index}")
            self.nodes.append(gs.Node(op, name=f"{self.prefix}_{op.lower()}_{index}", attrs=attrs,
                                      inputs=[out, *extra], outputs=[result]))
            out = result

    # --- small builders ---

    def _tensor(self, suffix: str) -> gs.Variable:
        return gs.Variable(f"{self.prefix}_{suffix}", dtype=self.dtype)

    def _const(self, suffix: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(f"{self.prefix}_{suffix}", np.asarray(value))

    def _op(self, op: str, inputs: list[gs.Tensor], suffix: str, **attrs) -> gs.Variable:
        out = self._tensor(suffix)
        self.nodes.append(gs.Node(op, name=f"{self.prefix}_{suffix}", attrs=attrs, inputs=inputs,
                                  outputs=[out]))
        return out


def _fresh_prefix(graph: gs.Graph, base: str) -> str:
    """``base``, or ``base_2``, ... when an earlier run already named tensors so (block ids
    restart at attn_0 on every run)."""
    taken = [name for name in graph.tensors() if name.startswith(base)]
    prefix, index = base, 1
    while any(name.startswith(prefix + "_") for name in taken):
        index += 1
        prefix = f"{base}_{index}"
    return prefix


# --- facts about operands -----------------------------------------------------------------

def _dtype(tensor: gs.Tensor) -> str | None:
    try:
        return np.dtype(tensor.dtype).name if tensor.dtype is not None else None
    except TypeError:
        return None


def _static(shape, axis: int) -> int | None:
    if shape is None or len(shape) <= axis:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) and dim > 0 else None


def _scale_of(operand: Operand) -> float | None:
    """The product of the scalar Mul/Div factors on the operand's path (1.0 when none)."""
    scale = 1.0
    for step in operand.scales:
        if step.factor is None:
            return None
        scale *= step.factor
    return scale


def _matmul_of(operand: Operand) -> gs.Node:
    proj = operand.projection
    if proj.op == "Add":
        return next(t.inputs[0] for t in proj.inputs if t.inputs)
    return proj


def _weight(operand: Operand) -> np.ndarray | None:
    value = constant_eval(operand.weight)
    if value is None:
        return None
    matmul = _matmul_of(operand)
    if matmul.op == "Gemm" and matmul.attrs.get("transB", 0):
        value = value.T
    return value


def _bias_tensor(operand: Operand) -> gs.Tensor | None:
    """The bias Add's constant, or a Gemm's C (which the operand pattern does not capture)."""
    if operand.bias is not None:
        return operand.bias
    matmul = _matmul_of(operand)
    if matmul.op == "Gemm" and len(matmul.inputs) > 2 and matmul.inputs[2].name:
        return matmul.inputs[2]
    return None


def _bias(operand: Operand) -> np.ndarray | None:
    tensor = _bias_tensor(operand)
    value = constant_eval(tensor) if tensor is not None else None
    if value is None or value.size != _weight(operand).shape[1]:
        return None
    return value.reshape(-1)


def _chain_layout(operand: Operand) -> tuple[list[int], list[int]] | None:
    """``([N, H], perm)``: the head split's last two dims and the composed Transpose after it,
    for a path from the projection made only of plain layout ops; None otherwise."""
    split, perm = None, [0, 1, 2, 3]
    for node in (step.node for step in operand.steps):
        if node.op not in _PLAIN_LAYOUT_OPS:
            return None
        if node.op == "Reshape":
            target = reshape_target(node)
            if split is None and target is not None and len(target) == 3:
                continue  # a Gemm's output unflattened back to [B, S, N*H]
            if split is not None or target is None or len(target) != 4:
                return None
            split = list(target[2:])
        elif node.op == "Transpose":
            if split is None:
                return None
            perm = [perm[i] for i in node.attrs.get("perm", [3, 2, 1, 0])]
    return (split, perm) if split is not None else None


def _merge_chain(block: AttentionMatch) -> list[gs.Node] | None:
    """The Transpose/Reshape nodes from the context down to ``block.output``, in order."""
    context = block.core["context"]
    chain, tensor = [], block.output
    while tensor is not context:
        node = tensor.inputs[0] if tensor.inputs else None
        if node is None or node.op not in ("Transpose", "Reshape") or len(chain) > 8:
            return None
        chain.append(node)
        tensor = node.inputs[0]
    return chain[::-1]


def _output_layout(block: AttentionMatch) -> str | None:
    """``BNSH`` (the context itself), ``BSNH`` or ``BSE``: what ``block.output`` holds, or None
    for another head merge (seq-first, 2-D...)."""
    perm, rank = [0, 1, 2, 3], 4
    for node in _merge_chain(block) or []:
        if node.op == "Transpose" and rank == 4:
            perm = [perm[i] for i in node.attrs.get("perm", [3, 2, 1, 0])]
        elif node.op == "Reshape" and perm == _BNSH_TO_BSNH and rank == 4:
            target = reshape_target(node)
            if target is None or len(target) != 3 or \
                    target[2] not in (None, -1, block.num_heads * block.head_dim):
                return None
            rank = 3
        else:
            return None
    if rank == 3:
        return "BSE"
    return {(0, 1, 2, 3): "BNSH", (0, 2, 1, 3): "BSNH"}.get(tuple(perm))


__all__ = ["TrtPluginTarget"]
