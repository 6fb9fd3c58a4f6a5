"""A Triton Inference Server model repository for a model, or for a split model's parts.

Layout (one directory per model, version ``1``)::

    REPO/kv_projector/config.pbtxt   1/model.plan (TensorRT) or 1/model.onnx (ONNX Runtime)
    REPO/decoder/config.pbtxt        1/model.plan or 1/model.onnx
    REPO/ensemble/config.pbtxt       1/            (an ensemble has no model file)

Each ``config.pbtxt`` names the platform (``tensorrt_plan`` or ``onnxruntime_onnx``), every
input and output with its Triton type and dims (-1 for a dynamic dim), and turns on dynamic
batching when every input and output shares one batch dim on axis 0 (then ``dims`` leave it
out and ``max_batch_size`` is its profile maximum); otherwise ``max_batch_size: 0`` and full
dims. The ensemble wires the projector's K/V outputs into the decoder, so one request runs
projector then decoder; a client that decodes step by step calls ``kv_projector`` once and
``decoder`` per step, passing the K/V back (the split deployment of docs/tensorrt.md).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from .. import outputs
from ..errors import InputError, OutputError
from ..io import save
from ..text import pbtxt_string

ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16", "BFLOAT16": "TYPE_BF16", "DOUBLE": "TYPE_FP64",
    "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64", "BOOL": "TYPE_BOOL", "STRING": "TYPE_STRING",
}
PLATFORMS = {"plan": ("tensorrt_plan", "model.plan"), "onnx": ("onnxruntime_onnx", "model.onnx")}
#: A model name is its directory's name in the repository, so it must be one plain path
#: component: letters, digits, '_', '-' and '.', not starting with '.' or '-' (no '.', '..' or
#: hidden directories, nothing a shell reads as an option).
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def check_model_name(name: object, what: str = "model name") -> str:
    """``name`` if it is a safe Triton model (directory) name, else :class:`InputError`."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise InputError(f"Triton {what} {name!r}: use 1-128 letters, digits, '_', '-' and '.', "
                         "starting with a letter, digit or '_'")
    return name


@dataclass
class Tensor:
    name: str
    data_type: str        # Triton type, TYPE_*
    dims: list[int]       # full dims, -1 where dynamic
    batch_symbol: str | None


@dataclass
class TritonModel:
    """One model of the repository: an ONNX model, served as itself or as a built plan."""

    name: str
    model: onnx.ModelProto
    plan: Path | None = None
    max_batch: int | None = None    # the batch dim's profile maximum (None: 8)

    def io(self) -> tuple[list[Tensor], list[Tensor]]:
        initializers = {t.name for t in self.model.graph.initializer}
        inputs = [_tensor(v) for v in self.model.graph.input if v.name not in initializers]
        return inputs, [_tensor(v) for v in self.model.graph.output]

    def batch_symbol(self) -> str | None:
        """The one symbol every input and output has on axis 0, else None (no batching)."""
        inputs, outputs = self.io()
        symbols = {t.batch_symbol for t in [*inputs, *outputs]}
        return symbols.pop() if len(symbols) == 1 and None not in symbols else None


def _tensor(value: onnx.ValueInfoProto) -> Tensor:
    kind = value.type.tensor_type
    type_name = onnx.TensorProto.DataType.Name(kind.elem_type)
    if type_name not in ONNX_TO_TRITON:
        raise InputError(f"tensor '{value.name}': type {type_name} has no Triton equivalent")
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
    first = kind.shape.dim[0] if kind.shape.dim else None
    batch = first.dim_param if first is not None and first.dim_param else None
    return Tensor(value.name, ONNX_TO_TRITON[type_name], dims, batch)


def model_config(model: TritonModel, *, max_queue_delay_us: int = 100) -> str:
    """The ``config.pbtxt`` text of one model."""
    platform = PLATFORMS["plan" if model.plan is not None else "onnx"][0]
    batching = model.batch_symbol() is not None
    max_batch = (model.max_batch or 8) if batching else 0
    inputs, outputs = model.io()
    lines = [f"name: {pbtxt_string(model.name)}", f"platform: {pbtxt_string(platform)}",
             f"max_batch_size: {max_batch}"]
    lines += _tensor_block("input", inputs, batching)
    lines += _tensor_block("output", outputs, batching)
    if batching:
        lines += ["dynamic_batching {", f"  max_queue_delay_microseconds: {max_queue_delay_us}",
                  "}"]
    kind = "KIND_GPU" if model.plan is not None else "KIND_AUTO"
    lines += ["instance_group [", "  {", "    count: 1", f"    kind: {kind}", "  }", "]"]
    return "\n".join(lines) + "\n"


def ensemble_config(name: str, projector: TritonModel, decoder: TritonModel,
                    kv_names: Sequence[str]) -> str:
    """An ensemble: projector (static inputs -> K/V), then decoder (the rest + K/V -> outputs)."""
    batching = projector.batch_symbol() is not None and decoder.batch_symbol() is not None
    max_batch = min(projector.max_batch or 8, decoder.max_batch or 8) if batching else 0
    p_inputs, p_outputs = projector.io()
    d_inputs, d_outputs = decoder.io()
    kv = set(kv_names)
    missing = kv - {t.name for t in p_outputs} | kv - {t.name for t in d_inputs}
    if missing:
        raise InputError(f"ensemble '{name}': K/V tensors {sorted(missing)} are not both "
                         "projector outputs and decoder inputs")
    outer_inputs = p_inputs + [t for t in d_inputs if t.name not in kv
                               and t.name not in {p.name for p in p_inputs}]
    lines = [f"name: {pbtxt_string(name)}", 'platform: "ensemble"', f"max_batch_size: {max_batch}"]
    lines += _tensor_block("input", outer_inputs, batching)
    lines += _tensor_block("output", d_outputs, batching)
    lines += ["ensemble_scheduling {", "  step ["]
    steps = [(projector.name, [t.name for t in p_inputs], [t.name for t in p_outputs]),
             (decoder.name, [t.name for t in d_inputs], [t.name for t in d_outputs])]
    for index, (model_name, ins, outs) in enumerate(steps):
        lines += ["    {", f"      model_name: {pbtxt_string(model_name)}",
                  "      model_version: -1"]
        lines += [f"      input_map {{ key: {pbtxt_string(n)} value: {pbtxt_string(n)} }}"
                  for n in ins]
        lines += [f"      output_map {{ key: {pbtxt_string(n)} value: {pbtxt_string(n)} }}"
                  for n in outs]
        lines.append("    }" + ("," if index < len(steps) - 1 else ""))
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def _tensor_block(kind: str, tensors: Iterable[Tensor], batching: bool) -> list[str]:
    tensors = list(tensors)
    lines = [f"{kind} ["]
    for index, tensor in enumerate(tensors):
        dims = tensor.dims[1:] if batching else tensor.dims
        lines += ["  {", f"    name: {pbtxt_string(tensor.name)}",
                  f"    data_type: {tensor.data_type}",
                  f"    dims: [ {', '.join(str(d) for d in dims)} ]",
                  "  }" + ("," if index < len(tensors) - 1 else "")]
    return lines + ["]"]


def write_repository(
    out_dir: str | Path,
    models: Sequence[TritonModel],
    *,
    ensemble: tuple[str, Sequence[str]] | None = None,
    max_queue_delay_us: int = 100,
    protect: Iterable[str | Path] = (),
) -> list[Path]:
    """Write a model repository; ``ensemble`` is ``(name, kv_names)`` for a projector+decoder
    pair (``models[0]`` the projector, ``models[1]`` the decoder). Returns the config files."""
    out, protect = Path(out_dir), list(protect)
    names = [m.name for m in models] + ([ensemble[0]] if ensemble else [])
    for name in names:
        check_model_name(name, "ensemble name" if ensemble and name == ensemble[0] else "model name")
    if len(set(names)) != len(names):
        raise InputError(f"Triton model names must be unique, got {names}")
    for model in models:
        if model.plan is not None and not model.plan.is_file():
            raise InputError(f"{model.plan}: engine file not found")
    # Every config is built before anything is written: a bad tensor fails with an empty repo.
    texts = {m.name: model_config(m, max_queue_delay_us=max_queue_delay_us) for m in models}
    if ensemble is not None:
        texts[ensemble[0]] = ensemble_config(ensemble[0], models[0], models[1], ensemble[1])
    configs = []
    for model in models:
        version = _model_dir(out, model.name) / "1"
        if model.plan is not None:
            _copy_file(model.plan, version / PLATFORMS["plan"][1], protect)
        else:
            save(model.model, version / PLATFORMS["onnx"][1], protect=list(protect))
        configs.append(_write_text(out / model.name / "config.pbtxt", texts[model.name], protect))
    if ensemble is not None:
        _model_dir(out, ensemble[0])
        configs.append(_write_text(out / ensemble[0] / "config.pbtxt", texts[ensemble[0]],
                                   protect))
    return configs


def _model_dir(out: Path, name: str) -> Path:
    """``out/name`` with its version folder ``1``, created as real folders: a link planted
    in an existing repository must not carry our files elsewhere."""
    for folder in (out / name, out / name / "1"):
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise OutputError(f"{folder}: exists and is not a folder; refusing to write into it")
    try:
        (out / name / "1").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out / name}: cannot create the folder ({exc.strerror or exc})") from exc
    return out / name


def split_models(directory: str | Path, plans: Mapping[str, Path] | None = None,
                 max_batch: int | None = None) -> tuple[list[TritonModel], list[str]]:
    """The projector and decoder of a ``split-kv`` directory, and the K/V tensor names."""
    from ..io import load
    from ..split_spec import read_split_spec

    directory = Path(directory)
    spec = read_split_spec(directory)
    if spec.projector is None:
        raise InputError(f"{directory}: the split folded every K/V into the decoder; there is "
                         "no projector to serve (serve decoder.onnx alone)")
    plans = dict(plans or {})
    unknown = sorted(set(plans) - {"kv_projector", "decoder"})
    if unknown:
        raise InputError(f"--engine names {unknown}; the split has kv_projector and decoder")
    models = [TritonModel(part, load(path), plans.pop(part, None), max_batch)
              for part, path in (("kv_projector", spec.projector), ("decoder", spec.decoder))]
    return models, list(spec.kv_names)


def _write_text(path: Path, text: str, protect: Iterable[str | Path]) -> Path:
    # Atomic, never through a link planted in an existing repository (outputs' policy).
    return outputs.write_text(path, text, list(protect))


def _copy_file(source: Path, target: Path, protect: Iterable[str | Path]) -> None:
    with outputs.atomic_path(target, list(protect)) as tmp:
        shutil.copyfile(source, tmp)
