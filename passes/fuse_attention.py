"""``fuse-attention``: replace each matched attention block with what a runtime runs fused.

The target (option ``target``) decides what that is; see :mod:`xattn_compiler.fusion`::

    onnx-attention   Attention(q, k, v, [mask])                       (opset 23, the default)
    canonical        MatMul(q * s, K^T) -> [Add mask] -> Softmax -> MatMul(., v)
    ort-mha          com.microsoft.MultiHeadAttention(q_BSE, k, v, .., [bias])
    trt-plugin       fMHCA / fMHA_V2 or a plugin declared in ``plugin-spec``

Per block, the pass first applies the checks every target shares, then asks the target:

1. already one fused op (ONNX Attention, com.microsoft, a plugin): counted as fused, left;
2. an intermediate tensor is read outside the block (``escapes``): rewriting would change
   what that reader sees;
3. the head count or head dim is unknown, or the shapes and head-split targets contradict
   the matcher (a fused op built on a wrong head count changes outputs);
4. ``target.skip_reason(block)``.

Only when some block is left to fuse does the target ``prepare`` the model (an opset
upgrade), after which the blocks are matched again and fused. Blocks inside If/Loop bodies
are fused like the others (bodies follow the model's opset). Counts: ``blocks_fused``,
``blocks_skipped``, ``already_fused``; details: per-block records and skip reasons.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import onnx

from xattn_compiler.attention import AttentionMatch, find_attention
from xattn_compiler.fusion import FusionTarget, load_target
from xattn_compiler.fusion.operands import head_problem
from xattn_compiler.fusion.opset import OpsetUpgradeError
from xattn_compiler.ir import export_model, import_graph, import_with_shapes, infer_shapes
from xattn_compiler.passmanager import Option, Pass, PassResult

from .reshapes import Names

log = logging.getLogger(__name__)


def common_skip_reason(block: AttentionMatch, target: FusionTarget) -> str | None:
    """The checks every target shares (see the module docstring), or None."""
    if block.fused and not target.rewrites_fused:
        return f"already fused as {block.op}"
    if block.escapes:
        return "intermediate tensors escape: " + "; ".join(block.escapes)
    return head_problem(block)


class FuseAttention(Pass):
    """Replace each attention block with one fused node (or the canonical core)."""

    name = "fuse-attention"
    description = ("replace each attention block with the target's fused node: ONNX Attention, "
                   "canonical core, TensorRT plugin, com.microsoft MultiHeadAttention")
    options = (
        Option("target", str, "onnx-attention",
               "onnx-attention | canonical | ort-mha | trt-plugin"),
        Option("qkv-layout", str, "4d",
               "onnx-attention: 4d (Q/K/V as [B,H,S,D], what TensorRT 10.14 parses) or 3d (the "
               "projection outputs [B,S,H*D]; head splits and merges go)"),
        Option("plugin-spec", str, "",
               "trt-plugin: a TOML/JSON plugin spec (empty: the fMHCA/fMHA_V2 presets)"),
    )
    run_after = ("canonicalize", "remove-layout-clutter")
    #: The random-graph properties run once per target (tests/properties).
    property_variants = (*({"target": target} for target in
                           ("onnx-attention", "canonical", "ort-mha", "trt-plugin")),
                         {"target": "onnx-attention", "qkv-layout": "3d"})

    def target(self) -> FusionTarget:
        options: dict[str, Any] = {key.replace("-", "_"): value for key, value in self.values.items()}
        return load_target(self.values["target"])(options)

    #: Fusing can teach shape inference what it could not see (inside If/Loop bodies, a core
    #: whose rank was unknown gets shapes once the export moves outer constants in): the pass
    #: matches again after each round, so a second run has nothing left to do.
    max_rounds: ClassVar[int] = 4

    def run(self, model: onnx.ModelProto) -> PassResult:
        target = self.target()
        graph = import_with_shapes(model)
        decisions = self._decide(find_attention(graph), target)
        if not any(reason is None for _, reason in decisions):
            return PassResult(model, False, *self._report(decisions, {}))
        try:
            prepared = target.prepare(model)
        except OpsetUpgradeError as exc:
            decisions = [(b, r if r is not None else str(exc)) for b, r in decisions]
            return PassResult(model, False, *self._report(decisions, {}))
        if prepared is not model:
            graph = import_with_shapes(prepared)
            decisions = self._decide(find_attention(graph), target)
        fused: dict[str, list[str]] = {}
        already = sum(1 for block, reason in decisions if block.fused and reason is not None)
        out = prepared
        for _ in range(self.max_rounds):
            todo = [block for block, reason in decisions if reason is None]
            if not todo:
                break
            with Names.shared():  # one walk of each graph's names per round, not per block
                for block in todo:
                    key = f"{block.subgraph}/{block.id}" if block.subgraph else block.id
                    fused[f"{key}#{len(fused)}"] = [node.name for node in target.fuse(block)]
            out = infer_shapes(export_model(graph, prepared), in_place=True)
            if not any(block.subgraph for block, _ in decisions):
                # At the top level shapes were known already: matching again finds nothing
                # new (the decisions' fused blocks are left out of the report).
                break
            graph = import_graph(out)
            decisions = self._decide(find_attention(graph), target)
        out = target.finish(out)
        counts, details = self._report(decisions, fused, already)
        return PassResult(out, bool(fused), counts, details)

    def _decide(self, blocks: list[AttentionMatch], target: FusionTarget
                ) -> list[tuple[AttentionMatch, str | None]]:
        decisions = []
        for block in blocks:
            reason = common_skip_reason(block, target) or target.skip_reason(block)
            if reason is not None:
                log.info("fuse-attention{target=%s}: %s%s left: %s", target.name,
                         f"{block.subgraph}/" if block.subgraph else "", block.id, reason)
            decisions.append((block, reason))
        return decisions

    def _report(self, decisions, fused: dict[str, list[str]], already: int | None = None):
        """Counts and details: what was fused (with the nodes that replaced it) and what was
        left, by reason. ``decisions`` are those of the final graph; ``already``: how many
        blocks were one fused op before the pass (and stayed so)."""
        reasons: dict[str, int] = {}
        records = [{"block": key.split("#")[0], "fused": True, "nodes": nodes}
                   for key, nodes in fused.items()]
        created = {name for nodes in fused.values() for name in nodes}
        for block, reason in decisions:
            if reason is None or (block.fused and block.nodes[0].name in created):
                continue
            records.append({"block": f"{block.subgraph}/{block.id}" if block.subgraph else block.id,
                            "kind": block.kind, "fused": False, "op": block.op, "reason": reason})
            reasons[reason] = reasons.get(reason, 0) + 1
        if already is None:
            already = sum(1 for block, reason in decisions if block.fused and reason is not None)
        counts = {"blocks_fused": len(fused),
                  "blocks_skipped": sum(1 for block, reason in decisions
                                        if not block.fused and reason is not None),
                  "already_fused": already}
        details = {"target": self.values["target"], "blocks": records, "skipped": reasons}
        return counts, details


__all__ = ["FuseAttention", "common_skip_reason"]
