"""Bounces read back: the messages that came back to a run's sender, fetched from an
IMAP or POP3 mailbox and classified, one :class:`~asmtp._core.bounce.Bounce` per
recipient they report on.

This module owns reading a mailbox of returned mail (:func:`read_imap`,
:func:`read_pop3`, the :class:`Mailbox` they read) and what is done to each message
once read (IMAP: marked seen, or moved to a folder; POP3: deleted if asked). What a
message says is :func:`classify`'s (:mod:`asmtp._core.bounce`, sans-IO), re-exported
here for callers with a mailbox of their own::

    async for returned in asmtp.bounces.read_imap(
        "imaps://bounces%40example.com@imap.example.com/INBOX", password=secret
    ):
        for bounce in returned.bounces:
            if bounce.kind in ("hard", "complaint"):
                stop_mailing(bounce.recipient)

Why the standard library's :mod:`imaplib` and :mod:`poplib`, each run in a worker
thread (``anyio.to_thread``) rather than an asyncio IMAP client: no extra dependency;
they work the same under asyncio and trio; and reading a mailbox is not a hot path (a
few messages a minute, not thousands of sessions), so a thread per mailbox connection
costs nothing that matters. Each connection's calls run one at a time, every blocking
call with ``timeout``; the IDLE wait (``follow=True``) checks its deadline every second.

Certificates are verified (``ssl.create_default_context()`` or the caller's context);
``imap://`` and ``pop3://`` must upgrade with STARTTLS/STLS before the login, or the
password is never sent. Errors are asmtp's: :class:`~asmtp.errors.ConnectError` and
its kin for the network, :class:`~asmtp.errors.MailboxError` for a refused login, a
missing mailbox or a refused command, :class:`~asmtp.errors.InputError` for a bad URL;
none carries the password. Layer 5: may import any layer below.
"""

from __future__ import annotations

import contextlib
import imaplib
import poplib
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread

from ._core.bounce import Bounce, BounceKind, classify
from ._core.sanitize import printable
from ._io.exceptions import translate
from .errors import (
    ConnectionLostError,
    InputError,
    MailboxError,
    SMTPError,
    SMTPTimeoutError,
    TLSUnavailableError,
)

__all__ = [
    "DEFAULT_MAX_SIZE",
    "Bounce",
    "BounceKind",
    "Mailbox",
    "Returned",
    "classify",
    "read_imap",
    "read_pop3",
]

_T = TypeVar("_T")

#: octets of a message fetched at most: a bounce's report is near its start, and a
#: message that returns a large attachment is read only that far
DEFAULT_MAX_SIZE = 1024 * 1024
#: the ports of each scheme (RFC 8314: implicit TLS on 993 and 995)
_PORTS = {"imaps": 993, "imap": 143, "pop3s": 995, "pop3": 110}
#: how often a waiting IDLE looks at its deadline and at a request to stop
_IDLE_TICK = 1.0
#: an IDLE is ended and begun again at least this often (RFC 2177: before 29 minutes)
_IDLE_MAX = 20 * 60.0
_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
_EXISTS = re.compile(rb"^\* \d+ EXISTS\r?$")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """Where returned mail is read: ``Mailbox.parse("imaps://USER@HOST[:PORT]/MAILBOX")``.

    ``imaps://`` (implicit TLS, port 993) or ``imap://`` (STARTTLS required, 143),
    ``pop3s://`` (995) or ``pop3://`` (STLS required, 110). USER is percent-encoded
    (``bounces%40example.com``); MAILBOX (IMAP only) defaults to INBOX. No password in
    the URL: it is given apart (flags and logs show URLs).

    >>> Mailbox.parse("imap://ann%40example.org@[::1]/Bounces").label
    'imap://ann%40example.org@[::1]:143/Bounces'
    """

    protocol: Literal["imap", "pop3"]
    host: str
    port: int
    user: str
    mailbox: str = "INBOX"
    implicit_tls: bool = True

    @classmethod
    def parse(cls, url: str) -> Mailbox:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InputError(f"not a mailbox URL: {printable(url)!r} ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in _PORTS:
            raise InputError(
                f"not a mailbox URL: {printable(url)!r} (imaps://, imap://, pop3s:// or pop3://)"
            )
        if parts.password is not None:
            raise InputError("put no password in the mailbox URL: it is given apart")
        if not parts.username or not parts.hostname:
            raise InputError(f"a mailbox URL names its user and host: {scheme}://USER@HOST/")
        if parts.query or parts.fragment:
            raise InputError(f"a mailbox URL has no query or fragment: {printable(url)!r}")
        protocol: Literal["imap", "pop3"] = "imap" if scheme.startswith("imap") else "pop3"
        name = urllib.parse.unquote(parts.path.lstrip("/"))
        if protocol == "pop3" and name:
            raise InputError("POP3 has one mailbox: no /MAILBOX in a pop3:// URL")
        if not name.isascii() or not name.isprintable():
            # IMAP names mailboxes in modified UTF-7 (RFC 3501 5.1.3)
            raise InputError(f"mailbox names are ASCII here: {printable(name)!r}")
        return cls(
            protocol,
            parts.hostname,
            port or _PORTS[scheme],
            urllib.parse.unquote(parts.username),
            name or "INBOX",
            scheme.endswith("s"),
        )

    @property
    def scheme(self) -> str:
        return self.protocol + ("s" if self.implicit_tls else "")

    @property
    def label(self) -> str:
        """The mailbox's URL, as errors name it (never with a password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = urllib.parse.quote(self.user, safe="")
        path = f"/{self.mailbox}" if self.protocol == "imap" else ""
        return f"{self.scheme}://{user}@{host}:{self.port}{path}"


@dataclass(frozen=True, slots=True)
class Returned:
    """One message read from the mailbox: its IMAP UID (or POP3 UIDL), what
    :func:`classify` made of it, and whether only its first ``max_size`` octets were
    read."""

    uid: str
    bounces: tuple[Bounce, ...]
    truncated: bool = False


def _mailbox(url_or_settings: str | Mailbox, protocol: str) -> Mailbox:
    mailbox = (
        url_or_settings if isinstance(url_or_settings, Mailbox) else Mailbox.parse(url_or_settings)
    )
    if mailbox.protocol != protocol:
        raise InputError(f"{mailbox.label} is not an {protocol.upper()} mailbox")
    return mailbox


async def read_imap(
    url_or_settings: str | Mailbox,
    *,
    password: str,
    move_to: str | None = None,
    follow: bool = False,
    max_wait: float | None = None,
    verp: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
    max_size: int = DEFAULT_MAX_SIZE,
) -> AsyncGenerator[Returned, None]:
    """The unseen messages of an IMAP mailbox, classified, oldest first.

    Each is fetched without marking it (``BODY.PEEK[]``, its first ``max_size``
    octets), given to the caller, and only when the caller asks for the next one
    marked ``\\Seen`` (and moved to the folder ``move_to``, if given) (MOVE, or COPY and EXPUNGE
    where the server has no MOVE): a message whose handling failed stays unseen.
    ``follow``: then wait for new mail (IDLE, RFC 2177) and read it too, for
    ``max_wait`` seconds (None: until the caller stops). ``verp``: the run's sender
    template, to tell the recipient from the bounce's address.
    """
    mailbox = _mailbox(url_or_settings, "imap")
    _check_name(move_to)
    reader = _IMAPReader(mailbox, password, ssl_context, timeout, max_size)
    limiter = anyio.CapacityLimiter(1)  # one thread at a time works the connection

    async def call(function: Callable[..., _T], *args: object) -> _T:
        return await anyio.to_thread.run_sync(function, *args, limiter=limiter)

    deadline = None if max_wait is None else time.monotonic() + max_wait
    try:
        await call(reader.open, move_to)
        while True:
            uids = await call(reader.unseen)
            for uid in uids:
                fetched = await call(reader.fetch, uid)
                if fetched is None:
                    continue  # expunged meanwhile by another client
                raw, truncated = fetched
                yield Returned(uid, tuple(classify(raw, verp=verp)), truncated)
                await call(reader.handled, uid, move_to)
            if not follow:
                return
            if uids:
                # Mail that came meanwhile was announced in those commands' replies,
                # not by the IDLE to come: search again until nothing is unseen.
                continue
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            # Abandoned when cancelled: it sees reader.stop within a tick and returns.
            await anyio.to_thread.run_sync(
                reader.idle, left, limiter=limiter, abandon_on_cancel=True
            )
    finally:
        reader.stop.set()
        with anyio.CancelScope(shield=True):
            await call(reader.close)


async def read_pop3(
    url_or_settings: str | Mailbox,
    *,
    password: str,
    delete: bool = False,
    verp: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
    max_size: int = DEFAULT_MAX_SIZE,
) -> AsyncGenerator[Returned, None]:
    """Every message of a POP3 mailbox, classified, in the server's order.

    POP3 keeps no seen flag: without ``delete`` each read returns every message again.
    With ``delete``, a message is marked for deletion once the caller asks for the
    next one, and the server deletes those at the end of the session (QUIT).
    A message over ``max_size`` octets is read only as far as its headers and first
    lines (TOP).
    """
    mailbox = _mailbox(url_or_settings, "pop3")
    reader = _POP3Reader(mailbox, password, ssl_context, timeout, max_size)
    limiter = anyio.CapacityLimiter(1)

    async def call(function: Callable[..., _T], *args: object) -> _T:
        return await anyio.to_thread.run_sync(function, *args, limiter=limiter)

    try:
        await call(reader.open)
        for number, uid, size in await call(reader.listing):
            raw, truncated = await call(reader.fetch, number, size)
            yield Returned(uid, tuple(classify(raw, verp=verp)), truncated)
            if delete:
                await call(reader.delete, number)
    finally:
        with anyio.CancelScope(shield=True):
            await call(reader.close)


# ----------------------------------------------------------------------- the threads


def _check_name(name: str | None) -> None:
    if name is not None and (not name or not name.isascii() or not name.isprintable()):
        raise InputError(f"not a mailbox name (ASCII here): {printable(name)!r}")


def _quoted(name: str) -> str:
    """An IMAP quoted string (RFC 3501 4.3): imaplib sends arguments as they are."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(data: object) -> str:
    """A server's words from imaplib's response data, made printable."""
    if isinstance(data, list | tuple):
        data = b" ".join(d for d in data if isinstance(d, bytes))
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    return printable(str(data)).strip()


class _Reader:
    """What both protocols' readers share: the settings and the error map."""

    def __init__(
        self,
        mailbox: Mailbox,
        password: str,
        ssl_context: ssl.SSLContext | None,
        timeout: float,
        max_size: int,
    ) -> None:
        if not 0 < timeout < float("inf"):
            raise InputError(f"timeout must be a positive number of seconds: {timeout!r}")
        if max_size < 1024:
            raise InputError(f"max_size must be at least 1024 octets: {max_size!r}")
        self.mailbox = mailbox
        self._password = password
        self.context = ssl_context or ssl.create_default_context()
        self.timeout = timeout
        self.max_size = max_size
        self.stop = threading.Event()

    @contextlib.contextmanager
    def errors(self, doing: str, *, connecting: bool = False) -> Iterator[None]:
        """Raise asmtp's error for what went wrong ``doing`` (never with the password)."""
        label, host = self.mailbox.label, self.mailbox.host
        try:
            yield
        except SMTPError:
            raise
        except (imaplib.IMAP4.abort, EOFError) as exc:
            said = exc.args[0] if exc.args else exc
            raise ConnectionLostError(
                f"{label}: connection lost while {doing}: {_text(said)}"
            ) from None
        except (imaplib.IMAP4.error, poplib.error_proto) as exc:
            said = exc.args[0] if exc.args else exc
            raise MailboxError(f"{label}: {doing} failed: {_text(said)}") from None
        except OSError as exc:
            if isinstance(exc, TimeoutError) and exc.errno is None:
                raise SMTPTimeoutError(
                    f"{label}: no answer within {self.timeout:g} s while {doing}"
                ) from None
            error = translate(exc, "connect", host) if connecting else None
            if error is None:
                error = ConnectionLostError(f"connection to {host} lost while {doing}: {exc}")
            raise type(error)(f"{label}: {error.message}", stage=error.stage) from None


class _IMAPReader(_Reader):
    imap: imaplib.IMAP4 | None = None
    can_move = False
    can_uid_expunge = False

    def _imap(self) -> imaplib.IMAP4:
        assert self.imap is not None, "open() first"
        return self.imap

    def _ok(self, doing: str, answer: tuple[str, Any]) -> list[Any]:
        kind, data = answer
        if kind != "OK":
            raise MailboxError(f"{self.mailbox.label}: {doing} refused: {_text(data)}")
        return list(data)

    def open(self, move_to: str | None) -> None:
        mailbox = self.mailbox
        with self.errors("connecting", connecting=True):
            if mailbox.implicit_tls:
                self.imap = imaplib.IMAP4_SSL(
                    mailbox.host, mailbox.port, ssl_context=self.context, timeout=self.timeout
                )
            else:
                self.imap = imaplib.IMAP4(mailbox.host, mailbox.port, timeout=self.timeout)
                if "STARTTLS" not in self.imap.capabilities:
                    raise TLSUnavailableError(
                        f"{mailbox.label}: the server offers no STARTTLS: the password is "
                        "not sent in the clear (use imaps://)"
                    )
                self.imap.starttls(ssl_context=self.context)
        imap = self._imap()
        with self.errors("login"):
            imap.login(mailbox.user, self._password)
        with self.errors("asking for capabilities"):
            data = self._ok("CAPABILITY", imap.capability())
        words = set(_text(data).upper().split())
        self.can_move, self.can_uid_expunge = "MOVE" in words, "UIDPLUS" in words
        with self.errors(f"selecting {mailbox.mailbox}"):
            kind, data = imap.select(_quoted(mailbox.mailbox))
            if kind != "OK":
                raise MailboxError(
                    f"{mailbox.label}: no mailbox {mailbox.mailbox!r} to read: {_text(data)}"
                )
        if move_to is not None:
            with self.errors(f"looking for the folder {move_to}"):
                found = self._ok("LIST", imap.list('""', _quoted(move_to)))
            if not [line for line in found if line]:
                raise MailboxError(f"{mailbox.label}: no folder {move_to!r} to move messages to")

    def unseen(self) -> list[str]:
        imap = self._imap()
        with self.errors("searching for unseen messages"):
            # NOOP first: a server may take in new mail only between commands (RFC 3501
            # 6.1.2), so that the SEARCH sees what arrived since the last one
            self._ok("NOOP", imap.noop())
            data = self._ok("SEARCH", imap.uid("SEARCH", "UNSEEN"))
        return [uid.decode() for line in data if isinstance(line, bytes) for uid in line.split()]

    def fetch(self, uid: str) -> tuple[bytes, bool] | None:
        """The first ``max_size`` octets of message ``uid`` (without marking it seen),
        and whether it is longer; None when it is gone."""
        with self.errors(f"fetching message {uid}"):
            data = self._ok(
                "FETCH",
                self._imap().uid("FETCH", uid, f"(RFC822.SIZE BODY.PEEK[]<0.{self.max_size}>)"),
            )
        for item in data:
            if isinstance(item, tuple) and len(item) == 2:
                head, body = item
                size = _SIZE.search(head)
                truncated = size is not None and int(size[1]) > len(body)
                return bytes(body), truncated
        return None

    def handled(self, uid: str, move_to: str | None) -> None:
        imap = self._imap()
        if move_to is None:
            with self.errors(f"marking message {uid} seen"):
                self._ok("STORE", imap.uid("STORE", uid, "+FLAGS", "(\\Seen)"))
            return
        with self.errors(f"moving message {uid} to {move_to}"):
            # seen in its new folder too: read, as the mailbox shows it
            self._ok("STORE", imap.uid("STORE", uid, "+FLAGS", "(\\Seen)"))
            if self.can_move:  # RFC 6851
                self._ok("MOVE", imap.uid("MOVE", uid, _quoted(move_to)))
                return
            self._ok("COPY", imap.uid("COPY", uid, _quoted(move_to)))
            self._ok("STORE", imap.uid("STORE", uid, "+FLAGS", "(\\Deleted)"))
            if self.can_uid_expunge:  # RFC 4315: only this message
                self._ok("EXPUNGE", imap.uid("EXPUNGE", uid))
            else:
                self._ok("EXPUNGE", imap.expunge())

    def idle(self, wait: float | None) -> None:
        """IDLE (RFC 2177) until the server reports new mail (``* n EXISTS``), ``wait``
        seconds pass, or :attr:`stop` is set; then DONE.

        imaplib (3.11) has no IDLE: the command is written by hand, and its replies read
        from the socket itself, not imaplib's buffered file, so that ``select`` sees every
        byte waiting. imaplib's file holds nothing then: every command before was read
        to its tagged reply, and a server sends nothing between commands."""
        imap = self._imap()
        sock = imap.sock
        tag = b"ASMTPIDLE"
        until = time.monotonic() + min(_IDLE_MAX, _IDLE_MAX if wait is None else wait)
        with self.errors("waiting for new mail (IDLE)"):
            sock.sendall(tag + b" IDLE\r\n")
            lines = _Lines(sock)
            first = lines.next(time.monotonic() + self.timeout)
            if first is None:
                raise TimeoutError
            if not first.startswith(b"+"):
                raise MailboxError(f"{self.mailbox.label}: IDLE refused: {_text(first)}")
            while not self.stop.is_set() and time.monotonic() < until:
                line = lines.next(min(until, time.monotonic() + _IDLE_TICK))
                if line is not None and _EXISTS.match(line):
                    break
            sock.sendall(b"DONE\r\n")
            while True:
                line = lines.next(time.monotonic() + self.timeout)
                if line is None:
                    raise TimeoutError
                if line.startswith(tag + b" "):
                    if not line.startswith(tag + b" OK"):
                        raise MailboxError(f"{self.mailbox.label}: IDLE ended: {_text(line)}")
                    return

    def close(self) -> None:
        imap, self.imap = self.imap, None
        if imap is None:
            return
        with contextlib.suppress(Exception):
            imap.logout()  # closes the socket, whatever the server answers
        with contextlib.suppress(Exception):
            imap.shutdown()


class _Lines:
    """Lines read from a socket (plain or TLS) with a deadline each, for IDLE."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def next(self, until: float) -> bytes | None:
        """The next line (without CRLF), or None when ``until`` (monotonic) passes."""
        sock = self.sock
        while b"\n" not in self.buffer:
            if len(self.buffer) > 64 * 1024:
                raise imaplib.IMAP4.abort("a line of the server's is too long")
            pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
            if not pending:
                left = until - time.monotonic()
                if left <= 0:
                    return None
                ready, _, _ = select.select([sock], [], [], left)
                if not ready:
                    return None
            chunk = sock.recv(4096)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")


class _POP3Reader(_Reader):
    pop: poplib.POP3 | None = None

    def _pop(self) -> poplib.POP3:
        assert self.pop is not None, "open() first"
        return self.pop

    def open(self) -> None:
        mailbox = self.mailbox
        with self.errors("connecting", connecting=True):
            if mailbox.implicit_tls:
                self.pop = poplib.POP3_SSL(
                    mailbox.host, mailbox.port, context=self.context, timeout=self.timeout
                )
            else:
                self.pop = poplib.POP3(mailbox.host, mailbox.port, timeout=self.timeout)
                try:
                    offered = self.pop.capa()
                except poplib.error_proto:
                    offered = {}
                if "STLS" not in offered:
                    raise TLSUnavailableError(
                        f"{mailbox.label}: the server offers no STLS: the password is "
                        "not sent in the clear (use pop3s://)"
                    )
                self.pop.stls(self.context)
        pop = self._pop()
        with self.errors("login"):
            pop.user(mailbox.user)
            pop.pass_(self._password)

    def listing(self) -> list[tuple[int, str, int]]:
        """(number, UIDL, size) of every message."""
        pop = self._pop()
        with self.errors("listing the messages"):
            _, sizes, _ = pop.list()
            _, uids, _ = pop.uidl()
        size_of = {int(n): int(s) for n, s in (line.split()[:2] for line in sizes)}
        found = []
        for line in uids:
            number, uid = line.split()[:2]
            found.append((int(number), uid.decode("ascii", "replace"), size_of.get(int(number), 0)))
        return found

    def fetch(self, number: int, size: int) -> tuple[bytes, bool]:
        pop = self._pop()
        with self.errors(f"fetching message {number}"):
            if size > self.max_size:
                # TOP (RFC 1939 7): the headers and about max_size octets of lines
                _, lines, _ = pop.top(number, self.max_size // 100)
                return b"\r\n".join(lines)[: self.max_size], True
            _, lines, _ = pop.retr(number)
        return b"\r\n".join(lines) + b"\r\n", False

    def delete(self, number: int) -> None:
        with self.errors(f"deleting message {number}"):
            self._pop().dele(number)

    def close(self) -> None:
        pop, self.pop = self.pop, None
        if pop is None:
            return
        try:
            pop.quit()  # the deletions take effect here (RFC 1939 6)
        except Exception:
            with contextlib.suppress(Exception):
                pop.close()
