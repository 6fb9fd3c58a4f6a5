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


def test_time_major_heads_of_one_head_fuse():
    # With H = 1 the clean-up drops the [S,B,E] -> [S,B*1,E] Reshape: Q, K and V are one
    # Transpose of the projection, with no merge to walk to; the scores' own [B,1,Sq,Sk]
    # unbatch (for the mask) says how the rows are heads.
    assert_every_block_fused(Recipe(layers=(Layer((AttentionSpec(
        kind="self", num_heads=1, head_layout="time_major", mask="add_input"),)),)))


@pytest.mark.parametrize("head_layout", ["3d", "time_major"])
def test_batched_heads_over_a_constant_context_fuse(head_layout):
    # Learned latents expanded over a static batch: K and V fold to [B*H,S,D] constants.
    assert_every_block_fused(Recipe(layers=(Layer((AttentionSpec(
        kind="cross", num_heads=3, head_dim=4, head_layout=head_layout,
        mask="where_bool_inv"),)),), embed=12, context="constant"))


def test_batched_kv_inputs_with_a_mask_fuse():
    # K/V graph inputs already [B*H,S,D] (projection="none"), unbatched around a 4-D mask.
    assert_every_block_fused(Recipe(layers=(Layer((AttentionSpec(
        kind="cross", projection="none", head_layout="3d", mask="add_input"),)),)))


def test_one_head_with_dynamic_sizes_fuses():
    # H = 1: the clean-up drops K's [B,D,S] -> [B*1,D,S] Reshape (k_transpose="pre_split"), and
    # with dynamic sizes its rows are not provably the scores' rows; a one-head view needs not.
    assert_every_block_fused(Recipe(layers=(Layer((AttentionSpec(
        kind="cross", num_heads=1, head_dim=6, head_layout="3d", k_transpose="pre_split",
        mask="add_bias_input"),)),), embed=4, dynamic=True))
