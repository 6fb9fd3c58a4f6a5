"""Spellings drawn by the random-graph strategies that the default ``optimize`` found but did not
fuse (``benchmarks/bench_fusion_rate.py``), each as a small model built from the strategies'
builders: every block must fuse, and the fused model must compute what the original does."""

from __future__ import annotations

import pytest

import xattn_compiler as xc
from xattn_compiler.testing import AttentionSpec
from xattn_compiler.testing.strategies import Layer, Recipe, build_example


def _fuse_report(recipe: Recipe):
    example = build_example(recipe)
    result = xc.optimize(example.model)
    (fuse,) = [p["details"] for p in result.report["passes"] if p["name"] == "fuse-attention"]
    return example, result, fuse


def assert_every_block_fused(recipe: Recipe) -> None:
    example, result, fuse = _fuse_report(recipe)
    assert fuse["counts"]["blocks_fused"] == len(example.blocks), fuse["skipped"]
    for inputs in example.samples:
        check = xc.verify(example.model, result.model, inputs=inputs)
        assert check.ok, check.reason


@pytest.mark.parametrize("rope", ["rotate_half", "interleaved"])
@pytest.mark.parametrize("kv_cache", [False, True])
def test_fused_gather_qkv_with_rope_fuses(rope, kv_cache):
    # [B,S,3,H,D] -> [3,B,H,S,D] cut by Gather; RoPE on Q and K only: V's Gather shares the
    # transposed QKV with parts read outside the block (the rotary ops), so V starts there.
    assert_every_block_fused(Recipe(layers=(Layer((AttentionSpec(
        kind="self", num_heads=3, head_dim=4, projection="fused_gather", rope=rope,
        kv_cache=kv_cache),)),), embed=12))
