"""Check one block the way its marker says: run it, parse it, check its synopsis or output.

Shell blocks run their ``xattn-compiler`` commands in-process and expect exit code 0; Python
blocks are executed in one namespace per page (a later block may use what an earlier one
defined), with ``sys.argv`` set to the block's location as a script would see it, and what
they print is kept for an ``output`` block below them. Both run in the current directory,
which the test points at a workspace (:mod:`.workspace`).
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from typing import Any

from .blocks import Block
from .commands import PROGRAM, check_other, check_synopsis, commands, parse_cli, run_cli

_PRINTED = "__printed__"


def check_block(block: Block, namespace: dict[str, Any]) -> None:
    """Run or check ``block`` (bash or python; other languages are prose)."""
    if block.output:
        _output(block, namespace.get(_PRINTED))
    elif block.language == "bash":
        _shell(block)
    elif block.language == "python":
        _python(block, namespace)


def _output(block: Block, printed: str | None) -> None:
    """Every line of ``block`` is a line the Python block above printed; ``...`` in a line
    stands for any text (what varies between runs or versions, as in doctest)."""
    assert printed is not None, f"{block.where}: an output block needs a Python block above it"
    lines = [line.rstrip() for line in printed.splitlines()]
    for expected in block.text.splitlines():
        pattern = re.compile(".*".join(map(re.escape, expected.rstrip().split("..."))))
        assert any(pattern.fullmatch(line) for line in lines), (
            f"{block.where}: the block above no longer prints {expected!r}; it printed:\n{printed}")


def _shell(block: Block) -> None:
    for command in commands(block):
        if command.argv[0] != PROGRAM:
            check_other(command)
        elif block.synopsis:
            check_synopsis(command)
        elif block.not_run is not None:
            parse_cli(command)
        else:
            code, out, err = run_cli(command)
            assert code == 0, (f"{command.where}: `{command.text}` exited {code}\n"
                               f"stdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}")


def _python(block: Block, namespace: dict[str, Any]) -> None:
    code = compile(block.text, block.where, "exec")
    if not block.runs:
        return
    argv = sys.argv
    sys.argv = [block.where]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)  # noqa: S102 - our own documentation
    finally:
        sys.argv = argv
        namespace[_PRINTED] = printed.getvalue()
        sys.stdout.write(printed.getvalue())  # still shown when the test fails
