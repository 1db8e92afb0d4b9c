"""A throttling SMTP server on loopback, as a big provider behaves toward a sender.

It refuses a session above ``max_sessions`` at once with ``421 4.7.0 Try again later``
(and closes), answers a MAIL above ``max_rate`` transactions per second (a sliding
one-second window) with ``451 4.7.1 ... rate limited``, and can be suspended for a
while (:meth:`ThrottleServer.suspend`): then every new session is greeted with
``421 4.7.28 ... unusual rate ... suspending`` and every MAIL answered so. It keeps
what it saw: sessions opened, the peak at once, every refusal by kind, and each
recipient of each message accepted (to check "exactly once").

It runs its own asyncio loop in a thread, so a test on trio or a benchmark on any loop
can talk to it; a plain line-based SMTP (no PIPELINING, no TLS), fast enough for a few
thousand messages a second on loopback.

    server = ThrottleServer("127.0.0.2", port, max_sessions=8, max_rate=100).start()
    ...
    server.stop()
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterator

import pytest

__all__ = ["ThrottleServer", "throttle_server"]


class ThrottleServer:
    """See the module's docstring. ``max_sessions``/``max_rate``: None for no limit."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_sessions: int | None = None,
        max_rate: float | None = None,
        name: str = "mx.provider.test",
    ) -> None:
        assert host.startswith("127.") or host == "::1", "loopback only"
        self.host, self.port, self.name = host, port, name
        self.max_sessions = max_sessions
        self.max_rate = max_rate
        self.active = 0
        self.peak = 0
        self.sessions_opened = 0  # greeted with 220
        self.refused_sessions = 0  # greeted with 421 (too many at once)
        self.rate_refusals = 0  # 451 to MAIL
        self.suspended_refusals = 0  # 421 4.7.28 while suspended
        self.sessions_while_suspended = 0  # connections that came while suspended
        self.messages = 0
        self.received: collections.Counter[str] = collections.Counter()
        #: when each message was accepted (time.monotonic), for rates over time
        self.accepted_at: list[float] = []
        self.rate_refused_at: list[float] = []
        self._suspended_until = 0.0
        self._accepted: collections.deque[float] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._lock = threading.Lock()

    # -- control (from any thread) ------------------------------------------------

    def start(self) -> ThrottleServer:
        self._thread = threading.Thread(target=self._run, name="throttle-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("the throttle server did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(5)

    def suspend(self, seconds: float) -> None:
        """Refuse every new session and MAIL for ``seconds`` from now."""
        with self._lock:
            self._suspended_until = time.monotonic() + seconds

    @property
    def suspended(self) -> bool:
        return time.monotonic() < self._suspended_until

    @property
    def refusals(self) -> int:
        return self.refused_sessions + self.rate_refusals + self.suspended_refusals

    # -- the server ---------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(self._session, self.host, self.port, backlog=1024)
            )
            self._ready.set()
            loop.run_forever()
            self._server.close()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            loop.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.suspended:
            self.sessions_while_suspended += 1
            self.suspended_refusals += 1
            writer.write(self._suspension())
            return
        if self.max_sessions is not None and self.active >= self.max_sessions:
            self.refused_sessions += 1
            writer.write(b"421 4.7.0 Try again later, too many connections from your IP\r\n")
            return
        self.active += 1
        self.sessions_opened += 1
        self.peak = max(self.peak, self.active)
        try:
            writer.write(f"220 {self.name} ESMTP throttle\r\n".encode())
            sender: str | None = None
            rcpts: list[str] = []
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(f"250-{self.name}\r\n250 8BITMIME\r\n".encode())
                elif verb == b"MAIL":
                    refusal = self._admit()
                    if refusal is not None:
                        writer.write(refusal)
                        if refusal.startswith(b"421"):
                            return
                        continue
                    sender, rcpts = line[10:].decode().strip(), []
                    writer.write(b"250 2.1.0 OK\r\n")
                elif verb == b"RCPT":
                    if sender is None:
                        writer.write(b"503 5.5.1 MAIL first\r\n")
                        continue
                    rcpts.append(line[8:].decode().strip().strip("<>"))
                    writer.write(b"250 2.1.5 OK\r\n")
                elif verb == b"DATA":
                    if not rcpts:
                        writer.write(b"503 5.5.1 RCPT first\r\n")
                        continue
                    writer.write(b"354 go ahead\r\n")
                    while (await reader.readline()) not in (b".\r\n", b""):
                        pass
                    self.messages += 1
                    self.accepted_at.append(time.monotonic())
                    self.received.update(rcpts)
                    sender, rcpts = None, []
                    writer.write(b"250 2.0.0 OK queued\r\n")
                elif verb == b"RSET":
                    sender, rcpts = None, []
                    writer.write(b"250 2.0.0 OK\r\n")
                elif verb == b"NOOP":
                    writer.write(b"250 2.0.0 OK\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 5.5.2 not implemented\r\n")
                await writer.drain()
        finally:
            self.active -= 1

    def _admit(self) -> bytes | None:
        """None to accept a MAIL, or the refusal."""
        if self.suspended:
            self.suspended_refusals += 1
            return self._suspension()
        if self.max_rate is not None:
            now = time.monotonic()
            window = self._accepted
            while window and now - window[0] >= 1.0:
                window.popleft()
            if len(window) >= self.max_rate:
                self.rate_refusals += 1
                self.rate_refused_at.append(now)
                return b"451 4.7.1 Too many messages: rate limited, try again later\r\n"
            window.append(now)
        return None

    def _suspension(self) -> bytes:
        return (
            b"421 4.7.28 Our system has detected an unusual rate of mail from your IP: "
            b"suspending, try again later\r\n"
        )


@pytest.fixture
def throttle_server() -> Iterator[type[ThrottleServer]]:
    """Yields ``make(host, port, **options) -> ThrottleServer`` (started); stops them
    all at teardown."""
    started: list[ThrottleServer] = []

    class Started(ThrottleServer):
        def __init__(self, host: str, port: int, **options: object) -> None:
            super().__init__(host, port, **options)  # type: ignore[arg-type]
            started.append(self)
            self.start()

    yield Started
    for server in started:
        server.stop()
