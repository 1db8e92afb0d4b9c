"""Each reply is checked against what RFC 5321 4.3.2 (3207 for STARTTLS, 4954 for AUTH)
allows for its command: success only on the command's own success codes, 4xx/5xx keep
their meaning, and anything else is a protocol error that ends the session (before the
dot a transient result saying what came back; after the dot ``unknown``).

The table is run three ways: against the sans-IO core fed scripted bytes, against the
session's steps fed by a scripted server, and (a few rows) end to end against the real
fault server.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

import asmtp
from asmtp._core.capabilities import Capabilities
from asmtp._core.prepared import prepare_message
from asmtp._core.protocol import SUCCESS_CODES, ClientProtocol, State
from asmtp._core.reply import Reply
from asmtp._delivery.endpoint import Endpoint
from asmtp._delivery.session import Session
from asmtp.config import Timeouts
from asmtp.errors import LocalProtocolError, RemoteProtocolError, SMTPError
from asmtp.results import RecipientResult, result_from_error
from scripted import drive
from servers import FaultServer
from test_bench import bench_json, target

T = TypeVar("T")
MakeFault = Callable[..., FaultServer]

MESSAGE = prepare_message(b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
COMMANDS = ("greeting", "ehlo", "helo", "starttls", "auth", "mail", "rcpt", "data")
COMMANDS += ("message", "rset", "noop", "quit")
CLASSES = ("1xx", "success", "other 2xx", "3xx", "4xx", "421", "5xx")


def code_for(kind: str, cls: str) -> int:
    """A reply code of class ``cls`` for the command ``kind``."""
    ok = SUCCESS_CODES[kind]
    if cls == "1xx":
        return 150
    if cls == "success":
        return min(ok)
    if cls == "other 2xx":
        return next(c for c in (250, 220, 252) if c not in ok)
    if cls == "3xx":
        return 334 if kind == "data" else 354  # AUTH's 334 is its own row below
    if cls == "4xx":
        return 454 if kind in ("starttls", "auth") else 450
    if cls == "421":
        return 421
    return 535 if kind == "auth" else 554 if kind in ("greeting", "starttls") else 550


def line(code: int) -> bytes:
    return b"%d %d.0.0 scripted\r\n" % (code, code // 100) if code >= 200 else b"%d x\r\n" % code


# -- the sans-IO core -----------------------------------------------------------------

EHLO = b"250-mx.example.org\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"


def feed(proto: ClientProtocol, data: bytes) -> Reply:
    proto.receive_data(data)
    return parsed(proto)


def parsed(proto: ClientProtocol) -> Reply:
    """The next reply already buffered."""
    reply = proto.next_reply()
    assert isinstance(reply, Reply)
    return reply


def awaiting(kind: str) -> ClientProtocol:
    """A protocol whose next reply answers ``kind``, after a normal exchange so far."""
    proto = ClientProtocol()
    if kind == "greeting":
        return proto
    feed(proto, b"220 mx.example.org ESMTP\r\n")
    proto.ehlo("client.example.com")
    if kind == "ehlo":
        return proto
    if kind == "helo":
        feed(proto, b"502 5.5.2 what is EHLO\r\n")
        proto.helo("client.example.com")
        return proto
    feed(proto, EHLO)
    sends: dict[str, Callable[[], bytes]] = {
        "starttls": proto.starttls,
        "auth": lambda: proto.auth("PLAIN", "AHUAcA=="),
        "rset": proto.rset,
        "noop": proto.noop,
        "quit": proto.quit,
    }
    if kind in sends:
        sends[kind]()
        return proto
    proto.mail("a@example.com")
    if kind == "mail":
        return proto
    feed(proto, b"250 ok\r\n")
    proto.rcpt("b@example.org")
    if kind == "rcpt":
        return proto
    feed(proto, b"250 ok\r\n")
    proto.data()
    if kind == "data":
        return proto
    feed(proto, b"354 go ahead\r\n")
    proto.message(b"hello\r\n.\r\n")
    return proto


# The state each command leaves behind on its success, and on a 4xx or 5xx (421 aside).
AFTER_SUCCESS = {
    "greeting": State.CONNECTED,
    "ehlo": State.READY,
    "helo": State.READY,
    "starttls": State.TLS_HANDSHAKE,
    "auth": State.READY,
    "mail": State.MAIL,
    "rcpt": State.MAIL,
    "data": State.DATA,
    "message": State.READY,
    "rset": State.READY,
    "noop": State.READY,
    "quit": State.CLOSED,
}
AFTER_REFUSAL = {
    "greeting": State.REFUSED,  # only QUIT may follow (RFC 5321 3.1)
    "ehlo": State.CONNECTED,  # HELO may follow
    "helo": State.CONNECTED,
    "starttls": State.READY,
    "auth": State.READY,
    "mail": State.READY,
    "rcpt": State.MAIL,  # other recipients may have been accepted
    "data": State.READY,
    "message": State.READY,
    "rset": State.READY,
    "noop": State.READY,
    "quit": State.CLOSED,
}


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kind", COMMANDS)
def test_every_command_against_every_reply_class(kind: str, cls: str) -> None:
    proto = awaiting(kind)
    code = code_for(kind, cls)
    if cls in ("1xx", "other 2xx", "3xx"):
        with pytest.raises(RemoteProtocolError) as caught:
            feed(proto, line(code))
        assert caught.value.stage == kind
        assert str(code) in str(caught.value)  # says what came back
        assert proto.state is State.CLOSED and proto.awaiting is None
        assert not proto.authenticated
        with pytest.raises(LocalProtocolError):  # nothing more on this session
            proto.quit()
        return
    reply = feed(proto, line(code))
    assert reply.code == code
    if cls == "success":
        assert proto.state is AFTER_SUCCESS[kind]
        assert proto.authenticated == (kind == "auth")
    elif cls == "421":
        assert proto.state is State.CLOSED  # RFC 5321 3.8
    else:
        assert proto.state is AFTER_REFUSAL[kind]
        assert not proto.authenticated


def test_334_continues_auth_and_nothing_else() -> None:
    proto = awaiting("auth")
    assert feed(proto, b"334 \r\n").code == 334
    assert proto.state is State.AUTH
    proto.auth_response("AHUAcA==")
    assert feed(proto, b"235 2.7.0 ok\r\n").code == 235
    assert proto.authenticated and proto.state is State.READY
    proto = awaiting("mail")
    with pytest.raises(RemoteProtocolError, match="MAIL FROM answered 334"):
        feed(proto, b"334 go on\r\n")


def test_251_will_forward_is_an_accepted_recipient() -> None:
    proto = awaiting("rcpt")
    assert feed(proto, b"251 2.1.5 user not local; will forward\r\n").code == 251
    assert proto.state is State.MAIL
    proto.data()  # the transaction goes on


def test_a_mail_answered_with_another_2xx_opens_no_transaction() -> None:
    proto = awaiting("mail")
    with pytest.raises(RemoteProtocolError, match=r"MAIL FROM answered 251 \(not a valid"):
        feed(proto, b"251 2.1.0 odd\r\n")
    assert proto.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        proto.rcpt("b@example.org")


def pipelined(*rcpts: str) -> ClientProtocol:
    proto = ClientProtocol()
    feed(proto, b"220 mx.example.org ESMTP\r\n")
    proto.ehlo("client.example.com")
    feed(proto, b"250-mx.example.org\r\n250 PIPELINING\r\n")
    proto.mail("a@example.com")
    for rcpt in rcpts:
        proto.rcpt(rcpt)
    proto.data()
    return proto


def test_one_reply_too_few_never_shifts_354_onto_a_recipient() -> None:
    proto = pipelined("b@example.org", "c@example.org")
    proto.receive_data(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")  # c's reply is missing
    assert [parsed(proto).code for _ in range(2)] == [250, 250]
    with pytest.raises(RemoteProtocolError, match="RCPT TO answered 354") as caught:
        proto.next_reply()
    assert caught.value.stage == "rcpt"
    assert proto.state is State.CLOSED


def test_a_reply_after_354_is_never_taken_for_the_dots() -> None:
    # A 250 already here when the content is to be sent would answer a dot the
    # server has not seen: the session ends before the content goes out.
    proto = pipelined("b@example.org")
    proto.receive_data(b"250 ok\r\n250 ok\r\n354 go ahead\r\n250 2.0.0 queued\r\n")
    parsed(proto)
    parsed(proto)
    with pytest.raises(RemoteProtocolError, match="more after 354") as caught:
        proto.next_reply()
    assert caught.value.stage == "data"
    with pytest.raises(LocalProtocolError):
        proto.message(b"hello\r\n.\r\n")


def test_quit_answered_before_the_dot_is_a_protocol_error_at_the_message() -> None:
    proto = pipelined("b@example.org")
    proto.receive_data(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
    for _ in range(3):
        parsed(proto)
    proto.message(b"hello\r\n.\r\n", then_quit=True)
    proto.receive_data(b"221 2.0.0 bye\r\n250 2.0.0 queued\r\n")
    with pytest.raises(RemoteProtocolError, match="end of data with 221") as caught:
        proto.next_reply()
    assert caught.value.stage == "message"
    assert "may or may not have been delivered" in str(caught.value)


def test_a_1xx_reply_names_what_it_answered() -> None:
    proto = awaiting("rcpt")
    with pytest.raises(RemoteProtocolError) as caught:
        feed(proto, b"150 wait for it\r\n")
    message = str(caught.value)
    assert "150 wait for it" in message and "RCPT TO" in message


def test_the_table_covers_every_command_the_core_sends() -> None:
    assert set(SUCCESS_CODES) == {*COMMANDS, "bdat", "lhlo"}  # and tests/test_chunking, test_lmtp
    assert all(
        isinstance(codes, frozenset) and all(200 <= c < 400 for c in codes)
        for codes in SUCCESS_CODES.values()
    )


# -- the session's steps ----------------------------------------------------------------

NORMAL = {
    "greeting": b"220 mx.example.org ESMTP\r\n",
    "helo": b"250 mx.example.org\r\n",
    "starttls": b"220 2.0.0 go ahead\r\n",
    "auth": b"235 2.7.0 ok\r\n",
    "mail": b"250 2.1.0 ok\r\n",
    "rcpt": b"250 2.1.5 ok\r\n",
    "data": b"354 go ahead\r\n",
    "message": b"250 2.0.0 queued\r\n",
    "rset": b"250 2.0.0 ok\r\n",
    "noop": b"250 2.0.0 ok\r\n",
    "quit": b"221 2.0.0 bye\r\n",
}


class ScriptedServer:
    """Answers whatever the client awaits: the scripted replies for that command
    first, in order, then the normal one."""

    def __init__(self, script: dict[str, list[bytes]], *, pipelining: bool) -> None:
        self.script = script
        caps = b"250-STARTTLS\r\n250-AUTH PLAIN\r\n" + (b"250-PIPELINING\r\n" * pipelining)
        self.ehlo = b"250-mx.example.org\r\n" + caps + b"250 SIZE 1000000\r\n"

    def reply(self, kind: str | None) -> bytes:
        assert kind is not None, "the client reads with nothing asked"
        scripted = self.script.get(kind)
        if scripted:
            return scripted.pop(0)
        return self.ehlo if kind == "ehlo" else NORMAL[kind]


def endpoint_for(kind: str) -> Endpoint:
    """STARTTLS for its own rows; AUTH for the others that get past EHLO (after HELO
    no extension is known, AUTH included)."""
    if kind == "starttls":
        tls: dict[str, Any] = {"tls": "starttls", "ssl_context": ssl.create_default_context()}
    elif kind in ("ehlo", "helo"):
        tls = {"tls": "none"}
    else:
        tls = {"tls": "none", "username": "u", "password": "p", "allow_plaintext_auth": True}
    return Endpoint(host="mx.example.org", port=587, helo="client.example.com", **tls)


def outcome(kind: str, script: dict[str, list[bytes]], *, pipelining: bool) -> RecipientResult:
    """The first recipient's result of a whole session (one message to two recipients)
    against ``script``, classified as asmtp._delivery.dispatch does."""
    session = Session(endpoint_for(kind), Timeouts())
    rcpts = ["b@example.org", "c@example.org"]
    results: dict[str, RecipientResult] = {}
    steps = session.one_shot(
        "a@example.com", rcpts, MESSAGE, results, started=0.0, clock=lambda: 0.0
    )
    try:
        drive(session, steps, ScriptedServer(script, pipelining=pipelining))
    except SMTPError as exc:
        return result_from_error(rcpts[0], exc, dot_sent=session.dot_sent)
    return results[rcpts[0]]


def script_for(kind: str, reply: bytes) -> dict[str, list[bytes]]:
    if kind == "helo":
        return {"ehlo": [b"502 5.5.2 what is EHLO\r\n"], "helo": [reply]}
    if kind == "rset":
        # b@ is refused with 452 (too many recipients) and c@ with 550: b@ goes on in a
        # second transaction, which starts with RSET.
        return {"rcpt": [b"452 4.5.3 too many\r\n", b"550 5.1.1 no\r\n"], "rset": [reply]}
    return {kind: [reply]}


def expected(kind: str, cls: str) -> tuple[str, str]:
    """(status, stage) of the recipient's result."""
    if cls == "success" or kind == "quit":
        return "delivered", "message"  # a failed QUIT costs no recipient its result
    if cls in ("1xx", "other 2xx", "3xx"):
        return ("unknown" if kind == "message" else "transient"), kind
    stage = {"helo": "ehlo", "rset": "mail"}.get(kind, kind)
    if cls == "5xx":
        if kind == "ehlo":
            return "delivered", "message"  # HELO instead (RFC 5321 3.2)
        if kind == "auth":
            return "transient", "auth"  # the credentials can be fixed (as Postfix defers)
        return "permanent", stage
    return "transient", stage


# A session sends NOOP only when asked (ConnectedSession.noop: end to end below); a
# STARTTLS that succeeds goes on to a real TLS handshake (tests/test_relay.py).
SESSION_ROWS = [
    (kind, cls)
    for kind in COMMANDS
    for cls in CLASSES
    if kind != "noop" and (kind, cls) != ("starttls", "success")
]


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize(("kind", "cls"), SESSION_ROWS)
def test_session_result_for_every_command_and_reply_class(
    kind: str, cls: str, pipelining: bool
) -> None:
    code = code_for(kind, cls)
    result = outcome(kind, script_for(kind, line(code)), pipelining=pipelining)
    assert (result.status, result.stage) == expected(kind, cls), result
    if cls in ("1xx", "other 2xx", "3xx") and kind != "quit":
        assert str(code) in result.message  # says what came back
        assert result.code is None  # not a reply of the command's own


def one_shot_results(rcpts: list[str], server: ScriptedServer) -> dict[str, RecipientResult]:
    """The results of a whole session (one message to ``rcpts``, plaintext) on ``server``."""
    endpoint = Endpoint(host="mx.example.org", port=25, helo="client.example.com", tls="none")
    session = Session(endpoint, Timeouts())
    results: dict[str, RecipientResult] = {}
    steps = session.one_shot("a@example.com", rcpts, MESSAGE, results, started=0.0, clock=lambda: 0)
    drive(session, steps, server)
    return results


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("closing", ["data", "message"], ids=["421-to-DATA", "421-after-the-dot"])
def test_session_452_then_closed_leaves_no_recipient_without_a_result(
    closing: str, pipelining: bool
) -> None:
    # c@ is refused with 452 (too many recipients: it would go on in a new transaction),
    # then the server closes the session: c@ cannot go on, and its 452 is its result.
    script = {
        "rcpt": [b"250 2.1.5 ok\r\n", b"452 4.5.3 too many\r\n"],
        closing: [b"421 4.3.2 shutting down\r\n"],
    }
    rcpts = ["b@example.org", "c@example.org"]
    results = one_shot_results(rcpts, ScriptedServer(script, pipelining=pipelining))
    assert sorted(results) == rcpts
    assert (results["b@example.org"].code, results["b@example.org"].status) == (421, "transient")
    c = results["c@example.org"]
    assert (c.code, c.stage, c.status) == (452, "rcpt", "transient")


def test_session_extra_reply_in_a_pipelined_group_delivers_nothing() -> None:
    # An extra 250 after MAIL shifts every reply by one: c@'s refusal lands on DATA,
    # and the 354 left over answers no command (QUIT gets it).
    group = b"250 ok\r\n250 extra\r\n250 ok\r\n550 5.1.1 no\r\n354 go ahead\r\n"
    script = {"mail": [group]}
    results = one_shot_results(
        ["b@example.org", "c@example.org"], ScriptedServer(script, pipelining=True)
    )
    assert {r.status for r in results.values()} == {"permanent"}
    assert {r.stage for r in results.values()} == {"data"}


# -- end to end, against the real fault server ---------------------------------------------


def relay_to(server: FaultServer) -> asmtp.Relay:
    return asmtp.Relay(server.host, server.port, tls="none", helo="client.asmtp.test")


async def send_to(server: FaultServer, to: str | list[str] = "b@example.org") -> asmtp.Report:
    return await asmtp.sendmail(
        to=to, from_="a@example.com", body="x", relay=relay_to(server), timeout=10
    )


async def test_221_after_the_dot_is_unknown_not_delivered(fault_server: MakeFault) -> None:
    server = fault_server(message="reply:221 2.0.0 Bye")
    [result] = await send_to(server)
    assert (result.status, result.stage, result.code) == ("unknown", "message", None)
    assert "221" in result.message and "may or may not have been delivered" in result.message


async def test_354_after_the_dot_is_unknown(fault_server: MakeFault) -> None:
    server = fault_server(message="reply:354 go on")
    [result] = await send_to(server)
    assert (result.status, result.stage) == ("unknown", "message")


async def test_354_to_rcpt_is_transient_and_the_message_is_not_sent(
    fault_server: MakeFault,
) -> None:
    server = fault_server(rcpt="reply:354 go ahead")
    report = await send_to(server, ["b@example.org", "c@example.org"])
    assert {(r.status, r.stage) for r in report} == {("transient", "rcpt")}
    assert report[0].message.startswith("RCPT TO answered 354 (not a valid reply to RCPT TO)")
    assert server.messages == []


async def test_quits_221_before_the_dots_reply_is_unknown(fault_server: MakeFault) -> None:
    # The fault server offers PIPELINING: QUIT rides with the content, and this server
    # answers it before the dot.
    server = fault_server(message="reply:221 2.0.0 Bye\r\n250 2.0.0 queued")
    [result] = await send_to(server)
    assert (result.status, result.stage) == ("unknown", "message")


async def test_251_to_rcpt_is_delivered(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="reply:251 2.1.5 will forward")
    [result] = await send_to(server)
    assert (result.status, result.code) == ("delivered", 250)


@pytest.mark.parametrize(
    ("reply", "raises"),
    [("250 2.0.0 ok", False), ("221 odd", True), ("354 odd", True), ("550 no", True)],
)
async def test_noop_accepts_only_250(fault_server: MakeFault, reply: str, raises: bool) -> None:
    server = fault_server(noop=f"reply:{reply}")
    async with asmtp.connect(relay_to(server), timeout=10) as session:
        if raises:
            with pytest.raises(SMTPError) as caught:
                await session.noop()
            assert caught.value.stage == "noop" and reply[:3] in str(caught.value)
        else:
            await session.noop()


def test_bench_counts_a_221_after_the_dot_as_failed(fault_server: MakeFault) -> None:
    # asmtp bench runs its own copy of the transaction: its checks are the same table's.
    server = fault_server(message="reply:221 2.0.0 Bye")
    code, summary = bench_json(target(server), "--messages", "2", "--concurrency", "1")
    assert code == 1
    assert summary["messages"]["ok"] == 0
    assert summary["errors"]["message"]["RemoteProtocolError"]["count"] == 2


def test_bench_does_not_carry_on_in_plaintext_after_a_refused_starttls(
    fault_server: MakeFault,
) -> None:
    # Offered but refused (the fault server answers STARTTLS 454): as the session does.
    server = fault_server(capabilities=("PIPELINING", "STARTTLS"))
    code, summary = bench_json(target(server), "--messages", "1", "--tls", "opportunistic")
    assert code == 1
    assert summary["errors"]["starttls"]["454"]["count"] == 1
    assert server.messages == []


async def test_debug_transcript_escapes_control_characters(
    fault_server: MakeFault, caplog: pytest.LogCaptureFixture
) -> None:
    server = fault_server(greeting="reply:220 evil.test \x1b[2J\x07ready\rHIDDEN")
    with caplog.at_level(logging.DEBUG, logger="asmtp"):
        report = await send_to(server)
    assert report.ok, report.failed()
    [greeting] = [r.getMessage() for r in caplog.records if "< 220" in r.getMessage()]
    assert greeting.endswith("< 220 evil.test \\x1b[2J\\x07ready\\x0dHIDDEN")
    assert not any(c in caplog.text for c in "\x1b\x07\r")


def test_capabilities_are_read_only_from_a_valid_ehlo() -> None:
    proto = awaiting("ehlo")
    with pytest.raises(RemoteProtocolError):
        feed(proto, b"220-mx.example.org\r\n220 PIPELINING\r\n")
    assert proto.capabilities == Capabilities.helo()
