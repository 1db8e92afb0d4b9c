"""Bounces recorded in a delivery journal after its run (``record_bounce``): a journal
written by a real run against the ``asmtp_outbox``, a hard bounce appended against the
recipient's key, and a resume that reports it ("bounced: 5.1.1 ...") without sending
again; other kinds change nothing; a journal in use is refused."""

from __future__ import annotations

import fcntl
import json
import os
from email.message import EmailMessage
from pathlib import Path

import pytest

import asmtp
from asmtp._core.bounce import Bounce, BounceKind
from asmtp._delivery.journal import record_bounce, record_bounces
from asmtp._delivery.mailer import Job
from asmtp.errors import JournalFormatError, JournalLockedError
from asmtp.testing import Outbox

RCPTS = ["ann@example.org", "bee@example.net", "carl@example.org"]


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["Subject"] = "news"
    msg.set_content("hello\n")
    return msg


def bounce(recipient: str | None, kind: BounceKind = "hard", status: str = "5.1.1") -> Bounce:
    return Bounce(
        recipient=recipient,
        kind=kind,
        status=status,
        diagnostic=f"smtp; 550 {status} no such user",
        action="failed" if kind == "hard" else "delayed",
        envelope_id=None,
        message_id="<bounce-1@mx.example.net>",
        source="dsn",
    )


async def first_run(outbox: Outbox, journal: Path) -> None:
    async with asmtp.Mailer(outbox.relay, journal=journal) as mailer:
        report = await mailer.send(message(), recipients=RCPTS)
    assert [r.status for r in report] == ["delivered"] * 3
    outbox.clear()


def records(journal: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in journal.read_text().splitlines()]


async def test_a_hard_bounce_is_reported_on_resume_and_not_sent_again(
    asmtp_outbox: Outbox, tmp_path: Path
) -> None:
    journal = tmp_path / "run.jsonl"
    await first_run(asmtp_outbox, journal)
    assert record_bounce(journal, bounce("bee@EXAMPLE.net")) is True
    assert record_bounce(journal, bounce("carl@example.org", "soft", "4.2.2")) is True
    assert record_bounce(journal, bounce("zed@example.org")) is False  # not in this run
    assert record_bounce(journal, bounce(None)) is False
    [hard, soft] = [r for r in records(journal) if r["event"] == "bounce"]
    assert hard["key"] == "bee@example.net" and hard["kind"] == "hard"
    assert hard["status"] == "5.1.1"
    assert (soft["key"], soft["kind"]) == ("carl@example.org", "soft")

    for _ in range(2):  # every resume reports it alike
        async with asmtp.Mailer(asmtp_outbox.relay, journal=journal, resume=True) as mailer:
            results = [r async for r in mailer.deliver(Job(r, message()) for r in RCPTS)]
            assert (mailer.skipped, mailer.bounced) == (2, 1)
        [bee] = results
        assert (bee.recipient, bee.status, bee.enhanced_status) == (
            "bee@example.net",
            "permanent",
            "5.1.1",
        )
        assert bee.message == "bounced: 5.1.1 smtp; 550 5.1.1 no such user"
        assert asmtp_outbox.messages == []


async def test_the_bounce_goes_against_the_key_the_journal_uses(
    asmtp_outbox: Outbox, tmp_path: Path
) -> None:
    journal = tmp_path / "run.jsonl"
    jobs = [Job(r, message(), key={"row": n}) for n, r in enumerate(RCPTS, start=2)]
    async with asmtp.Mailer(asmtp_outbox.relay, journal=journal) as mailer:
        assert [r.status async for r in mailer.deliver(jobs)] == ["delivered"] * 3
    assert record_bounces(journal, [bounce("carl@example.org"), bounce("x@example.org")]) == [
        True,
        False,
    ]
    assert [r["key"] for r in records(journal) if r["event"] == "bounce"] == [{"row": 4}]
    asmtp_outbox.clear()
    jobs = [*jobs, Job("dan@example.org", message(), key={"row": 5})]
    async with asmtp.Mailer(asmtp_outbox.relay, journal=journal, resume=True) as mailer:
        results = {r.recipient: r async for r in mailer.deliver(jobs)}
    assert results["carl@example.org"].key == {"row": 4}
    assert results["carl@example.org"].status == "permanent"
    assert results["dan@example.org"].status == "delivered"
    assert [m.rcpt_tos for m in asmtp_outbox.messages] == [("dan@example.org",)]


async def test_a_journal_in_use_is_refused(asmtp_outbox: Outbox, tmp_path: Path) -> None:
    journal = tmp_path / "run.jsonl"
    await first_run(asmtp_outbox, journal)
    async with asmtp.Mailer(asmtp_outbox.relay, journal=journal, resume=True):
        # in this process: refused at once, whatever the wait
        with pytest.raises(JournalLockedError, match="when the send has ended"):
            record_bounce(journal, bounce("ann@example.org"))
    fd = os.open(journal, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another process's run holds it
        with pytest.raises(JournalLockedError, match="in use"):
            record_bounce(journal, bounce("ann@example.org"), wait=0)
    finally:
        os.close(fd)
    assert not any(r["event"] == "bounce" for r in records(journal))
    assert record_bounce(journal, bounce("ann@example.org")) is True


def test_no_journal_and_no_recipient_record_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "none.jsonl"
    assert record_bounce(missing, bounce("ann@example.org")) is False
    assert not missing.exists()
    other = tmp_path / "other.txt"
    other.write_text("not a journal\n")
    with pytest.raises(JournalFormatError):
        record_bounce(other, bounce("ann@example.org"))
    assert other.read_text() == "not a journal\n"


async def test_a_damaged_bounce_record_is_refused(asmtp_outbox: Outbox, tmp_path: Path) -> None:
    journal = tmp_path / "run.jsonl"
    await first_run(asmtp_outbox, journal)
    with journal.open("a") as file:
        file.write(json.dumps({"event": "bounce", "key": "ann@example.org", "kind": 5}) + "\n")
    with pytest.raises(JournalFormatError, match="damaged bounce record"):
        async with asmtp.Mailer(asmtp_outbox.relay, journal=journal, resume=True):
            pass
