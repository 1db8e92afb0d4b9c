"""asmtp.django.EmailBackend: a Django project sending through the backend with Django's
own calls (send_mail, send_mass_mail, EmailMultiAlternatives), to asmtp's test outbox
and to real aiosmtpd servers with STARTTLS, implicit TLS, AUTH and client certificates.

Settings are configured here as a Django project's would be (``settings.configure``);
each test points them at its server with Django's ``override_settings``.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import django
import pytest
import trustme
from django.conf import settings
from django.core.mail import (
    EmailMessage,
    EmailMultiAlternatives,
    get_connection,
    send_mail,
    send_mass_mail,
)
from django.test import override_settings

import asmtp
from asmtp.django import DeliveryError, EmailBackend, delivery_report
from asmtp.errors import RunningLoopError
from asmtp.testing import Outbox
from servers import FaultServer, SMTPTestServer, server_ssl_context

if not settings.configured:
    settings.configure(
        EMAIL_BACKEND="asmtp.django.EmailBackend",
        EMAIL_HOST="127.0.0.1",
        DEFAULT_FROM_EMAIL="Example Site <noreply@example.com>",
    )
    django.setup()

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]
#: failures are reported at once, not after asmtp's retries with backoff
NO_RETRY = {"retry": None}


@pytest.fixture
def outbox(asmtp_outbox: Outbox) -> Iterator[Outbox]:
    """The test outbox as the project's EMAIL_HOST/EMAIL_PORT (plaintext, as Django's
    default of neither EMAIL_USE_TLS nor EMAIL_USE_SSL)."""
    with override_settings(EMAIL_PORT=asmtp_outbox.port):
        yield asmtp_outbox


def test_send_mail_reaches_the_outbox_through_one_pooled_session(outbox: Outbox) -> None:
    assert send_mail("Welcome", "Glad you are here.", None, ["ann@example.org"]) == 1
    assert send_mail("Again", "Still glad.", "Ops <ops@example.com>", ["bob@example.net"]) == 1
    first, second = outbox.messages
    assert (first.subject, first.text, first.mail_from) == (
        "Welcome",
        "Glad you are here.\n",
        "noreply@example.com",
    )
    assert (first.rcpt_tos, first.to) == (("ann@example.org",), ["ann@example.org"])
    assert (second.mail_from, second.rcpt_tos) == ("ops@example.com", ("bob@example.net",))
    # Each send_mail makes a new backend; they share the settings' pooled session.
    assert outbox.sessions_opened == 1


def test_send_mass_mail_sends_each_message_and_counts_them(outbox: Outbox) -> None:
    messages = [(f"Subject {n}", f"Body {n}", None, [f"user{n}@example.org"]) for n in range(3)]
    assert send_mass_mail(messages) == 3
    sent = sorted((m.subject, m.rcpt_tos) for m in outbox.messages)
    assert sent == [(f"Subject {n}", (f"user{n}@example.org",)) for n in range(3)]


def test_alternatives_attachments_cc_and_bcc_as_django_builds_them(outbox: Outbox) -> None:
    message = EmailMultiAlternatives(
        subject="Report",
        body="The report is attached.",
        to=["Ann <ann@example.org>"],
        cc=["cc@example.org"],
        bcc=["hidden@example.org"],
        reply_to=["replies@example.com"],
    )
    message.attach_alternative("<p>The report is <b>attached</b>.</p>", "text/html")
    message.attach("report.csv", "name,count\nann,3\n", "text/csv")
    assert message.send() == 1
    # asmtp delivers to each recipient in a transaction of its own: three copies.
    copies = outbox.messages
    assert sorted(r for copy in copies for r in copy.rcpt_tos) == [
        "ann@example.org",
        "cc@example.org",
        "hidden@example.org",
    ]
    assert len({copy.data for copy in copies}) == 1  # the same bytes to each
    received = copies[0]
    assert (received.to, received.cc) == (["ann@example.org"], ["cc@example.org"])
    assert received.message["Bcc"] is None
    assert b"hidden@example.org" not in received.data  # in the envelope only
    assert received.message["Reply-To"] == "replies@example.com"
    assert (received.text or "").strip() == "The report is attached."
    assert (received.html or "").strip() == "<p>The report is <b>attached</b>.</p>"
    [attachment] = received.attachments
    assert attachment.get_filename() == "report.csv"
    assert attachment.get_content().replace("\r\n", "\n") == "name,count\nann,3\n"


def test_a_message_no_recipient_got_raises_unless_fail_silently(outbox: Outbox) -> None:
    outbox.refuse("ann@example.org", "550 5.1.1 no such user")
    with pytest.raises(DeliveryError, match=r"550 5\.1\.1") as raised:
        send_mail("Hi", "Hello", None, ["ann@example.org"])
    assert isinstance(raised.value, smtplib.SMTPException)
    assert isinstance(raised.value, asmtp.SMTPError) and raised.value.permanent
    [[result]] = raised.value.failed
    assert (result.recipient, result.status, result.code) == ("ann@example.org", "permanent", 550)
    assert raised.value.sent == 0
    assert send_mail("Hi", "Hello", None, ["ann@example.org"], fail_silently=True) == 0
    assert outbox.messages == []


def test_per_recipient_results_in_last_reports_and_the_signal(outbox: Outbox) -> None:
    outbox.refuse("gone@example.org", "550 5.1.1 no such user")
    heard: list[tuple[type, str, asmtp.Report]] = []

    def receiver(sender: type, message: EmailMessage, report: asmtp.Report, **_: Any) -> None:
        heard.append((sender, message.subject, report))

    delivery_report.connect(receiver)
    try:
        with get_connection() as backend:
            messages = [
                EmailMessage("Partly", "x", to=["gone@example.org", "bob@example.net"]),
                EmailMessage("Nobody", "x", to=[]),  # no recipients: skipped, as Django does
            ]
            assert backend.send_messages(messages) == 1  # sent: taken for a recipient
    finally:
        delivery_report.disconnect(receiver)
    partly, nobody = backend.last_reports
    assert [(r.recipient, r.status, r.code) for r in partly] == [
        ("gone@example.org", "permanent", 550),
        ("bob@example.net", "delivered", 250),
    ]
    assert list(nobody) == []
    assert heard == [(EmailBackend, "Partly", partly), (EmailBackend, "Nobody", nobody)]
    assert [m.rcpt_tos for m in outbox.messages] == [("bob@example.net",)]


def test_starttls_and_auth_from_django_settings(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(
        starttls_context=tls_server_context, auth={"app": "secret"}, auth_required=True
    )
    with override_settings(
        EMAIL_PORT=server.port,
        EMAIL_HOST_USER="app",
        EMAIL_HOST_PASSWORD="secret",
        EMAIL_USE_TLS=True,
        EMAIL_TIMEOUT=10,
    ):
        # ssl_context: the test CA is trusted by this context, not the system's store
        connection = get_connection(ssl_context=tls_client_context)
        assert send_mail("Hi", "Hello", None, ["ann@example.org"], connection=connection) == 1
    [received] = server.messages
    assert (received.tls, received.auth_user) == (True, "app")
    [result] = connection.last_reports[0]
    assert result.tls == "verified"


def test_implicit_tls_with_email_use_ssl(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(implicit_tls_context=tls_server_context)
    with override_settings(EMAIL_PORT=server.port, EMAIL_USE_SSL=True):
        connection = get_connection(ssl_context=tls_client_context)
        assert send_mail("Hi", "Hello", None, ["ann@example.org"], connection=connection) == 1
    assert [m.tls for m in server.messages] == [True]


def test_certificates_are_verified(
    smtp_server: MakeServer, tls_server_context: ssl.SSLContext
) -> None:
    server = smtp_server(starttls_context=tls_server_context)
    with (
        override_settings(
            EMAIL_PORT=server.port, EMAIL_USE_TLS=True, ASMTP_MAILER_OPTIONS=NO_RETRY
        ),
        pytest.raises(DeliveryError) as raised,
    ):
        send_mail("Hi", "Hello", None, ["ann@example.org"])  # the system store: no test CA
    [[result]] = raised.value.failed
    assert (result.status, result.stage) == ("transient", "starttls")
    assert "certificate" in result.message.lower()
    assert server.messages == []


def test_no_credentials_in_cleartext_unless_the_project_says_so(smtp_server: MakeServer) -> None:
    server = smtp_server(auth={"app": "secret"}, auth_require_tls=False, auth_required=True)
    login = {"EMAIL_PORT": server.port, "EMAIL_HOST_USER": "app", "EMAIL_HOST_PASSWORD": "secret"}
    with (
        override_settings(**login, ASMTP_MAILER_OPTIONS=NO_RETRY),
        pytest.raises(DeliveryError, match="unencrypted"),
    ):
        send_mail("Hi", "Hello", None, ["ann@example.org"])
    assert "AUTH" not in [verb for verb, _ in server.commands]
    with override_settings(**login, ASMTP_ALLOW_PLAINTEXT_AUTH=True):
        assert send_mail("Hi", "Hello", None, ["ann@example.org"]) == 1
    assert [m.auth_user for m in server.messages] == ["app"]


def test_a_client_certificate_from_email_ssl_certfile_and_keyfile(
    smtp_server: MakeServer,
    ca: trustme.CA,
    ca_pem_file: Path,
    tls_client_context: ssl.SSLContext,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wants_a_client_certificate = server_ssl_context(ca)
    wants_a_client_certificate.verify_mode = ssl.CERT_REQUIRED
    ca.configure_trust(wants_a_client_certificate)
    server = smtp_server(starttls_context=wants_a_client_certificate)
    client = ca.issue_cert("app.example.com")
    certfile, keyfile = tmp_path / "client.crt", tmp_path / "client.key"
    client.cert_chain_pems[0].write_to_path(str(certfile))
    client.private_key_pem.write_to_path(str(keyfile))
    with override_settings(
        EMAIL_PORT=server.port, EMAIL_USE_TLS=True, ASMTP_MAILER_OPTIONS=NO_RETRY
    ):
        # Without one, the server ends the session (after the handshake, in TLS 1.3).
        connection = get_connection(ssl_context=tls_client_context)
        with pytest.raises(DeliveryError) as raised:
            send_mail("Hi", "Hello", None, ["ann@example.org"], connection=connection)
        [[result]] = raised.value.failed
        assert result.stage in ("starttls", "ehlo")  # the handshake, or the server after it
        # With one; the backend's own context trusts the test CA through SSL_CERT_FILE.
        monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem_file))
        with override_settings(EMAIL_SSL_CERTFILE=str(certfile), EMAIL_SSL_KEYFILE=str(keyfile)):
            assert send_mail("Hi", "Hello", None, ["ann@example.org"]) == 1
    assert [m.tls for m in server.messages] == [True]


def test_email_timeout_is_the_timeout_of_each_step(fault_server: MakeFault) -> None:
    server = fault_server(greeting="silence")
    with (
        override_settings(EMAIL_PORT=server.port, EMAIL_TIMEOUT=0.3, ASMTP_MAILER_OPTIONS=NO_RETRY),
        pytest.raises(DeliveryError) as raised,
    ):
        send_mail("Hi", "Hello", None, ["ann@example.org"])
    [[result]] = raised.value.failed
    assert result.status == "transient"
    assert "timed out" in result.message or "timeout" in result.message.lower()


def test_email_use_tls_and_email_use_ssl_are_exclusive() -> None:
    with (
        override_settings(EMAIL_USE_TLS=True, EMAIL_USE_SSL=True),
        pytest.raises(ValueError, match="mutually exclusive"),
    ):
        get_connection()


async def test_sending_from_inside_an_event_loop_is_refused_even_silently(outbox: Outbox) -> None:
    with pytest.raises(RunningLoopError, match="sync_to_async"):
        send_mail("Hi", "Hello", None, ["ann@example.org"], fail_silently=True)
    backend = await asyncio.to_thread(EmailBackend, fail_silently=True)  # a thread: no loop
    with pytest.raises(RunningLoopError, match="sync_to_async"):
        backend.send_messages([EmailMessage("Hi", "x", to=["ann@example.org"])])
    assert outbox.messages == []
