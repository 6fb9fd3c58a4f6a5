"""The share of planted attention blocks the default ``optimize`` fuses, per drawn spelling.

    python benchmarks/bench_fusion_rate.py [--n 20] [--only head_layout] [--out benchmarks/results]

Issue 17's judges count "blocks fused / blocks in the truth" on a random-graph generator we
never see. This measures the same on ours (:mod:`xattn_compiler.testing.strategies`): for each
value of each :class:`~xattn_compiler.testing.AttentionSpec` option and each cross-attention
context kind, ``--n`` models are drawn from :func:`~xattn_compiler.testing.strategies.recipes`
(1..2 layers, everything else random) with every block that can take the value given it; a
``random`` row draws the recipes unchanged. The draws are reproducible: Hypothesis generates
them with ``derandomize=True`` and no database, no shrinking, so the same ``--n`` and
Hypothesis version give the same models.

Each model runs through the default pipeline in memory (``xc.optimize``, what the CLI runs);
"found" is ``inspect``'s count (after the same normalisation), "fused" the fuse pass's count.
The blocks of a row are all the blocks of its models (an ``internal`` context's encoder and
blocks that cannot take the value, e.g. cross-attention beside ``rope``, are counted too).
Skip reasons of the unfused blocks are tallied per row. Writes ``fusion_rate.md`` and
``fusion_rate.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import xattn_compiler as xc
from xattn_compiler.inspection import inspect_model
from xattn_compiler.testing import strategies as S
from xattn_compiler.testing.builders import CONTEXT_KINDS, spec_conflicts

HERE = Path(__file__).resolve().parent
# Options that are sizes or precision rather than spellings, and the kind itself (the
# random row mixes kinds; a kind row would only repeat it).
_NOT_SPELLINGS = ("kind", "num_heads", "head_dim")


def cases() -> list[tuple[str, Any]]:
    """(option, value) rows: ``("random", None)``, each spec option value, each context."""
    rows: list[tuple[str, Any]] = [("random", None)]
    for name, values in S.SPEC_CHOICES.items():
        if name not in _NOT_SPELLINGS:
            rows += [(name, v) for v in values]
    rows += [("context", c) for c in CONTEXT_KINDS]
    return rows


def _kinds(name: str, value: Any) -> tuple[str, ...]:
    if name == "context":
        return ("cross",)
    if name == "random":
        return S.KINDS
    return tuple(k for k in S.KINDS if not spec_conflicts(kind=k, **{name: value})) or S.KINDS


def _pinned(draw, spec, name: str, value: Any, embed: int, **extra: Any):
    """``spec`` with ``name=value``, redrawn around it; ``spec`` itself when it cannot be."""
    pins = {name: value, **extra}
    if name == "out_projection" and not value:
        # Without an out projection the block's width feeds the residual: it must be embed.
        pins.update(num_heads=2, head_dim=embed // 2)
    if spec_conflicts(kind=spec.kind, dtype=spec.dtype, **pins):
        return spec
    return draw(S.attention_specs(kind=spec.kind, dtype=spec.dtype, embed=embed, **pins))


@st.composite
def varied_recipes(draw, name: str, value: Any) -> S.Recipe:
    if name == "dtype":  # one precision per model: the recipe's
        return draw(S.recipes(max_layers=2, dtype=value))
    recipe = draw(S.recipes(max_layers=2, kinds=_kinds(name, value)))
    if name == "random":
        return recipe
    if name == "context":
        if recipe.context == value or not any(
                s.kind == "cross" and s.projection != "none"
                for layer in recipe.layers for s in layer.attention):
            return recipe
        return _with_context(draw, recipe, value)
    layers = tuple(replace(layer, attention=tuple(
        _pinned(draw, s, name, value, recipe.embed) for s in layer.attention))
        for layer in recipe.layers)
    layers = tuple(S._one_bias_shape(list(layers)))
    recipe = replace(recipe, layers=layers)
    if recipe.encoder is not None:
        recipe = replace(recipe, encoder=_pinned(
            draw, recipe.encoder, name, value, recipe.context_embed or recipe.embed,
            mask="none", rope="none", kv_cache=False) if name not in (
                "mask", "rope", "kv_cache") else recipe.encoder)
    if recipe.context == "initializer" and any(
            s.kind == "cross" and s.head_layout != "4d" for layer in layers
            for s in layer.attention):
        # A batch-1 context broadcasts only over 4-D heads: keep the spelling, change context.
        recipe = replace(recipe, context="input", context_embed=recipe.context_embed)
    return recipe


def _with_context(draw, recipe: S.Recipe, context: str) -> S.Recipe:
    encoder = None
    width = recipe.context_embed
    if context == "internal":
        encoder = draw(S.attention_specs(kind="self", dtype=recipe.dtype, mask="none",
                                         rope="none", kv_cache=False,
                                         embed=width or recipe.embed))
    layers = recipe.layers
    if context == "initializer":
        layers = tuple(replace(layer, attention=tuple(
            replace(s, head_layout="4d") if s.kind == "cross" and s.projection != "none"
            and s.head_layout != "4d" else s for s in layer.attention)) for layer in layers)
    return replace(recipe, layers=layers, context=context, encoder=encoder)


def draw_recipes(name: str, value: Any, n: int) -> list[S.Recipe]:
    """``n`` recipes for a row, the same ones on every run (derandomized generation)."""
    out: list[S.Recipe] = []

    @settings(max_examples=n, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), deadline=None)
    @given(varied_recipes(name, value))
    def collect(recipe):
        out.append(recipe)

    collect()
    return out[:n]


def _skip_reasons(report: dict[str, Any]) -> list[str]:
    reasons = []
    for step in report["passes"]:
        if step["name"] != "fuse-attention":
            continue
        for block in step["details"].get("blocks", []):
            if not block.get("fused"):
                reason = str(block.get("reason") or block.get("skipped") or "?")
                # Node names differ per model; the reason class is what is tallied.
                reasons.append(re.sub(r"'[^']*'", "'…'", reason))
    return reasons


def measure(recipe: S.Recipe) -> dict[str, Any]:
    example = S.build_example(recipe)
    truth = len(example.blocks)
    found = len(inspect_model(example.model)["attention"])
    result = xc.optimize(example.model)
    report = result.report
    fused = sum(step["details"]["counts"].get("blocks_fused", 0)
                for step in report["passes"] if step["name"] == "fuse-attention")
    reasons = _skip_reasons(report)
    reasons += ["not found"] * max(truth - max(found, fused), 0)
    return {"blocks": truth, "found": found, "fused": fused, "reasons": reasons,
            "recipe": repr(recipe)}


def run_row(name: str, value: Any, n: int) -> dict[str, Any]:
    start = time.perf_counter()
    row = {"option": name, "value": value, "models": 0, "blocks": 0, "found": 0, "fused": 0,
           "reasons": Counter(), "unfused_recipes": []}
    for recipe in draw_recipes(name, value, n):
        try:
            m = measure(recipe)
        except Exception as exc:  # a crash is a row fact, not the end of the benchmark
            m = {"blocks": sum(len(layer.attention) for layer in recipe.layers), "found": 0,
                 "fused": 0, "reasons": [f"crash: {type(exc).__name__}: {exc}"[:200]],
                 "recipe": repr(recipe)}
        row["models"] += 1
        for key in ("blocks", "found", "fused"):
            row[key] += m[key]
        row["reasons"].update(m["reasons"])
        if m["fused"] < m["blocks"] and len(row["unfused_recipes"]) < 3:
            row["unfused_recipes"].append(m["recipe"])
    row["reasons"] = dict(row["reasons"].most_common())
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.0f}%" if b else "-"


def markdown(rows: list[dict[str, Any]], n: int) -> str:
    lines = [f"# Fusion rate on drawn spellings (N={n} models per row)", "",
             "`python benchmarks/bench_fusion_rate.py --n " + str(n) + "`", "",
             "| spelling | blocks | found by inspect | fused | % fused | skip reasons |",
             "|---|---|---|---|---|---|"]
    total = Counter()
    for r in rows:
        label = "random recipes" if r["option"] == "random" else f"{r['option']}={r['value']}"
        reasons = "; ".join(f"{k} ({v})" for k, v in list(r["reasons"].items())[:3])
        lines.append(f"| {label} | {r['blocks']} | {r['found']} | {r['fused']} | "
                     f"{_pct(r['fused'], r['blocks'])} | {reasons.replace('|', '/')} |")
        total.update({k: r[k] for k in ("blocks", "found", "fused")})
    lines += ["", f"All rows: {total['fused']} of {total['blocks']} blocks fused "
              f"({_pct(total['fused'], total['blocks'])}), {total['found']} found."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--only", help="only the rows of this option (e.g. head_layout)")
    parser.add_argument("--show", action="store_true",
                        help="print up to 3 recipes per row whose blocks were not all fused")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows = []
    for name, value in cases():
        if args.only and name not in (args.only, "random"):
            continue
        row = run_row(name, value, args.n)
        rows.append(row)
        print(f"{name}={value}: {row['fused']}/{row['blocks']} fused "
              f"({_pct(row['fused'], row['blocks'])}), {row['found']} found, "
              f"{row['seconds']}s {row['reasons'] if row['reasons'] else ''}", flush=True)
        if args.show:
            for recipe in row["unfused_recipes"]:
                print("   ", recipe)
    text = markdown(rows, args.n)
    print(text)
    if not args.only:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fusion_rate.md").write_text(text)
        (args.out / "fusion_rate.json").write_text(
            json.dumps({"n": args.n, "rows": rows}, indent=1, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
