"""Typed errors. Each names what it is about (file, node, tensor, pass) in one line.

The CLI maps :class:`InputError` to exit code 2 and :class:`CheckFailed` to exit code 1;
:class:`PassError` and anything unexpected is a bug in xattn-compiler: exit code 70 with one
line (the traceback only with ``XATTN_DEBUG=1`` or ``optimize --debug``).
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries such as ONNX Runtime write pages),
    or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(str(text).split())


class XattnError(Exception):
    """Base of every error xattn-compiler raises on purpose."""


class InputError(XattnError):
    """The user's input is unusable: a missing or corrupt file, an invalid graph, a bad option."""


class ModelLoadError(InputError):
    """A model file cannot be read or is not a valid ONNX model."""

    def __init__(self, path: object, reason: str):
        self.path = str(path)
        self.reason = one_line(reason)
        super().__init__(f"{self.path}: {self.reason}")


class GraphStructureError(InputError):
    """The graph is malformed: a dangling edge, a cycle, a node of an unknown domain."""

    def __init__(self, reason: str, *, node: str | None = None, tensor: str | None = None):
        self.node = node
        self.tensor = tensor
        super().__init__(one_line(reason))


class ReferenceRunError(InputError):
    """The model a candidate is compared with does not run in ONNX Runtime (an export that
    ORT rejects): verification has nothing to compare against."""

    def __init__(self, described: str, reason: str):
        self.described = described
        self.reason = one_line(reason)
        super().__init__(f"reference model {described} does not load in ONNX Runtime: "
                         f"{self.reason}")


class OutputError(InputError):
    """The requested output location is unusable (for example, it is the input file)."""


class UnknownPassError(InputError):
    """A pipeline names a pass that is not registered, or gives it an unknown option."""


class PassError(XattnError):
    """A pass raised or broke the graph. Names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, reason: str, *, ran_before: list[str] | None = None):
        self.pass_name = pass_name
        self.ran_before = list(ran_before or [])
        self.reason = reason
        before = ", ".join(self.ran_before) if self.ran_before else "none"
        super().__init__(f"pass '{pass_name}' failed: {reason} (passes run before it: {before})")


class CheckFailed(XattnError):
    """A check the user asked for did not hold (for example ``verify`` found a mismatch)."""
