"""The wheel carries every subpackage (passes/ and patterns/ are remapped) and the example."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def declared_packages() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["packages"]


def package_folders() -> dict[str, Path]:
    """Every package folder in the source tree under its installed dotted name."""
    roots = {"xattn_compiler": ROOT / "xattn_compiler", "xattn_compiler.passes": ROOT / "passes",
             "xattn_compiler.patterns": ROOT / "patterns"}
    found: dict[str, Path] = {}
    for prefix, folder in roots.items():
        for init in folder.rglob("__init__.py"):
            relative = init.parent.relative_to(folder).parts
            found[".".join((prefix, *relative))] = init.parent
    return found


def test_every_package_folder_is_declared():
    assert sorted(package_folders()) == sorted(declared_packages())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1:]}")
    (built,) = out.glob("*.whl")
    return built


def test_wheel_holds_passes_patterns_and_the_example(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in declared_packages():
        assert package.replace(".", "/") + "/__init__.py" in names
    assert "xattn_compiler/passes/canonicalize.py" in names
    for suffix in ("onnx", "json", "npz"):
        assert f"xattn_compiler/examples/whisper_tiny_decoder.{suffix}" in names


def test_wheel_declares_the_console_script(wheel):
    archive = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
    assert "xattn-compiler = xattn_compiler.cli:main" in archive.read(entry_points).decode()
