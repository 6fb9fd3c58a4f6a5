"""The built-in passes, each usable alone: ``Canonicalize()(model).model``.

Every class listed in :data:`BUILTIN_PASSES` is registered under its kebab-case name, so
``xattn-compiler passes`` lists it and pipeline text can name it.
"""

from .canonicalize import Canonicalize

BUILTIN_PASSES = (Canonicalize,)

__all__ = ["BUILTIN_PASSES", "Canonicalize"]
