"""The SMTP client state machine (RFC 5321, with 2920 PIPELINING, 3207 STARTTLS and
4954 AUTH). Bytes in, replies out; no I/O, no asyncio.

Every state transition of the client side of an SMTP session lives in this file. The
driver does three things: hands received bytes to :meth:`ClientProtocol.receive_data`
(``b""`` at end of stream), writes the bytes each command method returns, and asks
:meth:`ClientProtocol.next_reply` for the next :class:`~asmtp.reply.Reply` (or
:data:`~asmtp.reply.NEED_DATA`). A command the protocol forbids in the current state
raises :class:`~asmtp.errors.LocalProtocolError` naming the command and the state;
a server that breaks the protocol raises :class:`~asmtp.errors.RemoteProtocolError`.

A session, as the bytes go (``C:`` what the methods return, ``S:`` what is fed in)::

    S: 220 mx.example.org ESMTP
    C: EHLO client.example.com                  proto.ehlo("client.example.com")
    S: 250-mx.example.org
    S: 250 PIPELINING
    C: MAIL FROM:<a@example.com>                proto.mail("a@example.com")
    C: RCPT TO:<b@example.org>                  proto.rcpt("b@example.org")
    C: DATA                                     proto.data()   (one write: pipelined)
    S: 250 OK / 250 OK / 354 go ahead
    C: <the prepared message> .                 proto.message(prepared.data)
    S: 250 2.0.0 queued
    C: QUIT                                     proto.quit()
    S: 221 bye
"""

from __future__ import annotations

import enum
import re
from collections import deque
from collections.abc import Callable, Iterable

from .capabilities import Capabilities
from .errors import ConnectionLostError, LocalProtocolError, RemoteProtocolError
from .reply import NEED_DATA, Reply, ReplyParser, _NeedData

__all__ = ["ClientProtocol", "State"]

Trace = Callable[[str], None]


class State(enum.Enum):
    GREETING = "greeting"  # connected, waiting for the server's 220
    REFUSED = "refused"  # the greeting was not 220: only QUIT may follow (RFC 5321 3.1)
    CONNECTED = "connected"  # greeted (or TLS just started): EHLO or HELO must come next
    READY = "ready"  # EHLO/HELO done, no mail transaction open
    TLS_HANDSHAKE = "tls-handshake"  # STARTTLS got 220: the driver must run the handshake
    AUTH = "auth"  # a SASL exchange is under way
    MAIL = "mail"  # MAIL FROM accepted: a transaction is open
    DATA = "data"  # DATA got 354: the message content must be sent
    CLOSED = "closed"  # QUIT answered, 421 received, or the stream ended


# Commands that may be sent while replies to earlier ones are outstanding (RFC 2920
# section 3.1: DATA, EHLO, STARTTLS, AUTH, NOOP and QUIT each end a group).
_PIPELINE_AFTER = frozenset({"mail", "rcpt", "rset"})
_BAD_CHAR = re.compile("[\r\n\0]")


class ClientProtocol:
    """The sans-IO SMTP client. One instance per connection.

    ``trace``, if given, is called with one line per command sent (``"> ..."``) and per
    reply received (``"< ..."``). AUTH responses are masked and message content is
    shown only as its size, so a transcript never holds credentials or mail.
    """

    __slots__ = (
        "_parser",
        "_pending",
        "_rcpts",
        "_smtputf8",
        "_txn",
        "authenticated",
        "capabilities",
        "state",
        "tls",
        "trace",
    )

    def __init__(self, *, trace: Trace | None = None, tls: bool = False) -> None:
        self._parser = ReplyParser()
        self._pending: deque[str] = deque(("greeting",))
        self._txn = False  # a MAIL has been sent and not yet closed (projected state)
        self._rcpts = 0  # RCPTs sent in the open transaction
        self._smtputf8 = False
        self.capabilities = Capabilities.helo()
        self.state = State.GREETING
        #: True once the connection is encrypted (implicit TLS, or after STARTTLS)
        self.tls = tls
        self.authenticated = False
        self.trace = trace

    # -- bytes in -----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the server; ``b""`` means the server closed the stream."""
        self._parser.feed(data)

    @property
    def closed(self) -> bool:
        """The session is over: QUIT answered, 421 received, or the stream ended."""
        return self.state is State.CLOSED

    @property
    def awaiting(self) -> str | None:
        """The command whose reply comes next ("greeting", "ehlo", "rcpt", ...)."""
        return self._pending[0] if self._pending else None

    def next_reply(self) -> Reply | _NeedData:
        """The next complete reply, applied to the state; NEED_DATA when more bytes
        are needed."""
        parser = self._parser
        try:
            reply = parser.next_reply()
        except RemoteProtocolError as exc:
            exc.stage = self.awaiting
            self.state = State.CLOSED
            raise
        if reply is NEED_DATA:
            if parser.eof:
                stage = self.awaiting
                self.state = State.CLOSED
                raise ConnectionLostError(
                    "the server closed the connection"
                    + (f" (awaiting the {stage} reply)" if stage else ""),
                    stage=stage,
                )
            return reply
        assert isinstance(reply, Reply)
        if not self._pending:
            self.state = State.CLOSED
            raise RemoteProtocolError(f"unexpected reply with nothing asked: {reply}")
        kind = self._pending.popleft()
        if self.trace is not None:
            for i, line in enumerate(reply.lines):
                sep = " " if i == len(reply.lines) - 1 else "-"
                self.trace(f"< {reply.code}{sep}{line}")
        self._apply(kind, reply)
        return reply

    def _apply(self, kind: str, reply: Reply) -> None:
        code = reply.code
        if code == 421 and kind != "quit":
            # RFC 5321 3.8: the server is closing the channel.
            self._close_transaction()
            self.state = State.CLOSED
            self._pending.clear()
            return
        ok = code < 400
        if kind == "rcpt":
            return
        if kind == "mail":
            if ok:
                if self.state is State.READY:
                    self.state = State.MAIL
            else:
                self._close_transaction()
        elif kind == "data":
            if code == 354:
                if self._pending:
                    raise RemoteProtocolError("354 to DATA while replies are outstanding")
                self.state = State.DATA
            else:
                self._close_transaction()
        elif kind == "message":
            self._close_transaction()
        elif kind == "greeting":
            if code == 220:
                self.state = State.CONNECTED
            else:
                self.state = State.REFUSED
        elif kind == "ehlo":
            if code == 250:
                self.capabilities = Capabilities.from_ehlo(reply)
                self.state = State.READY
        elif kind == "helo":
            if code == 250:
                self.capabilities = Capabilities.helo()
                self.state = State.READY
        elif kind == "starttls":
            if code == 220:
                # RFC 3207 4.2: anything after the 220 came in the clear; drop it
                # (a man in the middle could have injected replies there).
                self._parser.clear()
                self.state = State.TLS_HANDSHAKE
        elif kind == "auth":
            if code == 334:
                self.state = State.AUTH
            else:
                self.authenticated = code == 235
                self.state = State.READY
        elif kind == "rset":
            if ok:
                self._close_transaction()
        elif kind == "quit":
            self.state = State.CLOSED
            self._pending.clear()

    def _close_transaction(self) -> None:
        self._txn = False
        self._rcpts = 0
        self._smtputf8 = False
        if self.state in (State.MAIL, State.DATA):
            self.state = State.READY

    # -- bytes out ----------------------------------------------------------------

    def _command(self, kind: str, line: str, shown: str | None = None) -> bytes:
        if self.trace is not None:
            self.trace(f"> {shown if shown is not None else line}")
        self._pending.append(kind)
        try:
            return (line + "\r\n").encode("utf-8" if self._smtputf8 else "ascii")
        except UnicodeEncodeError as exc:
            self._pending.pop()
            raise LocalProtocolError(
                f"{kind.upper()} needs SMTPUTF8 for non-ASCII text: {line!r}"
            ) from exc

    def _check(self, kind: str, states: tuple[State, ...], *, pipelinable: bool = False) -> None:
        if self.state not in states:
            raise LocalProtocolError(f"cannot send {kind.upper()} in state {self.state.value}")
        if self._pending and not (
            pipelinable
            and self.capabilities.pipelining
            and _PIPELINE_AFTER.issuperset(self._pending)
        ):
            raise LocalProtocolError(
                f"cannot send {kind.upper()} while awaiting the "
                f"{self._pending[0]} reply (no PIPELINING)"
            )

    @staticmethod
    def _clean(kind: str, *values: str) -> None:
        for value in values:
            if (bad := _BAD_CHAR.search(value)) is not None:
                raise LocalProtocolError(
                    f"{kind.upper()} argument holds {bad.group()!r}: {value!r}"
                )

    def ehlo(self, name: str) -> bytes:
        self._check("ehlo", (State.CONNECTED, State.READY))
        self._clean("ehlo", name)
        return self._command("ehlo", f"EHLO {name}")

    def helo(self, name: str) -> bytes:
        self._check("helo", (State.CONNECTED, State.READY))
        self._clean("helo", name)
        return self._command("helo", f"HELO {name}")

    def starttls(self) -> bytes:
        self._check("starttls", (State.READY,))
        if self.tls:
            raise LocalProtocolError("STARTTLS on a connection that is already encrypted")
        return self._command("starttls", "STARTTLS")

    def tls_started(self) -> None:
        """The driver finished the TLS handshake: forget what EHLO said before it
        (RFC 3207 4.2) and expect EHLO again."""
        if self.state is not State.TLS_HANDSHAKE:
            raise LocalProtocolError(f"TLS started in state {self.state.value}")
        self.tls = True
        self.capabilities = Capabilities.helo()
        self.state = State.CONNECTED

    def auth(self, mechanism: str, initial_response: str | None = None) -> bytes:
        """``AUTH MECH [initial-response]``; the response is masked in the transcript."""
        self._check("auth", (State.READY,))
        self._clean("auth", mechanism, initial_response or "")
        line = f"AUTH {mechanism}"
        if initial_response is not None:
            # RFC 4954 4: an empty initial response is sent as "=".
            return self._command("auth", f"{line} {initial_response or '='}", f"{line} ****")
        return self._command("auth", line)

    def auth_response(self, response: str) -> bytes:
        """Answer a 334 challenge (masked in the transcript)."""
        self._check("auth", (State.AUTH,))
        self._clean("auth", response)
        return self._command("auth", response, "****")

    def mail(self, sender: str, params: Iterable[str] = (), *, smtputf8: bool = False) -> bytes:
        """``MAIL FROM:<sender> PARAMS``. ``smtputf8`` opens a transaction in which
        addresses may be UTF-8 (RFC 6531)."""
        self._check("mail", (State.READY,), pipelinable=True)
        if self._txn:
            raise LocalProtocolError("MAIL while a mail transaction is open")
        params = tuple(params)
        self._clean("mail", sender, *params)
        self._smtputf8 = smtputf8
        tail = " " + " ".join(params) if params else ""
        try:
            data = self._command("mail", f"MAIL FROM:<{sender}>{tail}")
        except LocalProtocolError:
            self._smtputf8 = False
            raise
        self._txn = True
        self._rcpts = 0
        return data

    def rcpt(self, recipient: str, params: Iterable[str] = ()) -> bytes:
        self._check("rcpt", (State.READY, State.MAIL), pipelinable=True)
        if not self._txn:
            raise LocalProtocolError("RCPT without MAIL")
        params = tuple(params)
        self._clean("rcpt", recipient, *params)
        self._rcpts += 1
        tail = " " + " ".join(params) if params else ""
        return self._command("rcpt", f"RCPT TO:<{recipient}>{tail}")

    def data(self) -> bytes:
        self._check("data", (State.READY, State.MAIL), pipelinable=True)
        if not self._txn or not self._rcpts:
            raise LocalProtocolError("DATA without MAIL and RCPT")
        return self._command("data", "DATA")

    def message(self, data: bytes, *, then_quit: bool = False) -> bytes:
        """The message content after DATA's 354: ``data`` is already CRLF-normalized,
        dot-stuffed and ends with ``CRLF . CRLF`` (see :mod:`asmtp.message`).

        ``then_quit`` sends QUIT in the same write, for a session's last transaction
        on a server that offers PIPELINING (RFC 2920 3.1: message content may open a
        group and QUIT may close one): one write and one round trip fewer."""
        if self.state is not State.DATA or self._pending:
            raise LocalProtocolError(f"message content in state {self.state.value}")
        if not data.endswith(b"\r\n.\r\n"):
            raise LocalProtocolError("message content must end with CRLF . CRLF")
        if then_quit and not self.capabilities.pipelining:
            raise LocalProtocolError("QUIT after the message needs PIPELINING")
        if self.trace is not None:
            self.trace(f"> [message: {len(data) - 3} octets]")
            self.trace("> .")
            if then_quit:
                self.trace("> QUIT")
        self._pending.append("message")
        if then_quit:
            self._pending.append("quit")
            return data + b"QUIT\r\n"
        return data

    def rset(self) -> bytes:
        self._check("rset", (State.READY, State.MAIL), pipelinable=True)
        self._txn = False
        self._rcpts = 0
        return self._command("rset", "RSET")

    def noop(self) -> bytes:
        self._check("noop", (State.READY, State.MAIL))
        return self._command("noop", "NOOP")

    def quit(self) -> bytes:
        self._check(
            "quit",
            (State.REFUSED, State.CONNECTED, State.READY, State.MAIL, State.AUTH),
        )
        return self._command("quit", "QUIT")
