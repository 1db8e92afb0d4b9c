"""The mail side of the FastAPI example, free of FastAPI: the settings (read from the
environment), the welcome message, and the application's sender.

:func:`send_welcome` sends one message per call (``asmtp.send``), as a signup handler
might. :class:`Notifier` keeps one pooled :class:`asmtp.Mailer` for the life of the
application (the FastAPI lifespan in :mod:`.main`), so that each request reuses an open
session. Both take the relay from the application's settings; the tests hand them an
outbox's.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formataddr
from typing import cast

import asmtp
from asmtp.config import TLSMode

SENDER = "Example <hello@app.example>"
#: what would turn one address into several (or into a display name) once it is put
#: between the angle brackets of the To field: "ann@x>, <eve@y" adds a recipient
LIST_CHARACTERS = frozenset('<>,;:"()[]\\')


@dataclass(frozen=True)
class Settings:
    """Where the mail goes, and from whom: ``SMTP_HOST``, ``SMTP_PORT`` (587),
    ``SMTP_TLS`` (``starttls``, ``implicit`` or ``none``; by default implicit on port 465,
    else STARTTLS), ``SMTP_USER``/``SMTP_PASSWORD`` (AUTH, when both are set) and
    ``MAIL_FROM``."""

    relay: asmtp.Relay
    sender: str = SENDER

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """The settings in ``env``; a bad value is an :class:`asmtp.InputError`."""
        port = env.get("SMTP_PORT", "587")
        if not port.isdigit():
            raise asmtp.InputError(f"SMTP_PORT must be a number: {port!r}")
        user, password = env.get("SMTP_USER") or None, env.get("SMTP_PASSWORD") or None
        relay = asmtp.Relay(
            env.get("SMTP_HOST", "localhost"),
            int(port),
            username=user if password else None,
            password=password if user else None,
            tls=cast("TLSMode | None", env.get("SMTP_TLS") or None),  # the Relay checks it
        )
        return cls(relay, env.get("MAIL_FROM") or SENDER)


def one_address(value: str) -> str:
    """``value`` if it can only be one bare address; else :class:`asmtp.InputError`
    (asmtp checks the address itself when the message is built)."""
    if not value or LIST_CHARACTERS.intersection(value):
        raise asmtp.InputError(f"not a single email address: {value!r}")
    return value


def welcome_message(user_email: str, name: str, sender: str = SENDER) -> EmailMessage:
    """The welcome mail: HTML with a plain-text alternative, the name escaped in HTML.
    Bad input (an address asmtp refuses, a line break in the name) is an
    :class:`asmtp.InputError`."""
    return asmtp.build_message(
        to=formataddr((name, one_address(user_email))),
        from_=sender,
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

    def __init__(
        self, relay: asmtp.Relay, *, sender: str = SENDER, retry: asmtp.Retry | None = None
    ) -> None:
        self.sender = sender
        self._mailer = asmtp.Mailer(
            relay, pool=True, timeout=10, retry=retry or asmtp.Retry(attempts=3)
        )

    async def __aenter__(self) -> Notifier:
        await self._mailer.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._mailer.__aexit__(*exc_info)

    @property
    def sessions_opened(self) -> int:
        return self._mailer.sessions_opened

    async def welcome(self, user_email: str, name: str) -> asmtp.RecipientResult:
        [result] = await self._mailer.send(welcome_message(user_email, name, self.sender))
        return result
