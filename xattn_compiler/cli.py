"""The ``xattn-compiler`` command line.

Exit codes (the contract in DESIGN.md): 0 success; 1 a check the user asked for failed;
2 bad input or usage, with one line on stderr naming the file, node or tensor; 70 a bug in
xattn-compiler itself (a pass crashed, with the pass named, or any exception no command turned
into one of ours), also one line: the traceback only with ``optimize --debug`` or
``XATTN_DEBUG=1``. Everything printed passes through :func:`~xattn_compiler.text.printable`,
so a name from a model cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from . import __version__, outputs
from .backends.cli import add_backend_commands
from .errors import CheckFailed, InputError, OutputError, PassError, ReferenceRunError
from .io import load
from .passmanager import Listener, Pass, PassRecord
from .pipeline import DEFAULT_PIPELINE, QKV_LAYOUTS, TARGETS, model_summary, optimize
from .registry import default_registry
from .split_cli import add_split_commands
from .text import printable
from .zoo.cli import add_zoo_commands

log = logging.getLogger("xattn_compiler")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 70


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, args.quiet)
    _quiet_libraries(args.verbose)
    try:
        return args.handler(args)
    except CheckFailed as exc:
        _error(str(exc))
        return EXIT_CHECK_FAILED
    except InputError as exc:
        _error(str(exc))
        return EXIT_BAD_INPUT
    except PassError as exc:
        _traceback_if_debugging(args, exc)
        _error(f"{exc} -- this is a bug in xattn-compiler; rerun with --debug "
               "--reproducer DIR and report it with the files written there")
        return EXIT_INTERNAL
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except MemoryError:
        # Not a bug to report: the input (or its options) needs more memory than there is.
        _error(f"{args.command}: out of memory; the input is too large for this machine")
        return EXIT_BAD_INPUT
    except BrokenPipeError:
        # `inspect --json | head`: the reader left; that is not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except OSError as exc:
        if exc.filename is None:
            return _internal_error(args, exc)
        # A file we could not read or write (permissions, a full disk): the user's to fix.
        _traceback_if_debugging(args, exc)
        _error(f"{exc.filename}: {exc.strerror or exc}")
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback for users
        return _internal_error(args, exc)


def _internal_error(args: argparse.Namespace, exc: BaseException) -> int:
    _traceback_if_debugging(args, exc)
    _error(f"{args.command}: internal error {type(exc).__name__}: {exc} -- this is a bug in "
           "xattn-compiler; rerun with XATTN_DEBUG=1 for the traceback and report it")
    return EXIT_INTERNAL


def _traceback_if_debugging(args: argparse.Namespace, exc: BaseException) -> None:
    # `optimize --debug` already means "look closer"; XATTN_DEBUG=1 works for every command.
    if getattr(args, "debug", False) or os.environ.get("XATTN_DEBUG", "") not in ("", "0"):
        traceback.print_exception(exc, file=sys.stderr)


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors in the CLI's one-line form (exit 2), pointing at ``--help``; the usage
    block argparse prints would be several lines, with the user's text unescaped."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog.partition(" ")[2]
        where = f"{command}: " if command else ""
        self.exit(EXIT_BAD_INPUT, f"xattn-compiler: error: {where}{printable(message)} "
                                  f"(see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    noise = common.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="count", default=0,
                       help="log what each pass does (-vv: debug detail)")
    noise.add_argument("-q", "--quiet", action="store_true",
                       help="only errors; no progress lines")
    parser = _OneLineParser(
        prog="xattn-compiler",
        description="Find, clean up, split and fuse attention in ONNX models for TensorRT.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_inspect(commands, common)
    _add_optimize(commands, common)
    _add_verify(commands, common)
    _add_passes(commands, common)
    add_split_commands(commands, common)
    add_zoo_commands(commands, common)
    add_backend_commands(commands, common)
    return parser


# --- inspect ---------------------------------------------------------------------------------

def _add_inspect(commands: Any, common: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser(
        "inspect", parents=[common], help="list every attention block in a model",
        description="List every self- and cross-attention block, control-flow bodies included.")
    cmd.add_argument("model", help="the ONNX model")
    cmd.add_argument("--json", action="store_true", help="print one JSON object (DESIGN.md)")
    cmd.add_argument("--explain", action="store_true",
                     help="also show each Softmax that looked like attention and why it did not match")
    cmd.add_argument("--raw", action="store_true",
                     help="match the file as written, without the clean-up passes optimize runs "
                          "before fusing (default: after them, so inspect finds what optimize will)")
    cmd.set_defaults(handler=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_model, render_table

    path = Path(args.model)
    report = inspect_model(load(path), name=str(path), explain=args.explain,
                           normalize=not args.raw)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(printable(render_table(report), multiline=True))
    return EXIT_OK


# --- optimize --------------------------------------------------------------------------------

def _add_optimize(commands: Any, common: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser("optimize", parents=[common], help="run the pass pipeline",
                              description="Run a pipeline of passes and write the result.")
    source = cmd.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", help="the ONNX model to optimize")
    source.add_argument("--example", action="store_true",
                        help="use the bundled example model (a small Whisper-style decoder)")
    cmd.add_argument("-o", "--output", required=True, help="where to write the optimized model")
    cmd.add_argument("--passes", default=None, metavar="PIPELINE",
                     help=f"pipeline text, e.g. 'canonicalize' (default: {DEFAULT_PIPELINE})")
    cmd.add_argument("--target", choices=TARGETS, default=None,
                     help="what each attention block becomes (default: onnx-attention, the ONNX "
                          "Attention op TensorRT 10.14+ parses; canonical: a clean "
                          "MatMul-Softmax-MatMul for older TensorRT; trt-plugin: a declared "
                          "plugin spec, or the legacy TensorRT 8.5 presets; ort-mha)")
    cmd.add_argument("--specialize", action="append", default=[], metavar="NAME=VALUE",
                     help="fix a graph input to a value and inline/unroll what it decides "
                          "(e.g. use_cache_branch=false); repeatable")
    cmd.add_argument("--plugin-spec", metavar="SPEC", default=None,
                     help="--target trt-plugin: a TOML/JSON plugin spec (an IPluginV3 plugin you "
                          "build); without one the LEGACY fMHCA/fMHA_V2 presets, which exist "
                          "only for TensorRT 8.5 (removed in 8.6)")
    cmd.add_argument("--decomposable", action="store_true",
                     help="record the fused Attention nodes as decomposable: `build` and "
                          "--emit-trtexec let TensorRT (10.14+) split them into several kernels "
                          "when no fused kernel fits (the file stays standard ONNX)")
    cmd.add_argument("--qkv-layout", choices=QKV_LAYOUTS, default=None,
                     help="--target onnx-attention: 4d (default; Q/K/V as [B,H,S,D], what "
                          "TensorRT 10.14 parses) or 3d (the op reads the projections "
                          "[B,S,H*D]: no head split or merge left; ONNX Runtime, newer parsers)")
    cmd.add_argument("--guard-precision", action="store_true",
                     help="keep each attention's score MatMul and Softmax in fp32 (half-precision "
                          "models) and list them for the TensorRT build")
    cmd.add_argument("--precision", choices=("fp16", "bf16"), default=None,
                     help="convert the model to fp16 or bf16 after fusion, fp32 kept where needed "
                          "(TensorRT 11 builds the types the model gives); an audit on --inputs or "
                          "drawn inputs escapes blocks that would overflow (docs/precision.md)")
    cmd.add_argument("--no-audit", action="store_true",
                     help="--precision without the data-driven audit of attention blocks")
    cmd.add_argument("--convert-io", action="store_true",
                     help="--precision: convert float graph inputs and outputs too (default: fp32)")
    cmd.add_argument("--fixpoint", action="store_true",
                     help="repeat the pipeline until no pass changes the model")
    cmd.add_argument("--report", metavar="R.json", help="write a JSON report of every pass")
    cmd.add_argument("--verify", action="store_true",
                     help="compare outputs with ONNX Runtime; exit 1 and write no model on mismatch")
    cmd.add_argument("--inputs", metavar="NPZ",
                     help="inputs for --verify and the --precision audit (default: random)")
    cmd.add_argument("--debug", action="store_true",
                     help="check the graph after every pass and name the pass that broke it")
    cmd.add_argument("--reproducer", metavar="DIR",
                     help="on a pass failure, save the failing pass's input model and pipeline here")
    cmd.set_defaults(handler=run_optimize)


def run_optimize(args: argparse.Namespace) -> int:
    model_path = _example_path() if args.example else Path(args.model)
    output = Path(args.output)
    # Every write of this run (model, data, report, reproducer) is checked against the input
    # and its data files; the targets are checked before any work is done.
    with outputs.protecting(model_path):
        _check_optimize_targets(args, output)
        # Weights in external data files stay there: passes see stubs, save streams the bytes.
        model = load(model_path, lazy_weights=True)
        specialize = _specializations(args.specialize)
        names = [value.name for value in model.graph.input]
        unknown = [name for name in specialize if name not in names]
        if unknown:
            raise InputError(f"--specialize: {model_path} has no graph input "
                             f"{', '.join(repr(u) for u in unknown)} (inputs: {', '.join(names)})")
        listener = ProgressLine(enabled=not args.quiet and sys.stderr.isatty())
        result = optimize(model, args.passes, fixpoint=args.fixpoint, debug=args.debug,
                          reproducer=args.reproducer, listener=listener, target=args.target,
                          specialize=specialize, plugin_spec=args.plugin_spec,
                          guard_precision=args.guard_precision, qkv_layout=args.qkv_layout,
                          **_precision_options(args))
        report: dict[str, Any] = {
            "model": str(model_path), "output": str(output),
            "before": model_summary(model), "after": model_summary(result.detached),
            **result.report,
        }

        def finish(written: Path) -> None:
            # Runs on the files as written, before they replace anything at the output path.
            if args.verify:
                check = _verify_written(model, model_path, written, args.inputs, specialize,
                                        args.precision)
                report["verify"] = check.to_dict()
            if args.report:
                outputs.write_json(Path(args.report), report, protect=[model_path])
            if args.verify and not check.ok:
                print(printable(check.summary(), multiline=True), file=sys.stderr)
                raise CheckFailed(f"verification failed: the optimized model's outputs differ "
                                  f"from {model_path}; {output} was not written")

        if args.decomposable:
            from .backends.trtexec import mark_decomposable

            report["decomposable_attentions"] = mark_decomposable(result.detached)
        outputs.save_checked(result.detached, output, finish, protect=[model_path])
    if not args.quiet:
        before, after = report["before"]["num_nodes"], report["after"]["num_nodes"]
        verified = ""
        if args.verify:
            sets = report["verify"].get("num_input_sets", 1)
            verified = f", verified from disk on {sets} input set{'s' if sets != 1 else ''}"
        print(printable(f"wrote {output}: {before} -> {after} nodes "
                        f"({report['seconds']:.2f} s, pipeline '{result.pipeline.pipeline}')"
                        + verified), file=sys.stderr)
    return EXIT_OK


def _check_optimize_targets(args: argparse.Namespace, output: Path) -> None:
    targets = [output, output.with_name(output.name + ".data")]
    if args.report:
        report = Path(args.report)
        if any(outputs.same_file(report, target) for target in targets):
            raise OutputError(f"--report {report}: that is where the model goes (-o {output})")
        targets.append(report)
    if args.reproducer:
        folder = Path(args.reproducer)
        targets += [folder / "input.onnx", folder / "input.onnx.data", folder / "pipeline.txt"]
    for target in targets:
        outputs.check(target)


def _precision_options(args: argparse.Namespace) -> dict[str, Any]:
    if not args.precision:
        if args.no_audit or args.convert_io:
            raise InputError("--no-audit and --convert-io apply to --precision only")
        return {}
    return {"precision": args.precision, "audit": not args.no_audit,
            "precision_inputs": args.inputs, "convert_io": args.convert_io}


def _verify_written(model: Any, model_path: Path, written: Path, inputs: str | None,
                    specialize: dict[str, str], precision: str | None = None) -> Any:
    """Compare the model as written (read back from ``written`` with its data) with the input."""
    try:
        candidate = load(written, lazy_weights=True)  # the same checks as any input gets
    except InputError as exc:
        raise CheckFailed(f"verification failed: the model as written does not load ({exc}); "
                          "nothing was written") from exc
    if precision:
        # Tolerances that follow from the precision, the candidate seen as half kernels run it.
        from .precision_audit import verify_precision

        reference = model if specialize else _reference(model, model_path)
        return verify_precision(reference, str(written), precision, inputs,
                                specialize=specialize or None)
    if specialize:
        # The specialised model no longer takes the pinned inputs: compare it with the
        # original run on those same values.
        from xattn_compiler.passes.control_flow import verify_specialized

        from .verification import load_inputs

        return verify_specialized(model, candidate, specialize,
                                  inputs=load_inputs(inputs) if inputs else None)
    try:
        return _verify(_reference(model, model_path), str(written), inputs)
    except ReferenceRunError as exc:
        raise ReferenceRunError(f"{model_path} (the input)", exc.reason + "; --verify "
                                "has nothing to run the rewrite against (optimize without "
                                "--verify, or fix the export)") from exc


def _reference(model: Any, model_path: Path) -> Any:
    """The input as verify should run it (see :func:`verification.as_stored`)."""
    from .verification import as_stored

    return as_stored(model, model_path)


def _checked(path: str) -> Any:
    """A model for verify: checked like any input, its external weights left in their files
    (ONNX Runtime reads them from there; two 2.4 GB models loaded whole peaked at 12.5 GB)."""
    return _reference(load(path, lazy_weights=True), Path(path))


def _specializations(items: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            raise InputError(f"--specialize {item!r}: write NAME=VALUE, e.g. use_cache_branch=false")
        values[name] = value
    return values


def _example_path() -> Path:
    from .examples import example_path

    return example_path()


def _verify(reference: Any, candidate: Any, inputs: str | None, **tolerances: Any) -> Any:
    from .verification import verify

    return verify(reference, candidate, inputs=inputs, **tolerances)


# --- verify ----------------------------------------------------------------------------------

def _add_verify(commands: Any, common: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser(
        "verify", parents=[common], help="compare two models' outputs with ONNX Runtime",
        description="Run both models on the same inputs and compare every output.")
    cmd.add_argument("reference", help="the model whose outputs are right")
    cmd.add_argument("candidate", help="the model to check against it")
    cmd.add_argument("--inputs", metavar="NPZ", help="inputs by name (default: random, seeded)")
    cmd.add_argument("--rtol", type=float, help="relative tolerance (default: by dtype)")
    cmd.add_argument("--atol", type=float, help="absolute tolerance (default: by dtype and scale)")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    cmd.add_argument("--json", action="store_true", help="print the result as JSON")
    cmd.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    if args.seed < 0:
        raise InputError(f"--seed {args.seed}: a seed is a non-negative integer")
    if Path(args.candidate).is_dir():  # a split-kv directory: projector, then decoder
        from .split import verify_split

        check = verify_split(_checked(args.reference), args.candidate, inputs=args.inputs,
                             rtol=args.rtol, atol=args.atol, seed=args.seed)
    else:
        reference, candidate = _checked(args.reference), _checked(args.candidate)
        check = _verify(reference, candidate, args.inputs, rtol=args.rtol, atol=args.atol,
                        seed=args.seed)
    if args.json:
        print(json.dumps(check.to_dict(), indent=2))
    elif not args.quiet:
        print(printable(check.summary(), multiline=True))
    if not check.ok:
        raise CheckFailed(f"{args.candidate} does not match {args.reference}")
    return EXIT_OK


# --- passes ----------------------------------------------------------------------------------

def _add_passes(commands: Any, common: argparse.ArgumentParser) -> None:
    cmd = commands.add_parser("passes", parents=[common], help="list the registered passes",
                              description="List the registered passes with their options.")
    cmd.add_argument("--json", action="store_true", help="print the list as JSON")
    cmd.set_defaults(handler=run_passes)


def run_passes(args: argparse.Namespace) -> int:
    classes = list(default_registry())
    if args.json:
        print(json.dumps([_describe(cls) for cls in classes], indent=2))
        return EXIT_OK
    width = max(len(cls.name) for cls in classes)
    for cls in classes:
        print(f"{cls.name:<{width}}  {cls.description}")
        for opt in cls.options if args.verbose else ():
            print(f"{'':<{width}}    {opt.name}={opt.format(opt.default)}  {opt.help}")
    return EXIT_OK


def _describe(cls: type[Pass]) -> dict[str, Any]:
    return {
        "name": cls.name, "description": cls.description, "module": cls.__module__,
        "run_after": list(cls.run_after),
        "options": [{"name": o.name, "type": o.kind.__name__, "default": o.format(o.default),
                     "help": o.help} for o in cls.options],
    }


# --- plumbing --------------------------------------------------------------------------------

class ProgressLine(Listener):
    """One line per pass on stderr, only when stderr is a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def pass_started(self, index: int, total: int, pass_: Pass) -> None:
        if self.enabled:
            sys.stderr.write(f"[{index + 1}/{total}] {pass_.spec()} ...")
            sys.stderr.flush()

    def pass_finished(self, index: int, total: int, record: PassRecord) -> None:
        if self.enabled:
            state = "changed" if record.changed else "no change"
            sys.stderr.write(f"\r[{index + 1}/{total}] {record.spec}: {state}, "
                             f"{record.nodes_before} -> {record.nodes_after} nodes, "
                             f"{record.seconds:.2f} s\n")


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("xattn-compiler: %(levelname)s: %(message)s"))
    root = logging.getLogger("xattn_compiler")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def _quiet_libraries(verbose: int) -> None:
    """Keep the libraries' own log lines off our streams: ONNX Runtime's coloured error lines
    (stderr) and onnx-graphsurgeon's warnings (stdout, where they corrupt ``--json``) would
    repeat, unescaped, what our one-line error already says. ``-vv`` lets them through."""
    import onnx_graphsurgeon as gs

    gs.logger.G_LOGGER.severity = (gs.logger.G_LOGGER.WARNING if verbose >= 2
                                   else gs.logger.G_LOGGER.CRITICAL)
    try:
        import onnxruntime
    except ImportError:  # verification says how to install it when it is needed
        return
    onnxruntime.set_default_logger_severity(2 if verbose >= 2 else 4)


class _PrintableFormatter(logging.Formatter):
    """Log lines quote names from the model: keep their control characters off the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record), multiline=True)


def _error(message: str) -> None:
    # One line whatever the message holds: names from a model may carry newlines and
    # terminal control characters.
    print(f"xattn-compiler: error: {printable(message)}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
