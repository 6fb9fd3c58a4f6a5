"""Real optimum-onnx merged decoders (Whisper, T5): load, inspect, specialise, split, verify.

The fixtures are tiny models exported by optimum's own exporter
(``tests/fixtures/optimum/make_fixtures.py``); ``truth.json`` holds what their configs say.
Their If branches produce the If's own output names (``present.0.decoder.key``), which ONNX
allows and which the loader once refused as shadowing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest

import xattn_compiler as xc
from xattn_compiler import ir
from xattn_compiler.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "optimum"
TRUTH = json.loads((FIXTURES / "truth.json").read_text())
FAMILIES = sorted(TRUTH)
# If semantics: then_branch runs when the condition is true.
BRANCH_BODY = {"true": "then_branch", "false": "else_branch"}


def cli(*args) -> int:
    return main([str(a) for a in args])


def decoder(family: str) -> Path:
    return FIXTURES / TRUTH[family]["decoder"]


def blocks_by_kind(report: dict, body: str | None = None) -> Counter:
    return Counter(block["kind"] for block in report["attention"]
                   if body is None or block["subgraph"].endswith("/" + body))


def inspect(path: Path, capsys) -> dict:
    capsys.readouterr()
    assert cli("inspect", path, "--json") == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_merged_decoder_loads(family):
    original = onnx.load(decoder(family))
    onnx.checker.check_model(original, full_check=True)  # the file is valid ONNX
    model = xc.load(decoder(family))
    assert [v.name for v in model.graph.output] == [v.name for v in original.graph.output]


@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_inspect_finds_every_block_in_both_branches(family, capsys):
    truth = TRUTH[family]
    report = inspect(decoder(family), capsys)
    for value, body in BRANCH_BODY.items():
        expected = truth["branches"][f"use_cache_branch={value}"]
        assert blocks_by_kind(report, body) == Counter(expected), body
    for block in report["attention"]:
        assert block["head_dim"] == truth["head_dim"]
        # Whisper's Q is reshaped to (B, S, -1, D): its head count is not static in the body.
        assert block["num_heads"] in (truth["num_heads"], None)


@pytest.mark.parametrize("value", ["false", "true"])
@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_specialize_use_cache_branch_verifies(family, value, tmp_path, capsys):
    out = tmp_path / "decoder.onnx"
    assert cli("optimize", decoder(family), "-o", out,
               "--specialize", f"use_cache_branch={value}", "--verify") == 0
    optimized = onnx.load(out)
    onnx.checker.check_model(optimized, full_check=True)
    assert not any(node.op_type == "If" for node in optimized.graph.node)
    original = onnx.load(decoder(family))
    assert [v.name for v in optimized.graph.output] == [v.name for v in original.graph.output]
    expected = TRUTH[family]["branches"][f"use_cache_branch={value}"]
    assert blocks_by_kind(inspect(out, capsys)) == Counter(expected)


@pytest.mark.parametrize("value", ["false", "true"])
@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_split_kv_after_specialisation_verifies(family, value, tmp_path):
    specialised = tmp_path / "decoder.onnx"
    assert cli("optimize", decoder(family), "-o", specialised,
               "--specialize", f"use_cache_branch={value}") == 0
    static = (TRUTH[family]["cross_kv_source"] if value == "false" else
              ",".join(f"past_key_values.{i}.encoder.{kv}"
                       for i in range(TRUTH[family]["decoder_layers"]) for kv in ("key", "value")))
    out = tmp_path / "split"
    assert cli("split-kv", specialised, "-o", out, "--static-inputs", static, "--verify") == 0
    split = json.loads((out / "split.json").read_text())
    layers = TRUTH[family]["decoder_layers"]
    assert len(split["kv"]) == layers
    assert all(entry["key"] and entry["value"] for entry in split["kv"])
    for name in ("kv_projector.onnx", "decoder.onnx"):
        onnx.checker.check_model(onnx.load(out / name), full_check=True)
    assert cli("verify", specialised, out) == 0


@pytest.mark.parametrize("value", ["false", "true"])
@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_default_split_finds_the_static_inputs_after_specialisation(family, value,
                                                                         tmp_path):
    # The no-cache branch also returns its cross K/V (present.N.encoder.key, the head-split
    # projection): the encoder states still feed only K/V, so the default picks them.
    specialised = tmp_path / "decoder.onnx"
    assert cli("optimize", decoder(family), "-o", specialised,
               "--specialize", f"use_cache_branch={value}") == 0
    out = tmp_path / "split"
    assert cli("split-kv", specialised, "-o", out, "--verify") == 0
    split = json.loads((out / "split.json").read_text())
    expected = ([TRUTH[family]["cross_kv_source"]] if value == "false" else
                [f"past_key_values.{i}.encoder.{kv}"
                 for i in range(TRUTH[family]["decoder_layers"]) for kv in ("key", "value")])
    assert split["static_inputs"] == expected
    assert len(split["kv"]) == TRUTH[family]["decoder_layers"]


@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_raw_proto_keeps_branch_and_if_outputs_apart(family):
    # A model not read by xc.load (which renames in place) is separated on import, on a copy.
    raw = onnx.load(decoder(family))
    before = raw.SerializeToString()
    graph = ir.import_graph(raw)
    owner = next(node for node in graph.nodes if node.op == "If")
    outer = {id(t) for t in owner.outputs}
    for body in (owner.attrs["then_branch"], owner.attrs["else_branch"]):
        assert not outer & {id(t) for t in body.outputs}
    assert raw.SerializeToString() == before


@pytest.mark.parametrize("family", FAMILIES)
def test_optimum_optimize_raw_proto(family):
    raw = onnx.load(decoder(family))
    loaded = xc.load(decoder(family))
    specialize = {"use_cache_branch": True}
    result = xc.optimize(raw, specialize=specialize)
    assert xc.verify(xc.optimize(loaded, specialize=specialize).model, result.model).ok
