"""A tiny application that sends mail with asmtp, written as a web service would be.

:func:`send_welcome` sends one message per call (``asmtp.sendmail``), as a signup
handler might. :class:`Notifier` keeps one pooled :class:`asmtp.Mailer` for the life of
the application (a FastAPI lifespan, say), so that each request reuses an open session.
Both take the relay from the application's settings; its tests hand them an outbox's.
"""

from __future__ import annotations

import html
from email.message import EmailMessage
from email.utils import formataddr

import asmtp

SENDER = "Example <hello@app.example>"


def welcome_message(user_email: str, name: str) -> EmailMessage:
    """The welcome mail: HTML with a plain-text alternative, the name escaped in HTML."""
    return asmtp.build_message(
        to=formataddr((name, user_email)),
        from_=SENDER,
        subject=f"Welcome to Example, {name}!",
        body=f"<h1>Hi {html.escape(name)}</h1><p>Your account is ready.</p>",
        mailtype="html",
        alt_text=f"Hi {name},\n\nyour account is ready.\n",
    )


async def send_welcome(relay: asmtp.Relay, user_email: str, name: str) -> asmtp.RecipientResult:
    """Send the welcome mail to a new user; the result says whether it went out."""
    [result] = await asmtp.send(welcome_message(user_email, name), relay=relay, timeout=10)
    return result


class Notifier:
    """The application's mail sender: one pooled Mailer, opened at start-up.

    >>> async with Notifier(settings.relay) as notifier:   # in the app's lifespan
    ...     await notifier.welcome("ann@example.org", "Ann")  # in a request handler
    """

    def __init__(self, relay: asmtp.Relay, *, retry: asmtp.Retry | None = None) -> None:
        self._mailer = asmtp.Mailer(
            relay, pool=True, timeout=10, retry=retry or asmtp.Retry(attempts=3)
        )

    async def __aenter__(self) -> Notifier:
        await self._mailer.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._mailer.__aexit__(*exc_info)

    async def welcome(self, user_email: str, name: str) -> asmtp.RecipientResult:
        [result] = await self._mailer.send(welcome_message(user_email, name))
        return result
