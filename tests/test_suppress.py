"""Suppression lists: the file (one address per line, '# reason' comments), how
addresses compare (domain case-insensitive, local part exact), durable appends, files
that are no list; a Mailer with ``suppress=`` against the real ``asmtp_outbox`` (a
suppressed recipient gets its one result and the outbox never sees it); and
``asmtp send --suppress FILE`` as people run it."""

from __future__ import annotations

import json
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest

import asmtp
from asmtp._delivery.suppress import SuppressionList
from asmtp.errors import InputError
from asmtp.testing import Outbox


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "news@example.com"
    msg["Subject"] = "news"
    msg.set_content("hello\n")
    return msg


# -- the file ---------------------------------------------------------------------------


def test_a_list_with_comments_and_reasons(tmp_path: Path) -> None:
    path = tmp_path / "suppressed.txt"
    path.write_text(
        "# asmtp suppression list\n"
        "\n"
        "ann@example.org  # hard 5.1.1 2026-12-06\n"
        "  bee@Example.NET\n"
        "a#b@example.org\t# a '#' in a local part is an address, not a comment\r\n"
        "last@example.org",  # no newline at the end (written by hand)
        encoding="utf-8",
    )
    suppressed = SuppressionList(path)
    assert len(suppressed) == 4
    assert suppressed.why("ann@example.org") == "hard 5.1.1 2026-12-06"
    assert suppressed.why("bee@example.net") == f"listed in {path}"
    assert "a#b@example.org" in suppressed
    assert "last@example.org" in suppressed
    assert "carl@example.org" not in suppressed
    assert suppressed.why("carl@example.org") is None


def test_the_domain_compares_in_any_case_the_local_part_exactly() -> None:
    suppressed = SuppressionList(["Ann@Example.ORG", "jörg@bücher.example"])
    assert "Ann@example.org" in suppressed
    assert "Ann@EXAMPLE.org" in suppressed
    assert "ann@example.org" not in suppressed  # RFC 5321 2.4: the host decides its case
    assert "jörg@xn--bcher-kva.example" in suppressed  # an IDN and its A-labels alike
    assert "not an address" not in suppressed
    assert suppressed.why("Ann@example.org") == "listed"


def test_a_missing_file_is_an_empty_list_created_on_first_add(tmp_path: Path) -> None:
    path = tmp_path / "suppressed.txt"
    suppressed = SuppressionList(path)
    assert len(suppressed) == 0 and not path.exists()
    assert suppressed.add("Ann@Example.ORG", "hard 5.1.1") is True
    assert suppressed.add("Ann@example.org", "again") is False
    assert suppressed.add("bee@example.net") is True
    assert path.read_text(encoding="utf-8") == "Ann@example.org  # hard 5.1.1\nbee@example.net\n"
    assert SuppressionList(path).why("Ann@example.org") == "hard 5.1.1"


def test_add_sees_what_another_writer_appended(tmp_path: Path) -> None:
    path = tmp_path / "suppressed.txt"
    path.write_text("ann@example.org", encoding="utf-8")  # no final newline
    first, second = SuppressionList(path), SuppressionList(path)
    assert first.add("bee@example.net", "complaint") is True
    assert second.add("bee@EXAMPLE.net", "hard") is False
    assert second.add("carl@example.org") is True
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == ["ann@example.org", "bee@example.net  # complaint", "carl@example.org"]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("ann@example.org\r\nbee@example.net", ""),
        ("ann@example.org", "hard\nbee@example.net"),
        ("ann@example.org", "nul\x00"),
        ("not an address", ""),
    ],
)
def test_add_refuses_what_would_not_read_back_as_one_line(
    tmp_path: Path, address: str, reason: str
) -> None:
    path = tmp_path / "suppressed.txt"
    with pytest.raises(InputError):
        SuppressionList(path).add(address, reason)
    assert not path.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"\x7fELF\x02\x01\x01\x00\x00\x00",
        b"ann@example.org\n\xff\xfe binary\n",
        b"name,email\nAnn,ann@example.org\n",
    ],
)
def test_a_file_that_is_no_list_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not-a-list"
    path.write_bytes(content)
    with pytest.raises(InputError, match="is not a suppression list"):
        SuppressionList(path)
    assert path.read_bytes() == content


def test_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a regular file"):
        SuppressionList(tmp_path)


# -- the Mailer -------------------------------------------------------------------------


async def test_suppressed_recipients_are_reported_and_never_sent(
    asmtp_outbox: Outbox, tmp_path: Path
) -> None:
    path = tmp_path / "suppressed.txt"
    path.write_text("ann@EXAMPLE.org  # hard 5.1.1\nbee@example.net\n", encoding="utf-8")
    journal = tmp_path / "run.jsonl"
    rcpts = ["ann@example.org", "bee@example.net", "carl@example.org"]
    async with asmtp.Mailer(asmtp_outbox.relay, suppress=path, journal=journal) as mailer:
        report = await mailer.send(message(), recipients=rcpts)
    ann, bee, carl = report
    assert (ann.status, ann.stage, ann.message) == ("permanent", "input", "suppressed: hard 5.1.1")
    assert (bee.status, bee.stage, bee.message) == (
        "permanent",
        "input",
        f"suppressed: listed in {path}",
    )
    assert carl.status == "delivered"
    assert [m.rcpt_tos for m in asmtp_outbox.messages] == [("carl@example.org",)]
    records = [json.loads(line) for line in journal.read_text().splitlines()[1:]]
    assert [r["recipient"] for r in records if r["event"] == "dot"] == ["carl@example.org"]
    results = {r["recipient"]: r["status"] for r in records if r["event"] == "result"}
    assert results == {
        "ann@example.org": "permanent",
        "bee@example.net": "permanent",
        "carl@example.org": "delivered",
    }


async def test_all_suppressed_opens_no_connection(asmtp_outbox: Outbox) -> None:
    listed = SuppressionList(["ann@example.org"])
    async with asmtp.Mailer(asmtp_outbox.relay, suppress=listed) as mailer:
        [result] = await mailer.send(message(), recipients=["ann@example.org"])
    assert result.message == "suppressed: listed"
    assert asmtp_outbox.sessions_opened == 0
    assert asmtp_outbox.messages == []


def test_a_bad_list_is_refused_when_the_mailer_is_made(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x00\x01\x02")
    with pytest.raises(InputError, match="is not a suppression list"):
        asmtp.Mailer(asmtp.Relay("127.0.0.1", 2525), suppress=path)


# -- asmtp send --suppress -------------------------------------------------------------


def asmtp_send(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asmtp", "send", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        check=False,
    )


def test_send_with_suppress(asmtp_outbox: Outbox, tmp_path: Path) -> None:
    path = tmp_path / "suppressed.txt"
    path.write_text("bee@example.net  # complaint 2026-12-06\n", encoding="utf-8")
    relay = f"{asmtp_outbox.relay.host}:{asmtp_outbox.port}"
    done = asmtp_send(
        *("--relay", relay, "--tls", "none", "--from", "news@example.com"),
        *("--to", "ann@example.org", "--to", "bee@example.net", "--subject", "hi"),
        *("--body", "hello", "--suppress", str(path), "--json"),
    )
    results = {r["recipient"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert results["ann@example.org"]["status"] == "delivered"
    bee = results["bee@example.net"]
    assert (bee["status"], bee["stage"]) == ("permanent", "input")
    assert bee["message"] == "suppressed: complaint 2026-12-06"
    assert [m.rcpt_tos for m in asmtp_outbox.messages] == [("ann@example.org",)]
    assert done.returncode != 0  # a recipient was not sent to: as for any refusal


def test_send_refuses_a_file_that_is_no_list(tmp_path: Path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    done = asmtp_send(
        *("--relay", "127.0.0.1:9", "--tls", "none", "--from", "news@example.com"),
        *("--to", "ann@example.org", "--subject", "hi", "--body", "x", "--suppress", str(path)),
    )
    assert done.returncode == 2
    assert "is not a suppression list" in done.stderr
