"""The asyncio driver: one TCP (and TLS) connection feeding a sans-IO
:class:`~asmtp._core.protocol.ClientProtocol`.

Owns talking to the network on asyncio (uvloop included): connecting, reading through
:class:`asyncio.BufferedProtocol` into one buffer shared by all of a thread's
connections (the fast path: no fresh buffer per read or per connection), writing with
flow control, STARTTLS through ``loop.start_tls``, and the per-step timeout (one timer
per connection, re-armed lazily, never one per step). OS and SSL exceptions become
:mod:`asmtp.errors` through the map both drivers share, :mod:`asmtp._io.exceptions`.
A connection through a proxy, or on a socket the caller connected, starts from that
socket (:mod:`asmtp._io.proxy` opens the tunnel) and is the same connection from there;
so is one to a Unix-domain socket (``loop.create_unix_connection``).

Writing keeps memory bounded: a big message stays views of the caller's bytes, handed
to the transport a :data:`~asmtp._core.steps.WRITE_BLOCK` at a time as the kernel takes
them (:meth:`Connection._write`). A session's steps (:mod:`asmtp._core.steps`) run from
the read callback: each reply parsed in ``buffer_updated`` and the next command written
there and then, so a whole session wakes its task only when it ends or asks for something
awaited. Running steps (:meth:`Connection.run`) is the only way to talk over a connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any, Final, TypeVar, cast

from .._core.protocol import ClientProtocol
from .._core.reply import NEED_DATA
from .._core.steps import WRITE_BLOCK, Await, Command, Data, Receive, Send, Steps
from ..errors import ConnectionLostError, SMTPError, SMTPTimeoutError, Stage
from .connect import ConnectOptions, connecting_to, named, peer_of, tls_name_of, unix_path_of
from .exceptions import (
    connection_closed,
    lost_while_sending,
    step_timed_out,
    translate,
    translate_errors,
)
from .proxy import open_tunnel_socket

__all__ = ["Connection", "open_connection"]

T = TypeVar("T")

_READ_BUFFER: Final = 16384  # replies are small
# Over TLS, how soon to ask again whether the socket's transport has handed the last
# encrypted bytes to the kernel (doubling each time, up to the second figure).
_POLL_FIRST, _POLL_MOST = 0.001, 0.1
_per_thread: Final = threading.local()


def _read_buffer() -> memoryview:
    """The read buffer of this thread's connections: one, shared. Each read is handed
    to ``buffer_updated``, which copies it into the reply parser at once, before the
    event loop can run any other callback, so no two reads ever overlap in it."""
    try:
        view: memoryview = _per_thread.view
    except AttributeError:
        view = _per_thread.view = memoryview(bytearray(_READ_BUFFER))
    return view


# What running steps wait for, between callbacks: nothing, a reply, the kernel to take all.
_IDLE: Final = 0
_REPLY: Final = 1
_DRAIN: Final = 2
#: resolves the task's waiter when the steps have ended (their value: ``Connection._value``)
_FINISHED: Final = object()
#: the write queue of a connection until something must wait (never written: _write)
_NO_QUEUE: Final[deque[memoryview]] = deque()


class _Nothing:
    """Awaited, over at once (a close with nothing to wait for)."""

    def __await__(self) -> Generator[Any, None, None]:
        return iter(())  # type: ignore[return-value]  # an iterator is what await takes


_NOTHING: Final = _Nothing()


class Connection(asyncio.BufferedProtocol):
    """One connection to an SMTP server. Sessions hand it their steps (:meth:`run`),
    the TLS handshake (:meth:`start_tls`) and the deadline of a step they await
    themselves (:meth:`step`).

    Timeouts are per network step: :meth:`step` sets the deadline for the next command
    and its whole reply. A single timer per connection enforces it: brought forward
    only for a step shorter than the time it has left, moved on only when it fires
    early, so a fast session with even timeouts costs one timer in all.
    """

    _send: Callable[[Any], Any]  # the steps' send(), looked up once a run (set by run)

    __slots__ = (
        "_close_waiter",
        "_deadline",
        "_inbox",
        "_loop",
        "_lost",
        "_lost_exc",
        "_paused",
        "_poll",
        "_queue",
        "_raw",
        "_send",
        "_steps",
        "_task",
        "_timed_out",
        "_timeout",
        "_timer",
        "_timer_at",
        "_transport",
        "_value",
        "_view",
        "_waiter",
        "_wants",
        "host",
        "proto",
    )

    def __init__(
        self,
        proto: ClientProtocol,
        *,
        host: str,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.proto = proto
        self.host = host
        # Asking for the running loop costs a system call on 3.11: callers pass theirs.
        self._loop = loop or asyncio.get_running_loop()
        self._view = _read_buffer()
        self._inbox = proto.inbox
        self._transport: asyncio.Transport | None = None
        self._raw: asyncio.Transport | None = None  # the TCP transport under TLS
        self._queue = _NO_QUEUE  # what waits for the kernel to take more (see _write)
        self._poll: asyncio.TimerHandle | None = None  # see _unsent
        self._waiter: asyncio.Future[Any] | None = None
        self._lost = False
        self._lost_exc: BaseException | None = None
        self._paused = False
        self._close_waiter: asyncio.Future[None] | None = None
        self._deadline = float("inf")
        self._timeout: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # when the timer fires
        self._task: asyncio.Task[object] | None = None  # cancelled on timeout in connect/TLS
        self._timed_out = False
        self._steps: Steps[Any] | None = None  # the steps being run, if any
        self._value: Any = None  # what they returned
        self._wants = _IDLE  # what they wait for

    def __call__(self) -> Connection:
        """Itself: the protocol factory of ``loop.create_connection`` (no closure)."""
        return self

    # -- asyncio.BufferedProtocol callbacks ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; same interface.
        self._transport = cast(asyncio.Transport, transport)
        self._exact_flow_control()

    def _exact_flow_control(self, *, tls: bool = False) -> None:
        # Pause once anything stays queued, resume once all of it went to the kernel: a
        # drained Send tells when the end-of-data dot has really left. A socket's transport
        # pauses above `high`; the TLS layer at `high` and above (0 would flip every call).
        assert self._transport is not None
        self._transport.set_write_buffer_limits(high=1 if tls else 0, low=0)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self._inbox += self._view[:nbytes]  # proto.receive_data, without the calls
        # Else the bytes wait for the step that asks (a server may answer early).
        if self._wants == _REPLY:
            self._on_reply()

    def eof_received(self) -> bool:
        self.proto.receive_data(b"")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._lost_exc = exc
            self.proto.receive_data(b"")
        # Each call only when it has something to do: every connection ends here.
        if self._queue or self._poll is not None:
            self._drop_queue()
        if self._wants != _IDLE:
            self._wake()
        waiter = self._close_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._timer is not None:
            self._cancel_timer()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._queue:
            # The kernel took all that was handed over: progress, so the step's timeout
            # starts again (a timeout per data block, RFC 5321 4.5.3.2); the next blocks go.
            self.step(self._timeout)
            self._feed()
        if self._wants == _DRAIN and not self._unsent():
            self._sent()

    def _sent(self) -> None:
        """All that was written has gone to the kernel: the drained Send is over."""
        self._wants = _IDLE
        self._advance(None, None)

    def _unsent(self) -> bool:
        """Is anything written not yet taken by the kernel? Over TLS the TLS layer says
        when it has handed everything to the socket's transport, but nothing says when
        that one has passed it on: then ask it again shortly (only while the kernel
        lags, as when a server reads slowly)."""
        if self._paused or self._queue:
            return True
        raw = self._raw
        if raw is None or not raw.get_write_buffer_size():
            return False
        if self._poll is None:
            self._poll = self._loop.call_later(_POLL_FIRST, self._on_poll, _POLL_FIRST)
        return True

    def _on_poll(self, delay: float) -> None:
        self._poll = None
        if self._lost or self._wants != _DRAIN:
            return
        raw = self._raw
        if raw is not None and raw.get_write_buffer_size():
            delay = min(2 * delay, _POLL_MOST)
            self._poll = self._loop.call_later(delay, self._on_poll, delay)
        elif not self._paused and not self._queue:
            self._sent()

    def _wake(self) -> None:
        """The stream ended: the steps waiting on the network learn it (steps awaiting
        something else learn it from their next step)."""
        wants = self._wants
        if wants == _REPLY:
            self._on_reply()
        elif wants == _DRAIN:
            self._wants = _IDLE
            self._advance(None, self._lost_while_sending())

    # -- the per-step deadline ----------------------------------------------------

    def step(self, timeout: float | None) -> None:
        """Start a network step that may take ``timeout`` seconds (None: no limit)."""
        self._timeout = timeout
        if timeout is None:
            self._deadline = float("inf")
            return
        deadline = self._deadline = self._loop.time() + timeout
        timer = self._timer
        if timer is None or deadline < self._timer_at:
            if timer is not None:  # it would fire too late for this (shorter) step
                timer.cancel()
                self._timer = None
            if not self._lost:
                self._timer = self._loop.call_at(deadline, self._on_timer)
                self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        if self._lost:
            return
        now = self._loop.time()
        if now < self._deadline:
            if self._deadline != float("inf"):
                self._timer = self._loop.call_at(self._deadline, self._on_timer)
                self._timer_at = self._deadline
            return
        if self._wants != _IDLE:
            self._timed_out = True
            error = self._timeout_error()
            self._wants = _IDLE
            self.abort()
            self._advance(None, error)
            return
        if self._task is None:
            return  # nothing waits on the network (a hook is running): no timeout
        self._timed_out = True
        self._task.cancel()
        self.abort()

    def _timeout_error(self) -> SMTPTimeoutError:
        stage = self.proto.awaiting or "connect"
        if self._wants == _DRAIN:
            doing = "sending (the server stopped reading)"
        else:
            doing = f"awaiting the {stage} reply"
        return step_timed_out(self._timeout, doing, stage)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @contextlib.contextmanager
    def _cancellable(self, stage: Stage) -> Iterator[None]:
        """Let the timer cancel the current task (for connect and the TLS handshake,
        which are coroutines, not replies to wait for)."""
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        try:
            yield
        except asyncio.CancelledError:
            if self._timed_out and task.uncancel() == 0:
                raise step_timed_out(self._timeout, f"during {stage}", stage) from None
            raise
        finally:
            self._task = None

    # -- running a session's steps from the callbacks ------------------------------

    async def run(self, steps: Steps[T]) -> T:
        """Run ``steps`` (see :mod:`asmtp._core.steps`) to their end and return their value.
        Commands, replies and drains are handled in the protocol callbacks; the task
        wakes only at the end, or to await an :class:`~asmtp._core.steps.Await` step."""
        value: Any = None
        error: BaseException | None = None
        self._send = steps.send
        while True:
            waiter = self._waiter = self._loop.create_future()
            self._steps = steps
            try:
                self._advance(value, error)
                outcome = await waiter
            except BaseException:
                # Cancelled (a deadline) or failed: no callback may carry these steps on.
                self._wants = _IDLE
                self._steps = None
                raise
            finally:
                self._waiter = None
            if outcome is _FINISHED:
                self._steps = None
                done: T = self._value
                self._value = None
                return done
            assert isinstance(outcome, Await)
            try:
                value, error = await outcome.call(), None
            except SMTPError as exc:
                value, error = None, exc
            except BaseException:
                self._steps = None
                raise

    def _advance(self, value: Any, error: BaseException | None) -> None:
        """Send ``value`` (or throw ``error``) into the steps and take the steps they
        ask for until one has to wait. Called from the task and from callbacks: never
        raises; the end, an Await or a failure resolves the task's waiter."""
        steps = self._steps
        waiter = self._waiter
        if steps is None or waiter is None or waiter.done():
            return
        proto = self.proto
        send = self._send
        while True:
            try:
                step = send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                self._steps = None
                self._value = stop.value
                waiter.set_result(_FINISHED)
                return
            except BaseException as exc:  # the steps gave up: the task raises it
                self._steps = None
                waiter.set_exception(exc)
                return
            value = error = None
            # Fields by position (no descriptor to go through): Receive (timeout,
            # same_step), Command (data, timeout), Send (data, timeout, drain).
            try:
                if type(step) is Receive:
                    # A reply already here (pipelined replies come in one read) ends
                    # the step at once: only one still to come starts the step's clock.
                    value = proto.next_reply()
                    if value is not NEED_DATA:
                        continue
                    if step[1]:  # same_step
                        self._wants = _REPLY
                        return
                    self.step(step[0])
                elif type(step) is Command:
                    self._write(step[0])
                    value = proto.next_reply()
                    if value is not NEED_DATA:
                        continue
                    self.step(step[1])
                elif isinstance(step, Send):
                    self.step(step[1])
                    self._write(step[0])
                    if step[2] and (self._lost or self._unsent()):  # drain
                        if self._lost:
                            raise self._lost_while_sending()
                        self._wants = _DRAIN
                        return
                    continue
                else:
                    waiter.set_result(step)  # an Await: the task runs it
                    return
                self._wants = _REPLY  # a Command or Receive waits for its reply
                return
            except SMTPError as exc:
                value, error = None, exc
            except BaseException as exc:  # a bug: the task raises it, nothing hangs
                self._steps = None
                waiter.set_exception(exc)
                return

    def _on_reply(self) -> None:
        """Bytes (or the end of the stream) arrived while the steps wait for a reply."""
        try:
            reply = self.proto.next_reply()
        except BaseException as exc:  # thrown into the steps (which re-raise a bug)
            self._wants = _IDLE
            self._advance(None, exc)
            return
        if reply is not NEED_DATA:
            self._wants = _IDLE
            self._advance(reply, None)

    def _lost_while_sending(self) -> ConnectionLostError:
        return lost_while_sending(self.proto.awaiting or "message")

    # -- writing ------------------------------------------------------------------

    def _write(self, data: Data) -> None:
        """Write ``data`` (pieces: in order, as if joined). Up to WRITE_BLOCK octets
        go to the transport at once; more is queued as views and handed over a block
        at a time as the kernel takes it (resume_writing)."""
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            raise connection_closed(self.proto.awaiting or "connect")
        queue = self._queue
        if not queue:  # nothing waits: a command, a small message go as they come
            if isinstance(data, bytes):
                if len(data) <= WRITE_BLOCK:
                    transport.write(data)
                    return
            elif sum(map(len, data)) <= WRITE_BLOCK:  # with its pipelined QUIT: one write
                transport.write(b"".join(data))
                return
            if queue is _NO_QUEUE:  # the first write that must wait: a queue of its own
                queue = self._queue = deque()
        if isinstance(data, bytes):
            queue.append(memoryview(data))
        else:
            queue.extend(map(memoryview, data))
        self._feed()

    def _feed(self) -> None:
        """Hand queued blocks to the transport while the kernel takes all of them: the
        first one it does not take in full pauses writing until it has (resume_writing)."""
        queue = self._queue
        transport = self._transport
        assert transport is not None
        while queue and not self._paused:
            if transport.is_closing():  # broken while writing: connection_lost follows
                self._drop_queue()
                return
            piece = queue[0]
            if len(piece) > WRITE_BLOCK:
                queue[0] = piece[WRITE_BLOCK:]
                piece = piece[:WRITE_BLOCK]
            else:
                queue.popleft()
            transport.write(piece)

    def _drop_queue(self) -> None:
        self._queue.clear()
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """Run the TLS handshake on this connection (after STARTTLS's 220)."""
        with translate_errors("starttls", self.host), self._cancellable("starttls"):
            await self._handshake(context, server_hostname)
        self.proto.tls_started()

    async def _handshake(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        # Implicit TLS too. The TCP transport under TLS stays known: its write limits are
        # ours, and a drained Send asks it what it still holds.
        transport = self._transport
        assert transport is not None
        new = await self._loop.start_tls(transport, self, context, server_hostname=server_hostname)
        if new is None:  # pragma: no cover - only when the transport closed meanwhile
            raise ConnectionLostError("connection closed during the TLS handshake")
        self._raw, self._transport = transport, new
        self._exact_flow_control(tls=True)

    @property
    def closed(self) -> bool:
        """The connection is gone (closed by either side, or broken)."""
        transport = self._transport
        return self._lost or transport is None or transport.is_closing()

    @property
    def reset_by_peer(self) -> bool:
        """The server reset the connection (TCP RST): it closed with bytes of ours
        still unread, so it cannot have read everything sent so far."""
        return isinstance(self._lost_exc, ConnectionResetError)

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use ("TLSv1.3"), or None in plaintext."""
        obj = self._transport.get_extra_info("ssl_object") if self._transport else None
        return obj.version() if obj is not None else None

    @property
    def peer(self) -> str | None:
        """The server's IP address (a Unix socket's path)."""
        info = self._transport.get_extra_info("peername") if self._transport else None
        if isinstance(info, str):
            return info or None
        return str(info[0]) if info else None

    def aclose(self, timeout: float = 1.0) -> Awaitable[None]:
        """Close and, over TLS, wait (at most ``timeout``) until the close_notify
        exchange is over and the socket is really closed, so that nothing is left
        behind when the event loop ends right after a send. In plaintext nothing is
        left to wait for: no coroutine is made."""
        self.close()
        if self._lost or not self.proto.tls:
            return _NOTHING
        return self._closed(timeout)

    async def _closed(self, timeout: float) -> None:
        waiter = self._close_waiter = self._loop.create_future()
        handle = self._loop.call_later(timeout, self.abort)
        try:
            await waiter
        finally:
            handle.cancel()
            self._close_waiter = None

    def close(self) -> None:
        if self._timer is not None:
            self._cancel_timer()
        if self._queue or self._poll is not None:
            self._drop_queue()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def abort(self) -> None:
        self._cancel_timer()
        self._drop_queue()
        if self._transport is not None:
            self._transport.abort()


async def open_connection(
    proto: ClientProtocol,
    host: str,
    port: int,
    options: ConnectOptions,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
) -> Connection:
    """Connect to ``host`` (or to ``address``) and return the connection; the options
    (implicit TLS, a proxy, the caller's socket...) are
    :class:`~asmtp._io.connect.ConnectOptions`, passed as the mapping they are (no
    keyword arguments packed and unpacked per connection). ``timeout`` covers the
    connect, the implicit TLS handshake and, once the caller reads it, the greeting."""
    loop = loop or asyncio.get_running_loop()
    timeout, proxy, sock = options.get("timeout"), options.get("proxy"), options.get("sock")
    source_address, path = options.get("source_address"), unix_path_of(options)
    conn = Connection(proto, host=host, loop=loop)
    conn.step(timeout)
    conn._task = asyncio.current_task(loop)  # the timer cancels it on timeout
    try:
        if sock is None and proxy is not None:
            sock = await open_tunnel_socket(
                proxy,
                peer_of(host, options),
                port,
                source_address=source_address,
                timeout=timeout,
                loop=loop,
            )
        if sock is not None:
            await loop.create_connection(conn, sock=sock)
        elif path is not None:
            await loop.create_unix_connection(conn, path)
        else:
            local = (source_address, 0) if source_address else None
            peer = peer_of(host, options)
            await loop.create_connection(conn, peer, port, local_addr=local)
        ssl_context = options.get("ssl_context")
        if ssl_context is not None:
            await conn._handshake(ssl_context, tls_name_of(host, options))
    except BaseException as exc:
        # Inline rather than _cancellable and translate_errors: once per connection.
        conn.abort()
        if sock is not None and conn._transport is None:
            sock.close()  # a tunnel, or the caller's socket, no transport took over
        if isinstance(exc, asyncio.CancelledError):
            task = conn._task
            if conn._timed_out and task is not None and task.uncancel() == 0:
                doing = connecting_to(named(host, options), proxy)
                raise step_timed_out(timeout, doing, "connect") from None
            raise
        error = translate(exc, "connect", named(host, options))
        if error is None:
            raise
        raise error from error.__cause__
    finally:
        conn._task = None
    return conn
