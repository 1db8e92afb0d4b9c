"""SMTP replies: the :class:`Reply` value and the incremental :class:`ReplyParser`.

Owns every rule about what a server's reply looks like on the wire (RFC 5321 section
4.2): ``ddd-text`` continuation lines, a ``ddd text`` last line, one code for all lines,
and the enhanced status code (RFC 3463) at the start of the text. Also owns the limits
that keep a hostile server from making the client hold unbounded memory. Sans-IO.
"""

from __future__ import annotations

import re

from .errors import RemoteProtocolError

__all__ = ["MAX_LINE", "MAX_LINES", "NEED_DATA", "Reply", "ReplyParser"]

#: longest reply line accepted, CRLF included (RFC 5321 4.5.3.1.5 says 512; servers
#: exceed it in EHLO and error texts, so allow headroom but stay bounded).
MAX_LINE = 8192
#: most lines in one reply (an EHLO reply has one per extension).
MAX_LINES = 256

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by :meth:`ReplyParser.next_reply` when no whole reply is buffered yet
NEED_DATA = _NeedData()


class Reply:
    """One complete server reply.

    >>> r = Reply(550, ("5.1.1 <jack@example.org>: no such user",))
    >>> r.code, r.enhanced_status, r.message
    (550, '5.1.1', '<jack@example.org>: no such user')
    """

    __slots__ = ("code", "lines")

    def __init__(self, code: int, lines: tuple[str, ...]) -> None:
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        """All lines of text, joined with newlines, enhanced status included."""
        return "\n".join(self.lines)

    @property
    def enhanced_status(self) -> str | None:
        """The RFC 3463 status ("5.1.1") when the first line starts with one whose class
        agrees with the reply code."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m is None or int(m.group(1)) != self.code // 100:
            return None
        return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"

    @property
    def message(self) -> str:
        """The text without the enhanced status prefix, lines joined by spaces."""
        text = " ".join(line.strip() for line in self.lines)
        m = _ENHANCED.match(text)
        if m is not None and int(m.group(1)) == self.code // 100:
            text = text[m.end() :]
        return text

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return self.code == other.code and self.lines == other.lines

    def __hash__(self) -> int:
        return hash((self.code, self.lines))

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"

    def __str__(self) -> str:
        return f"{self.code} {' '.join(self.lines)}".rstrip()


class ReplyParser:
    """Turns received bytes into :class:`Reply` values, one at a time.

    ``feed(b"")`` signals end of stream. :meth:`next_reply` returns a reply, or
    :data:`NEED_DATA` while none is complete, and raises
    :class:`~asmtp.errors.RemoteProtocolError` on a malformed or oversized reply::

        >>> p = ReplyParser()
        >>> p.feed(b"250-mx.example.org\\r\\n250-PIPELINING\\r\\n250 SIZE 1000\\r\\n")
        >>> p.next_reply()
        Reply(250, ('mx.example.org', 'PIPELINING', 'SIZE 1000'))
    """

    __slots__ = ("_buf", "_code", "_lines", "eof", "max_line", "max_lines")

    def __init__(self, *, max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._code = 0
        self.eof = False
        self.max_line = max_line
        self.max_lines = max_lines

    @property
    def buffered(self) -> int:
        """Bytes received and not yet part of a returned reply."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self.eof = True
        else:
            self._buf += data

    def clear(self) -> int:
        """Drop everything buffered (after STARTTLS: RFC 3207 section 4.2, nothing the
        server sent in the clear may be acted on). Returns how many bytes were dropped."""
        dropped = len(self._buf) + sum(len(line) for line in self._lines)
        self._buf.clear()
        self._lines.clear()
        return dropped

    def next_reply(self) -> Reply | _NeedData:
        buf = self._buf
        if not buf:
            return NEED_DATA
        if not self._lines:
            # Fast path: most replies are one line ("250 2.1.0 Ok\r\n").
            end = buf.find(b"\n")
            if 4 <= end <= self.max_line and buf[3] == 0x20 and buf[:3].isdigit():
                code = int(buf[:3])
                if 200 <= code <= 599:
                    stop = end - 1 if buf[end - 1] == 0x0D else end
                    text = buf[4:stop].decode("utf-8", "replace")
                    del buf[: end + 1]
                    return Reply(code, (text,))
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                if len(buf) - start > self.max_line:
                    raise RemoteProtocolError(
                        f"reply line longer than {self.max_line} octets", stage=None
                    )
                if start:
                    del buf[:start]
                return NEED_DATA
            line = bytes(buf[start:end])
            start = end + 1
            if len(line) > self.max_line:
                raise RemoteProtocolError(f"reply line longer than {self.max_line} octets")
            if line.endswith(b"\r"):
                line = line[:-1]
            code, last, text = _split_line(line)
            if self._lines and code != self._code:
                raise RemoteProtocolError(
                    f"reply lines disagree on the code ({self._code} then {code})"
                )
            self._code = code
            self._lines.append(text)
            if last:
                del buf[:start]
                reply = Reply(code, tuple(self._lines))
                self._lines.clear()
                return reply
            if len(self._lines) >= self.max_lines:
                raise RemoteProtocolError(f"reply longer than {self.max_lines} lines")


def _split_line(line: bytes) -> tuple[int, bool, str]:
    """Split ``b"250-PIPELINING"`` into (250, False, "PIPELINING")."""
    if len(line) < 3 or not line[:3].isdigit():
        raise RemoteProtocolError(f"malformed reply line: {_show(line)}")
    code = int(line[:3])
    if not 200 <= code <= 599:
        raise RemoteProtocolError(f"reply code out of range: {_show(line)}")
    if len(line) == 3:
        return code, True, ""
    sep = line[3]
    if sep == 0x20:  # " "
        last = True
    elif sep == 0x2D:  # "-"
        last = False
    else:
        raise RemoteProtocolError(f"malformed reply line: {_show(line)}")
    return code, last, line[4:].decode("utf-8", "replace")


def _show(line: bytes, limit: int = 80) -> str:
    shown = line[:limit].decode("ascii", "backslashreplace")
    return repr(shown + ("..." if len(line) > limit else ""))
