"""Address and header checks (layer 1, sans-IO).

This module owns every rule about what an address or a header may contain before it
reaches the wire: parsing To/Cc/From style lists, validating envelope addresses
(``MAIL FROM``/``RCPT TO`` addr-specs), converting internationalized domains to their
ASCII form, deciding whether an address needs SMTPUTF8, and refusing header injection.
Every refusal is an :class:`~asmtp.errors.InputError` naming the offending field and
value, raised before any connection is made.

Line breaks: besides CR, LF and NUL, every character that Python's ``str.splitlines``
treats as a line boundary (VT, FF, FS, GS, RS, NEL, U+2028, U+2029) is refused in
addresses and headers, because the email package would otherwise fold on it or refuse
it later with a bare ``ValueError``.
"""

from __future__ import annotations

import inspect
import ipaddress
import re
from collections.abc import Iterable
from email.utils import getaddresses

import idna

from ..errors import InputError

__all__ = [
    "check_header",
    "check_mailbox",
    "domain_of",
    "needs_smtputf8",
    "parse_address_list",
    "split_mailbox",
    "unique_addresses",
]

# CR, LF and NUL, plus every other character str.splitlines() breaks a line on.
_FORBIDDEN = re.compile("[\r\n\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# RFC 5322 2.2, 3.2.5: a field body is printable characters and WSP (RFC 6532 adds
# UTF-8); other C0 controls, DEL and the C1 controls (CSI is U+009B) are refused.
_HEADER_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")

# A lone addr-spec ("jack@example.org", "user@[192.0.2.1]") needs no list parsing.
_BARE_ADDR = re.compile(r'[^\s<>()\[\],;:"\\@]+@(?:[^\s<>()\[\],;:"\\@]+|\[[^\s\[\]\\]+\])')

# RFC 5321 4.1.2: characters that cannot appear in an unquoted local part.
_LOCAL_SPECIALS = re.compile(r'[\x00-\x20\x7f<>()\[\]\\,;:@"]')
# Inside a quoted local part: qtext or quoted-pair, no controls other than via escapes.
_QUOTED_LOCAL = re.compile(r'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*"')
# LDH labels (underscore tolerated: it is found in real mail domains).
_ASCII_DOMAIN = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
# The common case in one match: an unquoted ASCII local part (no specials, no controls,
# no space) and an LDH domain. Such an address passes every check below unchanged, so
# it is returned as it is; anything else takes the full checks.
_PLAIN_ADDR = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")

# getaddresses() grew strict parsing (on by default) in 3.13 and security releases of
# 3.11/3.12; ask for it explicitly where it exists.
_STRICT_GETADDRESSES = "strict" in inspect.signature(getaddresses).parameters


def _refuse(field: str, value: object, reason: str) -> InputError:
    return InputError(f"{field}: {value!r} {reason}")


def _check_no_line_breaks(field: str, value: str) -> None:
    if _FORBIDDEN.search(value):
        raise _refuse(field, value, "contains CR, LF, NUL or another line-breaking character")
    if _SURROGATE.search(value):
        raise _refuse(field, value, "contains a lone surrogate (not encodable text)")


def split_mailbox(addr: str) -> tuple[str, str]:
    """Split an addr-spec at its one '@' into (local part, domain), unchecked.

    >>> split_mailbox('"john doe"@example.org')
    ('"john doe"', 'example.org')
    """
    local, _, domain = addr.rpartition("@")
    return local, domain


def _normalize_domain(field: str, addr: str, domain: str) -> str:
    """Check a domain; return it with a non-ASCII domain converted to IDNA (A-labels)."""
    if domain.startswith("["):
        # RFC 5321 4.1.3 address literal: IPv4 or "IPv6:" followed by an IPv6 address.
        inner = domain[1:-1] if domain.endswith("]") else ""
        try:
            if inner[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(inner[5:])
            else:
                ipaddress.IPv4Address(inner)
        except ValueError:
            raise _refuse(field, addr, "has an invalid address literal") from None
        return domain
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError) as exc:
            raise _refuse(field, addr, f"has a domain that is not valid IDNA ({exc})") from None
    if not _ASCII_DOMAIN.fullmatch(domain):
        raise _refuse(field, addr, "has an invalid domain")
    return domain


def check_mailbox(addr: str, *, field: str, allow_empty: bool = False) -> str:
    """Validate one envelope address (an addr-spec, no display name, no angle brackets).

    Returns the address normalized: a non-ASCII domain becomes its IDNA (punycode) form,
    so it alone does not need SMTPUTF8; a non-ASCII local part is kept as it is.
    ``""`` (the null reverse-path of RFC 5321 4.5.5) is accepted only with
    ``allow_empty``.

    >>> check_mailbox("jack@example.org", field="to")
    'jack@example.org'
    >>> check_mailbox("jörg@bücher.example", field="to")
    'jörg@xn--bcher-kva.example'
    >>> check_mailbox('"john doe"@example.org', field="to")
    '"john doe"@example.org'
    >>> check_mailbox("postmaster@[192.0.2.1]", field="to")
    'postmaster@[192.0.2.1]'
    >>> check_mailbox("", field="sender", allow_empty=True)
    ''
    >>> check_mailbox("jack@example.org\\r\\nRCPT TO:<x@evil.example>", field="to")
    Traceback (most recent call last):
    ...
    asmtp.errors.InputError: to: 'jack@example.org\\r\\nRCPT TO:<x@evil.example>' contains CR, LF, NUL or another line-breaking character
    """  # noqa: E501
    if not isinstance(addr, str):
        raise _refuse(field, addr, "is not a string")
    if _PLAIN_ADDR.fullmatch(addr):
        return addr
    return _check_mailbox_fully(addr, field, allow_empty)


def _check_mailbox_fully(addr: str, field: str, allow_empty: bool) -> str:
    """Every check of :func:`check_mailbox`, for an address the fast match did not take."""
    _check_no_line_breaks(field, addr)
    if addr == "":
        if allow_empty:
            return ""
        raise InputError(f"{field}: an address is required here (got an empty string)")
    if addr.count("@") != 1:
        raise _refuse(field, addr, "must contain exactly one '@'")
    local, domain = split_mailbox(addr)
    if not local:
        raise _refuse(field, addr, "has an empty local part")
    if not domain:
        raise _refuse(field, addr, "has an empty domain")
    if local.startswith('"'):
        if not _QUOTED_LOCAL.fullmatch(local):
            raise _refuse(field, addr, "has a malformed quoted local part")
    elif _LOCAL_SPECIALS.search(local):
        raise _refuse(field, addr, "has spaces, control characters or specials in its local part")
    return f"{local}@{_normalize_domain(field, addr, domain)}"


def _strip_comments(field: str, value: str) -> tuple[str, int]:
    """Replace RFC 5322 comments with a space; count the top-level list items.

    Commas inside quoted strings, comments and angle brackets do not separate items.
    Unbalanced quotes, parentheses or angle brackets are refused: a lax parser would
    otherwise guess, and a guess can deliver to an address the caller never meant.
    """
    out: list[str] = []
    items = 1
    depth = 0  # comment nesting
    in_quote = in_angle = False
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "\\" and (in_quote or depth):
            if depth == 0:
                out.append(value[i : i + 2])
            i += 2
            continue
        if depth:
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if depth == 0:
                    out.append(" ")
        elif in_quote:
            out.append(c)
            in_quote = c != '"'
        elif c == "(":
            depth = 1
        elif c == ")":
            raise _refuse(field, value, "has an unbalanced ')'")
        else:
            if c == '"':
                in_quote = True
            elif c == "<":
                if in_angle:
                    raise _refuse(field, value, "has a nested '<'")
                in_angle = True
            elif c == ">":
                if not in_angle:
                    raise _refuse(field, value, "has an unbalanced '>'")
                in_angle = False
            elif c == "," and not in_angle:
                items += 1
            out.append(c)
        i += 1
    if depth:
        raise _refuse(field, value, "has an unclosed comment")
    if in_quote:
        raise _refuse(field, value, "has an unclosed quoted string")
    if in_angle:
        raise _refuse(field, value, "has an unclosed '<'")
    return "".join(out), items


def _parse_one(field: str, value: str) -> list[tuple[str, str]]:
    """Parse one comma list (a str with no line breaks, not blank)."""
    stripped = value.strip()
    if _BARE_ADDR.fullmatch(stripped):
        return [("", check_mailbox(stripped, field=field))]
    text, expected = _strip_comments(field, value)
    pairs = getaddresses([text], strict=True) if _STRICT_GETADDRESSES else getaddresses([text])
    # One result per top-level item, each with an address: anything else means the
    # parser had to guess (e.g. "a@x.example<b@y.example>").
    if len(pairs) != expected or any(not addr for _, addr in pairs):
        raise _refuse(field, value, "is not a valid address list")
    result = []
    position = 0
    for name, addr in pairs:
        # Each addr-spec must be written, as is and in order, in the input: the parser
        # joins atoms across spaces ("x@exa mple.org" -> "x@example.org").
        found = text.find(addr, position)
        if found < 0:
            raise _refuse(field, value, "is not a valid address list")
        position = found + len(addr)
        if "[" in addr:
            # Strict getaddresses() refuses domain literals in lists; refuse them on
            # every Python version alike (a lone addr-spec may still use one).
            raise _refuse(field, value, "has an address literal inside an address list")
        result.append((name, check_mailbox(addr, field=field)))
    return result


def parse_address_list(value: str | Iterable[str] | None, *, field: str) -> list[tuple[str, str]]:
    """Parse addresses as written in To/Cc/From into (display name, addr-spec) pairs.

    ``value`` is a comma list (RFC 5322 comments allowed and removed), or an iterable
    whose items are each one address or a comma list, or None. Blank strings add
    nothing. Each addr-spec is checked and normalized by :func:`check_mailbox`.
    Domain literals are accepted only as a lone addr-spec, and empty groups
    (``undisclosed-recipients:;``) are not accepted.

    >>> parse_address_list("jack@example.org, Ann (work) <ann@example.net>", field="to")
    [('', 'jack@example.org'), ('Ann', 'ann@example.net')]
    >>> parse_address_list(['"Doe, John" <john@example.org>', "x@bücher.example"], field="cc")
    [('Doe, John', 'john@example.org'), ('', 'x@xn--bcher-kva.example')]
    >>> parse_address_list(None, field="cc")
    []
    >>> parse_address_list("alice@example.org<bob@example.org>", field="to")
    Traceback (most recent call last):
    ...
    asmtp.errors.InputError: to: 'alice@example.org<bob@example.org>' is not a valid address list
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    result: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, str):
            raise _refuse(field, item, "is not a string")
        if _PLAIN_ADDR.fullmatch(item):
            result.append(("", item))
            continue
        _check_no_line_breaks(field, item)
        if item.strip():
            result.extend(_parse_one(field, item))
    return result


def needs_smtputf8(addr: str) -> bool:
    """True when the address, once normalized, still holds non-ASCII (its local part).

    >>> needs_smtputf8("jack@bücher.example"), needs_smtputf8("jörg@example.org")
    (False, True)
    """
    return not check_mailbox(addr, field="address", allow_empty=True).isascii()


def domain_of(addr: str) -> str:
    """The lower-cased ASCII domain of an address (IDNA applied), for routing.

    >>> domain_of("Jack@Example.ORG"), domain_of("x@Bücher.example")
    ('example.org', 'xn--bcher-kva.example')
    """
    return split_mailbox(check_mailbox(addr, field="address"))[1].lower()


def unique_addresses(addrs: Iterable[str]) -> list[str]:
    """Drop repeated addresses, keeping the first seen of each, in order.

    The domain is compared case-insensitively, the local part exactly (RFC 5321 2.4
    leaves its case to the receiving host). Give normalized addresses (from
    :func:`check_mailbox`) so an IDN and its punycode form compare equal.

    >>> unique_addresses(["a@x.example", "a@X.EXAMPLE", "A@x.example", "a@x.example"])
    ['a@x.example', 'A@x.example']
    """
    seen: set[tuple[str, str]] = set()
    result: list[str] = []
    for addr in addrs:
        local, domain = split_mailbox(addr)
        key = (local, domain.lower())
        if key not in seen:
            seen.add(key)
            result.append(addr)
    return result


def check_header(name: str, value: str) -> None:
    """Refuse a header that would inject lines or is not a valid field name.

    A field name is printable US-ASCII without ':' or space (RFC 5322 2.2); neither name
    nor value may hold CR, LF, NUL or another line-breaking character. A value holds
    no other control character either (ESC, BEL, DEL, C1): RFC 5322 allows printable
    characters and tabs only, and a control character is refused, not encoded, so
    that a mail reader never shows it.

    >>> check_header("X-Campaign", "spring")
    >>> check_header("X-Campaign", "spring\\r\\nBcc: victim@example.org")
    Traceback (most recent call last):
    ...
    asmtp.errors.InputError: header 'X-Campaign': 'spring\\r\\nBcc: victim@example.org' contains CR, LF, NUL or another line-breaking character
    >>> check_header("Bad Name", "x")
    Traceback (most recent call last):
    ...
    asmtp.errors.InputError: header name: 'Bad Name' is not a valid field name
    >>> check_header("Subject", "\\x1b[2Jhello")
    Traceback (most recent call last):
    ...
    asmtp.errors.InputError: header 'Subject': '\\x1b[2Jhello' contains the control character U+001B
    """  # noqa: E501
    if not isinstance(name, str):
        raise _refuse("header name", name, "is not a string")
    _check_no_line_breaks("header name", name)
    if not name or not all("!" <= c <= "~" and c != ":" for c in name):
        raise _refuse("header name", name, "is not a valid field name")
    if not isinstance(value, str):
        raise _refuse(f"header {name!r}", value, "is not a string")
    _check_no_line_breaks(f"header {name!r}", value)
    found = _HEADER_CONTROL.search(value)
    if found is not None:
        code = ord(found.group())
        raise _refuse(f"header {name!r}", value, f"contains the control character U+{code:04X}")
