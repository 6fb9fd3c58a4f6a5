"""Legacy transformers 4.x TorchScript exports (BART, Whisper, T5, GPT-2, BART and Whisper
decoder steps with their caches): every block found as the config says, every block fused,
outputs verified.

These are what most deployed BART/Whisper/T5/GPT-2 ONNX files are: ``torch.onnx.export``
without dynamo, from transformers 4.x (``tests/fixtures/legacy/make_fixtures.py`` exports
them in environments of their own and records the versions in ``truth.json``). TorchScript
computes every view's target from ``Shape`` at run time, so BART and Whisper 4.36's
``[B*H, T, S]`` scores, viewed as ``[B, H, T, S]`` to add the mask and back, only collapse
once those targets are read as products of dims (``simplify-reshapes``).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest

from xattn_compiler.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
TRUTH = json.loads((FIXTURES / "truth.json").read_text())
NAMES = sorted(TRUTH)
KV_CACHES = [name for name in NAMES if name.endswith("_with_past")]
FUSED_OPS = ("Attention", "MultiHeadAttention")


def cli(*args) -> int:
    return main([str(a) for a in args])


def fixture(name: str) -> Path:
    return FIXTURES / TRUTH[name]["file"]


def fuse_report(name: str, tmp_path: Path, *extra) -> tuple[dict, Path]:
    out, report = tmp_path / "optimized.onnx", tmp_path / "report.json"
    assert cli("optimize", fixture(name), "-o", out, "--report", report, *extra) == 0
    passes = json.loads(report.read_text())["passes"]
    fuse = next(p for p in passes if p["name"] == "fuse-attention")
    return fuse["details"], out


def layout_ops(model: onnx.ModelProto) -> int:
    return sum(node.op_type in ("Transpose", "Reshape") for node in model.graph.node)


@pytest.mark.parametrize("name", NAMES)
def test_legacy_fixture_is_a_small_torchscript_export_of_its_recorded_versions(name):
    truth = TRUTH[name]
    assert fixture(name).stat().st_size < 1 << 20
    model = onnx.load(fixture(name))
    onnx.checker.check_model(model, full_check=True)
    assert model.producer_name == "pytorch" and truth["exporter"] == "torchscript"
    assert truth["transformers"].startswith("4.")
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == \
        truth["opset"]


@pytest.mark.parametrize("name", NAMES)
def test_legacy_inspect_reports_the_config_counts(name, capsys):
    truth = TRUTH[name]
    capsys.readouterr()
    assert cli("inspect", fixture(name), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    kinds = Counter(block["kind"] for block in report["attention"])
    assert kinds == Counter({"self": truth["self"], "cross": truth["cross"]})
    for block in report["attention"]:
        assert block["head_dim"] == truth["head_dim"]
        assert block["num_heads"] == truth["num_heads"]


@pytest.mark.parametrize("name", NAMES)
def test_legacy_optimize_fuses_every_block(name, tmp_path):
    truth = TRUTH[name]
    details, out = fuse_report(name, tmp_path)
    blocks = truth["self"] + truth["cross"]
    assert details["counts"]["blocks_fused"] == blocks, details["skipped"]
    assert details["counts"]["blocks_skipped"] == 0 and not details["skipped"]
    optimized = onnx.load(out)
    assert sum(node.op_type in FUSED_OPS for node in optimized.graph.node) == blocks
    assert not any(node.op_type == "Softmax" for node in optimized.graph.node)


@pytest.mark.parametrize("name", NAMES)
def test_legacy_optimize_verify_passes(name, tmp_path):
    assert cli("optimize", fixture(name), "-o", tmp_path / "out.onnx", "--verify") == 0


@pytest.mark.parametrize("name", KV_CACHES)
def test_legacy_kv_cache_decoder_keeps_its_presents_and_fuses_self_attention(name, tmp_path):
    truth = TRUTH[name]
    details, out = fuse_report(name, tmp_path)
    original, optimized = onnx.load(fixture(name)), onnx.load(out)
    names = [v.name for v in original.graph.output]
    assert [v.name for v in optimized.graph.output] == names
    assert sum(name.startswith("present.") for name in names) == 4 * truth["self"]
    assert sum(block["fused"] for block in details["blocks"]) == truth["self"] + truth["cross"]
    # Each self-attention reads the Concat of past and new K/V, which stays as the present;
    # each cross-attention reads the cached encoder K/V inputs.
    read = [list(node.input) for node in optimized.graph.node if node.op_type in FUSED_OPS]
    for layer in range(truth["self"]):
        for part, prefix in (("decoder", "present"), ("encoder", "past_key_values")):
            kv = [f"{prefix}.{layer}.{part}.key", f"{prefix}.{layer}.{part}.value"]
            assert any(inputs[1:3] == kv for inputs in read), kv


def test_legacy_gpt2_cross_attention_3d_layout_leaves_no_more_layout_ops_than_onnxscript(
        tmp_path):
    ort_fusions = pytest.importorskip("onnxscript.rewriter.ort_fusions")
    onnx_ir = pytest.importorskip("onnx_ir")
    out = tmp_path / "ours.onnx"
    assert cli("optimize", fixture("gpt2_cross"), "-o", out, "--qkv-layout", "3d") == 0
    theirs, _ = ort_fusions.optimize_for_ort(onnx_ir.load(fixture("gpt2_cross")))
    assert layout_ops(onnx.load(out)) <= layout_ops(onnx_ir.to_proto(theirs))


@pytest.fixture(scope="module")
def gpt2_cross_dynamo(export_cache) -> Path:
    """transformers 5 GPT-2 with cross-attention, exported with dynamo (the issue's case): its
    Conv1D flattens the merged heads, and simplify-reshapes makes the merge and the flatten one
    ``Reshape(context, [-1, H*D])``."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    if not transformers.__version__.startswith("5."):
        pytest.skip("the dynamo case is transformers 5's")
    path = export_cache / f"gpt2-cross-dynamo-{transformers.__version__}-{torch.__version__}" \
        / "model.onnx"
    if path.exists():
        return path
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, add_cross_attention=True)
    model = transformers.GPT2LMHeadModel(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, encoder_hidden_states):
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              encoder_hidden_states=encoder_hidden_states, use_cache=False).logits

    batch, seq, enc = (torch.export.Dim(n) for n in ("batch", "seq", "enc"))
    args = (torch.randint(0, 96, (2, 5)), torch.ones(2, 5, dtype=torch.int64),
            torch.randn(2, 7, 32))
    staging = path.parent.with_name(path.parent.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(Logits(), args, str(staging / "model.onnx"), dynamo=True,
                      input_names=["input_ids", "attention_mask", "encoder_hidden_states"],
                      output_names=["logits"],
                      dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                      "attention_mask": {0: batch, 1: seq},
                                      "encoder_hidden_states": {0: batch, 1: enc}})
    staging.replace(path.parent)
    return path


def test_gpt2_cross_attention_3d_layout_reads_the_projections_when_conv1d_flattens_the_merge(
        gpt2_cross_dynamo, tmp_path):
    # Was: the merge [B,S,H*D] fused into Conv1D's [-1, H*D] was not seen as a standard merge,
    # so --qkv-layout 3d fell back to 4-D operands and left 16 Transposes (55 layout ops
    # against onnxscript's 26).
    out = tmp_path / "ours.onnx"
    assert cli("optimize", gpt2_cross_dynamo, "-o", out, "--qkv-layout", "3d", "--verify") == 0
    optimized = onnx.load(out)
    assert sum(node.op_type == "Attention" for node in optimized.graph.node) == 4
    assert not [node.name for node in optimized.graph.node if node.op_type == "Transpose"]
