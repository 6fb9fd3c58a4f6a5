"""Spellings the random-graph strategies drew (issue 17) that the matcher got wrong, each as the
minimal model hypothesis shrank it to; every test failed before its fix."""

from __future__ import annotations

import pytest

from xattn_compiler.attention import find_attention
from xattn_compiler.testing import AttentionSpec
from xattn_compiler.testing.assertions import assert_attention_found
from xattn_compiler.testing.strategies import Clutter, Layer, Recipe, Wrap, build_example


def _one_block(spec: AttentionSpec, **sizes) -> None:
    ex = build_example(Recipe(layers=(Layer((spec,)),), **sizes))
    assert_attention_found(ex)


def test_time_major_heads_report_their_head_count():
    # nn.MultiheadAttention: [B,S,E] -> [S,B,E] -> [S,B*H,D] -> [B*H,S,D]; no [.., H, D] target.
    _one_block(AttentionSpec(kind="self", head_dim=4, head_layout="time_major"),
               batch=1, q_len=1, kv_len=1)
    _one_block(AttentionSpec(kind="cross", num_heads=3, head_layout="time_major",
                             mask="add_input", shape_style="computed"), dynamic=True)


def test_time_major_heads_of_one_head():
    _one_block(AttentionSpec(kind="self", num_heads=1, head_layout="time_major"))


def test_heads_rotated_then_batched_report_their_head_count():
    # RoPE on [B,H,S,D], then [B*H,S,D]: the only head split the core's chain sees is 4-D to 3-D.
    _one_block(AttentionSpec(kind="self", head_dim=4, head_layout="3d", rope="rotate_half"),
               batch=1, q_len=2)
    (block,) = find_attention(build_example(Recipe(layers=(Layer((AttentionSpec(
        kind="self", num_heads=4, head_dim=2, head_layout="3d", rope="interleaved",
        rope_table="constant"),)),))).model)
    assert (block.kind, block.num_heads, block.head_dim) == ("self", 4, 2)


def test_softmax_on_a_positive_axis_in_a_body_with_computed_shapes():
    # Softmax(axis=3) of 4-D scores (axis=2 of 3-D) inside If/Loop bodies, whose reshape
    # targets are computed: ONNX infers no rank there; the layout ops that made the scores say it.
    for spec, wrap in [
        (AttentionSpec(kind="self", softmax_axis="positive", shape_style="computed"), Wrap()),
        (AttentionSpec(kind="self", head_dim=4, k_transpose="fused", shape_style="computed",
                       out_projection=False, softmax_axis="positive"), Wrap()),
        (AttentionSpec(kind="self", softmax_axis="positive", shape_style="computed",
                       head_layout="3d", mask="add_input"), Wrap("loop")),
        (AttentionSpec(kind="cross", softmax_axis="positive", shape_style="computed",
                       head_layout="time_major", mask="where_bool_inv"), Wrap("loop")),
    ]:
        ex = build_example(Recipe(layers=(Layer((spec,)),), batch=1, q_len=1, kv_len=1,
                                  wrap=wrap))
        assert_attention_found(ex)


def test_an_initializer_context_beside_kv_inputs_builds_with_one_mask_shape():
    # (thorough profile) K/V inputs beside a batch-1 initializer context took the symbolic key
    # length while the context's is static: their shared mask input was declared twice.
    ex = build_example(Recipe(layers=(
        Layer((AttentionSpec(kind="cross", head_dim=4, mask="add_input"),)),
        Layer((AttentionSpec(kind="cross", head_dim=4, projection="none", mask="add_input"),))),
        embed=4, context="initializer", dynamic=True, batch=1, q_len=1, kv_len=1))
    assert_attention_found(ex)


def test_softmax_on_a_positive_axis_over_a_relative_position_bias_in_a_body():
    # (thorough profile) scores + an Unsqueeze'd [1,H,S,S] relative-position bias inside an If
    # branch: the bias's rank was unknown (no shapes in bodies, Unsqueeze not read), so the
    # sum's was too and Softmax(axis=3) 'failed softmax_over_last_axis'.
    ex = build_example(Recipe(layers=(
        Layer((AttentionSpec(kind="self", head_dim=4, projection="fused_split",
                             mask="add_rel_bias", out_projection=False,
                             softmax_axis="positive"),)),), batch=1, q_len=1, kv_len=1,
        wrap=Wrap()))
    assert_attention_found(ex)


def test_seven_steps_between_the_scores_and_softmax():
    # (thorough profile) batched heads unbatched around a Where mask and back, a scale and a
    # cast round trip: 7 score steps, one more than the chain took, so the block was not found.
    ex = build_example(Recipe(layers=(
        Layer((AttentionSpec(kind="self", head_dim=1, projection="fused_split", head_layout="3d",
                             mask="where_bool_inv"),)),), batch=1, q_len=1, kv_len=1,
        clutter=(Clutter(kind="cast_same", tensor="layers.0.self_attn.scores.masked",
                         region="score"),
                 Clutter(kind="cast_roundtrip", tensor="layers.0.self_attn.scores.masked",
                         region="score"))))
    assert_attention_found(ex)


def test_a_softmax_cast_and_two_cast_round_trips_before_the_context():
    # (thorough profile) five Casts between Softmax and the context MatMul: the walk down from
    # Softmax stopped at five ops and the chain at four steps, so the block was not found.
    ex = build_example(Recipe(layers=(Layer((
        AttentionSpec(kind="self", head_layout="3d", softmax_cast=True),
        AttentionSpec(kind="cross", head_dim=4, head_layout="3d", k_transpose="fused"))),),
        batch=1, q_len=1, kv_len=1,
        clutter=(Clutter(kind="cast_roundtrip", tensor="layers.0.self_attn.probs", region="probs"),
                 Clutter(kind="identity", tensor="hidden_states", region="outside"),
                 Clutter(kind="cast_roundtrip", tensor="layers.0.self_attn.probs",
                         region="probs"))))
    assert_attention_found(ex)


def test_softmax_on_a_positive_axis_after_a_default_transpose_pair_in_a_body():
    # (thorough profile) a Transpose with no perm (twice: a no-op) on Q inside an If branch:
    # its rank was not read, so the scores' was unknown and Softmax(axis=3) did not match.
    ex = build_example(Recipe(layers=(
        Layer((AttentionSpec(kind="self", projection="fused_gather", mask="add_input",
                             softmax_axis="positive"),)),), norm="pre", batch=1, q_len=1,
        kv_len=1, clutter=(Clutter(kind="transpose_default_pair",
                                   tensor="layers.0.self_attn.q.gather", region="operand"),
                           Clutter(kind="unsqueeze_squeeze", tensor="const", choice=0,
                                   region="outside")),
        wrap=Wrap()))
    assert_attention_found(ex)


def test_rotated_heads_flattened_and_back_before_batching_report_their_head_count():
    # (thorough profile) RoPE on [B,H,S,D], a flatten-and-back Reshape pair on the rotated Q,
    # then [B*H,S,D]: the walk from the core starts after the rotation, and the first
    # rank-raising Reshape it met was the "back" half ([12] -> [1,3,1,4]): heads 1, not 3.
    ex = build_example(Recipe(layers=(Layer((
        AttentionSpec(kind="self", num_heads=3, head_dim=4, head_layout="3d", rope="rotate_half"),
        AttentionSpec(kind="cross", head_dim=4, head_layout="3d", k_transpose="fused"))),),
        embed=4, batch=1, q_len=1, kv_len=1,
        clutter=(Clutter("reshape_flatten", "layers.0.self_attn.q.rope", 0, "operand"),)))
    assert_attention_found(ex)


def test_rotated_heads_behind_an_unpropagated_head_split_report_their_head_count():
    # (thorough profile) An Identity on a head-split target shared by three layers stops ONNX's
    # data propagation: the RoPE layer's rotated [B,H,S,D] has no known dims, and nothing on
    # the walk from its core (batching Reshape, rotary Add) says H. The split beyond the
    # rotation does: heads were None.
    ex = build_example(Recipe(layers=(
        Layer((AttentionSpec(kind="self", head_dim=4, k_transpose="fused"),)),
        Layer((AttentionSpec(kind="cross", head_dim=4, head_layout="3d", k_transpose="fused",
                             mask="add_input"),)),
        Layer((AttentionSpec(kind="self", head_dim=4, head_layout="3d", mask="add_input",
                             rope="rotate_half"),))),
        embed=4, context="encoded", norm="pre", batch=1, q_len=1, kv_len=1,
        clutter=(Clutter("identity", "layers.0.self_attn.q.split_heads.shape", region="outside"),)))
    assert_attention_found(ex)


def test_softmax_on_a_positive_axis_over_a_bias_unsqueezed_by_an_identity_axes():
    # (thorough profile) The relative-position bias's Unsqueeze reads its axes through an
    # Identity: ONNX infers no rank for the bias, and the rank read off the Unsqueeze took
    # only a literal constant for the axes, so Softmax(axis=3) failed softmax_over_last_axis.
    ex = build_example(Recipe(layers=(
        Layer((AttentionSpec(kind="cross", head_dim=4, mask="add_rel_bias", out_projection=False,
                             kv_groups=2),)),
        Layer((AttentionSpec(kind="cross", head_dim=4, mask="add_rel_bias", out_projection=False,
                             softmax_axis="positive"),))),
        batch=1, q_len=1, kv_len=1, clutter=(Clutter("identity", "const_6", region="outside"),)))
    assert_attention_found(ex)


def test_a_per_head_fused_qkv_split_behind_an_identity_in_a_body_reports_its_head_dim():
    # (thorough profile) [B,S,H,3D] cut per head by a Split, an Identity between the Reshape
    # and the Split, inside an If branch (no shapes): the part was looked for right after the
    # Reshape only, so the head dim was read as 3D (12 for 4).
    ex = build_example(Recipe(layers=(Layer((
        AttentionSpec(kind="self", head_dim=4, projection="fused_per_head", out_projection=False,
                      kv_cache=True),)),), batch=1, q_len=1, kv_len=1,
        clutter=(Clutter("identity", "layers.0.self_attn.qkv_proj.split_heads", region="operand"),),
        wrap=Wrap()))
    assert_attention_found(ex)


def test_time_major_heads_behind_an_identity_report_their_head_count():
    # The same class: Identities on both sides of the Reshape to [S,B*H,D], between it and
    # the Transposes that say the heads are time-major (before: [B,S,E] -> [S,B,E]; after:
    # [S,B*H,D] -> [B*H,S,D]); in a body, where no shapes say it either.
    ex = build_example(Recipe(layers=(Layer((
        AttentionSpec(kind="self", head_dim=4, head_layout="time_major"),)),),
        batch=1, q_len=1, kv_len=1,
        clutter=(Clutter("identity", "layers.0.self_attn.q.time_major", region="operand"),
                 Clutter("identity", "layers.0.self_attn.q.split_heads", region="operand")),
        wrap=Wrap()))
    assert_attention_found(ex)


def test_a_computed_head_split_target_read_through_identities_on_its_shape_pieces():
    # (thorough profile) Identities on Shape(x) and on the Slice's bounds of a computed
    # target: the piece Slice(Identity(Shape(x)), 0, 2) had no known length, so neither
    # target was readable and the heads came out None.
    ex = build_example(Recipe(layers=(Layer((
        AttentionSpec(kind="self", num_heads=1, head_dim=4, projection="fused_gather",
                      head_layout="3d", shape_style="computed"),)),),
        dynamic=True, batch=1, q_len=1, kv_len=1,
        clutter=(Clutter("identity", "layers.0.self_attn.qkv_proj.split_heads.shape_of",
                         region="shape"),
                 Clutter("identity", "const", region="outside"))))
    assert_attention_found(ex)


def test_softmax_on_a_positive_axis_of_scores_rebatched_by_a_target_behind_an_identity():
    # (thorough profile) The scores batched again to [B*H,Sq,Sk] by a computed target with an
    # Identity on it: the rank read off that Reshape did not look through the Identity, so
    # Softmax(axis=2) was not known to be the last axis and the block was not found.
    ex = build_example(Recipe(layers=(Layer((
        AttentionSpec(kind="self", num_heads=1, head_dim=4, projection="fused_gather",
                      head_layout="3d", mask="add_input", shape_style="computed",
                      softmax_axis="positive"),)),), dynamic=True, batch=1, q_len=1, kv_len=1,
        clutter=(Clutter("identity", "layers.0.self_attn.scores.batch_heads.shape",
                         region="shape"),
                 Clutter("identity", "const", region="outside"))))
    assert_attention_found(ex)


@pytest.mark.parametrize("rope", ["rotate_half", "interleaved"])
def test_softmax_on_a_positive_axis_after_a_fused_qkv_split_with_sizes_behind_an_identity(rope):
    # (thorough profile) A per-head fused QKV Split whose sizes come through an Identity: ONNX
    # infers no shapes for its parts, so nothing down to the scores had a rank, and the rank
    # read off the ops stopped at the Split, at rotate-half's Slice/Concat, and at interleaved
    # RoPE's Reshape(pairs, Shape(q)) (rank(q) dims): Softmax(axis=3) was not known to be last.
    ex = build_example(Recipe(layers=(
        Layer((AttentionSpec(kind="self", projection="fused_per_head", shape_style="computed",
                             rope="rotate_half", rope_table="constant"),)),
        Layer((AttentionSpec(kind="self", projection="fused_per_head", rope=rope,
                             rope_table="constant", softmax_axis="positive"),))),
        batch=1, q_len=1, kv_len=1, clutter=(Clutter("identity", "const_2", region="outside"),)))
    assert_attention_found(ex)


@pytest.mark.parametrize("pair", [Clutter("transpose_pair", "layers.0.self_attn.q_proj", (1, 0),
                                          "operand"),
                                  Clutter("transpose_default_pair", "layers.0.self_attn.q_proj",
                                          region="operand")], ids=["perm", "default-perm"])
def test_time_major_heads_in_a_body_behind_a_transpose_pair_on_a_gemm_projection(pair):
    # (thorough profile) A Transpose pair ([1,0], or no perm: the axes reversed) on a Gemm
    # projection's 2-D output inside an If branch: each Transpose moves the feature axis, the
    # pair brings it back; E (off the weight) was given up at the first, so the time-major
    # heads read as None.
    ex = build_example(Recipe(layers=(Layer((
        AttentionSpec(kind="self", projection="gemm", head_layout="time_major", scale="none"),)),),
        batch=1, q_len=1, kv_len=1, clutter=(pair,), wrap=Wrap()))
    assert_attention_found(ex)


def test_heads_behind_an_identity_on_a_shape_constant_three_layers_on():
    # (thorough profile) An Identity on a shape constant shared by every layer: ONNX
    # propagated no data through it, so a computed-target cross-attention two layers on had no
    # shapes to read its heads from. Shape inference now sees the Identity's constant.
    ex = build_example(Recipe(layers=(
        Layer((AttentionSpec(kind="self", head_layout="3d", k_transpose="fused",
                             shape_style="computed"),
               AttentionSpec(kind="cross", head_layout="time_major", mask="add_bias_input"))),
        Layer((AttentionSpec(kind="self", head_dim=1, projection="fused_split",
                             head_layout="3d"),)),
        Layer((AttentionSpec(kind="self", head_layout="3d", k_transpose="fused",
                             mask="add_input"),
               AttentionSpec(kind="cross", head_layout="3d", k_transpose="fused",
                             mask="add_input", shape_style="computed")))),
        context="internal", encoder=AttentionSpec(kind="self", head_layout="3d",
                                                  k_transpose="fused"),
        batch=1, q_len=1, kv_len=1, clutter=(Clutter("identity", "const_1", region="outside"),)))
    assert_attention_found(ex)


def test_time_major_heads_after_a_flatten_and_back_on_the_projection():
    # (thorough profile) A flatten-and-back Reshape pair on the projection before the
    # time-major Transpose: the "back" half, followed by that Transpose, was taken for the
    # [S,B,E] -> [S,B*H,D] head split (E/E = 1 head for 3).
    ex = build_example(Recipe(layers=(Layer((
        AttentionSpec(kind="cross", num_heads=3, head_dim=4, head_layout="time_major"),)),),
        embed=8, batch=1, q_len=1, kv_len=1,
        clutter=(Clutter("reshape_flatten", "layers.0.cross_attn.q_proj.add_bias", 0,
                         "operand"),)))
    assert_attention_found(ex)

