"""LEGACY: the fused-attention plugins of TensorRT 8.5 (its Stable Diffusion demo).

Both were open-source plugins (NVIDIA/TensorRT ``plugin/multiHeadCrossAttentionPlugin`` and
``plugin/multiHeadFlashAttentionPlugin``, release 8.5), removed in 8.6 when Myelin learned to
fuse attention itself (CHANGELOG.md, release/8.6). No TensorRT 10 or 11 install has a creator
for them: they run only on TensorRT 8.5 with a plugin library built from its sources, and
``lint-trt`` reports them as blockers for any later version. The plugin path for current
TensorRT is a user-declared spec (:mod:`.spec`) of an IPluginV3 plugin you build; on TensorRT
10.14+ the ``onnx-attention`` target (IAttention) needs no plugin at all. What the 8.5 sources
say, and what the presets encode:

- ``fMHCA`` version "1": inputs ``q [B, Sq, N, H]`` and packed ``kv [B, Skv, N, 2, H]``, output
  ``[B, Sq, N, H]``; no attributes (the creator has no fields). The kernel is fp16 only
  (``run_fmhca_api`` hard-codes DATA_TYPE_FP16), scales by ``1/sqrt(H)``, pads H to the next
  power of two and has cubins for 64, 128 and 256, so 33 <= H <= 256 (below 160 on SM 75), and
  processes at most 128 keys (``seqLenKvPadded = 128``). At run time Sq must be a multiple of
  64 (H <= 64), 32 (H <= 128) or 16. Its probabilities are fp16 (``acc_type = DATA_TYPE_FP16``).
- ``fMHA_V2`` version "1": input packed ``qkv [B, S, N, 3, H]``, output ``[B, S, N, H]``; fp16,
  ``1/sqrt(H)``; flash-attention cubins for H in 16, 32, 40, 64, 80, 128, 160, 256.

Neither takes a mask or another scale; a block whose scale is not ``1/sqrt(H)`` gets its Q
multiplied by the ratio before the plugin.
"""

from __future__ import annotations

from .spec import Constraints, PluginSpec

FMHCA = PluginSpec(
    op="fMHCA", version="1", namespace="", layout="q_kv_packed", output_layout="BSNH",
    kinds=("cross",), scale="inverse_sqrt_head_dim",
    constraints=Constraints(dtypes=("float16",), min_head_size=33, max_head_size=256,
                            max_kv_length=128),
    description="LEGACY: TensorRT 8.5 only (removed in 8.6) fused multi-head cross-attention "
                "(SM 75-89)",
)

FMHA_V2 = PluginSpec(
    op="fMHA_V2", version="1", namespace="", layout="qkv_packed", output_layout="BSNH",
    kinds=("self",), scale="inverse_sqrt_head_dim",
    constraints=Constraints(dtypes=("float16",), head_sizes=(16, 32, 40, 64, 80, 128, 160, 256)),
    description="LEGACY: TensorRT 8.5 only (removed in 8.6) fused flash self-attention "
                "(SM 75-89)",
)

#: The specs the ``trt-plugin`` target uses when no plugin spec file is given: each block goes
#: to the first preset whose kind and constraints fit.
LEGACY_PRESETS: tuple[PluginSpec, ...] = (FMHCA, FMHA_V2)
#: The only TensorRT the presets exist for, and the first that no longer has them.
LEGACY_VERSION = (8, 5)
REMOVED_IN = (8, 6)
LEGACY_OPS = frozenset(spec.op for spec in LEGACY_PRESETS)


def legacy_warning() -> str:
    """One line for logs and reports when the presets are used."""
    return ("the fMHCA/fMHA_V2 presets are LEGACY: they exist only for TensorRT 8.5 (removed in "
            "8.6); for TensorRT 10/11 use --target onnx-attention or declare your IPluginV3 "
            "plugin with --plugin-spec")


__all__ = ["FMHA_V2", "FMHCA", "LEGACY_OPS", "LEGACY_PRESETS", "LEGACY_VERSION", "REMOVED_IN",
           "legacy_warning"]
