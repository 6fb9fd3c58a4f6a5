"""The files the docs' commands name, made from models that ship with the package.

The docs speak of ``decoder.onnx``, ``model.onnx``, ``whisper.onnx`` and ``my_decoder.onnx``:
here each is the bundled example (a Whisper-style decoder with two self- and two
cross-attention blocks). ``decoder.opt.onnx`` is that example optimized by the default
pipeline, ``my_inputs.npz`` its sample inputs, ``decoder_model_merged.onnx`` the Optimum-style
merged decoder of :mod:`xattn_compiler.testing.merged_decoder`, and ``my_plugin.toml`` the
plugin spec docs/plugins.md shows. A page's blocks run in a fresh copy of these files, in
document order, so a command can read what an earlier one wrote.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import xattn_compiler as xc
from xattn_compiler.examples import EXAMPLES_DIR, example_path

from .blocks import ROOT, blocks

EXAMPLE_NAMES = ("decoder.onnx", "model.onnx", "whisper.onnx", "my_decoder.onnx")


def build(directory: Path) -> Path:
    """Write every workspace file into ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    example = example_path()
    for name in EXAMPLE_NAMES:
        shutil.copyfile(example, directory / name)
    shutil.copyfile(EXAMPLES_DIR / f"{example.stem}.npz", directory / "my_inputs.npz")
    xc.optimize(xc.load(example)).save(directory / "decoder.opt.onnx")
    from xattn_compiler.testing.merged_decoder import merged_decoder

    xc.save(merged_decoder(), directory / "decoder_model_merged.onnx")
    [spec] = [b for b in blocks(ROOT / "docs" / "plugins.md", "toml")]
    (directory / "my_plugin.toml").write_text(spec.text)
    return directory


def copy(template: Path, directory: Path) -> Path:
    """A fresh copy of a built workspace, for one page."""
    shutil.copytree(template, directory, dirs_exist_ok=True)
    return directory
