"""The shell commands of a documentation block: split, parsed, checked, and run in-process.

``xattn-compiler`` commands run through :func:`xattn_compiler.cli.main` (no subprocess), or are
parsed by its argparse parser when their block is not run. The few other commands the docs
show cannot run inside a test (they install packages or start the whole suite), so each is
checked against what it refers to: ``pip install`` against pyproject.toml's dependencies and
extras, ``pytest`` and ``python`` against the paths and modules they name. Anything else is
an error: a new kind of command needs a check here.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import logging
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from xattn_compiler.cli import build_parser, main

from .blocks import ROOT, Block

PROGRAM = "xattn-compiler"
_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Command:
    """One simple command: its words after any ``NAME=value`` prefixes, and where it came from."""

    argv: list[str]
    where: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return shlex.join(self.argv)


def commands(block: Block) -> list[Command]:
    """The commands of a bash block: continuation lines joined, ``&&`` chains split, comments
    dropped. In a synopsis, indented lines continue the one above and ``a | b`` lists
    alternatives (``zoo list | zoo export NAME``)."""
    text = block.text.replace("\\\n", " ")
    lines: list[str] = []
    for line in text.splitlines():
        if block.synopsis and line[:1].isspace() and lines:
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line)
    found = []
    for offset, line in enumerate(lines):
        words = shlex.split(line, comments=True)
        separators = ("&&", "|") if block.synopsis else ("&&",)
        for words_of_one in _split(words, separators):
            if block.synopsis and words_of_one[0] != PROGRAM:
                words_of_one = [PROGRAM, *words_of_one]
            env = {}
            while words_of_one and _ENV.match(words_of_one[0]):
                key, _, value = words_of_one.pop(0).partition("=")
                env[key] = value
            found.append(Command(words_of_one, f"{block.where} (line {offset + 1})", env))
    return found


def _split(words: list[str], separators: tuple[str, ...]) -> list[list[str]]:
    parts: list[list[str]] = [[]]
    for word in words:
        if word in separators:
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


# --- xattn-compiler ---------------------------------------------------------------------------

def run_cli(command: Command) -> tuple[int, str, str]:
    """Run ``command`` through ``cli.main`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with kept_logging(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(command.argv[1:])
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """``cli.main`` points the package's logger at the stderr of the moment; put it back after,
    so later tests do not log into a finished command's captured stream."""
    logger = logging.getLogger("xattn_compiler")
    state = (logger.handlers[:], logger.level, logger.propagate)
    try:
        yield
    finally:
        logger.handlers[:], logger.level, logger.propagate = state


def parse_cli(command: Command) -> argparse.Namespace:
    """The parsed arguments of ``command``; AssertionError with argparse's message if it fails."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(command.argv[1:])
    except SystemExit:
        raise AssertionError(f"{command.where}: `{command.text}` does not parse: "
                             f"{err.getvalue().strip().splitlines()[-1]}") from None


def subcommand_parsers(parser: argparse.ArgumentParser | None = None, prefix: tuple[str, ...] = ()
                       ) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every (nested) subcommand's parser by its words: ``("zoo", "export")`` and so on."""
    parser = parser or build_parser()
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[(*prefix, name)] = sub
                found.update(subcommand_parsers(sub, (*prefix, name)))
    return found


def check_synopsis(command: Command) -> None:
    """The subcommand exists, and so does every option and every choice the line lists."""
    parsers = subcommand_parsers()
    words = list(command.argv[1:])
    path: tuple[str, ...] = ()
    while words:
        choices = words[0].strip("[]()").split("|")
        if len(choices) > 1 and all((*path, choice) in parsers for choice in choices):
            for choice in choices:  # (list|export): each alternative on its own
                check_synopsis(Command([PROGRAM, *path, choice, *words[1:]], command.where))
            return
        if (*path, words[0]) not in parsers:
            break
        path = (*path, words.pop(0))
    assert path, f"{command.where}: `{command.text}` names no subcommand"
    actions = {option: action for action in parsers[path]._actions
               for option in action.option_strings}
    previous = None
    for word in words:
        alternatives = [a for a in word.strip("[]()").rstrip(".").split("|") if a]
        options = [a.split("=")[0] for a in alternatives if a.startswith("-")]
        for option in options:
            assert option in actions, (f"{command.where}: `{PROGRAM} {' '.join(path)}` has no "
                                       f"option {option}")
        if not options and previous is not None and previous.choices:
            for value in alternatives:
                assert value in previous.choices, (
                    f"{command.where}: {value!r} is not a choice of {previous.option_strings[-1]}")
        previous = actions.get(options[-1]) if options else None


# --- the other commands -------------------------------------------------------------------------

def check_other(command: Command) -> None:
    """A command that is not run: what it names must exist (see the module docstring)."""
    program, *args = command.argv
    if program == "pip" and args[:1] == ["install"]:
        _check_pip_install(command, args[1:])
    elif program == "python" and args[:2] == ["-m", "pytest"] or program == "pytest":
        _check_pytest(command, args[2:] if program == "python" else args)
    elif program == "python" and args[:1] == ["-m"]:
        assert importlib.util.find_spec(args[1]) is not None, f"{command.where}: no module {args[1]}"
    elif program == "python" and args:
        assert (ROOT / args[0]).is_file(), f"{command.where}: no script {args[0]}"
    else:
        raise AssertionError(f"{command.where}: `{command.text}`: tests/docs/commands.py has no "
                             "check for this command; run it or add one")


def _check_pip_install(command: Command, args: list[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    declared = [*project["dependencies"], *(r for group in extras.values() for r in group)]
    for arg in (a for a in args if a != "-e"):
        local = re.fullmatch(r"\.(?:\[(?P<extras>[\w,-]+)\])?", arg)
        if local:
            for extra in filter(None, (local["extras"] or "").split(",")):
                assert extra in extras, f"{command.where}: pyproject.toml has no extra [{extra}]"
            continue
        name = re.split(r"[<>=!~\[]", arg)[0]
        specs = [r for r in declared if re.split(r"[<>=!~\[ ;]", r)[0] == name]
        assert specs, f"{command.where}: {name} is not a dependency in pyproject.toml"
        if "==" in arg:
            assert arg in specs, f"{command.where}: {arg} but pyproject.toml pins {specs}"


def _check_pytest(command: Command, args: list[str]) -> None:
    for arg in args:
        if not arg.startswith("-"):
            path = Path(arg.split("::")[0])
            assert (ROOT / path).exists(), f"{command.where}: pytest path {arg} does not exist"
