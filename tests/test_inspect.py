"""inspect: the JSON contract of DESIGN.md, the table, and --explain."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import helper, numpy_helper

from xattn_compiler.cli import main
from xattn_compiler.examples import example_manifest, example_path

REQUIRED = {"id", "kind", "num_heads", "head_dim", "q_source", "k_source", "v_source",
            "kv_source_kind", "static_inputs", "fused", "subgraph", "nodes"}


def inspect_json(path, *extra) -> dict:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", str(path), "--json", *extra]) == 0
    return json.loads(out.getvalue())


def test_json_follows_the_design_contract():
    report = inspect_json(example_path())
    assert set(report) >= {"model", "opset", "num_nodes", "attention", "summary"}
    assert report["opset"] == 18
    for block in report["attention"]:
        assert REQUIRED <= set(block)
        assert block["kind"] in ("self", "cross")
        assert block["kv_source_kind"] in ("graph_input", "constant", "internal")
    assert [b["id"] for b in report["attention"]] == [f"attn_{i}" for i in range(4)]


def test_example_counts_match_its_manifest():
    truth = example_manifest()["attention"]
    report = inspect_json(example_path())
    assert report["summary"] == {"self": truth["self"], "cross": truth["cross"]}
    for block in report["attention"]:
        assert (block["num_heads"], block["head_dim"]) == (truth["num_heads"], truth["head_dim"])
        assert block["scale"] == 0.25  # q * head_dim**-0.5, applied before the head split


def test_example_cross_attention_reads_the_encoder_states():
    cross = [b for b in inspect_json(example_path())["attention"] if b["kind"] == "cross"]
    for block in cross:
        assert block["k_source"] == block["v_source"] == "encoder_hidden_states"
        assert block["static_inputs"] == ["encoder_hidden_states"]
        assert block["kv_source_kind"] == "graph_input"
        assert not block["escapes"]


def test_table_names_every_block(capsys):
    assert main(["inspect", str(example_path())]) == 0
    out = capsys.readouterr().out
    assert "2 self-attention, 2 cross-attention" in out
    assert [line.split()[0] for line in out.splitlines()[2:]] == [f"attn_{i}" for i in range(4)]


def classifier(tmp_path):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Softmax", ["h"], ["p"], axis=-1),
         helper.make_node("MatMul", ["p", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4])], [w1, w2])
    path = tmp_path / "softmax_between_weights.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def test_explain_says_why_a_softmax_is_not_attention(tmp_path):
    report = inspect_json(classifier(tmp_path), "--explain")
    assert report["attention"] == []
    (miss,) = report["near_misses"]
    assert "2-D" in miss["reason"]


def test_no_attention_prints_an_empty_report(tmp_path, capsys):
    assert main(["inspect", str(classifier(tmp_path)), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "0 self-attention, 0 cross-attention" in out and "not attention" in out


def test_bad_input_exits_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing.onnx")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_inspect_matches_after_the_clean_up_optimize_runs_and_says_so(tmp_path):
    # A user asks inspect "will my attention be found?": it answers for the graph optimize
    # fuses (after canonicalize and the layout clean-up, in memory), names those passes, and
    # every block it reports is one Attention node after optimize.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    from synthetic import decoder

    import xattn_compiler as xc

    path = tmp_path / "cluttered.onnx"
    onnx.save(decoder(2, clutter=True), path)
    before = path.read_bytes()
    report = inspect_json(path)
    assert {"canonicalize", "remove-layout-clutter"} <= set(report["normalized"])
    assert not {"fuse-attention", "unroll-control-flow"} & set(report["normalized"])
    assert report["num_nodes"] == len(onnx.load(path).graph.node)  # the file's, not the cleaned
    fused = xc.optimize(xc.load(path)).model
    assert sum(n.op_type == "Attention" for n in fused.graph.node) == len(report["attention"]) == 4
    assert path.read_bytes() == before
    raw = inspect_json(path, "--raw")
    assert raw["normalized"] == [] and raw["summary"] == report["summary"]


def test_inspect_counts_a_loop_body_block_once(export_cache):
    # Unrolling is not part of inspect's clean-up: a block in a Loop body is one block of the
    # model (its subgraph says where), as the model's config counts it; optimize unrolls and
    # fuses one block per iteration. Normalising with unrolling reported 3 self + 3 cross.
    import pytest

    pytest.importorskip("torch")
    from tests.models import small_zoo_export

    exported = small_zoo_export("loop-cross-attention", export_cache)
    report = inspect_json(exported.path)
    truth = exported.manifest["attention"]
    assert report["summary"] == {"self": truth["self"], "cross": truth["cross"]}
    assert all(block["subgraph"] for block in report["attention"])
