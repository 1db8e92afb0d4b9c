"""Bulk sending with asmtp.Mailer against real servers on loopback: streaming, retries
only where allowed, the journal and resume, DSN, unsubscribe and VERP. The integration
tests run on asyncio and on trio (the ``anyio`` mark; see conftest.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

import asmtp
from asmtp._delivery.mailer import Job
from asmtp._delivery.retry import Rate
from servers import FaultServer, SMTPTestServer

pytestmark = pytest.mark.anyio

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]
FAST = asmtp.Retry(attempts=3, backoff=0.01, jitter=0)
FAST_TWO = asmtp.Retry(attempts=2, backoff=0.01, jitter=0)


def relay_to(server: SMTPTestServer | FaultServer) -> asmtp.Relay:
    return asmtp.Relay(server.host, server.port, tls="none", helo="bulk.asmtp.test")


def message(subject: str = "news") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["Subject"] = subject
    msg.set_content("hello\n")
    return msg


async def test_deliver_streams_a_generator_lazily(smtp_server: MakeServer) -> None:
    server = smtp_server()
    pulled = 0
    msg = message()

    def jobs() -> Iterator[Job]:
        nonlocal pulled
        for i in range(300):
            pulled += 1
            yield Job(f"user{i}@example.org", msg, key=i)

    keys = []
    async with asmtp.Mailer(relay_to(server), concurrency=10, retry=None) as mailer:
        async for result in mailer.deliver(jobs()):
            if not keys:
                # workers pull as they free up: far from the whole list
                assert pulled <= 10 + 10 + 1
            assert result.status == "delivered", result
            keys.append(result.key)
    assert sorted(keys) == list(range(300))
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(
        f"user{i}@example.org" for i in range(300)
    )
    assert server.max_concurrent_sessions <= 10


async def test_async_iterable_of_rendered_jobs(smtp_server: MakeServer) -> None:
    server = smtp_server()

    async def jobs() -> AsyncIterator[Job]:
        for i in range(20):
            yield Job(f"r{i}@example.org", lambda i=i: message(f"for {i}"), key=f"k{i}")

    async with asmtp.Mailer(relay_to(server), concurrency=5) as mailer:
        results = [r async for r in mailer.deliver(jobs())]
    assert {r.key for r in results} == {f"k{i}" for i in range(20)}
    subjects = {m.rcpt_tos[0]: m.content for m in server.messages}
    assert b"Subject: for 7" in subjects["r7@example.org"]


async def test_transient_failures_are_retried(fault_server: MakeFault) -> None:
    server = fault_server(greeting="reply:421 4.3.2 busy", fail_first=2)
    async with asmtp.Mailer(relay_to(server), retry=FAST, timeout=5) as mailer:
        report = await mailer.send(message(), recipients=["a@example.org"])
    [r] = report
    assert (r.status, r.attempts) == ("delivered", 3)
    assert server.connections == 3


async def test_retries_stop_at_the_attempt_limit(fault_server: MakeFault) -> None:
    server = fault_server(mail="reply:451 4.3.0 try later")
    async with asmtp.Mailer(relay_to(server), retry=FAST, timeout=5) as mailer:
        [r] = await mailer.send(message(), recipients=["a@example.org"])
    assert (r.status, r.code, r.attempts) == ("transient", 451, 3)
    assert server.connections == 3


async def test_permanent_failures_are_not_retried(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="reply:550 5.1.1 no such user")
    async with asmtp.Mailer(relay_to(server), retry=FAST, timeout=5) as mailer:
        [r] = await mailer.send(message(), recipients=["a@example.org"])
    assert (r.status, r.attempts) == ("permanent", 1)
    assert server.connections == 1


async def test_never_retried_after_the_dot_unless_asked(fault_server: MakeFault) -> None:
    server = fault_server(message="close", fail_first=1)
    async with asmtp.Mailer(relay_to(server), retry=FAST, timeout=5) as mailer:
        [r] = await mailer.send(message(), recipients=["a@example.org"])
    assert (r.status, r.attempts) == ("unknown", 1)
    assert server.connections == 1
    opted_in = asmtp.Retry(attempts=3, backoff=0.01, jitter=0, retry_unknown=True)
    async with asmtp.Mailer(relay_to(server), retry=opted_in, timeout=5) as mailer:
        [r] = await mailer.send(message(), recipients=["a@example.org"])
    assert (r.status, r.attempts) == ("delivered", 1)  # the fault hit the first connection only


async def test_recipient_deadline_bounds_all_tries(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="silence")
    async with asmtp.Mailer(
        relay_to(server), retry=FAST, timeout=60, recipient_deadline=1.5
    ) as mailer:
        [r] = await mailer.send(message(), recipients=["a@example.org"])
    assert r.status == "transient"
    assert "deadline" in r.message
    assert server.connections == 1


async def test_journal_and_resume(smtp_server: MakeServer, tmp_path: Path) -> None:
    refuse = {"bad@example.org"}
    server = smtp_server(rcpt_reply=lambda a: "550 5.1.1 no" if a in refuse else None)
    journal = tmp_path / "run.jsonl"
    rcpts = ["a@example.org", "bad@example.org", "c@example.org"]
    async with asmtp.Mailer(relay_to(server), journal=str(journal)) as mailer:
        first = await mailer.send(message(), recipients=rcpts)
    assert [r.status for r in first] == ["delivered", "permanent", "delivered"]
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    dots = [x["recipient"] for x in lines if x["event"] == "dot"]
    assert sorted(dots) == ["a@example.org", "c@example.org"]  # before each dot
    assert sorted(x["recipient"] for x in lines if x["event"] == "result") == sorted(rcpts)
    for line in lines:
        if line["event"] == "result" and line["status"] == "delivered":
            assert lines.index(line) > next(
                i
                for i, x in enumerate(lines)
                if x["event"] == "dot" and x["recipient"] == line["recipient"]
            )
    # a later run with one more recipient sends only to the new one
    async with asmtp.Mailer(relay_to(server), journal=str(journal), resume=True) as mailer:
        second = await mailer.send(message(), recipients=[*rcpts, "d@example.org"])
        assert mailer.skipped == 3
    assert [r.recipient for r in second] == ["d@example.org"]
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [
        "a@example.org",
        "c@example.org",
        "d@example.org",
    ]


async def test_resume_marks_a_dot_without_result_unknown(
    smtp_server: MakeServer,
    tmp_path: Path,
) -> None:
    server = smtp_server()
    journal = tmp_path / "run.jsonl"
    journal.write_text(
        json.dumps({"event": "dot", "key": "a@example.org", "recipient": "a@example.org"})
        + "\n"
        + '{"event": "result", "key": "b@exa'  # torn by a kill
    )
    # a journal from before headers: continued only with the explicit override
    async with asmtp.Mailer(
        relay_to(server), journal=str(journal), resume=True, ignore_identity=True
    ) as mailer:
        report = await mailer.send(message(), recipients=["a@example.org", "b@example.org"])
    assert [(r.recipient, r.status) for r in report] == [
        ("a@example.org", "unknown"),
        ("b@example.org", "delivered"),
    ]
    assert [m.rcpt_tos for m in server.messages] == [["b@example.org"]]


async def test_dsn_parameters_when_offered(fault_server: MakeFault) -> None:
    server = fault_server(capabilities=("PIPELINING", "SIZE 100000", "8BITMIME", "DSN"))
    dsn = asmtp.DSN(notify=("FAILURE",), ret="HDRS", envid="run+42")
    async with asmtp.Mailer(relay_to(server), dsn=dsn) as mailer:
        await mailer.send(message(), recipients=["jöran@example.org"][:0] or ["a+b@example.org"])
    commands = server.commands
    mail = next(c for c in commands if c.upper().startswith("MAIL"))
    rcpt = next(c for c in commands if c.upper().startswith("RCPT"))
    assert "RET=HDRS" in mail and "ENVID=run+2B42" in mail
    assert "NOTIFY=FAILURE" in rcpt and "ORCPT=rfc822;a+2Bb@example.org" in rcpt


async def test_no_dsn_parameters_when_not_offered(smtp_server: MakeServer) -> None:
    server = smtp_server()
    async with asmtp.Mailer(relay_to(server), dsn=asmtp.DSN()) as mailer:
        report = await mailer.send(message(), recipients=["a@example.org"])
    assert report.ok
    assert not any("NOTIFY" in o for m in server.messages for o in m.rcpt_options)


async def test_unsubscribe_and_verp_per_recipient(smtp_server: MakeServer) -> None:
    server = smtp_server()
    async with asmtp.Mailer(
        relay_to(server),
        unsubscribe="https://example.com/unsub?u={recipient}",
        verp="bounces+{token}@example.com",
    ) as mailer:
        report = await mailer.send(message(), recipients=["a@example.org", "b@example.net"])
    assert report.ok
    by_rcpt = {m.rcpt_tos[0]: m for m in server.messages}
    a = by_rcpt["a@example.org"]
    assert a.mail_from == "bounces+a=example.org@example.com"
    assert b"List-Unsubscribe: <https://example.com/unsub?u=a@example.org>" in a.content
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in a.content
    assert b"u=b@example.net" in by_rcpt["b@example.net"].content


async def test_bad_job_gets_an_input_result(smtp_server: MakeServer) -> None:
    server = smtp_server()
    jobs = [Job("ok@example.org", message()), Job("not an address", message(), key="x")]
    async with asmtp.Mailer(relay_to(server)) as mailer:
        results = {r.recipient: r async for r in mailer.deliver(jobs)}
    assert results["ok@example.org"].status == "delivered"
    assert (results["not an address"].status, results["not an address"].stage) == (
        "permanent",
        "input",
    )


async def test_stop_takes_no_new_jobs(smtp_server: MakeServer) -> None:
    server = smtp_server()
    jobs = (Job(f"u{i}@example.org", message()) for i in range(1000))
    seen = 0
    async with asmtp.Mailer(relay_to(server), concurrency=5) as mailer:
        async for _ in mailer.deliver(jobs):
            seen += 1
            if seen == 20:
                mailer.stop()
    assert 20 <= seen < 60
    assert len(server.messages) == seen


# asyncio only: trio warns (ResourceWarning) of an async generator left to the garbage
# collector, and asks for aclosing(), as the next test does on both.
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_breaking_out_of_deliver_cleans_up(smtp_server: MakeServer) -> None:
    server = smtp_server()
    async with asmtp.Mailer(relay_to(server), concurrency=5) as mailer:
        async for _ in mailer.deliver(Job(f"u{i}@example.org", message()) for i in range(500)):
            break
        report = await mailer.send(message(), recipients=["after@example.org"])
    assert report.ok
    assert await server.idle()


async def test_breaking_out_of_a_closed_deliver_cleans_up(smtp_server: MakeServer) -> None:
    server = smtp_server()
    async with asmtp.Mailer(relay_to(server), concurrency=5) as mailer:
        jobs = (Job(f"u{i}@example.org", message()) for i in range(500))
        async with contextlib.aclosing(mailer.deliver(jobs)) as results:
            async for _ in results:
                break
        report = await mailer.send(message(), recipients=["after@example.org"])
    assert report.ok
    assert await server.idle()


def test_rates_parse() -> None:
    assert Rate.parse("50/s").per_second == 50
    assert Rate.parse("1000/h").per_second == pytest.approx(1000 / 3600)
    assert Rate.parse("30 / min").per_second == 0.5
    for bad in ("fast", "0/s", "5/d", "-1/s"):
        with pytest.raises(asmtp.InputError):
            Rate.parse(bad)


def test_retry_policy_is_a_pure_function_of_the_result() -> None:
    policy = asmtp.Retry(attempts=4, backoff=2, multiplier=3, max_backoff=10, jitter=0, deadline=30)
    transient = asmtp.RecipientResult("a@example.org", "transient", stage="mail")
    unknown = asmtp.RecipientResult("a@example.org", "unknown")
    permanent = asmtp.RecipientResult("a@example.org", "permanent", stage="rcpt")
    assert [policy.next_delay(transient, n, 0) for n in (1, 2, 3, 4)] == [2, 6, 10, None]
    assert policy.next_delay(transient, 1, 29) is None  # past the deadline
    assert policy.next_delay(unknown, 1, 0) is None
    assert policy.next_delay(permanent, 1, 0) is None
    jittered = asmtp.Retry(backoff=10, jitter=0.5)
    assert all(5 <= jittered.delay(1) <= 10 for _ in range(100))


async def test_rate_limited_run_completes(smtp_server: MakeServer) -> None:
    server = smtp_server()
    async with asmtp.Mailer(relay_to(server), rate="20/s", rate_per_domain="10/s") as mailer:
        report = await mailer.send(message(), recipients=[f"u{i}@example.org" for i in range(15)])
    assert report.ok and len(server.messages) == 15


async def test_an_error_in_the_callers_block_propagates_unwrapped(
    smtp_server: MakeServer,
) -> None:
    server = smtp_server()
    with pytest.raises(KeyError):
        async with asmtp.Mailer(relay_to(server)) as mailer:
            jobs = (Job(f"u{i}@example.org", message()) for i in range(50))
            async with contextlib.aclosing(mailer.deliver(jobs)) as results:
                async for _ in results:
                    raise KeyError("the caller's bug")
    assert await server.idle()


@pytest.mark.parametrize(
    ("stage", "fault", "status", "tries"),
    [
        ("greeting", "close", "transient", 2),
        ("greeting", "reply:421 4.3.2 busy", "transient", 2),
        ("ehlo", "garbage", "transient", 2),
        ("mail", "reply:421 4.3.2 closing", "transient", 2),
        ("mail", "reply:451 4.3.0 later", "transient", 2),
        ("rcpt", "huge", "transient", 2),
        ("rcpt", "reply:550 5.1.1 unknown", "permanent", 1),
        ("data", "close", "transient", 2),
        ("data", "reply:554 5.6.0 no", "permanent", 1),
        ("message", "close", "unknown", 1),
        ("message", "silence", "unknown", 1),
        ("message", "reply:451 4.3.0 later", "transient", 2),
    ],
)
async def test_every_fault_one_result_and_retries_only_where_allowed(
    fault_server: MakeFault, stage: str, fault: str, status: str, tries: int
) -> None:
    server = fault_server(**{stage: fault})
    recipients = [f"r{i}@example.org" for i in range(3)]
    async with asmtp.Mailer(relay_to(server), retry=FAST_TWO, timeout=1.5) as mailer:
        results = [r async for r in mailer.deliver(Job(r, message()) for r in recipients)]
    assert sorted(r.recipient for r in results) == recipients
    assert {(r.status, r.stage, r.attempts) for r in results} == {(status, stage, tries)}
    assert server.connections == tries * len(recipients)


async def test_bytes_trickled_one_per_second_hit_the_step_timeout(
    fault_server: MakeFault,
) -> None:
    server = fault_server(greeting="trickle", trickle_interval=1.0)
    async with asmtp.Mailer(relay_to(server), retry=None, timeout=2) as mailer:
        [r] = await mailer.send(message(), recipients=["a@example.org"])
    assert (r.status, r.stage) == ("transient", "greeting")
    assert "timed out" in r.message
