"""Shared fixtures: real exports are built once and cached on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def export_cache() -> Path:
    """Where exported models are cached between runs (override with XATTN_CACHE)."""
    root = Path(os.environ.get("XATTN_CACHE", Path.home() / ".cache" / "xattn-compiler"))
    root.mkdir(parents=True, exist_ok=True)
    return root
