"""One SMTP session over one connection: connect, greeting, EHLO (HELO fallback),
STARTTLS, AUTH, then any number of mail transactions, then QUIT.

Owns the client's policy over the state machine: which steps to take and in what
order, when to pipeline, which extension a message needs, how each step's
failure is classified, and (:class:`AuthCache`) not asking a relay again for
credentials it refused. The bytes and the rules of the exchange stay in
:mod:`asmtp._core.protocol`; the network stays in :mod:`asmtp._io.asyncio_driver`.

The policy is written as generators of :mod:`asmtp._core.steps` (``greet``,
``transaction_steps``, ``quit_steps``, ``one_shot``...), so the same code runs on both
drivers: from the asyncio driver's read callback, or step by step over anyio streams.
The async methods (:meth:`Session.connect`, :meth:`Session.deliver`...) hand such steps
to the connection's ``run``.

Whoever wants to watch a session (``asmtp bench``'s stage timings; a tracer or a metrics
exporter) passes an observer (:data:`StageObserver`) rather than copying the exchange:
the session calls it as each stage begins, and with ``"idle"`` when a stretch of work
ends (see :class:`Session`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import anyio
import anyio.to_thread

from .._core.message import PreparedMessage
from .._core.protocol import AUTH_CONTINUE, SUCCESS_CODES, ClientProtocol, State
from .._core.reply import Reply
from .._core.sanitize import printable
from .._core.sasl import Mechanism, choose_mechanism, make_mechanism
from .._core.steps import Await, Command, Receive, Send, Steps
from .._io.anyio_driver import AnyConnection, loop_clock, open_best
from ..config import DSN, Password, Proxy, Relay, Timeouts, TLSMode, as_proxy
from ..errors import (
    AuthenticationError,
    AuthUnavailableError,
    ConnectError,
    ConnectionLostError,
    InputError,
    MessageRejectedError,
    ReplyError,
    SMTPError,
    Stage,
    TLSUnavailableError,
)
from ..results import RecipientResult, Status, TLSState, result_from_error

__all__ = [
    "AuthCache",
    "Endpoint",
    "Extras",
    "Session",
    "StageObserver",
    "default_helo",
    "default_ssl_context",
    "enable_debug",
]

logger = logging.getLogger("asmtp")

_default_context: ssl.SSLContext | None = None
_fqdn: str | None = None
_session_ids = 0  # numbers sessions in the transcript, so interleaved ones can be told apart

# Each command's success replies, from the one table in asmtp._core.protocol.
_GREETING_OK = SUCCESS_CODES["greeting"]
_EHLO_OK = SUCCESS_CODES["ehlo"]
_STARTTLS_OK = SUCCESS_CODES["starttls"]
_AUTH_OK = SUCCESS_CODES["auth"]
_MAIL_OK = SUCCESS_CODES["mail"]
_RCPT_OK = SUCCESS_CODES["rcpt"]
_DATA_OK = SUCCESS_CODES["data"]
_BDAT_OK = SUCCESS_CODES["bdat"]
_MESSAGE_OK = SUCCESS_CODES["message"]
_RSET_OK = SUCCESS_CODES["rset"]
_NOOP_OK = SUCCESS_CODES["noop"]

T = TypeVar("T")

StageObserver = Callable[[Stage | Literal["idle"], float], None]
"""``on_stage(stage, at)``: called by a :class:`Session` as a stage begins, with the
session's clock; ``"idle"`` ends the stage before it (see :class:`Session`)."""


def default_ssl_context() -> ssl.SSLContext:
    """The system trust store with host name checks, built once per process (honours
    ``SSL_CERT_FILE`` and ``SSL_CERT_DIR`` as OpenSSL does)."""
    global _default_context
    if _default_context is None:
        _default_context = ssl.create_default_context()
    return _default_context


def enable_debug() -> None:
    """Show the transcript (``debug=True``): the ``asmtp`` logger at DEBUG to stderr,
    unless the application configured handlers of its own."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s asmtp %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


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


def _token_digest(token: str) -> bytes:
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
    #: the relay's verdict on the credentials, shared by every session to this endpoint
    auth_cache: AuthCache = field(default_factory=AuthCache, repr=False, compare=False)

    @classmethod
    async def for_relay(
        cls, relay: Relay, *, helo: str | None = None, resolve: bool = True
    ) -> Endpoint:
        """The endpoint of ``relay``; ``resolve=False`` skips looking up its addresses
        (a session on a socket the caller connected needs none)."""
        tls = relay.tls_mode
        context = None
        if tls != "none":
            context = relay.ssl_context or default_ssl_context()
        return cls(
            host=relay.host,
            port=relay.port,
            helo=relay.helo or helo or await default_helo(),
            tls=tls,
            ssl_context=context,
            addresses=await _addresses(relay.host, relay.port)
            if resolve and relay.proxy is None
            else (),
            username=relay.username,
            password=relay.password,
            auth_mechanism=relay.auth_mechanism,
            allow_plaintext_auth=relay.allow_plaintext_auth,
            source_address=relay.source_address,
            proxy=as_proxy(relay.proxy),
            chunking=relay.chunking,
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


BeforeDot = Callable[[Sequence[str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Extras:
    """What a bulk sender adds to each transaction: DSN requests (used only when the
    server offers DSN) and a hook awaited just before the end-of-data dot is sent,
    with the recipients that will get the message (the journal's pre-dot line)."""

    dsn: DSN | None = None
    before_dot: BeforeDot | None = None


NO_EXTRAS: Extras = Extras()


_NO_REFUSALS: Mapping[str, Reply] = {}


class Session:
    """One SMTP session. Use through :func:`asmtp.connect` or the fan-out calls.

    ``dot_sent`` is True from the moment the end-of-data dot of the current
    transaction (with CHUNKING, its last BDAT chunk) has been written until its reply
    arrives: a failure then leaves the message's fate unknown.

    ``on_stage`` observes the session: it is called ``(stage, at)``, ``at`` from
    ``clock`` (default: the event loop's), as each stage begins: ``"connect"`` (each
    address tried), ``"greeting"`` (connected), ``"ehlo"`` (again after STARTTLS),
    ``"starttls"`` (only when STARTTLS is sent), ``"auth"``, then per transaction
    ``"mail"``, ``"rcpt"``, ``"data"`` (not with BDAT), ``"message"``, and ``"quit"``.
    ``"idle"`` says the stage before it ended: after the set-up, after each
    transaction's last reply and after QUIT's. A stage that fails raises instead (no
    ``"idle"``). Without an observer, each stage costs one ``is not None`` check.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        timeouts: Timeouts,
        *,
        debug: bool = False,
        on_stage: StageObserver | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.on_stage = on_stage
        # Asked only with an observer (the loop's clock costs a system call to find).
        self._clock = clock if clock is not None or on_stage is None else loop_clock()
        self.dot_sent = False
        self.tls: TLSState = "none"
        self.stage: Stage = "connect"
        self._needs_rset = False
        # The current transaction's refused recipients, kept when the transaction then
        # fails: a 550 read before a 421 is that recipient's answer, not the 421.
        self._refused: dict[str, Reply] = {}
        self._conn: AnyConnection | None = None
        trace = None
        if debug or logger.isEnabledFor(logging.DEBUG):
            global _session_ids
            _session_ids += 1
            tag = f"{endpoint.host} #{_session_ids}"

            def trace(line: str) -> None:
                # Server text may hold ESC, BEL or CR: never let it reach a terminal raw.
                logger.debug("%s %s", tag, printable(line))

        self.proto = ClientProtocol(trace=trace, tls=False)

    @property
    def is_open(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and not self.proto.closed

    def _mark(self, stage: Stage | Literal["idle"]) -> None:
        """Tell the observer ``stage`` begins (callers check there is one first)."""
        on_stage, clock = self.on_stage, self._clock
        assert on_stage is not None and clock is not None
        on_stage(stage, clock())

    async def run(self, steps: Steps[T]) -> T:
        """Run ``steps`` of this session (:meth:`greet`, :meth:`transaction_steps`,
        :meth:`quit_steps`, in any order the protocol allows, as one run) on its
        connection, and return their value."""
        return await self._live(self.stage).run(steps)

    # -- connection set-up ----------------------------------------------------------

    async def connect(self, sock: socket.socket | None = None) -> None:
        """Connect (or take the caller's connected ``sock``), read the greeting, EHLO,
        STARTTLS and AUTH as configured."""
        conn = await self.open(sock)
        await conn.run(self.greet())

    async def open(self, sock: socket.socket | None = None) -> AnyConnection:
        """Open the connection (trying each of the endpoint's addresses in turn), with
        implicit TLS if configured; the greeting is left for :meth:`greet`."""
        ep = self.endpoint
        implicit = ep.tls == "implicit"
        addresses = (ep.host,) if sock is not None else ep.addresses or (ep.host,)
        last: SMTPError | None = None
        for address in addresses:
            self.stage = "connect"
            if self.on_stage is not None:
                self._mark("connect")
            try:
                self._conn = await open_best(
                    self.proto,
                    ep.host,
                    ep.port,
                    address=address,
                    ssl_context=ep.ssl_context if implicit else None,
                    server_hostname=ep.host,
                    source_address=ep.source_address,
                    timeout=self.timeouts.connect,
                    proxy=ep.proxy,
                    sock=sock,
                )
                break
            except ConnectError as exc:
                last = exc
        else:
            assert last is not None
            raise last
        if implicit and ep.ssl_context is not None:
            self.proto.tls = True
            self.tls = tls_state_of(ep.ssl_context)
        self.stage = "greeting"
        if self.on_stage is not None:
            self._mark("greeting")
        return self._conn

    def greet(self) -> Steps[None]:
        """The greeting (within the connect's step), EHLO, STARTTLS and AUTH."""
        ep = self.endpoint
        self.stage = "greeting"  # since open()
        greeting: Reply = yield Receive(None, same_step=True)
        if greeting.code not in _GREETING_OK:
            raise reply_error(greeting, "greeting")
        yield from self._ehlo()
        if ep.tls in ("starttls", "opportunistic") and not self.proto.tls:
            yield from self._starttls()
        if ep.username is not None:
            yield from self._auth()
        self.stage = "mail"
        if self.on_stage is not None:
            self._mark("idle")

    def _ehlo(self) -> Steps[None]:
        self.stage = "ehlo"
        if self.on_stage is not None:
            self._mark("ehlo")
        yield from hello(self.proto, self.endpoint.helo, self.timeouts.command)

    def _starttls(self) -> Steps[None]:
        ep = self.endpoint
        self.stage = "starttls"
        if not self.proto.capabilities.starttls:
            if ep.tls == "starttls":
                raise TLSUnavailableError(
                    f"{ep.host} does not offer STARTTLS; refusing to continue in plaintext "
                    '(tls="opportunistic" or "none" allows it)',
                    stage="starttls",
                )
            return
        if self.on_stage is not None:
            self._mark("starttls")
        reply: Reply = yield Command(self.proto.starttls(), self.timeouts.command)
        if reply.code not in _STARTTLS_OK:
            # Offered but refused: even opportunistic TLS does not carry on in the clear
            # (plaintext only when STARTTLS is not offered); the next host may do better.
            raise reply_error(reply, "starttls")
        conn, context = self._conn, ep.ssl_context
        assert conn is not None and context is not None

        async def handshake() -> None:
            conn.step(self.timeouts.command)
            await conn.start_tls(context, ep.host)

        yield Await(handshake)
        self.tls = tls_state_of(context)
        yield from self._ehlo()

    def _auth(self) -> Steps[None]:
        ep = self.endpoint
        self.stage = "auth"
        if self.on_stage is not None:
            self._mark("auth")
        if not self.proto.tls and not ep.allow_plaintext_auth:
            raise AuthUnavailableError(
                f"refusing to send credentials to {ep.host} over an unencrypted connection "
                "(use TLS, or allow_plaintext_auth=True)",
                stage="auth",
            )
        name = choose_mechanism(self.proto.capabilities.auth, ep.auth_mechanism)
        cache = ep.auth_cache
        timeout = self.timeouts.command
        first = yield from cache.turn(2 * timeout if timeout else 120.0)
        try:
            yield from self._login(name, cache)
        finally:
            if first:
                cache.end()

    def _login(self, name: str, cache: AuthCache) -> Steps[None]:
        """AUTH, with what :class:`AuthCache` allows: a password function gets one
        fresh token after a refusal, a refused token is never sent again."""
        ep = self.endpoint
        assert ep.username is not None
        function = ep.password is not None and not isinstance(ep.password, str)
        refused: AuthenticationError | None = None
        for _ in range(2 if function else 1):
            password = ep.password if isinstance(ep.password, str) else ""
            token = None
            if function:
                password = yield Await(functools.partial(resolve_password, ep.password))
                token = _token_digest(password)
                again = cache.token_refused(token)
                if again is not None:
                    raise again
            mech = make_mechanism(name, ep.username, password)
            try:
                yield from authenticate(self.proto, name, mech, self.timeouts.command)
            except AuthenticationError as exc:
                if exc.code < 500:
                    raise  # 454 4.7.0 and kin: transient, the credentials not judged
                refused = cache.refuse(exc, token)
                if cache.final or self.proto.closed:
                    raise refused from None
                continue
            cache.accept()
            return
        assert refused is not None
        raise refused

    # -- transactions -------------------------------------------------------------

    def _mail_params(
        self, sender: str, recipients: Sequence[str], message: PreparedMessage
    ) -> tuple[list[str], bool]:
        """The MAIL FROM parameters this message needs, or a permanent error when the
        server cannot take it (RFC 1870 SIZE, 6152 8BITMIME, 6531 SMTPUTF8)."""
        caps = self.proto.capabilities
        params: list[str] = []
        limit = caps.size
        if limit is not None and message.size > limit:
            raise MessageRejectedError(
                f"message is {message.size} octets; {self.endpoint.host} takes at most "
                f"{limit} (SIZE)",
                stage="mail",
            )
        if "SIZE" in caps.extensions:
            params.append(f"SIZE={message.size}")
        if message.eight_bit:
            if not caps.eight_bit_mime:
                raise MessageRejectedError(
                    f"message has 8-bit content and {self.endpoint.host} does not offer 8BITMIME",
                    stage="mail",
                )
            params.append("BODY=8BITMIME")
        # Addresses are normalized (IDN domains in ASCII) by now: only a UTF-8
        # local part is left to need SMTPUTF8.
        utf8 = message.smtputf8 or not sender.isascii() or not "".join(recipients).isascii()
        if utf8:
            if not caps.smtputf8:
                raise MessageRejectedError(
                    f"message needs SMTPUTF8 (non-ASCII addresses) and {self.endpoint.host} "
                    "does not offer it",
                    stage="mail",
                )
            params.append("SMTPUTF8")
        return params, utf8

    async def transaction(
        self,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        *,
        extras: Extras = NO_EXTRAS,
        last: bool = False,
    ) -> tuple[dict[str, Reply], Reply]:
        """One mail transaction. Returns the refused recipients (with their RCPT reply)
        and the reply to the end of data. Raises an :class:`~asmtp.errors.SMTPError`
        when the transaction as a whole fails (MAIL or DATA refused, no recipient
        accepted, the connection lost); ``self.stage`` and ``self.dot_sent`` say where."""
        conn = self._live("mail")
        return await conn.run(self.transaction_steps(sender, recipients, message, extras, last))

    def _live(self, stage: Stage) -> AnyConnection:
        conn = self._conn
        if conn is None or self.proto.closed:
            raise ConnectionLostError("the session is closed", stage=stage)
        return conn

    def transaction_steps(
        self,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        extras: Extras = NO_EXTRAS,
        last: bool = False,
    ) -> Steps[tuple[dict[str, Reply], Reply]]:
        """The steps of :meth:`transaction`: what it returns and raises."""
        refused: dict[str, Reply] = {}
        self._refused = refused
        proto = self.proto
        if proto.closed:
            raise ConnectionLostError("the session is closed", stage=self.stage)
        timeouts = self.timeouts
        command = timeouts.command
        self.dot_sent = False
        params, utf8 = self._mail_params(sender, recipients, message)
        dsn = extras.dsn if proto.capabilities.dsn else None
        if dsn is not None:
            params.extend(dsn.mail_params())
        self.stage = "mail"
        if self.on_stage is not None:
            self._mark("mail")
        if self._needs_rset:
            reply: Reply = yield Command(proto.rset(), command)
            if reply.code not in _RSET_OK:
                raise reply_error(reply, "mail")
            self._needs_rset = False
        if self.endpoint.chunking and "CHUNKING" in proto.capabilities.extensions:
            return (
                yield from self._chunked_steps(
                    sender, recipients, message, params, utf8, dsn, extras, last, refused
                )
            )
        self.stage = "mail"
        if proto.capabilities.pipelining:
            # RFC 2920: MAIL, every RCPT and DATA in one write; then check every reply.
            out = proto.mail(sender, params, smtputf8=utf8)
            if dsn is None:
                out += b"".join([proto.rcpt(r) for r in recipients])
            else:
                out += b"".join([proto.rcpt(r, dsn.rcpt_params(r)) for r in recipients])
            out += proto.data()
            mail_reply: Reply = yield Command(out, command)
            if proto.closed:
                raise reply_error(mail_reply, "mail")
            self.stage = "rcpt"
            if self.on_stage is not None:
                self._mark("rcpt")
            for rcpt in recipients:
                reply = yield Receive(command)
                if proto.closed:
                    raise reply_error(reply, "rcpt")
                if reply.code not in _RCPT_OK:
                    refused[rcpt] = reply
            self.stage = "data"
            if self.on_stage is not None:
                self._mark("data")
            data_reply: Reply = yield Receive(command)
            if mail_reply.code not in _MAIL_OK:
                self._needs_rset = data_reply.code in _DATA_OK
                if self._needs_rset:
                    yield from self._empty_message()
                raise reply_error(mail_reply, "mail")
        else:
            mail_reply = yield Command(proto.mail(sender, params, smtputf8=utf8), command)
            if mail_reply.code not in _MAIL_OK:
                raise reply_error(mail_reply, "mail")
            self.stage = "rcpt"
            if self.on_stage is not None:
                self._mark("rcpt")
            for rcpt in recipients:
                rcpt_params = dsn.rcpt_params(rcpt) if dsn is not None else ()
                reply = yield Command(proto.rcpt(rcpt, rcpt_params), command)
                if proto.closed:
                    raise reply_error(reply, "rcpt")
                if reply.code not in _RCPT_OK:
                    refused[rcpt] = reply
            if len(refused) == len(recipients):
                self._needs_rset = True
                if self.on_stage is not None:
                    self._mark("idle")
                return refused, _NO_DATA
            self.stage = "data"
            if self.on_stage is not None:
                self._mark("data")
            data_reply = yield Command(proto.data(), command)
        if len(refused) == len(recipients):
            # RFC 2920 3.1: no recipient, so a 354 gets an empty message.
            self._needs_rset = True
            if data_reply.code in _DATA_OK:
                yield from self._empty_message()
            if self.on_stage is not None:
                self._mark("idle")
            return refused, _NO_DATA
        if data_reply.code not in _DATA_OK:
            self._needs_rset = not proto.closed
            raise reply_error(data_reply, "data")
        self.stage = "message"
        if self.on_stage is not None:
            self._mark("message")
        if extras.before_dot is not None:
            yield from self._before_dot(extras.before_dot, recipients, refused)
        # The session's last transaction: QUIT rides along with the content, unless
        # some recipients await a new transaction (452 too many recipients).
        then_quit = (
            last
            and proto.capabilities.pipelining
            and not any(r.code == 452 for r in refused.values())
        )
        # Drained: lost while the kernel would not take more means the dot never left.
        yield Send(proto.message(message.parts, then_quit=then_quit), timeouts.data_block, True)
        self.dot_sent = True
        try:
            final: Reply = yield Receive(timeouts.data_end)
        except ConnectionLostError as exc:
            unread = self._end_unread()
            if unread is not None:
                raise unread from exc
            raise
        self.dot_sent = False
        if final.code not in _MESSAGE_OK and proto.closed:
            raise reply_error(final, "message")
        if self.on_stage is not None:
            self._mark("idle")
        return refused, final

    def _before_dot(
        self, hook: BeforeDot, recipients: Sequence[str], refused: Mapping[str, Reply]
    ) -> Steps[None]:
        """Await the hook before the end of data goes out, with the recipients that
        may get the message (those not refused so far)."""
        try:
            yield Await(functools.partial(hook, [r for r in recipients if r not in refused]))
        except BaseException:
            # The server waits for content that will not come (the journal could
            # not record the dot): only closing ends DATA without a message, and
            # the session must never be lent again in that state.
            self.abort()
            raise

    def _end_unread(self) -> ConnectionLostError | None:
        """The connection was lost after the end of data went out: the message's fate
        is unknown (RFC 5321 6.1 forbids guessing "not delivered"), unless the server
        reset the connection, which means it left bytes of ours unread, the end of
        data among them: then the error to raise instead (``dot_sent`` cleared)."""
        if self._conn is None or not self._conn.reset_by_peer:
            return None
        self.dot_sent = False
        return ConnectionLostError(
            "the server reset the connection before reading the end of the message",
            stage="message",
        )

    def _chunked_steps(
        self,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        params: list[str],
        utf8: bool,
        dsn: DSN | None,
        extras: Extras,
        last: bool,
        refused: dict[str, Reply],
    ) -> Steps[tuple[dict[str, Reply], Reply]]:
        """:meth:`transaction_steps` with BDAT (RFC 3030), for a server that offers
        CHUNKING: the content as it is, with its size (no dot-stuffing, see
        :meth:`PreparedMessage.chunks <asmtp._core.message.PreparedMessage.chunks>`),
        and no 354 to wait for.

        With PIPELINING, a message of one chunk goes in one write with MAIL and every
        RCPT (``MAIL, RCPT..., BDAT n LAST, content``; QUIT too in the session's last
        transaction when there is one recipient, who cannot need another): one round
        trip. A larger message goes so with its first chunk, then, once MAIL, the
        RCPTs and that chunk are answered, with the others in one write: a refusal
        costs at most one chunk sent for nothing. Without PIPELINING each command
        awaits its reply.

        As strict as DATA: the last chunk's reply is the end of data's; a refused
        chunk fails the transaction (4xx transient, 5xx permanent); when no RCPT was
        accepted the server refuses the chunk (503) and only the RCPT replies count.
        Lost before the last chunk went out: transient; after, before its reply:
        unknown (``dot_sent``), as after DATA's dot."""
        proto = self.proto
        timeouts = self.timeouts
        command = timeouts.command
        chunks = message.chunks()
        if not proto.capabilities.pipelining:
            mail_reply: Reply = yield Command(proto.mail(sender, params, smtputf8=utf8), command)
            if mail_reply.code not in _MAIL_OK:
                raise reply_error(mail_reply, "mail")
            self.stage = "rcpt"
            if self.on_stage is not None:
                self._mark("rcpt")
            for rcpt in recipients:
                rcpt_params = dsn.rcpt_params(rcpt) if dsn is not None else ()
                reply: Reply = yield Command(proto.rcpt(rcpt, rcpt_params), command)
                if proto.closed:
                    raise reply_error(reply, "rcpt")
                if reply.code not in _RCPT_OK:
                    refused[rcpt] = reply
            if len(refused) == len(recipients):
                self._needs_rset = True
                if self.on_stage is not None:
                    self._mark("idle")
                return refused, _NO_DATA
            final = yield from self._chunks(chunks, recipients, refused, extras, last)
            return refused, final
        # PIPELINING: MAIL, every RCPT and the first chunk in one write.
        out: list[bytes | memoryview] = [proto.mail(sender, params, smtputf8=utf8)]
        if dsn is None:
            out += [proto.rcpt(r) for r in recipients]
        else:
            out += [proto.rcpt(r, dsn.rcpt_params(r)) for r in recipients]
        whole = len(chunks) == 1
        if whole:
            # The last chunk goes in this write: the hook gets every recipient, as any
            # of them may get the message once it has left.
            if extras.before_dot is not None:
                yield from self._before_dot(extras.before_dot, recipients, refused)
            then_quit = last and len(recipients) == 1
            first = proto.bdat(chunks[0], last=True, then_quit=then_quit)
        else:
            first = proto.bdat(chunks[0])
        out.append(first[0])  # the commands in one piece, the chunk's own after them
        # Drained when it holds the last chunk: lost while the kernel would not take
        # more means that never left.
        yield Send((b"".join(out), *first[1:]), timeouts.data_block, whole)
        self.dot_sent = whole
        try:
            mail_reply = yield Receive(command)
            if proto.closed:
                self.dot_sent = False
                raise reply_error(mail_reply, "mail")
            self.stage = "rcpt"
            if self.on_stage is not None:
                self._mark("rcpt")
            for rcpt in recipients:
                reply = yield Receive(command)
                if proto.closed:
                    self.dot_sent = False
                    raise reply_error(reply, "rcpt")
                if reply.code not in _RCPT_OK:
                    refused[rcpt] = reply
            if whole:
                self.stage = "message"
                if self.on_stage is not None:
                    self._mark("message")
                chunk_reply: Reply = yield Receive(timeouts.data_end)
            else:
                self.stage = "bdat"
                chunk_reply = yield Receive(command)
        except ConnectionLostError as exc:
            unread = self._end_unread() if self.dot_sent else None
            if unread is not None:
                raise unread from exc
            raise
        self.dot_sent = False
        if mail_reply.code not in _MAIL_OK:
            raise reply_error(mail_reply, "mail")  # the RCPTs and the chunk got 503
        if len(refused) == len(recipients):
            # No recipient: the chunk's refusal (503 5.5.1) says nothing more.
            self._needs_rset = not proto.closed
            if self.on_stage is not None:
                self._mark("idle")
            return refused, _NO_DATA
        if whole:
            return refused, self._end_of_chunks(chunk_reply)
        if chunk_reply.code not in _BDAT_OK:
            self._needs_rset = not proto.closed
            raise reply_error(chunk_reply, "bdat")
        final = yield from self._chunks(chunks[1:], recipients, refused, extras, last)
        return refused, final

    def _chunks(
        self,
        chunks: Sequence[tuple[bytes | memoryview, ...]],
        recipients: Sequence[str],
        refused: Mapping[str, Reply],
        extras: Extras,
        last: bool,
    ) -> Steps[Reply]:
        """Send ``chunks``, the last with LAST, once the RCPTs are answered: with
        PIPELINING in one write, else each awaiting its reply; the reply to the last
        chunk is returned (as the reply to DATA's dot is)."""
        proto = self.proto
        timeouts = self.timeouts
        pipelining = proto.capabilities.pipelining
        middle = chunks[:-1]
        self.stage = "bdat"
        if not pipelining:
            for chunk in middle:
                reply: Reply = yield Command(proto.bdat(chunk), timeouts.data_block)
                if reply.code not in _BDAT_OK:
                    self._needs_rset = not proto.closed
                    raise reply_error(reply, "bdat")
            middle = ()
        if extras.before_dot is not None:
            yield from self._before_dot(extras.before_dot, recipients, refused)
        # QUIT rides along, unless some recipients await a new transaction (452).
        then_quit = last and pipelining and not any(r.code == 452 for r in refused.values())
        out: list[bytes | memoryview] = []
        for chunk in middle:
            out += proto.bdat(chunk)
        out += proto.bdat(chunks[-1], last=True, then_quit=then_quit)
        if self.on_stage is not None:
            self._mark("message")
        # Drained: lost while the kernel would not take more means LAST never left.
        yield Send(tuple(out), timeouts.data_block, True)
        self.dot_sent = True
        failed: Reply | None = None
        try:
            for _ in middle:
                reply = yield Receive(timeouts.command)
                if proto.closed:
                    self.dot_sent = False
                    raise reply_error(reply, "bdat")
                if failed is None and reply.code not in _BDAT_OK:
                    failed = reply  # the transaction failed: nothing will be delivered
                    self.dot_sent = False
            self.stage = "message"
            final: Reply = yield Receive(timeouts.data_end)
        except SMTPError as exc:
            if failed is not None:  # what the transaction came to, whatever followed
                raise reply_error(failed, "bdat") from exc
            unread = self._end_unread() if isinstance(exc, ConnectionLostError) else None
            if unread is not None:
                raise unread from exc
            raise
        self.dot_sent = False
        if failed is not None:
            self._needs_rset = not proto.closed
            raise reply_error(failed, "bdat")
        return self._end_of_chunks(final)

    def _end_of_chunks(self, final: Reply) -> Reply:
        """The last chunk's reply, judged as the dot's: a 421 raises; another refusal
        is every accepted recipient's result (and RSET comes before the next MAIL:
        RFC 3030 2 has a refused chunk fail the transaction, not end it)."""
        if final.code not in _MESSAGE_OK:
            self._needs_rset = not self.proto.closed
            if self.proto.closed:
                raise reply_error(final, "message")
        if self.on_stage is not None:
            self._mark("idle")
        return final

    def _empty_message(self) -> Steps[None]:
        yield Command(self.proto.message(b"\r\n.\r\n"), self.timeouts.data_end)

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        *,
        started: float | None = None,
        extras: Extras = NO_EXTRAS,
        last: bool = False,
    ) -> list[RecipientResult]:
        """One transaction, one result per recipient, whatever happens (a session
        that fails leaves its recipients with a transient, permanent or unknown
        result, never without one)."""
        clock = loop_clock()
        t0 = clock() if started is None else started
        try:
            conn = self._live("mail")
        except SMTPError as exc:
            return self._failed(recipients, exc, clock() - t0)
        return await conn.run(self._deliver(sender, recipients, message, t0, extras, last, clock))

    def _deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        started: float,
        extras: Extras,
        last: bool,
        clock: Callable[[], float],
    ) -> Steps[list[RecipientResult]]:
        try:
            refused, final = yield from self.transaction_steps(
                sender, recipients, message, extras, last
            )
        except SMTPError as exc:
            return self._failed(recipients, exc, clock() - started, self._refused)
        elapsed = clock() - started
        host, tls = self.endpoint.host, self.tls
        results = []
        for rcpt in recipients:
            reply = refused.get(rcpt)
            if reply is None:
                results.append(_result_of(rcpt, final, "message", host, tls, elapsed))
            else:
                results.append(_result_of(rcpt, reply, "rcpt", host, tls, elapsed))
        return results

    def _failed(
        self,
        recipients: Sequence[str],
        error: SMTPError,
        elapsed: float,
        refused: Mapping[str, Reply] = _NO_REFUSALS,
    ) -> list[RecipientResult]:
        """One result per recipient of a transaction that failed with ``error``: a
        recipient the server had refused already keeps that refusal (a server that
        ends a pipelined group with 421 after some 550s answered those recipients)."""
        host, tls = self.endpoint.host, self.tls
        return [
            _result_of(r, refused[r], "rcpt", host, tls, elapsed)
            if r in refused
            else result_from_error(
                r, error, host=host, tls=tls, elapsed=elapsed, dot_sent=self.dot_sent
            )
            for r in recipients
        ]

    def one_shot(
        self,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        results: dict[str, RecipientResult],
        *,
        started: float,
        extras: Extras = NO_EXTRAS,
        clock: Callable[[], float],
    ) -> Steps[None]:
        """A whole session once connected, as one run of steps: the greeting, EHLO,
        STARTTLS and AUTH, then transactions until every recipient has a result in
        ``results`` (recipients refused with 452 "too many recipients" go on in a new
        transaction), then QUIT (pipelined after the last message when it can be)."""
        yield from self.greet()
        pending = list(recipients)
        while pending:
            got = yield from self._deliver(sender, pending, message, started, extras, True, clock)
            again = [r.recipient for r in got if r.code == 452 and r.stage == "rcpt"]
            progress = len(again) < len(pending)
            for r in got:
                if not (progress and r.recipient in again):
                    results[r.recipient] = r
            pending = again if progress and not self.proto.closed else []
        try:
            yield from self.quit_steps()
        except SMTPError:
            return  # every recipient has its result: a server gone by now is no failure

    async def noop(self) -> None:
        """NOOP: check the server is still there (a 421 or a closed connection raises)."""
        conn = self._live("noop")
        reply = await conn.run(exchange(self.proto.noop(), self.timeouts.command))
        if reply.code not in _NOOP_OK:
            raise reply_error(reply, "noop")

    async def reset(self) -> None:
        """RSET: check a reused session is alive and clear any transaction state."""
        conn = self._live("rset")
        reply = await conn.run(exchange(self.proto.rset(), self.timeouts.command))
        if reply.code not in _RSET_OK:
            raise reply_error(reply, "rset")
        self._needs_rset = False

    # -- ending -------------------------------------------------------------------

    def quit_steps(self) -> Steps[Reply | None]:
        """QUIT (or, pipelined after the last message, its reply): the reply, or None
        when the session is past saying QUIT."""
        proto = self.proto
        if proto.awaiting == "quit":  # pipelined after the last message
            step: Command | Receive = Receive(self.timeouts.command)
        elif proto.state in (State.READY, State.MAIL, State.CONNECTED, State.REFUSED):
            step = Command(proto.quit(), self.timeouts.command)
        else:
            return None
        if self.on_stage is not None:
            self._mark("quit")
        reply: Reply = yield step
        if self.on_stage is not None:
            self._mark("idle")
        return reply

    async def quit(self) -> None:
        """Say QUIT and close; a server that has already gone is not an error."""
        conn = self._conn
        if conn is None:
            return
        try:
            await conn.run(self.quit_steps())
        except SMTPError:
            pass
        finally:
            await conn.aclose()

    async def close(self) -> None:
        """Close the connection (after :meth:`one_shot`, which said QUIT)."""
        if self._conn is not None:
            await self._conn.aclose()

    def abort(self) -> None:
        """Close at once, without QUIT (errors, cancellation)."""
        if self._conn is not None:
            self._conn.abort()


_NO_DATA = Reply(554, ("5.5.1 no valid recipients",))


def reply_error(reply: Reply, stage: Stage) -> ReplyError:
    """The error for an error reply to the ``stage`` command."""
    return ReplyError(reply.code, reply.message, enhanced_status=reply.enhanced_status, stage=stage)


# -- steps shared by sessions and ``asmtp bench`` -------------------------------------


def exchange(command: bytes, timeout: float | None) -> Steps[Reply]:
    """One command and its reply."""
    reply: Reply = yield Command(command, timeout)
    return reply


def hello(proto: ClientProtocol, name: str, timeout: float | None) -> Steps[None]:
    """EHLO, and HELO for a server that does not know EHLO (RFC 5321 3.2)."""
    reply: Reply = yield Command(proto.ehlo(name), timeout)
    if reply.code in _EHLO_OK:
        return
    if reply.code >= 500 and not proto.closed:
        reply = yield Command(proto.helo(name), timeout)
        if reply.code in SUCCESS_CODES["helo"]:
            return
    raise reply_error(reply, "ehlo")


def authenticate(
    proto: ClientProtocol, name: str, mech: Mechanism, timeout: float | None
) -> Steps[None]:
    """AUTH with ``mech`` (RFC 4954): the command, an answer to each 334 challenge,
    and :class:`~asmtp.errors.AuthenticationError` unless the end is 235."""
    reply: Reply = yield Command(proto.auth(name, mech.initial()), timeout)
    while reply.code == AUTH_CONTINUE:
        challenge = reply.lines[0] if reply.lines else ""
        reply = yield Command(proto.auth_response(mech.respond(challenge)), timeout)
    if reply.code not in _AUTH_OK:
        raise AuthenticationError(reply.code, reply.message, enhanced_status=reply.enhanced_status)


def _result_of(
    rcpt: str, reply: Reply, stage: Stage, host: str, tls: TLSState, elapsed: float
) -> RecipientResult:
    code = reply.code
    enhanced, text = reply.status_and_message()
    status: Status
    if stage == "message" and code in _MESSAGE_OK:
        status = "delivered"
    elif code >= 400:
        status = "permanent" if code >= 500 else "transient"
        text = str(reply_error(reply, stage))
    else:  # the protocol lets no other reply through; never count one as delivered
        status = "unknown" if stage == "message" else "transient"
        text = f"{stage} answered {reply}"
    return RecipientResult(
        recipient=rcpt,
        status=status,
        code=code,
        enhanced_status=enhanced,
        message=text,
        stage=stage,
        host=host,
        tls=tls,
        elapsed=elapsed,
    )
