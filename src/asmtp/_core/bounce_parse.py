"""Reading a message the way :mod:`asmtp._core.bounce` needs it, and no more (layer 1,
sans-IO): bounded parsing (at most :data:`~asmtp._core.bounce.MAX_MESSAGE_BYTES` parsed,
:data:`~asmtp._core.bounce.MAX_PARTS` parts, :data:`~asmtp._core.bounce.MAX_DEPTH` deep),
header fields and part text made printable and cut, addresses (xtext-encoded ones
decoded) and the VERP sender that names the recipient a bounce is about.
"""

from __future__ import annotations

import binascii
import contextlib
import email
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import re
import string
from collections.abc import Iterator

from asmtp._core.sanitize import printable

#: bytes of a message that are parsed; the reports come first, the returned original last
MAX_MESSAGE_BYTES = 1 << 20
#: characters read from one part (text or report fields)
MAX_PART_CHARS = 64 * 1024
#: MIME parts visited in one message, and how deep nested messages are followed
MAX_PARTS = 64
MAX_DEPTH = 8
#: recipients reported from one message
MAX_RECIPIENTS = 1000
MAX_FIELD = 998

#: a returned original (or its headers): its text is the original's, not the report's
_ORIGINAL_TYPES = (
    "message/rfc822",
    "message/global",
    "text/rfc822-headers",
    "message/rfc822-headers",
    "text/global-headers",
)


# --- parsing, bounded -------------------------------------------------------------------


def _parse(message: bytes | email.message.Message | object) -> email.message.Message:
    if isinstance(message, email.message.Message):
        return message
    if isinstance(message, str):
        data = message.encode("utf-8", "surrogateescape")
    elif isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message)
    else:
        raise TypeError(f"not a message: {type(message).__name__}")
    parser = email.parser.BytesParser(policy=email.policy.compat32)
    return parser.parsebytes(data[:MAX_MESSAGE_BYTES])


def _walk(msg: email.message.Message) -> Iterator[email.message.Message]:
    """The message's parts, depth first, at most MAX_PARTS of them and MAX_DEPTH deep;
    a returned original (message/rfc822) is yielded but not entered."""
    stack: list[tuple[email.message.Message, int]] = [(msg, 0)]
    seen = 0
    while stack and seen < MAX_PARTS:
        part, depth = stack.pop()
        seen += 1
        yield part
        if depth >= MAX_DEPTH or _ctype(part) in _ORIGINAL_TYPES:
            continue
        payload = _payload(part)
        if isinstance(payload, list) and part.get_content_maintype() == "multipart":
            children = [p for p in payload[:MAX_PARTS] if isinstance(p, email.message.Message)]
            stack.extend((child, depth + 1) for child in reversed(children))


def _payload(part: email.message.Message) -> object:
    """The part's payload as stored: its sub-messages, or its text with 8-bit bytes
    still surrogate-escaped (``get_payload()`` would read them as ASCII with replacement
    characters, and raises on text that is not surrogate-escaped bytes)."""
    payload = getattr(part, "_payload", None)
    if isinstance(payload, str | list):
        return payload
    try:
        return part.get_payload()
    except Exception:
        return None


def _ctype(part: email.message.Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "text/plain"


def _param(part: email.message.Message, name: str) -> str | None:
    try:
        value = part.get_param(name)
    except Exception:
        return None
    if isinstance(value, tuple):  # RFC 2231 (charset, language, value)
        value = value[2]
    return value.strip().lower() if isinstance(value, str) else None


def _text(value: object) -> str:
    """A raw header value or payload as text: encoded words decoded, 8-bit bytes read
    as UTF-8 where they are that, cut to MAX_PART_CHARS."""
    if not isinstance(value, str):
        value = str(value) if isinstance(value, email.header.Header) else ""
    text = value[:MAX_PART_CHARS]
    if any("\udc80" <= c <= "\udcff" for c in text):  # surrogate-escaped 8-bit bytes
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if "=?" in text:
        with contextlib.suppress(Exception):  # a malformed encoded word stays as it is
            text = str(email.header.make_header(email.header.decode_header(text)))
    return text[:MAX_PART_CHARS]


#: header fields read from one part: a message with more is read up to here
MAX_FIELDS = 500


def _headers(part: email.message.Message, name: str) -> list[str]:
    """Every value of the field ``name``, unfolded, as text."""
    wanted = name.lower()
    values = []
    try:
        for index, (field, value) in enumerate(part.raw_items()):
            if index >= MAX_FIELDS:
                break
            if field.lower() == wanted:
                values.append(" ".join(_text(value).split()))
    except Exception:
        return values
    return values


def _header(part: email.message.Message, name: str) -> str | None:
    values = _headers(part, name)
    return values[0] if values else None


def _clean(value: str | None, limit: int = MAX_FIELD) -> str | None:
    """``value`` stripped, printable and bounded; None when empty."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    value = value.encode("utf-8", "replace").decode("utf-8")  # no lone surrogate left
    return printable(value)


def _part_text(part: email.message.Message) -> str:
    """The first MAX_PART_CHARS of a leaf part, transfer encoding and charset undone."""
    payload = _payload(part)
    if not isinstance(payload, str):
        return ""
    raw = payload[: MAX_PART_CHARS * 2]
    cte = (_header(part, "Content-Transfer-Encoding") or "").lower()
    data: bytes
    try:
        if cte == "base64":
            b64 = re.sub(r"[^A-Za-z0-9+/]", "", raw)
            data = binascii.a2b_base64(b64[: len(b64) - len(b64) % 4])
        elif cte == "quoted-printable":
            data = binascii.a2b_qp(raw.encode("ascii", "surrogateescape"))
        else:
            data = raw.encode("ascii", "surrogateescape")
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return raw[:MAX_PART_CHARS]  # already text (a message parsed from str)
    charset = _param(part, "charset") or "utf-8"
    try:
        text = data.decode(charset, "replace")
    except Exception:  # unknown or non-text codec
        text = data.decode("utf-8", "replace")
    return text[:MAX_PART_CHARS]


# --- addresses and VERP -------------------------------------------------------------------

_XTEXT = re.compile(r"\+([0-9A-F]{2})")


def _xtext_decode(value: str) -> str:
    """RFC 3461 xtext undone (``j+C3+B6ran+2Bx`` -> ``jöran+x``), but only where every
    +HH is a byte xtext must encode and the bytes are UTF-8: "ann+AB@example.org", a
    plain address, stays as it is."""
    if "+" not in value:
        return value
    encoded = [int(h, 16) for h in _XTEXT.findall(value)]
    if not encoded or not all(b < 0x21 or b > 0x7E or b in (0x2B, 0x3D) for b in encoded):
        return value
    out = bytearray()
    pos = 0
    for match in _XTEXT.finditer(value):
        out += value[pos : match.start()].encode("utf-8", "surrogatepass")
        out.append(int(match.group(1), 16))
        pos = match.end()
    out += value[pos:].encode("utf-8", "surrogatepass")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _typed_address(value: str | None) -> str | None:
    """``rfc822; <bob@example.org>`` -> ``bob@example.org`` (the address-type prefix of
    RFC 3464's Final-Recipient and Original-Recipient dropped, xtext undone)."""
    if not value:
        return None
    addr_type, sep, address = value.partition(";")
    if not sep or " " in addr_type.strip() or "@" in addr_type:
        address = value  # no type given
    address = address.strip().strip("<>").strip()
    return _clean(_xtext_decode(address)) if address else None


def _first_address(value: str | None) -> str | None:
    if not value:
        return None
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        return None
    for _, address in pairs:
        if "@" in address:
            return _clean(address)
    return None


def _addresses(value: str | None) -> list[str]:
    if not value:
        return []
    try:
        pairs = email.utils.getaddresses([value])
    except Exception:
        return []
    return [a for _, a in pairs[:MAX_RECIPIENTS] if "@" in a]


def _verp_pattern(template: str) -> re.Pattern[str] | None:
    """The template as a pattern that captures the token, or None without ``{token}``."""
    pattern = []
    tokens = 0
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError:
        return None
    for literal, field, _, _ in fields:
        pattern.append(re.escape(literal))
        if field == "token":
            pattern.append(r"(?P<token>[^@\s]+)" if tokens == 0 else r"[^@\s]+")
            tokens += 1
        elif field is not None:
            return None
    return re.compile("".join(pattern), re.IGNORECASE) if tokens else None


#: where a bounce carries the address it was sent to (its envelope recipient)
_ENVELOPE_FIELDS = ("Delivered-To", "X-Original-To", "Envelope-To", "X-Envelope-To", "To", "Cc")


def _verp_recipient(msg: email.message.Message, verp: str | None) -> str | None:
    """The original recipient that the VERP address this message was sent to names."""
    if not verp:
        return None
    pattern = _verp_pattern(verp)
    if pattern is None:
        return None
    return _verp_match(msg, pattern, _ENVELOPE_FIELDS)


def _verp_match(
    msg: email.message.Message, pattern: re.Pattern[str], fields: tuple[str, ...]
) -> str | None:
    for field in fields:
        for value in _headers(msg, field):
            for address in _addresses(value):
                match = pattern.fullmatch(address.strip())
                if match:
                    local, at, domain = match.group("token").rpartition("=")
                    if at and local and domain:
                        return _clean(f"{local}@{domain}")
    return None
