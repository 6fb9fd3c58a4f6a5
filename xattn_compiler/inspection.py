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


def inspect_model(model: onnx.ModelProto, *, name: str = "", explain: bool = False) -> dict[str, Any]:
    """The ``inspect --json`` object for ``model``."""
    report = analyze_attention(model)
    blocks = [block.to_dict() for block in report.blocks]
    out: dict[str, Any] = {
        "model": name, "opset": default_opset(model), "num_nodes": count_nodes(model),
        "attention": blocks,
        "summary": {"self": sum(b["kind"] == "self" for b in blocks),
                    "cross": sum(b["kind"] == "cross" for b in blocks)},
    }
    if explain:
        out["near_misses"] = [miss.to_dict() for miss in report.near_misses]
    return out


def render_table(report: dict[str, Any]) -> str:
    """A readable table: one row per block, then the near-misses when explained."""
    rows = [[header for header, _ in _COLUMNS]]
    for block in report["attention"]:
        rows.append([_cell(key, block.get(key)) for _, key in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [f"{report['model']}: opset {report['opset']}, {report['num_nodes']} nodes, "
             f"{report['summary']['self']} self-attention, {report['summary']['cross']} "
             "cross-attention"]
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
