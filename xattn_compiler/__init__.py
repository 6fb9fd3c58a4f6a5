"""xattn-compiler: find, clean up, split and fuse attention in ONNX models for TensorRT.

::

    import xattn_compiler as xc
    model = xc.load("decoder.onnx")
    result = xc.optimize(model)                 # the default pipeline
    check = xc.verify(model, result.model)      # ONNX Runtime, dtype-aware tolerances
    xc.save(result.model, "decoder.opt.onnx")
"""

from .attention import AttentionMatch, analyze_attention, find_attention
from .errors import (
    CheckFailed,
    GraphStructureError,
    InputError,
    ModelLoadError,
    OutputError,
    PassError,
    UnknownPassError,
    XattnError,
)
from .io import load, save
from .passmanager import Option, Pass, PassResult, Pipeline, PipelineError
from .pipeline import DEFAULT_PIPELINE, OptimizeResult, optimize
from .registry import PassRegistry, default_registry
from .split import SplitResult, split_static_kv, verify_split

__version__ = "0.1.0"


def __getattr__(name: str):
    # verify pulls in ONNX Runtime; importing the package (the CLI's `passes`, a pass author's
    # test) should not pay for it.
    if name in ("verify", "VerifyResult"):
        from . import verification

        return getattr(verification, name)
    raise AttributeError(f"module 'xattn_compiler' has no attribute {name!r}")


__all__ = [
    "AttentionMatch", "analyze_attention", "find_attention", "DEFAULT_PIPELINE", "CheckFailed", "GraphStructureError", "InputError", "ModelLoadError",
    "Option", "OptimizeResult", "OutputError", "Pass", "PassError", "PassRegistry", "PassResult",
    "Pipeline", "PipelineError", "UnknownPassError", "VerifyResult", "XattnError",
    "default_registry", "load", "optimize", "save", "verify", "SplitResult", "split_static_kv",
    "verify_split",
]
