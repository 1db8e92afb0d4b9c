"""SMTP replies: the :class:`Reply` value and the incremental :class:`ReplyParser`.

Owns every rule about what a server's reply looks like on the wire (RFC 5321 section
4.2): ``ddd-text`` continuation lines, a ``ddd text`` last line, one code for all lines,
and the enhanced status code (RFC 3463) at the start of the text. Also owns the limits
that keep a hostile server from making the client hold unbounded memory. Sans-IO.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from ..errors import RemoteProtocolError

__all__ = [
    "KNOWN",
    "MAX_LINE",
    "MAX_LINES",
    "NEED_DATA",
    "Reply",
    "ReplyParser",
    "one_line",
    "take_known_lines",
    "take_one_line",
]

#: longest reply line accepted, CRLF included (RFC 5321 4.5.3.1.5 says 512; servers
#: exceed it in EHLO and error texts, so allow headroom but stay bounded).
MAX_LINE: Final = 8192
#: most lines in one reply (an EHLO reply has one per extension).
MAX_LINES: Final = 256

_ENHANCED: Final = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")

#: Replies already parsed, by their octets on the wire: a server says the same greeting,
#: EHLO and "250 2.1.0 Ok" to every session, so each wording is parsed once (a Reply is
#: never changed once made, so one can be shared). Bounded in count and in size.
KNOWN: Final[dict[bytes, Reply]] = {}
_SEEN_MOST: Final = 1024
_SEEN_LONGEST: Final = 2048


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by :meth:`ReplyParser.next_reply` when no whole reply is buffered yet
NEED_DATA: Final = _NeedData()


class Reply:
    """One complete server reply.

    >>> r = Reply(550, ("5.1.1 <jack@example.org>: no such user",))
    >>> r.code, r.enhanced_status, r.message
    (550, '5.1.1', '<jack@example.org>: no such user')
    """

    __slots__ = ("_status", "code", "lines")

    def __init__(self, code: int, lines: tuple[str, ...]) -> None:
        self._status: tuple[str | None, str] | None = None  # status_and_message's
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
        return self.status_and_message()[0]

    @property
    def message(self) -> str:
        """The text without the enhanced status prefix, lines joined by spaces."""
        return self.status_and_message()[1]

    def status_and_message(self) -> tuple[str | None, str]:
        """``(enhanced_status, message)`` with one match, for when both are wanted."""
        found = self._status
        if found is None:
            found = self._status = self._split_status()
        return found

    def _split_status(self) -> tuple[str | None, str]:
        lines = self.lines
        text = lines[0].strip() if len(lines) == 1 else " ".join(line.strip() for line in lines)
        m = _ENHANCED.match(text)
        if m is None or int(m.group(1)) != self.code // 100:
            return None, text
        # A status counts only at the very start of the first line (no blank before it).
        status = "{}.{}.{}".format(*m.groups()) if lines[0][:1] == text[:1] else None
        return status, text[m.end() :]

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

    __slots__ = ("_buf", "_count", "_scan", "buffer", "eof", "max_line", "max_lines")

    def __init__(self, *, max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> None:
        #: the bytes fed and not parsed yet (appending here is feeding them)
        self.buffer = self._buf = bytearray()
        self._scan = 0  # where the scan for the end of the current reply resumes
        self._count = 0  # lines of the current reply scanned so far
        self.eof = False
        self.max_line = max_line
        self.max_lines = max_lines

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            self.eof = True
        else:
            self._buf += data

    @property
    def buffered(self) -> int:
        """How many received bytes wait to be parsed."""
        return len(self._buf)

    def clear(self) -> int:
        """Drop everything buffered (after STARTTLS: RFC 3207 section 4.2, nothing the
        server sent in the clear may be acted on). Returns how many bytes were dropped."""
        dropped = len(self._buf)
        self._buf.clear()
        self._scan = self._count = 0
        return dropped

    def next_reply(self) -> Reply | _NeedData:
        buf = self._buf
        if not buf:
            return NEED_DATA
        if not self._scan:
            # Fast path: most replies are one line ("250 2.1.0 Ok\r\n"), and seen before.
            reply = take_one_line(buf, self.max_line)
            if reply is not None:
                return reply
            if len(buf) > 4 and buf[3] == 0x2D and len(buf) <= _SEEN_LONGEST:
                # A reply of several lines (EHLO's) that is all there is and was seen
                # before, whole: a key of KNOWN is one complete, valid reply (within
                # this parser's limits too, which may be other than its).
                reply = KNOWN.get(bytes(buf))
                if (
                    reply is not None
                    and len(buf) <= self.max_line
                    and len(reply.lines) <= self.max_lines
                ):
                    buf.clear()
                    return reply
        return self._slow(buf)

    def _slow(self, buf: bytearray) -> Reply | _NeedData:
        start, count, max_line = self._scan, self._count, self.max_line
        # Skip the continuation lines ("ddd-...") in one regex match, resuming where
        # the last call stopped; the reply ends with the first line after them.
        matched = _continuations(max_line).match(buf, start)
        assert matched is not None  # it matches zero lines too
        scanned = matched.end()
        count += buf.count(b"\n", start, scanned)
        if count >= self.max_lines:
            raise RemoteProtocolError(f"reply longer than {self.max_lines} lines")
        end = buf.find(b"\n", scanned)
        if end < 0:
            if len(buf) - scanned > max_line:
                raise RemoteProtocolError(f"reply line longer than {max_line} octets")
            self._scan, self._count = scanned, count
            return NEED_DATA
        if end - scanned > max_line or (end - scanned >= 4 and buf[scanned + 3] == 0x2D):
            # A continuation line the match stopped at: only a too long one.
            raise RemoteProtocolError(f"reply line longer than {max_line} octets")
        self._scan = self._count = 0
        raw = bytes(buf[: end + 1])
        del buf[: end + 1]
        seen = KNOWN.get(raw)
        if seen is not None:
            return seen
        return _remember(raw, _parse_block(raw, count))


def take_one_line(buf: bytearray, max_line: int = MAX_LINE) -> Reply | None:
    """The reply at the start of ``buf`` when it is a whole plain line of at most
    ``max_line`` octets ("250 2.1.0 Ok\\r\\n", most often seen before), taken out of
    ``buf``; None otherwise (a reply of several lines, one not whole yet, or one that is
    not plain: the general path then reads it, or says what is wrong). Sans-IO: the
    parser's fast path, and the protocol's, which calls it before the parser."""
    end = buf.find(b"\n")
    if not 3 < end <= max_line or buf[3] != 0x20:
        return None
    raw = bytes(buf[: end + 1])
    reply = KNOWN.get(raw)
    if reply is None:
        reply = one_line(raw, end)
        if reply is None:
            return None
    del buf[: end + 1]
    return reply


def take_known_lines(buf: bytearray, max_line: int = MAX_LINE) -> list[Reply] | None:
    """Every reply in ``buf`` when it holds nothing but whole one-line replies, each seen
    before (the replies to a pipelined group, read at once: "250 2.1.0 Ok\\r\\n250 2.1.5
    Ok\\r\\n354 ..."), taken out of ``buf`` in one go, the last first (for ``pop()``);
    None otherwise, and nothing taken (:func:`take_one_line` and the parser read it
    then). Sans-IO: the protocol's fast path, which hands them out one at a time."""
    if len(buf) < 4 or buf[-1] != 0x0A or buf[3] != 0x20:
        return None  # the read ends mid-line, or starts a reply of several lines
    replies = []
    # splitlines() breaks at a lone CR too: the piece before it ends in CR, and no
    # key of KNOWN does (each is a whole reply, ending in LF), so it is never taken.
    for line in bytes(buf).splitlines(True):
        reply = KNOWN.get(line)
        if reply is None or len(line) > max_line + 1:
            return None
        replies.append(reply)
    buf.clear()
    replies.reverse()
    return replies


def one_line(raw: bytes, end: int) -> Reply | None:
    """The reply of the one line ``raw`` (its newline at ``end``), or None when it
    is not a plain one (the general path then says what is wrong)."""
    head = raw[:3]
    if not head.isdigit() or not 200 <= (code := int(head)) <= 599:
        return None
    stop = end - 1 if raw[end - 1] == 0x0D else end
    return _remember(raw, Reply(code, (raw[4:stop].decode("utf-8", "replace"),)))


def _remember(raw: bytes, reply: Reply) -> Reply:
    if len(raw) <= _SEEN_LONGEST:
        if len(KNOWN) >= _SEEN_MOST:
            KNOWN.clear()  # unique texts ("queued as 4F2A9...") must not pile up
        KNOWN[raw] = reply
    return reply


def _parse_block(raw: bytes, count: int) -> Reply:
    """The reply of ``raw``: ``count`` continuation lines, then the last one (RFC
    5321 4.2: every line with the same code)."""
    block = raw.decode("utf-8", "replace")
    lines = block.split("\n")
    lines.pop()  # after the final newline
    last = lines[-1].removesuffix("\r")
    code_text = last[:3]
    if not (code_text.isascii() and code_text.isdigit()) or last[3:4] not in ("", " "):
        raise RemoteProtocolError(f"malformed reply line: {_show(last)}")
    code = int(code_text)
    if not 200 <= code <= 599:
        raise RemoteProtocolError(f"reply code out of range: {_show(last)}")
    if count == 0:
        return Reply(code, (last[4:],))
    lines.pop()
    for line in lines:
        if not line.startswith(code_text):
            other = line[:3]
            if other.isascii() and other.isdigit():
                raise RemoteProtocolError(f"reply lines disagree on the code ({other} then {code})")
            raise RemoteProtocolError(f"malformed reply line: {_show(line)}")
    texts = [line[4:].removesuffix("\r") for line in lines]
    texts.append(last[4:])
    return Reply(code, tuple(texts))


@functools.cache
def _continuations(max_line: int) -> re.Pattern[bytes]:
    """Matches all the continuation lines ("ddd-text", at most ``max_line`` octets
    before the newline) at the start of a reply."""
    return re.compile(rb"(?:[^\n]{3}-[^\n]{0,%d}\n)*" % (max_line - 4))


def _show(line: str, limit: int = 80) -> str:
    return repr(line[:limit] + ("..." if len(line) > limit else ""))
