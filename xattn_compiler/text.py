"""Text from a model made safe to print, and safe to write into Triton's text format.

A model's node and tensor names are arbitrary strings: ESC and BEL in one would drive the
user's terminal (recolour it, retitle the window, erase the screen) when the name is printed,
and a newline or quote in one would add lines to a ``config.pbtxt``. :func:`printable` is
applied where the CLI prints; :func:`pbtxt_string` where a value goes into protobuf text.
"""

from __future__ import annotations

import unicodedata

#: Characters that reorder the text around them (the "Trojan source" characters): a name
#: holding one can make what is printed read differently from what it is.
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_BREAKS = frozenset("\n\u2028\u2029\x85")


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _unsafe(char: str, keep: frozenset[str]) -> bool:
    if char in keep:
        return False
    if char in _BIDI or char in _LINE_BREAKS:
        return True
    return unicodedata.category(char) == "Cc"  # C0, DEL and C1 controls


def printable(text: object, *, multiline: bool = False) -> str:
    """``text`` with every control character shown as an escape (``\\x1b`` for ESC).

    With ``multiline`` newlines and tabs are kept (a table of several lines); otherwise the
    result is one line: a newline becomes ``\\x0a``. Everything else printable is unchanged,
    so ordinary names read as they are.
    """
    keep = frozenset("\n\t") if multiline else frozenset("\t")
    text = str(text)
    if all(char.isprintable() or char in keep for char in text):
        return text
    return "".join(_escape(char) if _unsafe(char, keep) else char for char in text)


def pbtxt_string(value: str) -> str:
    """``value`` as a protobuf text-format string literal, quotes included.

    Quote and backslash are escaped, and every byte of the UTF-8 encoding outside printable
    ASCII is written as an octal escape, the form protobuf's (and Triton's) text parser reads
    back to the same bytes; so no value can end the string or start a new line.
    """
    out = []
    for byte in value.encode("utf-8"):
        char = chr(byte)
        if char in "\"\\":
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


__all__ = ["pbtxt_string", "printable"]
