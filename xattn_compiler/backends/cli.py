"""The TensorRT-stage commands: ``build``, ``lint-trt`` and ``triton-repo``.

    xattn-compiler build MODEL|SPLIT_DIR --engine OUT [--trt-version X.Y]
                   [--fp16|--bf16|--int8 (10.x only)] [--fp32-softmax (10.x only)]
                   [--profile NAME:MIN:OPT:MAX ...] [--dim SYMBOL=MIN:OPT:MAX ...]
                   [--plugin-lib PATH ...] [--timing-cache PATH] [--decomposable] [--emit-trtexec]
    xattn-compiler lint-trt MODEL|SPLIT_DIR [--trt-version X] [--precision P] [--json]
    xattn-compiler triton-repo MODEL|SPLIT_DIR -o REPO [--engine [PART=]PLAN ...]

Wired into the main parser by :func:`add_backend_commands`. Handlers return an exit code;
:class:`~xattn_compiler.errors.InputError` (TensorRT missing included) is exit 2 and
:class:`~xattn_compiler.errors.CheckFailed` (lint blockers) exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import CheckFailed, InputError, OutputError
from ..text import printable

EXIT_OK = 0


def add_backend_commands(subparsers: Any, common_parent_parser: argparse.ArgumentParser) -> None:
    """Add ``build``, ``lint-trt`` and ``triton-repo`` to the CLI's subcommands."""
    _add_build(subparsers, common_parent_parser)
    _add_lint(subparsers, common_parent_parser)
    _add_triton(subparsers, common_parent_parser)


# --- build -----------------------------------------------------------------------------------

def _add_build(commands: Any, common: argparse.ArgumentParser) -> None:
    from .trt_ops import DEFAULT_VERSION, format_version

    cmd = commands.add_parser(
        "build", parents=[common], help="build a TensorRT engine (or print the trtexec command)",
        description="Build a TensorRT engine with one optimization profile. A split-kv "
                    "directory builds DIR/kv_projector.plan and DIR/decoder.plan into --engine. "
                    "TensorRT 11 takes the model's own types (no precision flags): convert the "
                    "model first with `optimize --precision fp16|bf16`.")
    cmd.add_argument("model", help="the ONNX model, or a split-kv directory")
    cmd.add_argument("--engine", required=True, metavar="OUT",
                     help="engine file to write (a directory for a split model)")
    cmd.add_argument("--trt-version", default=format_version(DEFAULT_VERSION), metavar="X.Y",
                     help="TensorRT version the build and the emitted commands are for "
                          "(default: %(default)s)")
    precision = cmd.add_mutually_exclusive_group()
    for name in ("fp16", "bf16", "int8"):
        precision.add_argument(f"--{name}", dest="precision", action="store_const", const=name,
                               help=f"TensorRT 10.x only: allow {name} kernels (on 11 use "
                                    f"`optimize --precision`)")
    cmd.set_defaults(precision="fp32")
    cmd.add_argument("--profile", action="append", default=[], metavar="NAME:MIN:OPT:MAX",
                     help="shapes of one input, like input_ids:1x1:1x64:8x448 (repeatable)")
    cmd.add_argument("--dim", action="append", default=[], metavar="SYMBOL=MIN:OPT:MAX",
                     help="range of one symbolic dim in every input, like enc_len=1500:1500:1500")
    cmd.add_argument("--plugin-lib", action="append", default=[], metavar="PATH",
                     help="plugin library to load (repeatable)")
    cmd.add_argument("--timing-cache", metavar="PATH",
                     help="timing cache to read (if present) and update")
    cmd.add_argument("--fp32-softmax", action="store_true",
                     help="TensorRT 10.x only: keep attention in fp32 in a half-precision build: "
                          "the layers guard-precision listed, else every Softmax (constraints, "
                          "obeyed)")
    cmd.add_argument("--decomposable", action="store_true",
                     help="let TensorRT decompose every ONNX Attention node when no fused kernel "
                          "fits (10.14+; default: the nodes `optimize --decomposable` marked)")
    cmd.add_argument("--workspace", type=int, metavar="MIB", help="workspace limit in MiB")
    cmd.add_argument("--emit-trtexec", action="store_true",
                     help="print the equivalent trtexec command and a Polygraphy comparison "
                          "with ONNX Runtime instead of building (no TensorRT needed)")
    cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    cmd.set_defaults(handler=run_build)


def run_build(args: argparse.Namespace) -> int:
    """Build every part of ``args.model``, or print the commands that would."""
    from .parts import load_parts, part_profiles
    from .profiles import parse_dim_range
    from .trtexec import BuildPlan, fp32_layer_names

    if args.workspace is not None and args.workspace < 1:
        raise InputError(f"--workspace {args.workspace}: give the limit in MiB, at least 1")
    version = _version(args.trt_version)
    _check_precision_options(args, version)
    parts = load_parts(args.model)
    split = len(parts) > 1 or parts[0].name != "model"
    engine = Path(args.engine)
    if split and engine.suffix == ".plan":
        raise InputError(f"--engine {engine}: a split model builds two engines; give a directory")
    profiles = part_profiles(parts, args.profile, dict(parse_dim_range(d) for d in args.dim))
    plugins = [Path(p) for p in args.plugin_lib]
    cache = Path(args.timing_cache) if args.timing_cache else None
    plans = [BuildPlan(part.path, part.engine_in(engine, split), profile,
                       _plan_precision(args.precision, part.model, version), plugins, cache,
                       fp32_layer_names(part.model)
                       if args.fp32_softmax and args.precision != "fp32" else [],
                       version, _decomposable(part.model, args.decomposable, version))
             for part, profile in zip(parts, profiles, strict=True)]
    if args.emit_trtexec:
        return _emit(parts, plans, args.json)
    return _build(parts, plans, args)


def _version(text: str) -> tuple[int, int]:
    from .trt_ops import parse_version

    try:
        return parse_version(text)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def _check_precision_options(args: argparse.Namespace, version: tuple[int, int]) -> None:
    from .trt_ops import format_version, strongly_typed_only

    if not strongly_typed_only(version):
        return
    if args.precision != "fp32":
        raise InputError(f"build --{args.precision}: TensorRT {format_version(version)} has no "
                         "precision flags (the model's own types decide); convert the model with "
                         f"`xattn-compiler optimize MODEL -o OUT --precision {args.precision}` "
                         "and build that")
    if args.fp32_softmax:
        raise InputError(f"build --fp32-softmax: TensorRT {format_version(version)} has no "
                         "per-layer precision constraints; keep the Softmax in fp32 in the graph "
                         "(`xattn-compiler optimize --precision fp16|bf16` does where needed)")


def _plan_precision(precision: str, model: Any, version: tuple[int, int]) -> str:
    from .trt_ops import strongly_typed_only
    from .trtexec import model_precision

    # On 11 the flags are gone; the plan's precision is then the model's (for tolerances).
    return model_precision(model) if strongly_typed_only(version) else precision


def _decomposable(model: Any, every: bool, version: tuple[int, int]) -> list[str]:
    from .trt_ops import DECOMPOSABLE_SINCE, format_version
    from .trtexec import decomposable_names

    names = ([n.name for n in model.graph.node if n.op_type == "Attention" and n.name]
             if every else decomposable_names(model))
    if names and version < DECOMPOSABLE_SINCE:
        raise InputError(f"decomposable attention needs TensorRT >= "
                         f"{format_version(DECOMPOSABLE_SINCE)} (IAttention), not "
                         f"{format_version(version)}")
    return names


def _emit(parts: list, plans: list, as_json: bool) -> int:
    from .trt_ops import format_version
    from .trtexec import polygraphy_command, shell_join, trtexec_command

    records = [{"part": part.name, "role": part.role,
                "trt_version": format_version(plan.trt_version),
                "decomposable_attentions": list(plan.decomposable),
                "trtexec": trtexec_command(plan), "polygraphy": polygraphy_command(plan)}
               for part, plan in zip(parts, plans, strict=True)]
    if as_json:
        print(json.dumps(records, indent=2))
        return EXIT_OK
    for record, plan in zip(records, plans, strict=True):
        print(f"# {record['part']}: {record['role']}")
        print(shell_join(record["trtexec"]))
        print("# check TensorRT against ONNX Runtime:")
        print(shell_join(record["polygraphy"]))
        if plan.decomposable:
            print("# Polygraphy has no option for decomposable attentions: if the build fails "
                  "for want of a fused kernel, compare the trtexec engine instead")
    return EXIT_OK


def _build(parts: list, plans: list, args: argparse.Namespace) -> int:
    from .tensorrt import build_engine

    results = []
    for part, plan in zip(parts, plans, strict=True):
        if plan.engine.exists() and plan.engine.resolve() == part.path.resolve():
            raise OutputError(f"{plan.engine}: refusing to write over the input model")
        result = build_engine(
            part.path, plan.profile, plan.precision if plan.precision_flags else "fp32",
            plan.plugins, engine_path=plan.engine, timing_cache=plan.timing_cache,
            fp32_softmax=bool(plan.fp32_layers),
            workspace_bytes=args.workspace * (1 << 20) if args.workspace else None,
            protect=[part.path], decomposable=plan.decomposable,
            trt_version=plan.trt_version)
        results.append({"part": part.name, "engine": str(result.engine),
                        "seconds": round(result.seconds, 2), **result.summary})
        if not args.quiet and not args.json:
            print(f"wrote {result.engine} ({part.role}): {result.summary.get('layers')} layers, "
                  f"{len(result.summary.get('attention_layers', []))} fused attention, "
                  f"{result.seconds:.1f} s", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    return EXIT_OK


# --- lint-trt --------------------------------------------------------------------------------

def _add_lint(commands: Any, common: argparse.ArgumentParser) -> None:
    from .trt_ops import DEFAULT_VERSION, format_version

    cmd = commands.add_parser(
        "lint-trt", parents=[common], help="check a model against TensorRT's ONNX support",
        description="Print what would block or slow a TensorRT build: unsupported ops and "
                    "types, If/Loop constructs, the opset, dynamic inputs without a profile, "
                    "ONNX Attention nodes the parser rejects, attention that will not fuse or "
                    "stays fp32, the legacy fMHCA/fMHA_V2 plugins (TensorRT 8.5 only). Exit 1 "
                    "when something blocks the build.")
    cmd.add_argument("model", help="the ONNX model, or a split-kv directory (both parts)")
    cmd.add_argument("--trt-version", default=format_version(DEFAULT_VERSION), metavar="X.Y",
                     help="TensorRT version to check against (default: %(default)s)")
    cmd.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"),
                     help="TensorRT 10.x: the build's precision flag (default: the model's own "
                          "types, the only choice on 11)")
    cmd.add_argument("--profile", action="append", default=[], metavar="NAME[:MIN:OPT:MAX]",
                     help="an input that will get a profile (no warning for it)")
    cmd.add_argument("--json", action="store_true", help="print the findings as JSON")
    cmd.set_defaults(handler=run_lint)


def run_lint(args: argparse.Namespace) -> int:
    from .lint_trt import lint_trt
    from .parts import load_parts

    version = _version(args.trt_version)
    profiled = [text.split(":", 1)[0] for text in args.profile]
    reports = [lint_trt(part.model, version, precision=args.precision, profiled_inputs=profiled,
                        name=str(part.path)) for part in load_parts(args.model)]
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    elif not args.quiet:
        print(printable("\n".join(r.render() for r in reports), multiline=True))
    blockers = sum(len(r.blockers) for r in reports)
    if blockers:
        raise CheckFailed(f"{args.model}: {blockers} finding(s) block a TensorRT "
                          f"{args.trt_version} build")
    return EXIT_OK


# --- triton-repo -----------------------------------------------------------------------------

def _add_triton(commands: Any, common: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser(
        "triton-repo", parents=[common], help="write a Triton Inference Server model repository",
        description="One Triton model per part (TensorRT plans given with --engine, else the "
                    "ONNX model for ONNX Runtime) and, for a split model, an ensemble that runs "
                    "the projector then the decoder.")
    cmd.add_argument("model", help="the ONNX model, or a split-kv directory")
    cmd.add_argument("-o", "--output", required=True, metavar="REPO", help="repository directory")
    cmd.add_argument("--engine", action="append", default=[], metavar="[PART=]PLAN",
                     help="serve this TensorRT plan for PART (kv_projector, decoder; "
                          "a single model takes just PLAN)")
    cmd.add_argument("--name", default="model", help="model name of a single model")
    cmd.add_argument("--ensemble-name", default="ensemble", help="the split ensemble's name")
    cmd.add_argument("--max-batch-size", type=int, default=8,
                     help="max_batch_size of batching models (default: %(default)s)")
    cmd.add_argument("--max-queue-delay-us", type=int, default=100,
                     help="dynamic batching queue delay in microseconds (default: %(default)s)")
    cmd.set_defaults(handler=run_triton_repo)


def run_triton_repo(args: argparse.Namespace) -> int:
    from ..io import load
    from .triton import TritonModel, split_models, write_repository

    source, out = Path(args.model), Path(args.output)
    # Triton reads max_batch_size as int32 and the queue delay as uint64.
    if not 1 <= args.max_batch_size < 2**31 or not 0 <= args.max_queue_delay_us < 2**64:
        raise InputError("--max-batch-size must be 1..2147483647 and --max-queue-delay-us "
                         "0..2**64-1")
    engines = dict(_engine_arg(text) for text in args.engine)
    if source.is_dir():
        models, kv_names = split_models(source, engines, args.max_batch_size)
        ensemble = (args.ensemble_name, kv_names)
    else:
        plan = engines.pop("", None) or engines.pop(args.name, None)
        if engines:
            raise InputError(f"--engine names parts {sorted(engines)}; a single model takes "
                             "--engine PLAN")
        models = [TritonModel(args.name, load(source), plan, args.max_batch_size)]
        ensemble = None
    configs = write_repository(out, models, ensemble=ensemble,
                               max_queue_delay_us=args.max_queue_delay_us, protect=[source])
    if not args.quiet:
        print(f"wrote {out}: " + ", ".join(c.parent.name for c in configs), file=sys.stderr)
    return EXIT_OK


def _engine_arg(text: str) -> tuple[str, Path]:
    part, sep, path = text.partition("=")
    return (part, Path(path)) if sep else ("", Path(text))
