"""The zoo's family modules, and the :class:`~xattn_compiler.zoo.spec.ZooModel` they define.

Each family is a module of this package with a ``MODELS`` tuple. The list is fixed (not a
directory scan) so that a stray file cannot add models; a listed module that does not exist
(yet) is skipped. Family modules import torch and the model libraries inside their builders
only, so collecting the models imports neither.
"""

from __future__ import annotations

import importlib
import logging

from ..spec import ZooModel

log = logging.getLogger(__name__)

#: Family modules in this package, in listing order.
FAMILY_MODULES = (
    "whisper", "t5", "bart", "unet", "torch_nn", "torch_transformer", "detr", "constant_context", "control_flow",
    "llama", "wan", "einsum",
)


def family_models() -> list[ZooModel]:
    """Every ``ZooModel`` of every family module present, in module then definition order."""
    models: list[ZooModel] = []
    for name in FAMILY_MODULES:
        qualified = f"{__name__}.{name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as exc:
            # Only the family module itself may be absent; a broken import inside it is a bug.
            if exc.name != qualified:
                raise
            log.debug("zoo family %s is not present; skipped", name)
            continue
        found = getattr(module, "MODELS", None)
        if not isinstance(found, tuple) or not all(isinstance(m, ZooModel) for m in found):
            raise TypeError(f"{qualified}.MODELS must be a tuple of ZooModel")
        models.extend(found)
    return models


def known_gaps() -> dict[str, tuple[ZooModel, str]]:
    """Recipes a family keeps out of ``MODELS`` (a zoo-wide check fails on them today), by
    name, with why: each family's ``KNOWN_GAPS`` of ``(ZooModel, reason)``."""
    gaps: dict[str, tuple[ZooModel, str]] = {}
    for name in FAMILY_MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            continue
        for key, value in getattr(module, "KNOWN_GAPS", {}).items():
            if isinstance(value, tuple) and value and isinstance(value[0], ZooModel):
                gaps[key] = value
    return gaps
