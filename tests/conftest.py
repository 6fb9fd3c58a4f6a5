"""Shared fixtures: real exports are built once and cached on disk."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def export_cache() -> Path:
    """Where exported models are cached between runs (override with XATTN_CACHE)."""
    root = Path(os.environ.get("XATTN_CACHE", Path.home() / ".cache" / "xattn-compiler"))
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(autouse=True)
def _package_logger_restored():
    """``cli.main`` points the package's logger at the stderr of the moment and stops it
    propagating; a later test's ``caplog`` then saw nothing (test_io's opset warning failed
    when run after a CLI test, and again after a module-scoped fixture ran the CLI before
    this fixture could record anything). Every test starts and ends with the logger as
    importing the package leaves it."""
    _reset_package_logger()
    yield
    _reset_package_logger()


def _reset_package_logger() -> None:
    logger = logging.getLogger("xattn_compiler")
    logger.handlers[:], logger.level, logger.propagate = [], logging.NOTSET, True
