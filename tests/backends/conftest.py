"""Fixtures for the TensorRT stage: zoo exports by name, skipping those whose libraries are absent."""

from __future__ import annotations

import pytest

from xattn_compiler import zoo
from xattn_compiler.zoo.export import requirements_missing

ZOO = [m.name for m in zoo.all_models() if "small" in m.sizes]


def zoo_export(name: str, cache):
    model = zoo.get_model(name)
    missing = requirements_missing(model)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    return zoo.cached_export(name, cache)
