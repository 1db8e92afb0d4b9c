"""A bare asyncio SMTP client with no library: the Python ceiling in the fan-out benchmark.

It owns nothing of asmtp and imports none of it. One connection per message, each driven by an
``asyncio.BufferedProtocol`` with one reused read buffer; every command is built before the
run starts and each reply is checked by its code alone. In order: greeting 220, EHLO 250,
MAIL 250, RCPT 250, DATA 354, content and dot 250, QUIT 221. With ``pipelining=True`` and a
server that offers PIPELINING (RFC 2920), MAIL, RCPT and DATA go out in one write.

No TLS, no AUTH, no SIZE check, no retries: only what the benchmark's loopback sink needs.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

READ_BUFFER_SIZE = 16 * 1024
MAX_LINE = 64 * 1024  # a reply line longer than this means a broken peer, not a slow one


class ReplyCodeError(Exception):
    """The server answered a step with an unexpected code (the stage and the reply line)."""

    def __init__(self, stage: str, line: bytes) -> None:
        super().__init__(f"{stage}: {line.strip().decode('ascii', 'replace')}")
        self.stage = stage
        self.code = line[:3].decode("ascii", "replace")


@dataclass(frozen=True)
class Outcome:
    """One message to one recipient: whether the dot was answered 250 and QUIT 221,
    and the seconds from the start of connect to the reply to QUIT."""

    recipient: str
    ok: bool
    elapsed: float
    error: str = ""


class _ReplyReader(asyncio.BufferedProtocol):
    """Splits what the server sends into replies: lists of lines, the last without a hyphen
    after the code (RFC 5321 section 4.2.1)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray(READ_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._tail = b""
        self._lines: list[bytes] = []
        self._replies: collections.deque[list[bytes]] = collections.deque()
        self._wanted = 0
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        data = self._tail + self._view[:nbytes]
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            line = data[start : end + 1]
            start = end + 1
            self._lines.append(line)
            if line[3:4] != b"-":
                self._replies.append(self._lines)
                self._lines = []
        self._tail = data[start:]
        if len(self._tail) > MAX_LINE and self.transport is not None:
            self.transport.abort()
        waiter = self._waiter
        if waiter is not None and not waiter.done() and len(self._replies) >= self._wanted:
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc if exc is not None else ConnectionResetError("connection closed")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self._lost)

    async def replies(self, count: int) -> list[list[bytes]]:
        """Wait for ``count`` more complete replies and return them in order."""
        if len(self._replies) < count:
            if self._lost is not None:
                raise self._lost
            self._wanted = count
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return [self._replies.popleft() for _ in range(count)]


def _expect(reply: list[bytes], code: bytes, stage: str) -> None:
    if reply[-1][:3] != code:
        raise ReplyCodeError(stage, reply[-1])


def _offers_pipelining(ehlo: list[bytes]) -> bool:
    return any(line[4:].strip().upper() == b"PIPELINING" for line in ehlo[1:])


def prepare_content(message: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, leading dots doubled, and the
    end-of-data line (RFC 5321 sections 4.1.1.4 and 4.5.2)."""
    lines = message.splitlines()
    stuffed = b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)
    return stuffed + b".\r\n"


@dataclass(frozen=True)
class _Commands:
    ehlo: bytes
    mail: bytes
    content: bytes


async def _session(
    host: str, port: int, commands: _Commands, rcpt: bytes, pipelining: bool
) -> None:
    loop = asyncio.get_running_loop()
    transport, reader = await loop.create_connection(_ReplyReader, host, port)
    try:
        _expect((await reader.replies(1))[0], b"220", "greeting")
        transport.write(commands.ehlo)
        (ehlo,) = await reader.replies(1)
        _expect(ehlo, b"250", "EHLO")
        if pipelining and _offers_pipelining(ehlo):
            transport.write(commands.mail + rcpt + b"DATA\r\n")
            mail, rcpt_reply, data = await reader.replies(3)
            _expect(mail, b"250", "MAIL")
            _expect(rcpt_reply, b"250", "RCPT")
            _expect(data, b"354", "DATA")
        else:
            transport.write(commands.mail)
            _expect((await reader.replies(1))[0], b"250", "MAIL")
            transport.write(rcpt)
            _expect((await reader.replies(1))[0], b"250", "RCPT")
            transport.write(b"DATA\r\n")
            _expect((await reader.replies(1))[0], b"354", "DATA")
        transport.write(commands.content)
        _expect((await reader.replies(1))[0], b"250", "end of data")
        transport.write(b"QUIT\r\n")
        _expect((await reader.replies(1))[0], b"221", "QUIT")
    finally:
        transport.close()


async def _deliver(
    host: str,
    port: int,
    commands: _Commands,
    recipient: str,
    pipelining: bool,
    message_timeout: float,
) -> Outcome:
    rcpt = b"RCPT TO:<" + recipient.encode("ascii") + b">\r\n"
    start = time.perf_counter()
    try:
        async with asyncio.timeout(message_timeout):
            await _session(host, port, commands, rcpt, pipelining)
    except TimeoutError:
        error = f"timeout after {message_timeout} s"
        return Outcome(recipient, False, time.perf_counter() - start, error)
    except (OSError, ReplyCodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        return Outcome(recipient, False, time.perf_counter() - start, error)
    return Outcome(recipient, True, time.perf_counter() - start)


async def send_all(
    host: str,
    port: int,
    message: bytes,
    sender: str,
    recipients: Sequence[str],
    *,
    concurrency: int,
    helo: str,
    pipelining: bool = False,
    message_timeout: float = 30.0,
) -> list[Outcome]:
    """Send ``message`` to each recipient over its own connection, at most ``concurrency``
    at once, each within ``message_timeout`` seconds from connect to the reply to QUIT;
    one :class:`Outcome` per recipient, in the order given."""
    commands = _Commands(
        ehlo=b"EHLO " + helo.encode("ascii") + b"\r\n",
        mail=b"MAIL FROM:<" + sender.encode("ascii") + b">\r\n",
        content=prepare_content(message),
    )
    outcomes: list[Outcome | None] = [None] * len(recipients)
    work = iter(enumerate(recipients))  # shared by the workers; next() never interleaves

    async def worker() -> None:
        for index, recipient in work:
            outcomes[index] = await _deliver(
                host, port, commands, recipient, pipelining, message_timeout
            )

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(recipients))))))
    return [outcome for outcome in outcomes if outcome is not None]
