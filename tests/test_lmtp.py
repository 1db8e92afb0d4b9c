"""LMTP (RFC 2033), as asmtp speaks it with ``Relay(lmtp=True)``: LHLO instead of EHLO
(no HELO), and after the end of data one reply per accepted recipient, in RCPT order,
each that recipient's own result.

First the sans-IO core and the session's steps against scripted server bytes (the
exact writes read back), then a real LMTP server on loopback and on a Unix socket
(tests/lmtp_server.py) through the public API, on asyncio and trio. Dovecot's LMTP is
in tests/test_dovecot.py (``pytest -m dovecot``).
"""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import anyio
import pytest

import asmtp
from asmtp._core.prepared import prepare_message
from asmtp._core.protocol import ClientProtocol, State
from asmtp._core.reply import NEED_DATA, Reply
from asmtp._core.steps import Await, Command, Send, Steps
from asmtp._delivery.dispatch import run_session
from asmtp._delivery.endpoint import Endpoint
from asmtp._delivery.session import Session
from asmtp.config import Timeouts
from asmtp.errors import InputError, LocalProtocolError, RemoteProtocolError
from asmtp.results import RecipientResult
from lmtp_server import LMTPServer

T = TypeVar("T")

MESSAGE = prepare_message(b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
LHLO_PIPELINING = b"250-lmtp.example.org\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES\r\n"
LHLO_CHUNKING = b"250-lmtp.example.org\r\n250-PIPELINING\r\n250 CHUNKING\r\n"
SENDER = "a@example.com"


def summary(result: RecipientResult) -> tuple[str, str, str, int | None]:
    return (result.recipient, result.status, result.stage, result.code)


# --------------------------------------------------------------------------- the core


def feed(proto: ClientProtocol, data: bytes) -> Reply:
    proto.receive_data(data)
    reply = proto.next_reply()
    assert isinstance(reply, Reply)
    return reply


def lmtp_in_transaction(*recipients: tuple[str, bytes]) -> ClientProtocol:
    """An LMTP session with MAIL accepted and each RCPT answered as given."""
    proto = ClientProtocol(lmtp=True)
    feed(proto, b"220 lmtp.example.org LMTP\r\n")
    assert proto.lhlo("client.example.com") == b"LHLO client.example.com\r\n"
    feed(proto, LHLO_PIPELINING)
    proto.mail(SENDER)
    feed(proto, b"250 2.1.0 OK\r\n")
    for rcpt, reply in recipients:
        proto.rcpt(rcpt)
        feed(proto, reply)
    return proto


def test_lhlo_greets_an_lmtp_server_and_nothing_else_does() -> None:
    proto = ClientProtocol(lmtp=True)
    feed(proto, b"220 lmtp.example.org LMTP\r\n")
    for hello in (proto.ehlo, proto.helo):
        with pytest.raises(LocalProtocolError, match="to an LMTP server"):
            hello("client.example.com")
    proto.lhlo("client.example.com")
    feed(proto, LHLO_PIPELINING)
    assert proto.state is State.READY and proto.capabilities.pipelining
    smtp = ClientProtocol()
    feed(smtp, b"220 mx.example.org ESMTP\r\n")
    with pytest.raises(LocalProtocolError, match="cannot send LHLO to an SMTP server"):
        smtp.lhlo("client.example.com")


def test_a_refused_lhlo_leaves_nothing_but_quit() -> None:
    proto = ClientProtocol(lmtp=True)
    feed(proto, b"220 lmtp.example.org LMTP\r\n")
    proto.lhlo("client.example.com")
    assert feed(proto, b"500 5.5.1 what?\r\n").code == 500
    assert proto.state is State.CONNECTED
    assert proto.quit() == b"QUIT\r\n"


def test_lhlo_is_answered_as_ehlo_is() -> None:
    proto = ClientProtocol(lmtp=True)
    feed(proto, b"220 lmtp.example.org LMTP\r\n")
    proto.lhlo("client.example.com")
    with pytest.raises(RemoteProtocolError, match="LHLO answered 220") as broken:
        feed(proto, b"220 hello again\r\n")
    assert broken.value.stage == "lhlo" and proto.closed


def test_the_end_of_data_awaits_one_reply_per_accepted_recipient() -> None:
    proto = lmtp_in_transaction(
        ("b@example.org", b"250 2.1.5 OK\r\n"),
        ("c@example.org", b"550 5.1.1 no such user\r\n"),
        ("d@example.org", b"250 2.1.5 OK\r\n"),
    )
    proto.data()
    feed(proto, b"354 go ahead\r\n")
    proto.message(MESSAGE.data, then_quit=True)
    assert feed(proto, b"250 2.0.0 <b@example.org> saved\r\n").code == 250
    assert proto.awaiting == "message"  # d's reply, before QUIT's
    assert feed(proto, b"452 4.2.2 <d@example.org> over quota\r\n").code == 452
    assert (proto.awaiting, proto.state) == ("quit", State.READY)
    feed(proto, b"221 2.0.0 bye\r\n")
    assert proto.closed


def test_the_last_chunk_awaits_one_reply_per_accepted_recipient() -> None:
    proto = ClientProtocol(lmtp=True)
    feed(proto, b"220 lmtp.example.org LMTP\r\n")
    proto.lhlo("client.example.com")
    feed(proto, LHLO_CHUNKING)
    proto.mail(SENDER)
    proto.rcpt("b@example.org")
    proto.rcpt("c@example.org")
    proto.bdat(MESSAGE.chunks()[0], last=True)
    proto.receive_data(b"250 OK\r\n250 OK\r\n250 OK\r\n250 2.0.0 b saved\r\n250 2.0.0 c saved\r\n")
    codes = []
    while (reply := proto.next_reply()) is not NEED_DATA:
        assert isinstance(reply, Reply)
        codes.append((proto.awaiting, reply.code))
    assert codes == [("rcpt", 250), ("rcpt", 250), ("message", 250), ("message", 250), (None, 250)]
    assert proto.state is State.READY
    proto.mail(SENDER)  # the transaction is over: the next may begin


def test_a_chunk_refused_for_want_of_recipients_is_one_reply() -> None:
    proto = ClientProtocol(lmtp=True)
    feed(proto, b"220 lmtp.example.org LMTP\r\n")
    proto.lhlo("client.example.com")
    feed(proto, LHLO_CHUNKING)
    proto.mail(SENDER)
    proto.rcpt("b@example.org")
    proto.bdat(MESSAGE.chunks()[0], last=True)
    proto.receive_data(b"250 OK\r\n550 5.1.1 no such user\r\n503 5.5.1 no valid recipients\r\n")
    for _ in range(3):
        assert isinstance(proto.next_reply(), Reply)
    assert (proto.awaiting, proto.state) == (None, State.READY)


def test_a_421_for_one_recipient_closes_the_session() -> None:
    proto = lmtp_in_transaction(
        ("b@example.org", b"250 2.1.5 OK\r\n"), ("c@example.org", b"250 2.1.5 OK\r\n")
    )
    proto.data()
    feed(proto, b"354 go ahead\r\n")
    proto.message(MESSAGE.data)
    assert feed(proto, b"421 4.3.2 shutting down\r\n").code == 421
    assert proto.closed and proto.awaiting is None


# --------------------------------------------------------------------------- the steps

END = object()  #: in a server script: the server closes the connection here


def session(*, chunking: bool = True) -> Session:
    endpoint = Endpoint(
        host="lmtp.example.org",
        port=24,
        helo="client.example.com",
        tls="none",
        lmtp=True,
        chunking=chunking,
    )
    return Session(endpoint, Timeouts())


def run(
    session: Session, steps: Steps[T], server: Sequence[bytes | object]
) -> tuple[T, list[bytes]]:
    """Run ``steps`` with ``server`` as what the server sends, one read after another
    (:data:`END`: it closes the connection); return the steps' value and every write."""
    reads: Iterator[bytes | object] = iter(server)
    writes: list[bytes] = []
    proto = session.proto
    value: Any = None
    error: asmtp.SMTPError | None = None
    while True:
        try:
            step = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            assert next(reads, None) is None, "the server script has bytes left"
            return stop.value, writes
        value = error = None
        if isinstance(step, Await):
            raise AssertionError("no awaited step expected")
        if isinstance(step, Send | Command):
            data = step.data
            writes.append(data if isinstance(data, bytes) else b"".join(data))
        if isinstance(step, Send):
            value = None
            continue
        try:  # as a driver does: a lost connection is thrown into the steps
            while (value := proto.next_reply()) is NEED_DATA:
                read = next(reads)
                proto.receive_data(b"" if read is END else read)  # type: ignore[arg-type]
        except asmtp.SMTPError as exc:
            value, error = None, exc


def one_shot(
    s: Session, recipients: Sequence[str], server: Sequence[bytes | object]
) -> tuple[dict[str, RecipientResult], list[bytes]]:
    results: dict[str, RecipientResult] = {}
    steps = s.one_shot(SENDER, recipients, MESSAGE, results, started=0.0, clock=lambda: 0.0)
    _, writes = run(s, steps, server)
    return results, writes


def test_each_recipient_gets_its_own_reply_to_the_end_of_data() -> None:
    s = session(chunking=False)
    rcpts = ["b@example.org", "c@example.org", "d@example.org", "e@example.org"]
    results, writes = one_shot(
        s,
        rcpts,
        [
            b"220 lmtp.example.org LMTP\r\n",
            LHLO_PIPELINING,
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 <c@example.org> no such user\r\n"
            b"250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 go ahead\r\n",
            b"250 2.0.0 <b@example.org> saved\r\n",
            b"452 4.2.2 <d@example.org> mailbox full\r\n552 5.2.2 <e@example.org> quota\r\n",
            b"221 2.0.0 bye\r\n",
        ],
    )
    assert writes == [
        b"LHLO client.example.com\r\n",
        b"MAIL FROM:<a@example.com>\r\n"
        + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts)
        + b"DATA\r\n",
        MESSAGE.data + b"QUIT\r\n",  # QUIT rides with the content, as with SMTP
    ]
    assert [summary(results[r]) for r in rcpts] == [
        ("b@example.org", "delivered", "message", 250),
        ("c@example.org", "permanent", "rcpt", 550),
        ("d@example.org", "transient", "message", 452),
        ("e@example.org", "permanent", "message", 552),
    ]
    assert results["e@example.org"].enhanced_status == "5.2.2"
    assert results["b@example.org"].message == "<b@example.org> saved"


def test_with_chunking_the_last_chunk_gets_a_reply_per_recipient() -> None:
    s = session()
    results, writes = one_shot(
        s,
        ["b@example.org", "c@example.org"],
        [
            b"220 lmtp.example.org LMTP\r\n",
            LHLO_CHUNKING,
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n",
            b"250 2.0.0 <b@example.org> saved\r\n451 4.3.0 <c@example.org> try later\r\n",
            b"221 2.0.0 bye\r\n",
        ],
    )
    [chunk] = MESSAGE.chunks()
    content = b"".join(chunk)
    assert writes == [
        b"LHLO client.example.com\r\n",
        # MAIL, both RCPTs and the whole message in one write: one round trip
        b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
        + b"BDAT %d LAST\r\n" % len(content)
        + content,
        b"QUIT\r\n",
    ]
    assert [summary(r) for r in results.values()] == [
        ("b@example.org", "delivered", "message", 250),
        ("c@example.org", "transient", "message", 451),
    ]


def test_without_pipelining_each_command_awaits_its_reply() -> None:
    s = session(chunking=False)
    results, writes = one_shot(
        s,
        ["b@example.org", "c@example.org"],
        [
            b"220 lmtp.example.org LMTP\r\n",
            b"250 lmtp.example.org\r\n",
            b"250 2.1.0 OK\r\n",
            b"250 2.1.5 OK\r\n",
            b"250 2.1.5 OK\r\n",
            b"354 go ahead\r\n",
            b"250 2.0.0 <b@example.org> saved\r\n",
            b"250 2.0.0 <c@example.org> saved\r\n",
            b"221 2.0.0 bye\r\n",
        ],
    )
    assert writes == [
        b"LHLO client.example.com\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"RCPT TO:<c@example.org>\r\n",
        b"DATA\r\n",
        MESSAGE.data,
        b"QUIT\r\n",
    ]
    assert {r.status for r in results.values()} == {"delivered"}


def test_a_second_transaction_follows_the_last_recipients_reply() -> None:
    # 452 to the third RCPT: too many recipients for one transaction; it goes on in a
    # second, on the same session, once each recipient of the first has its reply.
    s = session(chunking=False)
    results, writes = one_shot(
        s,
        ["b@example.org", "c@example.org", "d@example.org"],
        [
            b"220 lmtp.example.org LMTP\r\n",
            LHLO_PIPELINING,
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n452 4.5.3 too many\r\n354 go\r\n",
            b"250 2.0.0 <b@example.org> saved\r\n250 2.0.0 <c@example.org> saved\r\n",
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 go\r\n",
            b"250 2.0.0 <d@example.org> saved\r\n221 2.0.0 bye\r\n",
        ],
    )
    assert writes[1].count(b"RCPT TO:") == 3 and writes[3].count(b"RCPT TO:") == 1
    assert writes[-1] == MESSAGE.data + b"QUIT\r\n"
    assert {r: x.status for r, x in results.items()} == dict.fromkeys(
        ["b@example.org", "c@example.org", "d@example.org"], "delivered"
    )


def test_a_refused_lhlo_is_not_followed_by_helo() -> None:
    s = session()
    with pytest.raises(asmtp.ReplyError) as refused:
        one_shot(
            s,
            ["b@example.org"],
            [b"220 lmtp.example.org LMTP\r\n", b"500 5.5.1 unknown command\r\n"],
        )
    assert str(refused.value) == "LHLO refused: 500 5.5.1 unknown command"
    assert (refused.value.stage, refused.value.permanent) == ("lhlo", True)


def test_lost_after_some_replies_those_keep_them_and_the_rest_are_unknown() -> None:
    s = session(chunking=False)
    results, _ = one_shot(
        s,
        ["b@example.org", "c@example.org", "d@example.org"],
        [
            b"220 lmtp.example.org LMTP\r\n",
            LHLO_PIPELINING,
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 go\r\n",
            b"250 2.0.0 <b@example.org> saved\r\n",
            END,
        ],
    )
    assert [summary(r) for r in results.values()] == [
        ("b@example.org", "delivered", "message", 250),
        ("c@example.org", "unknown", "message", None),
        ("d@example.org", "unknown", "message", None),
    ]


def test_a_421_for_one_recipient_is_its_reply_and_the_rest_are_unknown() -> None:
    s = session()
    results, _ = one_shot(
        s,
        ["b@example.org", "c@example.org", "d@example.org"],
        [
            b"220 lmtp.example.org LMTP\r\n",
            LHLO_CHUNKING,
            b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n",
            b"250 2.0.0 <b@example.org> saved\r\n421 4.3.2 <c@example.org> shutting down\r\n",
        ],
    )
    assert [summary(r) for r in results.values()] == [
        ("b@example.org", "delivered", "message", 250),
        ("c@example.org", "transient", "message", 421),
        ("d@example.org", "unknown", "message", None),
    ]
    assert "after answering for 2 of the recipients" in results["d@example.org"].message


def test_no_recipient_accepted_means_no_message() -> None:
    s = session()
    results, writes = one_shot(
        s,
        ["b@example.org"],
        [
            b"220 lmtp.example.org LMTP\r\n",
            LHLO_CHUNKING,
            b"250 2.1.0 OK\r\n550 5.1.1 no such user\r\n503 5.5.1 no valid recipients\r\n",
            b"221 2.0.0 bye\r\n",
        ],
    )
    assert summary(results["b@example.org"]) == ("b@example.org", "permanent", "rcpt", 550)
    assert writes[-1].endswith(b"QUIT\r\n")  # pipelined with the single recipient's chunk


# --------------------------------------------------------------------------- a real server


def message(to: Sequence[str]) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = ", ".join(to)
    msg["Subject"] = "local delivery"
    msg.set_content("through LMTP\n.\n..two dots\n")
    return msg


@pytest.fixture
def lmtp_server() -> Iterator[type[LMTPServer]]:
    """``lmtp_server(**options)``: a started :class:`LMTPServer`, stopped at teardown."""
    started: list[LMTPServer] = []

    class Started(LMTPServer):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.start()
            started.append(self)

    yield Started
    for server in started:
        server.stop()


def refuse_bob(rcpt: str) -> str | None:
    return f"552 5.2.2 <{rcpt}> Quota exceeded" if rcpt.startswith("bob") else None


@pytest.mark.anyio
@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_a_real_lmtp_server_answers_each_recipient(
    lmtp_server: type[LMTPServer], tmp_path: Path, chunking: bool, where: str
) -> None:
    path = str(tmp_path / "lmtp.sock") if where == "unix" else None
    server = lmtp_server(path=path, delivery_reply=refuse_bob)
    if path is None:
        relay = asmtp.Relay("127.0.0.1", server.port, lmtp=True, tls="none", chunking=chunking)
    else:
        relay = asmtp.Relay(path=path, lmtp=True, chunking=chunking)
    rcpts = ["ann@example.test", "bob@example.test", "cid@example.test"]
    async with asmtp.connect(relay, timeout=10) as conn:
        report = await conn.sendmail(SENDER, rcpts, message(rcpts))
    assert [summary(r) for r in report] == [
        ("ann@example.test", "delivered", "message", 250),
        ("bob@example.test", "permanent", "message", 552),
        ("cid@example.test", "delivered", "message", 250),
    ]
    saved = server.deliveries
    assert [d.recipient for d in saved] == ["ann@example.test", "cid@example.test"]
    assert b"\r\n.\r\n..two dots\r\n" in saved[0].data
    verbs = [c.split()[0] for c in server.commands]
    assert (
        verbs[0] == "LHLO" and ("BDAT" in verbs) is chunking and ("DATA" in verbs) is not chunking
    )


@pytest.mark.anyio
@pytest.mark.parametrize("pipelining", [True, False])
async def test_a_message_of_several_chunks(lmtp_server: type[LMTPServer], pipelining: bool) -> None:
    server = lmtp_server(pipelining=pipelining, delivery_reply=refuse_bob)
    relay = asmtp.Relay("127.0.0.1", server.port, lmtp=True, tls="none")
    rcpts = ["ann@example.test", "bob@example.test"]
    big = message(rcpts)
    big.add_attachment(bytes(range(256)) * 10_000, "application", "octet-stream")  # 2.5 MB
    async with asmtp.connect(relay, timeout=10) as conn:
        report = await conn.sendmail(SENDER, rcpts, big)
    assert [r.status for r in report] == ["delivered", "permanent"]
    assert sum(c.startswith("BDAT") for c in server.commands) >= 3  # 1 MiB chunks
    [saved] = server.deliveries
    received = email.message_from_bytes(saved.data, policy=email.policy.default)
    assert isinstance(received, EmailMessage)
    [attachment] = received.iter_attachments()
    assert attachment.get_content() == bytes(range(256)) * 10_000


@pytest.mark.anyio
async def test_lost_after_the_first_recipients_reply(lmtp_server: type[LMTPServer]) -> None:
    server = lmtp_server(close_after=1, chunking=False)
    relay = asmtp.Relay("127.0.0.1", server.port, lmtp=True, tls="none")
    rcpts = ["ann@example.test", "bob@example.test"]
    async with asmtp.connect(relay, timeout=10) as conn:
        report = await conn.sendmail(SENDER, rcpts, message(rcpts))
    assert [summary(r) for r in report] == [
        ("ann@example.test", "delivered", "message", 250),
        ("bob@example.test", "unknown", "message", None),
    ]


@pytest.mark.anyio
async def test_the_fan_out_over_lmtp(lmtp_server: type[LMTPServer]) -> None:
    server = lmtp_server(delivery_reply=refuse_bob)
    rcpts = [f"{name}@example.test" for name in ("ann", "bob", "cid", "dan")]
    report = await asmtp.send(
        message(rcpts),
        relay=asmtp.Relay("127.0.0.1", server.port, lmtp=True, tls="none", helo="me.test"),
        concurrency=2,
        timeout=10,
    )
    assert {r.recipient: r.status for r in report} == {
        "ann@example.test": "delivered",
        "bob@example.test": "permanent",
        "cid@example.test": "delivered",
        "dan@example.test": "delivered",
    }
    assert {c for c in server.commands if c.startswith("LHLO")} == {"LHLO me.test"}


def test_lmtp_over_tcp_needs_a_port() -> None:
    with pytest.raises(InputError, match="LMTP over TCP has no standard port"):
        asmtp.Relay("lmtp.example.org", lmtp=True)
    assert asmtp.Relay("lmtp.example.org", 24, lmtp=True).port == 24


def asmtp_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asmtp", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, "COLUMNS": "200"},
        timeout=60,
        check=False,
    )


SEND = ["send", "--from", SENDER, "--subject", "hi", "--body", "hello", "--json"]


def test_the_cli_over_lmtp_on_a_unix_socket(lmtp_server: type[LMTPServer], tmp_path: Path) -> None:
    path = str(tmp_path / "lmtp.sock")
    server = lmtp_server(path=path, delivery_reply=refuse_bob)
    done = asmtp_cli(
        *SEND, "--to", "ann@example.test", "--to", "bob@example.test",
        "--relay", f"unix:{path}", "--lmtp",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # bob was refused
    assert [d.recipient for d in server.deliveries] == ["ann@example.test"]
    assert '"status": "permanent"' in done.stdout and '"code": 552' in done.stdout


def test_the_cli_wants_a_port_for_lmtp_over_tcp() -> None:
    done = asmtp_cli(*SEND, "--to", "ann@example.test", "--relay", "127.0.0.1", "--lmtp")
    assert done.returncode == 2
    assert "LMTP over TCP has no standard port" in done.stderr


@pytest.mark.anyio
async def test_a_deadline_after_some_replies_keeps_them(lmtp_server: type[LMTPServer]) -> None:
    """The recipient's deadline passes while an LMTP server, having answered for the
    first recipient, says nothing more: that answer stands; the others' fate is
    unknown (the message may have been delivered)."""
    server = lmtp_server(stall_after=1)
    relay = asmtp.Relay("127.0.0.1", server.port, lmtp=True, tls="none")
    endpoint = await Endpoint.for_relay(relay)
    rcpts = ["ann@example.test", "bob@example.test"]
    prepared = prepare_message(message(rcpts))
    results, error = await run_session(
        endpoint, Timeouts.of(10.0), SENDER, rcpts, prepared, deadline=anyio.current_time() + 1.0
    )
    assert error is not None and error.stage == "message"
    assert [summary(r) for r in results] == [
        ("ann@example.test", "delivered", "message", 250),
        ("bob@example.test", "unknown", "message", None),
    ]
