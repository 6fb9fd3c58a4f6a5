"""Every zoo model and every committed real-export fixture, held to the truth of its config.

The truth comes from each model's config (the zoo manifest's ``attention``; a fixture folder's
``truth.json``), never from the exported graph. On the file as exported, what a user runs is
judged: ``inspect`` (which matches after the pipeline's in-memory clean-up) reports exactly the
config's self/cross counts, heads and head dims and no escaping block; ``optimize`` fuses every
block; the optimized model's outputs equal the original's in ONNX Runtime. Exports come from
the zoo's cache, so a warm run only matches, fuses and runs.

A case out of reach today is listed in ``KNOWN_GAPS`` with why; it is an xfail(strict=True),
so it fails loudly on the day it starts to pass.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import pytest
from xattn_compiler.passes.control_flow import verify_specialized

import xattn_compiler as xc
from xattn_compiler.inspection import inspect_model
from xattn_compiler.zoo import all_models, cache
from xattn_compiler.zoo.export import fused_attention_count, requirements_missing
from xattn_compiler.zoo.families import known_gaps

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures"
ZOO = [m.name for m in all_models() if "small" in m.sizes]

#: Zoo recipes kept out of the zoo's MODELS because a check fails today (``KNOWN_GAPS`` of
#: their family), held to their truth here all the same.
GAP_MODELS = {name: model for name, (model, _) in known_gaps().items()}
#: (case, check) -> why it fails today. check: "counts", "heads", "escapes", "fused", "verify".
KNOWN_GAPS: dict[tuple[str, str], str] = {
    ("gemma2-decoder", "fused"): "logit softcapping: TensorRT's Attention has no softcap",
}


def _fixture_cases() -> dict[str, tuple[Path, dict[str, Any]]]:
    """``folder/entry`` -> (file, truth) for every ``tests/fixtures/*/truth.json`` entry.

    An entry names its file as ``file`` (or ``decoder``); a merged decoder's truth is per If
    branch (``branches``), and inspect reports the blocks of both branches.
    """
    cases = {}
    for truth_file in sorted(FIXTURES.glob("*/truth.json")):
        for entry, truth in sorted(json.loads(truth_file.read_text()).items()):
            path = truth_file.parent / truth.get("file", truth.get("decoder", ""))
            if not path.is_file():
                continue
            if "branches" in truth:
                branches = truth["branches"].values()
                truth = {**truth, "self": sum(b["self"] for b in branches),
                         "cross": sum(b["cross"] for b in branches)}
            cases[f"{truth_file.parent.name}/{entry}"] = (path, truth)
    return cases


FIXTURE_CASES = _fixture_cases()


@dataclass
class Case:
    """A raw file, its truth, what inspect reports on it, and what optimize made of it: one
    optimized model, or one per value of the If condition a user specialises on."""

    name: str
    path: Path
    truth: dict[str, Any]
    inputs: dict[str, Any] | None
    manifest: dict[str, Any] | None
    report: dict[str, Any]
    optimized: list[tuple[dict[str, bool], onnx.ModelProto]]


def _optimized(raw: onnx.ModelProto) -> list[tuple[dict[str, bool], onnx.ModelProto]]:
    """``optimize`` as a user runs it. A model that branches on a graph input (a merged
    decoder's ``use_cache_branch``) is specialised on each value (``--specialize``), as the
    pipeline asks before it fuses a branch."""
    inputs = {value.name for value in raw.graph.input}
    conditions = sorted({n.input[0] for n in raw.graph.node
                         if n.op_type == "If" and n.input[0] in inputs})
    if not conditions:
        return [({}, xc.optimize(raw).model)]
    return [(values, xc.optimize(raw, specialize=values).model)
            for values in (dict.fromkeys(conditions, True), dict.fromkeys(conditions, False))]


def _load_case(name: str, export_cache: Path) -> tuple[Path, dict[str, Any], dict | None,
                                                       dict | None]:
    if name in FIXTURE_CASES:
        path, truth = FIXTURE_CASES[name]
        return path, truth, None, None
    model = GAP_MODELS.get(name) or next(m for m in all_models() if m.name == name)
    missing = requirements_missing(model)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    exported = cache.cached_export(model, "small", export_cache)
    return exported.path, exported.manifest["attention"], exported.sample()[0], exported.manifest


@pytest.fixture(scope="module", params=[*ZOO, *GAP_MODELS, *FIXTURE_CASES])
def case(request, export_cache) -> Case:
    path, truth, inputs, manifest = _load_case(request.param, export_cache)
    raw = onnx.load(path)
    return Case(request.param, path, truth, inputs, manifest, inspect_model(raw),
                _optimized(raw))


@pytest.fixture(autouse=True)
def _known_gap(request):
    """A known gap must fail (xfail); one that passes fails the test (strict). The check is
    the first word of the test's name."""
    params = getattr(request.node, "callspec", None)
    name = params.params.get("case") if params else None
    check = request.node.originalname.removeprefix("test_").split("_", 1)[0]
    reason = KNOWN_GAPS.get((name, check)) if name else None
    if reason:
        request.node.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    yield


def test_counts_equal_the_truth(case):
    assert case.report["summary"] == {"self": case.truth["self"], "cross": case.truth["cross"]}


def test_heads_and_head_dims_equal_the_truth(case):
    blocks = case.report["attention"]
    if case.truth.get("blocks"):
        expected = Counter((b["cross"], b["num_heads"], b["head_dim"]) for b in case.truth["blocks"])
        found = Counter((b["kind"] == "cross", b["num_heads"], b["head_dim"]) for b in blocks)
        assert found == expected
    elif case.truth.get("num_heads") is not None:
        assert {(b["num_heads"], b["head_dim"]) for b in blocks} == {
            (case.truth["num_heads"], case.truth["head_dim"])}


def test_escapes_none(case):
    assert [(b["id"], b["escapes"]) for b in case.report["attention"] if b["escapes"]] == []


def test_fused_every_block(case):
    """Every block fused; a Loop the pipeline unrolls holds its body's blocks once per step
    (the config's ``loop_steps``; the truth counts the body once)."""
    steps = (case.manifest or {}).get("config", {}).get("loop_steps", 1)
    total = (case.truth["self"] + case.truth["cross"]) * steps
    assert sum(fused_attention_count(optimized) for _, optimized in case.optimized) == total


def test_verify_outputs(case):
    raw = onnx.load(case.path)
    for values, optimized in case.optimized:
        result = (verify_specialized(raw, optimized, values) if values
                  else xc.verify(raw, optimized, inputs=case.inputs))
        assert result.ok, [c for c in result.checks if not c.ok]


def test_kv_facts_equal_the_manifest(case):
    """Where cross K/V come from and which inputs feed only them, as the zoo manifest records
    (fixtures do not record them)."""
    if case.manifest is None:
        pytest.skip("a fixture's truth.json records no K/V facts")
    cross = [b for b in case.report["attention"] if b["kind"] == "cross"]
    # A model without cross-attention (a RoPE decoder) has no cross K/V to describe.
    expected = {case.manifest["kv_source_kind"]} if case.truth["cross"] else set()
    assert {b["kv_source_kind"] for b in cross} == expected
    found_static = sorted({name for b in cross for name in b["static_inputs"]})
    assert found_static == sorted(case.manifest["static_inputs"])
