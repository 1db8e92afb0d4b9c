"""CHUNKING (RFC 3030): BDAT instead of DATA when the server offers it.

The sans-IO core and the session's steps against scripted server bytes first; then real
sessions on loopback, on asyncio and trio, against :class:`ChunkingServer` (aiosmtpd
has no CHUNKING), a small server written here that implements BDAT as RFC 3030 says
and records each client write it had to wait for (a *flight*): the round-trip count of
a session, with and without CHUNKING; then the real Postfix (``-m postfix``).

What BDAT buys, as the flights show it::

    DATA:  220 | EHLO | MAIL RCPT DATA | <content> . QUIT          three writes, three waits
    BDAT:  220 | EHLO | MAIL RCPT BDAT n LAST <content> QUIT      two
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

import asmtp
from asmtp._core.prepared import PreparedMessage, prepare_message, with_headers
from asmtp._core.protocol import ClientProtocol, State
from asmtp._core.reply import NEED_DATA, Reply
from asmtp._core.steps import Await, Command, Data, Send, Steps
from asmtp._core.wire import BDAT_CHUNK
from asmtp._delivery.endpoint import Endpoint
from asmtp._delivery.session import Session
from asmtp._delivery.transaction import NO_EXTRAS, Extras
from asmtp.config import Direct, Timeouts
from asmtp.errors import (
    ConnectionLostError,
    InputError,
    LocalProtocolError,
    RemoteProtocolError,
    SMTPError,
)
from asmtp.results import RecipientResult
from dnsserver import DNSServer
from postfix import Listener, PostfixServer, postfix

__all__ = ["postfix"]  # the fixture, for the test marked postfix

T = TypeVar("T")

HELO = "client.example.com"
SENDER = "a@example.com"
EHLO_CHUNKING = b"250-mx.example.org\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 SIZE 100000000\r\n"
EHLO_NO_PIPELINING = b"250-mx.example.org\r\n250-CHUNKING\r\n250 SIZE 100000000\r\n"
GREETING = b"220 mx.example.org ESMTP\r\n"
#: what the server should get: a line that starts with a dot stays as it is (BDAT
#: content is not dot-stuffed), and so does the "." line inside it
CONTENT = b"From: a@example.com\r\nSubject: hi\r\n\r\n.starts with a dot\r\n.\r\nhello\r\n"
MESSAGE = prepare_message(CONTENT)


def large_content(size: int) -> bytes:
    """Text of at most ``size`` octets in short lines, one in ten starting with a dot."""
    lines = [
        b"%s%06d plain text, the same again and again, in lines of seventy\r\n"
        % (b"." if n % 10 == 0 else b"x", n)
        for n in range(size // 70)
    ]
    return b"Subject: large\r\n\r\n" + b"".join(lines)


LARGE_CONTENT = large_content(2 * BDAT_CHUNK + BDAT_CHUNK // 2)  # three chunks
LARGE = prepare_message(LARGE_CONTENT)


def joined(data: Data) -> bytes:
    return data if isinstance(data, bytes) else b"".join(data)


# -- the message as BDAT sends it ---------------------------------------------------------


def test_the_content_is_sent_as_it_is_not_dot_stuffed() -> None:
    assert MESSAGE.data.endswith(b"\r\n..starts with a dot\r\n..\r\nhello\r\n.\r\n")  # for DATA
    [chunk] = MESSAGE.chunks()
    assert b"".join(chunk) == CONTENT  # for BDAT: no added dots, no final "."


def test_a_message_without_dot_lines_is_sent_from_its_own_parts() -> None:
    prepared = prepare_message(b"Subject: plain\r\n\r\n" + b"no dot here\r\n" * 200_000)
    assert len(prepared.parts) > 1  # blocks of whole lines
    pieces = [piece for chunk in prepared.chunks() for piece in chunk]
    # views of the parts themselves: neither copied nor scanned for dots
    assert all(any(_same(piece, part) for part in prepared.parts) for piece in pieces)
    assert b"".join(pieces) == prepared.data[:-3]


def _same(piece: bytes | memoryview, part: bytes) -> bool:
    return _base(piece) is part


def _base(piece: bytes | memoryview) -> object:
    return piece.obj if isinstance(piece, memoryview) else piece


def test_dot_lines_are_unstuffed_once_per_message() -> None:
    first = LARGE.chunks()
    again = LARGE.chunks()
    assert b"".join(b"".join(c) for c in first) == LARGE_CONTENT
    # the unstuffed blocks are kept: every session sending the message shares them
    assert all(_base(a) is _base(b) for a, b in zip(first[0], again[0], strict=True))


def test_a_large_message_goes_in_chunks_of_bdat_chunk_octets() -> None:
    sizes = [sum(map(len, chunk)) for chunk in LARGE.chunks()]
    assert sizes == [BDAT_CHUNK, BDAT_CHUNK, len(LARGE_CONTENT) - 2 * BDAT_CHUNK]


def test_per_recipient_copies_share_the_unstuffed_body() -> None:
    base = prepare_message(b"Subject: x\r\n\r\nbody\r\n")
    copy = with_headers(base, [("X-Campaign", "7")])
    [chunk] = copy.chunks()
    assert [bytes(p) for p in chunk] == [b"X-Campaign: 7\r\n", b"Subject: x\r\n\r\nbody\r\n"]
    assert _base(chunk[1]) is base.parts[0]


def test_a_message_split_anywhere_unstuffs_across_its_pieces() -> None:
    """Hand-built messages may be cut mid-line (``asmtp bench`` numbers its copies so):
    a stuffed dot may open a piece, or ``CRLF ..`` run across two or three."""
    data = MESSAGE.data
    cuts = [(at,) for at in range(1, len(data))]
    cuts += [(at, at + 1) for at in range(1, len(data) - 1)]
    for cut in cuts:
        bounds = (0, *cut, len(data))
        parts = tuple(data[a:b] for a, b in itertools.pairwise(bounds))
        odd = PreparedMessage(parts, MESSAGE.size, False, False)
        for size in (1, 7, 1000):
            chunks = odd.chunks(size)
            assert b"".join(b"".join(chunk) for chunk in chunks) == CONTENT, cut
            assert all(sum(map(len, chunk)) == size for chunk in chunks[:-1])


# -- the sans-IO core ---------------------------------------------------------------------


def feed(proto: ClientProtocol, data: bytes) -> Reply:
    proto.receive_data(data)
    reply = proto.next_reply()
    assert isinstance(reply, Reply)
    return reply


def greeted(ehlo: bytes = EHLO_CHUNKING) -> ClientProtocol:
    proto = ClientProtocol()
    feed(proto, GREETING)
    proto.ehlo(HELO)
    feed(proto, ehlo)
    return proto


def test_mail_rcpt_and_bdat_last_go_in_one_write() -> None:
    lines: list[str] = []
    proto = ClientProtocol(trace=lines.append)
    feed(proto, GREETING)
    proto.ehlo(HELO)
    feed(proto, EHLO_CHUNKING)
    chunk = (b"Subject: x\r\n\r\n", b".hi\r\n")
    out = proto.mail(SENDER) + proto.rcpt("b@example.org")
    pieces = proto.bdat(chunk, last=True)
    assert out + b"".join(pieces) == (
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nBDAT 19 LAST\r\n"
        b"Subject: x\r\n\r\n.hi\r\n"
    )
    assert pieces[1] is chunk[0] and pieces[2] is chunk[1]  # never copied
    assert lines[-1] == "> BDAT 19 LAST"  # the content is never in the transcript
    assert proto.awaiting == "mail"
    assert feed(proto, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n").code == 250
    assert feed(proto, b"").code == 250
    assert proto.awaiting == "message"  # the last chunk's reply is the end of data's
    assert feed(proto, b"250 2.0.0 queued\r\n").code == 250
    assert proto.state is State.READY and proto.awaiting is None


def test_chunks_may_follow_one_another_pipelined() -> None:
    proto = greeted()
    proto.mail(SENDER)
    proto.rcpt("b@example.org")
    first = proto.bdat((b"12345",))
    second = proto.bdat((b"678\r\n",), last=True, then_quit=True)
    assert first == (b"BDAT 5\r\n", b"12345")
    assert second == (b"BDAT 5 LAST\r\n", b"678\r\n", b"QUIT\r\n")
    feed(proto, b"250 ok\r\n250 ok\r\n250 2.0.0 5 octets\r\n")
    feed(proto, b"")
    feed(proto, b"")
    assert proto.state is State.MAIL and proto.awaiting == "message"
    feed(proto, b"250 2.0.0 queued\r\n221 bye\r\n")
    assert feed(proto, b"").code == 221 and proto.closed


@pytest.mark.parametrize(
    ("what", "send", "error"),
    [
        (
            "no CHUNKING",
            lambda p: (p.mail(SENDER), p.rcpt("b@example.org"), p.bdat((b"x",))),
            "does not offer CHUNKING",
        ),
        ("no RCPT", lambda p: (p.mail(SENDER), p.bdat((b"x",))), "BDAT without MAIL and RCPT"),
        (
            "DATA after BDAT",
            lambda p: (p.mail(SENDER), p.rcpt("b@example.org"), p.bdat((b"x",)), p.data()),
            r"DATA after BDAT in one transaction \(RFC 3030 2\)",
        ),
        (
            "BDAT after LAST",
            lambda p: (
                p.mail(SENDER),
                p.rcpt("b@example.org"),
                p.bdat((b"x",), last=True),
                p.bdat((b"y",)),
            ),
            "cannot send BDAT while awaiting",
        ),
        (
            "QUIT after a chunk that is not the last",
            lambda p: (p.mail(SENDER), p.rcpt("b@example.org"), p.bdat((b"x",), then_quit=True)),
            "QUIT after BDAT needs the last chunk",
        ),
    ],
)
def test_what_the_core_refuses_to_send(
    what: str, send: Callable[[ClientProtocol], object], error: str
) -> None:
    proto = greeted(
        EHLO_CHUNKING.replace(b"250-CHUNKING\r\n", b"") if what == "no CHUNKING" else EHLO_CHUNKING
    )
    with pytest.raises(LocalProtocolError, match=error):
        send(proto)


def test_without_pipelining_bdat_waits_for_the_rcpt_reply() -> None:
    proto = greeted(EHLO_NO_PIPELINING)
    proto.mail(SENDER)
    feed(proto, b"250 ok\r\n")
    proto.rcpt("b@example.org")
    with pytest.raises(LocalProtocolError, match="while awaiting the rcpt reply"):
        proto.bdat((b"x\r\n",), last=True)
    feed(proto, b"250 ok\r\n")
    assert proto.bdat((b"x\r\n",), last=True) == (b"BDAT 3 LAST\r\n", b"x\r\n")


def awaiting_chunk(last: bool) -> ClientProtocol:
    proto = greeted()
    proto.mail(SENDER)
    proto.rcpt("b@example.org")
    feed(proto, b"250 ok\r\n")
    feed(proto, b"250 ok\r\n")
    proto.bdat((b"x\r\n",), last=last)
    return proto


# (the reply, the state after the reply to a chunk, after the reply to the last chunk)
REPLIES = [
    (b"250 2.0.0 ok", State.MAIL, State.READY),
    (b"452 4.3.1 out of space", State.READY, State.READY),  # the transaction failed
    (b"552 5.3.4 too big", State.READY, State.READY),
    (b"503 5.5.1 no valid recipients", State.READY, State.READY),
    (b"421 4.3.0 going down", State.CLOSED, State.CLOSED),  # RFC 5321 3.8
]


@pytest.mark.parametrize("last", [False, True], ids=["chunk", "last chunk"])
@pytest.mark.parametrize(("reply", "after_chunk", "after_last"), REPLIES)
def test_each_reply_to_bdat_leads_to_its_state(
    last: bool, reply: bytes, after_chunk: State, after_last: State
) -> None:
    proto = awaiting_chunk(last)
    feed(proto, reply + b"\r\n")
    assert proto.state is (after_last if last else after_chunk)


@pytest.mark.parametrize("last", [False, True], ids=["chunk", "last chunk"])
@pytest.mark.parametrize("reply", [b"354 go ahead", b"221 bye", b"251 will forward"])
def test_a_reply_bdat_does_not_allow_ends_the_session(last: bool, reply: bytes) -> None:
    proto = awaiting_chunk(last)
    with pytest.raises(RemoteProtocolError) as caught:
        feed(proto, reply + b"\r\n")
    assert caught.value.stage == ("message" if last else "bdat")
    assert proto.closed


# -- the session's steps, against scripted bytes --------------------------------------


def test_the_setting_is_on_by_default_and_a_bool() -> None:
    assert asmtp.Relay("smtp.example.com").chunking and Direct().chunking
    with pytest.raises(InputError, match="chunking must be True or False: 'no'"):
        asmtp.Relay("smtp.example.com", chunking="no")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="chunking must be True or False: 0"):
        Direct(chunking=0)  # type: ignore[arg-type]


def session(*, chunking: bool = True) -> Session:
    endpoint = Endpoint(host="mx.example.org", port=25, helo=HELO, tls="none", chunking=chunking)
    return Session(endpoint, Timeouts())


@dataclass
class Script:
    """What the server sends, one read after another (``b""``: it closes), and which
    write, by number, breaks the connection."""

    reads: Sequence[bytes]
    lost_at_write: int | None = None
    writes: list[bytes] = field(default_factory=list)
    awaited: list[str] = field(default_factory=list)  # what each Await step was for


def run(s: Session, steps: Steps[T], script: Script) -> T:
    """Run ``steps`` as asmtp's drivers do: each write recorded (pieces joined), each
    reply sent back, each SMTPError met while writing or reading thrown in at the
    step's ``yield``; an awaited hook is run to its end."""
    reads: Iterator[bytes] = iter(script.reads)
    proto = s.proto
    value: Any = None
    error: SMTPError | None = None
    while True:
        try:
            step = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            assert next(reads, None) is None, "the server script has bytes left"
            return stop.value  # type: ignore[no-any-return]
        value = error = None
        if isinstance(step, Await):
            script.awaited.append(repr(step.call))
            value = asyncio.run(_call(step.call))
            continue
        if isinstance(step, Send | Command):
            if script.lost_at_write == len(script.writes):
                error = ConnectionLostError("broken pipe", stage=proto.awaiting or "message")
                proto.receive_data(b"")
                continue
            script.writes.append(joined(step.data))
            if isinstance(step, Send):
                continue
        try:
            while (value := proto.next_reply()) is NEED_DATA:
                proto.receive_data(next(reads))
        except SMTPError as exc:
            value, error = None, exc


async def _call(call: Callable[[], Awaitable[T]]) -> T:
    return await call()


def one_shot(
    recipients: Sequence[str],
    script: Script,
    message: PreparedMessage = MESSAGE,
    *,
    chunking: bool = True,
    extras: Extras = NO_EXTRAS,
) -> list[RecipientResult]:
    """A whole session's results, one per recipient whatever happened."""
    s = session(chunking=chunking)
    results: dict[str, RecipientResult] = {}
    steps = s.one_shot(
        SENDER, recipients, message, results, started=0.0, extras=extras, clock=lambda: 0.0
    )
    run(s, steps, script)
    assert set(results) == set(recipients)
    return [results[r] for r in recipients]


def outcome(result: RecipientResult) -> tuple[str, str, int | None]:
    return (result.status, result.stage, result.code)


def envelope(*recipients: str, message: PreparedMessage = MESSAGE) -> bytes:
    return b"MAIL FROM:<a@example.com> SIZE=%d\r\n" % message.size + b"".join(
        b"RCPT TO:<%s>\r\n" % r.encode() for r in recipients
    )


def test_a_fresh_session_is_greeting_ehlo_and_one_round_trip() -> None:
    script = Script(
        [
            GREETING,
            EHLO_CHUNKING,
            b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 queued as 1\r\n221 2.0.0 bye\r\n",
        ]
    )
    [result] = one_shot(["b@example.org"], script)
    assert outcome(result) == ("delivered", "message", 250)
    assert script.writes == [
        b"EHLO client.example.com\r\n",
        # one write: no 354 to wait for, and QUIT rides along (one recipient: no 452
        # can send anyone to a second transaction)
        envelope("b@example.org") + b"BDAT %d LAST\r\n" % len(CONTENT) + CONTENT + b"QUIT\r\n",
    ]


def test_a_large_message_goes_in_chunks_after_the_first_is_answered() -> None:
    script = Script(
        [
            GREETING,
            EHLO_CHUNKING,
            b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 1048576 octets\r\n",
            b"250 2.0.0 1048576 octets\r\n250 2.0.0 queued\r\n221 2.0.0 bye\r\n",
        ]
    )
    [result] = one_shot(["b@example.org"], script, LARGE)
    assert outcome(result) == ("delivered", "message", 250)
    one, two = BDAT_CHUNK, 2 * BDAT_CHUNK
    rest = len(LARGE_CONTENT) - two
    assert script.writes[1] == (
        envelope("b@example.org", message=LARGE) + b"BDAT %d\r\n" % one + LARGE_CONTENT[:one]
    )
    assert script.writes[2] == (
        b"BDAT %d\r\n" % one
        + LARGE_CONTENT[one:two]
        + b"BDAT %d LAST\r\n" % rest
        + LARGE_CONTENT[two:]
        + b"QUIT\r\n"
    )


def test_a_refused_rcpt_leaves_the_chunk_to_the_others() -> None:
    script = Script(
        [
            GREETING,
            EHLO_CHUNKING,
            b"250 2.1.0 ok\r\n550 5.1.1 no such user\r\n250 2.1.5 ok\r\n250 2.0.0 queued\r\n",
            b"221 2.0.0 bye\r\n",
        ]
    )
    results = one_shot(["x@example.org", "b@example.org"], script)
    assert [outcome(r) for r in results] == [
        ("permanent", "rcpt", 550),
        ("delivered", "message", 250),
    ]
    assert script.writes[1] == (
        envelope("x@example.org", "b@example.org")
        + b"BDAT %d LAST\r\n" % len(CONTENT)
        + CONTENT  # two recipients: a 452 could call for another transaction, so
    )  # QUIT waits for the replies
    assert script.writes[2] == b"QUIT\r\n"


def test_when_every_rcpt_is_refused_the_chunk_refusal_is_no_result() -> None:
    s = session()
    run(s, s.greet(), Script([GREETING, EHLO_CHUNKING]))
    script = Script(
        [b"250 2.1.0 ok\r\n550 5.1.1 no\r\n450 4.2.1 busy\r\n503 5.5.1 no valid recipients\r\n"]
    )
    refused, final = run(
        s, s.transaction_steps(SENDER, ["x@example.org", "y@example.org"], MESSAGE), script
    )
    assert {r: reply.code for r, reply in refused.items()} == {
        "x@example.org": 550,
        "y@example.org": 450,
    }
    assert final.code == 554 and "no valid recipients" in final.message  # the session's own
    # the server may keep MAIL's transaction open: RSET before the next one
    again = Script([b"250 2.0.0 ok\r\n", b"250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n"])
    _, final = run(s, s.transaction_steps(SENDER, ["b@example.org"], MESSAGE), again)
    assert final.code == 250
    assert again.writes[0] == b"RSET\r\n"


def test_a_refused_mail_counts_alone() -> None:
    script = Script(
        [
            GREETING,
            EHLO_CHUNKING,
            b"550 5.7.1 not you\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n221 bye\r\n",
        ]
    )
    [result] = one_shot(["b@example.org"], script)
    assert outcome(result) == ("permanent", "mail", 550)


@pytest.mark.parametrize(
    ("reply", "status"),
    [(b"554 5.7.1 spam", "permanent"), (b"452 4.3.1 out of space", "transient")],
)
def test_a_refused_last_chunk_is_a_refused_end_of_data(reply: bytes, status: str) -> None:
    script = Script(
        [GREETING, EHLO_CHUNKING, b"250 ok\r\n250 ok\r\n" + reply + b"\r\n221 2.0.0 bye\r\n"]
    )
    [result] = one_shot(["b@example.org"], script)
    assert outcome(result) == (status, "message", int(reply[:3]))
    assert reply[4:].decode() in result.message


def test_a_refused_chunk_fails_the_transaction_and_no_more_chunks_go() -> None:
    script = Script(
        [
            GREETING,
            EHLO_CHUNKING,
            b"250 ok\r\n250 ok\r\n552 5.3.4 message too big\r\n",
            b"221 2.0.0 bye\r\n",
        ]
    )
    [result] = one_shot(["b@example.org"], script, LARGE)
    assert outcome(result) == ("permanent", "bdat", 552)
    assert str(result.message).startswith("BDAT refused: 552 5.3.4")
    assert [w[:6] for w in script.writes] == [b"EHLO c", b"MAIL F", b"QUIT\r\n"]


def test_a_refused_chunk_in_a_pipelined_run_is_the_result_whatever_follows() -> None:
    script = Script(
        [
            GREETING,
            EHLO_CHUNKING,
            b"250 ok\r\n250 ok\r\n250 2.0.0 1048576 octets\r\n",
            b"451 4.3.0 disk trouble\r\n503 5.5.1 transaction failed\r\n221 bye\r\n",
        ]
    )
    [result] = one_shot(["b@example.org"], script, LARGE)
    assert outcome(result) == ("transient", "bdat", 451)


def test_421_to_bdat_ends_the_session() -> None:
    script = Script([GREETING, EHLO_CHUNKING, b"250 ok\r\n250 ok\r\n421 4.3.0 going down\r\n"])
    [result] = one_shot(["b@example.org"], script)
    assert outcome(result) == ("transient", "message", 421)


def test_lost_before_the_last_chunk_left_is_transient() -> None:
    # the second write (the first chunk goes with the envelope) breaks
    script = Script(
        [GREETING, EHLO_CHUNKING, b"250 ok\r\n250 ok\r\n250 2.0.0 1048576 octets\r\n"],
        lost_at_write=2,
    )
    [result] = one_shot(["b@example.org"], script, LARGE)
    assert result.status == "transient"


def test_lost_after_the_last_chunk_left_is_unknown() -> None:
    # everything went in one write; the server closes before a single reply
    script = Script([GREETING, EHLO_CHUNKING, b""])
    [result] = one_shot(["b@example.org"], script)
    assert result.status == "unknown"
    # and a failed write of that one write leaves it transient
    script = Script([GREETING, EHLO_CHUNKING], lost_at_write=1)
    [result] = one_shot(["b@example.org"], script)
    assert result.status == "transient"


def test_without_pipelining_each_command_waits_for_its_reply() -> None:
    script = Script(
        [
            GREETING,
            EHLO_NO_PIPELINING,
            b"250 ok\r\n",
            b"250 ok\r\n",
            b"250 queued\r\n",
            b"221 bye\r\n",
        ]
    )
    [result] = one_shot(["b@example.org"], script)
    assert outcome(result) == ("delivered", "message", 250)
    assert script.writes[1:] == [
        b"MAIL FROM:<a@example.com> SIZE=%d\r\n" % MESSAGE.size,
        b"RCPT TO:<b@example.org>\r\n",
        b"BDAT %d LAST\r\n" % len(CONTENT) + CONTENT,
        b"QUIT\r\n",
    ]


def test_chunking_false_sends_data_though_the_server_offers_chunking() -> None:
    script = Script(
        [
            GREETING,
            EHLO_CHUNKING,
            b"250 ok\r\n250 ok\r\n354 go ahead\r\n",
            b"250 queued\r\n221 bye\r\n",
        ]
    )
    [result] = one_shot(["b@example.org"], script, chunking=False)
    assert outcome(result) == ("delivered", "message", 250)
    assert script.writes[1].endswith(b"DATA\r\n")
    assert script.writes[2] == MESSAGE.data + b"QUIT\r\n"


def test_the_hook_before_the_end_of_data_comes_before_the_one_write() -> None:
    seen: list[Sequence[str]] = []

    async def before_dot(recipients: Sequence[str]) -> None:
        seen.append(list(recipients))

    script = Script(
        [GREETING, EHLO_CHUNKING, b"250 ok\r\n550 no\r\n250 ok\r\n250 queued\r\n", b"221 bye\r\n"]
    )
    one_shot(["x@example.org", "b@example.org"], script, extras=Extras(before_dot=before_dot))
    # the last chunk leaves before any RCPT reply: either recipient may get it
    assert seen == [["x@example.org", "b@example.org"]]
    assert len(script.awaited) == 1 and len(script.writes) == 3


# -- real sessions on loopback ----------------------------------------------------------


@dataclass(frozen=True)
class Delivered:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    chunks: tuple[int, ...]  # the size of each chunk (empty: it came by DATA)


@dataclass
class Fault:
    """What :class:`ChunkingServer` does wrong on cue."""

    rcpt: Mapping[str, str] = field(default_factory=dict)  # address -> reply
    chunks: Sequence[str | None] = ()  # replies to the session's chunks, in order
    close_mid_chunk: bool = False  # close once half of the first chunk has come
    close_after_last: bool = False  # read the last chunk, then close without a reply


#: what a client may send more after without waiting (RFC 2920 3.1, RFC 3030 4.2)
_IN_A_GROUP = frozenset({"MAIL", "RCPT", "BDAT"})
#: how long the rest of one write may take to come (it never has to wait for anything)
_GRACE = 0.25
_BDAT = re.compile(rb"BDAT ([0-9]+)( LAST)?", re.IGNORECASE)
_PATH = re.compile(r"^(?:FROM|TO):<([^>]*)>", re.IGNORECASE)


class ChunkingServer:
    """SMTP on loopback with CHUNKING as RFC 3030 has it, in a thread of its own.

    BDAT reads exactly its octets whatever it answers (a chunk refused, or sent with
    no valid recipient, is read and dropped: 503), refuses DATA after BDAT, and
    delivers at LAST. It also takes DATA, so that the two can be compared.

    It answers what it has read once it has nothing more to read: replies it holds
    go out when the client has to wait for them. So :attr:`flights` groups each
    session's commands by the client write they came in, after the wait before it:
    ``[["EHLO"], ["MAIL", "RCPT", "BDAT LAST", "QUIT"]]`` is greeting, EHLO and one
    round trip. (A chunk's octets and DATA's content are not commands: the end of
    DATA's content shows as ``"."``.)
    """

    def __init__(
        self, *, chunking: bool = True, pipelining: bool = True, fault: Fault | None = None
    ) -> None:
        self.capabilities = ["SIZE 50000000", "8BITMIME"]
        self.capabilities += ["PIPELINING"] * pipelining + ["CHUNKING"] * chunking
        self.fault = fault or Fault()
        self.flights: list[list[list[str]]] = []  # per session
        self.delivered: list[Delivered] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def __enter__(self) -> ChunkingServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        self.port = future.result(10.0)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()
        assert not self.errors, self.errors

    async def _open(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    def relay(self, **options: Any) -> asmtp.Relay:
        return asmtp.Relay("127.0.0.1", self.port, tls="none", helo=HELO, **options)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        flights: list[list[str]] = []
        with self._lock:
            self.flights.append(flights)
        try:
            await _ServerSession(self, reader, writer, flights).run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # pragma: no cover - a bug in the test server
            with self._lock:
                self.errors.append(exc)
        finally:
            writer.close()

    def record(self, delivered: Delivered) -> None:
        with self._lock:
            self.delivered.append(delivered)


class _ServerSession:
    def __init__(
        self,
        server: ChunkingServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        flights: list[list[str]],
    ) -> None:
        self.server = server
        self.fault = server.fault
        self.reader = reader
        self.writer = writer
        self.flights = flights
        self.held = bytearray()  # read, not yet taken
        self.replies = bytearray()  # answered, not yet sent
        self.waited = False  # replies went out since the last command: a new flight
        self.last = ""  # the last command noted
        self.eof = False
        self.chunk_count = 0
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []
        self.chunks: list[bytes] = []
        self.failed = False  # a chunk of this transaction was refused

    def reply(self, text: str) -> None:
        self.replies += text.encode() + b"\r\n"

    async def flush(self) -> None:
        self.writer.write(bytes(self.replies))
        self.replies.clear()
        await self.writer.drain()
        self.waited = True

    def note(self, what: str) -> None:
        """``what`` came (a command, or the end of DATA's content), in which flight."""
        if self.waited or not self.flights:
            self.flights.append([])
            self.waited = False
        self.flights[-1].append(what)
        self.last = what

    async def more(self, within: float | None = None) -> bool:
        """Read what comes (within ``within`` seconds); False at the end or the time."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), within)
        except TimeoutError:
            return False
        self.held += data
        self.eof = not data
        return bool(data)

    async def line(self) -> bytes | None:
        """The next line. Replies held go out first if it has not come: at once after
        a command that ends a group (RFC 2920 3.1: the client waits now), else once
        the rest of the client's write (the pieces of one write may come apart) has
        had time to come."""
        while (end := self.held.find(b"\r\n")) < 0:
            if self.replies:
                ended = self.last not in _IN_A_GROUP
                if not ended and not self.eof and await self.more(_GRACE):
                    continue
                await self.flush()
            if not await self.more():
                return None
        line = bytes(self.held[:end])
        del self.held[: end + 2]
        return line

    async def octets(self, count: int) -> bytes | None:
        """The next ``count`` octets, a chunk's: the client sends them unasked."""
        while len(self.held) < count:
            if not await self.more():
                return None
        data = bytes(self.held[:count])
        del self.held[:count]
        return data

    async def run(self) -> None:
        self.reply("220 chunking.test ESMTP")
        while (line := await self.line()) is not None:
            verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
            bdat = _BDAT.fullmatch(line)
            self.note(verb if bdat is None else "BDAT LAST" if bdat.group(2) else "BDAT")
            if bdat is not None:
                if not await self.bdat(int(bdat.group(1)), bool(bdat.group(2))):
                    return
            elif not await self.command(verb, line[len(verb) + 1 :].decode()):
                return

    async def command(self, verb: str, argument: str) -> bool:
        if verb == "EHLO":
            lines = ["chunking.test", *self.server.capabilities]
            for i, text in enumerate(lines):
                self.reply(f"250{' ' if i == len(lines) - 1 else '-'}{text}")
        elif verb == "MAIL":
            match = _PATH.match(argument)
            if self.mail_from is not None or match is None:
                self.reply("503 5.5.1 Error: nested MAIL command")
            else:
                self.mail_from = match[1]
                self.reply("250 2.1.0 Ok")
        elif verb == "RCPT":
            match = _PATH.match(argument)
            if self.mail_from is None or match is None:
                self.reply("503 5.5.1 Error: need MAIL command")
            elif match[1] in self.fault.rcpt:
                self.reply(self.fault.rcpt[match[1]])
            else:
                self.rcpt_tos.append(match[1])
                self.reply("250 2.1.5 Ok")
        elif verb == "DATA":
            return await self.data()
        elif verb == "RSET":
            self.reset()
            self.reply("250 2.0.0 Ok")
        elif verb == "QUIT":
            self.reply("221 2.0.0 Bye")
            await self.flush()
            return False
        else:
            self.reply("502 5.5.2 Error: command not recognized")
        return True

    async def data(self) -> bool:
        if self.chunks:
            self.reply("503 5.5.1 Error: DATA after BDAT")  # RFC 3030 2
            return True
        if not self.rcpt_tos:
            self.reply("554 5.5.1 Error: no valid recipients")
            return True
        self.reply("354 End data with <CR><LF>.<CR><LF>")
        lines = []
        while (line := await self.line()) != b".":
            if line is None:
                return False
            lines.append(line[1:] if line.startswith(b".") else line)
        self.note(".")
        self.deliver(b"".join(line + b"\r\n" for line in lines), ())
        return True

    async def bdat(self, size: int, last: bool) -> bool:
        fault = self.fault
        if fault.close_mid_chunk:
            await self.octets(size // 2)
            # Closed with octets unread (no linger): the client sees a reset.
            sock = self.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        chunk = await self.octets(size)
        if chunk is None:
            return False
        if last and fault.close_after_last:
            return False  # all read: the client sees the end of the stream
        scripted = fault.chunks[self.chunk_count] if self.chunk_count < len(fault.chunks) else None
        self.chunk_count += 1
        if self.mail_from is None or not self.rcpt_tos:
            self.reply("503 5.5.1 Error: no valid recipients")
        elif self.failed:
            self.reply("503 5.5.1 Error: the transaction failed")  # read and dropped
        elif scripted is not None and not scripted.startswith("2"):
            self.failed = True
            self.reply(scripted)
            if scripted.startswith("421"):
                await self.flush()
                return False
        else:
            self.chunks.append(chunk)
            if not last:
                self.reply(scripted or f"250 2.0.0 Ok: {size} octets")
        if last:
            if self.chunks and not self.failed:
                self.deliver(b"".join(self.chunks), tuple(map(len, self.chunks)))
            self.reset()
        return True

    def deliver(self, content: bytes, chunks: tuple[int, ...]) -> None:
        assert self.mail_from is not None
        self.server.record(Delivered(self.mail_from, tuple(self.rcpt_tos), content, chunks))
        self.reply(f"250 2.0.0 Ok: queued as {len(self.server.delivered)}")
        self.reset()


@pytest.fixture
def chunking_server() -> Iterator[Callable[..., ChunkingServer]]:
    """Factory: ``chunking_server(chunking=..., pipelining=..., fault=Fault(...))``."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(ChunkingServer(**options))


MakeServer = Callable[..., ChunkingServer]


async def sendmail(server: ChunkingServer, *, body: str = "hi\n", **relay: Any) -> RecipientResult:
    report = await asmtp.sendmail(
        to="b@example.org",
        from_=SENDER,
        subject="chunks",
        body=body,
        relay=server.relay(**relay),
        timeout=5,
    )
    [result] = report
    return result


@pytest.mark.anyio
async def test_round_trips_of_a_fresh_session(chunking_server: MakeServer) -> None:
    """Greeting, EHLO, then MAIL+RCPT+BDAT LAST with the content and QUIT in one write:
    no 354 to wait for. With DATA: the envelope, then the content (RFC 2920's least)."""
    with_bdat = chunking_server()
    assert (await sendmail(with_bdat)).ok
    assert with_bdat.flights == [[["EHLO"], ["MAIL", "RCPT", "BDAT LAST", "QUIT"]]]
    with_data = chunking_server(chunking=False)
    assert (await sendmail(with_data)).ok
    assert with_data.flights == [[["EHLO"], ["MAIL", "RCPT", "DATA"], [".", "QUIT"]]]
    # the same message either way
    [by_bdat], [by_data] = with_bdat.delivered, with_data.delivered
    assert by_bdat.chunks and not by_data.chunks
    headers = re.compile(rb"^(Date|Message-ID):.*\r\n", re.MULTILINE)
    assert headers.sub(b"", by_bdat.content) == headers.sub(b"", by_data.content)


@pytest.mark.anyio
async def test_chunking_false_sends_data(chunking_server: MakeServer) -> None:
    server = chunking_server()
    assert (await sendmail(server, chunking=False)).ok
    assert server.flights == [[["EHLO"], ["MAIL", "RCPT", "DATA"], [".", "QUIT"]]]


@pytest.mark.anyio
@pytest.mark.parametrize("chunking", [True, False])
async def test_direct_delivery_has_the_setting_too(
    chunking_server: MakeServer, dns_server: Callable[..., DNSServer], chunking: bool
) -> None:
    server = chunking_server()
    dns = dns_server({"example.test": "@ MX 10 mx\nmx A 127.0.0.1"})
    direct = Direct(
        dns_servers=[dns.spec], port=server.port, tls="none", helo=HELO, chunking=chunking
    )
    report = await asmtp.sendmail(
        to=["b@example.test", "c@example.test"], from_=SENDER, body="hi", relay=direct
    )
    assert report.ok
    commands = [c for session in server.flights for flight in session for c in flight]
    assert commands.count("BDAT LAST" if chunking else "DATA") == 2


@pytest.mark.anyio
async def test_without_pipelining_each_command_waits(chunking_server: MakeServer) -> None:
    server = chunking_server(pipelining=False)
    assert (await sendmail(server)).ok
    assert server.flights == [[["EHLO"], ["MAIL"], ["RCPT"], ["BDAT LAST"], ["QUIT"]]]


@pytest.mark.anyio
async def test_lines_starting_with_a_dot_arrive_as_they_are(chunking_server: MakeServer) -> None:
    server = chunking_server()
    async with asmtp.connect(server.relay(), timeout=5) as connected:
        report = await connected.sendmail(SENDER, ["b@example.org"], CONTENT)
        assert report.ok
        report = await connected.sendmail(SENDER, ["b@example.org"], LARGE_CONTENT)
        assert report.ok
    small, large = server.delivered
    assert small.content == CONTENT and small.chunks == (len(CONTENT),)
    assert large.content == LARGE_CONTENT
    assert large.chunks == (BDAT_CHUNK, BDAT_CHUNK, len(LARGE_CONTENT) - 2 * BDAT_CHUNK)
    # the first chunk went with the envelope; the others once it was answered
    assert server.flights[0][1:] == [
        ["MAIL", "RCPT", "BDAT LAST"],
        ["MAIL", "RCPT", "BDAT"],
        ["BDAT", "BDAT LAST"],
        ["QUIT"],
    ]


@pytest.mark.anyio
async def test_refused_rcpts(chunking_server: MakeServer) -> None:
    server = chunking_server(fault=Fault(rcpt={"x@example.org": "550 5.1.1 no such user"}))
    async with asmtp.connect(server.relay(), timeout=5) as connected:
        some = await connected.sendmail(SENDER, ["x@example.org", "b@example.org"], CONTENT)
        every = await connected.sendmail(SENDER, ["x@example.org"], CONTENT)
        after = await connected.sendmail(SENDER, ["b@example.org"], CONTENT)
    assert [outcome(r) for r in some] == [
        ("permanent", "rcpt", 550),
        ("delivered", "message", 250),
    ]
    # no recipient: the server refuses the chunk (503), which is nobody's result
    assert [outcome(r) for r in every] == [("permanent", "rcpt", 550)]
    assert [outcome(r) for r in after] == [("delivered", "message", 250)]
    assert [(d.rcpt_tos, d.content) for d in server.delivered] == [
        (("b@example.org",), CONTENT),
        (("b@example.org",), CONTENT),
    ]
    assert server.flights[0][3] == ["RSET"]  # after the transaction with no recipient


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "status"),
    [("554 5.7.1 looks like spam", "permanent"), ("451 4.3.0 try later", "transient")],
)
async def test_a_refused_last_chunk(chunking_server: MakeServer, reply: str, status: str) -> None:
    server = chunking_server(fault=Fault(chunks=[reply]))
    result = await sendmail(server)
    assert outcome(result) == (status, "message", int(reply[:3]))
    assert server.delivered == []


@pytest.mark.anyio
async def test_a_refused_first_chunk_of_several(chunking_server: MakeServer) -> None:
    server = chunking_server(fault=Fault(chunks=["552 5.3.4 too big for me"]))
    result = await sendmail(server, body=LARGE_CONTENT.decode())
    assert outcome(result) == ("permanent", "bdat", 552)
    assert server.delivered == []
    assert server.flights[0][1:] == [["MAIL", "RCPT", "BDAT"], ["QUIT"]]  # no more chunks


@pytest.mark.anyio
async def test_421_to_a_chunk(chunking_server: MakeServer) -> None:
    server = chunking_server(fault=Fault(chunks=["421 4.3.0 shutting down"]))
    result = await sendmail(server)
    assert outcome(result) == ("transient", "message", 421)


@pytest.mark.anyio
async def test_closed_mid_chunk_is_transient(chunking_server: MakeServer) -> None:
    server = chunking_server(fault=Fault(close_mid_chunk=True))
    result = await sendmail(server)
    # the server closed with octets of ours unread (a reset): the LAST never arrived
    assert result.status == "transient"
    result = await sendmail(server, body=LARGE_CONTENT.decode())
    assert result.status == "transient"


@pytest.mark.anyio
async def test_closed_after_the_last_chunk_is_unknown(chunking_server: MakeServer) -> None:
    server = chunking_server(fault=Fault(close_after_last=True))
    async with asmtp.connect(server.relay(), timeout=5) as connected:
        report = await connected.sendmail(SENDER, ["b@example.org", "c@example.org"], CONTENT)
    # it read the whole message, and may have delivered it: unknown, never retried blindly
    assert [r.status for r in report] == ["unknown", "unknown"]


# -- the real Postfix -------------------------------------------------------------------


@pytest.mark.postfix
async def test_bdat_to_postfix(postfix: Callable[..., PostfixServer]) -> None:
    mailboxes = ["ann@example.test", "bob@example.test"]
    server = postfix(listeners=[Listener("127.0.0.2")], mailboxes=mailboxes)
    relay = asmtp.Relay(server.host, server.port, tls="none", helo=HELO)
    async with asmtp.connect(relay, timeout=10) as connected:
        small = await connected.sendmail(SENDER, [*mailboxes, "ghost@example.test"], CONTENT)
        large = await connected.sendmail(SENDER, ["bob@example.test"], LARGE_CONTENT)
        nobody = await connected.sendmail(SENDER, ["ghost@example.test"], CONTENT)
        after = await connected.sendmail(SENDER, ["ann@example.test"], CONTENT)
    assert [outcome(r) for r in small] == [
        ("delivered", "message", 250),
        ("delivered", "message", 250),
        ("permanent", "rcpt", 550),
    ]
    assert [outcome(r) for r in large] == [("delivered", "message", 250)]
    assert [outcome(r) for r in nobody] == [("permanent", "rcpt", 550)]
    assert [outcome(r) for r in after] == [("delivered", "message", 250)]
    # smtpd's count of each command (accepted/sent): BDAT, never DATA; one chunk for
    # each small message, three for the large one, one refused (no recipient), and
    # RSET after that transaction
    [stats] = await server.sessions(1)
    assert "ehlo=1 mail=4 rcpt=4/6 bdat=5/6 rset=1 quit=1 commands=16/19" in stats
    assert "improper command pipelining" not in server.log()
    await server.settled()
    got = [(m.mailbox, m.message["Subject"]) for m in server.messages()]
    assert sorted(got) == [
        ("ann@example.test", "hi"),
        ("ann@example.test", "hi"),
        ("bob@example.test", "hi"),
        ("bob@example.test", "large"),
    ]
    # the lines that start with a dot, and the "." line, arrived as they were
    for delivered in server.messages():
        body = delivered.message.get_payload(decode=True)
        assert isinstance(body, bytes)
        sent = CONTENT if delivered.message["Subject"] == "hi" else LARGE_CONTENT
        assert body == sent.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
