"""MTA-STS (RFC 8461), the pure part: the ``_mta-sts`` TXT record, the policy file,
matching MX host names against the policy's ``mx`` patterns, and the cache decisions
(when a cached policy stands, when to fetch, when a policy has expired).

No I/O: the TXT lookup is the resolver's, the HTTPS fetch is
:mod:`asmtp._io.policy_fetch`'s, and applying a policy to a delivery is
:mod:`asmtp._delivery.tlspolicy`'s.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MAX_AGE_LIMIT",
    "POLICY_MAX_BYTES",
    "CacheAction",
    "CachedPolicy",
    "PolicyParseError",
    "STSMode",
    "STSPolicy",
    "STSRecord",
    "cache_action",
    "mx_matches",
    "parse_policy",
    "parse_txt",
    "policy_host",
    "policy_url",
]

STSMode = Literal["enforce", "testing", "none"]

_MODES: dict[str, STSMode] = {"enforce": "enforce", "testing": "testing", "none": "none"}
#: RFC 8461 section 3.2: max_age is at most 31557600 seconds (about one year)
MAX_AGE_LIMIT = 31_557_600
#: RFC 8461 section 3.3 leaves the limit to the sender; 64 KiB is far above any real
#: policy (a few hundred octets) and keeps a hostile server from feeding us megabytes
POLICY_MAX_BYTES = 64 * 1024

# RFC 8461 section 3.1: id is 1 to 32 letters and digits
_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# section 3.2: sts-policy-term = key ":" *WSP value; keys are letters, digits, "_" and "."
_TERM = re.compile(r"([A-Za-z0-9_.]{1,32}):[ \t]*(.*?)[ \t]*")
# an mx pattern: a host name, or "*." and a host name (one label matched)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_MX_PATTERN = re.compile(rf"(\*\.)?{_LABEL}(\.{_LABEL})*\.?")


class PolicyParseError(ValueError):
    """A policy file that does not follow RFC 8461 section 3.2 (the message says why).
    Never leaves asmtp: the delivery layer makes it a TLS report failure
    ("sts-policy-invalid") and goes on as if the domain had no policy."""


@dataclass(frozen=True, slots=True)
class STSRecord:
    """A domain's ``_mta-sts`` TXT record: ``v=STSv1; id=20260101T000000;``."""

    id: str


@dataclass(frozen=True, slots=True)
class STSPolicy:
    """A parsed policy file (``mx`` patterns lower case, without a final dot).

    >>> p = parse_policy("version: STSv1\\nmode: enforce\\nmx: *.example.net\\nmax_age: 86400\\n")
    >>> p.mode, p.mx, p.max_age, p.allows("mx1.example.net"), p.allows("example.net")
    ('enforce', ('*.example.net',), 86400, True, False)
    """

    mode: STSMode
    mx: tuple[str, ...]
    max_age: int
    #: the policy file's text as fetched (kept for the TLS report's policy-string)
    text: str = ""

    def allows(self, host: str) -> bool:
        """Whether MX host ``host`` matches one of the policy's ``mx`` patterns."""
        return any(mx_matches(pattern, host) for pattern in self.mx)

    def lines(self) -> list[str]:
        """The policy as RFC 8460's ``policy-string``: one entry per line of the file."""
        return [line for line in self.text.replace("\r\n", "\n").split("\n") if line]


def parse_txt(strings: Iterable[str]) -> STSRecord | None:
    """The STS record among a name's TXT records (each given as its joined text), or
    None when there is none or more than one (RFC 8461 section 3.1: then the domain has
    no usable policy record).

    >>> parse_txt(["v=spf1 -all", "v=STSv1; id=20260101T000000Z;"])
    STSRecord(id='20260101T000000Z')
    >>> parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None
    True
    """
    found: list[STSRecord] = []
    for text in strings:
        fields = [f.strip() for f in text.split(";")]
        if not fields or fields[0] != "v=STSv1":
            continue
        record_id = None
        for item in fields[1:]:
            key, sep, value = item.partition("=")
            if sep and key.strip() == "id":
                record_id = value.strip()
                break
        if record_id is None or not _ID.fullmatch(record_id):
            # a record that starts right but has no valid id is no record (3.1)
            return None
        found.append(STSRecord(record_id))
    return found[0] if len(found) == 1 else None


def parse_policy(text: str) -> STSPolicy:
    """Parse a policy file (RFC 8461 section 3.2): ``key: value`` lines ending in CRLF
    or LF; ``version: STSv1``, ``mode``, ``max_age`` once each, ``mx`` once or more
    (none needed when the mode is ``none``); unknown keys are ignored.

    >>> text = "version: STSv1\\r\\nmode: testing\\r\\nmx: mail.example.org\\r\\nmax_age: 604800"
    >>> parse_policy(text)  # doctest: +ELLIPSIS
    STSPolicy(mode='testing', mx=('mail.example.org',), max_age=604800, text=...)
    >>> parse_policy("version: STSv1\\nmode: enforce\\nmax_age: 60\\n")
    Traceback (most recent call last):
    ...
    asmtp._core.mtasts.PolicyParseError: policy mode enforce names no mx
    """
    values: dict[str, str] = {}
    mx: list[str] = []
    for number, raw in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not raw.strip():
            continue
        term = _TERM.fullmatch(raw)
        if term is None:
            raise PolicyParseError(f"policy line {number} is not 'key: value': {raw[:80]!r}")
        key, value = term[1], term[2]
        if key == "mx":
            pattern = value.lower().rstrip(".")
            if not _MX_PATTERN.fullmatch(value):
                raise PolicyParseError(f"policy mx is not a host name pattern: {value[:80]!r}")
            mx.append(pattern)
        elif key in ("version", "mode", "max_age"):
            if key in values:
                raise PolicyParseError(f"policy names {key} twice")
            values[key] = value
    if values.get("version") != "STSv1":
        raise PolicyParseError(f"policy version is not STSv1: {values.get('version')!r}")
    mode = _MODES.get(values.get("mode", ""))
    if mode is None:
        raise PolicyParseError(
            f"policy mode must be enforce, testing or none: {values.get('mode')!r}"
        )
    age = values.get("max_age", "")
    if not age.isdigit() or len(age) > 10:
        raise PolicyParseError(f"policy max_age is not a number of seconds: {age!r}")
    if mode != "none" and not mx:
        raise PolicyParseError(f"policy mode {mode} names no mx")
    return STSPolicy(mode, tuple(dict.fromkeys(mx)), min(int(age), MAX_AGE_LIMIT), text)


def mx_matches(pattern: str, host: str) -> bool:
    """Whether ``host`` matches the policy's ``mx`` ``pattern`` (RFC 8461 section 4.1):
    the same name, or for ``*.example.net`` a name with exactly one more label on the
    left. Case and a final dot do not count.

    >>> [mx_matches("*.example.net", h) for h in ("a.example.net", "a.b.example.net")]
    [True, False]
    >>> mx_matches("Mail.Example.org.", "mail.example.org")
    True
    """
    pattern = pattern.lower().rstrip(".")
    host = host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return host == pattern


def policy_url(domain: str) -> str:
    """Where a domain's policy lives (RFC 8461 section 3.3).

    >>> policy_url("example.org")
    'https://mta-sts.example.org/.well-known/mta-sts.txt'
    """
    return f"https://{policy_host(domain)}/.well-known/mta-sts.txt"


def policy_host(domain: str) -> str:
    return f"mta-sts.{domain.lower().rstrip('.')}"


@dataclass(frozen=True, slots=True)
class CachedPolicy:
    """A policy as cached: the TXT record id it was fetched under and when (seconds
    of the wall clock: the cache outlives the process on disk)."""

    id: str
    policy: STSPolicy
    fetched: float

    def fresh(self, now: float) -> bool:
        """Within its ``max_age`` (RFC 8461 section 5.1)."""
        return now < self.fetched + self.policy.max_age


class CacheAction(enum.Enum):
    """What to do about a domain's policy: use the cached one, fetch (and fall back to
    the cached one if the fetch fails), or go on without a policy."""

    USE_CACHED = "use-cached"
    FETCH = "fetch"
    NO_POLICY = "no-policy"


def cache_action(cached: CachedPolicy | None, record: STSRecord | None, now: float) -> CacheAction:
    """The cache decision of RFC 8461 section 5.1, from the cached policy (if any), the
    TXT record found (None: none, or the lookup failed) and ``now``.

    A fresh cached policy stands while the record keeps its id, when the record has
    gone, and when the lookup fails (so an attacker who blocks DNS cannot strip a known
    policy); a new id means fetch. Without a fresh cached policy, a record means fetch.

    >>> p = CachedPolicy("a1", STSPolicy("enforce", ("mx.example.org",), 600), fetched=1000)
    >>> [cache_action(p, STSRecord(i), 1200).value for i in ("a1", "b2")]
    ['use-cached', 'fetch']
    >>> cache_action(p, None, 1700).value  # expired, no record
    'no-policy'
    """
    usable = cached if cached is not None and cached.fresh(now) else None
    if record is None:
        return CacheAction.USE_CACHED if usable is not None else CacheAction.NO_POLICY
    if usable is not None and usable.id == record.id:
        return CacheAction.USE_CACHED
    return CacheAction.FETCH
