"""One mail transaction's steps: MAIL FROM with the parameters the message needs, the
RCPTs, then the content by DATA (RFC 5321 3.3) or, when the server offers CHUNKING, by
BDAT (RFC 3030); pipelined when the server offers PIPELINING (RFC 2920).

Owns how each of those replies is judged (a refused recipient is that recipient's
answer; a refused MAIL, DATA or chunk fails the transaction; no recipient accepted
means no message; with LMTP (RFC 2033), each accepted recipient's own reply after the
end of data is that recipient's answer), when QUIT may ride along with the content,
and when a lost connection leaves the message's fate unknown (``dot_sent``). The
session's set-up and the results per recipient are :mod:`asmtp._delivery.session`'s.

The steps are generator functions of :mod:`asmtp._core.steps` over a
:class:`SessionState`, the part of a session a transaction reads and updates (a
:class:`~asmtp._delivery.session.Session` is one), so they run on both drivers. This
is the hot path of every send: compiled with the session by mypyc (hatch_build.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Final

from .._core.prepared import PreparedMessage
from .._core.protocol import SUCCESS_CODES, ClientProtocol
from .._core.reply import Reply
from .._core.requiretls import requiretls_refusal
from .._core.steps import Await, Steps, command, send
from ..config import DSN
from ..errors import ConnectionLostError, MessageRejectedError, SMTPError
from .session_state import (
    NO_EXTRAS,
    NO_REPLIES,
    Extras,
    SessionState,
    StageObserver,
    reply_error,
)

__all__ = [
    "NO_DATA",
    "NO_EXTRAS",
    "NO_REPLIES",
    "Extras",
    "SessionState",
    "StageObserver",
    "reply_error",
    "transaction",
]

# Each command's success replies, from the one table in asmtp._core.rules.
_MAIL_OK: Final = SUCCESS_CODES["mail"]
_RCPT_OK: Final = SUCCESS_CODES["rcpt"]
_DATA_OK: Final = SUCCESS_CODES["data"]
_BDAT_OK: Final = SUCCESS_CODES["bdat"]
_MESSAGE_OK: Final = SUCCESS_CODES["message"]
_RSET_OK: Final = SUCCESS_CODES["rset"]

#: the end-of-data reply of a transaction in which no recipient was accepted
NO_DATA: Final = Reply(554, ("5.5.1 no valid recipients",))


def transaction(
    s: SessionState,
    sender: str,
    recipients: Sequence[str],
    message: PreparedMessage,
    extras: Extras = NO_EXTRAS,
    last: bool = False,
) -> Steps[Reply]:
    """One mail transaction on ``s``: the steps, which return the reply to the end of
    data, the refused recipients being in ``s._refused`` (with their RCPT reply).
    Raises an :class:`~asmtp.errors.SMTPError` when the transaction as a whole fails
    (MAIL or DATA refused, no recipient accepted, the connection lost); ``s.stage``
    and ``s.dot_sent`` say where. What fails before a command is sent (SIZE, 8BITMIME,
    SMTPUTF8, REQUIRETLS) raises here, at the call. ``last``: the session's last
    transaction, after which QUIT may ride along with the content.

    With LMTP each accepted recipient's own reply to the end of data is in
    ``s._answered`` (see :func:`_per_recipient`), and the reply returned is the first
    refusal among them, or the last of them."""
    refused: dict[str, Reply] = {}
    s._refused = refused
    s._answered = NO_REPLIES
    proto = s.proto
    if proto.closed:
        raise ConnectionLostError("the session is closed", stage=s.stage)
    s.dot_sent = False
    params, utf8 = _mail_params(s, sender, recipients, message)
    dsn = extras.dsn if proto.capabilities.dsn else None
    if dsn is not None:
        params.extend(dsn.mail_params())
    if extras.requiretls:
        refusal = requiretls_refusal(proto.capabilities, s.tls, s.endpoint.host)
        if refusal is not None:
            # the TLS stage: another MX host may do; permanent once none does (section 4.2.1)
            raise MessageRejectedError(refusal, stage="starttls")
        params.append("REQUIRETLS")
    s.stage = "mail"
    if s.on_stage is not None:
        s._mark("mail")
    t = _Transaction(sender, recipients, message, params, utf8, dsn, extras, last, refused)
    # The generator of the steps, not one around it: a level fewer for every reply.
    if s.endpoint.chunking and "CHUNKING" in proto.capabilities.extensions:
        return _by_bdat(s, t)
    return _by_data(s, t)


def _rset(s: SessionState) -> Steps[None]:
    """RSET before the next MAIL, when a failed transaction may still be open."""
    reply: Reply = yield command(s.proto.rset(), s.timeouts.command)
    if reply.code not in _RSET_OK:
        raise reply_error(reply, "mail")
    s._needs_rset = False


def _mail_params(
    s: SessionState, sender: str, recipients: Sequence[str], message: PreparedMessage
) -> tuple[list[str], bool]:
    """The MAIL FROM parameters this message needs, or a permanent error when the
    server cannot take it (RFC 1870 SIZE, 6152 8BITMIME, 6531 SMTPUTF8)."""
    caps = s.proto.capabilities
    host = s.endpoint.host
    params: list[str] = []
    limit = caps.size
    if limit is not None and message.size > limit:
        raise MessageRejectedError(
            f"message is {message.size} octets; {host} takes at most {limit} (SIZE)",
            stage="mail",
        )
    if "SIZE" in caps.extensions:
        params.append(f"SIZE={message.size}")
    if message.eight_bit:
        if not caps.eight_bit_mime:
            raise MessageRejectedError(
                f"message has 8-bit content and {host} does not offer 8BITMIME",
                stage="mail",
            )
        params.append("BODY=8BITMIME")
    # Addresses are normalized (IDN domains in ASCII) by now: only a UTF-8
    # local part is left to need SMTPUTF8.
    utf8 = message.smtputf8 or not sender.isascii() or not "".join(recipients).isascii()
    if utf8:
        if not caps.smtputf8:
            raise MessageRejectedError(
                f"message needs SMTPUTF8 (non-ASCII addresses) and {host} does not offer it",
                stage="mail",
            )
        params.append("SMTPUTF8")
    return params, utf8


class _Transaction:
    """One mail transaction: its envelope, its message, and the recipients refused so
    far."""

    __slots__ = (
        "dsn",
        "extras",
        "last",
        "message",
        "params",
        "recipients",
        "refused",
        "sender",
        "utf8",
    )

    def __init__(
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
    ) -> None:
        self.sender = sender
        self.recipients = recipients
        self.message = message
        self.params = params  # MAIL FROM's (SIZE, BODY, SMTPUTF8, DSN's RET and ENVID)
        self.utf8 = utf8
        self.dsn = dsn  # what DSN asks for, when the server offers DSN
        self.extras = extras
        self.last = last  # the session's last: QUIT may ride along with the content
        self.refused = refused

    def mail(self, proto: ClientProtocol) -> bytes:
        return proto.mail(self.sender, self.params, smtputf8=self.utf8)

    def envelope(self, proto: ClientProtocol) -> bytes:
        """MAIL, every RCPT and DATA, for one pipelined write (RFC 2920)."""
        dsn = self.dsn
        rcpt_params = None if dsn is None else [dsn.rcpt_params(r) for r in self.recipients]
        return proto.envelope(
            self.sender, self.recipients, self.params, rcpt_params, smtputf8=self.utf8
        )

    def mail_and_rcpts(self, proto: ClientProtocol) -> bytes:
        """MAIL and every RCPT, for one pipelined write (RFC 2920)."""
        # MAIL first: the protocol takes the commands in the order they are sent.
        out = proto.mail(self.sender, self.params, smtputf8=self.utf8)
        dsn = self.dsn
        if dsn is None:
            return out + b"".join([proto.rcpt(r) for r in self.recipients])
        return out + b"".join([proto.rcpt(r, dsn.rcpt_params(r)) for r in self.recipients])

    def then_quit(self, proto: ClientProtocol) -> bool:
        """QUIT rides along with the content in the session's last transaction (RFC
        2920 3.1), unless some recipients await a new one (452 too many recipients)."""
        if not self.last or not proto.capabilities.pipelining:
            return False
        refused = self.refused  # most often empty: no generator made then
        return not refused or not any(r.code == 452 for r in refused.values())


def _rcpts_begin(s: SessionState) -> None:
    """The RCPT replies come next (each judged by :func:`_rcpt_judged`, in order: read
    after the pipelined write, or each after its own command). Not a generator of
    their steps: the callers yield them, one object fewer per transaction."""
    s.stage = "rcpt"
    if s.on_stage is not None:
        s._mark("rcpt")


def _rcpt_judged(s: SessionState, t: _Transaction, rcpt: str, reply: Reply) -> None:
    """``rcpt``'s RCPT reply: a refusal is that recipient's answer (kept in
    ``t.refused``); a reply that closes the session (421) ends the transaction."""
    if s.proto.closed:
        s.dot_sent = False
        raise reply_error(reply, "rcpt")
    if reply.code not in _RCPT_OK:
        t.refused[rcpt] = reply


def _mail_and_rcpts(s: SessionState, t: _Transaction) -> Steps[bool]:
    """MAIL, then each RCPT, each awaiting its reply (no PIPELINING). False when no
    recipient was accepted: the transaction ends there (RSET before the next)."""
    mail_reply: Reply = yield command(t.mail(s.proto), s.timeouts.command)
    if mail_reply.code not in _MAIL_OK:
        raise reply_error(mail_reply, "mail")
    proto, dsn, timeout = s.proto, t.dsn, s.timeouts.command
    _rcpts_begin(s)
    for rcpt in t.recipients:
        rcpt_params = dsn.rcpt_params(rcpt) if dsn is not None else ()
        _rcpt_judged(s, t, rcpt, (yield command(proto.rcpt(rcpt, rcpt_params), timeout)))
    if len(t.refused) < len(t.recipients):
        return True
    s._needs_rset = True
    if s.on_stage is not None:
        s._mark("idle")
    return False


def _by_data(s: SessionState, t: _Transaction) -> Steps[Reply]:
    """:func:`transaction_steps` with DATA: the reply to the end of data."""
    proto = s.proto
    timeouts = s.timeouts
    timeout = timeouts.command
    refused = t.refused
    if s._needs_rset:
        yield from _rset(s)
    if proto.capabilities.pipelining:
        # RFC 2920: MAIL, every RCPT and DATA in one write; then check every reply.
        mail_reply: Reply = yield command(t.envelope(proto), timeout)
        if proto.closed:
            raise reply_error(mail_reply, "mail")
        _rcpts_begin(s)
        for rcpt in t.recipients:
            _rcpt_judged(s, t, rcpt, (yield s.wait_reply))
        s.stage = "data"
        if s.on_stage is not None:
            s._mark("data")
        data_reply: Reply = yield s.wait_reply
        if mail_reply.code not in _MAIL_OK:
            refused.clear()  # the RCPTs' replies (503) answered no transaction
            s._needs_rset = data_reply.code in _DATA_OK
            if s._needs_rset:
                yield from _empty_message(s)
            raise reply_error(mail_reply, "mail")
    else:
        if not (yield from _mail_and_rcpts(s, t)):
            return NO_DATA
        s.stage = "data"
        if s.on_stage is not None:
            s._mark("data")
        data_reply = yield command(proto.data(), timeout)
    if len(refused) == len(t.recipients):
        # RFC 2920 3.1: no recipient, so a 354 gets an empty message.
        s._needs_rset = True
        if data_reply.code in _DATA_OK:
            yield from _empty_message(s)
        if s.on_stage is not None:
            s._mark("idle")
        return NO_DATA
    if data_reply.code not in _DATA_OK:
        s._needs_rset = not proto.closed
        raise reply_error(data_reply, "data")
    s.stage = "message"
    if s.on_stage is not None:
        s._mark("message")
    if t.extras.before_dot is not None:
        yield from _before_dot(s, t)
    content = proto.message(t.message.parts, then_quit=t.then_quit(proto))
    # Drained: lost while the kernel would not take more means the dot never left.
    yield send(content, timeouts.data_block, True)
    s.dot_sent = True
    try:
        final: Reply = yield s.wait_end
        if proto.lmtp:
            final = yield from _per_recipient(s, t, final)
    except ConnectionLostError as exc:
        unread = _end_unread(s)
        if unread is not None:
            raise unread from exc
        raise
    s.dot_sent = False
    if final.code not in _MESSAGE_OK and proto.closed:
        raise reply_error(final, "message")
    if s.on_stage is not None:
        s._mark("idle")
    return final


def _per_recipient(s: SessionState, t: _Transaction, first: Reply) -> Steps[Reply]:
    """LMTP (RFC 2033 4.2): after the end of data (or the last BDAT chunk), one reply
    per accepted recipient, in RCPT order, ``first`` the first one's; each is kept in
    ``s._answered`` as that recipient's answer. Returns the first refusal among them,
    or the last reply. A transaction with no recipient accepted gets one reply (its
    refusal), nobody's.

    A server that says 421 for one recipient, or goes away, before answering for all:
    those answered keep their replies, the others' fate is unknown (raised with
    ``dot_sent`` still set)."""
    proto = s.proto
    answered: dict[str, Reply] = {}
    s._answered = answered
    accepted = iter([r for r in t.recipients if r not in t.refused])
    reply = final = first
    while True:  # as many replies as the protocol says are due (one per accepted RCPT)
        rcpt = next(accepted, None)
        if rcpt is not None:
            answered[rcpt] = reply
        if final.code in _MESSAGE_OK:
            final = reply  # the first refusal, or the last reply
        if proto.awaiting != "message":
            break
        reply = yield s.wait_end
    if next(accepted, None) is not None:  # a 421: the others' replies will never come
        raise ConnectionLostError(
            f"the server closed the session ({reply.code}) after answering for "
            f"{len(answered)} of the recipients",
            stage="message",
        )
    return final


def _empty_message(s: SessionState) -> Steps[None]:
    yield command(s.proto.message(b"\r\n.\r\n"), s.timeouts.data_end)


def _before_dot(s: SessionState, t: _Transaction) -> Steps[None]:
    """Await the hook before the end of data goes out, with the recipients that
    may get the message (those not refused so far)."""
    hook, refused = t.extras.before_dot, t.refused
    assert hook is not None
    try:
        yield Await(functools.partial(hook, [r for r in t.recipients if r not in refused]))
    except BaseException:
        # The server waits for content that will not come (the journal could
        # not record the dot): only closing ends DATA without a message, and
        # the session must never be lent again in that state.
        s.abort()
        raise


def _end_unread(s: SessionState) -> ConnectionLostError | None:
    """The connection was lost after the end of data went out: the message's fate
    is unknown (RFC 5321 6.1 forbids guessing "not delivered"), unless the server
    reset the connection, which means it left bytes of ours unread, the end of
    data among them: then the error to raise instead (``dot_sent`` cleared). Not once
    an LMTP server has answered for a recipient: it has read the end of data."""
    if s._conn is None or s._answered or not s._conn.reset_by_peer:
        return None
    s.dot_sent = False
    return ConnectionLostError(
        "the server reset the connection before reading the end of the message",
        stage="message",
    )


def _by_bdat(s: SessionState, t: _Transaction) -> Steps[Reply]:
    """:func:`transaction_steps` with BDAT (RFC 3030), for a server that offers
    CHUNKING: the content as it is, with its size (no dot-stuffing, see
    :meth:`PreparedMessage.chunks <asmtp._core.prepared.PreparedMessage.chunks>`),
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
    proto = s.proto
    timeouts = s.timeouts
    refused = t.refused
    if s._needs_rset:
        yield from _rset(s)
    chunks = t.message.chunks()
    if not proto.capabilities.pipelining:
        if not (yield from _mail_and_rcpts(s, t)):
            return NO_DATA
        return (yield from _chunks(s, t, chunks))
    # PIPELINING: MAIL, every RCPT and the first chunk in one write.
    commands = t.mail_and_rcpts(proto)
    whole = len(chunks) == 1
    if whole:
        # The last chunk goes in this write: the hook gets every recipient, as any
        # of them may get the message once it has left.
        if t.extras.before_dot is not None:
            yield from _before_dot(s, t)
        then_quit = t.last and len(t.recipients) == 1
        first = proto.bdat(chunks[0], last=True, then_quit=then_quit)
    else:
        first = proto.bdat(chunks[0])
    # The commands in one piece, the chunk's own after them. Drained when it holds the
    # last chunk: lost while the kernel would not take more means that never left.
    yield send((commands + first[0], *first[1:]), timeouts.data_block, whole)
    s.dot_sent = whole
    try:
        mail_reply: Reply = yield s.wait_reply
        if proto.closed:
            s.dot_sent = False
            raise reply_error(mail_reply, "mail")
        _rcpts_begin(s)
        for rcpt in t.recipients:
            _rcpt_judged(s, t, rcpt, (yield s.wait_reply))
        if whole:
            s.stage = "message"
            if s.on_stage is not None:
                s._mark("message")
            chunk_reply: Reply = yield s.wait_end
            if proto.lmtp:  # RFC 2033 4.2: the last chunk gets a reply per recipient
                chunk_reply = yield from _per_recipient(s, t, chunk_reply)
        else:
            s.stage = "bdat"
            chunk_reply = yield s.wait_reply
    except ConnectionLostError as exc:
        unread = _end_unread(s) if s.dot_sent else None
        if unread is not None:
            raise unread from exc
        raise
    s.dot_sent = False
    if mail_reply.code not in _MAIL_OK:
        refused.clear()  # the RCPTs' replies (503) answered no transaction
        s._answered = NO_REPLIES
        raise reply_error(mail_reply, "mail")  # the chunk got 503 too
    if len(refused) == len(t.recipients):
        # No recipient: the chunk's refusal (503 5.5.1) says nothing more.
        s._needs_rset = not proto.closed
        if s.on_stage is not None:
            s._mark("idle")
        return NO_DATA
    if whole:
        return _end_of_chunks(s, chunk_reply)
    if chunk_reply.code not in _BDAT_OK:
        s._needs_rset = not proto.closed
        raise reply_error(chunk_reply, "bdat")
    return (yield from _chunks(s, t, chunks[1:]))


def _chunks(
    s: SessionState, t: _Transaction, chunks: Sequence[tuple[bytes | memoryview, ...]]
) -> Steps[Reply]:
    """Send ``chunks``, the last with LAST, once the RCPTs are answered: with
    PIPELINING in one write, else each awaiting its reply; the reply to the last
    chunk is returned (as the reply to DATA's dot is)."""
    proto = s.proto
    timeouts = s.timeouts
    middle = chunks[:-1]
    s.stage = "bdat"
    if not proto.capabilities.pipelining:
        for chunk in middle:
            reply: Reply = yield command(proto.bdat(chunk), timeouts.data_block)
            if reply.code not in _BDAT_OK:
                s._needs_rset = not proto.closed
                raise reply_error(reply, "bdat")
        middle = ()
    if t.extras.before_dot is not None:
        yield from _before_dot(s, t)
    out: list[bytes | memoryview] = []
    for chunk in middle:
        out += proto.bdat(chunk)
    out += proto.bdat(chunks[-1], last=True, then_quit=t.then_quit(proto))
    if s.on_stage is not None:
        s._mark("message")
    # Drained: lost while the kernel would not take more means LAST never left.
    yield send(tuple(out), timeouts.data_block, True)
    s.dot_sent = True
    failed: Reply | None = None
    try:
        for _ in middle:
            reply = yield s.wait_reply
            if proto.closed:
                s.dot_sent = False
                raise reply_error(reply, "bdat")
            if failed is None and reply.code not in _BDAT_OK:
                failed = reply  # the transaction failed: nothing will be delivered
                s.dot_sent = False
        s.stage = "message"
        final: Reply = yield s.wait_end
        if proto.lmtp and failed is None:  # RFC 2033 4.2: a reply per recipient
            final = yield from _per_recipient(s, t, final)
    except SMTPError as exc:
        if failed is not None:  # what the transaction came to, whatever followed
            raise reply_error(failed, "bdat") from exc
        unread = _end_unread(s) if isinstance(exc, ConnectionLostError) else None
        if unread is not None:
            raise unread from exc
        raise
    s.dot_sent = False
    if failed is not None:
        s._needs_rset = not proto.closed
        raise reply_error(failed, "bdat")
    return _end_of_chunks(s, final)


def _end_of_chunks(s: SessionState, final: Reply) -> Reply:
    """The last chunk's reply, judged as the dot's: a 421 raises; another refusal
    is every accepted recipient's result (and RSET comes before the next MAIL:
    RFC 3030 2 has a refused chunk fail the transaction, not end it)."""
    if final.code not in _MESSAGE_OK:
        s._needs_rset = not s.proto.closed
        if s.proto.closed:
            raise reply_error(final, "message")
    if s.on_stage is not None:
        s._mark("idle")
    return final
