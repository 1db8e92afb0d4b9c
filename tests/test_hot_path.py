"""What makes the fan-out's hot path cheap keeps every guarantee: replies parsed once per
wording and shared (bounded, every check still made), capabilities worked out once per
EHLO wording, results made without the frozen class's per-field setattr (the same value),
steps made once per timeout; and the benchmarks' ceiling client does every exchange the
others do, against a real server on loopback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from asmtp._core import reply as reply_module
from asmtp._core.capabilities import Capabilities
from asmtp._core.protocol import ClientProtocol
from asmtp._core.reply import Reply, ReplyParser
from asmtp._core.steps import Command, Receive, Send, receive
from asmtp._delivery.api import _Alone
from asmtp._delivery.session_state import QUICK, answered
from asmtp.errors import RemoteProtocolError
from asmtp.results import RecipientResult
from servers import FaultServer, SMTPTestServer

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]


def parse(data: bytes) -> Reply:
    parser = ReplyParser()
    parser.feed(data)
    reply = parser.next_reply()
    assert isinstance(reply, Reply)
    return reply


def test_a_reply_seen_before_is_the_same_value_shared() -> None:
    first = parse(b"250 2.1.0 Sender ok\r\n")
    again = parse(b"250 2.1.0 Sender ok\r\n")
    assert again is first
    assert again == Reply(250, ("2.1.0 Sender ok",))
    assert again.status_and_message() == ("2.1.0", "Sender ok")
    ehlo = b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    assert parse(ehlo) is parse(ehlo)
    assert parse(ehlo).lines == ("mx.example.org", "PIPELINING", "SIZE 1000")


def test_the_reply_cache_is_bounded_in_count_and_size() -> None:
    parser = ReplyParser()
    for i in range(reply_module._SEEN_MOST + 50):
        parser.feed(b"250 2.0.0 Ok: queued as %d\r\n" % i)
        got = parser.next_reply()
        assert isinstance(got, Reply) and got.lines == (f"2.0.0 Ok: queued as {i}",)
        assert len(reply_module.KNOWN) <= reply_module._SEEN_MOST
    long = b"250 " + b"x" * reply_module._SEEN_LONGEST + b"\r\n"
    assert parse(long) is not parse(long)  # too long to keep
    assert long not in reply_module.KNOWN


@pytest.mark.parametrize(
    "data",
    [
        b"25x Ok\r\n",  # not a code
        b"150 Ok\r\n",  # out of range
        b"250-first\r\n251 second\r\n",  # the lines disagree on the code
    ],
)
def test_a_bad_reply_is_refused_even_after_good_ones_alike(data: bytes) -> None:
    parse(b"250 Ok\r\n")
    parse(b"250-first\r\n250 second\r\n")
    with pytest.raises(RemoteProtocolError):
        parse(data)


def test_a_shared_reply_still_moves_each_session_on() -> None:
    """Two sessions get the same Reply object; each protocol applies it to itself."""
    greeting = b"220 mx.example.org ESMTP\r\n"
    ehlo = b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    seen = []
    for _ in range(2):
        proto = ClientProtocol()
        proto.receive_data(greeting)
        seen.append(proto.next_reply())
        proto.ehlo("client.example.com")
        proto.receive_data(ehlo)
        seen.append(proto.next_reply())
        assert proto.capabilities.pipelining and proto.capabilities.size == 1000
        proto.mail("a@example.com")
        proto.rcpt("b@example.org")
        proto.receive_data(b"250 Ok\r\n550 5.1.1 no such user\r\n")
        assert [proto.next_reply(), proto.next_reply()] == [
            Reply(250, ("Ok",)),
            Reply(550, ("5.1.1 no such user",)),
        ]
        assert proto.state.value == "mail"
    assert seen[0] is seen[2] and seen[1] is seen[3]


@pytest.mark.parametrize(
    ("lines", "flags", "size"),
    [
        (("mx", "PIPELINING", "SIZE 2048", "8BITMIME"), {"pipelining", "eight_bit_mime"}, 2048),
        (("mx", "STARTTLS", "SMTPUTF8", "DSN", "SIZE"), {"starttls", "smtputf8", "dsn"}, None),
        (("mx", "SIZE 0", "size x"), set(), None),
        (("mx",), set(), None),
    ],
)
def test_capabilities_are_worked_out_once_per_wording(
    lines: tuple[str, ...], flags: set[str], size: int | None
) -> None:
    caps = Capabilities.from_ehlo(Reply(250, lines))
    assert caps is Capabilities.from_ehlo(Reply(250, lines))
    names = ("pipelining", "starttls", "eight_bit_mime", "smtputf8", "dsn")
    assert {name for name in names if getattr(caps, name)} == flags
    assert caps.size == size
    assert not any(getattr(Capabilities.helo(), name) for name in names)
    with pytest.raises(dataclasses.FrozenInstanceError):
        caps.pipelining = True  # type: ignore[misc]


def test_answered_is_the_value_the_constructor_makes() -> None:
    args = ("b@example.org", "permanent", 550, "5.1.1", "no such user", "rcpt", "mx", "none", 0.25)
    quick = answered(*args)  # type: ignore[arg-type]
    slow = RecipientResult(*args)  # type: ignore[arg-type]
    assert quick == slow and repr(quick) == repr(slow)
    for field in dataclasses.fields(RecipientResult):
        assert getattr(quick, field.name) == getattr(slow, field.name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        quick.code = 250  # type: ignore[misc]
    assert QUICK  # every other field has a default: the fast path is taken


def test_a_receive_step_is_made_once_per_timeout() -> None:
    assert receive(30.0) is receive(30.0)
    assert receive(30.0) == Receive(30.0)
    assert receive(None) == Receive(None) and not receive(None).same_step


# ---------------------------------------------------------------------------- ceiling client


def benchmark_module(name: str) -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def ceiling_client() -> ModuleType:
    return benchmark_module("ceiling_client")


MESSAGE = b"Subject: ceiling\r\n\r\n.a line with a dot\r\nhello\r\n"


def test_the_relay_fan_out_makes_each_job_as_it_is_taken() -> None:
    # One recipient a session: (0,), (1,) ... as a sequence, without a list per recipient.
    jobs = _Alone(4)
    assert len(jobs) == 4
    assert list(jobs) == [(0,), (1,), (2,), (3,)]
    assert jobs[0] == (0,) and jobs[-1] == (3,) and list(jobs[1:3]) == [(1,), (2,)]
    with pytest.raises(IndexError):
        jobs[4]
    assert list(_Alone(0)) == []


def test_the_steps_fields_are_where_the_asyncio_driver_reads_them() -> None:
    # Connection._advance reads the steps' fields by position, not by name.
    assert Receive._fields == ("timeout", "same_step")
    assert Command._fields == ("data", "timeout")
    assert Send._fields == ("data", "timeout", "drain")


def test_the_ceiling_client_does_every_exchange(smtp_server: MakeServer) -> None:
    server = smtp_server()
    client = ceiling_client()
    recipients = [f"r{i}@example.org" for i in range(6)]
    outcomes = asyncio.run(
        client.send_all(
            *server.address,
            MESSAGE,
            "s@example.com",
            recipients,
            concurrency=3,
            helo="ceiling.example.test",
            message_timeout=10.0,
        )
    )
    assert [ok for ok, _, _ in outcomes] == [True] * 6, outcomes
    got = sorted(server.messages, key=lambda m: m.rcpt_tos)
    assert [m.rcpt_tos for m in got] == [[r] for r in recipients]
    assert all(m.content.startswith(b"Subject: ceiling") for m in got)
    assert all(b"\r\n.a line with a dot\r\n" in m.content for m in got)  # unstuffed
    assert set(server.ehlo_names) == {"ceiling.example.test"}


@pytest.mark.parametrize("pipelining", [True, False])
def test_the_ceiling_client_checks_every_final_code(
    fault_server: MakeFault, pipelining: bool
) -> None:
    caps = ("PIPELINING", "8BITMIME") if pipelining else ("8BITMIME",)
    server = fault_server(rcpt="reply:550 5.1.1 no such user", capabilities=caps)
    client = ceiling_client()
    outcomes = asyncio.run(
        client.send_all(
            server.host, server.port, MESSAGE, "s@example.com", ["x@example.org"],
            concurrency=1, helo="ceiling.example.test", message_timeout=10.0,
        )
    )  # fmt: skip
    (ok, _, error), = outcomes  # fmt: skip
    assert not ok and "550" in error and "RCPT" in error


def test_the_ceiling_client_times_out(fault_server: MakeFault) -> None:
    server = fault_server(ehlo="silence")
    client = ceiling_client()
    ((ok, elapsed, error),) = asyncio.run(
        client.send_all(
            server.host, server.port, MESSAGE, "s@example.com", ["x@example.org"],
            concurrency=1, helo="ceiling.example.test", message_timeout=0.3,
        )
    )  # fmt: skip
    assert not ok and error == "timeout after 0.3 s" and elapsed > 0


# ------------------------------------------------------- asmtp's sans-IO parts, scripted


@pytest.mark.parametrize("kind", ["core", "policy"])
def test_the_scripted_session_delivers_as_against_a_server(kind: str) -> None:
    scripted = benchmark_module("scripted_session")
    recipients = [f"r{i}@example.org" for i in range(3)]
    scripted.run(kind, MESSAGE, recipients)  # each session checks its replies and result


@pytest.mark.parametrize("kind", ["core", "policy"])
def test_the_scripted_session_notices_a_refusal(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted = benchmark_module("scripted_session")
    refused = (*scripted.READS[:3], b"554 5.7.1 rejected\r\n221 2.0.0 Bye\r\n")
    monkeypatch.setattr(scripted, "READS", refused)
    with pytest.raises(AssertionError):
        scripted.run(kind, MESSAGE, ["r@example.org"])


# ------------------------------------------------- the ceiling client on asmtp's protocol


def test_the_protocol_ceiling_does_every_exchange(fault_server: MakeFault) -> None:
    server = fault_server()  # offers PIPELINING, which this client needs
    benchmark_module("ceiling_client")  # what it is built on, importable by name
    client = benchmark_module("protocol_ceiling")
    recipients = [f"r{i}@example.org" for i in range(5)]
    outcomes = asyncio.run(
        client.send_all(
            server.host, server.port, MESSAGE, "s@example.com", recipients,
            concurrency=2, helo="ceiling.example.test", message_timeout=10.0,
        )
    )  # fmt: skip
    assert [ok for ok, _, _ in outcomes] == [True] * 5, outcomes
    got = sorted(server.messages, key=lambda m: m.rcpt_tos)
    assert [m.rcpt_tos for m in got] == [[r] for r in recipients]
    assert all(b"\r\n.a line with a dot\r\n" in m.content for m in got)  # unstuffed


def test_the_protocol_ceiling_fails_a_refused_recipient(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="reply:550 5.1.1 no such user")
    benchmark_module("ceiling_client")
    client = benchmark_module("protocol_ceiling")
    ((ok, _, error),) = asyncio.run(
        client.send_all(
            server.host, server.port, MESSAGE, "s@example.com", ["x@example.org"],
            concurrency=1, helo="ceiling.example.test", message_timeout=10.0,
        )
    )  # fmt: skip
    assert not ok and "550" in error and "MAIL, RCPT and DATA" in error
