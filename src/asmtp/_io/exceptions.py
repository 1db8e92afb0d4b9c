"""The one map from the network's exceptions to asmtp's, for both drivers.

Owns every rule by which an OS, SSL or anyio exception becomes an :mod:`asmtp.errors`
one (STYLE example 5: callers never see a raw ``OSError``, ``ssl.SSLError`` or
``anyio.BrokenResourceError``), and the errors the drivers raise of their own accord
(a step's timeout, a write on a closed connection). The asyncio driver
(:mod:`asmtp._io.asyncio_driver`) and the anyio driver (:mod:`asmtp._io.anyio_driver`)
both translate through :func:`translate`; neither keeps a map of its own, so the two
cannot drift apart. Opening a tunnel through a proxy (:mod:`asmtp._io.proxy`) translates
here too (``proxy=``): python-socks' errors and the OS's while talking to the proxy
become errors of the "connect" stage that name the proxy by its label, never with its
credentials.

The asmtp error keeps the exception it translates as its ``__cause__``, as ``raise ...
from exc`` would: the anyio driver reads it to tell a connection the server reset. So
this module stays Python: mypyc-compiled code keeps ``exc`` as ``__context__`` only
(see ``hatch_build.py``; it is not in ``COMPILED``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio

from ..errors import (
    CertificateError,
    ConnectError,
    ConnectionLostError,
    SMTPError,
    SMTPTimeoutError,
    Stage,
    TLSError,
)

if TYPE_CHECKING:
    from ..config import Proxy

__all__ = [
    "connection_closed",
    "lost_while_sending",
    "step_timed_out",
    "translate",
    "translate_errors",
    "tunnel_refused",
]

# anyio's word for a stream that broke, was closed, or that the server ended.
_STREAM_LOST = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream)


def translate(
    exc: BaseException,
    stage: Stage,
    host: str,
    *,
    timeout: float | None = None,
    doing: str = "",
    proxy: Proxy | None = None,
) -> SMTPError | None:
    """The asmtp error for ``exc``, raised at ``stage`` talking to ``host``, with the
    exception it stands for as its ``__cause__``; None for an exception that is none
    of the network's (an asmtp error already, a bug, a cancellation): it goes on as it is.

    ``proxy``: ``exc`` was raised while opening a tunnel to ``host`` through that proxy
    (python-socks' errors included); the message names the proxy by its label.

    ``timeout`` and ``doing`` describe the network step under way, for a driver whose
    deadline raises :class:`TimeoutError` (anyio's ``fail_at``): that becomes "timed
    out after 1 s awaiting the ehlo reply". A TimeoutError from the kernel (ETIMEDOUT,
    it has an ``errno``) is the host's fault, not the step's.

    >>> translate(ConnectionRefusedError(111, "refused"), "connect", "mx.example.org")
    ConnectError('connection to mx.example.org refused')
    >>> translate(TimeoutError(), "ehlo", "mx", timeout=1, doing="awaiting the ehlo reply")
    SMTPTimeoutError('timed out after 1 s awaiting the ehlo reply')
    """
    if isinstance(exc, SMTPError) or not isinstance(exc, Exception):
        return None
    cause: BaseException | None = exc
    if isinstance(exc, TimeoutError) and exc.errno is None and timeout is not None:
        error: SMTPError = step_timed_out(timeout, doing, stage)
        cause = None  # the deadline's own exception says nothing more
    elif proxy is not None:
        tunnel = _tunnel_error(exc, stage, host, proxy)
        if tunnel is None:
            return None
        error = tunnel
    elif isinstance(exc, _STREAM_LOST):
        error = ConnectionLostError(
            f"connection to {host} lost during {stage}: {_loss_reason(exc)}", stage=stage
        )
    elif isinstance(exc, OSError):
        cause = exc = _first_attempt(exc)
        error = _os_error(exc, stage, host)
    elif isinstance(exc, EOFError):
        error = ConnectionLostError(f"connection to {host} lost during {stage}: {exc}", stage=stage)
    else:
        return None
    error.__cause__ = cause  # what `raise error from cause` sets
    error.__suppress_context__ = True
    return error


@contextlib.contextmanager
def translate_errors(
    stage: Stage,
    host: str,
    *,
    timeout: float | None = None,
    doing: str = "",
    proxy: Proxy | None = None,
) -> Iterator[None]:
    """Raise what :func:`translate` makes of an exception in the block, if anything."""
    try:
        yield
    except Exception as exc:
        error = translate(exc, stage, host, timeout=timeout, doing=doing, proxy=proxy)
        if error is None:
            raise
        raise error from error.__cause__


def _os_error(exc: OSError, stage: Stage, host: str) -> SMTPError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return CertificateError(
            f"certificate of {host} not trusted: {exc.verify_message or exc}", stage=stage
        )
    if isinstance(exc, ssl.SSLError):
        return TLSError(f"TLS with {host} failed: {exc.reason or exc}", stage=stage)
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve {host}: {exc.strerror}", stage=stage)
    if isinstance(exc, ConnectionRefusedError):
        return ConnectError(f"connection to {host} refused", stage=stage)
    if isinstance(exc, TimeoutError):
        return SMTPTimeoutError(f"timed out during {stage} with {host}", stage=stage)
    if isinstance(exc, ConnectionError):
        return ConnectionLostError(f"connection to {host} lost during {stage}: {exc}", stage=stage)
    return ConnectError(f"cannot connect to {host}: {exc.strerror or exc}", stage=stage)


def _tunnel_error(exc: Exception, stage: Stage, host: str, proxy: Proxy) -> SMTPError | None:
    """What went wrong opening a tunnel to ``host`` through ``proxy``: the proxy could
    not be reached, refused the credentials or the destination, went silent or away."""
    label = proxy.label
    # python-socks is imported only when a SOCKS5 proxy is used: when it is not loaded,
    # none of its exceptions can be under way.
    socks = sys.modules.get("python_socks")
    if socks is not None and isinstance(exc, socks.ProxyConnectionError):
        return ConnectError(f"cannot connect to {label}: {_os_reason(exc)}", stage=stage)
    if isinstance(exc, TimeoutError) and exc.errno is None:  # the library's own deadline
        return SMTPTimeoutError(f"timed out connecting to {host} through {label}", stage=stage)
    if socks is not None and isinstance(exc, socks.ProxyError):
        # SOCKS5 reply codes (RFC 1928 section 6) and RFC 1929's refusal, in words
        return ConnectError(f"cannot connect to {host} through {label}: {exc}", stage=stage)
    if isinstance(exc, OSError):
        if isinstance(exc, socket.gaierror):
            return ConnectError(f"cannot resolve {label}: {exc.strerror}", stage=stage)
        return ConnectError(
            f"cannot connect to {host} through {label}: {_os_reason(exc)}", stage=stage
        )
    if isinstance(exc, (*_STREAM_LOST, EOFError)):
        return ConnectError(
            f"cannot connect to {host} through {label}: the proxy closed the connection",
            stage=stage,
        )
    return None


def _os_reason(exc: OSError) -> str:
    """The OS's words for ``exc``, or for the error it wraps: "Connection refused", not
    asyncio's "Connect call failed ('127.0.0.1', 1)" nor anyio's "All connection
    attempts failed" (python-socks wraps those in its own error in turn)."""
    found: BaseException | None = exc
    for _ in range(8):  # a chain of causes is short; never follow one for ever
        if isinstance(found, BaseExceptionGroup):
            found = found.exceptions[0]
        if found is None:
            break
        if isinstance(found, OSError) and found.errno:
            return os.strerror(found.errno)
        found = found.__cause__
    return str(exc.strerror or exc)


def _first_attempt(exc: OSError) -> OSError:
    """``anyio.connect_tcp`` raises "All connection attempts failed" chained to each
    attempt's own error (refused, unreachable, ...): the first attempt's says what
    went wrong."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    return cause if isinstance(cause, OSError) else exc


def _loss_reason(exc: BaseException) -> str:
    if isinstance(exc, anyio.EndOfStream):
        return "the server closed the connection"
    if isinstance(exc, anyio.ClosedResourceError):
        return "the connection is closed"
    cause = exc.__cause__
    if isinstance(cause, ConnectionResetError):
        return "the server reset the connection"
    return str(cause) if cause is not None else "the connection broke"


# -- the drivers' own errors -------------------------------------------------------


def step_timed_out(timeout: float | None, doing: str, stage: Stage) -> SMTPTimeoutError:
    """A network step took longer than its ``timeout`` (seconds); ``doing`` says what
    it was ("awaiting the ehlo reply", "connecting to mx.example.org")."""
    return SMTPTimeoutError(f"timed out after {timeout:g} s {doing}", stage=stage)


def connection_closed(stage: Stage) -> ConnectionLostError:
    """A write on a connection that is closed already."""
    return ConnectionLostError("the connection is closed", stage=stage)


def lost_while_sending(stage: Stage) -> ConnectionLostError:
    """The connection ended before all that was written went out."""
    return ConnectionLostError("the connection was lost while sending", stage=stage)


def tunnel_refused(host: str, proxy: Proxy, reason: str) -> ConnectError:
    """The proxy answered, but no tunnel to ``host``: ``reason`` in its words
    ("407 Proxy Authentication Required")."""
    return ConnectError(
        f"cannot connect to {host} through {proxy.label}: {reason}", stage="connect"
    )
