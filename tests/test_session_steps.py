"""The session's policy (:mod:`asmtp._delivery.session`) with no sockets: its steps run against
scripted server bytes, and the tests read the exact bytes it wrote.

The same generators run on the asyncio and anyio drivers (tests/test_steps.py and the
integration tests cover those); here a few lines of driver feed each reply in turn, so
a whole session reads like the exchange it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import pytest

from asmtp._core.prepared import prepare_message
from asmtp._core.reply import NEED_DATA
from asmtp._core.steps import Await, Command, Send, Steps
from asmtp._delivery.endpoint import Endpoint
from asmtp._delivery.session import Session
from asmtp.config import Timeouts
from asmtp.errors import ReplyError
from asmtp.results import RecipientResult

T = TypeVar("T")

MESSAGE = prepare_message(b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
EHLO_PIPELINING = b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 1000000\r\n"


def session() -> Session:
    endpoint = Endpoint(host="mx.example.org", port=25, helo="client.example.com", tls="none")
    return Session(endpoint, Timeouts())


def run(session: Session, steps: Steps[T], server: Sequence[bytes]) -> tuple[T, list[bytes]]:
    """Run ``steps`` with ``server`` as what the server sends, one read after another;
    return the steps' value and every write, in order."""
    reads: Iterator[bytes] = iter(server)
    writes: list[bytes] = []
    proto = session.proto
    value: Any = None
    while True:
        try:
            step = steps.send(value)
        except StopIteration as stop:
            assert next(reads, None) is None, "the server script has bytes left"
            return stop.value, writes
        if isinstance(step, Await):
            raise AssertionError("no awaited step expected")
        if isinstance(step, Send | Command):
            # Pieces (the content, then a pipelined QUIT) go out as one step: joined here.
            data = step.data
            writes.append(data if isinstance(data, bytes) else b"".join(data))
        if isinstance(step, Send):
            value = None
            continue
        while (value := proto.next_reply()) is NEED_DATA:
            proto.receive_data(next(reads))


def test_a_pipelined_session_is_three_writes() -> None:
    s = session()
    results: dict[str, RecipientResult] = {}
    steps = s.one_shot(
        "a@example.com", ["b@example.org"], MESSAGE, results, started=0.0, clock=lambda: 0.0
    )
    _, writes = run(
        s,
        steps,
        [
            b"220 mx.example.org ESMTP\r\n",
            EHLO_PIPELINING,
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go ahead\r\n",
            b"250 2.0.0 queued as 42\r\n221 2.0.0 bye\r\n",
        ],
    )
    assert writes == [
        b"EHLO client.example.com\r\n",
        b"MAIL FROM:<a@example.com> SIZE=%d\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" % MESSAGE.size,
        MESSAGE.data + b"QUIT\r\n",  # QUIT rides with the content (RFC 2920)
    ]
    [result] = results.values()
    assert (result.status, result.code, result.enhanced_status) == ("delivered", 250, "2.0.0")
    assert result.message == "queued as 42"


def test_no_ehlo_means_helo_and_one_command_at_a_time() -> None:
    s = session()
    results: dict[str, RecipientResult] = {}
    steps = s.one_shot(
        "a@example.com", ["b@example.org"], MESSAGE, results, started=0.0, clock=lambda: 0.0
    )
    _, writes = run(
        s,
        steps,
        [
            b"220 old.example.org SMTP\r\n",
            b"502 5.5.2 what is EHLO\r\n",
            b"250 old.example.org\r\n",
            b"250 ok\r\n",
            b"250 ok\r\n",
            b"354 go ahead\r\n",
            b"250 queued\r\n",
            b"221 bye\r\n",
        ],
    )
    assert writes == [
        b"EHLO client.example.com\r\n",
        b"HELO client.example.com\r\n",
        b"MAIL FROM:<a@example.com>\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"DATA\r\n",
        MESSAGE.data,
        b"QUIT\r\n",
    ]
    assert results["b@example.org"].status == "delivered"


def test_recipients_over_the_servers_limit_go_on_in_a_second_transaction() -> None:
    s = session()
    results: dict[str, RecipientResult] = {}
    rcpts = ["b@example.org", "c@example.org", "d@example.org"]
    steps = s.one_shot("a@example.com", rcpts, MESSAGE, results, started=0.0, clock=lambda: 0.0)
    _, writes = run(
        s,
        steps,
        [
            b"220 mx.example.org ESMTP\r\n",
            EHLO_PIPELINING,
            b"250 ok\r\n250 ok\r\n452 4.5.3 too many recipients\r\n550 5.1.1 no such user\r\n"
            b"354 go ahead\r\n",
            b"250 queued 1\r\n",
            b"250 ok\r\n250 ok\r\n354 go ahead\r\n",
            b"250 queued 2\r\n221 bye\r\n",
        ],
    )
    # Not QUIT after the first message: c@ still waits for its transaction.
    assert writes[2] == MESSAGE.data
    second = b"MAIL FROM:<a@example.com> SIZE=%d\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
    assert writes[3] == second % MESSAGE.size
    assert writes[4] == MESSAGE.data + b"QUIT\r\n"
    assert {r: (v.status, v.message) for r, v in results.items()} == {
        "b@example.org": ("delivered", "queued 1"),
        "c@example.org": ("delivered", "queued 2"),
        "d@example.org": ("permanent", "RCPT TO refused: 550 5.1.1 no such user"),
    }


def test_a_421_ending_a_pipelined_group_keeps_the_refusals_read_before_it() -> None:
    """Postfix answers the RCPT after its error limit with 421 and closes: the 550s
    before it are those recipients' answers (permanent, not retried elsewhere); the
    accepted recipient and those after the 421 are transient."""
    s = session()
    results: dict[str, RecipientResult] = {}
    rcpts = ["ann@example.org", "x1@example.org", "x2@example.org", "bob@example.org"]
    steps = s.one_shot("a@example.com", rcpts, MESSAGE, results, started=0.0, clock=lambda: 0.0)
    run(
        s,
        steps,
        [
            b"220 mx.example.org ESMTP\r\n",
            EHLO_PIPELINING,
            b"250 ok\r\n250 ok\r\n550 5.1.1 no such user\r\n550 5.1.1 no such user\r\n"
            b"421 4.7.0 too many errors\r\n",
        ],
    )
    assert {r: (v.status, v.stage, v.code) for r, v in results.items()} == {
        "ann@example.org": ("transient", "rcpt", 421),
        "x1@example.org": ("permanent", "rcpt", 550),
        "x2@example.org": ("permanent", "rcpt", 550),
        "bob@example.org": ("transient", "rcpt", 421),
    }


def test_a_refused_mail_is_every_recipients_answer_not_the_rcpts_503() -> None:
    """MAIL refused in a pipelined group: the RCPTs' 503 "need MAIL" replies only follow
    from it; each recipient's result is the MAIL's 550."""
    s = session()
    results: dict[str, RecipientResult] = {}
    rcpts = ["ann@example.org", "bob@example.org"]
    steps = s.one_shot("a@example.com", rcpts, MESSAGE, results, started=0.0, clock=lambda: 0.0)
    run(
        s,
        steps,
        [
            b"220 mx.example.org ESMTP\r\n",
            EHLO_PIPELINING,
            b"550 5.7.1 sender refused\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
            b"503 5.5.1 need RCPT\r\n",
            b"221 bye\r\n",
        ],
    )
    assert {r: (v.status, v.stage, v.code) for r, v in results.items()} == {
        "ann@example.org": ("permanent", "mail", 550),
        "bob@example.org": ("permanent", "mail", 550),
    }


def test_a_refused_greeting_ends_the_session_before_ehlo() -> None:
    s = session()
    with pytest.raises(ReplyError) as caught:
        run(s, s.greet(), [b"554 5.7.1 no service for you\r\n"])
    assert (caught.value.code, caught.value.stage) == (554, "greeting")


def observed() -> tuple[Session, list[tuple[str, float]]]:
    """A session whose observer notes each stage, on a clock that ticks once a call."""
    ticks = iter(range(1, 1000))
    seen: list[tuple[str, float]] = []
    endpoint = Endpoint(host="mx.example.org", port=25, helo="client.example.com", tls="none")
    s = Session(
        endpoint,
        Timeouts(),
        on_stage=lambda stage, at: seen.append((stage, at)),
        clock=lambda: float(next(ticks)),
    )
    return s, seen


def test_an_observer_sees_each_stage_begin_and_the_session_go_idle() -> None:
    s, seen = observed()
    run(s, s.greet(), [b"220 mx.example.org ESMTP\r\n", EHLO_PIPELINING])
    assert seen == [("ehlo", 1.0), ("idle", 2.0)]
    seen.clear()
    (refused, final), _ = run(
        s,
        s.transaction_steps("a@example.com", ["b@example.org"], MESSAGE),
        [b"250 ok\r\n250 ok\r\n354 go ahead\r\n", b"250 queued\r\n"],
    )
    assert (refused, final.code) == ({}, 250)
    assert [stage for stage, _ in seen] == ["mail", "rcpt", "data", "message", "idle"]
    seen.clear()
    reply, writes = run(s, s.quit_steps(), [b"221 bye\r\n"])
    assert reply is not None and reply.code == 221 and writes == [b"QUIT\r\n"]
    assert [stage for stage, _ in seen] == ["quit", "idle"]


def test_a_failed_stage_is_not_followed_by_idle() -> None:
    s, seen = observed()
    with pytest.raises(ReplyError):
        run(s, s.greet(), [b"220 mx.example.org ESMTP\r\n", b"421 4.3.2 busy\r\n"])
    assert seen == [("ehlo", 1.0)]
    s, seen = observed()
    run(s, s.greet(), [b"220 mx.example.org ESMTP\r\n", EHLO_PIPELINING])
    seen.clear()
    with pytest.raises(ReplyError):
        run(
            s,
            s.transaction_steps("a@example.com", ["b@example.org"], MESSAGE),
            [b"451 4.3.0 later\r\n250 ok\r\n503 5.5.1 no\r\n"],
        )
    assert [stage for stage, _ in seen] == ["mail", "rcpt", "data"]


def test_without_an_observer_no_clock_is_read() -> None:
    def clock() -> float:
        raise AssertionError("the clock was read")

    s = Session(session().endpoint, Timeouts(), clock=clock)
    results: dict[str, RecipientResult] = {}
    steps = s.one_shot(
        "a@example.com", ["b@example.org"], MESSAGE, results, started=0.0, clock=lambda: 0.0
    )
    run(
        s,
        steps,
        [
            b"220 mx.example.org ESMTP\r\n",
            EHLO_PIPELINING,
            b"250 ok\r\n250 ok\r\n354 go ahead\r\n",
            b"250 queued\r\n221 bye\r\n",
        ],
    )
    assert results["b@example.org"].status == "delivered"
