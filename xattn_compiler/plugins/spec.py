"""What a TensorRT attention plugin looks like in ONNX: a :class:`PluginSpec`.

A spec says which node the ``trt-plugin`` target writes (op name, version, namespace, domain),
how the plugin wants Q, K and V laid out, which node attributes carry which block facts, and
which blocks it can run (dtypes, head sizes, self or cross), and whether it takes the block's
additive mask as one more input. Specs come from the legacy
presets (:mod:`xattn_compiler.plugins.presets`) or from a TOML or JSON file:

.. code-block:: toml

    op = "MyCrossAttention"
    version = "2"
    namespace = "acme"
    layout = "q_kv_packed"          # see LAYOUTS
    kinds = ["cross"]
    mask = "additive"               # or "none" (the default): blocks with a mask are left

    [attributes]                    # node attribute = block fact, or a literal
    num_heads = "num_heads"
    scale = "scale"
    use_tensor_cores = { value = 1 }

    [constraints]
    dtypes = ["float16"]
    head_sizes = [64, 128]

Tensor names in the layouts use the usual letters: B batch, S sequence, N heads, H head size.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xattn_compiler.errors import InputError

try:
    import tomllib
except ImportError:  # Python 3.10: JSON specs only (no new dependency for TOML)
    tomllib = None  # type: ignore[assignment]

#: Input layouts a plugin can ask for, and the node inputs each one means.
LAYOUTS: dict[str, tuple[str, ...]] = {
    "q_kv_packed": ("q_BSNH", "kv_BSN2H"),      # fMHCA: K and V interleaved per head
    "qkv_packed": ("qkv_BSN3H",),               # fMHA_V2: self-attention only
    "separate_bsnh": ("q_BSNH", "k_BSNH", "v_BSNH"),
    "separate_bnsh": ("q_BNSH", "k_BNSH", "v_BNSH"),
}
#: Output layouts: the plugin's single output.
OUTPUT_LAYOUTS = ("BSNH", "BNSH")
#: Block facts a node attribute can carry; ``scale`` is the softmax scale, ``causal`` 0/1.
ATTRIBUTE_SOURCES = ("num_heads", "num_kv_heads", "head_dim", "scale", "causal")
#: ``additive``: a last input, added to the scaled scores (broadcast to [B, N, Sq, Skv]).
MASK_MODES = ("none", "additive")
#: Dtype names as ONNX spells them.
DTYPES = ("float16", "bfloat16", "float32")
KINDS = ("self", "cross")
#: Where a plugin without a scale attribute gets its scale from.
SCALE_MODES = ("attribute", "inverse_sqrt_head_dim")
#: Default node domain. TensorRT's ONNX parser finds a plugin by op name alone and ignores the
#: domain, while ``onnx.checker`` rejects unknown ops in the default domain: a custom domain
#: keeps the model checkable and parses the same.
DEFAULT_DOMAIN = "trt.plugins"

_FIELDS = {"op", "version", "namespace", "domain", "layout", "output_layout", "kinds",
           "attributes", "constraints", "scale", "mask", "description"}
_CONSTRAINT_FIELDS = {"dtypes", "head_sizes", "min_head_size", "max_head_size",
                      "head_size_multiple", "max_kv_length", "softmax_fp32"}


class PluginSpecError(InputError):
    """A plugin spec file or table is invalid; the message names the file and the field."""

    def __init__(self, source: str, field_name: str, reason: str):
        self.source = source
        self.field = field_name
        super().__init__(f"{source}: field '{field_name}': {reason}")


@dataclass(frozen=True)
class Constraints:
    """Which blocks a plugin can run. Empty or None means no limit."""

    dtypes: tuple[str, ...] = ()
    head_sizes: tuple[int, ...] = ()
    min_head_size: int | None = None
    max_head_size: int | None = None
    head_size_multiple: int | None = None
    max_kv_length: int | None = None
    #: The kernel computes Softmax in fp32 even for fp16 inputs, so an fp16 block whose
    #: Softmax ran in fp32 (Casts around it) keeps that precision.
    softmax_fp32: bool = False

    def head_size_problem(self, head_dim: int) -> str | None:
        if self.head_sizes and head_dim not in self.head_sizes:
            return f"head size {head_dim} is not one of {list(self.head_sizes)}"
        if self.min_head_size is not None and head_dim < self.min_head_size:
            return f"head size {head_dim} is below {self.min_head_size}"
        if self.max_head_size is not None and head_dim > self.max_head_size:
            return f"head size {head_dim} is above {self.max_head_size}"
        if self.head_size_multiple and head_dim % self.head_size_multiple:
            return f"head size {head_dim} is not a multiple of {self.head_size_multiple}"
        return None


@dataclass(frozen=True)
class PluginSpec:
    """One attention plugin: the node to write and the blocks it accepts."""

    op: str
    version: str = "1"
    namespace: str = ""
    domain: str = DEFAULT_DOMAIN
    layout: str = "separate_bsnh"
    output_layout: str = "BSNH"
    kinds: tuple[str, ...] = KINDS
    #: node attribute name -> a block fact from ATTRIBUTE_SOURCES, or ``{"value": literal}``
    attributes: Mapping[str, Any] = field(default_factory=dict)
    constraints: Constraints = field(default_factory=Constraints)
    #: ``inverse_sqrt_head_dim``: the kernel always scales by 1/sqrt(H) (a block with another
    #: scale gets its Q multiplied by the ratio); ``attribute``: an attribute carries the scale.
    scale: str = "attribute"
    mask: str = "none"
    description: str = ""

    @property
    def inputs(self) -> tuple[str, ...]:
        """The node's input names by meaning: the layout's, then the mask if it takes one (left
        out for a block without a mask)."""
        return LAYOUTS[self.layout] + (("mask_BNSS",) if self.mask == "additive" else ())

    def node_attributes(self, facts: Mapping[str, Any]) -> dict[str, Any]:
        """The node's attributes for a block with ``facts`` (keys from ATTRIBUTE_SOURCES)."""
        attrs: dict[str, Any] = {}
        for name, source in self.attributes.items():
            if isinstance(source, Mapping):
                attrs[name] = source["value"]
            else:
                value = facts[source]
                attrs[name] = float(value) if source == "scale" else int(value)
        attrs["plugin_version"] = self.version
        attrs["plugin_namespace"] = self.namespace
        return attrs

    def facts_from_attributes(self, attrs: Mapping[str, Any], head_dim: int) -> dict[str, Any]:
        """The block facts a node's attributes carry (the reverse of :meth:`node_attributes`)."""
        facts: dict[str, Any] = {}
        for name, source in self.attributes.items():
            if isinstance(source, str) and name in attrs:
                facts[source] = attrs[name]
        if self.scale == "inverse_sqrt_head_dim" or "scale" not in facts:
            facts["scale"] = 1.0 / math.sqrt(head_dim)
        return facts

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready table that :func:`spec_from_dict` reads back to an equal spec."""
        constraints = {name: getattr(self.constraints, name) for name in sorted(_CONSTRAINT_FIELDS)}
        constraints = {k: list(v) if isinstance(v, tuple) else v for k, v in constraints.items()
                       if v not in (None, (), False)}
        return {"op": self.op, "version": self.version, "namespace": self.namespace,
                "domain": self.domain, "layout": self.layout, "output_layout": self.output_layout,
                "kinds": list(self.kinds), "attributes": {k: dict(v) if isinstance(v, Mapping)
                                                          else v for k, v in self.attributes.items()},
                "constraints": constraints, "scale": self.scale, "mask": self.mask,
                "description": self.description}


# --- loading ------------------------------------------------------------------------------

def load_spec(path: str | Path) -> PluginSpec:
    """Read a plugin spec from a ``.toml`` or ``.json`` file.

    Raises :class:`PluginSpecError` (an :class:`InputError`) naming the file and the field
    when the file cannot be read or a field is missing, unknown or of the wrong kind.
    """
    path = Path(path)
    text = _read_bounded(path)
    if path.suffix.lower() == ".toml" and tomllib is None:
        raise PluginSpecError(str(path), "-", "TOML specs need Python 3.11+; write it as JSON")
    try:
        if path.suffix.lower() == ".toml":
            table = tomllib.loads(text.decode("utf-8"))
        elif path.suffix.lower() == ".json":
            table = json.loads(text)
        else:
            raise PluginSpecError(str(path), "-", "a plugin spec is a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError, JSONDecodeError
        raise PluginSpecError(str(path), "-", f"not valid {path.suffix[1:].upper()}: {exc}") from exc
    except RecursionError as exc:  # [[[[...]]]] thousands deep: hostile, not a spec
        raise PluginSpecError(str(path), "-", "nested too deeply to be a plugin spec") from exc
    return spec_from_dict(table, source=str(path))


#: A plugin spec is a few hundred bytes; reading stops well before a file could exhaust memory.
MAX_SPEC_BYTES = 1 << 20


def _read_bounded(path: Path) -> bytes:
    # Regular files only: /dev/zero or a FIFO would never end (or never start).
    try:
        if not path.is_file():
            reason = "no such file" if not path.exists() else "not a regular file"
            raise PluginSpecError(str(path), "-", f"cannot read the file: {reason}")
        with open(path, "rb") as f:
            text = f.read(MAX_SPEC_BYTES + 1)
    except OSError as exc:
        raise PluginSpecError(str(path), "-", f"cannot read the file: {exc.strerror}") from exc
    if len(text) > MAX_SPEC_BYTES:
        raise PluginSpecError(str(path), "-", f"larger than {MAX_SPEC_BYTES} bytes; not a "
                              "plugin spec")
    return text


def specs_from_json(text: str, source: str) -> list[PluginSpec]:
    """The specs of a JSON list of spec tables (what a model's metadata records); text from a
    model is untrusted, so every failure is a :class:`PluginSpecError` naming ``source``."""
    try:
        tables = json.loads(text)
    except ValueError as exc:
        raise PluginSpecError(source, "-", f"not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise PluginSpecError(source, "-", "nested too deeply to be a list of plugin specs") from exc
    if not isinstance(tables, list):
        raise PluginSpecError(source, "-", f"expected a list of spec tables, got "
                              f"{type(tables).__name__}")
    return [spec_from_dict(table, source=source) for table in tables]


def spec_from_dict(table: Any, source: str = "<plugin spec>") -> PluginSpec:
    """A :class:`PluginSpec` from a parsed TOML/JSON table; errors name ``source`` and the field."""
    if not isinstance(table, Mapping):
        raise PluginSpecError(source, "-", "the top level must be a table (an object)")
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise PluginSpecError(source, unknown[0], f"unknown field; known: {sorted(_FIELDS)}")
    get = _Reader(table, source)
    spec = PluginSpec(
        op=get.name("op", required=True),
        version=get.text("version", "1"),
        namespace=get.text("namespace", ""),
        domain=get.text("domain", DEFAULT_DOMAIN),
        layout=get.choice("layout", tuple(LAYOUTS), "separate_bsnh"),
        output_layout=get.choice("output_layout", OUTPUT_LAYOUTS, "BSNH"),
        kinds=get.choices("kinds", KINDS),
        attributes=_attributes(table.get("attributes", {}), source),
        constraints=_constraints(table.get("constraints", {}), source),
        scale=get.choice("scale", SCALE_MODES, None) or _default_scale(table),
        mask=get.choice("mask", MASK_MODES, "none"),
        description=get.text("description", ""),
    )
    if spec.layout == "qkv_packed" and "cross" in spec.kinds:
        raise PluginSpecError(source, "kinds", "layout 'qkv_packed' packs Q, K and V from one "
                              "source: it can only run self-attention (kinds = [\"self\"])")
    if spec.scale == "attribute" and "scale" not in spec.attributes.values():
        raise PluginSpecError(source, "scale", "scale = \"attribute\" needs an attribute mapped "
                              "to \"scale\" in [attributes]")
    return spec


def _default_scale(table: Mapping[str, Any]) -> str:
    attrs = table.get("attributes", {})
    has_scale = isinstance(attrs, Mapping) and "scale" in attrs.values()
    return "attribute" if has_scale else "inverse_sqrt_head_dim"


class _Reader:
    def __init__(self, table: Mapping[str, Any], source: str, prefix: str = ""):
        self.table, self.source, self.prefix = table, source, prefix

    def _error(self, name: str, reason: str) -> PluginSpecError:
        return PluginSpecError(self.source, self.prefix + name, reason)

    def text(self, name: str, default: str | None = None, required: bool = False) -> str:
        if name not in self.table:
            if required:
                raise self._error(name, "missing (required)")
            return default  # type: ignore[return-value]
        value = self.table[name]
        if isinstance(value, int) and not isinstance(value, bool) and name == "version":
            value = str(value)  # version = 1 is a natural slip for "1"
        if not isinstance(value, str):
            raise self._error(name, f"expected a string, got {type(value).__name__} {value!r}")
        return value

    def name(self, name: str, required: bool = False) -> str:
        value = self.text(name, required=required)
        if not value or not value.replace("_", "").replace("-", "").isalnum():
            raise self._error(name, f"{value!r} is not an op name (letters, digits, _ and -)")
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str | None) -> str | None:
        value = self.text(name, default)
        if value is not None and value not in options:
            raise self._error(name, f"{value!r} is not one of {list(options)}")
        return value

    def choices(self, name: str, options: tuple[str, ...]) -> tuple[str, ...]:
        if name not in self.table:
            return options
        values = self.table[name]
        if not isinstance(values, list) or not values:
            raise self._error(name, f"expected a non-empty list of {list(options)}")
        for value in values:
            if value not in options:
                raise self._error(name, f"{value!r} is not one of {list(options)}")
        return tuple(values)

    def ints(self, name: str) -> tuple[int, ...]:
        values = self.table.get(name, [])
        if not isinstance(values, list) or not all(_positive_int(v) for v in values):
            raise self._error(name, f"expected a list of positive integers, got {values!r}")
        return tuple(values)

    def flag(self, name: str) -> bool:
        value = self.table.get(name, False)
        if not isinstance(value, bool):
            raise self._error(name, f"expected true or false, got {value!r}")
        return value

    def int(self, name: str) -> int | None:
        value = self.table.get(name)
        if value is not None and not _positive_int(value):
            raise self._error(name, f"expected a positive integer, got {value!r}")
        return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _attributes(table: Any, source: str) -> dict[str, Any]:
    if not isinstance(table, Mapping):
        raise PluginSpecError(source, "attributes", "expected a table of attribute = fact")
    out: dict[str, Any] = {}
    for name, value in table.items():
        where = f"attributes.{name}"
        if name in ("plugin_version", "plugin_namespace"):
            raise PluginSpecError(source, where, "set by 'version' and 'namespace'; do not map it")
        if isinstance(value, str):
            if value not in ATTRIBUTE_SOURCES:
                raise PluginSpecError(source, where, f"{value!r} is not a block fact; use one of "
                                      f"{list(ATTRIBUTE_SOURCES)} or {{ value = ... }}")
            out[name] = value
        elif isinstance(value, Mapping) and set(value) == {"value"} and \
                isinstance(value["value"], int | float | str) and not isinstance(value["value"], bool):
            out[name] = {"value": value["value"]}
        else:
            raise PluginSpecError(source, where, "expected a block fact name or { value = <int, "
                                  f"float or string> }}, got {value!r}")
    return out


def _constraints(table: Any, source: str) -> Constraints:
    if not isinstance(table, Mapping):
        raise PluginSpecError(source, "constraints", "expected a table")
    unknown = sorted(set(table) - _CONSTRAINT_FIELDS)
    if unknown:
        raise PluginSpecError(source, f"constraints.{unknown[0]}",
                              f"unknown field; known: {sorted(_CONSTRAINT_FIELDS)}")
    get = _Reader(table, source, prefix="constraints.")
    dtypes = table.get("dtypes", [])
    if not isinstance(dtypes, list) or any(d not in DTYPES for d in dtypes):
        raise PluginSpecError(source, "constraints.dtypes",
                              f"expected a list drawn from {list(DTYPES)}, got {dtypes!r}")
    return Constraints(
        dtypes=tuple(dtypes), head_sizes=get.ints("head_sizes"),
        min_head_size=get.int("min_head_size"), max_head_size=get.int("max_head_size"),
        head_size_multiple=get.int("head_size_multiple"), max_kv_length=get.int("max_kv_length"),
        softmax_fp32=get.flag("softmax_fp32"),
    )


__all__ = ["ATTRIBUTE_SOURCES", "DEFAULT_DOMAIN", "LAYOUTS", "Constraints", "PluginSpec",
           "PluginSpecError", "load_spec", "spec_from_dict", "specs_from_json"]
