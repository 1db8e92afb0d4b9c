"""Tunnels through a proxy: the TCP connection to an SMTP server opened through a SOCKS5
proxy (RFC 1928, with RFC 1929's user name and password) or an HTTP CONNECT proxy
(RFC 9110 section 9.3.6), for both drivers.

Owns opening the tunnel and nothing after it. The asyncio driver gets a connected
socket, which it hands to ``loop.create_connection(sock=...)``, so its BufferedProtocol
fast path is the same as without a proxy; the anyio driver (trio) gets a socket stream.
STARTTLS and implicit TLS then run end to end through the tunnel, verified against the
SMTP server's name, never the proxy's. A failure becomes an asmtp error of the
"connect" stage through the one map, :func:`asmtp._io.exceptions.translate` with
``proxy=``: messages name the proxy by its label, never with its credentials.

SOCKS5 is python-socks' (the ``proxy`` extra, imported here only when a SOCKS5 proxy is
used), with the proxy resolving host names. HTTP CONNECT is spoken here, in a few
lines, because python-socks reads a CONNECT reply with one unbounded receive: SMTP's
server speaks first, so a greeting relayed right behind the proxy's "200" (in the same
segment, as a proxy that has it buffered sends it) would be swallowed with the reply,
and the session would wait for it until its timeout. This module reads the reply up to
its blank line and not one octet beyond.
"""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import Awaitable, Callable

import anyio
import idna
from anyio.abc import SocketStream

from ..config import Proxy
from ..errors import InputError
from .exceptions import translate_errors, tunnel_refused

__all__ = ["open_tunnel_socket", "open_tunnel_stream"]

#: python-socks takes a deadline of its own (60 s when given none); the driver's
#: deadline, set before, ends the connect first, so the library's only stands in for
#: "no limit" when the driver has none.
_NO_LIMIT = 365 * 86400.0
#: the longest CONNECT reply head read (status line and header fields)
_HEAD_MAX = 16384
_END_OF_HEAD = b"\r\n\r\n"
_PROXY_EXTRA = "pip install 'asmtp[proxy]'"

Send = Callable[[bytes], Awaitable[None]]
Receive = Callable[[int], Awaitable[bytes]]


async def open_tunnel_socket(
    proxy: Proxy,
    host: str,
    port: int,
    *,
    source_address: str | None = None,
    timeout: float | None = None,
    loop: asyncio.AbstractEventLoop,
) -> socket.socket:
    """A non-blocking socket connected to ``host``:``port`` through ``proxy`` (for the
    asyncio driver). The caller's deadline bounds it: it cancels the task."""
    target = _ascii_host(host)
    local = (source_address, 0) if source_address else None
    if proxy.scheme == "socks5":
        try:
            from python_socks import ProxyType
            from python_socks.async_.asyncio import Proxy as SocksProxy
        except ImportError:
            raise InputError(f"a SOCKS5 proxy needs python-socks: {_PROXY_EXTRA}") from None
        client = SocksProxy(
            ProxyType.SOCKS5,
            proxy.host,
            proxy.port,
            proxy.username,
            proxy.password,
            rdns=True,
            loop=loop,
        )
        with translate_errors("connect", host, proxy=proxy):
            sock: socket.socket = await client.connect(
                target, port, timeout=_library_timeout(timeout), local_addr=local
            )
        return sock
    with translate_errors("connect", proxy.label):
        sock = await _tcp_socket(loop, proxy.host, proxy.port, local)
    try:
        with translate_errors("connect", host, proxy=proxy):
            await _http_connect(
                proxy,
                target,
                port,
                lambda data: loop.sock_sendall(sock, data),
                lambda size: loop.sock_recv(sock, size),
            )
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tunnel_stream(
    proxy: Proxy,
    host: str,
    port: int,
    *,
    source_address: str | None = None,
    timeout: float | None = None,
) -> SocketStream:
    """A socket stream connected to ``host``:``port`` through ``proxy`` (for the anyio
    driver). The caller's deadline (a cancel scope) bounds it."""
    target = _ascii_host(host)
    if proxy.scheme == "socks5":
        try:
            from python_socks import ProxyType
            from python_socks.async_.anyio import Proxy as AnyioSocksProxy
        except ImportError:
            raise InputError(f"a SOCKS5 proxy needs python-socks: {_PROXY_EXTRA}") from None
        client = AnyioSocksProxy(
            ProxyType.SOCKS5, proxy.host, proxy.port, proxy.username, proxy.password, rdns=True
        )
        local = {"local_host": source_address} if source_address else {}
        with translate_errors("connect", host, proxy=proxy):
            stream: SocketStream = await client.connect(
                target, port, timeout=_library_timeout(timeout), **local
            )
        return stream
    with translate_errors("connect", proxy.label):
        stream = await anyio.connect_tcp(proxy.host, proxy.port, local_host=source_address)

    async def receive(size: int) -> bytes:
        try:
            return await stream.receive(size)
        except anyio.EndOfStream:
            return b""

    try:
        with translate_errors("connect", host, proxy=proxy):
            await _http_connect(proxy, target, port, stream.send, receive)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise
    return stream


# -- HTTP CONNECT (RFC 9110 section 9.3.6) -------------------------------------------


async def _http_connect(proxy: Proxy, host: str, port: int, send: Send, receive: Receive) -> None:
    """Ask the proxy for a tunnel to ``host``:``port`` and read its reply, up to the
    blank line that ends it and no further: what follows is the SMTP server's.

    Wire sample (credentials in Basic form, RFC 7617)::

        CONNECT smtp.example.com:587 HTTP/1.1
        Host: smtp.example.com:587
        Proxy-Authorization: Basic YW5uOnMzY3JldA==

        HTTP/1.1 200 Connection established

    """
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    request = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
    if proxy.username is not None and proxy.password is not None:
        pair = f"{proxy.username}:{proxy.password}".encode()
        request += f"Proxy-Authorization: Basic {base64.b64encode(pair).decode('ascii')}\r\n"
    await send((request + "\r\n").encode("ascii"))
    head = await _reply_head(receive)
    if head is None:
        raise tunnel_refused(host, proxy, f"the reply is longer than {_HEAD_MAX} octets")
    status = head.partition(b"\r\n")[0].decode("latin-1")
    version, _, rest = status.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or len(code) != 3 or not code.isdigit():
        raise tunnel_refused(host, proxy, f"not an HTTP reply: {status[:80]!r}")
    if not code.startswith("2"):  # any 2xx opens the tunnel
        if code == "407":
            reason += " (credentials refused)" if proxy.username else " (credentials needed)"
        raise tunnel_refused(host, proxy, f"{code} {reason}".strip())


async def _reply_head(receive: Receive) -> bytes | None:
    """The reply's head, through its blank line (None: longer than allowed). Each
    receive asks for no more octets than could end it (4 at most), so none of the
    tunnel's own bytes are taken."""
    head = bytearray()
    while not head.endswith(_END_OF_HEAD):
        if len(head) > _HEAD_MAX:
            return None
        # how much of the blank line the head already ends with (0 to 3 octets)
        have = next(n for n in (3, 2, 1, 0) if head.endswith(_END_OF_HEAD[:n]))
        data = await receive(len(_END_OF_HEAD) - have)
        if not data:
            raise EOFError("the proxy closed the connection")
        head += data
    return bytes(head)


async def _tcp_socket(
    loop: asyncio.AbstractEventLoop, host: str, port: int, local: tuple[str, int] | None
) -> socket.socket:
    """A non-blocking TCP socket connected to ``host``:``port``, each address tried in
    turn (the asyncio driver needs the socket itself, not a transport)."""
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if local is not None:
                sock.bind(local)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


# -- helpers --------------------------------------------------------------------------


def _library_timeout(timeout: float | None) -> float:
    return _NO_LIMIT if timeout is None else timeout


def _ascii_host(host: str) -> str:
    """The name the proxy is asked to connect to, in ASCII (IDNA 2008, UTS 46)."""
    if host.isascii():
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise InputError(f"host name is not valid IDNA: {host!r} ({exc})") from None
