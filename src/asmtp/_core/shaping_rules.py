"""Traffic shaping settings and the rules that read a server's reply: which replies
mean "slow down", "pause this site for a while" or "stop" (a permanent policy refusal).

Owns :class:`Rule` (a reply pattern and its action), the built-in table of well-known
provider replies (:data:`BUILTIN_RULES`, each citing where its wording comes from),
matching a reply against the rules (:func:`match_rule`: user rules first, a user rule
named like a built-in one replaces it), and :class:`Shaping`, the immutable settings
of adaptive direct delivery, with :func:`load_shaping` reading them from a dict (a
parsed TOML file). Pure: no I/O, no clock.

A shaping file (``asmtp send --shaping FILE``)::

    initial = 3                 # sessions per site at first
    max_concurrency = 20        # per site (the run's concurrency caps it too)
    rate = "100/s"              # messages per second per site
    [[rules]]
    name = "example-busy"
    code = 421
    text = "too busy"
    action = "pause"
    seconds = 120
    [sites."*.mail.example.net"]
    max_concurrency = 4
    rate = "10/s"
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, cast

from ..errors import InputError

__all__ = [
    "BUILTIN_RULES",
    "Action",
    "Rule",
    "Shaping",
    "SiteLimits",
    "load_shaping",
    "match_rule",
    "per_second",
]

#: what a matching reply does to its site: "slow" (fewer sessions, a lower rate for a
#: while), "pause" (no new session or message for ``seconds``), "stop" (the site
#: refuses us for policy: its remaining recipients fail at once), "ignore" (a reply
#: that says nothing of the site, e.g. to switch a built-in rule off)
Action = Literal["slow", "pause", "stop", "ignore"]
_ACTIONS = ("slow", "pause", "stop", "ignore")


def _check_positive(name: str, value: object, *, integer: bool = False, zero: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if (
        not ok
        or isinstance(value, bool)
        or not math.isfinite(cast(float, value))
        or (cast(float, value) < 0 if zero else cast(float, value) <= 0)
    ):
        kind = "a whole number" if integer else "a number"
        raise InputError(f"shaping {name} must be {kind} above 0: {value!r}")


@dataclass(frozen=True, slots=True)
class Rule:
    """A reply pattern and its action. Every given part must match: ``code`` (the
    reply code, e.g. 421), ``enhanced`` (the enhanced status code or its prefix,
    e.g. "4.7.28" or "4.7."), ``text`` (a regular expression searched, case
    insensitive, in the reply text). ``source`` says where the wording comes from.

    >>> Rule("busy", action="pause", code=421, text="busy").matches(421, None, "Too busy")
    True
    """

    name: str
    action: Action = "slow"
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    seconds: float = 300.0
    source: str = ""
    _pattern: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"a shaping rule needs a name: {self.name!r}")
        if self.action not in _ACTIONS:
            raise InputError(f"rule {self.name}: action must be one of {_ACTIONS}: {self.action!r}")
        if self.code is None and self.enhanced is None and self.text is None:
            raise InputError(f"rule {self.name}: give a code, an enhanced code or a text")
        _check_positive(f"rule {self.name} seconds", self.seconds)
        if self.text is not None:
            try:
                object.__setattr__(self, "_pattern", re.compile(self.text, re.IGNORECASE))
            except re.error as exc:
                raise InputError(f"rule {self.name}: bad text pattern: {exc}") from None

    def matches(self, code: int | None, enhanced: str | None, text: str) -> bool:
        if self.code is not None and code != self.code:
            return False
        if self.enhanced is not None and not (enhanced or "").startswith(self.enhanced):
            return False
        return self._pattern is None or self._pattern.search(text) is not None


_GMAIL_CODES = "https://support.google.com/a/answer/3726730 (Gmail SMTP errors and codes)"
_MS_POSTMASTER = "https://sendersupport.olc.protection.outlook.com/pm/ (aka.ms/postmaster)"
_YAHOO_CODES = "https://senders.yahooinc.com/smtp-error-codes/ (Yahoo Sender Hub)"

#: Well-known provider replies. The wording is the providers' own, as their postmaster
#: pages list it and as senders quote it (e.g. Gmail's "421-4.7.28 ... Our system has
#: detected an unusual rate of unsolicited mail originating from your IP address ...
#: temporarily rate limited"; Microsoft's "451 4.7.650 The mail server [IP] has been
#: temporarily rate limited due to IP reputation"; Yahoo's "421 4.7.0 [TSS04] Messages
#: from IP temporarily deferred due to unexpected volume or user complaints").
BUILTIN_RULES: tuple[Rule, ...] = (
    Rule(
        "gmail-unusual-rate",
        action="pause",
        enhanced="4.7.28",
        seconds=600.0,
        source=_GMAIL_CODES
        + "; the reply links support.google.com/mail/?p=UnsolicitedRateLimitError",
    ),
    Rule(
        "gmail-rate-limited",
        action="slow",
        enhanced="4.7.0",
        text=r"(try again later|temporarily (rate limited|deferred)).*gsmtp|"
        r"unusual rate|receiving mail at a rate",
        source=_GMAIL_CODES + ": 421 4.7.0 Try again later, closing connection",
    ),
    Rule(
        "gmail-user-rate",
        action="slow",
        enhanced="4.2.1",
        text=r"receiving mail (at a rate|too quickly)",
        source=_GMAIL_CODES + ": 450 4.2.1 The user you are trying to contact is receiving "
        "mail at a rate that prevents additional messages from being delivered",
    ),
    Rule(
        "microsoft-ip-reputation",
        action="pause",
        enhanced="4.7.65",  # 4.7.650, 4.7.651: temporarily rate limited due to IP reputation
        seconds=900.0,
        source=_MS_POSTMASTER + ": 451 4.7.650/4.7.651 ... temporarily rate limited due to "
        "IP reputation (S775, S3114)",
    ),
    Rule(
        "microsoft-throttled",
        action="slow",
        enhanced="4.7.5",  # 4.7.500-699 (ASxxx): Exchange Online throttling a new sender
        source="https://learn.microsoft.com/exchange/mail-flow-best-practices/"
        "non-delivery-reports-in-exchange-online/ (451 4.7.500-699 ASxxx: server busy)",
    ),
    Rule(
        "microsoft-rp",
        action="slow",
        code=421,
        text=r"\bRP-00[123]\b",
        source=_MS_POSTMASTER + ": 421 RP-001/RP-002/RP-003: the sending IP exceeded a rate, "
        "connection-rate or connection limit",
    ),
    Rule(
        "yahoo-tss04",
        action="pause",
        text=r"\[?TSS0[14]\]?",
        seconds=1800.0,
        source=_YAHOO_CODES + ": 421 4.7.0 [TSS04] Messages from IP temporarily deferred "
        "due to unexpected volume or user complaints",
    ),
    Rule(
        "yahoo-ts03",
        action="stop",
        text=r"\[?TS03\]?",
        source=_YAHOO_CODES + ": 554 [TS03] All messages from IP will be permanently deferred",
    ),
    Rule(
        "spamhaus-listed",
        action="stop",
        code=554,
        text=r"spamhaus|blocked using|listed (at|by|on)",
        source="RFC 5321 section 4.2.3 (554 transaction failed) with a blocklist named",
    ),
)


def match_rule(
    code: int | None,
    enhanced: str | None,
    text: str,
    rules: Sequence[Rule] = (),
    *,
    builtin: Sequence[Rule] = BUILTIN_RULES,
) -> Rule | None:
    """The first rule matching a reply: the caller's ``rules`` in order, then the
    built-in ones not replaced by a caller's rule of the same name.

    >>> match_rule(421, "4.7.28", "Our system has detected an unusual rate").name
    'gmail-unusual-rate'
    >>> off = Rule("gmail-unusual-rate", action="ignore", enhanced="9.9.9")
    >>> print(match_rule(421, "4.7.28", "unusual rate", [off]))  # replaced: no match
    None
    """
    for rule in rules:
        if rule.matches(code, enhanced, text):
            return rule
    replaced = {rule.name for rule in rules}
    for rule in builtin:
        if rule.name not in replaced and rule.matches(code, enhanced, text):
            return rule
    return None


@dataclass(frozen=True, slots=True)
class SiteLimits:
    """Limits for the sites whose MX host names match ``pattern`` (shell-style,
    e.g. "*.google.com"): sessions at once, messages and new connections per second,
    messages per connection. None: the general setting."""

    pattern: str
    max_concurrency: int | None = None
    rate: float | None = None
    connection_rate: float | None = None
    max_messages_per_connection: int | None = None

    def applies_to(self, hosts: Sequence[str]) -> bool:
        return any(fnmatch.fnmatchcase(h.lower(), self.pattern.lower()) for h in hosts)


@dataclass(frozen=True, slots=True)
class Shaping:
    """How direct delivery adapts to each site (the set of MX hosts a domain
    resolves to; all domains on the same hosts share one state).

    Concurrency per site, as Postfix's slow start and feedback: start at ``initial``
    sessions; each delivery adds one session while below ``slow_start_threshold``,
    and 1/limit above it (one more per round of deliveries), up to
    ``max_concurrency`` (the run's ``concurrency`` caps it too). A connection refused,
    a 421, a 4.7.x throttling reply or a timeout multiplies the limit by ``shrink``
    (at most once per ``shrink_every`` seconds, as the replies of sessions already in
    flight say the same thing), and the number of sessions that were open becomes a
    ceiling for ``probe_every`` seconds. A rate refusal (4.7.x at MAIL or RCPT) sets
    the site's rate to ``rate_backoff`` times the rate measured (after a burst with no
    rate yet, no message starts for ``rate_quiet`` seconds, as the provider's count
    drains), which then grows by
    ``rate_step`` per delivery up to ``rate_margin`` times the measured rate until
    ``probe_every`` has passed. A site whose every attempt failed for ``dead_after``
    seconds (at least ``dead_failures`` times) is paused for ``pause`` seconds. A job
    waits at most ``max_wait`` seconds for a paused site, then fails transiently.

    Sessions are reused for the site's next recipient up to
    ``max_messages_per_connection`` messages and ``max_connection_age`` seconds;
    a throttled recipient is tried again within the run up to ``requeue`` times.
    ``rules`` come before the built-in ones; ``sites`` set limits per site.
    ``adaptive=False`` keeps the fixed limits (``per_domain``, the site rates).
    """

    adaptive: bool = True
    initial: int = 3
    min_concurrency: int = 1
    max_concurrency: int = 100
    slow_start_threshold: int = 16
    shrink: float = 0.5
    shrink_every: float = 1.0
    probe_every: float = 10.0
    rate: float | None = None
    connection_rate: float | None = None
    rate_backoff: float = 0.85
    rate_step: float = 0.002
    rate_margin: float = 0.97
    rate_quiet: float = 1.0
    dead_after: float = 10.0
    dead_failures: int = 5
    pause: float = 60.0
    max_wait: float = 300.0
    max_messages_per_connection: int = 100
    max_connection_age: float = 60.0
    requeue: int = 10
    rules: tuple[Rule, ...] = ()
    sites: tuple[SiteLimits, ...] = ()

    def __post_init__(self) -> None:
        for name in ("initial", "min_concurrency", "max_concurrency", "slow_start_threshold"):
            _check_positive(name, getattr(self, name), integer=True)
        for name in ("dead_failures", "max_messages_per_connection"):
            _check_positive(name, getattr(self, name), integer=True)
        if not isinstance(self.requeue, int) or self.requeue < 0:
            raise InputError(f"shaping requeue must be 0 or more: {self.requeue!r}")
        for name in (
            "shrink_every",
            "probe_every",
            "dead_after",
            "pause",
            "max_wait",
            "rate_quiet",
        ):
            _check_positive(name, getattr(self, name), zero=True)
        _check_positive("max_connection_age", self.max_connection_age)
        for name in ("shrink", "rate_backoff", "rate_margin"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise InputError(f"shaping {name} must be in (0, 1]: {value!r}")
        _check_positive("rate_step", self.rate_step, zero=True)
        for name in ("rate", "connection_rate"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "sites", tuple(self.sites))

    def limits_for(self, hosts: Sequence[str]) -> Shaping:
        """These settings with the first matching :class:`SiteLimits` applied."""
        for limits in self.sites:
            if limits.applies_to(hosts):
                changes: dict[str, Any] = {
                    f.name: getattr(limits, f.name)
                    for f in fields(limits)
                    if f.name != "pattern" and getattr(limits, f.name) is not None
                }
                return replace(self, **changes)
        return self


_RATE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*", re.I)
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


def per_second(value: object, what: str = "rate") -> float:
    """A rate ("50/s", "300/m", "1000/h", the syntax of ``--rate``) or a number, in
    messages per second.

    >>> per_second("300/m")
    5.0
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_positive(what, value)
        return float(value)
    m = _RATE.fullmatch(value) if isinstance(value, str) else None
    if m is None or not 0 < float(m.group(1)) < math.inf:
        raise InputError(f"{what}: a rate looks like 50/s, 300/m or 1000/h: {value!r}")
    return float(m.group(1)) / _PER[m.group(2)[0].lower()]


_RATES = ("rate", "connection_rate")


def load_shaping(data: Mapping[str, Any], base: Shaping | None = None) -> Shaping:
    """:class:`Shaping` from a dict, as ``tomllib`` reads a shaping file: the settings
    by name (rates as "50/s"), ``[[rules]]`` tables and ``[sites."PATTERN"]`` tables.

    >>> load_shaping({"initial": 2, "rate": "10/s", "rules": [
    ...     {"name": "busy", "code": 421, "text": "busy", "action": "pause"}]}).rules[0].action
    'pause'
    """
    if not isinstance(data, Mapping):
        raise InputError("a shaping file holds a table of settings")
    settings: dict[str, Any] = {}
    known = {f.name for f in fields(Shaping)}
    for key, value in data.items():
        if key == "rules":
            settings["rules"] = tuple(_rule(entry) for entry in _list_of_tables(key, value))
        elif key == "sites":
            if not isinstance(value, Mapping):
                raise InputError('sites is a table: [sites."*.example.net"]')
            settings["sites"] = tuple(_site(str(k), v) for k, v in value.items())
        elif key in _RATES:
            settings[key] = per_second(value, key)
        elif key in known:
            settings[key] = value
        else:
            raise InputError(f"unknown shaping setting: {key!r}")
    return replace(base or Shaping(), **settings)


def _list_of_tables(key: str, value: object) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
        raise InputError(f"{key} is a list of tables: [[{key}]]")
    return cast(list[Mapping[str, Any]], value)


def _rule(entry: Mapping[str, Any]) -> Rule:
    allowed = {"name", "action", "code", "enhanced", "text", "seconds", "source"}
    unknown = set(entry) - allowed
    if unknown:
        raise InputError(f"unknown rule field(s): {', '.join(sorted(unknown))}")
    try:
        return Rule(**entry)
    except TypeError as exc:
        raise InputError(f"bad rule {dict(entry)!r}: {exc}") from None


def _site(pattern: str, entry: object) -> SiteLimits:
    if not isinstance(entry, Mapping):
        raise InputError(f"sites.{pattern} is a table")
    allowed = {f.name for f in fields(SiteLimits)} - {"pattern"}
    unknown = set(entry) - allowed
    if unknown:
        raise InputError(f"unknown site setting(s) for {pattern}: {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {k: per_second(v, k) if k in _RATES else v for k, v in entry.items()}
    for name in ("max_concurrency", "max_messages_per_connection"):
        if name in values:
            _check_positive(f"sites.{pattern}.{name}", values[name], integer=True)
    return SiteLimits(pattern, **values)
