"""Test support: builders of small ONNX graphs with attention blocks and their ground truth.

See :mod:`xattn_compiler.testing.builders`.
"""

from .builders import (
    CONTEXT_KINDS,
    DTYPES,
    HEAD_LAYOUTS,
    K_TRANSPOSES,
    KINDS,
    MASKS,
    PROJECTIONS,
    SCALES,
    SHAPE_STYLES,
    AttentionSpec,
    BlockTruth,
    BuiltModel,
    GraphBuilder,
    StaticShapeRequired,
    add_attention,
    attention_model,
    classifier_model,
    cnn_model,
    kv_input_shapes,
    softmax_between_weights_model,
    spec_conflicts,
)

__all__ = [
    "CONTEXT_KINDS", "DTYPES", "HEAD_LAYOUTS", "KINDS", "K_TRANSPOSES", "MASKS", "PROJECTIONS",
    "SCALES", "SHAPE_STYLES", "AttentionSpec", "BlockTruth", "BuiltModel", "GraphBuilder",
    "StaticShapeRequired", "add_attention", "attention_model", "classifier_model", "cnn_model",
    "kv_input_shapes", "softmax_between_weights_model", "spec_conflicts",
]

# Assertions for pass and matcher tests (the hypothesis strategies live in
# xattn_compiler.testing.strategies, which needs hypothesis installed).
from .assertions import (  # noqa: E402
    assert_attention_found,
    assert_deterministic,
    assert_equivalent,
    assert_idempotent,
    assert_pass_properties,
    assert_valid,
)

__all__ += [
    "assert_attention_found", "assert_deterministic", "assert_equivalent", "assert_idempotent",
    "assert_pass_properties", "assert_valid",
]
