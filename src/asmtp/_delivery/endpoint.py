"""Where and how a session connects: :class:`Endpoint` (a relay, or one MX host: its
addresses or Unix socket, TLS mode and context, EHLO name, credentials, proxy, CHUNKING,
LMTP), built once per send and shared by all its sessions, and what that needs: the
default TLS context and EHLO name (each made once per process), a context presenting a
client certificate, resolving a password that is a function (an OAuth token source),
and :class:`AuthCache`, the run's memory of what the relay said of the credentials, so
that a refused password is not sent again.

Nothing here speaks SMTP: the session (:mod:`asmtp._delivery.session`) does, with what
an endpoint holds.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field

import anyio
import anyio.to_thread

from .._core.steps import Await, Steps
from ..config import Password, Proxy, Relay, TLSMode, as_proxy
from ..errors import AuthenticationError, InputError
from ..results import TLSState

__all__ = [
    "AuthCache",
    "Endpoint",
    "client_cert_context",
    "default_helo",
    "default_ssl_context",
    "resolve_password",
    "tls_state_of",
    "token_digest",
]

_default_context: ssl.SSLContext | None = None
_fqdn: str | None = None


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store with host name checks, built once per process (honours
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` as OpenSSL does)."""
    global _default_context
    if _default_context is None:
        _default_context = ssl.create_default_context()
    return _default_context


def client_cert_context(cert: str, key: str | None = None) -> ssl.SSLContext:
    """The default context (the system trust store, host names checked) presenting the
    client certificate of the PEM file ``cert`` (its key there too, or in ``key``).
    Reads files: run it off the event loop. A file that cannot be read, a key that does
    not match, or one with a passphrase is an :class:`~asmtp.errors.InputError` (never
    a passphrase prompt on the terminal)."""
    context = ssl.create_default_context()
    files = repr(cert) + (f" and {key!r}" if key is not None else "")
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _PassphraseNeeded:
        raise InputError(
            f"client_cert: the key in {files} has a passphrase; load it into an "
            "ssl_context of your own (load_cert_chain(..., password=...))"
        ) from None
    except ssl.SSLError:
        raise InputError(
            f"client_cert: {files} do not hold a PEM certificate and its matching key"
        ) from None
    except OSError as exc:
        raise InputError(f"client_cert: cannot read {files}: {exc.strerror or exc}") from None
    return context


class _PassphraseNeeded(Exception):
    pass


def _no_passphrase() -> str:
    raise _PassphraseNeeded


async def default_helo() -> str:
    """The machine's fully qualified name for EHLO, looked up once in a worker thread
    (``getfqdn`` may block on DNS) and never on the event loop."""
    global _fqdn
    if _fqdn is None:
        name = await anyio.to_thread.run_sync(socket.getfqdn)
        ok = name and "." in name and all(c.isalnum() or c in "-." for c in name)
        _fqdn = name if ok else "localhost.localdomain"
    return _fqdn


async def resolve_password(password: Password | None) -> str:
    """The password to send: ``password`` itself, or what the password function
    returns (awaited when it is a coroutine function)."""
    if password is None:
        return ""
    if isinstance(password, str):
        return password
    value = password()
    if inspect.isawaitable(value):
        value = await value
    if not isinstance(value, str):
        raise InputError("the password function must return a string")
    return value


def tls_state_of(context: ssl.SSLContext) -> TLSState:
    """What a result says of a connection under ``context``: verified or not (or
    what a context checking the certificate its own way says, e.g. DANE's)."""
    own: TLSState | None = getattr(context, "tls_state", None)
    if own is not None:
        return own
    verified = context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    return "verified" if verified else "unverified"


_NOT_AGAIN = " (not tried again this run: the relay refused these credentials)"


class AuthCache:
    """What the relay said of an endpoint's credentials in this run: one cache per
    :class:`Endpoint`, so shared by the sessions of one ``sendmail``/``send`` call or
    one :class:`~asmtp.Mailer` (Postfix's SASL auth cache is the model). Accounts get
    locked for repeated failed logins; a run must not knock once per session and retry.

    * Until an AUTH has succeeded in the run, one session at a time sends AUTH and the
      others wait for its verdict: a wrong password costs one attempt, not one per
      session. Once one has succeeded, sessions authenticate side by side.
    * A 5xx to AUTH (``535 5.7.8``) is the relay's verdict on the credentials: every
      later session of the run fails at once with the same result, sending no AUTH
      (a new session does not even connect), and :class:`~asmtp.Retry` does not retry
      it. A 4xx (``454 4.7.0``) says nothing of the credentials: a transient failure,
      backed off and retried like any other.
    * A password function (an OAuth token source): a refused token is never sent again
      in the run; the session that got the refusal asks the function once more and
      tries a different token once on the same connection (RFC 4954 4 allows a new
      AUTH after a failure). Two different tokens refused with no success between end
      AUTH for the run, so a function whose tokens the relay refuses cannot knock for
      ever. Tokens are kept only as SHA-256 digests.

    The run is the cache's lifetime: a new ``sendmail`` call or a new ``Mailer`` asks
    the relay again.
    """

    __slots__ = ("_event", "_last", "_probing", "_strikes", "_tokens", "_verdict", "proven")

    def __init__(self) -> None:
        #: an AUTH succeeded in this run (since the last refusal)
        self.proven = False
        self._probing = False  # a session's AUTH is in flight and the others wait for it
        self._event: anyio.Event | None = None  # set when that AUTH ends
        self._verdict: tuple[int, str, str | None] | None = None  # the run's refusal
        self._last: tuple[int, str, str | None] | None = None  # the latest refusal
        self._tokens: deque[bytes] | None = None  # digests of refused tokens, made on need
        self._strikes = 0  # different tokens refused since the last success

    def refusal(self) -> AuthenticationError | None:
        """The error every session of the run now fails with, if the relay refused
        the credentials for good."""
        return None if self._verdict is None else _auth_refused(*self._verdict)

    def turn(self, patience: float) -> Steps[bool]:
        """Wait while another session's AUTH is in flight and none has succeeded yet
        (at most ``patience`` seconds: then go ahead regardless). True when this
        session's AUTH is the one the others wait for: it must call :meth:`end`."""
        until = time.monotonic() + patience
        while True:
            refused = self.refusal()
            if refused is not None:
                raise refused
            if self.proven:
                return False
            if not self._probing:
                self._probing = True
                return True
            left = until - time.monotonic()
            if left <= 0:
                return False
            yield Await(functools.partial(self._wait, left))

    async def _wait(self, seconds: float) -> None:
        if not self._probing:
            return  # ended between the check and this task's turn
        if self._event is None:
            self._event = anyio.Event()  # made here: anyio needs a task to make one
        with anyio.move_on_after(seconds):
            await self._event.wait()

    def end(self) -> None:
        """The AUTH the others waited for is over (whatever its outcome)."""
        self._probing = False
        event, self._event = self._event, None
        if event is not None:
            event.set()

    def accept(self) -> None:
        self.proven = True
        self._strikes = 0

    def refuse(self, error: AuthenticationError, token: bytes | None) -> AuthenticationError:
        """Record a 5xx to AUTH (``token``: the digest of a password function's token,
        None for a fixed password) and return the error for the session that got it."""
        self.proven = False
        self._last = (error.code, error.text, error.enhanced_status)
        if token is None:
            self._verdict = self._last
        else:
            if self._tokens is None:
                self._tokens = deque(maxlen=4)
            if token not in self._tokens:
                self._tokens.append(token)
                self._strikes += 1
            if self._strikes >= 2:
                self._verdict = self._last
        return _auth_refused(*self._last)

    @property
    def final(self) -> bool:
        """The relay refused for good: no session of the run sends AUTH again."""
        return self._verdict is not None

    def token_refused(self, token: bytes) -> AuthenticationError | None:
        """The error when a password function's ``token`` was refused before."""
        if self._last is None or self._tokens is None or token not in self._tokens:
            return None
        return _auth_refused(*self._last)


def _auth_refused(code: int, text: str, enhanced: str | None) -> AuthenticationError:
    error = AuthenticationError(code, text, enhanced_status=enhanced)
    error.message += _NOT_AGAIN
    error.args = (error.message,)
    return error


def token_digest(token: str) -> bytes:
    """What :class:`AuthCache` keeps of a password function's token: its SHA-256."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how a session connects: a relay, or one MX host. Built once per
    send (TLS context made, host name resolved) and shared by all its sessions."""

    host: str
    port: int
    helo: str
    tls: TLSMode
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    addresses: tuple[str, ...] = ()
    username: str | None = None
    password: Password | None = field(default=None, repr=False)
    auth_mechanism: str | None = None
    allow_plaintext_auth: bool = False
    source_address: str | None = None
    #: connect through this proxy (which resolves ``host``: no local lookup then)
    proxy: Proxy | None = None
    #: BDAT (RFC 3030) when the server offers CHUNKING (``Relay(chunking=...)``)
    chunking: bool = True
    #: the server speaks LMTP (RFC 2033): LHLO, and a reply per recipient after the data
    lmtp: bool = False
    #: connect to this Unix-domain socket (``host`` then only names the server)
    path: str | None = None
    #: the relay's verdict on the credentials, shared by every session to this endpoint
    auth_cache: AuthCache = field(default_factory=AuthCache, repr=False, compare=False)

    @classmethod
    async def for_relay(
        cls, relay: Relay, *, helo: str | None = None, resolve: bool = True
    ) -> Endpoint:
        """The endpoint of ``relay``; ``resolve=False`` skips looking up its addresses
        (a session on a socket the caller connected, or on a Unix socket, needs none).
        A client certificate is loaded here, once per send (a renewed one is picked up
        by the next)."""
        tls = relay.tls_mode
        context = None
        if relay.client_cert is not None:
            cert = os.fspath(relay.client_cert)
            key = None if relay.client_key is None else os.fspath(relay.client_key)
            context = await anyio.to_thread.run_sync(client_cert_context, cert, key)
        elif tls != "none":
            context = relay.ssl_context or default_ssl_context()
        path = None if relay.path is None else os.fspath(relay.path)
        return cls(
            host=relay.host,
            port=relay.port,
            helo=relay.helo or helo or await default_helo(),
            tls=tls,
            ssl_context=context,
            addresses=await _addresses(relay.host, relay.port)
            if resolve and relay.proxy is None and path is None
            else (),
            username=relay.username,
            password=relay.password,
            auth_mechanism=relay.auth_mechanism,
            allow_plaintext_auth=relay.allow_plaintext_auth,
            source_address=relay.source_address,
            proxy=as_proxy(relay.proxy),
            chunking=relay.chunking,
            lmtp=relay.lmtp,
            path=path,
        )


async def _addresses(host: str, port: int) -> tuple[str, ...]:
    """Resolve the relay's name once per send, not once per connection. A failure is
    left for each connection to report (as a transient connect error)."""
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
        return (host,)
    except OSError:
        pass
    try:
        infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return ()
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return tuple(seen)
