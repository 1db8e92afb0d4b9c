"""Credentials: stop knocking. After the relay refuses the credentials (a 5xx to AUTH,
535 5.7.8) the run's other sessions fail at once with the same result and send no
AUTH, and retries are not spent on it; a 4xx (454 4.7.0) is retried like any transient
failure. Against the real aiosmtpd server, which records every AUTH it judges."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import trio

import asmtp
from asmtp.config import Password
from asmtp.results import RecipientResult
from servers import SMTPTestServer

MakeServer = Callable[..., SMTPTestServer]

RCPTS = [f"user{i}@example.org" for i in range(10)]
RETRY = asmtp.Retry(attempts=3, backoff=0.01, jitter=0)
NOT_AGAIN = "(not tried again this run: the relay refused these credentials)"


def auth_server(smtp_server: MakeServer, **options: object) -> SMTPTestServer:
    return smtp_server(auth={"alice": "s3cret"}, auth_require_tls=False, **options)


def relay(server: SMTPTestServer, password: Password) -> asmtp.Relay:
    return asmtp.Relay(
        server.host,
        server.port,
        tls="none",
        helo="client.asmtp.test",
        username="alice",
        password=password,
        allow_plaintext_auth=True,
    )


def auth_attempts(server: SMTPTestServer) -> int:
    return sum(1 for verb, _ in server.commands if verb == "AUTH")


def refused_once_for_all(report: asmtp.Report | list[RecipientResult]) -> None:
    for r in report:
        assert (r.status, r.stage, r.code, r.enhanced_status) == ("transient", "auth", 535, "5.7.8")
        assert r.message.startswith("AUTH refused: 535 5.7.8")
        assert r.message.endswith(NOT_AGAIN)
        assert r.attempts == 1  # no retry spent on it


@pytest.mark.parametrize("pool", [False, True], ids=["session-per-send", "pooled"])
async def test_a_wrong_password_costs_one_auth_for_ten_recipients_and_their_retries(
    smtp_server: MakeServer, pool: bool
) -> None:
    server = auth_server(smtp_server)
    async with asmtp.Mailer(relay(server, "wrong"), retry=RETRY, timeout=10, pool=pool) as m:
        report = await m.send(_message(), sender="alice@example.com", recipients=RCPTS)
    assert auth_attempts(server) == 1  # without the cache: 10 sessions x 3 tries = 30
    assert len(report) == 10
    refused_once_for_all(report)
    assert server.messages == []


async def test_sendmail_asks_once_too(smtp_server: MakeServer) -> None:
    server = auth_server(smtp_server)
    report = await asmtp.sendmail(
        to=RCPTS, from_="alice@example.com", body="x", relay=relay(server, "wrong"), timeout=10
    )
    assert auth_attempts(server) == 1
    refused_once_for_all(report)


async def test_a_new_run_asks_again(smtp_server: MakeServer) -> None:
    server = auth_server(smtp_server)
    for _ in range(2):
        await asmtp.sendmail(
            to=RCPTS[0], from_="alice@example.com", body="x", relay=relay(server, "wrong")
        )
    assert auth_attempts(server) == 2


async def test_a_temporary_auth_failure_is_retried_and_judges_nothing(
    smtp_server: MakeServer,
) -> None:
    server = auth_server(smtp_server, auth_reply="454 4.7.0 Temporary authentication failure")
    async with asmtp.Mailer(relay(server, "s3cret"), retry=RETRY, timeout=10) as mailer:
        [r] = await mailer.send(_message(), sender="alice@example.com", recipients=RCPTS[0])
    assert (r.status, r.stage, r.code, r.attempts) == ("transient", "auth", 454, 3)
    assert NOT_AGAIN not in r.message
    assert auth_attempts(server) == 3


async def test_after_a_454_the_next_try_gets_through(smtp_server: MakeServer) -> None:
    answers = itertools.chain(["454 4.7.0 try later"], itertools.repeat(None))
    server = auth_server(smtp_server, auth_reply=lambda user: next(answers))
    async with asmtp.Mailer(relay(server, "s3cret"), retry=RETRY, timeout=10) as mailer:
        report = await mailer.send(_message(), sender="alice@example.com", recipients=RCPTS[:3])
    assert report.ok, report.failed()
    assert sorted(r.attempts for r in report) in ([1, 1, 2], [1, 2, 2], [2, 2, 2])
    assert len(server.messages) == 3


async def test_a_refused_token_is_not_sent_again(smtp_server: MakeServer) -> None:
    server = auth_server(smtp_server)
    calls: list[str] = []

    def token() -> str:
        calls.append("token")
        return "expired-token"

    report = await asmtp.sendmail(
        to=RCPTS[:5], from_="alice@example.com", body="x", relay=relay(server, token), timeout=10
    )
    assert auth_attempts(server) == 1
    refused_once_for_all(report)
    # One fresh token asked for after the refusal, then once per later session.
    assert len(calls) == 6


async def test_a_password_function_gets_one_fresh_token_after_a_refusal(
    smtp_server: MakeServer,
) -> None:
    server = auth_server(smtp_server)
    tokens = itertools.chain(["expired-token"], itertools.repeat("s3cret"))
    report = await asmtp.sendmail(
        to=RCPTS[:4],
        from_="alice@example.com",
        body="x",
        relay=relay(server, lambda: next(tokens)),
        timeout=10,
    )
    assert report.ok, report.failed()
    assert auth_attempts(server) == 1 + 4  # the refused token, then one per session


async def test_two_different_tokens_refused_end_auth_for_the_run(smtp_server: MakeServer) -> None:
    server = auth_server(smtp_server)
    counter = itertools.count()
    report = await asmtp.sendmail(
        to=RCPTS,
        from_="alice@example.com",
        body="x",
        relay=relay(server, lambda: f"wrong-{next(counter)}"),
        timeout=10,
    )
    assert auth_attempts(server) == 2
    refused_once_for_all(report)


def test_under_trio_the_waiting_sessions_ask_no_more(smtp_server: MakeServer) -> None:
    # The sessions that wait for the first verdict do so in their own tasks (anyio).
    server = auth_server(smtp_server)

    async def main() -> asmtp.Report:
        return await asmtp.sendmail(
            to=RCPTS, from_="alice@example.com", body="x", relay=relay(server, "wrong"), timeout=10
        )

    report = trio.run(main)
    assert auth_attempts(server) == 1
    refused_once_for_all(report)


def test_retry_spends_nothing_on_a_5xx_to_auth_but_backs_off_a_4xx() -> None:
    retry = asmtp.Retry(attempts=3, jitter=0)
    refused = RecipientResult("a@example.org", "transient", code=535, stage="auth")
    later = RecipientResult("a@example.org", "transient", code=454, stage="auth")
    assert retry.next_delay(refused, 1, 0.0) is None
    assert retry.next_delay(later, 1, 0.0) == 1.0


def _message() -> bytes:
    return b"From: alice@example.com\r\nSubject: hi\r\n\r\nx\r\n"
