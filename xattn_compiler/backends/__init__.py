"""Backends: the TensorRT stage and the deployment emitters.

- :mod:`.tensorrt`: ``build_engine`` (TensorRT imported lazily; :class:`TensorRTMissing` without it).
- :mod:`.profiles`: optimization profiles from the model's symbolic dims.
- :mod:`.trtexec`: the equivalent ``trtexec`` and Polygraphy commands.
- :mod:`.lint_trt`: a static check against TensorRT's ONNX operator support (:mod:`.trt_ops`).
- :mod:`.triton`: a Triton Inference Server model repository, ensemble included.

Nothing here imports TensorRT at import time.
"""

from .lint_trt import Finding, LintReport, lint_trt
from .profiles import DimDefaults, InputShapes, Profile, derive_profile
from .tensorrt import TensorRTMissing, build_engine

__all__ = ["DimDefaults", "Finding", "InputShapes", "LintReport", "Profile", "TensorRTMissing",
           "build_engine", "derive_profile", "lint_trt"]
