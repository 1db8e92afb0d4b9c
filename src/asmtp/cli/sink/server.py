"""The sink's network side: an ``asyncio.Protocol`` per connection and the listening
server, with the round-trip emulation.

Owns when replies go out. Everything one read asked for (:meth:`SinkSession.receive`)
is one batch of replies, written ``rtt`` seconds after that read arrived; the
greeting goes out ``rtt`` (plus ``slow_greeting``, plus one more ``rtt`` with
``handshake_rtt``) after the connection. So each
time a client writes and waits for the answer costs it one round trip, as on a
network with that latency, while pipelined commands cost one between them (this
kernel has no netem; the emulation is in user space, per batch, in order). With
``rtt`` 0 replies are written at once, from the read callback.

Also owns the connections' bookkeeping in the shared :class:`~.session.Counters`,
the optional STARTTLS upgrade, the ``max_messages`` bound, and the ``on_batch``
hook that sees every batch written (for tests that count round trips)::

    async with SinkServer(SinkSettings(rtt=0.05)) as sink:
        ...  # send to 127.0.0.1:sink.port; sink.counters.messages counts them
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, cast

from .session import Counters, End, SinkSession, SinkSettings

__all__ = ["Batch", "SinkServer"]

#: the listen backlog: a load test opens many connections at once
BACKLOG = 4096
#: seconds a TLS handshake may take after STARTTLS
HANDSHAKE_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch of replies as written: the connection's number (from 1, in the
    order accepted), when the read that asked for it arrived (the connection, for
    the greeting) and when it was written, on the event loop's clock, and the
    replies' bytes."""

    connection: int
    received: float
    written: float
    replies: bytes

    @property
    def codes(self) -> tuple[int, ...]:
        """The reply codes in the batch, one per reply (multiline replies once)."""
        lines = self.replies.split(b"\r\n")
        return tuple(int(line[:3]) for line in lines if line[3:4] == b" ")


class _SinkProtocol(asyncio.Protocol):
    """One connection: the session, and its replies waiting for their time."""

    def __init__(self, server: SinkServer, number: int) -> None:
        self._server = server
        self._number = number
        self._loop = server.loop
        self._rtt = server.settings.rtt
        self._session = SinkSession(
            server.settings, server.counters, tls_available=server.ssl_context is not None
        )
        self._transport: asyncio.Transport | None = None
        # (when due, when received, replies, what follows them), oldest first
        self._queue: collections.deque[tuple[float, float, bytes, End | None]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._eof = False  # the client has stopped writing: close once all is answered

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        server = self._server
        server.opened(self)
        now = self._loop.time()
        self._answer(self._session.greeting(), None, server.settings.greeting_delay, now)

    def data_received(self, data: bytes) -> None:
        now = self._loop.time()
        session = self._session
        replies = session.receive(data)
        if replies:
            end = session.end
            if end is End.STARTTLS and self._transport is not None:
                self._transport.pause_reading()  # the next bytes are the handshake
            self._answer(replies, end, self._rtt, now)
            self._server.check_bound()

    def eof_received(self) -> bool | None:
        if self._queue:  # answer what it asked for first (it may still read)
            self._eof = True
            return True
        return None  # close now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._transport = None
        self._server.closed(self)

    # ------------------------------------------------------------------ replies

    @property
    def waiting(self) -> bool:
        """Whether replies are still waiting for their time."""
        return bool(self._queue)

    @property
    def last_due(self) -> float:
        """When the last reply waiting is due (loop time); only while :attr:`waiting`."""
        return self._queue[-1][0]

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def flush(self, until: float) -> None:
        """Write now every batch due by ``until`` (loop time), the sink stopping: a
        timer due at the same instant as the stop must not lose its reply."""
        queue = self._queue
        while queue and queue[0][0] <= until:
            _, received, replies, end = queue.popleft()
            self._write(replies, end, received)
            if end is not None:
                queue.clear()

    def _answer(self, replies: bytes, end: End | None, delay: float, received: float) -> None:
        if delay <= 0 and not self._queue:
            self._write(replies, end, received)
            return
        due = received + delay
        self._queue.append((due, received, replies, end))
        if self._timer is None:
            self._timer = self._loop.call_at(due, self._due)

    def _due(self) -> None:
        """Write every batch whose time has come, in the order they were asked for."""
        self._timer = None
        queue = self._queue
        now = self._loop.time()
        while queue and queue[0][0] <= now:
            _, received, replies, end = queue.popleft()
            self._write(replies, end, received)
            if end is not None:
                queue.clear()
        if queue:
            self._timer = self._loop.call_at(queue[0][0], self._due)
        elif self._eof and self._transport is not None:
            self._transport.close()

    def _write(self, replies: bytes, end: End | None, received: float) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(replies)
        server = self._server
        server.counters.round_trips += 1
        if server.on_batch is not None:
            server.on_batch(Batch(self._number, received, self._loop.time(), replies))
        if end is End.CLOSE:
            transport.close()
        elif end is End.STARTTLS:
            server.spawn(self._start_tls(transport))

    async def _start_tls(self, transport: asyncio.Transport) -> None:
        context = self._server.ssl_context
        assert context is not None
        try:
            upgraded = await self._loop.start_tls(
                transport, self, context, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
            )
        except (OSError, ssl.SSLError, ConnectionError, TimeoutError):
            transport.abort()
            return
        if upgraded is None:  # the connection was closed during the handshake
            transport.abort()
            return
        self._transport = upgraded
        self._session.tls_started()


class SinkServer:
    """The sink on ``host``:``port`` (port 0: one the kernel picks; see :attr:`port`).

    ``max_messages``: :attr:`done` is set once that many messages were accepted (the
    caller then stops the sink; messages already under way are still answered).
    ``ssl_context``: STARTTLS is offered with it. ``on_batch``: called with each
    :class:`Batch` as it is written."""

    def __init__(
        self,
        settings: SinkSettings | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        max_messages: int | None = None,
        on_batch: Callable[[Batch], None] | None = None,
    ) -> None:
        self.settings = settings if settings is not None else SinkSettings()
        self.host = host
        self.ssl_context = ssl_context
        self.max_messages = max_messages
        self.on_batch = on_batch
        self.counters = Counters()
        self._requested_port = port
        self._server: asyncio.Server | None = None
        self._connections: set[_SinkProtocol] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the sink is not started"
        return self._loop

    @property
    def done(self) -> asyncio.Event:
        """Set once ``max_messages`` messages were accepted."""
        assert self._done is not None, "the sink is not started"
        return self._done

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the sink listens: (address, port) for each socket."""
        assert self._server is not None, "the sink is not started"
        return [sock.getsockname()[:2] for sock in self._server.sockets]

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    async def start(self) -> None:
        """Listen; raises OSError when the address cannot be bound."""
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        numbers = itertools.count(1)
        self._server = await self._loop.create_server(
            lambda: _SinkProtocol(self, next(numbers)),
            self.host,
            self._requested_port,
            backlog=BACKLOG,
        )

    async def stop(self, *, drain: float = 0.0) -> None:
        """Stop listening; wait up to ``drain`` seconds for replies still waiting for
        their time (the last messages' answers); then close every connection."""
        if self._server is None:
            return
        self._server.close()
        # the replies already asked for are due within one delay of now: wait for them
        # once (connections still sending will not be answered past this)
        loop = self.loop
        until = loop.time() + drain
        due = max((c.last_due for c in self._connections if c.waiting), default=None)
        if due is not None:
            await asyncio.sleep(min(drain, max(0.0, due - loop.time())))
        for connection in list(self._connections):
            connection.flush(until)  # timers are coarse (uvloop: 1 ms): no reply lost
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ from connections

    def opened(self, connection: _SinkProtocol) -> None:
        counters = self.counters
        counters.connections += 1
        counters.open += 1
        counters.peak_open = max(counters.peak_open, counters.open)
        self._connections.add(connection)

    def closed(self, connection: _SinkProtocol) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self.counters.open -= 1

    def check_bound(self) -> None:
        if self.max_messages is not None and self.counters.messages >= self.max_messages:
            self.done.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
