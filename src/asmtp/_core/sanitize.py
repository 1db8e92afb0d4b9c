"""Text from a server, made safe for a person's terminal. No I/O.

Reply messages, EHLO lines and transcript lines come from the server: a hostile one
could send ESC sequences that repaint the user's terminal, BEL, or a bare CR that hides
what came before it. Everything shown to a person (the CLI's tables, the progress bar,
the ``--debug`` transcript) goes through :func:`printable`; JSON output keeps the text
as received (``json.dumps`` escapes control characters itself).
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 controls, DEL and the C1 controls (0x80-0x9f: CSI 0x9b starts an escape sequence
# on some terminals), plus the Unicode line and paragraph separators and the bidi
# overrides that reorder what a terminal shows.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` with every control character shown escaped::

    >>> printable("250 ok\\x1b[2J\\x07")
    '250 ok\\\\x1b[2J\\\\x07'
    """
    if text.isprintable():
        return text
    return _UNSAFE.sub(_escape, text)
