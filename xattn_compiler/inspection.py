"""``inspect``: the attention report, as JSON (DESIGN.md's contract) and as a table."""

from __future__ import annotations

from typing import Any

import onnx

from .attention import analyze_attention
from .io import default_opset
from .ir import count_nodes

_COLUMNS = (("id", "id"), ("kind", "kind"), ("heads", "num_heads"), ("dim", "head_dim"),
            ("scale", "scale"), ("mask", "mask"), ("K/V from", "kv_source_kind"),
            ("static inputs", "static_inputs"), ("fused", "fused"), ("where", "subgraph"))


#: Passes of the default pipeline that inspect does not run before matching: fusion, and
#: unrolling (a block in a Loop body is one block of the model, reported with its subgraph,
#: not one per iteration; its count is what the model's config says).
_NOT_NORMALISING = ("fuse-attention", "guard-precision", "unroll-control-flow")


def inspect_model(model: onnx.ModelProto, *, name: str = "", explain: bool = False,
                  normalize: bool = True) -> dict[str, Any]:
    """The ``inspect --json`` object for ``model``.

    With ``normalize`` (the default) the blocks are matched after the clean-up passes the
    default pipeline runs before it fuses (folding, layout clean-up; in memory, the file is
    not touched), so the report answers "what will ``optimize`` find?"; ``normalized`` lists
    those passes, and block node names are those of the normalised graph. Control flow is
    not unrolled: a block in a Loop body is reported once, with its subgraph. Without
    ``normalize`` the model is matched as it is (``normalized`` is empty).
    """
    passes: list[str] = []
    matched, keep = model, None
    if normalize:
        matched, passes, keep = _normalized(model)
    report = analyze_attention(matched)
    blocks = [block.to_dict() for block in report.blocks]
    out: dict[str, Any] = {
        "model": name, "opset": default_opset(model), "num_nodes": count_nodes(model),
        "normalized": passes,
        "attention": blocks,
        "summary": {"self": sum(b["kind"] == "self" for b in blocks),
                    "cross": sum(b["kind"] == "cross" for b in blocks)},
    }
    del keep  # the normalised model's detached weights stay readable until here
    if explain:
        out["near_misses"] = [miss.to_dict() for miss in report.near_misses]
    return out


def _normalized(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], Any]:
    """``model`` after the default pipeline's passes up to fusion, their specs, and the result
    that owns the model's detached weights (keep it while using the model)."""
    from .passmanager import Pipeline
    from .pipeline import default_pipeline, optimize

    passes = [p for p in Pipeline.parse(default_pipeline()).passes
              if p.name not in _NOT_NORMALISING]
    result = optimize(model, passes)
    return result.detached, [p.spec() for p in passes], result


def render_table(report: dict[str, Any]) -> str:
    """A readable table: one row per block, then the near-misses when explained."""
    rows = [[header for header, _ in _COLUMNS]]
    for block in report["attention"]:
        rows.append([_cell(key, block.get(key)) for _, key in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [f"{report['model']}: opset {report['opset']}, {report['num_nodes']} nodes, "
             f"{report['summary']['self']} self-attention, {report['summary']['cross']} "
             "cross-attention"
             + (" (matched after optimize's clean-up passes; --raw: as written)"
                if report.get("normalized") else "")]
    if report["attention"]:
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                  for row in rows]
    for miss in report.get("near_misses", []):
        lines.append(f"not attention: Softmax '{miss['anchor']}'"
                     f"{' in ' + miss['subgraph'] if miss['subgraph'] else ''}: {miss['reason']}")
    return "\n".join(lines)


def _cell(key: str, value: Any) -> str:
    if value is None or value == [] or value == "":
        return "-" if key != "subgraph" else "top"
    if key == "scale":
        return f"{value:.4g}"
    if key == "mask":
        return value["kind"]
    if key == "static_inputs":
        return ",".join(value)
    if key == "fused":
        return "yes" if value else "no"
    return str(value)
