"""The example applications in examples/, each driven in-process as its framework's
tests drive it, against asmtp's test outbox: the FastAPI service (its mail module as a
user of asmtp tests it, then its HTTP side through httpx's ASGI transport, lifespan
included), the Flask app (Flask's test client; asmtp.sync underneath) and the Django
project (Django's test Client, with the project's settings).

Each: a welcome mail reaches the outbox as built; one pooled session serves several
requests; a missing field, an address asmtp refuses (InputError), an address that would
add a recipient, a line break in a header and a recipient the server refuses are each a
4xx with a message saying why, and nothing is sent for them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import django
import django_project.settings
import flask
import httpx
import pytest
from django.conf import settings
from django.test import Client, override_settings
from fastapi_app.mail import Notifier, Settings, send_welcome
from fastapi_app.main import create_app as create_fastapi_app
from flask_app.app import create_app as create_flask_app

import asmtp
import asmtp.testing
from asmtp.testing import Outbox

# Only for this repository, whose tests may run before asmtp's pytest11 entry point is
# installed; in an application's suite pytest finds the fixture by itself.
asmtp_outbox = asmtp.testing.asmtp_outbox

#: bodies every app must answer with a 4xx, sending nothing: (body, HTTP status, words
#: the error message must contain)
BAD_INPUT = [
    pytest.param({"email": "ann@example.org"}, (400, 422), "name", id="missing-name"),
    pytest.param({"name": "Ann"}, (400, 422), "email", id="missing-email"),
    pytest.param({"email": "", "name": "Ann"}, (400, 422), "email", id="empty-email"),
    pytest.param({"email": "not-an-address", "name": "X"}, (422,), "'@'", id="no-at-sign"),
    pytest.param({"email": "a b@example.org", "name": "X"}, (422,), "spaces", id="space"),
    pytest.param(
        {"email": "ann@example.org>, <eve@example.net", "name": "X"},
        (422,),
        "not a single email address",
        id="second-recipient",
    ),
    pytest.param(
        {"email": "ann@example.org", "name": "Ann\r\nBcc: eve@example.net"},
        (422,),
        "line",  # "line-breaking character" (asmtp), "newlines" (Django)
        id="header-injection",
    ),
]


def error_text(body: Any) -> str:
    return json.dumps(body)


def check_welcome(outbox: Outbox, email: str, name: str) -> None:
    [message] = outbox.find(to=email)
    assert message.rcpt_tos == (email,)
    assert message.from_ == "hello@app.example"
    assert message.subject == f"Welcome to Example, {name}!"
    assert message.text is not None and f"Hi {name}," in message.text
    assert message.html is not None and f"<h1>Hi {name}</h1>" in message.html


# --------------------------------------------------------------------------- FastAPI: mail


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


def test_settings_come_from_the_environment() -> None:
    env = {"SMTP_HOST": "smtp.example.com", "SMTP_PORT": "2525", "SMTP_TLS": "none"}
    settings = Settings.from_env({**env, "SMTP_USER": "app", "SMTP_PASSWORD": "secret"})
    relay = settings.relay
    assert (relay.host, relay.port, relay.tls, relay.username) == (
        "smtp.example.com",
        2525,
        "none",
        "app",
    )
    assert Settings.from_env({"SMTP_HOST": "smtp.example.com"}).relay.tls == "starttls"
    with pytest.raises(asmtp.InputError, match="SMTP_PORT"):
        Settings.from_env({"SMTP_PORT": "smtp"})
    with pytest.raises(asmtp.InputError, match="tls must be one of"):
        Settings.from_env({"SMTP_TLS": "sometimes"})


# --------------------------------------------------------------------------- FastAPI: HTTP


@contextlib.asynccontextmanager
async def fastapi_client(outbox: Outbox) -> AsyncIterator[httpx.AsyncClient]:
    """The FastAPI app, lifespan started (its Notifier open), pointed at the outbox.
    (Not a fixture: the Mailer's task group must be left by the task that entered it.)"""
    app = create_fastapi_app(Settings(outbox.relay))
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://example.test") as client,
    ):
        yield client


async def test_fastapi_sends_each_welcome_through_one_session(asmtp_outbox: Outbox) -> None:
    async with fastapi_client(asmtp_outbox) as client:
        for email, name in [("ann@example.org", "Ann"), ("bob@example.org", "Bob")]:
            reply = await client.post("/welcome", json={"email": email, "name": name})
            assert reply.status_code == 200, reply.text
            assert reply.json() == {"status": "delivered", "to": email}
            check_welcome(asmtp_outbox, email, name)
    assert asmtp_outbox.sessions_opened == 1


@pytest.mark.parametrize(("body", "statuses", "words"), BAD_INPUT)
async def test_fastapi_answers_bad_input_with_a_4xx(
    asmtp_outbox: Outbox, body: dict[str, str], statuses: tuple[int, ...], words: str
) -> None:
    async with fastapi_client(asmtp_outbox) as client:
        reply = await client.post("/welcome", json=body)
    assert reply.status_code in statuses, reply.text
    assert words in error_text(reply.json())
    assert asmtp_outbox.messages == []


async def test_fastapi_answers_a_refused_address_and_a_bad_body_with_422(
    asmtp_outbox: Outbox,
) -> None:
    asmtp_outbox.refuse("ghost@example.org", "550 5.1.1 no such user")
    async with fastapi_client(asmtp_outbox) as client:
        reply = await client.post("/welcome", json={"email": "ghost@example.org", "name": "G"})
        assert reply.status_code == 422
        assert reply.json()["status"] == "permanent"
        assert "550 5.1.1 no such user" in reply.json()["detail"]
        reply = await client.post(
            "/welcome", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert reply.status_code == 422


# --------------------------------------------------------------------------- Flask


@pytest.fixture
def flask_app(asmtp_outbox: Outbox) -> Iterator[flask.Flask]:
    """The Flask app pointed at the outbox; its asmtp.sync Mailer closed afterwards."""
    app = create_flask_app(asmtp_outbox.relay)
    try:
        yield app
    finally:
        app.extensions["asmtp"].close()


def test_flask_sends_each_welcome_through_one_session(
    flask_app: flask.Flask, asmtp_outbox: Outbox
) -> None:
    client = flask_app.test_client()
    reply = client.post("/welcome", json={"email": "ann@example.org", "name": "Ann"})
    assert (reply.status_code, reply.json) == (
        200,
        {"status": "delivered", "to": "ann@example.org"},
    )
    reply = client.post("/welcome", data={"email": "bob@example.org", "name": "Bob"})  # a form
    assert reply.status_code == 200, reply.text
    check_welcome(asmtp_outbox, "ann@example.org", "Ann")
    check_welcome(asmtp_outbox, "bob@example.org", "Bob")
    assert flask_app.extensions["asmtp"].sessions_opened == asmtp_outbox.sessions_opened == 1


@pytest.mark.parametrize(("body", "statuses", "words"), BAD_INPUT)
def test_flask_answers_bad_input_with_a_4xx(
    flask_app: flask.Flask,
    asmtp_outbox: Outbox,
    body: dict[str, str],
    statuses: tuple[int, ...],
    words: str,
) -> None:
    reply = flask_app.test_client().post("/welcome", json=body)
    assert reply.status_code in statuses, reply.text
    assert words in error_text(reply.json)
    assert asmtp_outbox.messages == []


def test_flask_answers_a_refused_address_and_a_bad_body_with_a_4xx(
    flask_app: flask.Flask, asmtp_outbox: Outbox
) -> None:
    asmtp_outbox.refuse("ghost@example.org", "550 5.1.1 no such user")
    client = flask_app.test_client()
    reply = client.post("/welcome", json={"email": "ghost@example.org", "name": "G"})
    assert reply.status_code == 422
    assert reply.json is not None and "550 5.1.1 no such user" in reply.json["error"]
    reply = client.post("/welcome", data=b"{not json", content_type="application/json")
    assert reply.status_code == 400
    assert reply.json == {"error": "send a JSON object or a form with email and name"}


# --------------------------------------------------------------------------- Django

#: The project's settings. Not INSTALLED_APPS and DATABASES (both empty: the project
#: needs neither, and Django warns when a test overrides them), nor SECRET_KEY (nothing
#: is signed, and restoring a settings object without one fails).
PROJECT_SETTINGS = {
    name: getattr(django_project.settings, name)
    for name in dir(django_project.settings)
    if name.isupper() and name not in ("INSTALLED_APPS", "DATABASES", "SECRET_KEY")
}


@pytest.fixture
def django_client(asmtp_outbox: Outbox) -> Iterator[Client]:
    """Django's test Client for the example project, its mail going to the outbox."""
    assert not django_project.settings.INSTALLED_APPS and not django_project.settings.DATABASES
    # Django's settings are the process's: configured here unless another test module
    # (test_django.py) has, at import; this fixture overrides what the project sets.
    if not settings.configured:
        settings.configure()
        django.setup()
    with override_settings(
        **{
            **PROJECT_SETTINGS,
            "EMAIL_HOST": asmtp_outbox.host,
            "EMAIL_PORT": asmtp_outbox.port,
            "EMAIL_USE_TLS": False,
            "EMAIL_USE_SSL": False,
            "ALLOWED_HOSTS": ["testserver"],
        }
    ):
        yield Client()


def test_django_sends_each_welcome_through_one_session(
    django_client: Client, asmtp_outbox: Outbox
) -> None:
    reply = django_client.post(
        "/welcome/",
        json.dumps({"email": "ann@example.org", "name": "Ann"}),
        content_type="application/json",
    )
    assert (reply.status_code, reply.json()) == (
        200,
        {"status": "delivered", "to": "ann@example.org"},
    )
    reply = django_client.post("/welcome/", {"email": "bob@example.org", "name": "Bob"})
    assert reply.status_code == 200, reply.content
    check_welcome(asmtp_outbox, "ann@example.org", "Ann")
    check_welcome(asmtp_outbox, "bob@example.org", "Bob")
    # Django makes a backend per send; asmtp's backends share the pooled session.
    assert asmtp_outbox.sessions_opened == 1


@pytest.mark.parametrize(("body", "statuses", "words"), BAD_INPUT)
def test_django_answers_bad_input_with_a_4xx(
    django_client: Client,
    asmtp_outbox: Outbox,
    body: dict[str, str],
    statuses: tuple[int, ...],
    words: str,
) -> None:
    reply = django_client.post("/welcome/", json.dumps(body), content_type="application/json")
    assert reply.status_code in statuses, reply.content
    assert words in error_text(reply.json())
    assert asmtp_outbox.messages == []


def test_django_answers_a_refused_address_and_a_bad_body_with_a_4xx(
    django_client: Client, asmtp_outbox: Outbox
) -> None:
    asmtp_outbox.refuse("ghost@example.org", "550 5.1.1 no such user")
    reply = django_client.post(
        "/welcome/",
        json.dumps({"email": "ghost@example.org", "name": "G"}),
        content_type="application/json",
    )
    assert reply.status_code == 422
    assert "550 5.1.1 no such user" in reply.json()["error"]
    reply = django_client.post("/welcome/", b"{not json", content_type="application/json")
    assert reply.status_code == 400
    assert django_client.get("/welcome/").status_code == 405
