"""The built-in passes, each usable alone: ``Canonicalize()(model).model``.

Every class listed in :data:`BUILTIN_PASSES` is registered under its kebab-case name, so
``xattn-compiler passes`` lists it and pipeline text can name it.
"""

from .batched_heads import CollapseBatchedHeads
from .canonicalize import Canonicalize
from .control_flow import InlineConstantIf, SpecializeInputs, UnrollControlFlow, UnrollLoops
from .convert_precision import ConvertPrecision
from .fold_batch_axes import FoldBatchAxes
from .fuse_attention import FuseAttention
from .guard_precision import GuardPrecision
from .layout_clutter import RemoveLayoutClutter
from .normalize_div import DivToMul
from .normalize_einsum import EinsumToMatMul
from .normalize_spellings import NormalizeSpellings
from .reshapes import SimplifyReshapes
from .split_static_kv import SplitStaticKV
from .transposes import CancelTransposes, CanonicalKeyTranspose, SinkTransposes

BUILTIN_PASSES = (
    Canonicalize,
    NormalizeSpellings,
    EinsumToMatMul,
    DivToMul,
    RemoveLayoutClutter,
    CancelTransposes,
    SinkTransposes,
    CanonicalKeyTranspose,
    SimplifyReshapes,
    CollapseBatchedHeads,
    FoldBatchAxes,
    SplitStaticKV,
    UnrollControlFlow,
    InlineConstantIf,
    UnrollLoops,
    SpecializeInputs,
    FuseAttention,
    GuardPrecision,
    ConvertPrecision,
)

__all__ = ["BUILTIN_PASSES", "CancelTransposes", "Canonicalize", "CanonicalKeyTranspose",
           "CollapseBatchedHeads", "ConvertPrecision", "DivToMul", "EinsumToMatMul", "FoldBatchAxes", "FuseAttention", "GuardPrecision", "NormalizeSpellings", "RemoveLayoutClutter", "SimplifyReshapes", "SinkTransposes", "SplitStaticKV",
           "InlineConstantIf", "SpecializeInputs", "UnrollControlFlow", "UnrollLoops"]
