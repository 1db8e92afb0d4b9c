"""Classifying what comes back: bounces, complaints and automatic replies. No I/O.

This module owns reading a returned message into one :class:`Bounce` per recipient it
reports on, in this order (the first that recognises the message wins):

1. a DSN (RFC 3464, ``multipart/report; report-type=delivery-status``): one Bounce per
   per-recipient block, its ``Action``, ``Status``, ``Diagnostic-Code`` and ``Remote-MTA``,
   and the per-message ``Original-Envelope-Id``. A DSN is also ``Auto-Submitted``: the
   DSN wins. Blocks whose Action is ``delivered``, ``relayed`` or ``expanded`` are kept,
   as kind "unknown" with their action, so that a success report (NOTIFY=SUCCESS) is
   told apart from a message nothing recognised; callers act on "hard" and "soft".
2. a feedback report (ARF, RFC 5965, ``report-type=feedback-report``): kind "complaint"
   for each ``Original-Rcpt-To`` (else the VERP address, else the attached original's
   ``To``); ``Feedback-Type: not-spam`` is no complaint ("unknown").
3. a non-standard bounce: from MAILER-DAEMON or postmaster (or with a null Return-Path,
   ``X-Failed-Recipients``, a bounce subject, qmail's "Hi. This is the qmail-send
   program") whose text carries an SMTP reply code, an enhanced status code or a phrase
   such as "user unknown" or "mailbox full": source "text". Recipient blocks as Postfix's
   older form (``<bob@example.org>: host ... said: 550 5.1.1 ...``), qmail's
   (``<bob@example.org>:`` then the reason and ``(#5.1.1)``) and Exim's (an indented
   address, its reason below) write them.
4. an automatic reply (RFC 3834 ``Auto-Submitted`` other than ``no``, ``X-Autoreply``,
   ``X-Autorespond``, ``Precedence: auto_reply``, subjects such as "Out of Office" or
   "Automatic reply"): kind "auto-reply".
5. a message sent to the run's VERP address that nothing above recognised: kind
   "unknown", source "verp", with the recipient VERP names.

Kinds: status 5.x.x is "hard" and 4.x.x or Action ``delayed`` "soft", except X.2.2
(mailbox full), which RFC 3463 says is "a persistent transient failure": "soft" even as
5.2.2, so that a full mailbox is not suppressed for ever.

Which recipient: a DSN's ``Original-Recipient`` is the address as asmtp gave it (ORCPT),
so it comes first; VERP comes next, since asmtp encoded it into the envelope sender
itself, but it names one recipient per message, so it is used only when the DSN reports
on one recipient; ``Final-Recipient`` comes last, as the remote side may have rewritten
it (aliases, forwarding) into an address that is not in the sender's list.

Everything is bounded (:mod:`asmtp._core.bounce_parse` holds the limits and the reading):
at most 1 MiB of a message is parsed, 64 K characters of each part read, 64 parts visited, and
text from the message is made printable (:func:`asmtp._core.sanitize.printable`) and cut
to :data:`MAX_DIAGNOSTIC` characters. Malformed input gives kind "unknown", never an
exception.
"""

from __future__ import annotations

import email
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from .bounce_parse import (
    _ORIGINAL_TYPES,
    MAX_FIELDS,
    MAX_PART_CHARS,
    MAX_RECIPIENTS,
    _addresses,
    _clean,
    _ctype,
    _first_address,
    _header,
    _headers,
    _param,
    _parse,
    _part_text,
    _payload,
    _text,
    _typed_address,
    _verp_match,
    _verp_pattern,
    _verp_recipient,
    _walk,
    _xtext_decode,
)

__all__ = ["Bounce", "BounceKind", "classify"]

BounceKind = Literal["hard", "soft", "complaint", "auto-reply", "unknown"]
BounceSource = Literal["dsn", "arf", "auto-reply", "verp", "text"]

#: characters kept of a diagnostic, an address or an id
MAX_DIAGNOSTIC = 500


@dataclass(frozen=True, slots=True)
class Bounce:
    """What one returned message says about one recipient."""

    #: the original recipient this bounce is about (DSN Original-Recipient, VERP, DSN
    #: Final-Recipient, ARF Original-Rcpt-To); None when it cannot be told
    recipient: str | None
    kind: BounceKind
    #: enhanced status "5.1.1" when known
    status: str | None
    #: Diagnostic-Code text / the server's words, made printable
    diagnostic: str | None
    #: DSN Action: failed, delayed, delivered, relayed, expanded
    action: str | None
    #: DSN Original-Envelope-Id
    envelope_id: str | None
    #: the bounce message's own Message-ID
    message_id: str | None
    #: how the message was recognised
    source: BounceSource


def classify(message: bytes | email.message.Message, *, verp: str | None = None) -> list[Bounce]:
    """One Bounce per recipient the message reports on (a DSN may list several);
    ``[Bounce(recipient=None, kind="unknown", ...)]`` for a message that is no bounce it
    recognises. ``verp``: the sender template the run used (e.g.
    ``"bounces+{token}@example.com"``, as ``Mailer(verp=...)`` takes it): the bounce's
    Delivered-To / X-Original-To / To decoded back to the original recipient. Never
    raises on malformed input: a message it cannot parse is one Bounce of kind
    "unknown".

    >>> dsn = (b"From: MAILER-DAEMON@mx.example.net\\r\\n"
    ...        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\\r\\n"
    ...        b"\\r\\n--b\\r\\nContent-Type: message/delivery-status\\r\\n\\r\\n"
    ...        b"Reporting-MTA: dns; mx.example.net\\r\\n\\r\\n"
    ...        b"Final-Recipient: rfc822; bob@example.org\\r\\nAction: failed\\r\\n"
    ...        b"Status: 5.1.1\\r\\n\\r\\n--b--\\r\\n")
    >>> [(b.recipient, b.kind, b.status) for b in classify(dsn)]
    [('bob@example.org', 'hard', '5.1.1')]
    """
    message_id: str | None = None
    try:
        msg = _parse(message)
        message_id = _clean(_header(msg, "Message-ID"))
        return _classify(msg, verp, message_id)
    except Exception:  # malformed beyond what the email package tolerates
        return [_unknown(message_id)]


def _unknown(message_id: str | None, recipient: str | None = None) -> Bounce:
    source: BounceSource = "verp" if recipient is not None else "text"
    return Bounce(recipient, "unknown", None, None, None, None, message_id, source)


def _classify(msg: email.message.Message, verp: str | None, message_id: str | None) -> list[Bounce]:
    verp_rcpt = _verp_recipient(msg, verp)
    report_type = _param(msg, "report-type")
    parts = list(_walk(msg))
    status_parts = [p for p in parts if _ctype(p) in _DSN_TYPES]
    if status_parts or report_type == "delivery-status":
        found = _from_dsn(msg, status_parts, verp_rcpt, message_id)
        if found:
            return found
    feedback = [p for p in parts if _ctype(p) == "message/feedback-report"]
    if feedback:
        return _from_arf(feedback[0], parts, verp, verp_rcpt, message_id)
    auto = _is_auto_reply(msg)
    if _looks_bounced(msg, auto):
        found = _from_text(msg, parts, verp_rcpt, message_id)
        if found:
            return found
    if auto:
        rcpt = verp_rcpt or _first_address(_header(msg, "From"))
        return [Bounce(rcpt, "auto-reply", None, None, None, None, message_id, "auto-reply")]
    return [_unknown(message_id, verp_rcpt)]


# --- DSN (RFC 3464) -----------------------------------------------------------------------

_DSN_TYPES = ("message/delivery-status", "message/global-delivery-status")
_FIELD_LINE = re.compile(r"([A-Za-z][A-Za-z0-9-]*)[ \t]*:[ \t]*(.*)")
_STATUS = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def _blocks_from_text(text: str) -> Iterator[dict[str, str]]:
    """Header-like blocks separated by blank lines, folded lines joined; the first value
    of each field kept."""
    block: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines()[: MAX_RECIPIENTS * 8]:
        if not line.strip():
            if block:
                yield block
            block, last = {}, None
        elif line[0] in " \t" and last is not None:
            block[last] = f"{block[last]} {line.strip()}"[:MAX_PART_CHARS]
        else:
            match = _FIELD_LINE.match(line)
            if match:
                last = match.group(1).lower()
                block.setdefault(last, match.group(2).strip())
                if block[last] != match.group(2).strip():
                    last = None  # a repeated field: keep the first
    if block:
        yield block


def _blocks(part: email.message.Message, depth: int = 0) -> Iterator[dict[str, str]]:
    """The field blocks of a delivery-status (or feedback-report) part, as the email
    package parsed them (one sub-message per block) or from its text."""
    payload = _payload(part)
    if isinstance(payload, str):
        yield from _blocks_from_text(_part_text(part))
        return
    if not isinstance(payload, list) or depth > 2:
        return
    for sub in payload[: MAX_RECIPIENTS + 1]:  # the per-message block, then recipients
        if not isinstance(sub, email.message.Message):
            continue
        block: dict[str, str] = {}
        try:
            items = list(sub.raw_items())[:MAX_FIELDS]
        except Exception:
            items = []
        for name, value in items:
            block.setdefault(name.lower(), " ".join(_text(value).split()))
        if block:
            yield block
        rest = _payload(sub)  # the email package reads a body after the first block
        if isinstance(rest, str) and rest.strip():
            yield from _blocks_from_text(_part_text(sub))
        elif isinstance(rest, list):
            yield from _blocks(sub, depth + 1)


def _kind(status: str | None, action: str | None) -> BounceKind:
    if action in ("delivered", "relayed", "expanded"):
        return "unknown"
    if action == "delayed":
        return "soft"
    if status is None:
        return "hard" if action == "failed" else "unknown"
    if status.startswith("4") or status[1:].startswith(".2.2"):
        return "soft"
    if status.startswith("5"):
        return "hard"
    return "hard" if action == "failed" else "unknown"


def _status(value: str | None) -> str | None:
    match = _STATUS.search(value or "")
    return match.group(0) if match else None


def _diagnostic(value: str | None, remote_mta: str | None) -> str | None:
    if value:
        kind, sep, text = value.partition(";")
        if sep and kind.strip().lower() in ("smtp", "x-unix", "x-postfix", "x-local", "lmtp"):
            value = text
    if remote_mta and value:
        value = f"{value.strip()} (remote MTA {remote_mta})"
    elif remote_mta:
        value = f"remote MTA {remote_mta}"
    return _clean(value, MAX_DIAGNOSTIC)


def _from_dsn(
    msg: email.message.Message,
    status_parts: list[email.message.Message],
    verp_rcpt: str | None,
    message_id: str | None,
) -> list[Bounce]:
    blocks: list[dict[str, str]] = []
    for part in status_parts[:4]:
        blocks.extend(_blocks(part))
    if not blocks:  # a report-type=delivery-status whose fields came as text/plain
        for part in _walk(msg):
            if _ctype(part) == "text/plain":
                text = _part_text(part)
                if re.search(r"(?im)^(final|original)-recipient\s*:", text):
                    blocks.extend(_blocks_from_text(text))
                    break
    per_message = [b for b in blocks if not ({"final-recipient", "original-recipient"} & b.keys())]
    per_recipient = [b for b in blocks if {"final-recipient", "original-recipient"} & b.keys()]
    envelope_id = None
    for block in per_message:
        if "original-envelope-id" in block:
            envelope_id = _clean(_xtext_decode(block["original-envelope-id"]))
            break
    single = len(per_recipient) == 1
    found = []
    for block in per_recipient[:MAX_RECIPIENTS]:
        action = (block.get("action") or "").strip().lower().split(" ")[0] or None
        diagnostic_code = block.get("diagnostic-code")
        status = _status(block.get("status")) or _status(diagnostic_code)
        recipient = (
            _typed_address(block.get("original-recipient"))
            or (verp_rcpt if single else None)
            or _typed_address(block.get("final-recipient"))
        )
        remote = _typed_address(block.get("remote-mta"))
        found.append(
            Bounce(
                recipient,
                _kind(status, _clean(action)),
                status,
                _diagnostic(diagnostic_code, remote),
                _clean(action),
                envelope_id,
                message_id,
                "dsn",
            )
        )
    return found


# --- ARF (RFC 5965) -----------------------------------------------------------------------

_NOT_COMPLAINTS = ("not-spam",)


def _from_arf(
    report: email.message.Message,
    parts: list[email.message.Message],
    verp: str | None,
    verp_rcpt: str | None,
    message_id: str | None,
) -> list[Bounce]:
    fields: dict[str, str] = {}
    rcpt_to: list[str] = []
    for block in _blocks(report):
        for name, value in block.items():
            fields.setdefault(name, value)
    # Original-Rcpt-To may repeat; the parsed blocks keep the first, so read them all
    for sub in _sub_messages(report):
        rcpt_to.extend(_headers(sub, "Original-Rcpt-To"))
    if not rcpt_to and "original-rcpt-to" in fields:
        rcpt_to.append(fields["original-rcpt-to"])
    feedback_type = (fields.get("feedback-type") or "").strip().lower() or None
    kind: BounceKind = "unknown" if feedback_type in _NOT_COMPLAINTS else "complaint"
    diagnostic = _clean(f"feedback-type {feedback_type}" if feedback_type else None)
    recipients = [r for r in (_typed_address(v) for v in rcpt_to) if r]
    if not recipients:
        original = next((p for p in parts if _ctype(p) in _ORIGINAL_TYPES), None)
        headers = _original_headers(original) if original is not None else None
        pattern = _verp_pattern(verp) if verp else None
        rcpt = verp_rcpt
        if rcpt is None and headers is not None and pattern is not None:
            rcpt = _verp_match(headers, pattern, ("Return-Path", "From", "Sender"))
        if rcpt is None and headers is not None:
            rcpt = _first_address(_header(headers, "To"))
        recipients = [rcpt] if rcpt else []
    if not recipients:
        return [Bounce(None, kind, None, diagnostic, None, None, message_id, "arf")]
    return [
        Bounce(r, kind, None, diagnostic, None, None, message_id, "arf")
        for r in recipients[:MAX_RECIPIENTS]
    ]


def _sub_messages(part: email.message.Message) -> list[email.message.Message]:
    payload = _payload(part)
    if isinstance(payload, list):
        return [p for p in payload[:MAX_RECIPIENTS] if isinstance(p, email.message.Message)]
    return []


def _original_headers(part: email.message.Message) -> email.message.Message | None:
    """The returned original's header: the attached message, or text/rfc822-headers
    parsed as one."""
    subs = _sub_messages(part)
    if subs:
        return subs[0]
    text = _part_text(part)
    if not text:
        return None
    return email.parser.Parser(policy=email.policy.compat32).parsestr(text, headersonly=True)


# --- automatic replies (RFC 3834) ---------------------------------------------------------

_AUTO_SUBJECT = re.compile(
    r"^\s*(out of (the )?office|automatic reply|auto(matic)?[- ]?(reply|response)|auto:|"
    r"away from (the|my) office|on vacation|vacation reply|abwesenheitsnotiz|"
    r"r[ée]ponse automatique|respuesta autom[áa]tica)",
    re.IGNORECASE,
)


def _is_auto_reply(msg: email.message.Message) -> bool:
    submitted = (_header(msg, "Auto-Submitted") or "").lower().split(";")[0].strip()
    if submitted and submitted != "no":
        return True
    if _header(msg, "X-Autoreply") or _header(msg, "X-Autorespond"):
        return True
    precedence = (_header(msg, "Precedence") or "").lower()
    if precedence == "auto_reply":
        return True
    return bool(_AUTO_SUBJECT.match(_header(msg, "Subject") or ""))


# --- non-standard bounces -----------------------------------------------------------------

_DAEMONS = re.compile(r"(mailer-daemon|postmaster|mail-daemon|mail delivery (subsystem|system))")
_BOUNCE_SUBJECT = re.compile(
    r"(undeliver|undelivered mail|returned mail|delivery (status notification|failure|"
    r"has failed|failed)|mail delivery failed|failure notice|could not be delivered|"
    r"non[- ]?delivery|delivery problem|warning: could not send)",
    re.IGNORECASE,
)
_QMAIL = "This is the qmail-send program"
#: where a bounce's own words end and the returned original begins
_ORIGINAL_MARKERS = re.compile(
    r"^\s*(-+ ?Below this line is a copy of the message|-+ ?This is a copy of the message|"
    r"-+ ?Original message|-+ ?Forwarded message|-+ ?The header of the original message)",
    re.IGNORECASE | re.MULTILINE,
)
_REPLY_CODE = re.compile(r"(?:^|[\s:(\"])([45][0-5]\d)(?:[ -]|$)", re.MULTILINE)
_HARD_PHRASES = re.compile(
    r"(user unknown|unknown user|no such (user|mailbox|recipient|address)|"
    r"mailbox (not found|unavailable|does not exist)|does not exist|address rejected|"
    r"no mailbox here by that name|invalid (recipient|mailbox|address)|"
    r"recipient (not found|unknown|rejected)|unknown (recipient|local part|address)|"
    r"account (disabled|has been disabled|closed)|unrouteable address|host not found|"
    r"i've given up|permanent (error|failure))",
    re.IGNORECASE,
)
_SOFT_PHRASES = re.compile(
    r"(mailbox (is )?full|over ?quota|quota exceeded|exceeded (the )?(storage|quota)|"
    r"insufficient (system )?storage|delivery (is )?delayed|will (keep|continue) trying|"
    r"still trying|temporar(il)?y (failure|error|unavailable)|try again later)",
    re.IGNORECASE,
)
#: a recipient line: "<bob@example.org>: ..." at the start of a line (Postfix, qmail;
#: an indented one continues the line before) or an indented bare address alone on its
#: line (Exim)
_RCPT_LINE = re.compile(
    r"^(?:<(?P<a>[^<>\s]+@[^<>\s]+)>(?:\s*\([^)]*\))?\s*:|"
    r"\s+(?P<b>[^<>\s:]+@[^<>\s:]+)\s*$)"
)


def _looks_bounced(msg: email.message.Message, auto: bool) -> bool:
    sender = " ".join(filter(None, (_header(msg, "From"), _header(msg, "Sender")))).lower()
    if _DAEMONS.search(sender) or _header(msg, "X-Failed-Recipients"):
        return True
    if _BOUNCE_SUBJECT.search(_header(msg, "Subject") or ""):
        return True
    return_path = _header(msg, "Return-Path")
    return not auto and return_path is not None and return_path.strip() in ("<>", "")


def _bounce_text(parts: list[email.message.Message]) -> str:
    """The bounce's own words: its text/plain parts up to the returned original."""
    texts = []
    for part in parts:
        if _ctype(part) == "text/plain":
            texts.append(_part_text(part))
        if len(texts) >= 4:
            break
    text = "\n\n".join(texts)[:MAX_PART_CHARS]
    marker = _ORIGINAL_MARKERS.search(text)
    return text[: marker.start()] if marker else text


def _verdict(text: str) -> tuple[BounceKind, str | None] | None:
    """Kind and enhanced status of a piece of bounce text, None when it says nothing."""
    statuses = [m.group(0) for m in _STATUS.finditer(text) if m.group(1) != "2"]
    status = next((s for s in statuses if s[0] == "5"), None) or next(iter(statuses), None)
    if status is not None:
        return _kind(status, "failed"), status
    codes = [m.group(1) for m in _REPLY_CODE.finditer(text)]
    soft_words = _SOFT_PHRASES.search(text) is not None
    if any(c.startswith("5") for c in codes):
        return ("soft" if soft_words else "hard"), None
    if codes:
        return "soft", None
    if soft_words:
        return "soft", None
    if _HARD_PHRASES.search(text):
        return "hard", None
    return None


def _recipient_blocks(text: str) -> list[tuple[str, str]]:
    """(address, the lines about it) for each recipient the text lists."""
    blocks: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in text.splitlines()[:2000]:
        match = _RCPT_LINE.match(line)
        if match and len(blocks) < MAX_RECIPIENTS:
            address = match.group("a") or match.group("b")
            current = [line[match.end() :].strip()]
            blocks.append((address, current))
        elif not line.strip():
            current = None
        elif current is not None:
            current.append(line.strip())
    return [(a, " ".join(x for x in lines if x)) for a, lines in blocks]


def _from_text(
    msg: email.message.Message,
    parts: list[email.message.Message],
    verp_rcpt: str | None,
    message_id: str | None,
) -> list[Bounce]:
    text = _bounce_text(parts)
    found = []
    blocks = _recipient_blocks(text)
    if verp_rcpt is not None:  # VERP names the one recipient: keep what is said about it
        mine = [b for b in blocks if b[0].lower() == verp_rcpt.lower()]
        blocks = mine or ([(verp_rcpt, blocks[0][1])] if len(blocks) == 1 else [])
    for address, about in blocks:
        verdict = _verdict(about)
        if verdict is not None:
            kind, status = verdict
            found.append(
                Bounce(
                    _clean(address),
                    kind,
                    status,
                    _clean(about, MAX_DIAGNOSTIC),
                    None,
                    None,
                    message_id,
                    "text",
                )
            )
    if found:
        return found
    verdict = _verdict(text)
    if verdict is None:
        return []
    kind, status = verdict
    failed = [a for v in _headers(msg, "X-Failed-Recipients") for a in _addresses(v) if "@" in a]
    recipients = [verp_rcpt] if verp_rcpt else [_clean(a) for a in failed] or [None]
    diagnostic = _clean(_diagnostic_line(text), MAX_DIAGNOSTIC)
    return [
        Bounce(r, kind, status, diagnostic, None, None, message_id, "text")
        for r in recipients[:MAX_RECIPIENTS]
    ]


def _diagnostic_line(text: str) -> str | None:
    """The line of the text that carries a status or reply code, else its first words."""
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    for line in lines:
        if _STATUS.search(line) or _REPLY_CODE.search(line):
            return line
    for line in lines:
        if _HARD_PHRASES.search(line) or _SOFT_PHRASES.search(line):
            return line
    return lines[0] if lines else None
