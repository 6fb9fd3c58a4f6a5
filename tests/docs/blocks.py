"""The fenced code blocks of the documentation, with the marker that says how each is checked.

A block is run by default. An HTML comment on the line above its fence (blank lines may sit
between) changes that:

- ``<!-- not-run: REASON -->``: not executed (it needs TensorRT, the network, minutes, or it is
  a fragment); its commands must still parse and its Python must compile. The reason is listed.
- ``<!-- synopsis -->``: a usage line with ``[optional]`` parts and ``a|b`` alternatives; its
  subcommands and options must exist.
- ``<!-- output -->``: what the Python block above prints; every line of it must be printed
  (``...`` in a line stands for any text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```",
                    re.S | re.M)
_MARKER = re.compile(
    r"^\s*<!--\s*(not-run:\s*(?P<reason>.*?)|(?P<kind>synopsis|output))\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text and how it is checked."""

    path: Path
    line: int
    language: str
    text: str
    not_run: str | None = None
    synopsis: bool = False
    output: bool = False

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.not_run is None and not self.synopsis and not self.output


def doc_files() -> list[Path]:
    """Every Markdown page the tests hold to their word: README.md and docs/**."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path, language: str | None = None) -> list[Block]:
    """The fenced blocks of ``path`` in document order (of one language when given)."""
    text = path.read_text()
    found = []
    for fence in _FENCE.finditer(text):
        if language is not None and fence["lang"] != language:
            continue
        line = text.count("\n", 0, fence.start()) + 1
        body = _dedent(fence["body"], len(fence["indent"]))
        reason, kind = _marker(text[:fence.start()])
        found.append(Block(path, line, fence["lang"], body, reason, kind == "synopsis",
                           kind == "output"))
    return found


def _dedent(body: str, width: int) -> str:
    prefix = " " * width
    return "".join(line[width:] if line.startswith(prefix) else line
                   for line in body.splitlines(keepends=True))


def _marker(before: str) -> tuple[str | None, str | None]:
    """The not-run reason, or the kind of a ``synopsis`` or ``output`` marker."""
    lines = [line for line in before.splitlines() if line.strip()]
    marker = _MARKER.match(lines[-1]) if lines else None
    if marker is None:
        return None, None
    if marker["kind"]:
        return None, marker["kind"]
    return marker["reason"].strip(), None
