"""asmtp.testing: the Outbox records what it receives, scripts refusals, transient
failures and AUTH, and reaches users' tests through the ``asmtp_outbox`` fixture
(also when pytest loads it from the ``pytest11`` entry point)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from email.message import EmailMessage
from pathlib import Path

import pytest

import asmtp
import asmtp.testing
from asmtp.testing import Outbox, SentMessage

# The fixture, for runs where asmtp's pytest11 entry point is not installed (yet); a
# user's suite needs no such line: pytest loads asmtp.testing as a plugin.
asmtp_outbox = asmtp.testing.asmtp_outbox

FAST = asmtp.Retry(attempts=2, backoff=0.01, jitter=0)
NO_RETRY = asmtp.Retry(attempts=1)


def note(to: str = "ann@example.org", subject: str = "Note") -> EmailMessage:
    return asmtp.build_message(to=to, from_="me@example.com", subject=subject, body="hello\n")


async def test_records_envelope_and_parsed_message(asmtp_outbox: Outbox) -> None:
    report = await asmtp.sendmail(
        to="Ann Example <ann@example.org>",
        cc="bob@example.net",
        bcc="hidden@example.com",
        from_="Shop <shop@example.com>",
        subject="Your order",
        body="<p>Order <b>42</b> shipped</p>",
        mailtype="html",
        alt_text="Order 42 shipped",
        attachments=[("invoice.txt", b"total: 10\n", "text/plain")],
        relay=asmtp_outbox.relay,
    )
    assert report.ok, report
    # one transaction per recipient (fan-out), Bcc among them but not in the headers
    assert len(asmtp_outbox) == 3
    assert sorted(r for m in asmtp_outbox.messages for r in m.rcpt_tos) == [
        "ann@example.org",
        "bob@example.net",
        "hidden@example.com",
    ]
    [message] = asmtp_outbox.find(to="ANN@example.org")
    assert isinstance(message, SentMessage)
    assert message.mail_from == "shop@example.com"
    assert message.rcpt_tos == ("ann@example.org",)
    assert message.subject == "Your order"
    assert message.from_ == "shop@example.com"
    assert message.to == ["ann@example.org"]
    assert message.cc == ["bob@example.net"]
    assert message.text == "Order 42 shipped\n"
    assert message.html is not None and "<b>42</b>" in message.html
    [invoice] = message.attachments
    assert invoice.get_filename() == "invoice.txt"
    assert invoice.get_content() == "total: 10\n"
    assert message.message["Bcc"] is None
    assert b"Subject: Your order\r\n" in message.data
    assert message.helo
    assert message.session >= 1


async def test_find_by_subject_and_sender(asmtp_outbox: Outbox) -> None:
    for subject in ("Welcome", "Welcome back", "Receipt"):
        report = await asmtp.send(note(subject=subject), relay=asmtp_outbox.relay)
        assert report.ok
    assert [m.subject for m in asmtp_outbox.find(subject="Welcome")] == ["Welcome"]
    found = asmtp_outbox.find(subject=re.compile("^Welcome"), from_="ME@example.com")
    assert [m.subject for m in found] == ["Welcome", "Welcome back"]
    assert asmtp_outbox.find(to="nobody@example.org") == []
    assert [m.subject for m in asmtp_outbox] == ["Welcome", "Welcome back", "Receipt"]


async def test_relay_points_at_the_outbox(asmtp_outbox: Outbox) -> None:
    relay = asmtp_outbox.relay
    assert (relay.host, relay.port, relay.tls) == ("127.0.0.1", asmtp_outbox.port, "none")
    assert asmtp_outbox.address == (relay.host, relay.port)
    changed = asmtp_outbox.relay_with(helo="client.example")
    assert (changed.port, changed.helo) == (relay.port, "client.example")
    report = await asmtp.send(note(), relay=changed)
    assert report.ok
    assert asmtp_outbox.messages[0].helo == "client.example"


def test_relay_needs_a_started_outbox() -> None:
    outbox = Outbox()
    with pytest.raises(RuntimeError, match="start the outbox"):
        outbox.relay  # noqa: B018


async def test_refusals_are_reported_and_not_recorded() -> None:
    with Outbox(refuse={"Bad@Example.org": "550 5.1.1 no such user"}) as outbox:
        outbox.refuse("full@example.org", "452 4.2.2 mailbox full")
        report = await asmtp.sendmail(
            to="ok@example.org, bad@example.org, full@example.org",
            from_="me@example.com",
            subject="Hi",
            body="hello",
            relay=outbox.relay,
        )
        ok, bad, full = report
        assert ok.status == "delivered"
        assert (bad.status, bad.code, bad.enhanced_status, bad.stage) == (
            "permanent",
            550,
            "5.1.1",
            "rcpt",
        )
        assert (full.status, full.code, full.enhanced_status) == ("transient", 452, "4.2.2")
        assert [m.rcpt_tos for m in outbox.messages] == [("ok@example.org",)]


async def test_fail_next_then_success_with_mailer_retry(asmtp_outbox: Outbox) -> None:
    asmtp_outbox.fail_next(1)  # 421 4.3.2 at MAIL FROM, then the connection closes
    async with asmtp.Mailer(asmtp_outbox.relay, retry=FAST) as mailer:
        [result] = await mailer.send(note())
    assert (result.status, result.attempts) == ("delivered", 2)
    assert len(asmtp_outbox) == 1
    # the failed try was a connection of its own
    assert asmtp_outbox.sessions_opened == 2


async def test_fail_next_without_retry_is_transient(asmtp_outbox: Outbox) -> None:
    asmtp_outbox.fail_next(2, "451 4.3.0 local problem")
    async with asmtp.Mailer(asmtp_outbox.relay, retry=NO_RETRY) as mailer:
        first = await mailer.send(note())
        second = await mailer.send(note())
        third = await mailer.send(note())
    for report in (first, second):
        [result] = report
        assert (result.status, result.code, result.stage) == ("transient", 451, "mail")
    assert third.ok
    assert len(asmtp_outbox) == 1


@pytest.mark.parametrize("stage", ["rcpt", "data"])
async def test_fail_next_at_rcpt_or_after_the_dot(asmtp_outbox: Outbox, stage: str) -> None:
    asmtp_outbox.fail_next(1, "450 4.2.0 busy", stage=stage)  # type: ignore[arg-type]
    [failed] = await asmtp.send(note(), relay=asmtp_outbox.relay)
    assert (failed.status, failed.code) == ("transient", 450)
    assert failed.stage == ("rcpt" if stage == "rcpt" else "message")
    assert len(asmtp_outbox) == 0
    [delivered] = await asmtp.send(note(), relay=asmtp_outbox.relay)
    assert delivered.ok
    assert len(asmtp_outbox) == 1


def test_scripted_replies_are_checked() -> None:
    for reply in ("250 fine", "hello", "550 5.1.1 a\r\n550 b", ""):
        with pytest.raises(asmtp.InputError):
            Outbox(refuse={"a@example.org": reply})
    outbox = Outbox()
    with pytest.raises(asmtp.InputError):
        outbox.fail_next(1, "354 go ahead")
    with pytest.raises(asmtp.InputError):
        outbox.fail_next(-1)
    with pytest.raises(asmtp.InputError):
        outbox.fail_next(1, stage="helo")  # type: ignore[arg-type]


def test_wait_for_blocks_until_a_background_send_lands(asmtp_outbox: Outbox) -> None:
    reports: list[asmtp.Report] = []

    def background() -> None:
        send = asmtp.send(note(), relay=asmtp_outbox.relay)
        reports.append(asyncio.run(send))

    worker = threading.Thread(target=background)
    worker.start()
    try:
        [message] = asmtp_outbox.wait_for(1, timeout=10.0)
    finally:
        worker.join(timeout=30.0)
    assert message.rcpt_tos == ("ann@example.org",)
    assert reports and reports[0].ok


def test_wait_for_times_out(asmtp_outbox: Outbox) -> None:
    with pytest.raises(TimeoutError, match="expected 1 message"):
        asmtp_outbox.wait_for(1, timeout=1.0)


async def test_await_for_does_not_block_the_loop(asmtp_outbox: Outbox) -> None:
    # The send runs on this very loop: it can only finish if await_for yields.
    sending = asyncio.create_task(
        asmtp.sendmail(
            to="a@example.org, b@example.org",
            from_="me@example.com",
            subject="Two",
            body="hi",
            relay=asmtp_outbox.relay,
        )
    )
    messages = await asmtp_outbox.await_for(2, timeout=10.0)
    assert sorted(m.rcpt_tos[0] for m in messages) == ["a@example.org", "b@example.org"]
    assert (await sending).ok
    with pytest.raises(TimeoutError, match="expected 3 message"):
        await asmtp_outbox.await_for(3, timeout=1.0)


async def test_clear_forgets_messages_but_keeps_scripts(asmtp_outbox: Outbox) -> None:
    asmtp_outbox.refuse("bad@example.org")
    assert (await asmtp.send(note(), relay=asmtp_outbox.relay)).ok
    assert len(asmtp_outbox) == 1
    asmtp_outbox.clear()
    assert asmtp_outbox.messages == []
    [refused] = await asmtp.send(note("bad@example.org"), relay=asmtp_outbox.relay)
    assert refused.code == 550
    assert len(asmtp_outbox) == 0


async def test_pooled_mailer_sends_over_one_session(asmtp_outbox: Outbox) -> None:
    async with asmtp.Mailer(asmtp_outbox.relay, pool=True, retry=NO_RETRY) as mailer:
        for n in range(3):
            report = await mailer.send(note(f"user{n}@example.org", subject=f"n{n}"))
            assert report.ok, report
        assert mailer.sessions_opened == 1
    messages = asmtp_outbox.messages
    assert [m.subject for m in messages] == ["n0", "n1", "n2"]
    assert len({m.session for m in messages}) == 1
    assert asmtp_outbox.sessions_opened == 1


async def test_auth_required_and_recorded() -> None:
    async with Outbox(auth={"app": "s3cret"}) as outbox:
        [anonymous] = await asmtp.send(note(), relay=outbox.relay)
        assert (anonymous.status, anonymous.code, anonymous.stage) == ("permanent", 530, "mail")
        [wrong] = await asmtp.send(
            note(), relay=outbox.relay_with(username="app", password="guess")
        )
        assert (wrong.ok, wrong.code, wrong.stage) == (False, 535, "auth")
        [good] = await asmtp.send(
            note(), relay=outbox.relay_with(username="app", password="s3cret")
        )
        assert good.ok, good
        [message] = outbox.messages
        assert message.auth_user == "app"


async def test_stop_closes_open_sessions() -> None:
    outbox = Outbox().start()
    try:
        async with asmtp.connect(outbox.relay, timeout=5) as session:
            assert (await session.sendmail("me@example.com", "a@example.org", note())).ok
            await asyncio.to_thread(outbox.stop)
            [lost] = await session.sendmail("me@example.com", "a@example.org", note())
            assert lost.status == "transient"
    finally:
        outbox.stop()
    assert len(outbox) == 1  # records outlive the server
    assert repr(outbox) == "<Outbox stopped messages=1>"
    with pytest.raises(RuntimeError):
        outbox.relay  # noqa: B018


def test_outbox_restarts_on_a_new_port() -> None:
    outbox = Outbox()
    with outbox:
        first = outbox.port
        with pytest.raises(RuntimeError, match="already running"):
            outbox.start()
    with outbox:
        assert outbox.port > 0
        assert outbox.relay.port == outbox.port
    assert first > 0


DOCS = Path(__file__).resolve().parent.parent / "docs" / "testing.md"


def example_files() -> dict[str, str]:
    """The code blocks of docs/testing.md that open with a file name comment."""
    blocks = re.findall(r"```python\n(# (\S+\.py)\n.*?)```", DOCS.read_text(), re.DOTALL)
    return {name: code for code, name in blocks}


def test_docs_example_passes_with_the_pytest11_entry_point(tmp_path: Path) -> None:
    files = example_files()
    assert sorted(files) == ["myapp.py", "test_myapp.py"]
    # A distribution declaring the same entry point as asmtp's pyproject; pytest skips
    # it if the installed asmtp already registered the plugin under that name.
    site = tmp_path / "site"
    dist = site / "asmtp_plugin_probe-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: asmtp-plugin-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text("[pytest11]\nasmtp = asmtp.testing\n")
    project = tmp_path / "project"
    project.mkdir()
    (project / "pytest.ini").write_text(
        "[pytest]\nfilterwarnings = error\nasyncio_default_fixture_loop_scope = function\n"
    )
    for name, code in files.items():
        (project / name).write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(project)])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_myapp.py"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
