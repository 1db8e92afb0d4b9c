"""ESMTP capabilities: what a server's EHLO reply offers (RFC 5321 section 4.1.1.1),
and what asmtp makes of it. Sans-IO.

A real reply::

    250-mx.example.org Hello client.example.com
    250-PIPELINING
    250-SIZE 10240000
    250-STARTTLS
    250-AUTH PLAIN LOGIN
    250-ENHANCEDSTATUSCODES
    250-8BITMIME
    250-DSN
    250 SMTPUTF8
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from .reply import Reply

__all__ = ["Capabilities"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """The extensions a server announced, by upper-case keyword, with their parameters.

    >>> caps = Capabilities.from_ehlo(Reply(250, ("mx.example.org", "SIZE 1000", "AUTH PLAIN")))
    >>> caps.size, caps.auth, "SIZE" in caps
    (1000, ('PLAIN',), True)
    """

    extensions: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: False after a HELO fallback: the server speaks plain RFC 821 SMTP.
    esmtp: bool = True
    # What every transaction asks, worked out once (a server's reply is parsed once).
    pipelining: bool = field(init=False, repr=False, compare=False)
    starttls: bool = field(init=False, repr=False, compare=False)
    eight_bit_mime: bool = field(init=False, repr=False, compare=False)
    smtputf8: bool = field(init=False, repr=False, compare=False)
    dsn: bool = field(init=False, repr=False, compare=False)
    #: The server's message size limit (RFC 1870); None when not announced or 0
    #: (no fixed limit).
    size: int | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ext = self.extensions
        for name, keyword in _FLAGS:
            object.__setattr__(self, name, keyword in ext)
        object.__setattr__(self, "size", _size_limit(ext.get("SIZE")))

    @classmethod
    def from_ehlo(cls, reply: Reply) -> Capabilities:
        # A server says the same thing to every session: parse each wording once.
        return _from_ehlo_lines(reply.lines[1:])

    @classmethod
    def helo(cls) -> Capabilities:
        return _HELO

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self.extensions

    @property
    def auth(self) -> tuple[str, ...]:
        """SASL mechanisms offered (RFC 4954), upper case, without duplicates."""
        raw = self.extensions.get("AUTH", "")
        seen: dict[str, None] = {}
        for mech in raw.upper().split():
            seen.setdefault(mech, None)
        return tuple(seen)


_FLAGS: Final = (
    ("pipelining", "PIPELINING"),
    ("starttls", "STARTTLS"),
    ("eight_bit_mime", "8BITMIME"),
    ("smtputf8", "SMTPUTF8"),
    ("dsn", "DSN"),
)


def _size_limit(raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw.split()[0]) if raw else 0
    except ValueError:
        return None
    return value or None


@functools.lru_cache(maxsize=256)
def _from_ehlo_lines(lines: tuple[str, ...]) -> Capabilities:
    ext: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if not keyword:
            continue
        key = keyword.upper()
        # Old servers announce "AUTH=LOGIN" beside "AUTH LOGIN"; merge both.
        if key.startswith("AUTH="):
            key, params = "AUTH", keyword[5:] + (" " + params if params else "")
        if key == "AUTH" and "AUTH" in ext:
            params = ext["AUTH"] + " " + params
        ext[key] = params.strip()
    return Capabilities(MappingProxyType(ext))


_HELO: Final = Capabilities(MappingProxyType({}), esmtp=False)
