"""The vocabulary every layer shares, read like the protocol: the stages of an exchange,
in which state each command may be sent and where each reply leads, the one map from
the network's exceptions to asmtp's, and the one way a passed deadline and a bug become
a recipient's result. No sockets."""

from __future__ import annotations

import asyncio
import doctest
import socket
import ssl
import types
import typing
from collections.abc import Callable, Sequence

import anyio
import pytest

import asmtp
import asmtp._io.exceptions
import asmtp.errors
import asmtp.results
from asmtp._core import protocol, rules
from asmtp._core.prepared import prepare_message
from asmtp._core.protocol import ClientProtocol, State
from asmtp._core.reply import Reply
from asmtp._delivery.dispatch import run_session
from asmtp._delivery.endpoint import Endpoint
from asmtp._delivery.transaction import Extras
from asmtp._io import anyio_driver, asyncio_driver
from asmtp._io.exceptions import translate, translate_errors
from asmtp.config import Timeouts
from asmtp.errors import (
    STAGE_TEXT,
    CertificateError,
    ConnectError,
    ConnectionLostError,
    LocalProtocolError,
    RemoteProtocolError,
    SMTPError,
    SMTPTimeoutError,
    Stage,
    TemporaryResolveError,
    TLSError,
    deadline_passed,
)
from asmtp.results import internal_error, result_from_error
from servers import SMTPTestServer

STAGES = typing.get_args(Stage)
MakeServer = Callable[..., SMTPTestServer]

# -- the stages ---------------------------------------------------------------------


def test_every_stage_is_named_in_messages_in_its_order() -> None:
    assert tuple(STAGE_TEXT) == STAGES
    assert STAGES[:3] == ("input", "dns", "connect")  # before the server says a word


def test_stage_is_public() -> None:
    assert "Stage" in asmtp.__all__ and asmtp.Stage is Stage
    assert "Stage" in asmtp.errors.__all__


def test_every_reply_the_protocol_awaits_is_a_stage() -> None:
    assert set(protocol.SUCCESS_CODES) <= set(STAGES)
    assert set(rules.AFTER_REPLY) == set(rules.SUCCESS_CODES) == set(protocol.SUCCESS_CODES)


def test_a_refusal_names_its_command() -> None:
    assert str(asmtp.ReplyError(550, "no", stage="rcpt")) == "RCPT TO refused: 550 no"
    assert str(asmtp.ReplyError(554, "no")) == "server refused: 554 no"


# -- in which state each command may be sent ----------------------------------------

EHLO = b"250-mx.example.org\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"


def feed(proto: ClientProtocol, data: bytes) -> Reply:
    proto.receive_data(data)
    reply = proto.next_reply()
    assert isinstance(reply, Reply)
    return reply


def in_state(state: State) -> ClientProtocol:
    """A session brought to ``state`` by the bytes a server would send."""
    proto = ClientProtocol()
    if state is State.GREETING:
        return proto
    if state is State.REFUSED:
        feed(proto, b"554 no service here\r\n")
        return proto
    feed(proto, b"220 mx.example.org ESMTP\r\n")
    if state is State.CONNECTED:
        return proto
    proto.ehlo("client.example.com")
    feed(proto, EHLO)
    if state is State.TLS_HANDSHAKE:
        proto.starttls()
        feed(proto, b"220 go ahead\r\n")
    elif state is State.AUTH:
        proto.auth("PLAIN")
        feed(proto, b"334 \r\n")
    elif state is State.CLOSED:
        proto.quit()
        feed(proto, b"221 bye\r\n")
    elif state in (State.MAIL, State.DATA):
        proto.mail("a@example.com")
        feed(proto, b"250 OK\r\n")
        if state is State.DATA:
            proto.rcpt("b@example.org")
            feed(proto, b"250 OK\r\n")
            proto.data()
            feed(proto, b"354 go ahead\r\n")
    assert proto.state is state
    return proto


COMMANDS: dict[str, Callable[[ClientProtocol], bytes]] = {
    "ehlo": lambda p: p.ehlo("client.example.com"),
    "helo": lambda p: p.helo("client.example.com"),
    "starttls": lambda p: p.starttls(),
    "auth": lambda p: p.auth("PLAIN", "AGEAcA=="),
    "auth-response": lambda p: p.auth_response("AGEAcA=="),
    "mail": lambda p: p.mail("a@example.com"),
    "rcpt": lambda p: p.rcpt("b@example.org"),
    "data": lambda p: p.data(),
    "rset": lambda p: p.rset(),
    "noop": lambda p: p.noop(),
    "quit": lambda p: p.quit(),
}

#: RFC 5321 4.1.4 (EHLO first; MAIL, RCPT, DATA in order; QUIT any time), 3207 4.2
#: (nothing but the handshake after STARTTLS's 220), 4954 4 (AUTH before MAIL; a
#: response only when a 334 asks for one), 3.1 (after a refused greeting, only QUIT).
SENDABLE: dict[State, set[str]] = {
    State.GREETING: set(),
    State.REFUSED: {"quit"},
    State.CONNECTED: {"ehlo", "helo", "quit"},
    State.READY: {
        "ehlo",
        "helo",
        "starttls",
        "auth",
        "mail",
        "rcpt",
        "data",
        "rset",
        "noop",
        "quit",
    },
    State.TLS_HANDSHAKE: set(),
    State.AUTH: {"auth-response", "quit"},
    State.MAIL: {"rcpt", "data", "rset", "noop", "quit"},
    State.DATA: set(),  # the message content only
    State.CLOSED: set(),
}


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.value)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_each_command_is_sent_only_in_its_states(state: State, command: str) -> None:
    proto = in_state(state)
    if command in SENDABLE[state]:
        try:
            COMMANDS[command](proto)
        except LocalProtocolError as exc:  # another rule ("RCPT without MAIL"), not the state
            assert "in state" not in str(exc)
    else:
        name = command.partition("-")[0].upper()
        with pytest.raises(LocalProtocolError, match=f"cannot send {name} in state {state.value}"):
            COMMANDS[command](proto)


def test_pipelined_commands_only_follow_mail_rcpt_and_rset() -> None:
    proto = in_state(State.READY)
    proto.mail("a@example.com")
    proto.rcpt("b@example.org")
    proto.data()  # DATA ends the group (RFC 2920 3.1)
    with pytest.raises(LocalProtocolError, match="cannot send RSET while awaiting the mail"):
        proto.rset()
    with pytest.raises(LocalProtocolError, match="cannot send NOOP while awaiting the mail"):
        proto.noop()


# -- where each reply leads -----------------------------------------------------------

# (the state the command is sent in, the command, the reply, the state after it)
TRANSITIONS = [
    (State.GREETING, None, b"220 hi", State.CONNECTED),
    (State.GREETING, None, b"554 go away", State.REFUSED),
    (State.CONNECTED, "ehlo", b"250 mx", State.READY),
    (State.CONNECTED, "ehlo", b"500 what?", State.CONNECTED),  # HELO may follow
    (State.CONNECTED, "helo", b"250 mx", State.READY),
    (State.READY, "starttls", b"220 go ahead", State.TLS_HANDSHAKE),
    (State.READY, "starttls", b"454 4.7.0 not now", State.READY),
    (State.READY, "auth", b"235 2.7.0 ok", State.READY),
    (State.READY, "auth", b"334 ", State.AUTH),
    (State.READY, "auth", b"535 5.7.8 no", State.READY),
    (State.AUTH, "auth-response", b"235 2.7.0 ok", State.READY),
    (State.READY, "mail", b"250 ok", State.MAIL),
    (State.READY, "mail", b"550 5.7.1 no", State.READY),
    (State.MAIL, "rcpt", b"250 ok", State.MAIL),
    (State.MAIL, "rcpt", b"550 5.1.1 no such user", State.MAIL),
    (State.MAIL, "rset", b"250 ok", State.READY),
    (State.MAIL, "noop", b"250 ok", State.MAIL),
    (State.MAIL, "quit", b"221 bye", State.CLOSED),
    (State.REFUSED, "quit", b"221 bye", State.CLOSED),
]


@pytest.mark.parametrize(("before", "command", "data", "after"), TRANSITIONS)
def test_each_reply_leads_to_its_state(
    before: State, command: str | None, data: bytes, after: State
) -> None:
    proto = in_state(before)
    if command is not None:
        COMMANDS[command](proto)
    feed(proto, data + b"\r\n")
    assert proto.state is after
    if command in ("auth", "auth-response"):
        assert proto.authenticated is data.startswith(b"235")


@pytest.mark.parametrize("code", [b"250 queued", b"552 5.3.4 too big"])
def test_the_end_of_data_ends_the_transaction(code: bytes) -> None:
    proto = in_state(State.DATA)
    proto.message(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    feed(proto, code + b"\r\n")
    assert proto.state is State.READY
    proto.mail("a@example.com")  # a new transaction may open


def test_a_refused_data_ends_the_transaction() -> None:
    proto = in_state(State.MAIL)
    proto.rcpt("b@example.org")
    feed(proto, b"250 ok\r\n")
    proto.data()
    feed(proto, b"554 5.5.1 no valid recipients\r\n")
    assert proto.state is State.READY
    proto.mail("a@example.com")


@pytest.mark.parametrize(
    ("state", "command"),
    [
        (State.GREETING, None),
        (State.CONNECTED, "ehlo"),
        (State.READY, "starttls"),
        (State.READY, "mail"),
        (State.MAIL, "rcpt"),
        (State.AUTH, "auth-response"),
    ],
)
def test_421_to_any_command_closes(state: State, command: str | None) -> None:
    proto = in_state(state)
    if command is not None:
        COMMANDS[command](proto)
    feed(proto, b"421 4.3.2 shutting down\r\n")  # RFC 5321 3.8
    assert proto.closed and proto.awaiting is None


def test_a_reply_its_command_does_not_allow_closes_the_session() -> None:
    proto = in_state(State.MAIL)
    proto.rcpt("b@example.org")
    with pytest.raises(RemoteProtocolError, match="not a valid reply to RCPT TO") as err:
        feed(proto, b"354 go ahead\r\n")
    assert err.value.stage == "rcpt"
    assert proto.closed


# -- the one exception map --------------------------------------------------------------


def test_both_drivers_use_the_one_map() -> None:
    asyncio_names, anyio_names = vars(asyncio_driver), vars(anyio_driver)
    assert asyncio_names["translate"] is translate
    assert asyncio_names["translate_errors"] is anyio_names["translate_errors"] is translate_errors
    assert "translate_stream_errors" not in anyio_names


def chained(exc: BaseException, cause: BaseException) -> BaseException:
    try:
        raise exc from cause
    except BaseException as caught:
        return caught


def untrusted() -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed")
    exc.verify_message = "self-signed certificate"  # as OpenSSL fills it in
    return exc


def bad_record() -> ssl.SSLError:
    exc = ssl.SSLError(1, "wrong version number")
    exc.reason = "WRONG_VERSION_NUMBER"
    return exc


H = "mx.example.org"
LOST = f"connection to {H} lost during connect:"
MAP: list[tuple[BaseException, type[SMTPError], str]] = [
    (untrusted(), CertificateError, f"certificate of {H} not trusted: self-signed certificate"),
    (bad_record(), TLSError, f"TLS with {H} failed: WRONG_VERSION_NUMBER"),
    (socket.gaierror(-2, "Name or service not known"), ConnectError, f"cannot resolve {H}: Name"),
    (ConnectionRefusedError(111, "refused"), ConnectError, f"connection to {H} refused"),
    (TimeoutError(110, "timed out"), SMTPTimeoutError, f"timed out during connect with {H}"),
    (ConnectionResetError(104, "reset"), ConnectionLostError, f"{LOST} [Errno 104] reset"),
    (EOFError("eof"), ConnectionLostError, f"{LOST} eof"),
    (OSError(113, "No route to host"), ConnectError, f"cannot connect to {H}: No route to host"),
    (anyio.EndOfStream(), ConnectionLostError, f"{LOST} the server closed the connection"),
    (anyio.ClosedResourceError(), ConnectionLostError, f"{LOST} the connection is closed"),
    (
        chained(anyio.BrokenResourceError(), ConnectionResetError(104, "reset")),
        ConnectionLostError,
        f"{LOST} the server reset the connection",
    ),
]


@pytest.mark.parametrize(("exc", "kind", "text"), MAP, ids=[type(e).__name__ for e, _, _ in MAP])
def test_the_network_s_exceptions_become_asmtp_errors(
    exc: BaseException, kind: type[SMTPError], text: str
) -> None:
    error = translate(exc, "connect", H)
    assert type(error) is kind
    assert error.stage == "connect" and error.message.startswith(text), error.message
    assert error.__cause__ is exc  # kept, as `raise ... from exc` keeps it


def test_anyio_s_failed_attempts_are_reported_by_the_first() -> None:
    refused = ConnectionRefusedError(111, "refused")
    one = chained(OSError("All connection attempts failed"), refused)
    group = ExceptionGroup("attempts", [refused, OSError(113, "No route to host")])
    many = chained(OSError("All connection attempts failed"), group)
    for exc in (one, many):
        error = translate(exc, "connect", H)
        assert isinstance(error, ConnectError) and error.__cause__ is refused
        assert error.message == f"connection to {H} refused"


def test_a_step_s_own_deadline_is_a_timeout_of_that_step() -> None:
    error = translate(TimeoutError(), "ehlo", H, timeout=2.5, doing="awaiting the ehlo reply")
    assert isinstance(error, SMTPTimeoutError)
    assert (error.message, error.stage) == ("timed out after 2.5 s awaiting the ehlo reply", "ehlo")
    assert error.__cause__ is None and error.__suppress_context__


@pytest.mark.parametrize(
    "exc",
    [SMTPTimeoutError("already ours"), ValueError("a bug"), asyncio.CancelledError()],
    ids=lambda e: type(e).__name__,
)
def test_what_is_not_the_network_s_goes_on_as_it_is(exc: BaseException) -> None:
    assert translate(exc, "connect", H) is None
    if isinstance(exc, Exception):
        with pytest.raises(type(exc)) as raised, translate_errors("connect", H):
            raise exc
        assert raised.value is exc


def test_translate_errors_raises_with_the_cause() -> None:
    refused = ConnectionRefusedError(111, "refused")
    with pytest.raises(ConnectError) as raised, translate_errors("connect", H):
        raise refused
    assert raised.value.__cause__ is refused


# -- a passed deadline, a bug ---------------------------------------------------------


def test_a_passed_deadline_is_transient_until_the_dot() -> None:
    late = deadline_passed("rcpt")
    assert isinstance(late, SMTPTimeoutError) and not late.permanent
    assert (late.message, late.stage) == ("the recipient's deadline passed", "rcpt")
    assert result_from_error("b@example.org", late).status == "transient"
    after_dot = result_from_error("b@example.org", deadline_passed("message"), dot_sent=True)
    assert (after_dot.status, after_dot.stage) == ("unknown", "message")


def test_a_deadline_passed_in_the_mx_lookup_is_a_dns_timeout() -> None:
    late = deadline_passed("dns", "during the MX lookup", domain="example.org")
    assert isinstance(late, TemporaryResolveError)
    assert late.message == "example.org: the recipient's deadline passed during the MX lookup"
    result = result_from_error("b@example.org", late)
    assert (result.status, result.stage, result.enhanced_status) == ("transient", "dns", "4.4.3")


def test_a_deadline_passed_waiting_says_for_what() -> None:
    late = deadline_passed("connect", "waiting for a session to example.org (per_domain=2)")
    assert late.message == (
        "the recipient's deadline passed waiting for a session to example.org (per_domain=2)"
    )


def test_a_bug_is_transient_before_the_dot_and_unknown_after_it() -> None:
    bug = KeyError("x")
    before = internal_error("b@example.org", bug, stage="rcpt", host="mx", key=7)
    assert (before.status, before.stage, before.host, before.key) == ("transient", "rcpt", "mx", 7)
    assert before.message == "internal error: KeyError('x')" and before.code is None
    after = internal_error("b@example.org", bug, stage="message", dot_sent=True)
    assert (after.status, after.stage) == ("unknown", "message")
    outside = internal_error("b@example.org", bug)  # no session under way
    assert (outside.status, outside.stage) == ("transient", "connect")


@pytest.mark.parametrize("module", [asmtp.errors, asmtp.results, asmtp._io.exceptions])
def test_docstring_examples(module: types.ModuleType) -> None:
    failed, tried = doctest.testmod(module)
    assert tried and not failed


# -- the same, from a session on a real server ------------------------------------------


def endpoint_of(server: SMTPTestServer) -> Endpoint:
    host, port = server.address
    return Endpoint(host=host, port=port, helo="client.example.com", tls="none")


MESSAGE = b"Subject: vocabulary\r\n\r\nhello\r\n"


async def test_a_bug_before_the_dot_costs_a_transient_result(
    smtp_server: MakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken_journal(accepted: Sequence[str]) -> None:
        raise ValueError("a bug before the dot")

    results, error = await run_session(
        endpoint_of(smtp_server()),
        Timeouts.of(10),
        "a@example.com",
        ["b@example.org", "c@example.org"],
        prepare_message(MESSAGE),
        extras=Extras(before_dot=broken_journal),
    )
    assert error is None  # nothing the server did
    assert [(r.status, r.stage) for r in results] == [("transient", "message")] * 2
    assert results[0].message == "internal error: ValueError('a bug before the dot')"
    assert "asmtp internal error while delivering to b@example.org" in caplog.text


async def test_a_deadline_passed_before_connecting(smtp_server: MakeServer) -> None:
    server = smtp_server()
    results, error = await run_session(
        endpoint_of(server),
        Timeouts.of(10),
        "a@example.com",
        ["b@example.org"],
        prepare_message(MESSAGE),
        deadline=anyio.current_time(),  # already passed
    )
    assert isinstance(error, SMTPTimeoutError)
    [result] = results
    assert (result.status, result.stage, result.message) == (
        "transient",
        "connect",
        "the recipient's deadline passed",
    )
    assert not server.messages
