"""SMTP TLS Reporting (RFC 8460), the pure part: :class:`TLSReportLog` counts the TLS
outcome of each session direct delivery makes, per policy domain and policy, and
builds the aggregate report (section 4.4's JSON) from the counts.

Counts, not events: a run of a million sessions keeps one counter per (policy,
failure kind), with at most :data:`MAX_FAILURE_KINDS` failure kinds per policy. A log
can be saved and merged (``asmtp send --tlsrpt FILE`` adds each run's counts to the
file; ``asmtp tlsrpt FILE`` prints the reports).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "MAX_FAILURE_KINDS",
    "RESULT_TYPES",
    "PolicyType",
    "ReportPolicy",
    "TLSReportLog",
]

PolicyType = Literal["sts", "tlsa", "no-policy-found"]

#: RFC 8460 section 4.3's result types
RESULT_TYPES = (
    "starttls-not-supported",
    "certificate-host-mismatch",
    "certificate-expired",
    "certificate-not-trusted",
    "validation-failure",
    "tlsa-invalid",
    "dnssec-invalid",
    "dane-required",
    "sts-policy-fetch-error",
    "sts-policy-invalid",
    "sts-webpki-invalid",
)
MAX_FAILURE_KINDS = 1000


@dataclass(frozen=True, slots=True)
class ReportPolicy:
    """The policy a session was held to (section 4.4's ``policy`` object): its type,
    its text (the MTA-STS policy file's lines, or the TLSA records), the policy domain
    and (MTA-STS) the mx patterns."""

    type: PolicyType
    domain: str
    strings: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy-type": self.type, "policy-domain": self.domain}
        if self.strings:
            out["policy-string"] = list(self.strings)
        if self.mx_host:
            out["mx-host"] = list(self.mx_host)
        return out


_FailureKey = tuple[str, str, str, str, str]  # type, sending ip, mx host, receiving ip, reason


@dataclass(slots=True)
class _Counts:
    successes: int = 0
    failures: int = 0
    details: dict[_FailureKey, int] | None = None


class TLSReportLog:
    """The TLS outcomes of direct delivery's sessions, counted for TLS-RPT.

    Give one to ``Direct(tls_report=...)``; after the run, :meth:`reports` builds one
    RFC 8460 report per policy domain.

    >>> log = TLSReportLog(start=0.0)
    >>> sts = ReportPolicy("sts", "example.org", ("mode: enforce",), ("mx.example.org",))
    >>> log.success(sts)
    >>> log.failure(sts, "certificate-expired", mx_host="mx.example.org", receiving_ip="192.0.2.1")
    >>> [r["policies"][0]["summary"] for r in log.reports("Sender", "tlsrpt@example.net")]
    [{'total-successful-session-count': 1, 'total-failure-session-count': 1}]
    """

    def __init__(self, *, start: float | None = None) -> None:
        #: the start of the period (Unix time); the first outcome's time when None
        self.start = start
        self.end: float | None = None
        self._counts: dict[ReportPolicy, _Counts] = {}

    def __len__(self) -> int:
        return len(self._counts)

    def _at(self, policy: ReportPolicy, now: float | None) -> _Counts:
        if now is not None:
            self.start = now if self.start is None else min(self.start, now)
            self.end = now if self.end is None else max(self.end, now)
        counts = self._counts.get(policy)
        if counts is None:
            counts = self._counts[policy] = _Counts()
        return counts

    def success(self, policy: ReportPolicy, count: int = 1, *, now: float | None = None) -> None:
        """``count`` sessions held to ``policy`` that met it."""
        self._at(policy, now).successes += count

    def failure(
        self,
        policy: ReportPolicy,
        result_type: str,
        *,
        mx_host: str = "",
        receiving_ip: str = "",
        sending_ip: str = "",
        reason: str = "",
        count: int = 1,
        now: float | None = None,
    ) -> None:
        """``count`` sessions that failed ``policy`` for ``result_type`` (one of
        :data:`RESULT_TYPES`); ``reason`` is the failure-reason-code text."""
        if result_type not in RESULT_TYPES:
            raise ValueError(f"not an RFC 8460 result type: {result_type!r}")
        counts = self._at(policy, now)
        counts.failures += count
        details = counts.details if counts.details is not None else {}
        counts.details = details
        key = (result_type, sending_ip, mx_host, receiving_ip, reason[:200])
        if key in details or len(details) < MAX_FAILURE_KINDS:
            details[key] = details.get(key, 0) + count

    def merge(self, other: TLSReportLog) -> None:
        """Add ``other``'s counts (and widen the period to cover it)."""
        for when in (other.start, other.end):
            if when is not None:
                self.start = when if self.start is None else min(self.start, when)
                self.end = when if self.end is None else max(self.end, when)
        for policy, counts in other._counts.items():
            self.success(policy, counts.successes)
            self._at(policy, None).failures += counts.failures - sum(
                (counts.details or {}).values()
            )
            for (kind, sending, mx, ip, reason), n in (counts.details or {}).items():
                self.failure(
                    policy,
                    kind,
                    sending_ip=sending,
                    mx_host=mx,
                    receiving_ip=ip,
                    reason=reason,
                    count=n,
                )

    # -- the report ------------------------------------------------------------------

    def domains(self) -> list[str]:
        return sorted({policy.domain for policy in self._counts})

    def reports(
        self,
        organization: str,
        contact: str,
        *,
        end: float | None = None,
        report_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """One report per policy domain (section 4.4), in domain order. ``end`` (Unix
        time) closes the period (default: the last outcome's time); the report-id is
        ``report_id`` or made of the period's start and the domain."""
        start = self.start if self.start is not None else 0.0
        stop = end if end is not None else (self.end if self.end is not None else start)
        out = []
        for domain in self.domains():
            policies = [
                _policy_entry(policy, counts)
                for policy, counts in sorted(self._counts.items(), key=_order)
                if policy.domain == domain
            ]
            ident = report_id or f"{_stamp(start).replace(':', '')}_{domain}"
            out.append(
                {
                    "organization-name": organization,
                    "date-range": {"start-datetime": _stamp(start), "end-datetime": _stamp(stop)},
                    "contact-info": contact,
                    "report-id": ident,
                    "policies": policies,
                }
            )
        return out

    # -- saving ----------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """A JSON form that :meth:`from_dict` reads back (not the report)."""
        return {
            "start": self.start,
            "end": self.end,
            "policies": [
                {
                    "policy": policy.as_dict(),
                    "successes": counts.successes,
                    "failures": counts.failures,
                    "details": [
                        [kind, sending, mx, ip, reason, n]
                        for (kind, sending, mx, ip, reason), n in (counts.details or {}).items()
                    ],
                }
                for policy, counts in sorted(self._counts.items(), key=_order)
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TLSReportLog:
        """Read :meth:`as_dict`'s form; ValueError when it is not that."""
        try:
            log = cls(start=_number(data.get("start")))
            log.end = _number(data.get("end"))
            for item in data["policies"]:
                p = item["policy"]
                policy = ReportPolicy(
                    _policy_type(p["policy-type"]),
                    str(p["policy-domain"]),
                    tuple(str(s) for s in p.get("policy-string", ())),
                    tuple(str(s) for s in p.get("mx-host", ())),
                )
                counts = log._at(policy, None)
                counts.successes += int(item["successes"])
                counts.failures += int(item["failures"])
                details = counts.details if counts.details is not None else {}
                counts.details = details
                for kind, sending, mx, ip, reason, n in item["details"]:
                    key = (str(kind), str(sending), str(mx), str(ip), str(reason))
                    details[key] = details.get(key, 0) + int(n)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a TLS report log: {exc!r}") from None
        return log


def _policy_type(value: object) -> PolicyType:
    for known in ("sts", "tlsa", "no-policy-found"):
        if value == known:
            return known
    raise ValueError(f"policy-type {value!r}")


def _number(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a time: {value!r}")
    return float(value)


def _order(item: tuple[ReportPolicy, _Counts]) -> tuple[str, str, tuple[str, ...]]:
    policy = item[0]
    return (policy.domain, policy.type, policy.strings)


def _policy_entry(policy: ReportPolicy, counts: _Counts) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "policy": policy.as_dict(),
        "summary": {
            "total-successful-session-count": counts.successes,
            "total-failure-session-count": counts.failures,
        },
    }
    details = _failure_details((counts.details or {}).items())
    if details:
        entry["failure-details"] = details
    return entry


def _failure_details(items: Iterable[tuple[_FailureKey, int]]) -> list[dict[str, Any]]:
    out = []
    for (kind, sending, mx, ip, reason), n in sorted(items):
        detail: dict[str, Any] = {"result-type": kind}
        if sending:
            detail["sending-mta-ip"] = sending
        if mx:
            detail["receiving-mx-hostname"] = mx
        if ip:
            detail["receiving-ip"] = ip
        detail["failed-session-count"] = n
        if reason:
            detail["failure-reason-code"] = reason
        out.append(detail)
    return out


def _stamp(when: float) -> str:
    """RFC 3339 in UTC, as section 4.4 asks: ``2026-12-06T00:00:00Z``."""
    moment = datetime.datetime.fromtimestamp(when, datetime.UTC).replace(microsecond=0)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
