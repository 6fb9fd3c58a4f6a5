"""Hypothesis profiles for the property tests, chosen with ``HYPOTHESIS_PROFILE``.

- ``ci`` (the default): a few dozen examples per property, derandomized (the same examples on
  every run, so CI is deterministic) and without the example database.
- ``thorough``: 2000 examples per property, random, with the database (failures replay first).
- ``dev``: a handful of examples, for a quick look while editing.

``HYPOTHESIS_PROFILE=thorough pytest tests/properties`` runs the long one (timings in
docs/testing.md). Deadlines are off everywhere: an example builds a model and runs ONNX
Runtime several times, and its time depends on the machine, not on the code under test.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_SLOW_IS_FINE = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]

settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None,
    suppress_health_check=_SLOW_IS_FINE, stateful_step_count=12, print_blob=True)
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, suppress_health_check=_SLOW_IS_FINE,
    stateful_step_count=25, print_blob=True)
settings.register_profile(
    "dev", max_examples=5, deadline=None, database=None, suppress_health_check=_SLOW_IS_FINE,
    stateful_step_count=8)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
