"""Plugin nodes rewritten into standard ONNX ops, so ONNX Runtime can verify the model.

A verification copy only, never a model to ship (TensorRT would then build these ops, not the
plugin). It exists because running a whole fp16 model in ``onnx.reference`` is not a fair
reference: numpy evaluates fp16 normalisations in fp16 and overflows where ONNX Runtime does
not (the fp16 UNet of the zoo differs by 1.7 between the two without any plugin in it). So
verification runs ONNX Runtime on the model with each plugin node replaced by the attention it
stands for, derived from its spec's layout::

    q, k, v (BNSH) = unpack(inputs)       Transpose / Split + Squeeze, by the layout
    y_BNSH         = Softmax(q @ k^T * scale [+ mask]) @ v
    y              = Transpose(y_BNSH) when the spec's output is BSNH

The numpy references in :mod:`.reference` define the same ops; the tests check both agree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from xattn_compiler.errors import InputError

from .reference import has_mask_input, known_specs
from .spec import PluginSpec

_TO_BNSH = [0, 2, 1, 3]


def decompose_plugins(model: onnx.ModelProto, extra: Iterable[PluginSpec] = ()) -> onnx.ModelProto:
    """A copy of ``model`` whose plugin nodes (bodies included) are standard ONNX attention.

    Raises :class:`InputError` naming the node when a plugin node follows no known spec or asks
    for something the decomposition does not spell (a causal plugin).
    """
    specs = known_specs(model, extra)
    out = copy.deepcopy(model)
    _rewrite_graph(out.graph, specs, [0])
    return out


def _rewrite_graph(graph: onnx.GraphProto, specs: dict[str, PluginSpec], counter: list[int]) -> None:
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rewrite_graph(body, specs, counter)
        tagged = any(a.name == "plugin_version" for a in node.attribute)
        custom = node.domain not in ("", "ai.onnx") and node.op_type in specs
        if not (tagged or custom):
            nodes.append(node)
            continue
        spec = specs.get(node.op_type)
        if spec is None:
            raise InputError(f"plugin node '{node.name or node.op_type}' ({node.op_type}): no "
                             "plugin spec describes it; pass the spec file it was written with")
        counter[0] += 1
        nodes.extend(_attention_nodes(node, spec, f"_xattn_plugin{counter[0]}"))
    del graph.node[:]
    graph.node.extend(nodes)


def _attention_nodes(node: onnx.NodeProto, spec: PluginSpec, tag: str) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    made: list[onnx.NodeProto] = []

    def op(op_type: str, inputs: list[str], **kwargs) -> str:
        name = f"{tag}_{len(made)}_{op_type}"
        made.append(helper.make_node(op_type, inputs, [name], name=name, **kwargs))
        return name

    def const(name: str, value: np.ndarray) -> str:
        full = f"{tag}_{name}"
        made.append(helper.make_node("Constant", [], [full], name=full,
                                     value=numpy_helper.from_array(value, full)))
        return full

    inputs = list(node.input)
    mask = inputs.pop() if has_mask_input(spec, len(inputs)) else None
    q, k, v = _unpack(spec, inputs, op, const)
    facts = spec.facts_from_attributes(attrs, head_dim=1)
    if facts.get("causal"):
        raise InputError(f"plugin node '{node.name}': a causal plugin cannot be decomposed")
    if spec.scale == "inverse_sqrt_head_dim" or "scale" not in {
            s for s in spec.attributes.values() if isinstance(s, str)}:
        head = op("Cast", [op("Shape", [q], start=3)], to=onnx.TensorProto.FLOAT)
        scale = op("Reciprocal", [op("Sqrt", [head])])
    else:
        scale = const("scale", np.array([float(facts["scale"])], dtype=np.float32))
    scores = op("MatMul", [q, op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = op("Mul", [op("Cast", [scores], to=onnx.TensorProto.FLOAT), scale])
    if mask is not None:
        scores = op("Add", [scores, op("Cast", [mask], to=onnx.TensorProto.FLOAT)])
    probs = op("Softmax", [scores], axis=-1)
    probs = op("CastLike", [probs, q])
    context = op("MatMul", [probs, v])
    last = "Transpose" if spec.output_layout == "BSNH" else "Identity"
    kwargs = {"perm": _TO_BNSH} if last == "Transpose" else {}
    made.append(helper.make_node(last, [context], [node.output[0]], name=f"{tag}_out", **kwargs))
    return made


def _unpack(spec: PluginSpec, inputs: list[str], op, const) -> tuple[str, str, str]:
    if spec.layout in ("q_kv_packed", "qkv_packed"):
        packed = inputs[-1]
        parts = 2 if spec.layout == "q_kv_packed" else 3
        axis = const("axis3", np.array([3], dtype=np.int64))
        pieces = []
        for index in range(parts):
            start = const(f"start{index}", np.array([index], dtype=np.int64))
            stop = const(f"stop{index}", np.array([index + 1], dtype=np.int64))
            piece = op("Squeeze", [op("Slice", [packed, start, stop, axis]), axis])
            pieces.append(op("Transpose", [piece], perm=_TO_BNSH))
        if parts == 2:
            return op("Transpose", [inputs[0]], perm=_TO_BNSH), pieces[0], pieces[1]
        return pieces[0], pieces[1], pieces[2]
    if spec.layout == "separate_bsnh":
        return tuple(op("Transpose", [name], perm=_TO_BNSH) for name in inputs)  # type: ignore
    return inputs[0], inputs[1], inputs[2]


__all__ = ["decompose_plugins"]
