"""asmtp against Dovecot's LMTP (tests/dovecot.py), the local delivery agent Postfix
and others hand mail to: LHLO, PIPELINING and CHUNKING as Dovecot offers them, and its
own reply per recipient after the data (a user that does not exist refused at RCPT, a
full mailbox after the data while the others of the transaction are saved), over
127.0.0.1 and over its Unix socket, on asyncio and trio. Every mail asmtp reports
delivered is read back from the Maildir Dovecot wrote, and nothing else is there.

These tests need Dovecot (dovecot-core, dovecot-lmtpd) and root; they run with
``pytest -m dovecot`` (.ci/run), not in the default run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from email.message import EmailMessage

import pytest

import asmtp
from asmtp.results import RecipientResult
from dovecot import DovecotServer, dovecot

__all__ = ["dovecot"]  # the fixture, used by the tests below

pytestmark = pytest.mark.dovecot

MakeDovecot = Callable[..., DovecotServer]
SENDER = "sender@client.test"
#: lines a careless client would end the message on, or lose a dot of
BODY = "through Dovecot\n.\n..two dots\n. one dot and a space\n"
ANN, BOB, NOBODY = "ann@example.test", "bob@example.test", "nobody@example.test"


def summary(result: RecipientResult) -> tuple[str, str, str, int | None, str | None]:
    return (result.recipient, result.status, result.stage, result.code, result.enhanced_status)


def message(to: list[str], body: str = BODY) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, ", ".join(to), "local delivery"
    msg.set_content(body)
    return msg


def relay_of(server: DovecotServer, where: str, **options: object) -> asmtp.Relay:
    if where == "unix":
        return asmtp.Relay(path=server.socket, lmtp=True, helo="client.test", **options)  # type: ignore[arg-type]
    return asmtp.Relay(
        server.host,
        server.port,
        lmtp=True,
        tls="none",
        helo="client.test",
        **options,  # type: ignore[arg-type]
    )


@pytest.mark.anyio
@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
@pytest.mark.parametrize("where", ["tcp", "unix"])
async def test_each_recipient_gets_dovecots_own_answer(
    dovecot: MakeDovecot, where: str, chunking: bool
) -> None:
    server = dovecot(mailboxes=[ANN, BOB], quota={BOB: "1K"})
    rcpts = [ANN, NOBODY, BOB]
    big = message(rcpts, BODY + "x" * 2000 + "\n")  # over bob's quota
    async with asmtp.connect(relay_of(server, where, chunking=chunking), timeout=10) as conn:
        assert conn.capabilities.pipelining  # type: ignore[attr-defined]
        assert "CHUNKING" in conn.capabilities.extensions  # type: ignore[attr-defined]
        report = await conn.sendmail(SENDER, rcpts, big)
    assert [summary(r) for r in report] == [
        (ANN, "delivered", "message", 250, "2.0.0"),
        (NOBODY, "permanent", "rcpt", 550, "5.1.1"),
        (BOB, "permanent", "message", 552, "5.2.2"),
    ]
    assert "Saved" in report[0].message and "Quota exceeded" in report[2].message
    [(mailbox, saved)] = server.messages()
    assert mailbox == ANN
    assert saved.get_content().startswith(BODY)  # every dot line as it was written


@pytest.mark.anyio
async def test_a_fan_out_to_local_mailboxes_over_the_socket(dovecot: MakeDovecot) -> None:
    mailboxes = [f"user{n}@example.test" for n in range(12)]
    server = dovecot(mailboxes=mailboxes)
    report = await asmtp.send(
        message(mailboxes), relay=relay_of(server, "unix"), concurrency=4, timeout=10
    )
    assert report.ok, [r.message for r in report.failed()]
    assert sorted(m for m, _ in server.messages()) == sorted(mailboxes)


def test_the_cli_over_dovecots_socket(dovecot: MakeDovecot) -> None:
    server = dovecot(mailboxes=[ANN])
    send = ["send", "--from", SENDER, "--to", ANN, "--to", NOBODY, "--body", "hi", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", "asmtp", *send, "--relay", f"unix:{server.socket}", "--lmtp"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr  # nobody@ does not exist
    assert [m for m, _ in server.messages()] == [ANN]
