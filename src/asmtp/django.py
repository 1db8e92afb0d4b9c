"""asmtp as Django's email backend: ``EMAIL_BACKEND = "asmtp.django.EmailBackend"``.

Owns the translation between Django's mail settings and asmtp: Django's ``EMAIL_*``
settings (or the backend's arguments, as Django's SMTP backend takes them) become an
:class:`asmtp.Relay`; ``send_messages`` sends every message at once through a pooled
:class:`asmtp.sync.Mailer` shared by every backend with the same settings in the
process (Django makes a backend per ``send_mail``, the sessions outlive it); and
asmtp's per-recipient results become what Django callers expect: the count of messages
sent, or an exception (:class:`DeliveryError`, an :class:`smtplib.SMTPException`)
unless ``fail_silently``. The results themselves are kept in ``backend.last_reports``
and sent with the :data:`delivery_report` signal.

Secure by default, and stricter than Django's own backend: certificates are verified
(``EMAIL_SSL_CERTFILE``/``KEYFILE`` add a client certificate, the system's trust store
still checks the server's), and credentials are never sent in cleartext unless
``EMAIL_USE_TLS`` or ``EMAIL_USE_SSL`` is set, or ``ASMTP_ALLOW_PLAINTEXT_AUTH = True``
(``allow_plaintext_auth=True``) says so; asmtp's :class:`~asmtp.Relay` enforces both.
"""

from __future__ import annotations

import concurrent.futures
import io
import smtplib
import ssl
import threading
import time
from collections.abc import Sequence
from email.generator import BytesGenerator
from email.message import Message
from email.utils import parseaddr
from typing import Any

from django.conf import settings
from django.core.mail.backends.base import BaseEmailBackend
from django.dispatch import Signal

from . import sync
from .config import Relay, TimeoutSpec, check_number
from .errors import InputError, RunningLoopError, SMTPError, SMTPTimeoutError
from .results import RecipientResult, Report, result_from_error

__all__ = ["DeliveryError", "EmailBackend", "delivery_report"]

#: Sent once per message handed to :meth:`EmailBackend.send_messages`, after the
#: sends: ``sender`` is the backend class; keyword arguments ``message`` (Django's
#: EmailMessage), ``report`` (its :class:`asmtp.Report`, one result per recipient;
#: empty for a message without recipients) and ``backend`` (the instance).
delivery_report = Signal()


class DeliveryError(SMTPError, smtplib.SMTPException):
    """No recipient got one of the messages (raised unless ``fail_silently``, once
    every message of the call has been tried). An :class:`smtplib.SMTPException` too,
    as code written for Django's SMTP backend catches. ``reports``: one
    :class:`asmtp.Report` per message given; ``failed``: those of the messages no
    recipient got; ``sent``: how many messages were sent."""

    def __init__(self, message: str, *, reports: Sequence[Report], sent: int) -> None:
        super().__init__(message)
        self.reports = tuple(reports)
        self.failed = tuple(r for r in self.reports if r and not _reached(r))
        self.sent = sent
        self.permanent = all(res.status == "permanent" for r in self.failed for res in r)


def _reached(report: Report) -> bool:
    """Django counts a message as sent when the server took it for any recipient."""
    return any(r.status == "delivered" for r in report)


#: the pooled Mailers, one per distinct settings, shared by every backend instance
_shared: dict[tuple[Any, ...], sync.Mailer] = {}
_shared_lock = threading.Lock()


def _key_of(value: Any) -> Any:
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))  # kept alive by the Mailer it configures
    return value


class EmailBackend(BaseEmailBackend):  # type: ignore[misc]
    """Django email backend sending through asmtp's pooled sessions.

    Takes what Django's SMTP backend takes (``host``, ``port``, ``username``,
    ``password``, ``use_tls``, ``use_ssl``, ``timeout``, ``ssl_keyfile``,
    ``ssl_certfile``, ``fail_silently``), each defaulting to its ``EMAIL_*`` setting,
    and besides: ``ssl_context`` (one to verify the server with, e.g. trusting a
    private CA; the same object each time, so that backends share a pool),
    ``allow_plaintext_auth`` (default: the ``ASMTP_ALLOW_PLAINTEXT_AUTH`` setting, else
    False), ``mailer_options`` (default: the ``ASMTP_MAILER_OPTIONS`` setting: a dict
    of :class:`asmtp.sync.MailerOptions`, such as ``retry``, ``rate`` or ``dkim``) and
    ``call_timeout`` (seconds a ``send_messages`` call waits at most).

    ``EMAIL_TIMEOUT`` is asmtp's timeout per network step (default 30 s, not
    "forever"). Neither ``EMAIL_USE_TLS`` nor ``EMAIL_USE_SSL`` means plaintext, as
    with Django's backend.
    """

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        username: str | None = None,
        password: str | None = None,
        use_tls: bool | None = None,
        fail_silently: bool = False,
        use_ssl: bool | None = None,
        timeout: float | None = None,
        ssl_keyfile: str | None = None,
        ssl_certfile: str | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        allow_plaintext_auth: bool | None = None,
        mailer_options: sync.MailerOptions | None = None,
        call_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        _refuse_in_loop("EmailBackend")
        super().__init__(fail_silently=fail_silently)
        self.host: str = host or settings.EMAIL_HOST
        self.port: int = port or settings.EMAIL_PORT
        self.username: str = settings.EMAIL_HOST_USER if username is None else username
        self.password: str = settings.EMAIL_HOST_PASSWORD if password is None else password
        self.use_tls: bool = settings.EMAIL_USE_TLS if use_tls is None else use_tls
        self.use_ssl: bool = settings.EMAIL_USE_SSL if use_ssl is None else use_ssl
        self.timeout: float | None = settings.EMAIL_TIMEOUT if timeout is None else timeout
        self.ssl_keyfile: str | None = (
            settings.EMAIL_SSL_KEYFILE if ssl_keyfile is None else ssl_keyfile
        )
        self.ssl_certfile: str | None = (
            settings.EMAIL_SSL_CERTFILE if ssl_certfile is None else ssl_certfile
        )
        if self.use_ssl and self.use_tls:
            raise InputError(
                "EMAIL_USE_TLS/EMAIL_USE_SSL are mutually exclusive, so only set "
                "one of those settings to True."
            )
        self.ssl_context = ssl_context
        self.allow_plaintext_auth: bool = (
            getattr(settings, "ASMTP_ALLOW_PLAINTEXT_AUTH", False)
            if allow_plaintext_auth is None
            else allow_plaintext_auth
        )
        if mailer_options is None:
            configured: sync.MailerOptions | None = getattr(settings, "ASMTP_MAILER_OPTIONS", None)
            mailer_options = configured or sync.MailerOptions()
        self.mailer_options: sync.MailerOptions = mailer_options
        self.call_timeout = sync.CALL_TIMEOUT if call_timeout is None else call_timeout
        check_number("call_timeout (seconds)", self.call_timeout)
        #: one :class:`asmtp.Report` per message of the last ``send_messages`` call
        self.last_reports: list[Report] = []
        self._lock = threading.RLock()
        self._opened = False
        #: the pooled :class:`asmtp.sync.Mailer` every backend with these settings shares
        self.mailer = self._shared_mailer()

    # -- the relay ----------------------------------------------------------------

    def _shared_mailer(self) -> sync.Mailer:
        key = (
            self.host,
            int(self.port),
            self.username,
            self.password,
            bool(self.use_tls),
            bool(self.use_ssl),
            self.timeout,
            self.ssl_certfile,
            self.ssl_keyfile,
            _key_of(self.ssl_context),
            bool(self.allow_plaintext_auth),
            self.call_timeout,
            tuple(sorted((k, _key_of(v)) for k, v in self.mailer_options.items())),
        )
        with _shared_lock:
            mailer = _shared.get(key)
            if mailer is None:
                options: sync.MailerOptions = {"timeout": self._timeouts(), **self.mailer_options}
                mailer = _shared[key] = sync.Mailer(
                    self.relay(), pool=True, call_timeout=self.call_timeout, **options
                )
            return mailer

    def relay(self) -> Relay:
        """The :class:`asmtp.Relay` these settings describe."""
        login = bool(self.username and self.password)  # as Django: both, or no AUTH
        return Relay(
            self.host,
            int(self.port),
            username=self.username if login else None,
            password=self.password if login else None,
            tls="implicit" if self.use_ssl else "starttls" if self.use_tls else "none",
            ssl_context=self._ssl_context(),
            allow_plaintext_auth=bool(self.allow_plaintext_auth),
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        if not (self.ssl_certfile or self.ssl_keyfile):
            return self.ssl_context  # None: asmtp's verifying default
        if not self.ssl_certfile:
            raise InputError("EMAIL_SSL_KEYFILE needs EMAIL_SSL_CERTFILE (the certificate)")
        if self.ssl_context is not None:
            raise InputError("give ssl_context= or EMAIL_SSL_CERTFILE/KEYFILE, not both")
        # The client certificate goes into a verifying context: the server's
        # certificate is still checked against the trust store.
        context = ssl.create_default_context()
        try:
            context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        except (OSError, ssl.SSLError) as exc:
            raise InputError(
                f"EMAIL_SSL_CERTFILE/KEYFILE: cannot load {self.ssl_certfile!r}: {exc}"
            ) from None
        return context

    def _timeouts(self) -> TimeoutSpec:
        return 30.0 if self.timeout is None else self.timeout

    # -- Django's backend API -------------------------------------------------------

    def open(self) -> bool:
        """Open the shared pooled Mailer now (its sessions open on demand). True the
        first time for this backend, as Django's backends say a connection was made."""
        self.mailer.open()
        first, self._opened = not self._opened, True
        return first

    def close(self) -> None:
        """Nothing to do: the sessions stay in the shared pool for the next backend
        (they close when idle, and at exit)."""

    def send_messages(self, email_messages: Sequence[Any]) -> int:
        """Send every message at once; return how many were sent (taken by the server
        for at least one recipient, as Django counts). Raises :class:`DeliveryError`
        when some message reached no recipient, unless ``fail_silently``."""
        if not email_messages:
            return 0
        _refuse_in_loop("EmailBackend.send_messages")
        with self._lock:
            reports = self._send_all(list(email_messages))
            self.last_reports = reports
        for message, report in zip(email_messages, reports, strict=True):
            delivery_report.send(sender=type(self), message=message, report=report, backend=self)
        sent = sum(1 for report in reports if _reached(report))
        failed = [report for report in reports if report and not _reached(report)]
        if failed and not self.fail_silently:
            reasons = "; ".join(
                f"<{result.recipient}> {result.status}: {result.message}"
                for report in failed[:3]
                for result in report.results[:3]
            )
            raise DeliveryError(
                f"{len(failed)} of {len(reports)} message(s) reached no recipient: {reasons}",
                reports=reports,
                sent=sent,
            )
        return sent

    def _send_all(self, email_messages: list[Any]) -> list[Report]:
        # Everything is built before anything is sent: a bad header (Django's
        # BadHeaderError) raises with nothing sent.
        payloads: list[tuple[str, list[str], bytes] | None] = []
        for message in email_messages:
            recipients = [str(r) for r in message.recipients()]
            if not recipients:
                payloads.append(None)  # Django skips these, and does not count them
                continue
            data = _wire_bytes(message.message())
            payloads.append((_envelope_sender(message.from_email), recipients, data))
        deadline = time.monotonic() + self.call_timeout
        futures: list[concurrent.futures.Future[Report] | SMTPError | None] = []
        for payload in payloads:
            if payload is None:
                futures.append(None)
                continue
            sender, recipients, data = payload
            try:
                futures.append(self.mailer.submit(data, sender=sender, recipients=recipients))
            except RunningLoopError:
                raise  # a misuse, whatever fail_silently says
            except SMTPError as exc:
                futures.append(exc)
        pending = [f for f in futures if isinstance(f, concurrent.futures.Future)]
        concurrent.futures.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        reports = []
        for payload, future in zip(payloads, futures, strict=True):
            if payload is None:
                reports.append(Report())
                continue
            recipients = payload[1]
            if isinstance(future, SMTPError):
                reports.append(_failed(recipients, future))
            elif future is not None and future.done() and not future.cancelled():
                error = future.exception()
                if error is None:
                    reports.append(future.result())
                elif isinstance(error, SMTPError):
                    reports.append(_failed(recipients, error))
                else:
                    raise error
            else:
                if future is not None:
                    future.cancel()
                reports.append(
                    _failed(
                        recipients,
                        SMTPTimeoutError(
                            f"not finished within {self.call_timeout:g} s (call_timeout); "
                            "cancelled: the message may have arrived",
                            stage="message",
                        ),
                        unknown=True,
                    )
                )
        return reports


def _refuse_in_loop(call: str) -> None:
    sync._refuse_in_loop(
        f"asmtp.django.{call}",
        "from an async view, `await sync_to_async(send_mail)(...)` (asgiref.sync) runs it "
        "in a thread; or await asmtp's own calls",
    )


def _wire_bytes(mime: Message) -> bytes:
    """The message as it goes on the wire (CRLF line ends, no ">From " mangling), from
    Django's MIME object, whichever ``email`` API it is built with."""
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=False).flatten(mime, linesep="\r\n")
    return out.getvalue()


def _envelope_sender(from_email: str) -> str:
    """The address of a From such as ``"Site <noreply@example.com>"``."""
    _, address = parseaddr(from_email or "")
    if not address:
        raise InputError(f"from_email has no address: {from_email!r}")
    return address


def _failed(recipients: Sequence[str], error: SMTPError, *, unknown: bool = False) -> Report:
    """One result per recipient for a message that failed as a whole: its input was
    refused (as the Mailer reports a job's bad input), or the call ran out of time."""
    results: list[RecipientResult] = []
    for recipient in recipients:
        address = parseaddr(recipient)[1] or recipient
        if isinstance(error, InputError) and error.stage is None:
            result = RecipientResult(address, "permanent", message=error.message, stage="input")
        else:
            result = result_from_error(address, error, dot_sent=unknown)
        results.append(result)
    return Report(tuple(results))
