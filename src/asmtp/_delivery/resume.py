"""What a resumed run does with a job, decided from what the journal says last about
the job's key, and which run a job says the journal belongs to.

Owns the resume rules, as pure functions (the journal is read by
:mod:`asmtp._delivery.journal`, results are recorded by the mailer):

* a key whose last line is a delivered or permanent result was done in an earlier
  run: it is skipped;
* a key whose last line is "dot", or an ``unknown`` result, may have been delivered
  (RFC 5321 section 6.1): it is reported ``unknown``, not sent again, unless
  ``Retry(retry_unknown=True)`` says to send it anyway;
* a key whose last line is a hard "bounce" (recorded after its run by
  :func:`~asmtp._delivery.journal.record_bounce`) is reported ``permanent``
  ("bounced: 5.1.1 ..."), not sent again;
* any other key (no line, a transient result) is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from email.message import EmailMessage
from typing import Any, Literal

from .._core.prepared import PreparedMessage, prepare_message
from ..results import RecipientResult
from .journal_format import JournalEntry, JournalIdentity, message_digest
from .personalise import MessageSource, envelope_sender

__all__ = [
    "ResumeAction",
    "bounced_in_earlier_run",
    "identity_of",
    "resume_action",
    "suppressed",
    "unknown_from_earlier_run",
]

#: "send" the job; "skip" it (done in an earlier run); "unknown": report it as
#: possibly delivered without sending it; "bounced": report its recorded hard bounce
ResumeAction = Literal["send", "skip", "unknown", "bounced"]


def resume_action(prior: JournalEntry | None, *, retry_unknown: bool) -> ResumeAction:
    """What to do with a job whose key's last journal line is ``prior`` (None: the
    journal says nothing of it). ``retry_unknown``: send again a job whose dot may
    have arrived (:attr:`asmtp.Retry.retry_unknown`)."""
    if prior is None:
        return "send"
    if prior.event == "bounce":
        return "bounced"
    if prior.event == "result" and prior.status in ("delivered", "permanent"):
        return "skip"
    if (prior.event == "dot" or prior.status == "unknown") and not retry_unknown:
        return "unknown"
    return "send"


def unknown_from_earlier_run(recipient: str, prior: JournalEntry, key: Any) -> RecipientResult:
    """The result of a job not sent again because its dot went out in an earlier run
    with no reply recorded (on ``prior.host``, when the journal knows it)."""
    return RecipientResult(
        recipient=recipient,
        status="unknown",
        stage="message",
        message="the end-of-data dot was sent in an earlier run and no reply "
        "was recorded: the message may have been delivered",
        host=prior.host,
        key=key,
    )


def bounced_in_earlier_run(recipient: str, prior: JournalEntry, key: Any) -> RecipientResult:
    """The result of a job not sent again because a hard bounce was recorded for it
    after an earlier run."""
    said = " ".join(part for part in (prior.status, prior.detail) if part)
    return RecipientResult(
        recipient=recipient,
        status="permanent",
        enhanced_status=prior.status,
        stage="message",
        message=f"bounced: {said or 'a hard bounce was recorded in the journal'}",
        key=key,
    )


def suppressed(recipient: str, why: str, key: Any) -> RecipientResult:
    """The result of a job not sent because its address is on the suppression list
    (``why``: the reason recorded there)."""
    return RecipientResult(
        recipient=recipient,
        status="permanent",
        message=f"suppressed: {why}",
        stage="input",
        key=key,
    )


def identity_of(
    message: MessageSource,
    sender: str | None,
    *,
    sender_of: Callable[[EmailMessage], str] = envelope_sender,
) -> JournalIdentity:
    """The run a job belongs to, when the caller named none: its envelope ``sender``
    (else the message's Sender/From, read with ``sender_of``) and a digest of its
    message. What cannot be known (a message that fails to render or serialize: that
    job fails on its own) is left None, and so not compared."""
    digest = None
    try:
        if callable(message):
            message = message()
        if sender is None and isinstance(message, EmailMessage):
            sender = sender_of(message)
        if isinstance(message, PreparedMessage):
            digest = message_digest(message.data, prepared=True)
        elif isinstance(message, EmailMessage):
            digest = message_digest(prepare_message(message).data, prepared=True)
        else:
            digest = message_digest(bytes(message))
    except Exception:  # this job fails on its own; only what is known is compared
        pass
    return JournalIdentity(sender=sender, message=digest)
