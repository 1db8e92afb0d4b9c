"""Reusable SMTP servers for asmtp's integration tests: the one place test servers live.

This module owns:

* TLS material from a throw-away trustme CA: the ``ca`` fixture,
  :func:`server_ssl_context`, :func:`client_ssl_context`, :func:`write_ca_pem`.
* :class:`SMTPTestServer`: a real aiosmtpd server (own thread, own loop) with scripted
  replies (``rcpt_reply``, ``mail_reply``, ``data_reply``, ``ehlo_disabled``,
  ``max_rcpt_per_transaction``), STARTTLS, implicit TLS and AUTH PLAIN/LOGIN, which
  records every accepted message (:class:`Received`), sessions and peak concurrency.
* :class:`FaultServer`: a raw asyncio TCP server speaking just enough SMTP to be told,
  per stage, to close, stall, send garbage, a huge line, a trickle, or a given reply.
* :func:`free_port` and the factory fixtures ``smtp_server`` and ``fault_server``.
* Waiting for what a server sees: :func:`wait_until` and ``server.wait_idle()`` block
  (sync tests); :func:`until` and ``await server.idle()`` let the event loop run
  (async tests, asyncio or trio).

conftest.py imports the fixtures from here (``tests`` is on pytest's ``pythonpath``);
``pytest_plugins = ["servers"]`` works as well.
Every server binds to loopback (127.0.0.0/8) only.

PYTEST_DONT_REWRITE: this module may be imported before pytest registers it as a plugin;
the marker keeps pytest from warning that it cannot rewrite its (few, internal) asserts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import anyio
import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (
    DATA_SIZE_DEFAULT,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
)

__all__ = [
    "BACKLOG",
    "DEFAULT_CERT_NAMES",
    "FAULT_STAGES",
    "FaultBehaviour",
    "FaultServer",
    "Received",
    "RecordingHandler",
    "SMTPTestServer",
    "ca",
    "ca_pem_file",
    "client_ssl_context",
    "fault_server",
    "free_port",
    "server_ssl_context",
    "smtp_server",
    "tls_client_context",
    "tls_server_context",
    "until",
    "wait_until",
    "write_ca_pem",
]

#: listen() backlog for every test server, so 200+ clients can connect at once.
BACKLOG = 1024
#: names the default server certificate is valid for.
DEFAULT_CERT_NAMES: tuple[str, ...] = (
    "localhost",
    *(f"127.0.0.{n}" for n in range(1, 10)),
)
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_T = TypeVar("_T")


def _check_loopback(host: str) -> None:
    """Tests talk to loopback only; refuse anything else early and loudly."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"test servers bind to numeric 127.x.y.z hosts, not {host!r}") from None
    if address not in _LOOPBACK:
        raise ValueError(f"test servers bind to 127.0.0.0/8 only, not {host}")


def free_port(*hosts: str, attempts: int = 50) -> int:
    """A TCP port free on every one of ``hosts`` (default ``127.0.0.1``) at this moment.

    Give several hosts to run several servers on one port, e.g. one per MX address::

        port = free_port("127.0.0.2", "127.0.0.3")
    """
    hosts = hosts or ("127.0.0.1",)
    for host in hosts:
        _check_loopback(host)
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port: int = probe.getsockname()[1]
            if all(_can_bind(host, port) for host in hosts[1:]):
                return port
    raise RuntimeError(f"no port free on all of {hosts} after {attempts} attempts")


def _can_bind(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass; return its last value.

    For facts a server learns after the client has moved on, such as a closed session.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(0.01)
    return True


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """:func:`wait_until` for async tests: polls without blocking the event loop
    (asyncio or trio), so the client under test keeps running while it waits."""
    with anyio.move_on_after(timeout):
        # Polled: the server's own thread changes what the predicate reads, so there
        # is no event in this loop to wait on.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.01)
        return True
    return predicate()


# --------------------------------------------------------------------------- TLS material


def server_ssl_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server-side context with a certificate from ``ca`` for ``names``.

    Defaults to :data:`DEFAULT_CERT_NAMES` (``localhost`` and 127.0.0.1 to 127.0.0.9).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*(names or DEFAULT_CERT_NAMES)).configure_cert(context)
    return context


def client_ssl_context(ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client context (``ssl.create_default_context()``) that trusts ``ca``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def write_ca_pem(ca: trustme.CA, path: Path | str) -> Path:
    """Write the CA certificate as PEM to ``path``, e.g. for ``SSL_CERT_FILE`` in a subprocess."""
    target = Path(path)
    ca.cert_pem.write_to_path(str(target))
    return target


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    """One throw-away certificate authority for the whole test session."""
    return trustme.CA()


@pytest.fixture
def tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    """A server context for the default loopback names."""
    return server_ssl_context(ca)


@pytest.fixture
def tls_client_context(ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client context trusting the session CA."""
    return client_ssl_context(ca)


@pytest.fixture(scope="session")
def ca_pem_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session CA as a PEM file (for ``SSL_CERT_FILE`` in CLI subprocess tests)."""
    return write_ca_pem(ca, tmp_path_factory.mktemp("ca") / "ca.pem")


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Received:
    """One message a test server accepted, with its envelope as the server saw it."""

    mail_from: str
    rcpt_tos: list[str]
    #: the body as received, dot-unstuffed, without the final ``.\r\n``
    content: bytes
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    peer: tuple[str, int] | None = None
    tls: bool = False
    auth_user: str | None = None
    #: the EHLO/HELO name of the session that sent the message
    helo_name: str | None = None


class _Records:
    """Everything a server observed; written from the server thread, read from tests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        self.messages: list[Received] = []
        self.sessions_opened = 0
        self.active_sessions = 0
        self.max_concurrent_sessions = 0
        self.ehlo_names: list[str] = []
        self.helo_names: list[str] = []
        self.commands: list[tuple[str, str]] = []
        self.errors: list[BaseException] = []

    def session_opened(self) -> None:
        with self.lock:
            self.sessions_opened += 1
            self.active_sessions += 1
            self.max_concurrent_sessions = max(self.max_concurrent_sessions, self.active_sessions)

    def session_closed(self) -> None:
        with self.lock:
            self.active_sessions -= 1

    def command(self, verb: str, argument: str = "") -> None:
        with self.lock:
            self.commands.append((verb, argument))

    def add(self, name: str, item: object) -> None:
        with self.lock:
            getattr(self, name).append(item)

    def snapshot(self, name: str) -> list[Any]:
        with self.lock:
            return list(getattr(self, name))


# --------------------------------------------------------------------------- aiosmtpd server

#: a scripted reply: a fixed reply line, or a function of the address returning a reply
#: line (``"550 5.1.1 no such user"``) or ``None`` for the normal answer.
AddressScript = str | Callable[[str], str | None] | None
#: a scripted end-of-data reply: fixed, or a function of the message about to be accepted.
DataScript = str | Callable[[Received], str | None] | None


def _run_script(script: str | Callable[[_T], str | None] | None, subject: _T) -> str | None:
    if script is None or isinstance(script, str):
        return script
    return script(subject)


def _accepts(reply: str | None) -> bool:
    """A scripted reply of ``None`` or any 2xx lets the command succeed."""
    return reply is None or reply.startswith("2")


@dataclass(frozen=True)
class _Options:
    hostname: str
    auth: dict[str, str] | None
    auth_required: bool
    rcpt_reply: AddressScript
    mail_reply: AddressScript
    data_reply: DataScript
    ehlo_disabled: bool
    max_rcpt_per_transaction: int | None
    auth_reply: AddressScript = None


class RecordingHandler:
    """aiosmtpd handler: answers through the scripts in the options and records everything.

    Only ``handle_*`` hooks and :meth:`authenticate` (the ``authenticator``) live here; no
    ``auth_*`` attributes, since aiosmtpd would take those as extra AUTH mechanisms.
    """

    def __init__(self, options: _Options, records: _Records) -> None:
        self.options = options
        self.records = records

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        self.records.command("EHLO", hostname)
        self.records.add("ehlo_names", hostname)
        if self.options.ehlo_disabled:
            # RFC 5321 section 3.2: the client must then fall back to HELO.
            return ["502 5.5.1 EHLO not supported, use HELO"]
        session.host_name = hostname
        if self.options.auth is None:
            responses = [line for line in responses if not line[4:].upper().startswith("AUTH")]
        return responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        self.records.command("HELO", hostname)
        self.records.add("helo_names", hostname)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.records.command("MAIL", address)
        # Enforced here rather than by aiosmtpd's auth_required, which warns when
        # combined with auth_require_tls=False.
        if self.options.auth_required and not session.authenticated:
            return "530 5.7.0 Authentication required"
        reply = _run_script(self.options.mail_reply, address)
        if _accepts(reply):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply or "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.records.command("RCPT", address)
        limit = self.options.max_rcpt_per_transaction
        if limit is not None and len(envelope.rcpt_tos) >= limit:
            return "452 4.5.3 Too many recipients"
        reply = _run_script(self.options.rcpt_reply, address)
        if _accepts(reply):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return reply or "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.records.command("DATA")
        transport = server.transport
        tls = transport is not None and transport.get_extra_info("ssl_object") is not None
        auth_data = session.auth_data if session.authenticated else None
        message = Received(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            content=envelope.original_content or b"",
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            peer=_peer(session.peer),
            tls=tls,
            auth_user=auth_data if isinstance(auth_data, str) else None,
            helo_name=session.host_name,
        )
        reply = _run_script(self.options.data_reply, message)
        if _accepts(reply):
            self.records.add("messages", message)
        return reply or "250 2.0.0 OK: queued"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.records.command("RSET")
        return "250 2.0.0 OK"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        self.records.command("NOOP", arg or "")
        return "250 2.0.0 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.records.command("QUIT")
        return "221 2.0.0 Bye"

    def handle_STARTTLS(self, server: SMTP, session: Session, envelope: Envelope) -> bool:
        # aiosmtpd calls this (synchronously) once the TLS handshake has completed.
        self.records.command("STARTTLS")
        return True

    async def handle_exception(self, error: Exception) -> str:
        # A bug in a script or in this handler: keep it for the test to see. A failed
        # STARTTLS handshake is the client's doing (e.g. it rejected our certificate).
        if not isinstance(error, TLSSetupException):
            self.records.add("errors", error)
        return f"500 5.0.0 test server error: {type(error).__name__}: {error}"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd ``authenticator``: check a PLAIN or LOGIN user/password pair."""
        self.records.command("AUTH", mechanism)
        users = self.options.auth or {}
        if isinstance(data, LoginPassword):
            user = data.login.decode("utf-8", "replace")
            password = data.password.decode("utf-8", "replace")
            scripted = _run_script(self.options.auth_reply, user)
            if scripted is not None and not scripted.startswith("2"):
                return AuthResult(success=False, handled=False, message=scripted)
            if user in users and users[user] == password:
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)


def _peer(peer: Any) -> tuple[str, int] | None:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return (str(peer[0]), int(peer[1]))
    return None


class _CountingSMTP(SMTP):
    """aiosmtpd's SMTP protocol, counting live connections for the concurrency records."""

    def __init__(self, handler: RecordingHandler, *, tracker: _Tracker, **kwargs: Any) -> None:
        self.test_tracker = tracker
        self.test_counted = False
        super().__init__(handler, **kwargs)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # After STARTTLS aiosmtpd calls this a second time, with the TLS transport.
        if not self.test_counted:
            self.test_counted = True
            self.test_tracker.opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.test_tracker.closed(self)
        super().connection_lost(error)


class _Tracker:
    """Live protocol instances of one server (touched only in its loop's thread)."""

    def __init__(self, records: _Records) -> None:
        self.records = records
        self.live: set[_CountingSMTP] = set()
        self._drained: asyncio.Event | None = None

    def opened(self, protocol: _CountingSMTP) -> None:
        self.live.add(protocol)
        self.records.session_opened()

    def closed(self, protocol: _CountingSMTP) -> None:
        if protocol in self.live:  # connection_lost may come twice after STARTTLS
            self.live.discard(protocol)
            self.records.session_closed()
            if not self.live and self._drained is not None:
                self._drained.set()

    async def abort_all(self, timeout: float) -> None:
        """Drop every open connection so no transport outlives the loop."""
        if not self.live:
            return
        self._drained = asyncio.Event()
        for protocol in list(self.live):
            transport = protocol.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)


class _Controller(Controller):
    """Controller building our counting SMTP protocol for each connection."""

    def __init__(
        self,
        handler: RecordingHandler,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        tracker: _Tracker,
        smtp_kwargs: dict[str, Any],
    ) -> None:
        super().__init__(handler, hostname=host, port=port, ssl_context=ssl_context)
        self.tracker = tracker
        self.smtp_kwargs = smtp_kwargs

    def factory(self) -> SMTP:
        # An explicit loop keeps aiosmtpd from probing for one (which toggles the
        # process-wide warning filters from this thread).
        return _CountingSMTP(self.handler, tracker=self.tracker, loop=self.loop, **self.smtp_kwargs)


class SMTPTestServer:
    """A real ESMTP server (aiosmtpd) on loopback, in its own thread, scripted and recording.

    >>> refuse_x = lambda address: "550 5.1.1 no" if address.startswith("x") else None
    >>> with SMTPTestServer(rcpt_reply=refuse_x) as server:
    ...     ...  # send mail to server.address; then look at server.messages

    Options:

    * ``host``: any 127.x.y.z; ``port``: 0 picks a free one (see :func:`free_port` to
      share one port between several hosts).
    * ``starttls_context`` offers STARTTLS (``require_starttls`` refuses mail before it);
      ``implicit_tls_context`` speaks TLS from the first byte (port-465 style).
    * ``auth``: ``{user: password}`` enables AUTH PLAIN and LOGIN; ``auth_require_tls``
      (default True: AUTH only after TLS), ``auth_required`` (MAIL answers 530 before AUTH).
    * ``hostname`` (greeting and EHLO name), ``data_size_limit`` (SIZE; None: no limit),
      ``enable_SMTPUTF8``.
    * ``mail_reply``/``rcpt_reply``: reply line or function of the address; ``None`` (or
      a 2xx) accepts. ``data_reply``: the same for the end of data, given the
      :class:`Received`; only accepted messages are recorded.
    * ``ehlo_disabled``: EHLO gets 502, so the client must fall back to HELO.
    * ``max_rcpt_per_transaction``: after that many accepted recipients in one
      transaction, RCPT gets ``452 4.5.3 Too many recipients``.
    * ``auth_reply``: a reply line to every AUTH, or a function of the user name
      returning one (``"454 4.7.0 try later"``); ``None`` (or a 2xx) checks the
      password as usual. Each AUTH the server judges is recorded in :attr:`commands`.

    Records (thread-safe snapshots): :attr:`messages` (accepted ones), :attr:`sessions_opened`
    (connections that got as far as the greeting; with implicit TLS, past the handshake),
    :attr:`active_sessions`, :attr:`max_concurrent_sessions`, :attr:`ehlo_names`,
    :attr:`helo_names`, :attr:`commands` (``(verb, argument)`` pairs, all sessions
    interleaved), :attr:`errors` (exceptions raised inside the server's scripts).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = "smtp.test",
        starttls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        implicit_tls_context: ssl.SSLContext | None = None,
        auth: dict[str, str] | None = None,
        auth_require_tls: bool = True,
        auth_required: bool = False,
        data_size_limit: int | None = DATA_SIZE_DEFAULT,
        enable_SMTPUTF8: bool = True,
        rcpt_reply: AddressScript = None,
        mail_reply: AddressScript = None,
        data_reply: DataScript = None,
        ehlo_disabled: bool = False,
        max_rcpt_per_transaction: int | None = None,
        auth_reply: AddressScript = None,
    ) -> None:
        _check_loopback(host)
        self.host = host
        self._requested_port = port
        self.port = port
        self._records = _Records()
        self._tracker = _Tracker(self._records)
        options = _Options(
            hostname=hostname,
            auth=dict(auth) if auth is not None else None,
            auth_required=auth_required,
            rcpt_reply=rcpt_reply,
            mail_reply=mail_reply,
            data_reply=data_reply,
            ehlo_disabled=ehlo_disabled,
            max_rcpt_per_transaction=max_rcpt_per_transaction,
            auth_reply=auth_reply,
        )
        self.handler = RecordingHandler(options, self._records)
        self._smtp_kwargs: dict[str, Any] = {
            "hostname": hostname,
            "data_size_limit": data_size_limit,
            "enable_SMTPUTF8": enable_SMTPUTF8,
            "decode_data": False,
            "tls_context": starttls_context,
            "require_starttls": require_starttls,
            "auth_require_tls": auth_require_tls,
        }
        if auth is None:
            self._smtp_kwargs["auth_exclude_mechanism"] = ["PLAIN", "LOGIN"]
        else:
            self._smtp_kwargs["authenticator"] = self.handler.authenticate
        self._implicit_tls_context = implicit_tls_context
        self._controller: _Controller | None = None

    # ----------------------------------------------------------------- life cycle

    def start(self) -> SMTPTestServer:
        """Bind, serve in a new thread, and return once the server answers."""
        if self._controller is not None:
            raise RuntimeError("server already started")
        port = self._requested_port or free_port(self.host)
        controller = _Controller(
            self.handler,
            host=self.host,
            port=port,
            ssl_context=self._implicit_tls_context,
            tracker=self._tracker,
            smtp_kwargs=self._smtp_kwargs,
        )
        controller.start()
        self._controller = controller
        self.port = port
        try:
            assert isinstance(controller.server, asyncio.Server)
            for listener in controller.server.sockets:
                # asyncio listens with a backlog of 100; raise it for big fan-out tests.
                with listener.dup() as duplicate:
                    duplicate.listen(BACKLOG)
        except BaseException:
            self.stop()
            raise
        # Controller.start() opened one connection to check the server answers; forget it.
        wait_until(lambda: self.active_sessions == 0, timeout=5.0)
        self.clear()
        return self

    def stop(self) -> None:
        """Drop open connections, stop the loop and join the thread. Idempotent."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(
                self._tracker.abort_all(timeout=2.0), controller.loop
            ).result(timeout=5.0)
        controller.stop()

    def __enter__(self) -> SMTPTestServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def clear(self) -> None:
        """Forget what was recorded so far (counters, messages, names, commands)."""
        with self._records.lock:
            active = self._records.active_sessions
            self._records.clear()
            self._records.active_sessions = active

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no session is open; True if that happened within ``timeout``.
        Blocks the thread: async tests ``await`` :meth:`idle` instead."""
        return wait_until(lambda: self.active_sessions == 0, timeout)

    async def idle(self, timeout: float = 5.0) -> bool:
        """:meth:`wait_idle` for async tests, on any event loop: ``assert await server.idle()``."""
        return await until(lambda: self.active_sessions == 0, timeout)

    # ----------------------------------------------------------------- records

    @property
    def messages(self) -> list[Received]:
        return self._records.snapshot("messages")

    @property
    def sessions_opened(self) -> int:
        return self._records.sessions_opened

    @property
    def active_sessions(self) -> int:
        return self._records.active_sessions

    @property
    def max_concurrent_sessions(self) -> int:
        return self._records.max_concurrent_sessions

    @property
    def ehlo_names(self) -> list[str]:
        return self._records.snapshot("ehlo_names")

    @property
    def helo_names(self) -> list[str]:
        return self._records.snapshot("helo_names")

    @property
    def commands(self) -> list[tuple[str, str]]:
        return self._records.snapshot("commands")

    @property
    def errors(self) -> list[BaseException]:
        return self._records.snapshot("errors")


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., SMTPTestServer]]:
    """Factory: ``smtp_server(**options)`` -> a started :class:`SMTPTestServer`.

    Every server made is stopped at teardown.
    """
    with contextlib.ExitStack() as stack:

        def make(**options: Any) -> SMTPTestServer:
            server = SMTPTestServer(**options).start()
            stack.callback(server.stop)
            return server

        yield make


# --------------------------------------------------------------------------- fault server

#: the stages a :class:`FaultBehaviour` can script; "message" is the reply after the dot.
FAULT_STAGES: tuple[str, ...] = (
    "greeting",
    "ehlo",
    "helo",
    "mail",
    "rcpt",
    "data",
    "message",
    "rset",
    "noop",
    "quit",
)
_ACTIONS = frozenset({"close", "silence", "garbage", "huge", "trickle", "close_mid_data"})
GARBAGE = b"this is not smtp\r\n"
_PATH = re.compile(r"^(?:FROM|TO):\s*<([^>]*)>\s*(.*)$", re.IGNORECASE | re.DOTALL)
_LINE_LIMIT = 2**20 + 1024


class _Action(NamedTuple):
    kind: str
    text: str = ""


def _parse_action(stage: str, action: str) -> _Action:
    if action.startswith("reply:"):
        text = action[len("reply:") :]
        if not text:
            raise ValueError(f"{stage}: empty reply in {action!r}")
        return _Action("reply", text)
    if action not in _ACTIONS:
        raise ValueError(f"{stage}: unknown fault {action!r}")
    if action == "close_mid_data" and stage != "data":
        raise ValueError("close_mid_data only applies to the 'data' stage")
    return _Action(action)


@dataclass(frozen=True)
class FaultBehaviour:
    """What a :class:`FaultServer` does at each stage; ``None`` means answer normally.

    A stage's fault is one of:

    * ``"close"``: close the connection instead of answering;
    * ``"reply:<text>"``: answer ``<text>`` (may hold ``\\r\\n`` for multi-line replies);
      after a 421 the server closes the connection, as RFC 5321 section 3.8 says;
    * ``"silence"``: never answer; keep reading until the client closes;
    * ``"garbage"``: answer ``this is not smtp``;
    * ``"huge"``: send ``NNN-`` and ``huge_size`` bytes with no CRLF, then the normal reply;
    * ``"trickle"``: send the normal reply one byte per ``trickle_interval`` seconds;
    * ``"close_mid_data"`` (``data`` only): send 354, close once body bytes arrive.

    ``fail_first=N`` applies the faults to the first N connections only (later ones are
    served normally). ``only_recipients`` limits the ``rcpt`` fault to those addresses,
    and the ``data``/``message`` faults to transactions naming one of them.
    """

    greeting: str | None = None
    ehlo: str | None = None
    helo: str | None = None
    mail: str | None = None
    rcpt: str | None = None
    data: str | None = None
    message: str | None = None
    rset: str | None = None
    noop: str | None = None
    quit: str | None = None
    capabilities: tuple[str, ...] = ("PIPELINING", "SIZE 10485760", "8BITMIME")
    hostname: str = "fault.test"
    fail_first: int | None = None
    only_recipients: Collection[str] | None = None
    trickle_interval: float = 1.0
    huge_size: int = 2**20

    def __post_init__(self) -> None:
        for stage in FAULT_STAGES:
            action = getattr(self, stage)
            if action is not None:
                _parse_action(stage, action)

    def action(self, stage: str) -> _Action | None:
        action: str | None = getattr(self, stage)
        return None if action is None else _parse_action(stage, action)


_BEHAVIOUR_FIELDS = frozenset(f.name for f in fields(FaultBehaviour))


class _LoopThread:
    """An asyncio event loop running forever in a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10.0)
        if not self._thread.is_alive():
            self.loop.close()


class FaultServer:
    """A raw TCP server speaking minimal SMTP, misbehaving on cue (see :class:`FaultBehaviour`).

    Normal run: ``220 fault.test ESMTP``; EHLO lists ``capabilities`` (never STARTTLS);
    MAIL/RCPT 250; DATA 354; 250 after the dot; QUIT 221. Commands may arrive pipelined.

    Records (thread-safe snapshots): :attr:`connections`, :attr:`messages` (accepted ones,
    body dot-unstuffed), :attr:`recipients` (every RCPT answered 2xx),
    :attr:`max_concurrent`, :attr:`commands` (raw command lines), :attr:`ehlo_names`,
    :attr:`errors` (unexpected exceptions inside the server).
    """

    def __init__(
        self, behaviour: FaultBehaviour | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        _check_loopback(host)
        self.behaviour = behaviour or FaultBehaviour()
        self.host = host
        self.port = port
        self._requested_port = port
        self._lock = threading.Lock()
        self._connections = 0
        self._active = 0
        self._max_concurrent = 0
        self._messages: list[Received] = []
        self._recipients: list[str] = []
        self._commands: list[str] = []
        self._ehlo_names: list[str] = []
        self._errors: list[BaseException] = []
        self._runner: _LoopThread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    # ----------------------------------------------------------------- life cycle

    def start(self) -> FaultServer:
        if self._runner is not None:
            raise RuntimeError("server already started")
        runner = _LoopThread(f"FaultServer {self.host}")
        try:
            self.port = runner.run(self._open())
        except BaseException:
            runner.close()
            raise
        self._runner = runner
        return self

    async def _open(self) -> int:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._requested_port, limit=_LINE_LIMIT, backlog=BACKLOG
        )
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        """Drop every connection, close the listener, end the thread. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            runner.run(self._close(), timeout=10.0)
        finally:
            runner.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> FaultServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # ----------------------------------------------------------------- records

    @property
    def connections(self) -> int:
        return self._connections

    @property
    def active(self) -> int:
        return self._active

    @property
    def max_concurrent(self) -> int:
        return self._max_concurrent

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    @property
    def recipients(self) -> list[str]:
        with self._lock:
            return list(self._recipients)

    @property
    def commands(self) -> list[str]:
        with self._lock:
            return list(self._commands)

    @property
    def ehlo_names(self) -> list[str]:
        with self._lock:
            return list(self._ehlo_names)

    @property
    def errors(self) -> list[BaseException]:
        with self._lock:
            return list(self._errors)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no connection is open; True if that happened within ``timeout``.
        Blocks the thread: async tests ``await`` :meth:`idle` instead."""
        return wait_until(lambda: self._active == 0, timeout)

    async def idle(self, timeout: float = 5.0) -> bool:
        """:meth:`wait_idle` for async tests, on any event loop: ``assert await server.idle()``."""
        return await until(lambda: self._active == 0, timeout)

    # ----------------------------------------------------------------- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        with self._lock:
            index = self._connections
            self._connections += 1
            self._active += 1
            self._max_concurrent = max(self._max_concurrent, self._active)
        fail_first = self.behaviour.fail_first
        faulty = fail_first is None or index < fail_first
        try:
            await _FaultSession(self, reader, writer, faulty).run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: part of the game
        except Exception as error:
            with self._lock:
                self._errors.append(error)
        finally:
            with self._lock:
                self._active -= 1
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)

    def _record(self, items: list[_T], item: _T) -> None:
        with self._lock:
            items.append(item)


class _FaultSession:
    """One connection to a :class:`FaultServer`: a command loop with scripted faults."""

    def __init__(
        self,
        server: FaultServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        faulty: bool,
    ) -> None:
        self.server = server
        self.behaviour = server.behaviour
        self.reader = reader
        self.writer = writer
        self.faulty = faulty
        self.helo_name: str | None = None
        self._reset()

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.mail_options: list[str] = []
        self.rcpt_tos: list[str] = []
        self.rcpt_options: list[str] = []
        self.tried: list[str] = []  # every RCPT address of this transaction

    # ----------------------------------------------------------------- replies

    def _plan(self, stage: str, applies: bool = True) -> _Action | None:
        return self.behaviour.action(stage) if self.faulty and applies else None

    @staticmethod
    def _reply_text(action: _Action | None, normal: str) -> str | None:
        """The reply line the client will get (None: none at all)."""
        if action is None or action.kind in ("huge", "trickle"):
            return normal
        if action.kind == "reply":
            return action.text
        if action.kind == "garbage":
            return GARBAGE.decode().rstrip()
        return None

    async def _send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _perform(self, action: _Action | None, normal: str) -> bool:
        """Answer as planned; False when the session is over."""
        line = normal.encode("utf-8") + b"\r\n"
        if action is None:
            await self._send(line)
            return True
        if action.kind == "reply":
            await self._send(action.text.encode("utf-8") + b"\r\n")
            return not action.text.startswith("421")
        if action.kind == "garbage":
            await self._send(GARBAGE)
            return True
        if action.kind == "huge":
            # Looks like the start of a continuation line ("250-xxx...") that never ends;
            # the normal reply then follows on the same, by now 1 MB long, line.
            await self._send(line[:3] + b"-" + b"x" * self.behaviour.huge_size)
            await self._send(line)
            return True
        if action.kind == "trickle":
            for byte in line:
                await asyncio.sleep(self.behaviour.trickle_interval)
                await self._send(bytes([byte]))
            return True
        if action.kind == "silence":
            while await self.reader.read(65536):
                pass
        return False  # close, silence, close_mid_data

    async def _answer(self, stage: str, normal: str, applies: bool = True) -> bool:
        return await self._perform(self._plan(stage, applies), normal)

    # ----------------------------------------------------------------- the session

    async def run(self) -> None:
        name = self.behaviour.hostname
        if not await self._answer("greeting", f"220 {name} ESMTP"):
            return
        while True:
            try:
                raw = await self.reader.readline()
            except ValueError:  # longer than the stream limit
                await self._send(b"500 5.5.2 Line too long\r\n")
                return
            if not raw.endswith(b"\n"):
                return  # EOF
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            self.server._record(self.server._commands, line)
            verb, _, argument = line.partition(" ")
            if not await self._command(verb.upper(), argument.strip()):
                return

    async def _command(self, verb: str, argument: str) -> bool:
        if verb == "EHLO":
            return await self._ehlo(argument)
        if verb == "HELO":
            self.helo_name = argument
            self._reset()
            return await self._answer("helo", f"250 {self.behaviour.hostname}")
        if verb == "MAIL":
            return await self._mail(argument)
        if verb == "RCPT":
            return await self._rcpt(argument)
        if verb == "DATA":
            return await self._data()
        if verb == "RSET":
            self._reset()
            return await self._answer("rset", "250 2.0.0 OK")
        if verb == "NOOP":
            return await self._answer("noop", "250 2.0.0 OK")
        if verb == "QUIT":
            await self._answer("quit", "221 2.0.0 Bye")
            return False
        if verb == "STARTTLS":
            await self._send(b"454 4.7.0 TLS not available\r\n")
        elif verb == "AUTH":
            await self._send(b"502 5.5.1 AUTH not available\r\n")
        elif verb == "VRFY":
            await self._send(b"252 2.1.5 Cannot VRFY user\r\n")
        else:
            await self._send(b"500 5.5.2 Command not recognized\r\n")
        return True

    async def _ehlo(self, name: str) -> bool:
        self.helo_name = name
        self.server._record(self.server._ehlo_names, name)
        self._reset()
        lines = [self.behaviour.hostname, *self.behaviour.capabilities]
        reply = "\r\n".join(
            f"250{' ' if i == len(lines) - 1 else '-'}{text}" for i, text in enumerate(lines)
        )
        return await self._answer("ehlo", reply)

    async def _mail(self, argument: str) -> bool:
        match = _PATH.match(argument)
        if match is None or not argument.upper().startswith("FROM:"):
            await self._send(b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
            return True
        if self.mail_from is not None:
            await self._send(b"503 5.5.1 Nested MAIL command\r\n")
            return True
        action = self._plan("mail")
        reply = self._reply_text(action, "250 2.1.0 OK")
        if reply is not None and reply.startswith("2"):
            self.mail_from = match.group(1)
            self.mail_options = match.group(2).split()
        return await self._perform(action, "250 2.1.0 OK")

    async def _rcpt(self, argument: str) -> bool:
        match = _PATH.match(argument)
        if match is None or not argument.upper().startswith("TO:"):
            await self._send(b"501 5.5.4 Syntax: RCPT TO:<address>\r\n")
            return True
        if self.mail_from is None:
            await self._send(b"503 5.5.1 Need MAIL command\r\n")
            return True
        address = match.group(1)
        self.tried.append(address)
        only = self.behaviour.only_recipients
        action = self._plan("rcpt", applies=only is None or address in only)
        reply = self._reply_text(action, "250 2.1.5 OK")
        if reply is not None and reply.startswith("2"):
            self.rcpt_tos.append(address)
            self.rcpt_options.extend(match.group(2).split())
            self.server._record(self.server._recipients, address)
        return await self._perform(action, "250 2.1.5 OK")

    def _transaction_applies(self) -> bool:
        only = self.behaviour.only_recipients
        return only is None or any(address in only for address in self.tried)

    async def _data(self) -> bool:
        if self.mail_from is None:
            await self._send(b"503 5.5.1 Need MAIL command\r\n")
            return True
        if not self.rcpt_tos:
            await self._send(b"554 5.5.1 No valid recipients\r\n")
            return True
        applies = self._transaction_applies()
        action = self._plan("data", applies)
        go_ahead = "354 End data with <CR><LF>.<CR><LF>"
        if action is not None and action.kind == "close_mid_data":
            await self._send(go_ahead.encode() + b"\r\n")
            await self.reader.read(1)  # some body bytes are here (or EOF)
            return False
        reply = self._reply_text(action, go_ahead)
        if not await self._perform(action, go_ahead):
            return False
        if reply is None or not reply.startswith("354"):
            return True
        content = await self._read_body()
        if content is None:
            return False
        action = self._plan("message", applies)
        reply = self._reply_text(action, "250 2.0.0 OK: queued")
        if reply is not None and reply.startswith("2"):
            peer = self.writer.get_extra_info("peername")
            message = Received(
                mail_from=self.mail_from,
                rcpt_tos=list(self.rcpt_tos),
                content=content,
                mail_options=list(self.mail_options),
                rcpt_options=list(self.rcpt_options),
                peer=_peer(peer),
                tls=False,
                auth_user=None,
                helo_name=self.helo_name,
            )
            self.server._record(self.server._messages, message)
        self._reset()
        return await self._perform(action, "250 2.0.0 OK: queued")

    async def _read_body(self) -> bytes | None:
        """The body up to the line ``.`` (RFC 5321 section 4.5.2 dot-unstuffed); None on EOF."""
        lines: list[bytes] = []
        while True:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                return None
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line[1:] if line.startswith(b".") else line)


@pytest.fixture
def fault_server() -> Iterator[Callable[..., FaultServer]]:
    """Factory: ``fault_server(rcpt="close", fail_first=1, host=..., port=...)`` -> started.

    Keyword arguments are :class:`FaultBehaviour` fields plus ``host``, ``port`` and
    ``behaviour`` (a ready :class:`FaultBehaviour`). Every server made is stopped at teardown.
    """
    with contextlib.ExitStack() as stack:

        def make(
            behaviour: FaultBehaviour | None = None,
            *,
            host: str = "127.0.0.1",
            port: int = 0,
            **stages: Any,
        ) -> FaultServer:
            unknown = set(stages) - _BEHAVIOUR_FIELDS
            if unknown:
                raise TypeError(f"unknown FaultBehaviour fields: {sorted(unknown)}")
            if behaviour is None:
                behaviour = FaultBehaviour(**stages)
            elif stages:
                raise TypeError("give either behaviour= or its fields, not both")
            server = FaultServer(behaviour, host=host, port=port).start()
            stack.callback(server.stop)
            return server

        yield make
