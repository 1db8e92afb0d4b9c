"""How a connection is asked for, the same for both drivers: the options every
``open_*`` function takes (:class:`ConnectOptions`, written once and passed on as they
are) and what the drivers derive from them alike: where the TCP connection goes, the
name a certificate is checked against, and how the connect is named in errors.

Opening the connection is each driver's own: the asyncio driver's fast path
(:func:`asmtp._io.asyncio_driver.open_connection`) and the anyio driver's streams
(:func:`asmtp._io.anyio_driver.open_stream_connection`); the tunnel through a proxy is
:mod:`asmtp._io.proxy`'s.
"""

from __future__ import annotations

import socket
import ssl
from typing import TypedDict

from ..config import Proxy

__all__ = ["ConnectOptions", "connecting_to", "named", "peer_of", "tls_name_of", "unix_path_of"]


class ConnectOptions(TypedDict, total=False):
    """The keywords of :func:`~asmtp._io.anyio_driver.open_best` and of each driver's
    ``open_*`` (all optional; None is the same as not given)."""

    #: the IP address to connect to (a session's endpoint resolved once); default: host
    address: str | None
    #: implicit TLS (RFC 8314): the handshake runs at once, before the greeting
    ssl_context: ssl.SSLContext | None
    #: the name the server's certificate is checked against; default: host
    server_hostname: str | None
    #: the local address to connect from
    source_address: str | None
    #: seconds for the connect, the implicit TLS handshake and, once read, the greeting
    timeout: float | None
    #: connect through this proxy (it is asked for ``address`` or the host)
    proxy: Proxy | None
    #: a socket the caller connected, used instead of connecting (the connection owns
    #: it from then on and closes it)
    sock: socket.socket | None
    #: connect to this Unix-domain socket instead of TCP (``host`` then only names the
    #: server, for TLS); the caller's ``sock`` comes first
    path: str | None


def peer_of(host: str, options: ConnectOptions) -> str:
    """Where the TCP connection (or the proxy's tunnel) goes."""
    return options.get("address") or host


def unix_path_of(options: ConnectOptions) -> str | None:
    """The Unix-domain socket to connect to, if any (not when the caller gave ``sock``)."""
    return options.get("path") if options.get("sock") is None else None


def named(host: str, options: ConnectOptions) -> str:
    """How a connect's errors name the server: the Unix socket's path, or the host."""
    return unix_path_of(options) or host


def tls_name_of(host: str, options: ConnectOptions) -> str:
    """The name implicit TLS checks the server's certificate against."""
    return options.get("server_hostname") or host


def connecting_to(host: str, proxy: Proxy | None) -> str:
    """What a connect that failed or timed out was doing, for its error message (a
    proxy named by its label, never with its credentials)."""
    return f"connecting to {host}" + (f" through {proxy.label}" if proxy is not None else "")
