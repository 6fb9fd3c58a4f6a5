"""``guard-precision``: keep each attention block's score MatMul and Softmax in float32.

In an fp16/bf16 model the scores ``Q K^T`` and their Softmax are where half precision loses
most (large logits, sums of many small probabilities). For each block::

    unfused core    MatMul(q, k_t) -> chain -> Softmax        (half)
                 -> MatMul(Cast32(q), Cast32(k_t)) -> chain' -> Softmax -> Cast(half)
                    (chain': the same steps in float32, their masks and constants cast)
    ONNX Attention  softmax_precision = FLOAT

Nothing changes numerically for the worse: every value is computed at least as precisely.
Blocks already in float32 need no cast; for all blocks the pass records the names of the score
MatMul and Softmax nodes (and fused Attention nodes) in the model's metadata under
``xattn_compiler.fp32_layers``, so the TensorRT stage can constrain those layers to fp32 when
it builds a float32 model with ``--fp16`` (``--layerPrecisions``, obeyed constraints).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from xattn_compiler.patterns.steps import Cast, core_steps

from xattn_compiler.attention import AttentionMatch, find_attention
from xattn_compiler.ir import export_model, import_with_shapes, infer_shapes, iter_graphs
from xattn_compiler.passmanager import Pass, PassResult

from .reshapes import Names, onnx_dtype, set_input

log = logging.getLogger(__name__)

METADATA_KEY = "xattn_compiler.fp32_layers"
_HALF = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
_FLOAT = onnx.TensorProto.FLOAT


class GuardPrecision(Pass):
    """Score MatMul and Softmax of every attention block in float32."""

    name = "guard-precision"
    description = ("run each attention block's score MatMul and Softmax in fp32 and list them "
                   "for the TensorRT build's layer precision constraints")
    run_after = ("fuse-attention",)

    def run(self, model: onnx.ModelProto) -> PassResult:
        graph = import_with_shapes(model)
        counts = {"cores_cast": 0, "attention_pinned": 0}
        layers: list[str] = []
        with Names.shared():
            blocks = find_attention(graph)
            for block in blocks:
                if block.core is not None and not block.escapes:
                    counts["cores_cast"] += _cast_core(block)
                    layers += [block.core["scores.node"].name, block.core["softmax.node"].name]
                elif block.fused and block.op == "Attention":
                    node = block.nodes[0]
                    if onnx_dtype(node.inputs[0]) in _HALF and node.attrs.get("softmax_precision") != _FLOAT:
                        node.attrs["softmax_precision"] = _FLOAT
                        counts["attention_pinned"] += 1
                    layers.append(node.name)
        changed = any(counts.values())
        out = infer_shapes(export_model(graph, model), in_place=True) if changed else _copy(model)
        recorded = _metadata(out).get(METADATA_KEY)
        # Layers pinned by an earlier run stay listed while they exist: the cast it added can
        # put a block's probabilities chain beyond what the matcher walks, and the block's
        # score MatMul and Softmax are still the ones to keep in fp32.
        existing = {node.name for _, body in iter_graphs(graph) for node in body.nodes}
        kept = [name for name in (recorded or "").split(",") if name in existing]
        layers = sorted({name for name in [*layers, *kept] if name})
        wanted = ",".join(layers) if layers else None
        if wanted != recorded:
            _set_metadata(out, METADATA_KEY, wanted)
            changed = True
        return PassResult(out, changed, counts, {"fp32_layers": layers})


def _cast_core(block: AttentionMatch) -> int:
    """Move one half-precision core's scores chain to float32; 1 if it did, else 0."""
    core = block.core
    scores, softmax = core["scores.node"], core["softmax.node"]
    if onnx_dtype(scores.outputs[0]) not in _HALF:
        return 0
    half = onnx_dtype(scores.outputs[0])
    names = Names.of(block.graph)
    chain, _, _ = core_steps(core.steps)

    def cast(tensor: gs.Tensor, to: int, hint: str) -> gs.Tensor:
        out = gs.Variable(names.fresh(f"{hint}_fp32" if to == _FLOAT else f"{hint}_half"),
                          dtype=onnx.helper.tensor_dtype_to_np_dtype(to))
        block.graph.nodes.append(gs.Node("Cast", names.fresh(out.name, node=True), {"to": to},
                                         [tensor], [out]))
        return out

    for index in (0, 1):
        set_input(scores, index, cast(scores.inputs[index], _FLOAT, scores.inputs[index].name))
    # Every node from the score MatMul to Softmax now computes in float32: its other float
    # inputs (masks, scale constants, Where fills) follow, and a Cast inside goes to float32.
    for step in chain:
        node = step.node
        if isinstance(step, Cast):
            node.attrs["to"] = _FLOAT
        for index, other in enumerate(node.inputs):
            if other is not step.data and onnx_dtype(other) in _HALF:
                set_input(node, index, cast(other, _FLOAT, other.name))
    probs = softmax.outputs[0]
    probs_were_half = onnx_dtype(probs) in _HALF
    for t in [scores.outputs[0], *(step.output for step in chain), probs]:
        t.dtype = np.float32
    if not probs_were_half:
        return 1  # the Softmax ran in float32 already: its readers expect float32
    readers = list(probs.outputs)
    back = cast(probs, half, probs.name)
    for reader in readers:
        for index, t in enumerate(reader.inputs):
            if t is probs:
                set_input(reader, index, back)
    return 1


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in model.metadata_props}


def _set_metadata(model: onnx.ModelProto, key: str, value: str | None) -> None:
    kept = [entry for entry in model.metadata_props if entry.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if value is not None:
        model.metadata_props.add(key=key, value=value)


__all__ = ["METADATA_KEY", "GuardPrecision"]
