"""The callback-driven bare client: the real ceiling for Python in the fan-out benchmark.

It owns nothing of asmtp and imports none of it. Where ``bare_client.py`` runs each step
from its task (a wakeup per reply), this client runs the whole session from the read
callback, as a small state machine:

- an ``asyncio.BufferedProtocol`` reading into one preallocated buffer shared by every
  connection (each read is parsed at once, before another callback can run);
- each step knows how many replies it waits for and the code each must end with; the
  final line of every reply is checked, continuation lines (``250-...``) only scanned
  for PIPELINING in the EHLO reply;
- every step's bytes are built before the run (the RCPT line once per recipient);
- one future per session, resolved by the callback at the end (or failed), so the task
  that opened the connection wakes once;
- C long-lived tasks, each looping over its share of the recipients (no task per
  message), ``loop.create_connection`` per message;
- with PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write, then the content with
  QUIT in one write and both replies (250 and 221) awaited; without it, one command per
  write.

It does every exchange the others do: greeting 220, EHLO 250, MAIL 250, RCPT 250,
DATA 354, end of data 250, QUIT 221, each within ``message_timeout`` seconds from the
start of connect. No TLS, no AUTH, no SIZE check, no retries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import cast

READ_BUFFER_SIZE = 16 * 1024
MAX_LINE = 64 * 1024  # a reply line longer than this means a broken peer, not a slow one

Outcome = tuple[bool, float, str]  # delivered?, seconds from connect to QUIT's reply, error

# A step: the bytes to write, then the code each reply to it must end with, in order,
# and what the step is called in an error.
Step = tuple[bytes, tuple[bytes, ...], str]


class ReplyCodeError(Exception):
    """The server answered a step with an unexpected code."""


def prepare_content(message: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, leading dots doubled, and the
    end-of-data line (RFC 5321 sections 4.1.1.4 and 4.5.2)."""
    lines = message.splitlines()
    stuffed = b"".join((b"." + line if line[:1] == b"." else line) + b"\r\n" for line in lines)
    return stuffed + b".\r\n"


class _Plan:
    """The bytes every session writes, built once."""

    __slots__ = ("content", "content_quit", "first", "mail")

    def __init__(self, helo: str, sender: str, message: bytes) -> None:
        ehlo: Step = (b"EHLO " + helo.encode("ascii") + b"\r\n", (b"250",), "EHLO")
        #: the steps after the greeting and before EHLO's reply is known
        self.first: tuple[Step, ...] = (ehlo,)
        self.mail = b"MAIL FROM:<" + sender.encode("ascii") + b">\r\n"
        self.content = prepare_content(message)
        self.content_quit: Step = (
            self.content + b"QUIT\r\n",
            (b"250", b"221"),
            "end of data and QUIT",
        )

    def after_ehlo(self, rcpt: bytes, pipelining: bool) -> tuple[Step, ...]:
        """The steps after EHLO: with PIPELINING two writes (MAIL+RCPT+DATA, then the
        content with QUIT), else one command per write."""
        if pipelining:
            group = self.mail + rcpt + b"DATA\r\n"
            return ((group, (b"250", b"250", b"354"), "MAIL, RCPT and DATA"), self.content_quit)
        return (
            (self.mail, (b"250",), "MAIL"),
            (rcpt, (b"250",), "RCPT"),
            (b"DATA\r\n", (b"354",), "DATA"),
            (self.content, (b"250",), "end of data"),
            (b"QUIT\r\n", (b"221",), "QUIT"),
        )


_GREETING: Step = (b"", (b"220",), "greeting")


class _Session(asyncio.BufferedProtocol):
    """One connection, one message: the whole exchange runs in ``buffer_updated``."""

    __slots__ = (
        "_buffer",
        "_codes",
        "_done",
        "_ehlo",
        "_got",
        "_next",
        "_pipelining",
        "_plan",
        "_rcpt",
        "_stage",
        "_steps",
        "_tail",
        "_task",
        "_transport",
        "timed_out",
    )

    def __init__(
        self,
        plan: _Plan,
        rcpt: bytes,
        buffer: memoryview,
        done: asyncio.Future[None],
        task: asyncio.Task[None] | None,
    ) -> None:
        self._plan = plan
        self._task = task  # cancelled if the time runs out while connecting
        self._rcpt = rcpt
        self._buffer = buffer
        self._done = done
        self._steps = plan.first  # then the steps after EHLO
        self._next = 0  # the step to write once the current one is answered
        _, self._codes, self._stage = _GREETING  # what the current step waits for
        self._got = 0  # replies to the current step read so far
        self._ehlo = False  # the current step is EHLO: look for PIPELINING
        self._pipelining = False
        self._tail = b""  # a line split between two reads
        self._transport: asyncio.Transport | None = None
        self.timed_out = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        # Copied out at once: the buffer is every connection's.
        data = self._tail + self._buffer[:nbytes] if self._tail else self._buffer[:nbytes].tobytes()
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            if self._ehlo and data.find(b"PIPELINING", start, end) >= 0:
                self._pipelining = True
            if data[start + 3 : start + 4] != b"-":  # a reply's final line (RFC 5321 4.2.1)
                if data[start : start + 3] != self._codes[self._got]:
                    line = data[start:end].strip().decode("ascii", "replace")
                    self._fail(ReplyCodeError(f"{self._stage}: {line}"))
                    return
                self._got += 1
                if self._got == len(self._codes) and not self._advance():
                    return
            start = end + 1
        self._tail = data[start:]
        if len(self._tail) > MAX_LINE:
            self._fail(ReplyCodeError(f"{self._stage}: reply line too long"))

    def _advance(self) -> bool:
        """The current step is answered: write the next one's bytes. False at the end."""
        if self._ehlo:
            self._ehlo = False
            self._steps = self._plan.after_ehlo(self._rcpt, self._pipelining)
            self._next = 0
        steps, index = self._steps, self._next
        if index == len(steps):
            self._finish()
            return False
        data, self._codes, self._stage = steps[index]
        self._next = index + 1
        self._got = 0
        self._ehlo = steps is self._plan.first
        transport = self._transport
        assert transport is not None
        transport.write(data)
        return True

    def _finish(self) -> None:
        transport = self._transport
        if transport is not None:
            transport.close()
        if not self._done.done():
            self._done.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        transport = self._transport
        if transport is not None:
            transport.abort()
        if not self._done.done():
            self._done.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done.done():
            self._done.set_exception(exc or ConnectionResetError("connection closed"))

    def time_out(self) -> None:
        """The message's time is up: abort, or stop connecting."""
        self.timed_out = True
        if self._transport is None and self._task is not None:
            self._task.cancel()
        else:
            self._fail(TimeoutError())


async def send_all(
    host: str,
    port: int,
    message: bytes,
    sender: str,
    recipients: Sequence[str],
    *,
    concurrency: int,
    helo: str,
    message_timeout: float = 30.0,
) -> list[Outcome]:
    """Send ``message`` to each recipient over its own connection, at most
    ``concurrency`` at once, each within ``message_timeout`` seconds from connect to
    the reply to QUIT; one outcome per recipient, in the order given."""
    plan = _Plan(helo, sender, message)

    def make(
        recipient: str,
        buffer: memoryview,
        done: asyncio.Future[None],
        task: asyncio.Task[None] | None,
    ) -> _Session:
        rcpt = b"RCPT TO:<" + recipient.encode("ascii") + b">\r\n"
        return _Session(plan, rcpt, buffer, done, task)

    return await run_sessions(
        host, port, recipients, make, concurrency=concurrency, message_timeout=message_timeout
    )


MakeSession = Callable[
    [str, memoryview, "asyncio.Future[None]", "asyncio.Task[None] | None"], _Session
]


async def run_sessions(
    host: str,
    port: int,
    recipients: Sequence[str],
    make: MakeSession,
    *,
    concurrency: int,
    message_timeout: float = 30.0,
) -> list[Outcome]:
    """The frame of :func:`send_all`: C long-lived tasks, a connection per recipient to
    the session ``make(recipient, buffer, done, task)`` returns (a :class:`_Session`, or
    one that runs the exchange its own way), one outcome per recipient, in order."""
    loop = asyncio.get_running_loop()
    buffer = memoryview(bytearray(READ_BUFFER_SIZE))
    outcomes: list[Outcome] = [(False, 0.0, "not sent")] * len(recipients)
    work = iter(enumerate(recipients))  # shared by the workers; next() never interleaves

    async def worker() -> None:
        task = asyncio.current_task()
        for index, recipient in work:
            done: asyncio.Future[None] = loop.create_future()
            session = make(recipient, buffer, done, task)
            start = time.perf_counter()
            timer = loop.call_later(message_timeout, session.time_out)
            try:
                await loop.create_connection(lambda s=session: s, host, port)
                await done
            except (TimeoutError, asyncio.CancelledError):
                if not session.timed_out or task is None or task.uncancel():
                    raise  # cancelled from outside
                error = f"timeout after {message_timeout} s"
                outcomes[index] = (False, time.perf_counter() - start, error)
            except (OSError, ReplyCodeError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                outcomes[index] = (False, time.perf_counter() - start, error)
            else:
                outcomes[index] = (True, time.perf_counter() - start, "")
            finally:
                timer.cancel()

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(recipients))))))
    return outcomes
