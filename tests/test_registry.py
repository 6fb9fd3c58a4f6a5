"""The registry: built-ins, name clashes, and passes from other packages' entry points."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest
from xattn_compiler.passes import BUILTIN_PASSES, Canonicalize

from xattn_compiler import registry as registry_module
from xattn_compiler.passmanager import Pass, PassResult
from xattn_compiler.registry import PassRegistry, default_registry, load_entry_point_passes


class ThirdParty(Pass):
    name = "third-party"
    description = "a pass from another package"

    def run(self, model):
        return PassResult(model, False)


def test_builtins_are_registered_by_name():
    registry = default_registry()
    for cls in BUILTIN_PASSES:
        assert registry.get(cls.name) is cls
    assert "canonicalize" in registry.names()


def test_every_builtin_has_a_description_and_documented_options():
    for cls in BUILTIN_PASSES:
        assert cls.description and cls.__doc__
        assert all(opt.help for opt in cls.options)


def test_a_name_cannot_be_taken_twice():
    clash = type("Clash", (Pass,), {"name": "canonicalize", "description": "x"})
    registry = PassRegistry([Canonicalize])
    with pytest.raises(ValueError, match="taken by"):
        registry.register(clash)


def test_only_pass_classes_register():
    with pytest.raises(TypeError):
        PassRegistry([object])


def test_entry_points_add_passes(monkeypatch):
    good = EntryPoint("third-party", f"{__name__}:ThirdParty", registry_module.ENTRY_POINT_GROUP)
    broken = EntryPoint("broken", "no_such_module_xyz:Thing", registry_module.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry_module, "entry_points", lambda group: [good, broken])
    registry = PassRegistry()
    load_entry_point_passes(registry)
    assert registry.names() == ["third-party"]  # the broken one is skipped, not fatal
