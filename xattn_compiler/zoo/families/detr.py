"""A DETR-style decoder in plain torch: object queries cross-attend a flattened feature map.

Learned object queries (10) run through two post-norm decoder layers as in DETR:

* self-attention over the queries with the query positional embedding added to Q and K only
  (``q = k = tgt + query_pos``, ``v = tgt``);
* cross-attention with ``Q = tgt + query_pos``, ``K = features + pos`` and ``V = features``:
  K and V come from different tensors, which is what distinguishes this family;
* a ReLU feed-forward; then a final LayerNorm and DETR's class and box heads.

DETR starts ``tgt`` at zeros, which makes the first self-attention's values all zero (its
weights would not matter); here ``tgt`` starts from a learned content embedding instead, so a
change to any attention shows in the outputs.

Inputs are ``features`` and ``pos`` [batch, hw, 64] (a backbone's flattened map and its
positional encoding); both feed only cross-attention K/V. Outputs: ``logits`` [batch, 10, 7]
and ``boxes`` [batch, 10, 4]. Batch and ``hw`` are dynamic.
"""

from __future__ import annotations

import functools

from ..spec import Attention, Built, ZooModel

D_MODEL, NHEAD, FFN, LAYERS, QUERIES, CLASSES = 64, 4, 128, 2, 10, 6
#: Sample: batch 2, a 3x4 feature map (hw 12); queries 10, width 64, heads 4 of 16.
BATCH, HW = 2, 12
SEED = 0


@functools.cache
def _classes() -> tuple[type, type]:
    import torch
    from torch import nn

    from .torch_nn import plain_blocks

    class DetrLayer(nn.Module):
        """One post-norm DETR decoder layer; ``hand_written`` picks the attention module."""

        def __init__(self, hand_written: bool):
            super().__init__()
            self.hand_written = hand_written
            if hand_written:
                make = functools.partial(plain_blocks().MultiHeadAttention, D_MODEL, NHEAD)
            else:
                make = functools.partial(nn.MultiheadAttention, D_MODEL, NHEAD, dropout=0.0,
                                         batch_first=True)
            self.self_attn, self.cross_attn = make(), make()
            self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(D_MODEL) for _ in range(3))
            self.ffn = nn.Sequential(nn.Linear(D_MODEL, FFN), nn.ReLU(),
                                     nn.Linear(FFN, D_MODEL))

        def _attend(self, attn: nn.Module, query, key, value):
            if self.hand_written:
                return attn(query, key, value)
            return attn(query, key, value, need_weights=False)[0]

        def forward(self, tgt, query_pos, features, pos):
            q = k = tgt + query_pos
            tgt = self.norm1(tgt + self._attend(self.self_attn, q, k, tgt))
            tgt = self.norm2(tgt + self._attend(self.cross_attn, tgt + query_pos,
                                                features + pos, features))
            return self.norm3(tgt + self.ffn(tgt))

    class DetrDecoder(nn.Module):
        """Object queries, decoder layers, final norm, class and box heads."""

        def __init__(self, hand_written: bool):
            super().__init__()
            self.query_content = nn.Embedding(QUERIES, D_MODEL)
            self.query_pos = nn.Embedding(QUERIES, D_MODEL)
            self.layers = nn.ModuleList(DetrLayer(hand_written) for _ in range(LAYERS))
            self.norm = nn.LayerNorm(D_MODEL)
            self.class_head = nn.Linear(D_MODEL, CLASSES + 1)    # + "no object"
            self.box_head = nn.Sequential(nn.Linear(D_MODEL, D_MODEL), nn.ReLU(),
                                          nn.Linear(D_MODEL, 4))

        def forward(self, features, pos):
            batch = features.shape[0]
            tgt = self.query_content.weight.unsqueeze(0).expand(batch, -1, -1)
            query_pos = self.query_pos.weight.unsqueeze(0).expand(batch, -1, -1)
            for layer in self.layers:
                tgt = layer(tgt, query_pos, features, pos)
            tgt = self.norm(tgt)
            return self.class_head(tgt), torch.sigmoid(self.box_head(tgt))

    return DetrLayer, DetrDecoder


def build_detr(size: str, hand_written: bool) -> Built:
    """The DETR-style decoder with hand-written or ``nn.MultiheadAttention`` attention."""
    import torch

    from ..export import randomize_parameters

    if size != "small":
        raise ValueError(f"the DETR decoder has only the 'small' size, not {size!r}")
    torch.manual_seed(SEED)
    module = _classes()[1](hand_written)
    randomize_parameters(module, SEED)
    module.eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    inputs = {"features": torch.randn(BATCH, HW, D_MODEL, generator=gen),
              "pos": torch.randn(BATCH, HW, D_MODEL, generator=gen)}
    attention = "hand-written (q/k/v/out nn.Linear, matmul, softmax)" if hand_written \
        else "nn.MultiheadAttention(batch_first=True), packed in_proj_weight"
    return Built(
        module=module, inputs=inputs, output_names=["logits", "boxes"],
        attention=Attention(self=LAYERS, cross=LAYERS, num_heads=NHEAD,
                            head_dim=D_MODEL // NHEAD),
        static_inputs=["features", "pos"],
        dynamic_dims={"features": {0: "batch", 1: "hw"}, "pos": {0: "batch", 1: "hw"}},
        kv_source_kind="graph_input",
        config={"d_model": D_MODEL, "nhead": NHEAD, "dim_feedforward": FFN,
                "num_layers": LAYERS, "num_queries": QUERIES, "num_classes": CLASSES,
                "attention": attention, "norm": "post"},
        notes=["Cross-attention K = features + pos, V = features (different sources); "
               "self-attention adds query_pos to Q and K but not V.",
               "tgt starts from a learned embedding, not DETR's zeros, so the first "
               "self-attention's values are not all zero."])


def _hand_written(size: str) -> Built:
    return build_detr(size, hand_written=True)


def _mha(size: str) -> Built:
    return build_detr(size, hand_written=False)


_DESC = "DETR-style decoder, 10 object queries, 2 layers, d 64, 4 heads, K = features + pos"
_TAGS = ("detection",)
MODELS: tuple[ZooModel, ...] = (
    ZooModel("detr-decoder", "detr", _DESC + ", hand-written attention", _hand_written,
             exporter="dynamo", opset=18, tags=_TAGS),
    ZooModel("detr-decoder-mha", "detr", _DESC + ", nn.MultiheadAttention", _mha,
             exporter="dynamo", opset=18, tags=_TAGS),
    ZooModel("detr-decoder-mha-torchscript", "detr",
             _DESC + ", nn.MultiheadAttention, TorchScript exporter", _mha,
             exporter="torchscript", opset=17, tags=_TAGS),
)
