"""docs/tensorrt.md tells the truth: its commands parse, its Python runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import xattn_compiler as xc
from xattn_compiler.cli import build_parser

from .conftest import zoo_export

DOC = Path(__file__).resolve().parents[2] / "docs" / "tensorrt.md"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_every_command_in_the_guide_parses():
    commands = [line for block in blocks("bash") for line in block.splitlines()
                if line.startswith("xattn-compiler ")]
    assert {shlex.split(c)[1] for c in commands} >= {"build", "lint-trt", "triton-repo"}
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command)[1:])
        assert callable(args.handler), command


def test_the_python_example_runs(tmp_path, monkeypatch, export_cache):
    model = xc.load(zoo_export("whisper-decoder-eager", export_cache).path)
    xc.save(xc.optimize(model).model, tmp_path / "decoder.opt.onnx")
    monkeypatch.chdir(tmp_path)
    [example] = blocks("python")
    exec(example, {})
