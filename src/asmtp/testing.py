"""A test outbox for applications that send mail with asmtp: a real SMTP server on
127.0.0.1 that records every message it accepts, and the pytest fixture
``asmtp_outbox`` that gives each test a fresh one.

This module owns :class:`Outbox` (the server: its own thread and event loop, a port
chosen by the kernel, scripted refusals and transient failures, optional AUTH) and
:class:`SentMessage` (one accepted message, parsed), and :class:`LocalServer` (an
outbox that keeps each message as a ``.eml`` file: ``asmtp demo``'s server). Nothing
leaves the machine: the server listens on loopback only and the relay it hands out
speaks plaintext to it.

It needs aiosmtpd, which asmtp installs only as an extra (``pip install
'asmtp[testing]'``). With asmtp installed, pytest finds the fixture by itself: the
``pytest11`` entry point is the thin :mod:`asmtp._pytest_plugin`, which imports this
module only when a test asks for ``asmtp_outbox``::

    async def test_welcome(asmtp_outbox):
        await myapp.send_welcome(asmtp_outbox.relay, "ann@example.org", "Ann")
        [message] = asmtp_outbox.messages
        assert message.subject == "Welcome, Ann"

PYTEST_DONT_REWRITE: pytest loads this module as a plugin; it has no test asserts to
rewrite, and the marker keeps pytest from warning when it was imported first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from email.parser import BytesParser
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self

import anyio

try:
    from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
except ModuleNotFoundError as exc:  # an extra, not a dependency of asmtp: say which
    raise ModuleNotFoundError(
        "asmtp's test outbox (asmtp.testing, asmtp.testing) needs aiosmtpd: "
        "pip install 'asmtp[testing]'",
        name=exc.name,
    ) from exc

from .config import Relay
from .errors import InputError

__all__ = ["FailureStage", "LocalServer", "Outbox", "SentMessage"]

#: Where a scripted failure (:meth:`Outbox.fail_next`) answers: MAIL FROM, each RCPT
#: TO, or the reply after the end-of-data dot.
FailureStage = Literal["mail", "rcpt", "data"]

_HOST = "127.0.0.1"
_REPLY = re.compile(r"[45][0-9][0-9](?: [^\r\n]*)?")


def _check_failure_reply(reply: str) -> str:
    """A scripted refusal must be one 4xx or 5xx reply line: ``"550 5.1.1 no such user"``."""
    if not isinstance(reply, str) or not _REPLY.fullmatch(reply):
        raise InputError(f"a scripted reply must be one 4xx or 5xx reply line: {reply!r}")
    return reply


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SentMessage:
    """One message the outbox accepted: its envelope as the server saw it, the bytes
    after DATA (dot-unstuffed, without the final ``.``), and parsed views of them.

    ``mail_from``/``rcpt_tos`` are the envelope (``rcpt_tos`` holds Bcc recipients
    too, and only the recipients the server accepted); ``to``/``cc`` read the headers.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    mail_options: tuple[str, ...] = ()
    rcpt_options: tuple[str, ...] = ()
    #: the EHLO/HELO name the client gave
    helo: str | None = None
    #: the user name the session authenticated as (only with ``Outbox(auth=...)``)
    auth_user: str | None = None
    #: which connection carried it (1 for the first the outbox accepted, and so on)
    session: int = 0

    @cached_property
    def message(self) -> EmailMessage:
        """The message parsed with :data:`email.policy.default`."""
        parsed = BytesParser(policy=policy.default).parsebytes(self.data)
        if not isinstance(parsed, EmailMessage):  # policy.default always builds one
            raise TypeError(f"expected an EmailMessage, got {type(parsed).__name__}")
        return parsed

    @property
    def subject(self) -> str | None:
        value = self.message["Subject"]
        return None if value is None else str(value)

    @property
    def from_(self) -> str | None:
        """The first address of the From header."""
        addresses = self._addresses("From")
        return addresses[0] if addresses else None

    @property
    def to(self) -> list[str]:
        """The addresses of the To header (``ann@example.org``, display names dropped)."""
        return self._addresses("To")

    @property
    def cc(self) -> list[str]:
        return self._addresses("Cc")

    @property
    def text(self) -> str | None:
        """The plain-text body (the text/plain alternative when there are several),
        with ``\\n`` line endings; None when the message has none."""
        return self._body("plain")

    @property
    def html(self) -> str | None:
        """The HTML body, with ``\\n`` line endings; None when the message has none."""
        return self._body("html")

    @property
    def attachments(self) -> list[EmailMessage]:
        """The attachment parts (``part.get_filename()``, ``part.get_content()``)."""
        return [part for part in self.message.iter_attachments() if isinstance(part, EmailMessage)]

    def _addresses(self, name: str) -> list[str]:
        header = self.message[name]
        if not isinstance(header, AddressHeader):
            return []
        return [address.addr_spec for address in header.addresses]

    def _body(self, subtype: str) -> str | None:
        part = self.message.get_body(preferencelist=(subtype,))
        if part is None:
            return None
        content = part.get_content()
        if not isinstance(content, str):
            return None
        return content.replace("\r\n", "\n")


@dataclass
class _Script:
    """What the server answers besides "250", and what it has accepted; guarded by
    ``lock`` (written from the server thread, read from the test's)."""

    refusals: dict[str, str] = field(default_factory=dict)
    failures: dict[FailureStage, list[str]] = field(default_factory=dict)
    users: dict[str, str] | None = None
    on_message: Callable[[SentMessage], None] | None = None
    messages: list[SentMessage] = field(default_factory=list)
    sessions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def next_failure(self, stage: FailureStage) -> str | None:
        with self.lock:
            pending = self.failures.get(stage)
            return pending.pop(0) if pending else None

    def refusal(self, address: str) -> str | None:
        with self.lock:
            return self.refusals.get(address.lower())

    def record(self, message: SentMessage) -> None:
        if self.on_message is not None:
            self.on_message(message)  # before the 250: the caller sees it done
        with self.changed:
            self.messages.append(message)
            self.changed.notify_all()


# --------------------------------------------------------------------------- the server


class _Handler:
    """aiosmtpd hooks answering from the script. No attribute may start with ``auth_``:
    aiosmtpd would take it for an AUTH mechanism."""

    def __init__(self, script: _Script) -> None:
        self.script = script

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.script.users is not None and not session.authenticated:
            return "530 5.7.0 Authentication required"
        failure = self.script.next_failure("mail")
        if failure is not None:
            return _fail(server, failure)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.script.refusal(address) or self.script.next_failure("rcpt")
        if reply is not None:
            return _fail(server, reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        failure = self.script.next_failure("data")
        if failure is not None:
            return _fail(server, failure)
        auth_data = session.auth_data if session.authenticated else None
        self.script.record(
            SentMessage(
                mail_from=envelope.mail_from or "",
                rcpt_tos=tuple(envelope.rcpt_tos),
                data=envelope.original_content or b"",
                mail_options=tuple(envelope.mail_options),
                rcpt_options=tuple(envelope.rcpt_options),
                helo=session.host_name,
                auth_user=auth_data if isinstance(auth_data, str) else None,
                session=server.outbox_session if isinstance(server, _Protocol) else 0,
            )
        )
        return "250 2.0.0 OK: recorded by the asmtp test outbox"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd ``authenticator`` for AUTH PLAIN and LOGIN."""
        users = self.script.users or {}
        if isinstance(data, LoginPassword):
            user = data.login.decode("utf-8", "replace")
            if users.get(user) == data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)


def _fail(server: SMTP, reply: str) -> str:
    if reply.startswith("421"):
        # RFC 5321 section 3.8: after 421 the server closes the connection. The reply
        # is written before this callback runs, and close() flushes it.
        transport = server.transport
        if transport is not None:
            asyncio.get_running_loop().call_soon(transport.close)
    return reply


class _Connections:
    """The live connections of one outbox (touched only in its loop's thread), so
    that stopping it closes them all and no transport outlives the loop."""

    def __init__(self) -> None:
        self.live: set[_Protocol] = set()
        self._empty: asyncio.Event | None = None

    def add(self, protocol: _Protocol) -> None:
        self.live.add(protocol)

    def discard(self, protocol: _Protocol) -> None:
        self.live.discard(protocol)
        if not self.live and self._empty is not None:
            self._empty.set()

    async def abort_all(self, timeout: float) -> None:
        if not self.live:
            return
        self._empty = asyncio.Event()
        for protocol in list(self.live):
            transport = protocol.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout)


class _Protocol(SMTP):
    """aiosmtpd's SMTP protocol, numbering its connections and tracking live ones."""

    def __init__(self, handler: _Handler, connections: _Connections, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.outbox_connections = connections
        script = handler.script
        with script.lock:
            script.sessions += 1
            self.outbox_session = script.sessions

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.outbox_connections.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.outbox_connections.discard(self)
        super().connection_lost(error)


class Outbox:
    """A local SMTP server that records every message it receives.

    >>> with Outbox(refuse={"bad@example.org": "550 5.1.1 no such user"}) as outbox:
    ...     ...  # send with relay=outbox.relay, then look at outbox.messages

    * ``refuse``: ``{address: reply}``; RCPT TO that address (any case) gets ``reply``
      (a 4xx or 5xx line). More with :meth:`refuse`.
    * ``auth``: ``{user: password}`` turns on AUTH PLAIN and LOGIN (over plaintext: this
      is loopback) and makes MAIL without AUTH fail with 530. Send with
      ``outbox.relay_with(username=..., password=...)``.
    * :meth:`fail_next` scripts transient (or any) failures for the next transactions.
    * ``hostname``: the name in the greeting; ``data_size_limit``: the SIZE offered
      (None: no limit); ``on_message``: called (in the server's thread) with each
      accepted message before the server answers 250.

    Start and stop with ``with``/``async with`` or :meth:`start`/:meth:`stop`. Records
    are thread-safe snapshots; the server runs in its own thread, so a test may block
    on :meth:`wait_for` (or ``await`` :meth:`await_for` from async code).
    """

    def __init__(
        self,
        *,
        refuse: Mapping[str, str] | None = None,
        auth: Mapping[str, str] | None = None,
        hostname: str = "outbox.asmtp.test",
        data_size_limit: int | None = 32 * 1024 * 1024,
        on_message: Callable[[SentMessage], None] | None = None,
        port: int = 0,
    ) -> None:
        if not isinstance(port, int) or not 0 <= port < 65536:
            raise InputError(f"port must be 0 (any free port) or 1-65535: {port!r}")
        self._script = _Script(
            users=dict(auth) if auth is not None else None, on_message=on_message
        )
        for address, reply in (refuse or {}).items():
            self.refuse(address, reply)
        self.host = _HOST
        #: the port listened on; before :meth:`start`, the one asked for (0: any free one)
        self.port = port
        self.hostname = hostname
        self._data_size_limit = data_size_limit
        self._connections = _Connections()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    # ----------------------------------------------------------------- scripting

    def refuse(self, address: str, reply: str = "550 5.1.1 no such user") -> None:
        """Answer RCPT TO ``address`` (compared case-insensitively) with ``reply``."""
        _check_failure_reply(reply)
        with self._script.lock:
            self._script.refusals[address.lower()] = reply

    def fail_next(
        self, n: int = 1, reply: str = "421 4.3.2 try later", *, stage: FailureStage = "mail"
    ) -> None:
        """Answer the next ``n`` commands of ``stage`` with ``reply`` instead of 250.

        ``stage`` is "mail" (MAIL FROM: the next ``n`` transactions fail), "rcpt" (each
        RCPT TO counts) or "data" (the reply after the end-of-data dot; the message is
        then not recorded). After a 421 the server closes the connection, as RFC 5321
        says. Calls add up: ``fail_next(1); fail_next(1, "451 ...")`` fails two.
        """
        if not isinstance(n, int) or n < 0:
            raise InputError(f"n must be a non-negative integer: {n!r}")
        if stage not in ("mail", "rcpt", "data"):
            raise InputError(f"stage must be mail, rcpt or data: {stage!r}")
        _check_failure_reply(reply)
        with self._script.lock:
            self._script.failures.setdefault(stage, []).extend([reply] * n)

    # ----------------------------------------------------------------- life cycle

    def start(self) -> Self:
        """Listen on 127.0.0.1, on a free port chosen by the kernel (so parallel test
        runs never race for one) unless a ``port`` was given, and serve from a new
        thread. A port in use is an :class:`~asmtp.errors.InputError`."""
        if self._thread is not None:
            raise RuntimeError("the outbox is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="asmtp-outbox", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._server = asyncio.run_coroutine_threadsafe(self._listen(), loop).result(10.0)
        except OSError as exc:
            self._end_thread()
            raise InputError(f"cannot listen on {_HOST}:{self.port}: {exc.strerror}") from None
        except BaseException:
            self._end_thread()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        handler = _Handler(self._script)
        options: dict[str, Any] = {
            "hostname": self.hostname,  # given, so aiosmtpd does not look the name up
            "data_size_limit": self._data_size_limit,
            "enable_SMTPUTF8": True,
            "decode_data": False,
            "loop": loop,  # given, so aiosmtpd does not probe for (or make) a loop
        }
        if self._script.users is not None:
            # AUTH over plaintext (loopback only); required by handle_MAIL, since
            # aiosmtpd's own auth_required warns without TLS.
            options["auth_require_tls"] = False
            options["authenticator"] = handler.authenticate
        return await loop.create_server(
            lambda: _Protocol(handler, self._connections, **options), _HOST, self.port
        )

    def stop(self) -> None:
        """Close every connection and the listener, end the thread. Idempotent; the
        messages stay readable."""
        loop = self._loop
        if loop is None:
            return
        try:
            if loop.is_running():
                asyncio.run_coroutine_threadsafe(self._close(), loop).result(10.0)
        finally:
            self._end_thread()

    async def _close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._connections.abort_all(timeout=5.0)
        # What is left (a handler task between commands) is cancelled and awaited.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        if server is not None:
            await server.wait_closed()

    def _end_thread(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10.0)
        if not thread.is_alive():
            loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        await anyio.to_thread.run_sync(self.stop)

    # ----------------------------------------------------------------- where to send

    @property
    def relay(self) -> Relay:
        """An :class:`asmtp.Relay` for this outbox: plaintext (``tls="none"``), and
        ``allow_plaintext_auth=True`` so that credentials, when given, may be sent."""
        if self._thread is None:
            raise RuntimeError("start the outbox first (with Outbox() as outbox: ...)")
        return Relay(self.host, self.port, tls="none", allow_plaintext_auth=True)

    def relay_with(self, **changes: Any) -> Relay:
        """:attr:`relay` with some settings changed: ``relay_with(username="u", password="p")``."""
        return self.relay.with_(**changes)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # ----------------------------------------------------------------- records

    @property
    def messages(self) -> list[SentMessage]:
        """Every message accepted so far, oldest first (a snapshot)."""
        with self._script.lock:
            return list(self._script.messages)

    @property
    def sessions_opened(self) -> int:
        """Connections accepted so far."""
        with self._script.lock:
            return self._script.sessions

    def __len__(self) -> int:
        with self._script.lock:
            return len(self._script.messages)

    def __iter__(self) -> Iterator[SentMessage]:
        return iter(self.messages)

    def clear(self) -> None:
        """Forget the messages received so far (refusals and pending failures stay)."""
        with self._script.lock:
            self._script.messages.clear()

    def find(
        self,
        *,
        to: str | None = None,
        subject: str | re.Pattern[str] | None = None,
        from_: str | None = None,
    ) -> list[SentMessage]:
        """The messages matching every criterion given: ``to`` among the envelope
        recipients (any case; Bcc included), ``subject`` equal (or, for a compiled
        pattern, found by ``search``), ``from_`` the envelope sender (any case)."""
        found = []
        for message in self.messages:
            if to is not None and to.lower() not in (r.lower() for r in message.rcpt_tos):
                continue
            if from_ is not None and from_.lower() != message.mail_from.lower():
                continue
            if subject is not None:
                actual = message.subject
                if actual is None:
                    continue
                if isinstance(subject, re.Pattern):
                    if not subject.search(actual):
                        continue
                elif actual != subject:
                    continue
            found.append(message)
        return found

    def wait_for(self, count: int, timeout: float = 5.0) -> list[SentMessage]:
        """Block until at least ``count`` messages are recorded; return them all.

        Raises :class:`TimeoutError` after ``timeout`` seconds. For code that sends in
        the background (a task queue, a thread); from async code use :meth:`await_for`.
        """
        script = self._script
        with script.changed:
            if script.changed.wait_for(lambda: len(script.messages) >= count, timeout):
                return list(script.messages)
        raise TimeoutError(self._shortfall(count, timeout))

    async def await_for(self, count: int, timeout: float = 5.0) -> list[SentMessage]:
        """:meth:`wait_for` for async code: checks every 10 ms without blocking the
        event loop (asyncio or trio), and can be cancelled."""
        deadline = anyio.current_time() + timeout
        while True:
            messages = self.messages
            if len(messages) >= count:
                return messages
            if anyio.current_time() >= deadline:
                raise TimeoutError(self._shortfall(count, timeout))
            await anyio.sleep(0.01)

    def _shortfall(self, count: int, timeout: float) -> str:
        return f"expected {count} message(s) in the outbox within {timeout} s, got {len(self)}"

    def __repr__(self) -> str:
        state = f"{self.host}:{self.port}" if self._thread is not None else "stopped"
        return f"<Outbox {state} messages={len(self)}>"


# --------------------------------------------------------------------------- demo
class LocalServer(Outbox):
    """An SMTP server on 127.0.0.1; each message lands in ``directory`` (a new
    temporary folder unless given) as ``NNNNN-recipient.eml``, with its envelope in
    ``X-Envelope-From``/``X-Envelope-To`` header lines.

    >>> async with LocalServer() as server:
    ...     relay = asmtp.Relay(server.host, server.port, tls="none")
    """

    def __init__(self, directory: str | Path | None = None, *, port: int = 0) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="asmtp-demo-"))
        _check_folder(self.directory)
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        super().__init__(hostname="demo.asmtp.test", on_message=self._keep, port=port)

    @property
    def received(self) -> int:
        return len(self)

    def _keep(self, message: SentMessage) -> None:
        with self._lock:
            number = next(self._numbers)
        rcpts = ",".join(message.rcpt_tos)
        path = self.directory / f"{number:05d}-{rcpts[:60].replace('/', '_')}.eml"
        envelope = f"X-Envelope-From: <{message.mail_from}>\r\nX-Envelope-To: {rcpts}\r\n"
        path.write_bytes(envelope.encode() + message.data)


def _check_folder(directory: Path) -> None:
    """Make ``directory`` if needed and try writing in it: a file, a path under a
    file, or a place that cannot be written (a read-only mount, /proc) is refused now
    rather than as a failure in the server's thread for every message."""
    shown = str(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{shown!r} is not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise InputError(f"cannot keep messages in {shown!r}: {exc.strerror}") from None


# --------------------------------------------------------------------------- pytest

# The plugin's fixture, here too, so that ``-p asmtp.testing`` and imports of it work.
try:
    from ._pytest_plugin import asmtp_outbox
except ImportError:  # Outbox works without pytest; only the fixture needs it
    pass
else:
    __all__ += ["asmtp_outbox"]
