"""The octets of a message's content on the wire (layer 1, sans-IO): DATA and BDAT.

This module owns the rules the content itself must follow, whoever made it: CRLF line
endings, at most 998 octets a line (RFC 5321 4.5.3.1.6), no NUL (RFC 2045 2.7), no
control characters in the header section (RFC 5322), dot-stuffing for DATA (RFC 5321
4.5.2) and its undoing for BDAT (RFC 3030), and cutting the content into BDAT chunks.
It works on bytes alone: :mod:`~asmtp._core.serialize` writes an
:class:`~email.message.EmailMessage` into bytes, :mod:`~asmtp._core.prepared` holds the
result.

Line endings: a bare CR and a bare LF each count as one line break, as a CRLF does.
They all leave as CRLF, so no server can be made to see a different end of data than
asmtp meant (SMTP smuggling).

Memory: content is normalized, checked and dot-stuffed a block of whole lines at a time
(:data:`BLOCK`) and kept as those blocks, never joined.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from ..errors import InputError

__all__ = [
    "BDAT_CHUNK",
    "BLOCK",
    "MAX_LINE_LENGTH",
    "Wire",
    "check_end_of_data",
    "first_long_line",
    "split_chunks",
    "to_wire",
    "unstuff",
    "without_end",
]

# RFC 5321 4.5.3.1.6: at most 998 octets per line before the CRLF.
MAX_LINE_LENGTH = 998


def _normalize_line_endings(content: bytes) -> bytes:
    # Three C-speed passes: CRLF -> LF, lone CR -> LF, LF -> CRLF.
    if b"\r" in content:
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return content.replace(b"\n", b"\r\n")


def first_long_line(content: bytes) -> int | None:
    """The 1-based number of the first line longer than 998 octets, if any.

    This runs for every message sent, so it must stay cheap: splitting in C and
    comparing lengths beats a regex that rescans up to 998 octets at every offset."""
    if len(content) <= MAX_LINE_LENGTH:
        return None
    for number, line in enumerate(content.splitlines(), 1):
        if len(line) > MAX_LINE_LENGTH:
            return number
    return None


# A large message is written, normalized and dot-stuffed a block of whole lines at a
# time: preparing it holds the result and about a block more, never a second copy.
BLOCK = 1 << 20

#: The most octets one BDAT command carries (RFC 3030), unless told otherwise
#: (:meth:`~asmtp._core.prepared.PreparedMessage.chunks`): a message up to this size
#: goes in one ``BDAT n LAST``; a larger one in chunks of this size, views of its blocks.
BDAT_CHUNK = BLOCK


def _line_blocks(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """The octets of ``chunks`` again, in blocks that end with a line break, one each
    time ``size`` octets or more have come: a CR at the end waits for the next block,
    as it may be half of a CRLF. A line over 998 octets is let out wherever it has got to:
    it cannot be sent as it is, so its part is re-encoded or the message refused."""
    pending: list[bytes] = []
    held = 0
    for chunk in chunks:
        pending.append(chunk)
        held += len(chunk)
        if held < size:
            continue
        buf = b"".join(pending)
        pending.clear()
        stop = len(buf) - buf.endswith(b"\r")
        cut = max(buf.rfind(b"\n", 0, stop), buf.rfind(b"\r", 0, stop)) + 1
        if cut:
            yield buf[:cut]
            buf = buf[cut:]
        if len(buf) - buf.endswith(b"\r") > MAX_LINE_LENGTH:
            yield buf
            buf = b""
        if buf:
            pending.append(buf)
        held = len(buf)
    if pending:
        yield b"".join(pending)


# RFC 5322 2.2 and 3.2.5: a field body is printable characters and WSP; the other
# US-ASCII controls are obsolete syntax, never generated (a CR or LF here is a CRLF).
_HEADER_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _header_error(header: bytes) -> str | None:
    found = _HEADER_CONTROL.search(header)
    if found is None:
        return None
    start = header.rfind(b"\r\n", 0, found.start())
    name = header[start + 2 if start >= 0 else 0 :].split(b":", 1)[0]
    return (
        f"message: header {name.decode('ascii', 'replace')!r} holds the control"
        f" character U+{found.group()[0]:04X}: RFC 5322 allows only printable"
        " characters and tabs"
    )


@dataclass(slots=True)
class Wire:
    """A message's content as sent after DATA (before the final ``.``), in blocks of
    whole lines, and what was found in it on the way."""

    parts: list[bytes] = field(default_factory=list)
    eight_bit: bool = False
    head_ascii: bool = True
    long_line: int | None = None  # the number of the first line over 998 octets
    nul_line: int | None = None  # the number of the first line holding a NUL
    head_error: str | None = None  # a control character in the header section
    dot_lines: bool = False  # a line starts with a dot (dot-stuffing doubled it)

    def lines_so_far(self) -> int:
        return sum(part.count(b"\n") for part in self.parts)


def to_wire(chunks: Iterable[bytes], size: int = BLOCK) -> Wire:
    """CRLF line endings and dot-stuffing (RFC 5321 4.5.2) for the octets of
    ``chunks``, with the checks of what may be sent, a block of whole lines at a time:
    the same result as for the chunks joined, without ever joining them.

    >>> wire = to_wire([b"Subject: hi\\n\\n.hidden\\nbare\\rCR\\r\\n.\\r\\n"])
    >>> wire.parts, wire.dot_lines
    ([b'Subject: hi\\r\\n\\r\\n..hidden\\r\\nbare\\r\\nCR\\r\\n..\\r\\n'], True)
    """
    wire = Wire()
    in_head = True
    for raw in _line_blocks(chunks, size):
        block = _normalize_line_endings(raw)
        del raw  # a block's worth: let it go before the next copy
        if wire.long_line is None and (number := first_long_line(block)) is not None:
            wire.long_line = wire.lines_so_far() + number
        if wire.nul_line is None and (nul := block.find(b"\0")) >= 0:
            wire.nul_line = wire.lines_so_far() + block.count(b"\n", 0, nul) + 1
        if in_head:
            # Blocks start at a line: an empty line opening one ends the header section.
            end = 0 if block.startswith(b"\r\n") else block.find(b"\r\n\r\n")
            head = block if end < 0 else block[:end]
            wire.head_ascii = wire.head_ascii and head.isascii()
            wire.head_error = wire.head_error or _header_error(head)
            in_head = end < 0
        length = len(block)
        if block.startswith(b"."):
            block = b"." + block
        block = block.replace(b"\r\n.", b"\r\n..")
        wire.dot_lines = wire.dot_lines or len(block) != length
        wire.eight_bit = wire.eight_bit or not block.isascii()
        wire.parts.append(block)
    return wire


def check_end_of_data(parts: Sequence[bytes]) -> None:
    """Content made ready for DATA ends with CRLF . CRLF, across pieces."""
    tail = b""
    for part in reversed(parts):  # the last five octets
        tail = part[len(tail) - 5 :] + tail
        if len(tail) >= 5:
            break
    if tail != b"\r\n.\r\n":
        raise InputError("message content must end with CRLF . CRLF")


def unstuff(parts: Sequence[bytes]) -> tuple[bytes, ...]:
    """``parts`` (content made ready for DATA) with the dot-stuffing undone: the dot
    RFC 5321 4.5.2 added to each line that starts with one, whose stuffed form starts
    with two (``CRLF ..``). A part without such a line is kept, not copied; one with
    them is copied once without the added dots. A line may run across parts.

    >>> unstuff([b"a\\r\\n.", b".b\\r\\n.\\r\\n"])
    (b'a\\r\\n.', b'b\\r\\n.\\r\\n')
    """
    out: list[bytes] = []
    before = b"\r\n"  # the last octets of the parts so far: the content starts a line
    for part in parts:
        # A stuffed line start that runs across the boundary: its second dot is in
        # this part, at most the third octet.
        at = (before + part[:3]).find(b"\r\n..")
        drop = at + 3 - len(before) if 0 <= at < len(before) else -1
        if drop >= 0:
            unstuffed = part[:drop] + part[drop + 1 :]
            out.append(unstuffed.replace(b"\r\n..", b"\r\n."))
        elif b"\r\n.." in part:
            out.append(part.replace(b"\r\n..", b"\r\n."))
        else:
            out.append(part)
        before = (before + part[-3:])[-3:]
    return tuple(out)


def without_end(pieces: Sequence[bytes]) -> list[bytes | memoryview]:
    """``pieces`` without their last three octets (the final ``.`` line): the last
    piece a view, not a copy."""
    out: list[bytes | memoryview] = list(pieces)
    cut = 3
    while cut:
        last = out.pop()
        if len(last) > cut:
            out.append(memoryview(last)[:-cut])
            break
        cut -= len(last)
    return out


def split_chunks(
    pieces: Sequence[bytes | memoryview], limit: int
) -> tuple[tuple[bytes | memoryview, ...], ...]:
    """``pieces`` in chunks of ``limit`` octets (the last one up to it), each the
    pieces or views of them that make it up: never a copy."""
    chunks: list[tuple[bytes | memoryview, ...]] = []
    chunk: list[bytes | memoryview] = []
    room = limit
    for piece in pieces:
        while len(piece) > room:
            view = memoryview(piece)
            if room:
                chunk.append(view[:room])
            chunks.append(tuple(chunk))
            chunk, piece, room = [], view[room:], limit
        if piece:
            chunk.append(piece)
            room -= len(piece)
    if chunk or not chunks:
        chunks.append(tuple(chunk))
    return tuple(chunks)
