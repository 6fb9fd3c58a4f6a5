"""TensorRT attention plugins: specs (presets and user-declared) and numpy references.

- :mod:`.spec`: :class:`PluginSpec`, read from TOML/JSON with :func:`load_spec`;
- :mod:`.presets`: the LEGACY TensorRT 8.5 ``fMHCA`` and ``fMHA_V2`` plugins (removed in 8.6;
  no TensorRT 10/11 has them): user-declared specs of IPluginV3 plugins are the plugin path;
- :mod:`.reference`: numpy implementations run by ``onnx.reference``, so graphs with plugin
  nodes can be run on a machine without TensorRT;
- :mod:`.decompose`: the same ops in standard ONNX, for ONNX Runtime verification.

The ``trt-plugin`` fusion target that writes plugin nodes is
:mod:`xattn_compiler.fusion.trt_plugin`.
"""

from .decompose import decompose_plugins
from .presets import FMHA_V2, FMHCA, LEGACY_PRESETS
from .reference import (
    METADATA_KEY,
    attention_bnsh,
    has_plugin_nodes,
    plugin_nodes,
    reference_evaluator,
    run_reference,
)
from .spec import Constraints, PluginSpec, PluginSpecError, load_spec, spec_from_dict

__all__ = ["FMHA_V2", "FMHCA", "LEGACY_PRESETS", "METADATA_KEY", "Constraints", "PluginSpec",
           "PluginSpecError", "attention_bnsh", "decompose_plugins", "has_plugin_nodes", "load_spec", "plugin_nodes",
           "reference_evaluator", "run_reference", "spec_from_dict"]
