"""Text from elsewhere, made safe for the operator's terminal.

What a node reports (an error string, an initiator's name, a skipped file's name), what a node's
``/metrics`` or an HTTP peer answers, is printed by the CLI (``sparrow volume explain``,
``sparrow top``). A member can lie, so none of it may reach the terminal raw: an escape sequence
would move the cursor, clear the screen, retitle the window or forge a line of the output.
:func:`printable` is the one place that turns such text into what it says.
"""

from __future__ import annotations

import re

#: C0 controls (newline and tab among them: one field is one line), DEL, C1 controls (0x9b is a
#: CSI on its own), and the Unicode controls that reorder or hide text (bidi embeddings,
#: overrides and isolates; the line and paragraph separators).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character written as its escape (``\\x1b``, ``\\u202e``)."""
    return _UNSAFE.sub(_escape, text)
