"""An on-disk cache of zoo exports, keyed by everything that can change the exported bytes.

An entry is ``<cache>/<name>-<size>-<key>/`` holding the files of an export. ``<key>`` hashes
the versions of torch, transformers, diffusers, onnx and onnxscript, the zoo model's fields,
the size, and the source text of the family module and of the export code, so editing a recipe
re-exports while an unchanged re-run reuses the entry. Entries are written to a temporary
directory and renamed into place, so an interrupted export leaves no half-written entry; when
a concurrent process finished the same entry first, its entry is kept. A hit reads files only
and never imports torch.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from . import spec as zoo_spec
from .export import ExportedModel
from .spec import ZooModel

# The package's export() function shadows this submodule as a package attribute, so
# "from . import export" would give the function; take the module from the import system.
zoo_export = importlib.import_module(".export", __package__)

log = logging.getLogger(__name__)

#: Environment variable naming the cache directory.
CACHE_ENV = "XATTN_CACHE"


def default_cache_dir() -> Path:
    """``$XATTN_CACHE``, else ``~/.cache/xattn-compiler``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "xattn-compiler"


def cache_key(model: ZooModel, size: str) -> str:
    """Short hash of the library versions, the model's fields, the size and the recipe text."""
    material = {
        "versions": zoo_export.library_versions(),
        "model": _model_fields(model),
        "size": size,
        # The model's family file and the sibling family files it imports (torch_nn's plain
        # attention is used by detr, constant_context and control_flow): editing one family
        # re-exports its models and their users, not the whole zoo.
        "family_sources": [_source_digest(path) for path in _family_files(model)],
        "export_source": _source_digest(Path(zoo_export.__file__)),
        "spec_source": _source_digest(Path(zoo_spec.__file__)),
    }
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def entry_dir(model: ZooModel, size: str, cache_dir: str | Path | None = None) -> Path:
    """Where the export of ``model`` at ``size`` lives (or would live) in the cache."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{model.name}-{size}-{cache_key(model, size)}"


def cached_export(model: ZooModel, size: str = "small",
                  cache_dir: str | Path | None = None) -> ExportedModel:
    """The cached export of ``model`` at ``size``, exporting it first on a miss."""
    entry = entry_dir(model, size, cache_dir)
    if ExportedModel.is_complete(entry):
        log.debug("zoo cache hit: %s", entry)
        return ExportedModel(entry)
    if entry.exists():
        # Entries only appear by rename, complete; a partial one was damaged by hand.
        log.warning("zoo cache: %s is incomplete; exporting it again", entry)
        shutil.rmtree(entry, ignore_errors=True)
    log.info("zoo cache miss: exporting %s (%s) into %s", model.name, size, entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        zoo_export.export_model(model, tmp, size)
        try:
            os.rename(tmp, entry)
        except OSError:
            # Another process renamed its finished entry first: keep it, drop ours.
            if not ExportedModel.is_complete(entry):
                raise
            log.debug("zoo cache: %s was finished concurrently; keeping it", entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportedModel(entry)


def _model_fields(model: ZooModel) -> dict[str, object]:
    """The ZooModel's fields, the builder named rather than repr'd (a repr holds an address)."""
    return {
        "name": model.name, "family": model.family, "description": model.description,
        "build": _builder_name(model.build),
        "exporter": model.exporter, "opset": model.opset, "dtype": model.dtype,
        "sizes": list(model.sizes), "requires": list(model.requires),
        "tolerance": None if model.tolerance is None else list(model.tolerance),
        "tags": list(model.tags),
    }


def _builder_name(build) -> str:
    """``module.qualname`` of a builder; a ``functools.partial`` adds its bound arguments."""
    func = getattr(build, "func", build)
    name = f"{func.__module__}.{func.__qualname__}"
    if func is not build:
        name += f"(*{build.args!r}, **{sorted(build.keywords.items())!r})"
    return name


def _family_file(model: ZooModel) -> Path | None:
    """The source file of the module that defines the model's builder."""
    func = getattr(model.build, "func", model.build)
    module = sys.modules.get(func.__module__)
    try:
        return Path(inspect.getfile(module)) if module is not None else None
    except TypeError:  # a builtin or a module without a file
        return None


#: ``from .name import`` / ``from . import name`` in a family module: a sibling it builds on.
_SIBLING_IMPORT = re.compile(r"^\s*from \.(\w+)? import ([\w, ]+)", re.MULTILINE)


def _family_files(model: ZooModel) -> list[Path]:
    """The model's family file and, transitively, the sibling family files it imports."""
    first = _family_file(model)
    if first is None:
        return []
    seen: set[Path] = set()
    todo = [first]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for module, names in _SIBLING_IMPORT.findall(path.read_text()):
            candidates = [module] if module else [n.strip() for n in names.split(",")]
            todo.extend(path.parent / f"{name}.py" for name in candidates if name)
    return sorted(seen)


def _source_digest(path: Path | None) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path is not None else None
