"""The sample application's own tests, written as a user of asmtp writes them: the
``asmtp_outbox`` fixture gives each test a local SMTP server; the app is pointed at
``asmtp_outbox.relay`` and the test reads what arrived in ``asmtp_outbox.messages``."""

from __future__ import annotations

import asmtp
import asmtp.testing
from asmtp.testing import Outbox
from sample_app.app import Notifier, send_welcome

# Only for this repository, whose tests may run before asmtp's pytest11 entry point is
# installed; in an application's suite pytest finds the fixture by itself.
asmtp_outbox = asmtp.testing.asmtp_outbox


async def test_welcome_mail_reaches_the_new_user(asmtp_outbox: Outbox) -> None:
    result = await send_welcome(asmtp_outbox.relay, "ann@example.org", "Ann")

    assert result.ok, result
    [message] = asmtp_outbox.messages
    assert message.rcpt_tos == ("ann@example.org",)
    assert message.to == ["ann@example.org"]
    assert message.from_ == "hello@app.example"
    assert message.subject == "Welcome to Example, Ann!"
    assert message.text is not None and "Hi Ann," in message.text
    assert message.html is not None and "<h1>Hi Ann</h1>" in message.html


async def test_name_is_escaped_in_the_html(asmtp_outbox: Outbox) -> None:
    await send_welcome(asmtp_outbox.relay, "eve@example.org", "<b>Eve</b>")

    [message] = asmtp_outbox.find(to="eve@example.org")
    assert message.html is not None
    assert "&lt;b&gt;Eve&lt;/b&gt;" in message.html
    assert "<b>Eve</b>" not in message.html


async def test_refused_recipient_is_reported(asmtp_outbox: Outbox) -> None:
    asmtp_outbox.refuse("ghost@example.org", "550 5.1.1 no such user")

    result = await send_welcome(asmtp_outbox.relay, "ghost@example.org", "Ghost")

    assert (result.status, result.code, result.enhanced_status) == ("permanent", 550, "5.1.1")
    assert asmtp_outbox.messages == []


async def test_notifier_reuses_one_session(asmtp_outbox: Outbox) -> None:
    users = [("ann@example.org", "Ann"), ("bob@example.org", "Bob"), ("cy@example.org", "Cy")]

    async with Notifier(asmtp_outbox.relay) as notifier:
        results = [await notifier.welcome(email, name) for email, name in users]

    assert all(r.ok for r in results), results
    assert [m.subject for m in asmtp_outbox.messages] == [
        "Welcome to Example, Ann!",
        "Welcome to Example, Bob!",
        "Welcome to Example, Cy!",
    ]
    assert asmtp_outbox.sessions_opened == 1


async def test_notifier_retries_a_busy_server(asmtp_outbox: Outbox) -> None:
    asmtp_outbox.fail_next(1, "421 4.3.2 try later")

    async with Notifier(asmtp_outbox.relay, retry=asmtp.Retry(attempts=2, backoff=0.01)) as n:
        result = await n.welcome("ann@example.org", "Ann")

    assert result.ok and result.attempts == 2, result
    assert len(asmtp_outbox) == 1
