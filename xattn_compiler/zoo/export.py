"""Export one zoo model: build it, take torch's reference outputs, export to ONNX, write files.

An export directory holds three files:

* ``model.onnx``: the graph with its weights embedded (external data only above 2 GB);
* ``sample.npz``: the sample inputs under their input names and torch's outputs under
  ``ref:<output name>``;
* ``manifest.json``: what was built and how (see :func:`build_manifest`).

The bytes depend only on the recipe and the library versions: per-node stack traces and doc
strings (which hold absolute paths) are stripped, so re-exporting gives an identical file.
torch is imported inside the functions that build and export only, so reading an export (a
cache hit) never imports it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import importlib.util
import io
import json
import logging
import re
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import io as xio
from ..errors import InputError
from .spec import Built, ZooModel

log = logging.getLogger(__name__)

MODEL_FILE, SAMPLE_FILE, MANIFEST_FILE = "model.onnx", "sample.npz", "manifest.json"
#: Prefix of the reference outputs' keys in ``sample.npz``.
REF_PREFIX = "ref:"
#: Distributions whose versions shape an export (recorded in manifests and cache keys).
VERSIONED = ("torch", "transformers", "diffusers", "onnx", "onnxscript")
#: Fused attention ops an exporter may emit: ONNX ``Attention`` (opset 23) and ORT's contrib ops.
FUSED_ATTENTION_OPS = frozenset({
    ("", "Attention"), ("com.microsoft", "Attention"), ("com.microsoft", "MultiHeadAttention"),
    ("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "PackedAttention"),
    ("com.microsoft", "PackedMultiHeadAttention"), ("com.microsoft", "DecoderMaskedMultiHeadAttention"),
})
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class ExportedModel:
    """A finished export directory: ``model.onnx``, ``sample.npz`` and ``manifest.json``."""

    directory: Path

    @property
    def path(self) -> Path:
        """The exported ``model.onnx``."""
        return self.directory / MODEL_FILE

    @functools.cached_property
    def manifest(self) -> dict[str, Any]:
        """The parsed ``manifest.json``."""
        return json.loads((self.directory / MANIFEST_FILE).read_text())

    @property
    def name(self) -> str:
        """The zoo model's name."""
        return self.manifest["name"]

    def sample(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(inputs, reference outputs)`` by name: the arrays torch was run on, and its outputs."""
        inputs: dict[str, np.ndarray] = {}
        references: dict[str, np.ndarray] = {}
        with np.load(self.directory / SAMPLE_FILE, allow_pickle=False) as data:
            for key in data.files:
                if key.startswith(REF_PREFIX):
                    references[key[len(REF_PREFIX):]] = data[key]
                else:
                    inputs[key] = data[key]
        return inputs, references

    @staticmethod
    def is_complete(directory: Path) -> bool:
        """True when ``directory`` holds all three files of an export."""
        return all((Path(directory) / f).is_file()
                   for f in (MODEL_FILE, SAMPLE_FILE, MANIFEST_FILE))


# --- helpers for builders ------------------------------------------------------------------

def randomize_parameters(module: Any, seed: int = 0) -> None:
    """Redraw every parameter of ``module`` from a generator seeded with ``seed``.

    Library inits use std 0.02 and zero biases, which makes attention nearly uniform and hides
    a dropped bias or LayerNorm shift; these draws give O(1) activations and non-zero biases.
    Parameters are visited in name order so the draw does not depend on registration order.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if param.dim() == 1 and leaf == "weight":  # norm scales: around 1
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() == 1:  # biases and norm shifts
                param.copy_(0.1 * noise)
            elif "embed" in name or "shared" in name:  # token/position tables: unit scale
                param.copy_(noise)
            else:  # projections: keep activations O(1) whatever the fan-in
                param.copy_(noise * param[0].numel() ** -0.5)


def requirements_missing(model: ZooModel) -> list[str]:
    """The modules of ``model.requires`` that cannot be imported here."""
    return [name for name in model.requires if importlib.util.find_spec(name) is None]


def library_versions() -> dict[str, str | None]:
    """Installed versions of :data:`VERSIONED`, read from metadata so torch is not imported."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --- export --------------------------------------------------------------------------------

def export_model(model: ZooModel, out_dir: str | Path, size: str = "small") -> ExportedModel:
    """Build ``model`` at ``size``, export it and write the three files into ``out_dir``.

    Raises :class:`InputError` for a size the model does not offer or a missing requirement.
    """
    if size not in model.sizes:
        raise InputError(f"zoo model '{model.name}' has no size '{size}' "
                         f"(sizes: {', '.join(model.sizes)})")
    missing = requirements_missing(model)
    if missing:
        raise InputError(f"zoo model '{model.name}' needs {', '.join(missing)}, which cannot "
                         "be imported here (pip install 'xattn-compiler[zoo]')")
    built = model.build(size)
    _tidy_class_names(built.module)
    if model.dtype == "float16":
        _cast_half(built)
    references = torch_outputs(built)
    start = time.perf_counter()
    proto, notes = _export_proto(model, built)
    seconds = time.perf_counter() - start
    proto = strip_source_locations(proto)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Below 2 GB the weights stay embedded; above, xio.save writes model.onnx.data beside it.
    xio.save(proto, out_dir / MODEL_FILE)
    inputs = {name: _to_numpy(value) for name, value in built.inputs.items()}
    _write_npz(out_dir / SAMPLE_FILE,
               {**inputs, **{REF_PREFIX + k: v for k, v in references.items()}})
    manifest = build_manifest(model, size, built, proto, [*built.notes, *notes], seconds)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("exported %s (%s) to %s in %.1f s", model.name, size, out_dir, seconds)
    return ExportedModel(out_dir)


def _tidy_class_names(module: Any) -> None:
    """Drop ``<locals>`` from the qualified names of classes defined inside functions.

    The exporter records every module's class path in node metadata; builders define their
    torch classes inside functions (torch may only be imported lazily), and
    ``build.<locals>.Model`` is noise there. The name stays unique within its module.
    """
    for sub in module.modules():
        cls = type(sub)
        if "<locals>" in cls.__qualname__:
            cls.__qualname__ = cls.__name__


def _cast_half(built: Built) -> None:
    """Cast the module and its float inputs to float16 in place (integer inputs stay)."""
    built.module = built.module.half()
    built.inputs = {name: value.half() if value.is_floating_point() else value
                    for name, value in built.inputs.items()}


def torch_outputs(built: Built) -> dict[str, np.ndarray]:
    """Run the module on its sample inputs; outputs by ``built.output_names``."""
    import torch

    with torch.no_grad():
        result = built.module(*built.inputs.values())
    values = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(values) != len(built.output_names):
        raise ValueError(f"the module returns {len(values)} outputs but output_names has "
                         f"{len(built.output_names)}: {built.output_names}")
    return {name: _to_numpy(value) for name, value in zip(built.output_names, values, strict=True)}


def _to_numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().cpu().numpy()


def _export_proto(model: ZooModel, built: Built) -> tuple[onnx.ModelProto, list[str]]:
    """Export with the model's exporter; also return notes on what could not be kept."""
    if model.exporter == "torchscript":
        proto = _torchscript_export(built, model.opset)
        return proto, _static_dim_notes(built, proto)
    return _dynamo_export(built, model.opset)


def _dynamo_export(built: Built, opset: int) -> tuple[onnx.ModelProto, list[str]]:
    """Export with torch dynamo, named dims dynamic; dims the tracer specialises go static.

    Named :class:`torch.export.Dim` first, as a user would write them. When that fails (a dim
    that must stay static, a bound torch cannot prove) the export is redone with ``Dim.AUTO``,
    which keeps dynamic what it can, and then with static shapes; what became static is noted.
    """
    from torch.export import Dim

    notes: list[str] = []
    attempts = [("named", _named_dims(built)), ("auto", _auto_dims(built, Dim.AUTO)),
                ("static", None)]
    if not built.dynamic_dims:
        attempts = [("static", None)]
    for index, (kind, dynamic_shapes) in enumerate(attempts):
        try:
            program = _torch_onnx_export(built, opset, dynamic_shapes)
            break
        except Exception as exc:  # torch.export raises many unrelated types
            if index == len(attempts) - 1:
                raise
            reason = root_cause(exc)
            log.warning("export with %s dims failed (%s); retrying", kind, reason)
            notes.append(f"export with {kind} dynamic dims failed: {reason}")
    if kind == "auto":
        program.rename_axes(_auto_rename_mapping(built, program))
    proto = program.model_proto
    notes.extend(_static_dim_notes(built, proto))
    return proto, notes


def _torch_onnx_export(built: Built, opset: int, dynamic_shapes: tuple | None) -> Any:
    import torch

    with _exporter_output_logged():
        return torch.onnx.export(
            built.module,
            tuple(built.inputs.values()),
            dynamo=True,
            opset_version=opset,
            input_names=list(built.inputs),
            output_names=list(built.output_names),
            dynamic_shapes=dynamic_shapes,
            external_data=False,
        )


@contextlib.contextmanager
def _exporter_output_logged() -> Iterator[None]:
    """Route torch.onnx's progress prints to the log (library code must not print), and mute
    its warning that a shared ``Dim`` is renamed once (sharing is what the recipe asked for)."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            log.debug("torch.onnx: %s", line)


def _named_dims(built: Built) -> tuple | None:
    """``dynamic_shapes`` in forward order, one shared ``Dim`` per dim name."""
    if not built.dynamic_dims:
        return None
    from torch.export import Dim

    dims: dict[str, Any] = {}
    return tuple(
        {axis: dims.setdefault(dim, Dim(dim)) for axis, dim in
         sorted(built.dynamic_dims.get(name, {}).items())} or None
        for name in built.inputs
    )


def _auto_dims(built: Built, auto: Any) -> tuple | None:
    if not built.dynamic_dims:
        return None
    return tuple({axis: auto for axis in built.dynamic_dims.get(name, {})} or None
                 for name in built.inputs)


def _auto_rename_mapping(built: Built, program: Any) -> dict[str, str]:
    """Map the tracer's symbol names (``s0``...) on the graph inputs to the recipe's names."""
    mapping: dict[str, str] = {}
    for value, name in zip(program.model.graph.inputs, built.inputs, strict=False):
        for axis, dim_name in built.dynamic_dims.get(name, {}).items():
            symbol = value.shape[axis].value if value.shape is not None else None
            if isinstance(symbol, str) and symbol not in mapping:
                mapping[symbol] = dim_name
    return mapping


def _static_dim_notes(built: Built, proto: onnx.ModelProto) -> list[str]:
    """One note for every dim the recipe wanted dynamic that the graph does not name so."""
    notes = []
    graph_inputs = {value.name: value for value in proto.graph.input}
    for name, axes in built.dynamic_dims.items():
        value = graph_inputs.get(name)
        if value is None:
            notes.append(f"input '{name}' is not a graph input; its dynamic dims are moot")
            continue
        shape = value.type.tensor_type.shape.dim
        for axis, dim_name in sorted(axes.items()):
            dim = shape[axis]
            if dim.HasField("dim_value"):
                notes.append(f"{name} axis {axis} ('{dim_name}') exported static: "
                             f"{dim.dim_value}")
            elif dim.dim_param != dim_name:
                notes.append(f"{name} axis {axis} ('{dim_name}') exported as "
                             f"'{dim.dim_param}'")
    return notes


def _torchscript_export(built: Built, opset: int) -> onnx.ModelProto:
    """Export with the TorchScript exporter, ``dynamic_axes`` from the recipe."""
    import torch

    dynamic_axes = {name: dict(axes) for name, axes in built.dynamic_dims.items()}
    with tempfile.TemporaryDirectory(prefix="xattn-zoo-") as tmp:
        path = Path(tmp) / MODEL_FILE
        with _exporter_output_logged():
            torch.onnx.export(
                built.module,
                tuple(built.inputs.values()),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(built.inputs),
                output_names=list(built.output_names),
                dynamic_axes=dynamic_axes or None,
            )
        return onnx.load(path)  # loads any external data the exporter wrote into the proto


def strip_source_locations(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop per-node stack traces and doc strings, in place; return ``model``.

    They hold absolute paths of the machine that exported, so keeping them would make the
    bytes depend on where the code lives. The exporter's other metadata is kept.
    """
    for node in iter_nodes(model.graph):
        node.doc_string = ""
        kept = [p for p in node.metadata_props if "stack_trace" not in p.key]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    return model


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, including those in If/Loop/Scan bodies."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attr.g)
            for sub in attr.graphs:
                yield from iter_nodes(sub)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Uncompressed npz; np.savez needs a file object to accept ':' in key names."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def root_cause(exc: BaseException) -> str:
    """``Type: first line`` of the innermost cause of ``exc``: torch.onnx wraps the error that
    matters in a generic "failed to export" one."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    text = _ANSI.sub("", lines[0]).strip() if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- manifest ------------------------------------------------------------------------------

def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Count of each op type in the graph and its subgraphs; other domains as ``domain::Op``.

    Bodies of model-local functions are counted too, under their own op types.
    """
    nodes = list(iter_nodes(model.graph))
    for function in model.functions:
        for node in function.node:
            nodes.append(node)
    counts = collections.Counter(_op_key(node) for node in nodes)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def fused_attention_count(model: onnx.ModelProto) -> int:
    """How many fused attention ops (:data:`FUSED_ATTENTION_OPS`) the export holds."""
    return sum(1 for node in iter_nodes(model.graph)
               if (node.domain if node.domain != "ai.onnx" else "", node.op_type)
               in FUSED_ATTENTION_OPS)


def _value_entry(value: onnx.ValueInfoProto) -> dict[str, Any]:
    """A graph input or output: name, numpy dtype name, shape with symbolic dims as strings."""
    tensor = value.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else
             (int(d.dim_value) if d.HasField("dim_value") else None) for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
    return {"name": value.name, "dtype": dtype, "shape": shape}


def tolerance_for(model_or_manifest: ZooModel | dict[str, Any]) -> tuple[float, float]:
    """``(rtol, atol factor)``: the model's override, else by dtype (the atol is scaled by
    ``max(1, max|reference|)`` per output)."""
    if isinstance(model_or_manifest, ZooModel):
        override, dtype = model_or_manifest.tolerance, model_or_manifest.dtype
    else:
        override, dtype = model_or_manifest.get("tolerance"), model_or_manifest["dtype"]
    if override is not None:
        return float(override[0]), float(override[1])
    return (2e-2, 2e-2) if dtype == "float16" else (1e-3, 1e-4)


def build_manifest(model: ZooModel, size: str, built: Built, proto: onnx.ModelProto,
                   notes: list[str], seconds: float) -> dict[str, Any]:
    """The manifest of an export; counts and opset are read from the exported file."""
    return {
        "name": model.name,
        "family": model.family,
        "description": model.description,
        "size": size,
        "exporter": model.exporter,
        "opset": xio.default_opset(proto),
        "dtype": model.dtype,
        "versions": library_versions(),
        "inputs": [_value_entry(v) for v in proto.graph.input],
        "outputs": [_value_entry(v) for v in proto.graph.output],
        "dynamic_dims": {name: {str(axis): dim for axis, dim in sorted(axes.items())}
                         for name, axes in built.dynamic_dims.items()},
        "attention": built.attention.to_dict(),
        "static_inputs": list(built.static_inputs),
        "kv_source_kind": built.kv_source_kind,
        "config": _jsonable(built.config),
        "notes": list(notes),
        "tags": list(model.tags),
        "num_nodes": sum(1 for _ in iter_nodes(proto.graph)),
        "op_histogram": op_histogram(proto),
        "fused_attention_ops": fused_attention_count(proto),
        "export_seconds": round(seconds, 2),
        "tolerance": list(tolerance_for(model)),
    }


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold (dtypes, tuples of objects) turned to text."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


# --- checking ------------------------------------------------------------------------------

def check_export(exported: ExportedModel) -> Any:
    """Run ``model.onnx`` in ONNX Runtime on the sample and compare with torch's outputs.

    Uses :func:`xattn_compiler.verification.run_model` (graph optimizations off) and the
    manifest's tolerance; returns a :class:`xattn_compiler.verification.VerifyResult`.
    """
    from .. import verification

    inputs, references = exported.sample()
    outputs = verification.run_model(exported.path, inputs)
    rtol, atol_factor = tolerance_for(exported.manifest)
    checks = []
    for name, reference in references.items():
        if name not in outputs:
            checks.append(verification.OutputCheck(
                name, reference.dtype.name, tuple(reference.shape), None, None, rtol, 0.0,
                False, "missing from the export's outputs"))
            continue
        finite = np.abs(reference[np.isfinite(reference)].astype(np.float64))
        atol = atol_factor * max(1.0, float(finite.max()) if finite.size else 1.0)
        checks.append(verification._compare(name, reference, outputs[name], rtol, atol))
    shapes = {name: tuple(array.shape) for name, array in inputs.items()}
    return verification.VerifyResult(all(c.ok for c in checks), checks, shapes)
