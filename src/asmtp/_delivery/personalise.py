"""Each job's envelope and message as sent: the sender (the job's, the message's
Sender/From, or a VERP address naming the recipient), the message serialized once
for all jobs that share it, and per-recipient copies (their own Message-ID, one-click
List-Unsubscribe headers, RFC 8058) signed with DKIM over exactly the bytes sent.

Owns personalisation: the templates' checks, VERP's encoding of a recipient, the
per-recipient header fields, and which work jobs that share one message object share
(its parsed sender, its serialization and signature, the base of its copies). The
rules are pure functions; :class:`Personaliser` applies them with those caches. No
I/O: everything here is tested without sockets.
"""

from __future__ import annotations

import string
import urllib.parse
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import make_msgid
from typing import TypeAlias

from .._core.address import check_mailbox, domain_of
from .._core.dkim import DKIM
from .._core.message import envelope_of
from .._core.prepared import MessageIdRemover, PreparedMessage, prepare_message, with_headers
from .._core.template import BoundMessage
from ..errors import InputError

__all__ = [
    "MessageInput",
    "MessageSource",
    "Personaliser",
    "check_personalisation",
    "check_template",
    "envelope_sender",
    "has_field",
    "unsubscribe_headers",
    "verp_sender",
    "verp_token",
]

#: a job's message once rendered
MessageInput: TypeAlias = EmailMessage | bytes | PreparedMessage
#: a job's message: whole, ready bytes, prepared, or a function that renders it (such
#: as a :class:`~asmtp._core.compiled.CompiledMessage` filled for one recipient)
MessageSource: TypeAlias = MessageInput | Callable[[], MessageInput]
# A message as jobs that share it need it: whole (and signed), or the base of
# personalised copies with the domain for their Message-IDs.
_Prepared: TypeAlias = PreparedMessage | tuple[PreparedMessage, str]


def check_template(what: str, template: str, allowed: set[str]) -> None:
    """Refuse (:class:`~asmtp.errors.InputError`) a ``str.format`` template that does
    not parse or uses a field other than ``allowed``."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise InputError(f"{what} template {template!r}: {exc}") from exc
    if not fields <= allowed:
        names = ", ".join("{" + n + "}" for n in sorted(allowed))
        raise InputError(f"{what} template {template!r} may only use {names}")


def check_personalisation(unsubscribe: str | None, verp: str | None) -> None:
    """Refuse an ``unsubscribe`` URL template with fields other than {recipient} and
    {token}, and a ``verp`` sender template that lacks {token} or has other fields."""
    if unsubscribe is not None:
        check_template("unsubscribe", unsubscribe, {"recipient", "token"})
    if verp is not None:
        check_template("verp", verp, {"token"})
        if "{token}" not in verp:
            raise InputError("verp must contain {token}, e.g. bounces+{token}@example.com")


def verp_token(recipient: str) -> str:
    """VERP's encoding of a recipient in a sender's local part: local=domain.

    >>> verp_token("ann@example.org")
    'ann=example.org'
    """
    local, _, domain = recipient.rpartition("@")
    return f"{local}={domain}"


def verp_sender(template: str, recipient: str) -> str:
    """The envelope sender that names ``recipient``, so that its bounces do.

    >>> verp_sender("bounces+{token}@example.com", "ann@example.org")
    'bounces+ann=example.org@example.com'
    """
    return check_mailbox(template.format(token=verp_token(recipient)), field="verp")


def unsubscribe_headers(template: str, recipient: str) -> list[tuple[str, str]]:
    """One-click unsubscribe fields (RFC 8058) for ``recipient``: the URL template's
    {recipient} and {token} filled in, quoted for a URL."""
    url = template.format(
        recipient=urllib.parse.quote(recipient, safe="@"),
        token=urllib.parse.quote(verp_token(recipient), safe="@="),
    )
    return [
        ("List-Unsubscribe", f"<{url}>"),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]


def has_field(prepared: PreparedMessage, name: bytes) -> bool:
    """Whether the header section of ``prepared`` has a field called ``name``
    (lowercase, without the colon). The header section is in the first of the parts."""
    first = prepared.parts[0]
    end = first.find(b"\r\n\r\n")
    head = first[: end + 2 if end >= 0 else len(first)].lower()
    return head.startswith(name + b":") or b"\r\n" + name + b":" in head


def envelope_sender(message: EmailMessage) -> str:
    """The reverse-path a message gives: its Sender, else its From."""
    sender, _ = envelope_of(message, recipients=["placeholder@example.invalid"])
    return sender


class Personaliser:
    """Turns a job's recipient, message and sender into what is sent, with the
    mailer's ``unsubscribe`` and ``verp`` templates and ``dkim`` signer.

    Jobs of a bulk run come in runs that share one message object: the last one seen
    is kept with its parsed sender and its serialization (signed, or the base of
    personalised copies), so such a run serializes and signs it once."""

    def __init__(self, *, unsubscribe: str | None, verp: str | None, dkim: DKIM | None) -> None:
        self.unsubscribe = unsubscribe
        self.verp = verp
        self.dkim = dkim
        self._last_prepared: tuple[object, bool | None, _Prepared] | None = None
        self._last_sender: tuple[object, str] | None = None
        self._remove_message_id = MessageIdRemover()

    def prepare(
        self, recipient: str, message: MessageSource, sender: str | None
    ) -> tuple[str, str, PreparedMessage]:
        """The envelope sender, the recipient and the message to send them. A message
        given as a function is rendered here, for this job alone. Raises
        :class:`~asmtp.errors.InputError` for a job that cannot be sent as given."""
        recipient = check_mailbox(recipient, field="recipient")
        rendered = callable(message)
        if isinstance(message, BoundMessage):
            # a Template's copy for this job: filled into its compiled message
            own_sender, message = message.prepare()
            sender = own_sender if sender is None else sender
        elif callable(message):
            message = message()  # rendered for this job alone
        if sender is None:
            if not isinstance(message, EmailMessage):
                raise InputError("a message given as bytes needs the job's sender")
            sender = self.sender_of(message)
        sender = check_mailbox(sender, field="sender", allow_empty=True)
        if self.unsubscribe is None and self.verp is None:
            return sender, recipient, self._whole(message, sender)
        # A copy personalised for one recipient gets its own Message-ID, so that replies
        # and bounces name the recipient; one rendered for this job keeps its own.
        prepared, domain = self._base(message, sender, keep_id=rendered)
        headers = [] if rendered else [("Message-ID", make_msgid(domain=domain))]
        if self.unsubscribe is not None:
            headers.extend(unsubscribe_headers(self.unsubscribe, recipient))
        if headers:
            prepared = with_headers(prepared, headers)
        if self.dkim is not None:
            prepared = self.dkim.sign(prepared)  # over exactly these bytes, Message-ID too
        if self.verp is not None:
            sender = verp_sender(self.verp, recipient)
        return sender, recipient, prepared

    def sender_of(self, message: EmailMessage) -> str:
        """:func:`envelope_sender`, parsed once for jobs that share the message."""
        last = self._last_sender
        if last is not None and last[0] is message:
            return last[1]
        sender = envelope_sender(message)
        self._last_sender = (message, sender)
        return sender

    def _whole(self, message: MessageInput, sender: str) -> PreparedMessage:
        # Jobs that share one message object share its serialization (and signature).
        last = self._last_prepared
        if last is not None and last[0] is message and isinstance(last[2], PreparedMessage):
            return last[2]
        if isinstance(message, PreparedMessage):
            if self.dkim is None:
                return message
            prepared = message
        else:
            prepared = prepare_message(message, domain=domain_of(sender) if sender else None)
        if self.dkim is not None:
            prepared = self.dkim.sign(prepared)  # once for all who share the message
        self._last_prepared = (message, None, prepared)
        return prepared

    def _base(
        self, message: MessageInput, sender: str, *, keep_id: bool
    ) -> tuple[PreparedMessage, str]:
        """The base of personalised copies: serialized, unsigned, and without its
        Message-ID unless ``keep_id`` (each copy gets a fresh one, on the returned
        domain: the old ID's, else the sender's). Shared by jobs that share the message."""
        last = self._last_prepared
        if last is not None and last[0] is message and last[1] is keep_id:
            assert isinstance(last[2], tuple)
            return last[2]
        sender_domain = domain_of(sender) if sender else "localhost"
        prepared = message
        if not isinstance(prepared, PreparedMessage):
            prepared = prepare_message(prepared, domain=sender_domain)
        if self.unsubscribe is not None and has_field(prepared, b"list-unsubscribe"):
            raise InputError(
                "the message has a List-Unsubscribe field of its own and Mailer(unsubscribe=...)"
                " would add a second one: give one or the other"
            )
        domain = None
        if not keep_id:
            prepared, domain = self._remove_message_id(prepared)
        base = (prepared, domain or sender_domain)
        self._last_prepared = (message, keep_id, base)
        return base
