"""``split-static-kv``: the part of the K/V split that fits in a pipeline.

    K = Reshape(MatMul(Expand(latents, batch), Wk) + bk)   ->   K = Reshape(Expand(cross_kv.0.key))
    cross_kv.0.key = latents @ Wk + bk                       (an initializer, computed once here)

A pass maps one model to one model, and splitting a decoder from its K/V projector produces
two; that is :func:`xattn_compiler.split.split_static_kv` (the ``split-kv`` command). What a
pass can do is the constant-context case: cross-attention whose K/V depend on no input
(learned latents, a fixed prompt embedding) has them folded into initializers named
``cross_kv.{i}.key`` / ``.value``, after moving an Expand to the batch below the projections.
Models whose K/V come from inputs pass through unchanged, and so does a context the pass
cannot fold (reshaped to 2-D before its projection); the details say why.
"""

from __future__ import annotations

import logging

import onnx

from xattn_compiler.attention import find_attention
from xattn_compiler.passmanager import Pass, PassResult
from xattn_compiler.split import SplitError, fold_constant_kv

log = logging.getLogger(__name__)


class SplitStaticKV(Pass):
    """Fold constant-context cross-attention K/V into initializers."""

    name = "split-static-kv"
    description = ("fold cross-attention K/V of a constant context into initializers "
                   "(split-kv writes the two-model split)")

    def run(self, model: onnx.ModelProto) -> PassResult:
        try:
            out, folded = fold_constant_kv(model)
        except SplitError as reason:
            # In a pipeline, a context this pass cannot fold is left as it is, not an error.
            log.info("split-static-kv: %s", reason)
            return PassResult(model, False, {"kv_folded": 0}, {"not_folded": str(reason)})
        details: dict = {"folded": folded}
        if not folded:
            cross = [b for b in find_attention(model) if b.kind == "cross"]
            if any(b.kv_source_kind != "constant" for b in cross):
                details["note"] = ("K/V computed from inputs need a separate projector model: "
                                   "use split-kv (xattn_compiler.split_static_kv)")
        # Nothing folded: the input as it came (the fold's export re-infers shapes, which
        # changed bytes while the pass reported no change).
        return PassResult(out if folded else model, bool(folded), {"kv_folded": len(folded)},
                          details)
