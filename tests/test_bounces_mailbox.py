"""Bounces read back over IMAP and POP3 from a real Dovecot (tests/dovecot.py: TLS with
a trustme certificate, users from a passwd-file, Maildirs the tests fill), and the loop
closed with a real Postfix (tests/postfix.py): ``asmtp send`` with a VERP sender to
users Postfix does not have, Postfix's own bounces copied into the Dovecot mailbox,
``asmtp bounces`` reading them back (with crafted complaint and auto-reply samples
beside them) into the run's journal and a suppression list, and a second
``asmtp send --suppress`` skipping the dead addresses.

Each message is classified and matched to its recipient, then marked seen, moved, or
(POP3) deleted only when asked; a wrong password, a missing mailbox or folder, a
refused connection and an untrusted certificate end in one clear error, never a
traceback. These tests need Dovecot's IMAP and POP3 (dovecot-imapd, dovecot-pop3d),
Postfix for the loop, and root; they run with ``pytest -m dovecot`` (.ci/run).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
import trustme

import asmtp
from asmtp.bounces import Returned, read_imap, read_pop3
from dovecot import DovecotServer, dovecot
from postfix import PostfixServer, postfix
from servers import client_ssl_context, write_ca_pem

__all__ = ["dovecot", "postfix"]  # the fixtures, used by the tests below

pytestmark = pytest.mark.dovecot

MakeDovecot = Callable[..., DovecotServer]
MakePostfix = Callable[..., PostfixServer]

SAMPLES = Path(__file__).parent / "bounce_samples"
BOUNCES, PASSWORD = "bounces@example.test", "s3cret"
VERP = "bounces+{token}@example.test"


def mail_server(dovecot: MakeDovecot, ca: trustme.CA) -> DovecotServer:
    return dovecot(mailboxes=[BOUNCES], passwords={BOUNCES: PASSWORD}, ca=ca)


def url(server: DovecotServer, scheme: str, mailbox: str = "INBOX") -> str:
    port = getattr(server, f"{scheme}_port")
    user = BOUNCES.replace("@", "%40")
    return f"{scheme}://{user}@{server.host}:{port}" + (
        f"/{mailbox}" if scheme.startswith("imap") else ""
    )


def fill(server: DovecotServer, *names: str) -> list[str]:
    """Deliver the samples ``names`` (tests/bounce_samples) into the mailbox."""
    return [server.deliver(BOUNCES, (SAMPLES / name).read_bytes()) for name in names]


def summary(returned: list[Returned]) -> list[tuple[str | None, str, str | None, str]]:
    """(recipient, kind, status, source) of each bounce, in the order read."""
    return [(b.recipient, b.kind, b.status, b.source) for r in returned for b in r.bounces]


def asmtp_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asmtp", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


SAMPLE_BOUNCES = [
    ("user@example.com", "complaint", None, "arf"),
    ("ann@example.org", "auto-reply", None, "auto-reply"),
    ("ann@slow.example.org", "soft", "4.4.7", "dsn"),
]


# --------------------------------------------------------------------------- IMAP


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["imaps", "imap"], ids=["implicit-tls", "starttls"])
async def test_imap_reads_the_unseen_messages_and_marks_them_seen(
    dovecot: MakeDovecot, ca: trustme.CA, scheme: str
) -> None:
    server = mail_server(dovecot, ca)
    ids = fill(server, "arf_rfc5965.eml", "autoreply_rfc3834.eml", "rfc3464_delayed.eml")
    context = client_ssl_context(ca)
    read = [
        r
        async for r in read_imap(
            url(server, scheme), password=PASSWORD, verp=VERP, ssl_context=context
        )
    ]
    assert summary(read) == SAMPLE_BOUNCES
    assert server.stored(BOUNCES) == {mid: ("INBOX", True) for mid in ids}
    # read again: nothing is unseen any more
    assert [
        r async for r in read_imap(url(server, scheme), password=PASSWORD, ssl_context=context)
    ] == []


@pytest.mark.anyio
async def test_imap_moves_each_message_once_handled(dovecot: MakeDovecot, ca: trustme.CA) -> None:
    server = mail_server(dovecot, ca)
    first, second = fill(server, "arf_rfc5965.eml", "autoreply_rfc3834.eml")
    messages = read_imap(
        url(server, "imaps"),
        password=PASSWORD,
        move_to="Bounces",
        ssl_context=client_ssl_context(ca),
    )
    async with contextlib.aclosing(messages):
        async for returned in messages:
            # the message being handled is still in the INBOX, unseen
            assert server.stored(BOUNCES)[first] == ("INBOX", False)
            assert returned.bounces[0].kind == "complaint"
            break
    # handled only when the caller asks for the next: the one broken off stays
    assert server.stored(BOUNCES) == {first: ("INBOX", False), second: ("INBOX", False)}
    read = [
        r
        async for r in read_imap(
            url(server, "imaps"),
            password=PASSWORD,
            move_to="Bounces",
            ssl_context=client_ssl_context(ca),
        )
    ]
    assert len(read) == 2
    assert server.stored(BOUNCES) == {first: ("Bounces", True), second: ("Bounces", True)}


@pytest.mark.anyio
async def test_imap_follow_waits_for_new_mail(dovecot: MakeDovecot, ca: trustme.CA) -> None:
    """New mail is read as it comes: while the caller handles a message (the reader
    searches again), and while the reader waits in IDLE (Dovecot says ``* n EXISTS``)."""
    server = mail_server(dovecot, ca)
    fill(server, "arf_rfc5965.eml")
    read: list[Returned] = []
    messages = read_imap(
        url(server, "imaps"),
        password=PASSWORD,
        follow=True,
        max_wait=60,  # a bound for a broken IDLE; the test ends with the third message
        ssl_context=client_ssl_context(ca),
    )
    async with anyio.create_task_group() as tasks, contextlib.aclosing(messages):
        async for returned in messages:
            read.append(returned)
            if len(read) == 1:
                fill(server, "autoreply_rfc3834.eml")  # before the reader looks again
            elif len(read) == 2:
                # from another thread, once the reader is (or is about to be) idle
                tasks.start_soon(anyio.to_thread.run_sync, fill, server, "rfc3464_delayed.eml")
            else:
                break
    assert summary(read) == SAMPLE_BOUNCES


# --------------------------------------------------------------------------- POP3


@pytest.mark.anyio
@pytest.mark.parametrize("scheme", ["pop3s", "pop3"], ids=["implicit-tls", "stls"])
async def test_pop3_reads_every_message_and_deletes_only_when_asked(
    dovecot: MakeDovecot, ca: trustme.CA, scheme: str
) -> None:
    server = mail_server(dovecot, ca)
    fill(server, "arf_rfc5965.eml", "autoreply_rfc3834.eml", "rfc3464_delayed.eml")
    context = client_ssl_context(ca)
    kept = [r async for r in read_pop3(url(server, scheme), password=PASSWORD, ssl_context=context)]
    assert summary(kept) == SAMPLE_BOUNCES
    assert len(server.stored(BOUNCES)) == 3
    deleted = [
        r
        async for r in read_pop3(
            url(server, scheme), password=PASSWORD, delete=True, ssl_context=context
        )
    ]
    assert summary(deleted) == SAMPLE_BOUNCES
    assert server.stored(BOUNCES) == {}


# --------------------------------------------------------------------------- errors


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("what", "error", "says"),
    [
        ("password", asmtp.MailboxError, "login failed: [AUTHENTICATIONFAILED]"),
        ("mailbox", asmtp.MailboxError, "no mailbox 'Nowhere' to read"),
        ("folder", asmtp.MailboxError, "no folder 'Nowhere' to move messages to"),
        ("port", asmtp.ConnectError, "connection to 127.0.0.1 refused"),
        ("certificate", asmtp.CertificateError, "certificate of 127.0.0.1 not trusted"),
    ],
)
async def test_imap_errors_say_what_went_wrong(
    dovecot: MakeDovecot, ca: trustme.CA, what: str, error: type[Exception], says: str
) -> None:
    server = mail_server(dovecot, ca)
    target = url(server, "imaps", "Nowhere" if what == "mailbox" else "INBOX")
    if what == "port":
        target = target.replace(f":{server.imaps_port}/", ":1/")
    context = trustme.CA() if what == "certificate" else ca
    with pytest.raises(error) as caught:
        async for _ in read_imap(
            target,
            password="wrong" if what == "password" else PASSWORD,
            move_to="Nowhere" if what == "folder" else None,
            ssl_context=client_ssl_context(context),
        ):
            pass
    assert says in str(caught.value)
    assert "wrong" not in str(caught.value) and PASSWORD not in str(caught.value)


@pytest.mark.anyio
async def test_pop3_wrong_password(dovecot: MakeDovecot, ca: trustme.CA) -> None:
    server = mail_server(dovecot, ca)
    with pytest.raises(asmtp.MailboxError, match=r"login failed: -ERR \[AUTH\]"):
        async for _ in read_pop3(
            url(server, "pop3s"), password="wrong", ssl_context=client_ssl_context(ca)
        ):
            pass


def test_cli_errors_are_one_line(dovecot: MakeDovecot, ca: trustme.CA, tmp_path: Path) -> None:
    server = mail_server(dovecot, ca)
    ca_file = str(write_ca_pem(ca, tmp_path / "ca.pem"))
    env = {"MAILBOX_PASSWORD": "wrong"}
    done = asmtp_cli(
        "bounces", "--imap", url(server, "imaps"), "--password-env", "MAILBOX_PASSWORD",
        "--ca-file", ca_file, env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "asmtp: error: imaps://bounces%40example.test@127.0.0.1" in done.stderr
    assert "login failed: [AUTHENTICATIONFAILED] Authentication failed." in done.stderr
    usage = asmtp_cli(
        "bounces", "--pop3", url(server, "pop3s"), "--move-to", "X",
        "--password-env", "MAILBOX_PASSWORD", env=env,
    )  # fmt: skip
    assert usage.returncode == 2
    assert "--move-to and --follow are for --imap" in usage.stderr


# --------------------------------------------------------------------------- the loop


@pytest.mark.postfix
@pytest.mark.anyio
async def test_postfix_bounces_go_back_into_the_run(
    postfix: MakePostfix, dovecot: MakeDovecot, ca: trustme.CA, tmp_path: Path
) -> None:
    """asmtp sends through Postfix with a VERP sender; Postfix accepts users it does not
    have and then bounces them (a DSN to the VERP address); ``asmtp bounces`` reads the
    DSNs back over IMAP, records them in the run's journal and suppresses them, and the
    next ``asmtp send --suppress`` skips them."""
    mta = postfix(
        mailboxes=[BOUNCES, "ann@example.test"],
        # accept any user at RCPT, so the virtual delivery agent bounces the unknown
        # ones afterwards; bounces+TOKEN@ lands in bounces@
        main={"smtpd_reject_unlisted_recipient": "no", "recipient_delimiter": "+"},
    )
    server = mail_server(dovecot, ca)
    journal, suppressed = tmp_path / "run.journal", tmp_path / "suppressed.txt"
    ca_file = str(write_ca_pem(ca, tmp_path / "ca.pem"))
    recipients = "ann@example.test,nobody@example.test,ghost@example.test"
    send = [
        "send", "--from", "sender@example.test", "--to", recipients, "--subject", "news",
        "--body", "hello", "--relay", f"{mta.host}:{mta.port}", "--tls", "none",
        "--helo", "client.asmtp.test", "--verp", VERP, "--json", "--no-progress",
    ]  # fmt: skip
    first = asmtp_cli(*send, "--journal", str(journal))
    assert first.returncode == 0, first.stderr
    await mta.settled()
    returned = sorted((mta.root / "mail" / BOUNCES / "new").iterdir())
    assert len(returned) == 2, mta.log()
    for path in returned:  # Postfix's own DSNs, into the mailbox Dovecot serves
        server.deliver(BOUNCES, path.read_bytes())
    fill(server, "arf_rfc5965.eml", "autoreply_rfc3834.eml")

    env = {"MAILBOX_PASSWORD": PASSWORD}
    read = asmtp_cli(
        "bounces", "--imap", url(server, "imap"), "--password-env", "MAILBOX_PASSWORD",
        "--ca-file", ca_file, "--verp", VERP, "--journal", str(journal),
        "--suppress", str(suppressed), "--json", env=env,
    )  # fmt: skip
    assert read.returncode == 0, read.stderr
    lines = [json.loads(line) for line in read.stdout.splitlines()]
    found = sorted(
        (r["recipient"], r["kind"], r["status"], r["source"], r["journal"], r["suppressed"])
        for r in lines
    )
    assert found == [
        ("ann@example.org", "auto-reply", None, "auto-reply", False, False),
        ("ghost@example.test", "hard", "5.1.1", "dsn", True, True),
        ("nobody@example.test", "hard", "5.1.1", "dsn", True, True),
        ("user@example.com", "complaint", None, "arf", False, True),
    ]
    assert all(seen for _, seen in server.stored(BOUNCES).values())
    listed = [line.split()[0] for line in suppressed.read_text().splitlines() if line[:1] != "#"]
    assert sorted(listed) == ["ghost@example.test", "nobody@example.test", "user@example.com"]

    again = asmtp_cli(*send, "--suppress", str(suppressed))
    assert again.returncode == 1, again.stderr  # the suppressed are not delivered
    results = {r["recipient"]: r for r in map(json.loads, again.stdout.splitlines())}
    assert results["ann@example.test"]["status"] == "delivered"
    for dead in ("nobody@example.test", "ghost@example.test"):
        assert (results[dead]["status"], results[dead]["stage"]) == ("permanent", "input")
        assert results[dead]["message"].startswith("suppressed: hard 5.1.1")
    await mta.settled()
    # no new bounce: the dead addresses were not sent to
    assert len(list((mta.root / "mail" / BOUNCES / "new").iterdir())) == 2
