"""The pass registry: the built-in passes plus those other packages declare.

A package adds passes through the entry-point group ``xattn_compiler.passes``; each entry point
loads a :class:`~xattn_compiler.passmanager.Pass` subclass or an iterable of them::

    [project.entry-points."xattn_compiler.passes"]
    my-fusion = "my_package.passes:MyFusion"

Registries are plain objects (no class-level global state): :func:`default_registry` builds the
shared one once; tests and embedders build their own.
"""

from __future__ import annotations

import difflib
import functools
import logging
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points

from .errors import UnknownPassError
from .passmanager import Pass

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "xattn_compiler.passes"


class PassRegistry:
    """Pass classes by name."""

    def __init__(self, passes: Iterable[type[Pass]] = ()):
        self._passes: dict[str, type[Pass]] = {}
        for cls in passes:
            self.register(cls)

    def register(self, cls: type[Pass]) -> type[Pass]:
        if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
            raise TypeError(f"{cls!r} is not a named Pass subclass")
        existing = self._passes.get(cls.name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"pass name '{cls.name}' is taken by {existing.__module__}.{existing.__qualname__}"
            )
        self._passes[cls.name] = cls
        return cls

    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._passes, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UnknownPassError(
                f"unknown pass '{name}'{hint} (registered: {', '.join(self.names())})"
            ) from None

    def create(self, name: str, options: dict[str, str] | None = None) -> Pass:
        """An instance of pass ``name`` with options given as text (from a pipeline string)."""
        return self.get(name)(**(options or {}))

    def names(self) -> list[str]:
        return sorted(self._passes)

    def __iter__(self) -> Iterator[type[Pass]]:
        return iter(self._passes[name] for name in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._passes

    def __len__(self) -> int:
        return len(self._passes)


def builtin_passes() -> list[type[Pass]]:
    from xattn_compiler import passes

    return list(passes.BUILTIN_PASSES)


def load_entry_point_passes(registry: PassRegistry) -> None:
    """Add the passes other installed packages declare; a broken one is logged and skipped."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            classes = loaded if isinstance(loaded, (list, tuple)) else [loaded]
            for cls in classes:
                registry.register(cls)
        except Exception as exc:  # a third-party package must not break the tool
            log.warning("skipping pass entry point '%s' (%s): %s", ep.name, ep.value, exc)


@functools.lru_cache(maxsize=1)
def default_registry() -> PassRegistry:
    """The built-in passes plus every installed entry point, built once."""
    registry = PassRegistry(builtin_passes())
    load_entry_point_passes(registry)
    return registry
