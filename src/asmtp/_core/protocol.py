"""The SMTP client state machine (RFC 5321, with 2920 PIPELINING, 3207 STARTTLS,
4954 AUTH and 3030 CHUNKING), and LMTP's (RFC 2033). Bytes in, replies out; no I/O,
no asyncio.

Every state transition of the client side of an SMTP session is a table of
:mod:`asmtp._core.rules` (in which states each command may be sent, which state each
reply leads to), applied here. The driver does three things:
hands received bytes to :meth:`ClientProtocol.receive_data` (``b""`` at end of
stream), writes the bytes each command method returns, and asks
:meth:`ClientProtocol.next_reply` for the next :class:`~asmtp._core.reply.Reply` (or
:data:`~asmtp._core.reply.NEED_DATA`). A command the protocol forbids in the current state
raises :class:`~asmtp.errors.LocalProtocolError` naming the command and the state;
a server that breaks the protocol raises :class:`~asmtp.errors.RemoteProtocolError`,
and so does a reply its command does not allow (:data:`SUCCESS_CODES`: 221 to the
end-of-data dot, 354 to RCPT), which also ends the session.

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

With CHUNKING (RFC 3030) the content goes with its size instead, not dot-stuffed and
without waiting for a 354, so the whole transaction is one write::

    C: MAIL FROM:<a@example.com>                proto.mail("a@example.com")
    C: RCPT TO:<b@example.org>                  proto.rcpt("b@example.org")
    C: BDAT 1234 LAST                           proto.bdat(chunk, last=True)
    C: <1234 octets of content>                 (the same write: pipelined)
    S: 250 OK / 250 OK / 250 2.0.0 queued

LMTP (``ClientProtocol(lmtp=True)``, RFC 2033) greets with LHLO instead of EHLO (no
HELO), and the end of data (or the last BDAT chunk, RFC 2033 4.2) gets one reply per
accepted recipient, in RCPT order: each is that recipient's own answer, and the
transaction ends with the last of them::

    C: LHLO client.example.com                  proto.lhlo("client.example.com")
    S: 250-mx.example.org
    S: 250 PIPELINING
    C: MAIL FROM:<a@example.com>                proto.mail("a@example.com")
    C: RCPT TO:<b@example.org>                  proto.rcpt("b@example.org")
    C: RCPT TO:<c@example.org>                  proto.rcpt("c@example.org")
    C: RCPT TO:<d@example.org>                  proto.rcpt("d@example.org")
    C: DATA                                     proto.data()
    S: 250 OK / 550 5.1.1 no such user / 250 OK / 354 go ahead
    C: <the prepared message> .                 proto.message(prepared.data)
    S: 250 2.0.0 <b@example.org> saved          (awaiting "message": b's reply)
    S: 452 4.2.2 <d@example.org> over quota     (awaiting "message" again: d's)
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from ..errors import (
    ConnectionLostError,
    LocalProtocolError,
    RemoteProtocolError,
    Stage,
)
from .capabilities import Capabilities
from .reply import NEED_DATA, Reply, ReplyParser, _NeedData, take_known_lines, take_one_line
from .rules import (
    AFTER_REPLY,
    AUTH,
    AUTH_CONTINUE,
    CLOSED,
    CONNECTED,
    DATA,
    GREETING,
    PIPELINABLE,
    PIPELINE_AFTER,
    READY,
    SENDABLE_IN,
    SIMPLE_SUCCESS,
    SUCCESS_CODES,
    TLS_HANDSHAKE,
    CommandName,
    State,
    awaited,
    unexpected,
)

__all__ = ["AUTH_CONTINUE", "SUCCESS_CODES", "ClientProtocol", "State"]

Trace = Callable[[str], None]

_BAD_CHAR: Final = re.compile("[\r\n\0]")
#: what a new session awaits (copied: never written)
_GREETING_FIRST: Final[deque[Stage]] = deque(("greeting",))
#: no reply ahead (never written: a protocol's own list replaces it)
_NONE_AHEAD: Final[list[Reply]] = []


class ClientProtocol:
    """The sans-IO SMTP client. One instance per connection.

    ``trace``, if given, is called with one line per command sent (``"> ..."``) and per
    reply received (``"< ..."``). AUTH responses are masked and message content is
    shown only as its size, so a transcript never holds credentials or mail.

    ``lmtp``: the session speaks LMTP (RFC 2033): :meth:`lhlo` instead of :meth:`ehlo`
    and :meth:`helo`, and one "message" reply per accepted recipient after the end of
    data (see the module docstring).
    """

    __slots__ = (
        "_accepted",
        "_ahead",
        "_chunked",
        "_parser",
        "_pending",
        "_rcpts",
        "_smtputf8",
        "_txn",
        "authenticated",
        "capabilities",
        "inbox",
        "lmtp",
        "state",
        "tls",
        "trace",
    )

    def __init__(
        self, *, trace: Trace | None = None, tls: bool = False, lmtp: bool = False
    ) -> None:
        self._parser = ReplyParser()
        #: replies taken from the inbox with others (one read of a pipelined group's),
        #: not yet handed out: the last first
        self._ahead = _NONE_AHEAD
        #: the bytes received and not parsed yet: a driver may append what it reads
        #: here (``proto.inbox += data``) as :meth:`receive_data` does, without a call
        #: per read; the end of the stream still goes through ``receive_data(b"")``
        self.inbox = self._parser.buffer
        self._pending: deque[Stage] = _GREETING_FIRST.copy()  # twice as fast as deque(...)
        self._txn = False  # a MAIL has been sent and not yet closed (projected state)
        self._rcpts = 0  # RCPTs sent in the open transaction
        self._accepted = 0  # RCPTs accepted in it: LMTP's replies due after the end of data
        self._chunked = False  # a BDAT has been sent in it: no DATA (RFC 3030 2)
        self._smtputf8 = False
        self.capabilities = Capabilities.helo()
        self.state = GREETING
        #: True once the connection is encrypted (implicit TLS, or after STARTTLS)
        self.tls = tls
        self.authenticated = False
        self.trace = trace
        #: an LMTP session (RFC 2033)
        self.lmtp = lmtp

    # -- bytes in -----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the server; ``b""`` means the server closed the stream."""
        self._parser.feed(data)

    @property
    def closed(self) -> bool:
        """The session is over: QUIT answered, 421 received, or the stream ended."""
        return self.state is CLOSED

    @property
    def awaiting(self) -> Stage | None:
        """The command whose reply comes next ("greeting", "ehlo", "rcpt", ...)."""
        return self._pending[0] if self._pending else None

    def next_reply(self) -> Reply | _NeedData:
        """The next complete reply, applied to the state; NEED_DATA when more bytes
        are needed. A reply the awaited command does not allow (see
        :data:`SUCCESS_CODES`) raises :class:`~asmtp.errors.RemoteProtocolError` and
        closes the session."""
        ahead = self._ahead
        buf = self.inbox
        reply: Reply | _NeedData | None = None
        if ahead:
            reply = ahead.pop()  # the next of a read's replies, all taken at once
        elif buf:
            # Replies seen before, one or a pipelined group's, without the parser's call.
            replies = take_known_lines(buf)
            if replies is not None:
                reply = replies.pop()
                self._ahead = replies
            else:
                reply = take_one_line(buf)
        elif not self._parser.eof:
            return NEED_DATA  # the common case after writing a command
        parser = self._parser
        if reply is None:
            try:
                reply = parser.next_reply()
            except RemoteProtocolError as exc:
                stage = self.awaiting
                self._abandon()
                if stage is None:
                    raise
                raise RemoteProtocolError(
                    f"{exc} (awaiting {awaited(stage)})", stage=stage
                ) from exc
        if isinstance(reply, _NeedData):
            if parser.eof:
                stage = self.awaiting
                self.state = CLOSED
                raise ConnectionLostError(
                    "the server closed the connection"
                    + (f" (awaiting the {stage} reply)" if stage else ""),
                    stage=stage,
                )
            return reply
        pending = self._pending
        if not pending:
            self.state = CLOSED
            raise RemoteProtocolError(f"unexpected reply with nothing asked: {reply}")
        kind = pending.popleft()
        if self.trace is not None:
            for i, line in enumerate(reply.lines):
                sep = " " if i == len(reply.lines) - 1 else "-"
                self.trace(f"< {reply.code}{sep}{line}")
        # The common case, settled by the table alone: a success that only moves the
        # state on (MAIL's 250, RCPT's, the dot's, QUIT's 221...).
        simple = SIMPLE_SUCCESS.get(kind)
        if simple is not None and reply.code in simple[0] and not self.lmtp:
            after = simple[1]
            if after is READY or after is CLOSED:
                self._enter(after)
            elif after is not None:
                self.state = after
            elif kind == "rcpt":
                self._accepted += 1
            return reply
        try:
            self._apply(kind, reply)
        except RemoteProtocolError as exc:
            exc.stage = kind
            self._abandon()
            raise
        return reply

    def _apply(self, kind: Stage, reply: Reply) -> None:
        """Move on as the reply to ``kind`` says (:data:`AFTER_REPLY`); one it does not
        allow raises :class:`~asmtp.errors.RemoteProtocolError`."""
        code = reply.code
        if kind == "message" and self.lmtp and self._lmtp_reply_due():
            # RFC 2033 4.2: one recipient's answer; the others' replies follow.
            if code == 421:
                self._enter(CLOSED)  # RFC 5321 3.8: the rest will never come
            elif code not in SUCCESS_CODES[kind] and code < 400:
                raise unexpected(kind, reply)
            return
        if code in SUCCESS_CODES[kind]:
            after = AFTER_REPLY[kind][0]
            if after is None:  # rcpt, noop
                if kind == "rcpt":
                    self._accepted += 1
                return
            if kind == "data":
                if self._pending:
                    raise RemoteProtocolError("354 to DATA while replies are outstanding")
                if self._parser.buffered or self._ahead:
                    # Nothing may follow 354 before the content: a reply already here
                    # would be taken as the answer to a dot the server has not seen yet.
                    raise RemoteProtocolError("the server sent more after 354 to DATA")
            elif kind == "ehlo" or kind == "lhlo":
                self.capabilities = Capabilities.from_ehlo(reply)
            elif kind == "helo":
                self.capabilities = Capabilities.helo()
            elif kind == "starttls":
                # RFC 3207 4.2: what came after the 220 (in the clear, injectable) is dropped.
                self._parser.clear()
                self._ahead = _NONE_AHEAD
            elif kind == "auth":
                self.authenticated = True
        elif code >= 400:
            if code == 421:
                after = CLOSED  # RFC 5321 3.8: the server is closing the channel
            else:
                after = AFTER_REPLY[kind][1]
                if after is None:
                    return
                if kind == "auth":
                    self.authenticated = False
        elif code == AUTH_CONTINUE and kind == "auth":
            self.state = AUTH
            return
        else:
            raise unexpected(kind, reply)
        self._enter(after)

    def _lmtp_reply_due(self) -> bool:
        """An LMTP end of data's reply just arrived: are more due after it? The first
        one learns how many (one per accepted RCPT, or one if none was: the refusal)."""
        if self._accepted:
            # The first reply: the others, due before anything sent after the content.
            self._pending.extendleft(["message"] * (self._accepted - 1))
            self._accepted = 0
        return bool(self._pending) and self._pending[0] == "message"

    def _enter(self, state: State) -> None:
        """Move to ``state``: back to READY, or CLOSED, ends the mail transaction;
        CLOSED also forgets the replies still awaited."""
        if state is READY or state is CLOSED:
            self._txn = False
            self._rcpts = 0
            self._accepted = 0
            self._chunked = False
            self._smtputf8 = False
            if state is CLOSED:
                self._pending.clear()
        self.state = state

    def _abandon(self) -> None:
        """The server broke the protocol: nothing more can be trusted on this session."""
        self._enter(CLOSED)

    # -- bytes out ----------------------------------------------------------------

    def _command(self, kind: Stage, line: str, shown: str | None = None) -> bytes:
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

    def _check(self, command: CommandName) -> None:
        """The one check before a command is sent: the state allows it
        (:data:`SENDABLE_IN`), and so do the replies still awaited (PIPELINING)."""
        if self.state not in SENDABLE_IN[command]:
            why = f"in state {self.state.value}"
        elif self._pending and not (
            command in PIPELINABLE
            and self.capabilities.pipelining
            and PIPELINE_AFTER.issuperset(self._pending)
        ):
            why = f"while awaiting the {self._pending[0]} reply (no PIPELINING)"
        else:
            return
        name = command.partition("-")[0].upper()  # "auth-response" is an AUTH line
        raise LocalProtocolError(f"cannot send {name} {why}")

    @staticmethod
    def _clean(kind: Stage, *values: str) -> None:
        for value in values:
            if "\r" in value or "\n" in value or "\0" in value:  # memchr: cheaper than a regex
                first = _BAD_CHAR.findall(value)[0]
                raise LocalProtocolError(f"{kind.upper()} argument holds {first!r}: {value!r}")

    def _hello_of(self, lmtp: bool, name: str) -> None:
        """EHLO and HELO greet an SMTP server, LHLO an LMTP one (RFC 2033 4.1)."""
        if self.lmtp != lmtp:
            server = "an LMTP" if self.lmtp else "an SMTP"
            raise LocalProtocolError(f"cannot send {name} to {server} server")

    def ehlo(self, name: str) -> bytes:
        self._hello_of(False, "EHLO")
        self._check("ehlo")
        self._clean("ehlo", name)
        return self._command("ehlo", f"EHLO {name}")

    def helo(self, name: str) -> bytes:
        self._hello_of(False, "HELO")
        self._check("helo")
        self._clean("helo", name)
        return self._command("helo", f"HELO {name}")

    def lhlo(self, name: str) -> bytes:
        """LMTP's greeting (RFC 2033 4.1), answered as EHLO is."""
        self._hello_of(True, "LHLO")
        self._check("lhlo")
        self._clean("lhlo", name)
        return self._command("lhlo", f"LHLO {name}")

    def starttls(self) -> bytes:
        self._check("starttls")
        if self.tls:
            raise LocalProtocolError("STARTTLS on a connection that is already encrypted")
        return self._command("starttls", "STARTTLS")

    def tls_started(self) -> None:
        """The driver finished the TLS handshake: forget what EHLO said before it
        (RFC 3207 4.2) and expect EHLO again."""
        if self.state is not TLS_HANDSHAKE:
            raise LocalProtocolError(f"TLS started in state {self.state.value}")
        self.tls = True
        self.capabilities = Capabilities.helo()
        self.state = CONNECTED

    def auth(self, mechanism: str, initial_response: str | None = None) -> bytes:
        """``AUTH MECH [initial-response]``; the response is masked in the transcript."""
        self._check("auth")
        self._clean("auth", mechanism, initial_response or "")
        line = f"AUTH {mechanism}"
        if initial_response is not None:
            # RFC 4954 4: an empty initial response is sent as "=".
            return self._command("auth", f"{line} {initial_response or '='}", f"{line} ****")
        return self._command("auth", line)

    def auth_response(self, response: str) -> bytes:
        """Answer a 334 challenge (masked in the transcript)."""
        self._check("auth-response")
        self._clean("auth", response)
        return self._command("auth", response, "****")

    def mail(self, sender: str, params: Iterable[str] = (), *, smtputf8: bool = False) -> bytes:
        """``MAIL FROM:<sender> PARAMS``. ``smtputf8`` opens a transaction in which
        addresses may be UTF-8 (RFC 6531)."""
        self._check("mail")
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
        self._check("rcpt")
        if not self._txn:
            raise LocalProtocolError("RCPT without MAIL")
        params = tuple(params)
        self._clean("rcpt", recipient, *params)
        self._rcpts += 1
        tail = " " + " ".join(params) if params else ""
        return self._command("rcpt", f"RCPT TO:<{recipient}>{tail}")

    def envelope(
        self,
        sender: str,
        recipients: Sequence[str],
        params: Sequence[str] = (),
        rcpt_params: Sequence[Sequence[str]] | None = None,
        *,
        smtputf8: bool = False,
    ) -> bytes:
        """MAIL, a RCPT for each recipient (with ``rcpt_params[i]``, if given) and DATA
        as one pipelined group (RFC 2920), for one write: the bytes and every check of
        :meth:`mail`, :meth:`rcpt` and :meth:`data` in turn, made at once. Needs
        PIPELINING (as any of them sent behind another does)."""
        if not self.capabilities.pipelining:
            raise LocalProtocolError("cannot send MAIL, RCPT and DATA at once without PIPELINING")
        self._check("mail")
        if self._txn:
            raise LocalProtocolError("MAIL while a mail transaction is open")
        if not recipients:
            raise LocalProtocolError("DATA without MAIL and RCPT")
        params = tuple(params)
        tail = " " + " ".join(params) if params else ""
        lines = [f"MAIL FROM:<{sender}>{tail}"]
        if rcpt_params is None:
            for r in recipients:  # a loop, not a comprehension: no function made per call
                lines.append(f"RCPT TO:<{r}>")
        else:
            lines += [
                f"RCPT TO:<{r}> {' '.join(p)}" if p else f"RCPT TO:<{r}>"
                for r, p in zip(recipients, rcpt_params, strict=True)
            ]
        text = "\r\n".join(lines)
        breaks = len(lines) - 1  # the CR LF between lines: any other CR, LF or NUL is a value's
        if text.count("\r") != breaks or text.count("\n") != breaks or "\0" in text:
            self._clean("mail", sender, *params)  # name the value
            for r, p in zip(recipients, rcpt_params or [()] * len(recipients), strict=True):
                self._clean("rcpt", r, *p)
        try:
            data = (text + "\r\nDATA\r\n").encode("utf-8" if smtputf8 else "ascii")
        except UnicodeEncodeError as exc:
            raise LocalProtocolError(f"MAIL needs SMTPUTF8 for non-ASCII text: {text!r}") from exc
        if self.trace is not None:
            for line in lines:
                self.trace(f"> {line}")
            self.trace("> DATA")
        pending = self._pending
        pending.append("mail")
        pending.extend(["rcpt"] * len(recipients))
        pending.append("data")
        self._smtputf8 = smtputf8
        self._txn = True
        self._rcpts = len(recipients)
        return data

    def data(self) -> bytes:
        self._check("data")
        if not self._txn or not self._rcpts:
            raise LocalProtocolError("DATA without MAIL and RCPT")
        if self._chunked:
            raise LocalProtocolError("DATA after BDAT in one transaction (RFC 3030 2)")
        return self._command("data", "DATA")

    def bdat(
        self,
        chunk: Sequence[bytes | memoryview],
        *,
        last: bool = False,
        then_quit: bool = False,
    ) -> tuple[bytes | memoryview, ...]:
        """``BDAT <size> [LAST]`` and the chunk (RFC 3030 2): the command line followed
        by the chunk's pieces as given (the content as it is, not dot-stuffed, never
        copied: see :meth:`PreparedMessage.chunks
        <asmtp._core.prepared.PreparedMessage.chunks>`), to be written one after the
        other. The reply to the ``last`` chunk is the end of data's ("message"), to
        any other chunk a "bdat" reply; a refused chunk ends the transaction.

        ``then_quit`` (``last`` only, with PIPELINING) adds QUIT, as after the content
        of :meth:`message`."""
        self._check("bdat")
        if "CHUNKING" not in self.capabilities.extensions:
            raise LocalProtocolError("cannot send BDAT: the server does not offer CHUNKING")
        if not self._txn or not self._rcpts:
            raise LocalProtocolError("BDAT without MAIL and RCPT")
        if then_quit and not (last and self.capabilities.pipelining):
            raise LocalProtocolError("QUIT after BDAT needs the last chunk and PIPELINING")
        size = sum(map(len, chunk))
        line = self._command(
            "message" if last else "bdat", f"BDAT {size} LAST" if last else f"BDAT {size}"
        )
        self._chunked = True
        if last:
            self._txn = False  # nothing more in this transaction: no RCPT, DATA or BDAT
        if not then_quit:
            return (line, *chunk)
        self._pending.append("quit")
        if self.trace is not None:
            self.trace("> QUIT")
        return (line, *chunk, b"QUIT\r\n")

    def message(
        self, data: bytes | tuple[bytes, ...], *, then_quit: bool = False
    ) -> bytes | tuple[bytes, ...]:
        """The message content after DATA's 354: ``data`` (bytes, or the pieces of
        :attr:`PreparedMessage.parts <asmtp._core.prepared.PreparedMessage.parts>`) is
        already CRLF-normalized, dot-stuffed and ends with ``CRLF . CRLF`` (see
        :mod:`asmtp._core.wire`). Returned as given: never copied.

        ``then_quit`` adds QUIT, for a session's last transaction on a server that
        offers PIPELINING (RFC 2920 3.1: message content may open a group and QUIT may
        close one): the result is then the content's pieces followed by the QUIT line,
        to be written one after the other without waiting for a reply in between (one
        round trip fewer), and without joining a large message into a copy of itself."""
        if self.state is not DATA or self._pending:
            raise LocalProtocolError(f"message content in state {self.state.value}")
        if isinstance(data, bytes):
            parts: tuple[bytes, ...] = (data,)
            tail = data[-5:]
        else:
            parts, tail = data, b""
            for part in reversed(parts):  # the last five octets, across pieces
                tail = part[len(tail) - 5 :] + tail
                if len(tail) >= 5:
                    break
        if tail != b"\r\n.\r\n":
            raise LocalProtocolError("message content must end with CRLF . CRLF")
        if then_quit and not self.capabilities.pipelining:
            raise LocalProtocolError("QUIT after the message needs PIPELINING")
        if self.trace is not None:
            self.trace(f"> [message: {sum(map(len, parts)) - 3} octets]")
            self.trace("> .")
            if then_quit:
                self.trace("> QUIT")
        self._pending.append("message")
        if then_quit:
            self._pending.append("quit")
            return (*parts, b"QUIT\r\n")
        return data

    def rset(self) -> bytes:
        self._check("rset")
        self._txn = False
        self._rcpts = 0
        self._accepted = 0
        self._chunked = False
        return self._command("rset", "RSET")

    def noop(self) -> bytes:
        self._check("noop")
        return self._command("noop", "NOOP")

    def quit(self) -> bytes:
        self._check("quit")
        return self._command("quit", "QUIT")
