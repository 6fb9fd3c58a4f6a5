"""Numpy reference implementations of attention plugin ops, for ``onnx.reference``.

ONNX Runtime cannot load a TensorRT plugin node, so a model the ``trt-plugin`` target wrote is
run with :class:`onnx.reference.ReferenceEvaluator`, every plugin node computed by an
:class:`~onnx.reference.op_run.OpRun` made from its :class:`PluginSpec`: the spec's input layout
says how to unpack Q, K and V, its attribute mapping where the scale (and causality) come from.
One implementation serves the presets and every user-declared spec.

Which spec a node follows: the model's metadata (the ``trt-plugin`` target records the specs
it used under :data:`METADATA_KEY`), then the legacy presets, matched by op name.

ONNX Runtime: a model-local function named like the plugin would let ORT run a shipped model,
but TensorRT's ONNX parser prefers a local function over a plugin of the same op name
(``ModelImporter.cpp``: local functions are looked up before the plugin fallback), so that model
would no longer build the plugin; a compiled custom-op library is a dependency we avoid. For
verification, :mod:`.decompose` writes a throw-away copy with the plugin nodes spelled in
standard ops, which ORT runs with its own (fair) fp16 numerics.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar

import ml_dtypes  # noqa: F401  (bfloat16 for numpy)
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from xattn_compiler.errors import InputError

from .presets import LEGACY_PRESETS
from .spec import LAYOUTS, PluginSpec, specs_from_json

#: Model metadata key under which the ``trt-plugin`` target stores the specs it used (JSON list).
METADATA_KEY = "xattn_compiler.plugin_specs"


# --- the math ---------------------------------------------------------------------------------

def attention_bnsh(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                   causal: bool = False, mask: np.ndarray | None = None) -> np.ndarray:
    """softmax(scale * Q K^T [+ mask]) V on ``[B, N, S, H]`` operands, computed in float64.

    K and V may have fewer heads than Q (grouped-query attention): each serves
    ``N_q / N_kv`` consecutive query heads. Returns float64 ``[B, N_q, Sq, H]``.
    """
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    if groups * k.shape[1] != q.shape[1]:
        raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} key/value heads")
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.einsum("bnqh,bnkh->bnqk", q, k) * scale
    if mask is not None:
        scores = scores + np.asarray(mask, dtype=np.float64)
    if causal:
        sq, sk = scores.shape[-2:]
        scores = np.where(np.tril(np.ones((sq, sk), dtype=bool)), scores, -np.inf)
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.einsum("bnqk,bnkh->bnqh", probs, v)


def unpack(spec: PluginSpec, inputs: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """The plugin node's inputs as Q, K, V in ``[B, N, S, H]``, by the spec's layout (a mask
    input, if the spec takes one, is not part of it)."""
    if has_mask_input(spec, len(inputs)):
        inputs = inputs[:-1]
    expected = len(LAYOUTS[spec.layout])
    if len(inputs) != expected:
        raise ValueError(f"{spec.op}: layout '{spec.layout}' takes {expected} input(s) "
                         f"({', '.join(spec.inputs)}), got {len(inputs)}")
    if spec.layout == "q_kv_packed":
        q, kv = inputs
        _check_rank(spec, q, 4, 0)
        _check_rank(spec, kv, 5, 1, packed=2)
        return _bsnh(q), _bsnh(kv[:, :, :, 0]), _bsnh(kv[:, :, :, 1])
    if spec.layout == "qkv_packed":
        (qkv,) = inputs
        _check_rank(spec, qkv, 5, 0, packed=3)
        return tuple(_bsnh(qkv[:, :, :, i]) for i in range(3))
    for index, tensor in enumerate(inputs):
        _check_rank(spec, tensor, 4, index)
    if spec.layout == "separate_bsnh":
        return tuple(_bsnh(t) for t in inputs)
    return tuple(inputs)


def has_mask_input(spec: PluginSpec, count: int) -> bool:
    """Whether a node of ``spec`` with ``count`` inputs carries a mask as its last one."""
    return spec.mask == "additive" and count == len(LAYOUTS[spec.layout]) + 1


def _bsnh(tensor: np.ndarray) -> np.ndarray:
    return tensor.transpose(0, 2, 1, 3)


def _check_rank(spec: PluginSpec, tensor: np.ndarray, rank: int, index: int,
                packed: int | None = None) -> None:
    if tensor.ndim != rank or (packed is not None and tensor.shape[3] != packed):
        raise ValueError(f"{spec.op}: input {index} must be {LAYOUTS[spec.layout][index]}, got "
                         f"shape {list(tensor.shape)}")


def run_plugin(spec: PluginSpec, inputs: tuple[np.ndarray, ...],
               attrs: Mapping[str, Any]) -> np.ndarray:
    """What the plugin node computes: one output, in the spec's output layout and input dtype."""
    q, k, v = unpack(spec, inputs)
    facts = spec.facts_from_attributes(attrs, head_dim=q.shape[-1])
    mask = inputs[-1] if has_mask_input(spec, len(inputs)) else None
    out = attention_bnsh(q, k, v, float(facts["scale"]), causal=bool(facts.get("causal", 0)),
                         mask=mask)
    if spec.output_layout == "BSNH":
        out = _bsnh(out)
    return out.astype(inputs[0].dtype)


# --- onnx.reference integration ---------------------------------------------------------------

class PluginOpRun(OpRun):
    """Base of the generated reference ops; ``spec`` says what the node means."""

    spec: ClassVar[PluginSpec]
    op_domain: ClassVar[str]

    def _run(self, *inputs, **attrs):
        return (run_plugin(self.spec, inputs, attrs),)


def op_class(spec: PluginSpec, domain: str | None = None) -> type[PluginOpRun]:
    """An OpRun subclass computing ``spec``'s op in ``domain`` (default: the spec's)."""
    return type(spec.op, (PluginOpRun,), {"spec": spec, "op_domain":
                                          spec.domain if domain is None else domain})


def recorded_specs(model: onnx.ModelProto) -> list[PluginSpec]:
    """The specs a ``trt-plugin`` rewrite recorded in ``model``'s metadata."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return specs_from_json(prop.value, f"model metadata '{METADATA_KEY}'")
    return []


def record_specs(model: onnx.ModelProto, specs: Iterable[PluginSpec]) -> None:
    """Store ``specs`` in ``model``'s metadata (replacing earlier ones), so that the model can be
    verified later without the spec file."""
    tables = [spec.to_dict() for spec in specs]
    kept = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if tables:
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(tables, sort_keys=True))


def known_specs(model: onnx.ModelProto, extra: Iterable[PluginSpec] = ()) -> dict[str, PluginSpec]:
    """Spec by op name: ``extra`` first, then the model's recorded specs, then the presets."""
    specs: dict[str, PluginSpec] = {}
    for spec in (*extra, *recorded_specs(model), *LEGACY_PRESETS):
        specs.setdefault(spec.op, spec)
    return specs


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _nodes(body)


def plugin_nodes(model: onnx.ModelProto,
                 extra: Iterable[PluginSpec] = ()) -> list[tuple[onnx.NodeProto, PluginSpec | None]]:
    """Every plugin node in ``model`` (bodies included) with its spec, None when unknown.

    A node is a plugin node when it carries ``plugin_version`` (what TensorRT's parser reads)
    or its op is a known spec's outside the default domain.
    """
    specs = known_specs(model, extra)
    found = []
    for node in _nodes(model.graph):
        tagged = any(a.name == "plugin_version" for a in node.attribute)
        custom = node.domain not in ("", "ai.onnx") and node.op_type in specs
        if tagged or custom:
            found.append((node, specs.get(node.op_type)))
    return found


def has_plugin_nodes(model: onnx.ModelProto) -> bool:
    return bool(plugin_nodes(model))


def reference_evaluator(model: onnx.ModelProto,
                        extra: Iterable[PluginSpec] = ()) -> ReferenceEvaluator:
    """A :class:`ReferenceEvaluator` for ``model`` with every plugin node implemented.

    Raises :class:`InputError` naming the node when a plugin node follows no known spec.
    """
    classes: dict[tuple[str, str], type[PluginOpRun]] = {}
    for node, spec in plugin_nodes(model, extra):
        if spec is None:
            raise InputError(f"plugin node '{node.name or node.op_type}' ({node.op_type}): no "
                             "plugin spec describes it, so it has no reference implementation; "
                             "pass the spec file it was written with")
        classes.setdefault((node.domain, node.op_type), op_class(spec, node.domain))
    return ReferenceEvaluator(model, new_ops=list(classes.values()))


def run_reference(model: onnx.ModelProto, inputs: Mapping[str, np.ndarray],
                  extra: Iterable[PluginSpec] = ()) -> dict[str, np.ndarray]:
    """Run ``model`` once with onnx.reference; outputs by name in graph-output order."""
    evaluator = reference_evaluator(model, extra)
    feeds = {name: inputs[name] for name in evaluator.input_names if name in inputs}
    values = evaluator.run(None, feeds)
    return dict(zip(evaluator.output_names, values, strict=True))


__all__ = ["METADATA_KEY", "PluginOpRun", "attention_bnsh", "has_plugin_nodes", "known_specs",
           "op_class", "plugin_nodes", "record_specs", "recorded_specs", "reference_evaluator",
           "run_plugin", "run_reference", "unpack"]

