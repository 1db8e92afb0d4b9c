"""The Flask example: ``POST /welcome`` with ``email`` and ``name`` (JSON or a form)
sends the welcome mail through one pooled :class:`asmtp.sync.Mailer`, made with the
application and reused by every request (Flask's request threads all hand their sends to
asmtp's one background event loop; the sessions to the relay stay open between them).

Settings from the environment: ``SMTP_HOST``, ``SMTP_PORT`` (587), ``SMTP_TLS``
(``starttls``, ``implicit``, ``none``; by default implicit on port 465, else STARTTLS),
``SMTP_USER``/``SMTP_PASSWORD`` (AUTH, when both are set), ``MAIL_FROM``.

Replies, each JSON: 200 ``{"status": "delivered", ...}``; 400 for a request without the
fields; 422 for an address asmtp refuses (its :class:`asmtp.InputError`) or the mail
server refused (5xx at RCPT); 503 with ``Retry-After`` when the server said "try later"
(after the Mailer's retries); 502 when the mail could not be sent for another reason.

    SMTP_HOST=127.0.0.1 SMTP_PORT=8025 SMTP_TLS=none flask --app flask_app.app run
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import formataddr
from typing import Any, cast

from flask import Flask, Response, current_app, jsonify, request

import asmtp
import asmtp.sync
from asmtp.config import TLSMode

SENDER = "Example <hello@app.example>"
#: what would turn one address into several (or into a display name) once it is put
#: between the angle brackets of the To field: "ann@x>, <eve@y" adds a recipient
LIST_CHARACTERS = frozenset('<>,;:"()[]\\')
#: where the application keeps its Mailer (``app.extensions``)
EXTENSION = "asmtp"


def relay_from_env(env: Mapping[str, str] = os.environ) -> asmtp.Relay:
    """The relay the environment names; a bad value is an :class:`asmtp.InputError`."""
    port = env.get("SMTP_PORT", "587")
    if not port.isdigit():
        raise asmtp.InputError(f"SMTP_PORT must be a number: {port!r}")
    user, password = env.get("SMTP_USER") or None, env.get("SMTP_PASSWORD") or None
    return asmtp.Relay(
        env.get("SMTP_HOST", "localhost"),
        int(port),
        username=user if password else None,
        password=password if user else None,
        tls=cast("TLSMode | None", env.get("SMTP_TLS") or None),  # the Relay checks it
    )


def welcome_message(user_email: str, name: str, sender: str) -> EmailMessage:
    """The welcome mail, HTML with a plain-text alternative; bad input (an address that
    is not one bare address, a line break in the name) is an :class:`asmtp.InputError`."""
    if not user_email or LIST_CHARACTERS.intersection(user_email):
        raise asmtp.InputError(f"not a single email address: {user_email!r}")
    return asmtp.build_message(
        to=formataddr((name, user_email)),
        from_=sender,
        subject=f"Welcome to Example, {name}!",
        body=f"<h1>Hi {html.escape(name)}</h1><p>Your account is ready.</p>",
        mailtype="html",
        alt_text=f"Hi {name},\n\nyour account is ready.\n",
    )


def create_app(relay: asmtp.Relay | None = None, *, sender: str | None = None) -> Flask:
    """The application, with its Mailer (``app.extensions["asmtp"]``); the relay and
    sender default to the environment's."""
    app = Flask(__name__)
    app.config["MAIL_FROM"] = sender or os.environ.get("MAIL_FROM") or SENDER
    # Pooled: sessions stay open and are lent to each send. Opened on the first send;
    # closed at exit by asmtp.sync (or by mailer.close()).
    app.extensions[EXTENSION] = asmtp.sync.Mailer(
        relay or relay_from_env(), timeout=10, retry=asmtp.Retry(attempts=3), call_timeout=60
    )
    app.add_url_rule("/welcome", view_func=welcome, methods=["POST"])
    app.register_error_handler(asmtp.InputError, bad_input)
    return app


def welcome() -> tuple[Response, int] | Response:
    fields: Any = request.get_json(silent=True) if request.is_json else request.form
    if not isinstance(fields, Mapping):
        return jsonify(error="send a JSON object or a form with email and name"), 400
    values = {}
    for field in ("email", "name"):
        value = fields.get(field)
        if not isinstance(value, str) or not value.strip():
            return jsonify(error=f"{field} is missing or empty"), 400
        values[field] = value.strip()
    message = welcome_message(values["email"], values["name"], current_app.config["MAIL_FROM"])
    mailer: asmtp.sync.Mailer = current_app.extensions[EXTENSION]
    try:
        [result] = mailer.send(message)
    except asmtp.InputError:
        raise  # bad_input answers it
    except asmtp.SMTPError as exc:  # the relay's settings, a timeout: not the caller's
        return jsonify(error=f"the mail service failed: {exc}"), 502
    return answer(result)


def answer(result: asmtp.RecipientResult) -> tuple[Response, int]:
    """The HTTP reply for one recipient's result."""
    if result.ok:
        return jsonify(status="delivered", to=result.recipient), 200
    said = f"{result.code} {result.message}" if result.code else result.message
    reply = jsonify(status=result.status, error=f"not sent to {result.recipient}: {said}")
    if result.status == "permanent" and result.stage == "rcpt":
        return reply, 422  # the address itself was refused
    if result.status == "transient":
        reply.headers["Retry-After"] = "60"
        return reply, 503
    return reply, 502


def bad_input(exc: asmtp.InputError) -> tuple[Response, int]:
    """asmtp's :class:`~asmtp.InputError`: what the caller sent cannot be mailed."""
    return jsonify(error=exc.message), 422
