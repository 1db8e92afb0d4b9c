"""How users call asmtp, checked by mypy --strict (see test_public_api.py). Not run."""

from __future__ import annotations

import random
from email.message import EmailMessage

import asmtp


async def fan_out() -> bool:
    report: asmtp.Report = await asmtp.sendmail(
        to="jack@example.org, Ann (work) <ann@example.net>",
        from_="someone@example.com",
        subject="Test Subject",
        body="<h1>This is a test mail</h1>",
        mailtype="html",
        alt_text="This is a test mail",
        cc=["c@example.org"],
        bcc=None,
        headers={"X-Campaign": "autumn"},
        attachments=[("notes.txt", b"hello", "text/plain")],
        relay=asmtp.Relay("smtp.example.com", 587, username="u", password="p", tls="starttls"),
        concurrency=100,
        timeout=30.0,
    )
    for result in report.results:
        status: str = result.status
        code: int | None = result.code
        enhanced: str | None = result.enhanced_status
        print(result.recipient, status, code, enhanced, result.stage, result.elapsed)
    return report.ok


async def built_message() -> asmtp.Report:
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["To"] = "b@example.org"
    msg.set_content("hi")

    async def token() -> str:
        return "oauth2-access-token"

    relay = asmtp.Relay(
        "smtp.example.com", 465, username="a@example.com", password=token, auth_mechanism="XOAUTH2"
    )
    return await asmtp.send(msg, relay=relay, timeout=asmtp.Timeouts.rfc5321())


async def direct() -> None:
    settings = asmtp.Direct(dns_servers=["127.0.0.1:5353"], port=2525, rng=random.Random(1))
    await asmtp.sendmail(to="x@example.org", from_="a@example.com", body="hi", relay=settings)
    hosts: list[asmtp.MXHost] = await asmtp.resolve_mx("example.org")
    print([h.name for h in hosts])


async def session() -> None:
    async with asmtp.connect(asmtp.Relay("smtp.example.com")) as s:
        report = await s.sendmail("a@example.com", ["b@example.org"], b"Subject: x\r\n\r\nhi\r\n")
        assert report.ok
    try:
        await asmtp.sendmail(to="bad\r\n", from_="a@example.com", relay=None)
    except asmtp.InputError as exc:
        print(exc.permanent)
    except asmtp.SMTPError:
        raise
