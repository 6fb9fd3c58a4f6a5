"""The main job on real exports: transformers' Whisper decoder, dynamo exporter, opset 18.

The exports are the zoo's ``whisper-decoder-eager`` and ``whisper-decoder-sdpa``: the real
`transformers` architecture built from a small config (nothing is downloaded), cached on disk;
see xattn_compiler/zoo/families/whisper.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import xattn_compiler as xc
from xattn_compiler.cli import main
from xattn_compiler.examples import example_path, example_sample
from xattn_compiler.ir import count_nodes
from xattn_compiler.zoo import cached_export

pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["whisper-decoder-eager", "whisper-decoder-sdpa"])
def whisper_export(request, export_cache):
    return cached_export(request.param, export_cache)


@pytest.fixture(scope="module")
def whisper_decoder(whisper_export):
    return whisper_export.path


def test_optimized_whisper_decoder_matches_torch(whisper_export, whisper_decoder):
    model = xc.load(whisper_decoder)
    result = xc.optimize(model, debug=True)
    assert count_nodes(result.model) <= count_nodes(model)
    inputs, references = whisper_export.sample()
    check = xc.verify(model, result.model, inputs=inputs)
    assert check.ok, check.summary()
    from xattn_compiler.verification import run_model

    logits = run_model(result.model, inputs)["logits"]
    np.testing.assert_allclose(logits, references["logits"], rtol=1e-3,
                               atol=1e-4 * max(1.0, float(np.abs(references["logits"]).max())))


def test_optimize_cli_on_whisper_decoder(whisper_decoder, tmp_path):
    out = tmp_path / "opt.onnx"
    assert main(["optimize", str(whisper_decoder), "-o", str(out), "--verify", "-q"]) == 0
    assert main(["verify", str(whisper_decoder), str(out), "-q"]) == 0
    assert count_nodes(onnx.load(out)) <= count_nodes(onnx.load(whisper_decoder))


def test_optimized_example_matches_the_torch_reference():
    inputs, references = example_sample()
    result = xc.optimize(xc.load(example_path()))
    from xattn_compiler.verification import run_model

    outputs = run_model(result.model, inputs)
    for name, reference in references.items():
        scale = max(1.0, float(np.abs(reference).max()))
        np.testing.assert_allclose(outputs[name], reference, rtol=1e-3, atol=1e-4 * scale)


def test_optimizing_twice_changes_nothing_the_second_time(whisper_decoder):
    once = xc.optimize(xc.load(whisper_decoder))
    twice = xc.optimize(once.model)
    assert not twice.pipeline.changed
    assert twice.model.SerializeToString() == once.model.SerializeToString()
