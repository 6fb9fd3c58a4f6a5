"""The model zoo: real architectures, built from configs with seeded weights, exported to ONNX.

Each zoo model is a recipe (:class:`ZooModel`) from a family module in
:mod:`xattn_compiler.zoo.families`. Nothing is downloaded. :func:`export` builds and exports
one into a directory; :func:`cached_export` does so once per recipe and library versions and
reuses the result. Importing this package, listing models and reading a cached export never
import torch.

The function :func:`export` shadows the submodule of the same name as an attribute of this
package; reach the module with ``importlib.import_module("xattn_compiler.zoo.export")``.

>>> from xattn_compiler import zoo
>>> exported = zoo.cached_export("whisper-decoder-eager")     # doctest: +SKIP
>>> inputs, references = exported.sample()                    # doctest: +SKIP
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import InputError
from .export import ExportedModel, check_export
from .spec import SIZES, Attention, Built, ZooModel

__all__ = [
    "SIZES",
    "Attention",
    "Built",
    "ExportedModel",
    "ZooModel",
    "all_models",
    "cached_export",
    "check_export",
    "export",
    "get_model",
]


def all_models() -> list[ZooModel]:
    """Every zoo model, sorted by name. Raises ValueError if two families reuse a name."""
    from .families import family_models

    models = family_models()
    seen: dict[str, ZooModel] = {}
    for model in models:
        if model.name in seen:
            raise ValueError(f"zoo model name '{model.name}' is defined twice (families "
                             f"'{seen[model.name].family}' and '{model.family}')")
        seen[model.name] = model
    return sorted(models, key=lambda m: m.name)


def get_model(name: str) -> ZooModel:
    """The zoo model called ``name``; :class:`InputError` naming close matches if none is."""
    models = {model.name: model for model in all_models()}
    if name in models:
        return models[name]
    close = difflib.get_close_matches(name, list(models), n=3, cutoff=0.5)
    hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
            else "run 'xattn-compiler zoo list' to see them")
    raise InputError(f"no zoo model named '{name}'; {hint}")


def export(name: str, out_dir: str | Path, size: str = "small") -> ExportedModel:
    """Build and export zoo model ``name`` into ``out_dir`` (model.onnx, sample.npz,
    manifest.json); needs torch and the model's libraries."""
    from .export import export_model

    return export_model(get_model(name), out_dir, size)


def cached_export(name: str, cache_dir: str | Path | None = None,
                  size: str = "small") -> ExportedModel:
    """The export of zoo model ``name`` from the cache (``$XATTN_CACHE`` or
    ``~/.cache/xattn-compiler`` by default), exporting it on a miss."""
    from .cache import cached_export as _cached

    return _cached(get_model(name), size, cache_dir)
