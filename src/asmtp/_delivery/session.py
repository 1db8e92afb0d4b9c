"""One SMTP session over one connection: connect, greeting, EHLO (HELO fallback; LHLO
for LMTP), STARTTLS, AUTH, then any number of mail transactions, then QUIT.

Owns the client's policy over the state machine for the session as a whole: which
steps to take and in what order, how each set-up step's failure is classified, and one
result per recipient of each transaction, whatever happens. Where and how to connect
is :mod:`asmtp._delivery.endpoint`'s (with :class:`~asmtp._delivery.endpoint.AuthCache`,
not asking a relay again for credentials it refused); the steps of one mail
transaction (MAIL, RCPT, DATA or BDAT) are :mod:`asmtp._delivery.transaction`'s. The
bytes and the rules of the exchange stay in :mod:`asmtp._core.protocol`; the network
stays in :mod:`asmtp._io`.

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

import asyncio
import functools
import logging
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Final, TypeVar

from .._core.prepared import PreparedMessage
from .._core.protocol import SUCCESS_CODES, ClientProtocol, State
from .._core.reply import Reply
from .._core.sanitize import printable
from .._core.sasl import choose_mechanism, make_mechanism
from .._core.steps import GREETING, Await, Command, Receive, Steps, command, receive
from .._io.anyio_driver import AnyConnection, loop_clock, open_best
from .._io.asyncio_driver import open_connection
from .._io.connect import ConnectOptions
from ..config import Timeouts
from ..errors import (
    AuthenticationError,
    AuthUnavailableError,
    ConnectError,
    ConnectionLostError,
    SMTPError,
    Stage,
    TLSUnavailableError,
)
from ..results import RecipientResult, Status, TLSState, result_from_error
from .endpoint import AuthCache, Endpoint, resolve_password, tls_state_of, token_digest
from .exchanges import authenticate, exchange, helo_instead, lhlo
from .session_state import (
    NO_EXTRAS,
    NO_REPLIES,
    Extras,
    SessionState,
    StageObserver,
    answered,
    reply_error,
)
from .transaction import transaction

__all__ = [
    "Session",
    "StageObserver",
    "enable_debug",
]

logger: Final = logging.getLogger("asmtp")

_session_ids = 0  # numbers sessions in the transcript, so interleaved ones can be told apart

#: a recipient's "delivered": the end of data's success replies, from the one table in
#: asmtp._core.protocol (the other commands' are looked up there as they are checked)
_MESSAGE_OK: Final = SUCCESS_CODES["message"]
_EHLO_OK: Final = SUCCESS_CODES["ehlo"]

T = TypeVar("T")


def enable_debug() -> None:
    """Show the transcript (``debug=True``): the ``asmtp`` logger at DEBUG to stderr,
    unless the application configured handlers of its own."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s asmtp %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


#: the states QUIT may be sent in, when it was not pipelined after the last message
_CAN_QUIT: Final = frozenset({State.READY, State.MAIL, State.CONNECTED, State.REFUSED})


class Session(SessionState):
    """One SMTP session. Use through :func:`asmtp.connect` or the fan-out calls. What a
    transaction reads and updates of it (``stage``, ``dot_sent``, ``tls``...) is its
    :class:`~asmtp._delivery.transaction.SessionState`.

    ``dot_sent`` is True from the moment the end-of-data dot of the current
    transaction (with CHUNKING, its last BDAT chunk) has been written until its reply
    arrives (with LMTP, every recipient's): a failure then leaves the message's fate
    unknown (for the recipients not answered yet).

    ``on_stage`` observes the session: it is called ``(stage, at)``, ``at`` from
    ``clock`` (default: the event loop's), as each stage begins: ``"connect"`` (each
    address tried), ``"greeting"`` (connected), ``"ehlo"`` (again after STARTTLS;
    ``"lhlo"`` for LMTP), ``"starttls"`` (only when STARTTLS is sent), ``"auth"``, then
    per transaction ``"mail"``, ``"rcpt"``, ``"data"`` (not with BDAT), ``"message"``,
    and ``"quit"``.
    ``"idle"`` says the stage before it ended: after the set-up, after each
    transaction's last reply and after QUIT's. A stage that fails raises instead (no
    ``"idle"``). Without an observer, each stage costs one ``is not None`` check.
    """

    __slots__ = ()

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
        self.wait_reply = receive(timeouts.command)
        self.wait_end = receive(timeouts.data_end)
        self.on_stage = on_stage
        # Asked only with an observer (the loop's clock costs a system call to find).
        self._clock = clock if clock is not None or on_stage is None else loop_clock()
        self.dot_sent = False
        self.tls = "none"
        self.stage = "connect"
        self._needs_rset = False
        self._refused = NO_REPLIES
        self._answered = NO_REPLIES
        self._conn = None
        trace = None
        if debug or logger.isEnabledFor(logging.DEBUG):
            global _session_ids
            _session_ids += 1
            tag = f"{endpoint.host} #{_session_ids}"

            def trace(line: str) -> None:
                # Server text may hold ESC, BEL or CR: never let it reach a terminal raw.
                logger.debug("%s %s", tag, printable(line))

        self.proto = ClientProtocol(trace=trace, tls=False, lmtp=endpoint.lmtp)

    @property
    def is_open(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.closed and not self.proto.closed

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

    async def open(
        self, sock: socket.socket | None = None, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> AnyConnection:
        """Open the connection (trying each of the endpoint's addresses in turn, or its
        Unix socket), with implicit TLS if configured; the greeting is left for
        :meth:`greet`. ``loop``: the running asyncio loop, when the caller has it
        (each asking costs a system call on Python 3.11)."""
        ep = self.endpoint
        implicit = ep.tls == "implicit"
        one = sock is not None or ep.path is not None
        addresses = (ep.host,) if one else ep.addresses or (ep.host,)
        last: SMTPError | None = None
        for address in addresses:
            self.stage = "connect"
            if self.on_stage is not None:
                self._mark("connect")
            # Only what is set: None is the same as not given.
            options: ConnectOptions = {"address": address, "timeout": self.timeouts.connect}
            if implicit:
                options["ssl_context"] = ep.ssl_context
                options["server_hostname"] = ep.host
            if ep.source_address is not None:
                options["source_address"] = ep.source_address
            if ep.proxy is not None:
                options["proxy"] = ep.proxy
            if sock is not None:
                options["sock"] = sock
            if ep.path is not None:
                options["path"] = ep.path
            try:
                if loop is not None:  # the caller knows it runs on asyncio: its driver
                    conn: AnyConnection = await open_connection(
                        self.proto, ep.host, ep.port, options, loop=loop
                    )
                else:
                    conn = await open_best(self.proto, ep.host, ep.port, **options)
                self._conn = conn
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
        proto = self.proto
        self.stage = "greeting"  # since open()
        greeting: Reply = yield GREETING
        if greeting.code not in SUCCESS_CODES["greeting"]:
            raise reply_error(greeting, "greeting")
        timeout = self.timeouts.command
        while True:  # EHLO (LHLO for LMTP), again once TLS is up (RFC 3207 4.2)
            # Inline, not a generator of its own: an object fewer every session.
            self.stage = "lhlo" if proto.lmtp else "ehlo"
            if self.on_stage is not None:
                self._mark(self.stage)
            if proto.lmtp:
                yield from lhlo(proto, ep.helo, timeout)
            else:
                reply: Reply = yield command(proto.ehlo(ep.helo), timeout)
                if reply.code not in _EHLO_OK:
                    yield from helo_instead(proto, ep.helo, timeout, reply)
            if ep.tls not in ("starttls", "opportunistic") or proto.tls:
                break
            if not (yield from self._starttls()):
                break
        if ep.username is not None:
            yield from self._auth()
        self.stage = "mail"
        if self.on_stage is not None:
            self._mark("idle")

    def _starttls(self) -> Steps[bool]:
        """STARTTLS and the handshake: True once TLS is up (EHLO comes again), False
        when the server does not offer it and the endpoint allows plaintext."""
        ep = self.endpoint
        self.stage = "starttls"
        if not self.proto.capabilities.starttls:
            if ep.tls == "starttls":
                raise TLSUnavailableError(
                    f"{ep.host} does not offer STARTTLS; refusing to continue in plaintext "
                    '(tls="opportunistic" or "none" allows it)',
                    stage="starttls",
                )
            return False
        if self.on_stage is not None:
            self._mark("starttls")
        reply: Reply = yield command(self.proto.starttls(), self.timeouts.command)
        if reply.code not in SUCCESS_CODES["starttls"]:
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
        return True

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
                token = token_digest(password)
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
        """One mail transaction's steps (:func:`~asmtp._delivery.transaction.transaction`):
        they return the refused recipients (with their RCPT reply) and the reply to the
        end of data (with LMTP, the first refusal among the recipients' own replies, or
        the last), and raise an :class:`~asmtp.errors.SMTPError` when the transaction as
        a whole fails (MAIL or DATA refused, no recipient accepted, the connection lost);
        ``self.stage`` and ``self.dot_sent`` say where."""
        final = yield from transaction(self, sender, recipients, message, extras, last)
        return self._refused, final

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

    async def deliver_all(
        self,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        *,
        started: float | None = None,
        extras: Extras = NO_EXTRAS,
    ) -> list[RecipientResult]:
        """Transactions on this open session until every recipient has a result:
        those refused with 452 "too many recipients" go on in a new transaction, as in
        :meth:`one_shot` (a kept session carrying a batch of one domain's recipients)."""
        results: dict[str, RecipientResult] = {}
        pending = list(recipients)
        while pending:
            got = await self.deliver(sender, pending, message, started=started, extras=extras)
            pending = _go_again(got, results, self.proto.closed)
        return [results[r] for r in recipients]

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
            final = yield from transaction(self, sender, recipients, message, extras, last)
        except SMTPError as exc:
            return self.cut_short(recipients, exc, clock() - started)
        return self._results(recipients, final, clock() - started)

    def _results(
        self, recipients: Sequence[str], final: Reply, elapsed: float
    ) -> list[RecipientResult]:
        """One result per recipient of a transaction that ended with ``final``."""
        refused = self._refused
        host, tls = self.endpoint.host, self.tls
        answered = self._answered  # LMTP: each accepted recipient's own reply
        results = []
        for rcpt in recipients:
            reply = refused.get(rcpt)
            if reply is None:
                reply = answered.get(rcpt, final)
                results.append(_result_of(rcpt, reply, "message", host, tls, elapsed))
            else:
                results.append(_result_of(rcpt, reply, "rcpt", host, tls, elapsed))
        return results

    def cut_short(
        self, recipients: Sequence[str], error: SMTPError, elapsed: float
    ) -> list[RecipientResult]:
        """The results of ``recipients`` when ``error`` ended the current transaction
        (or a deadline cut it short): what the server had answered for a recipient
        stays that recipient's result (:meth:`_failed`)."""
        return self._failed(recipients, error, elapsed, self._refused, self._answered)

    def _failed(
        self,
        recipients: Sequence[str],
        error: SMTPError,
        elapsed: float,
        refused: Mapping[str, Reply] = NO_REPLIES,
        answered: Mapping[str, Reply] = NO_REPLIES,
    ) -> list[RecipientResult]:
        """One result per recipient of a transaction that failed with ``error``: a
        recipient the server had refused already keeps that refusal (a server that
        ends a pipelined group with 421 after some 550s answered those recipients),
        and one an LMTP server had answered after the end of data keeps that answer
        (the others' fate is unknown when the connection was lost then)."""
        host, tls = self.endpoint.host, self.tls
        return [
            _result_of(r, refused[r], "rcpt", host, tls, elapsed)
            if r in refused
            else _result_of(r, answered[r], "message", host, tls, elapsed)
            if r in answered
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
        pending: Sequence[str] = recipients  # never changed: each round makes a new list
        while pending:
            # _deliver's steps, inline: a generator level fewer for every reply.
            try:
                final = yield from transaction(self, sender, pending, message, extras, True)
            except SMTPError as exc:
                got = self.cut_short(pending, exc, clock() - started)
            else:
                got = self._results(pending, final, clock() - started)
            pending = _go_again(got, results, self.proto.closed)
        try:
            if self.proto.awaiting == "quit" and self.on_stage is None:
                yield self.wait_reply  # QUIT's, pipelined after the message: no generator
            else:
                yield from self.quit_steps()
        except SMTPError:
            return  # every recipient has its result: a server gone by now is no failure

    async def noop(self) -> None:
        """NOOP: check the server is still there (a 421 or a closed connection raises)."""
        conn = self._live("noop")
        reply = await conn.run(exchange(self.proto.noop(), self.timeouts.command))
        if reply.code not in SUCCESS_CODES["noop"]:
            raise reply_error(reply, "noop")

    async def reset(self) -> None:
        """RSET: check a reused session is alive and clear any transaction state."""
        conn = self._live("rset")
        reply = await conn.run(exchange(self.proto.rset(), self.timeouts.command))
        if reply.code not in SUCCESS_CODES["rset"]:
            raise reply_error(reply, "rset")
        self._needs_rset = False

    # -- ending -------------------------------------------------------------------

    def quit_steps(self) -> Steps[Reply | None]:
        """QUIT (or, pipelined after the last message, its reply): the reply, or None
        when the session is past saying QUIT."""
        proto = self.proto
        if proto.awaiting == "quit":  # pipelined after the last message
            step: Command | Receive = self.wait_reply
        elif proto.state in _CAN_QUIT:
            step = command(proto.quit(), self.timeouts.command)
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
    return answered(rcpt, status, code, enhanced, text, stage, host, tls, elapsed)


def _go_again(
    got: Sequence[RecipientResult], results: dict[str, RecipientResult], closed: bool
) -> list[str]:
    """After one transaction: the recipients refused with 452 "too many recipients"
    that go on in another (RFC 5321 section 4.5.3.1.10), every other result kept in
    ``results``. None go again when the transaction made no progress (every one was
    refused so) or the connection is closed: then the 452 is their result."""
    again: list[RecipientResult] = []
    for r in got:
        if r.code == 452 and r.stage == "rcpt":
            again.append(r)
        else:
            results[r.recipient] = r
    if not again:
        return []
    if len(again) < len(got) and not closed:
        return [r.recipient for r in again]
    for r in again:
        results[r.recipient] = r
    return []
