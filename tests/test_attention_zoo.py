"""The matcher on every real export in the zoo: counts, heads and K/V facts equal the manifest.

The manifest's truth comes from each model's config (not from its graph), so these tests judge
the matcher against what the architecture is, for every exporter and variant in the zoo.
"""

from __future__ import annotations

from collections import Counter

import pytest

import xattn_compiler as xc
from xattn_compiler.zoo import all_models, cached_export
from xattn_compiler.zoo.export import requirements_missing

pytestmark = pytest.mark.slow

SMALL = [m.name for m in all_models() if "small" in m.sizes]


@pytest.fixture(scope="module", params=SMALL)
def exported(request, export_cache):
    model = next(m for m in all_models() if m.name == request.param)
    missing = requirements_missing(model)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    return cached_export(request.param, export_cache)


def test_counts_equal_the_manifest(exported):
    truth = exported.manifest["attention"]
    blocks = xc.find_attention(xc.load(exported.path))
    counts = Counter(b.kind for b in blocks)
    assert (counts["self"], counts["cross"]) == (truth["self"], truth["cross"])


def test_heads_and_head_dims_equal_the_manifest(exported):
    truth = exported.manifest["attention"]
    blocks = xc.find_attention(xc.load(exported.path))
    if truth.get("blocks"):
        expected = Counter((b["cross"], b["num_heads"], b["head_dim"]) for b in truth["blocks"])
        found = Counter((b.kind == "cross", b.num_heads, b.head_dim) for b in blocks)
        assert found == expected
    else:
        assert {(b.num_heads, b.head_dim) for b in blocks} == {(truth["num_heads"],
                                                                 truth["head_dim"])}


def test_cross_attention_kv_facts_equal_the_manifest(exported):
    manifest = exported.manifest
    cross = [b for b in xc.find_attention(xc.load(exported.path)) if b.kind == "cross"]
    kinds = {b.kv_source_kind for b in cross}
    # A model without cross-attention (a RoPE decoder) has no cross K/V to describe.
    expected = {manifest["kv_source_kind"]} if manifest["attention"]["cross"] else set()
    assert kinds == expected, kinds
    found_static = sorted({name for b in cross for name in b.static_inputs})
    assert found_static == sorted(manifest["static_inputs"])


def test_nothing_escapes_in_clean_exports(exported):
    blocks = xc.find_attention(xc.load(exported.path))
    assert [b.id for b in blocks if b.escapes] == []
