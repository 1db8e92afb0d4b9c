"""The anyio driver: one TCP (and TLS) connection over anyio byte streams feeding a
sans-IO :class:`~asmtp._core.protocol.ClientProtocol`, for event loops other than asyncio
(trio).

Owns, for that driver: connecting (``anyio.connect_tcp``, implicit TLS included; or
through a proxy, :mod:`asmtp._io.proxy`; or on a socket the caller connected; or to a
Unix-domain socket, ``anyio.connect_unix``),
STARTTLS (``TLSStream.wrap``), the per-step deadline (one ``anyio.fail_at`` around each
wait), and the buffering that keeps :meth:`StreamConnection.write` synchronous. anyio,
OS and SSL exceptions become :mod:`asmtp.errors` through the map both drivers share,
:mod:`asmtp._io.exceptions`. The interface is that of
:class:`asmtp._io.asyncio_driver.Connection` (see :class:`AnyConnection`), so a session cannot
tell the two drivers apart; :func:`open_best` picks one for the running async library.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, Unpack, cast

import anyio
from anyio.abc import ByteStream, SocketAttribute, SocketStream
from anyio.streams.tls import TLSAttribute, TLSStream

from .._core.protocol import ClientProtocol
from .._core.reply import NEED_DATA, Reply
from .._core.steps import WRITE_BLOCK, Command, Data, Receive, Send, Steps
from ..errors import LocalProtocolError, SMTPError, SMTPTimeoutError, Stage, TransportError
from .asyncio_driver import Connection, open_connection
from .connect import ConnectOptions, connecting_to, named, peer_of, tls_name_of, unix_path_of
from .exceptions import connection_closed, lost_while_sending, translate_errors
from .proxy import open_tunnel_stream

__all__ = [
    "AnyConnection",
    "StreamConnection",
    "loop_clock",
    "open_best",
    "open_stream_connection",
]

_READ_SIZE = 16384  # replies are small

T = TypeVar("T")


class AnyConnection(Protocol):
    """What a session needs from a driver: :class:`~asmtp._io.asyncio_driver.Connection` on
    asyncio, :class:`StreamConnection` elsewhere. Sessions talk through steps
    (:meth:`run`) only; a step they await themselves (the TLS handshake) gets its
    deadline from :meth:`step`."""

    proto: ClientProtocol

    async def run(self, steps: Steps[T]) -> T: ...
    def step(self, timeout: float | None) -> None: ...
    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None: ...
    def aclose(self, timeout: float = 1.0) -> Awaitable[None]: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    @property
    def closed(self) -> bool: ...
    @property
    def reset_by_peer(self) -> bool: ...
    @property
    def peer(self) -> str | None: ...
    @property
    def tls_version(self) -> str | None: ...


class StreamConnection:
    """One connection to an SMTP server over an anyio byte stream, with the interface of
    :class:`~asmtp._io.asyncio_driver.Connection` (:class:`AnyConnection`): :meth:`run` awaits a
    session's steps one by one, through :meth:`read_reply`, :meth:`write` and
    :meth:`drain` (this driver's own building blocks, not part of that interface).

    :meth:`write` only queues bytes: they are sent by the next :meth:`read_reply` or
    :meth:`drain`, which a session always awaits after writing (a command is written,
    then its reply read; the message is written, then drained). That keeps ``write``
    synchronous, as on asyncio, and sends pipelined commands in one piece. What is
    queued stays views of the caller's bytes: up to :data:`~asmtp._core.steps.WRITE_BLOCK`
    octets go in one send, more in sends of a block each, so a session holds at most
    one block of copies (over TLS, one block encrypted) whatever the message's size.

    Timeouts are per network step: :meth:`step` sets the deadline for the next command
    and its whole reply, and every wait until then runs under that one deadline, so a
    server trickling a byte at a time cannot stretch the step.
    """

    def __init__(self, proto: ClientProtocol, stream: ByteStream, *, host: str) -> None:
        self.proto = proto
        self.host = host
        self._stream = stream
        self._outgoing: deque[bytes | memoryview] = deque()
        self._queued = 0  # octets in _outgoing
        self._timeout: float | None = None
        self._deadline = math.inf
        self._closed = False  # by us, or after the server closed, reset or timed out
        self._lost_exc: BaseException | None = None

    # -- the per-step deadline ----------------------------------------------------

    def step(self, timeout: float | None) -> None:
        """Start a network step that may take ``timeout`` seconds (None: no limit)."""
        self._timeout = timeout
        self._deadline = math.inf if timeout is None else anyio.current_time() + timeout

    @contextlib.contextmanager
    def _io(self, stage: Stage, doing: str) -> Iterator[anyio.CancelScope]:
        """One wait within the step's deadline (the scope's, which sending a block of a
        large message moves on); a transport failure or a timeout closes the
        connection (nothing more can be read or sent in order)."""
        try:
            with (
                translate_errors(stage, self.host, timeout=self._timeout, doing=doing),
                anyio.fail_at(self._deadline) as scope,
            ):
                yield scope
        except TransportError as exc:
            if not isinstance(exc, SMTPTimeoutError) and self._lost_exc is None:
                self._lost_exc = exc.__cause__ or exc
            self.abort()
            raise

    # -- driving the protocol -----------------------------------------------------

    async def run(self, steps: Steps[T]) -> T:
        """Run ``steps`` (see :mod:`asmtp._core.steps`) to their end, one awaited step
        after another, and return their value."""
        value: Any = None
        error: SMTPError | None = None
        while True:
            try:
                step = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                return cast(T, stop.value)
            value = error = None
            try:
                if isinstance(step, Command):
                    self.step(step.timeout)
                    self.write(step.data)
                    value = await self.read_reply()
                elif isinstance(step, Receive):
                    if not step.same_step:
                        self.step(step.timeout)
                    value = await self.read_reply()
                elif isinstance(step, Send):
                    self.step(step.timeout)
                    self.write(step.data)
                    if step.drain:
                        await self.drain()
                else:
                    value = await step.call()
            except SMTPError as exc:
                error = exc

    async def read_reply(self) -> Reply:
        """Send what is queued, then wait for the next whole reply, within the current
        step's deadline."""
        proto = self.proto
        stage = proto.awaiting or "connect"
        with self._io(stage, f"awaiting the {stage} reply") as scope:
            await self._send_queued(scope)
            while (reply := proto.next_reply()) is NEED_DATA:
                try:
                    data = await self._stream.receive(_READ_SIZE)
                except anyio.EndOfStream:
                    data = b""  # the core's end of stream: next_reply raises ConnectionLostError
                proto.receive_data(data)
        assert isinstance(reply, Reply)
        return reply

    def write(self, data: Data) -> None:
        """Queue ``data`` (pieces: in order, as if joined) for the next
        :meth:`read_reply` or :meth:`drain` to send."""
        if self._closed:
            raise connection_closed(self.proto.awaiting or "connect")
        if isinstance(data, bytes):
            self._outgoing.append(data)
            self._queued += len(data)
        else:
            self._outgoing.extend(data)
            self._queued += sum(map(len, data))

    async def drain(self) -> None:
        """Send everything written so far; returns once the kernel has taken it all."""
        stage = self.proto.awaiting or "message"
        if self._closed:
            raise lost_while_sending(stage)
        with self._io(stage, "sending") as scope:
            await self._send_queued(scope)

    async def _send_queued(self, scope: anyio.CancelScope) -> None:
        outgoing = self._outgoing
        if self._queued <= WRITE_BLOCK:  # commands, a small message: one send
            if outgoing:
                data = outgoing[0] if len(outgoing) == 1 else b"".join(outgoing)
                outgoing.clear()
                self._queued = 0
                await self._stream.send(data)  # type: ignore[arg-type]  # bytes-like will do
            return
        # A large message: a block per send, each once the kernel took the one before;
        # each block restarts the step's timeout (RFC 5321 4.5.3.2: per data block).
        while outgoing:
            piece = outgoing[0]
            if len(piece) > WRITE_BLOCK:
                view = memoryview(piece)
                outgoing[0], piece = view[WRITE_BLOCK:], view[:WRITE_BLOCK]
            else:
                outgoing.popleft()
            self._queued -= len(piece)
            await self._stream.send(piece)  # type: ignore[arg-type]  # bytes-like will do
            self.step(self._timeout)
            scope.deadline = self._deadline

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """Run the TLS handshake on this connection (after STARTTLS's 220)."""
        with self._io("starttls", "during the TLS handshake") as scope:
            await self._send_queued(scope)
            # server_side must be explicit: wrap() takes a missing hostname to mean server.
            self._stream = await TLSStream.wrap(
                self._stream,
                server_side=False,
                hostname=server_hostname,
                ssl_context=context,
                # SMTP ends with QUIT and its reply, not with TLS's close_notify.
                standard_compatible=False,
            )
        self.proto.tls_started()

    @property
    def closed(self) -> bool:
        """The connection is gone (closed by either side, or broken). Nothing reads
        while a session is idle here, so ask the socket without waiting."""
        if self._closed:
            return True
        raw = self._stream.extra(SocketAttribute.raw_socket, None)
        return not isinstance(raw, socket.socket) or raw.fileno() == -1 or _peer_gone(raw)

    @property
    def reset_by_peer(self) -> bool:
        """The server reset the connection (TCP RST): it closed with bytes of ours
        still unread, so it cannot have read everything sent so far."""
        exc = self._lost_exc
        while exc is not None:
            if isinstance(exc, ConnectionResetError):
                return True
            exc = exc.__cause__
        return False

    @property
    def tls_version(self) -> str | None:
        """The TLS version in use ("TLSv1.3"), or None in plaintext (asked when read)."""
        version: str | None = self._stream.extra(TLSAttribute.tls_version, None)
        return version

    @property
    def peer(self) -> str | None:
        """The server's IP address, or a Unix socket's path (asked when read)."""
        address = self._stream.extra(SocketAttribute.remote_address, None)
        if isinstance(address, str):
            return address or None
        return str(address[0]) if isinstance(address, tuple) else None

    async def aclose(self, timeout: float = 1.0) -> None:
        """Close and, over TLS, first exchange close_notify with the server (waiting at
        most ``timeout``), so nothing is left behind when the event loop ends right
        after a send. The socket is closed whatever happens, cancellation included."""
        try:
            if not self._closed and isinstance(self._stream, TLSStream):
                with (
                    anyio.move_on_after(timeout),
                    contextlib.suppress(
                        anyio.BrokenResourceError,
                        anyio.ClosedResourceError,
                        anyio.EndOfStream,
                        OSError,
                    ),
                ):
                    await self._stream.unwrap()  # a server that has gone is not an error
        finally:
            self._close_socket()

    def close(self) -> None:
        """Close the connection (after QUIT). Synchronous, as on asyncio: the socket is
        closed at once; nothing is queued by then, and TLS ends without close_notify."""
        self._close_socket()

    def abort(self) -> None:
        """Close at once, dropping anything queued."""
        self._outgoing.clear()
        self._queued = 0
        self._close_socket()

    def _close_socket(self) -> None:
        # anyio closes a stream only in an await; the socket under it can be closed now,
        # the documented way: tell the event loop first, then close.
        if not self._closed:
            self._closed = True
            self.proto.receive_data(b"")  # nothing more will come (as on asyncio)
        raw = self._stream.extra(SocketAttribute.raw_socket, None)
        if isinstance(raw, socket.socket) and raw.fileno() != -1:
            anyio.notify_closing(raw)
            raw.close()


def _peer_gone(sock: socket.socket) -> bool:
    """Has the server closed or reset ``sock``? A zero-wait poll for POLLRDHUP (Linux)
    sees its FIN even behind unread bytes (a 421 before closing); elsewhere a peek sees
    it once nothing is left unread."""
    rdhup = getattr(select, "POLLRDHUP", 0)
    if rdhup and hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN | rdhup)
        gone = rdhup | select.POLLHUP | select.POLLERR
        return any(events & gone for _, events in poller.poll(0))
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""  # the socket is non-blocking
    except BlockingIOError:
        return False
    except OSError:
        return True


async def open_stream_connection(
    proto: ClientProtocol, host: str, port: int, **options: Unpack[ConnectOptions]
) -> StreamConnection:
    """Connect to ``host`` (or to ``address``) and return the connection, as
    :func:`asmtp._io.asyncio_driver.open_connection` does, with the same options
    (:class:`~asmtp._io.connect.ConnectOptions`); ``timeout`` covers the connect, the
    implicit TLS handshake and, once the caller reads it, the greeting.

    For event loops other than asyncio (under asyncio, anyio's streams do not sit on a
    socket that can be closed synchronously; :func:`open_best` picks the asyncio driver
    there)."""
    if running_loop() is not None:
        raise LocalProtocolError(
            "open_stream_connection is the driver for trio; use "
            "asmtp._io.asyncio_driver.open_connection (or open_best) under asyncio"
        )
    timeout = options.get("timeout")
    proxy = options.get("proxy")
    deadline = math.inf if timeout is None else anyio.current_time() + timeout
    stream: ByteStream
    where = named(host, options)  # a Unix socket's path, or the host
    with (
        translate_errors("connect", where, timeout=timeout, doing=connecting_to(where, proxy)),
        anyio.fail_at(deadline),
    ):
        ssl_context = options.get("ssl_context")
        unix = unix_path_of(options) is not None
        if options.get("sock") is not None or proxy is not None or unix:
            stream = await _tunnel_or_socket(host, port, options)
        elif ssl_context is None:
            stream = await anyio.connect_tcp(
                peer_of(host, options), port, local_host=options.get("source_address")
            )
        else:
            stream = await anyio.connect_tcp(
                peer_of(host, options),
                port,
                local_host=options.get("source_address"),
                tls=True,
                ssl_context=ssl_context,
                tls_hostname=tls_name_of(host, options),
                tls_standard_compatible=False,
            )
    conn = StreamConnection(proto, stream, host=host)
    conn._timeout, conn._deadline = timeout, deadline  # the greeting shares the connect's step
    return conn


async def _tunnel_or_socket(host: str, port: int, options: ConnectOptions) -> ByteStream:
    """The stream of a tunnel through the proxy, of the caller's socket, or of a Unix
    socket, with the TLS handshake of implicit TLS run on it (end to end: checked
    against the SMTP server's name)."""
    raw: SocketStream
    sock, proxy, path = options.get("sock"), options.get("proxy"), unix_path_of(options)
    if sock is not None:
        try:
            raw = await SocketStream.from_socket(sock)
        except BaseException:
            sock.close()
            raise
    elif path is not None:
        raw = await anyio.connect_unix(path)
    else:
        assert proxy is not None
        raw = await open_tunnel_stream(
            proxy,
            peer_of(host, options),
            port,
            source_address=options.get("source_address"),
            timeout=options.get("timeout"),
        )
    ssl_context = options.get("ssl_context")
    if ssl_context is None:
        return raw
    try:
        return await TLSStream.wrap(
            raw,
            server_side=False,
            hostname=tls_name_of(host, options),
            ssl_context=ssl_context,
            standard_compatible=False,
        )
    except BaseException:
        await anyio.aclose_forcefully(raw)
        raise


def open_best(
    proto: ClientProtocol,
    host: str,
    port: int,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    **options: Unpack[ConnectOptions],
) -> Awaitable[AnyConnection]:
    """Open a connection with the driver for the running async library: the
    ``BufferedProtocol`` one on asyncio (uvloop included), anyio streams elsewhere;
    through a proxy, or on the caller's connected socket, when the options
    (:class:`~asmtp._io.connect.ConnectOptions`) say so. (Not a coroutine itself: it
    hands over the driver's, one coroutine less per connection.) ``loop``: the running
    asyncio loop, when the caller has it (:func:`running_loop`)."""
    if loop is None:
        loop = running_loop()
    if loop is None:
        return open_stream_connection(proto, host, port, **options)
    return open_connection(proto, host, port, options, loop=loop)


if TYPE_CHECKING:  # both drivers offer what a session needs

    def _check(a: Connection, b: StreamConnection) -> tuple[AnyConnection, AnyConnection]:
        return a, b


def loop_clock(loop: asyncio.AbstractEventLoop | None = None) -> Callable[[], float]:
    """The running event loop's clock (what :func:`anyio.current_time` reads), as a
    function that also works inside the asyncio driver's callbacks, where no task
    runs and anyio cannot tell which library is running. ``loop``: the running
    asyncio loop, when the caller has it (:func:`running_loop`)."""
    if loop is None:
        loop = running_loop()
    return anyio.current_time if loop is None else loop.time


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop (uvloop included), where the fast BufferedProtocol
    driver applies; None under anything else (trio goes over anyio). Asked once per
    connection: on Python 3.11 each asking is a getpid() system call."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
