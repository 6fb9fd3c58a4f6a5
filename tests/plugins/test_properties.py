"""trt-plugin on drawn graphs, with a declared plugin that accepts every block: the output is
valid and equivalent (plugin nodes verified through their references), idempotent and
deterministic, and every unfused block it leaves has a reason."""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, event, given, note, settings
from xattn_compiler.passes import FuseAttention

import xattn_compiler as xc
from xattn_compiler.errors import XattnError
from xattn_compiler.testing import strategies as xst
from xattn_compiler.testing.assertions import assert_pass_properties

SPEC = str(Path(__file__).parent / "specs" / "any_attention.toml")
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"


@settings(max_examples=400 if THOROUGH else 25, deadline=None, derandomize=not THOROUGH,
          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                HealthCheck.filter_too_much])
@given(ex=xst.examples())
def test_declared_plugin_fusion_keeps_every_pass_property(ex):
    note(ex.description)
    fuse = FuseAttention(target="trt-plugin", plugin_spec=SPEC)
    # After the default pipeline, as users run it: batched heads are back on an axis.
    outcome = assert_pass_properties(fuse, xc.optimize(ex.model, "canonicalize,remove-layout-clutter").model, ex.samples)
    if isinstance(outcome, XattnError):
        event("refused")
        return
    event(f"fused {outcome.counts['blocks_fused']}, skipped {outcome.counts['blocks_skipped']}")
    for reason in outcome.details["skipped"]:
        event(f"skipped: {reason[:60]}")
