"""What a send returns: one :class:`RecipientResult` per recipient, gathered in a
:class:`Report`. Pure data, no I/O; also how any :class:`~asmtp.errors.SMTPError`
becomes a result (:func:`result_from_error`), so there is one classification rule,
which a bug caught while delivering follows too (:func:`internal_error`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ReplyError, ResolveError, SMTPError, Stage

__all__ = [
    "Attempt",
    "RecipientResult",
    "Report",
    "Status",
    "TLSState",
    "internal_error",
    "result_from_error",
]

Status = Literal["delivered", "transient", "permanent", "unknown"]
#: "verified": the web PKI and the host name; "dane": the server's TLSA records (RFC
#: 7672); "sts": verified as the domain's MTA-STS policy asks (RFC 8461)
TLSState = Literal["verified", "dane", "sts", "unverified", "none"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """One try at one address of one host (direct delivery walks several)."""

    host: str
    address: str
    stage: Stage
    code: int | None
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """The outcome for one recipient.

    ``status`` is "delivered"; "transient" (may succeed later); "permanent" (will not);
    or "unknown" (the end-of-data dot was sent and no reply came: it may have been
    delivered, so it must not be blindly retried). ``stage`` says where it ended.
    ``tls`` is the TLS outcome; in direct delivery ``tls_policy`` names the policy the
    host was held to ("dane", "sts", "sts-testing", "starttls", "opportunistic",
    "none").
    """

    recipient: str
    status: Status
    code: int | None = None
    enhanced_status: str | None = None
    message: str = ""
    stage: Stage = "message"
    host: str | None = None
    tls: TLSState = "none"
    elapsed: float = 0.0
    tried: tuple[Attempt, ...] = ()
    key: Any = None
    #: how many times delivery was tried (retries of transient failures)
    attempts: int = 1
    #: direct delivery: the TLS policy the MX host was held to
    tls_policy: str | None = None
    #: direct delivery: the site (the MX hosts its domain resolves to, sorted, comma
    #: separated) whose limits and state the recipient shared
    site: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "delivered"

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``asmtp send --json`` prints one per line)."""
        out: dict[str, Any] = {
            "recipient": self.recipient,
            "status": self.status,
            "code": self.code,
            "enhanced_status": self.enhanced_status,
            "message": self.message,
            "stage": self.stage,
            "host": self.host,
            "tls": self.tls,
            "elapsed": round(self.elapsed, 6),
        }
        if self.tried:
            out["tried"] = [a.as_dict() for a in self.tried]
        if self.key is not None:
            out["key"] = self.key
        if self.attempts != 1:
            out["attempts"] = self.attempts
        if self.site is not None:
            out["site"] = self.site
        if self.tls_policy is not None:
            out["tls_policy"] = self.tls_policy
        return out


@dataclass(frozen=True, slots=True)
class Report(Sequence[RecipientResult]):
    """Every recipient's result, in the order the recipients were given."""

    results: tuple[RecipientResult, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        """True when every recipient was delivered (and there was at least one)."""
        return bool(self.results) and all(r.status == "delivered" for r in self.results)

    def counts(self) -> Mapping[str, int]:
        """How many recipients ended in each status."""
        return Counter(r.status for r in self.results)

    def failed(self) -> tuple[RecipientResult, ...]:
        return tuple(r for r in self.results if r.status != "delivered")

    def __getitem__(self, index: int) -> RecipientResult:  # type: ignore[override]
        return self.results[index]

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self) -> Iterator[RecipientResult]:
        return iter(self.results)


def result_from_error(
    recipient: str,
    error: SMTPError,
    *,
    host: str | None = None,
    tls: TLSState = "none",
    elapsed: float = 0.0,
    dot_sent: bool = False,
    tried: tuple[Attempt, ...] = (),
    key: Any = None,
    site: str | None = None,
) -> RecipientResult:
    """Classify a failure: a reply error keeps its code; a local failure after the
    end-of-data dot was sent is "unknown" (RFC 5321 section 6.1: it may have arrived)."""
    code: int | None = None
    enhanced: str | None = None
    if isinstance(error, ReplyError):
        code, enhanced = error.code, error.enhanced_status
    elif isinstance(error, ResolveError):
        enhanced = error.enhanced_status
    status: Status
    if dot_sent and not isinstance(error, ReplyError):
        status = "unknown"
    else:
        status = "permanent" if error.permanent else "transient"
    return RecipientResult(
        recipient=recipient,
        status=status,
        code=code,
        enhanced_status=enhanced,
        message=error.message,
        stage=error.stage or "connect",
        host=host,
        tls=tls,
        elapsed=elapsed,
        tried=tried,
        key=key,
        site=site,
    )


def internal_error(
    recipient: str,
    exc: BaseException,
    *,
    stage: Stage | None = None,
    dot_sent: bool = False,
    host: str | None = None,
    tls: TLSState = "none",
    elapsed: float = 0.0,
    key: Any = None,
) -> RecipientResult:
    """The result for a recipient whose delivery a bug in asmtp cut short (``exc``,
    logged where it was caught), classified by the one rule of
    :func:`result_from_error`: "unknown" when the end-of-data dot had been sent (the
    message may have arrived, RFC 5321 section 6.1: sending it again could make a
    duplicate), else "transient" (the recipient is not at fault; a later try may
    pass). ``stage`` is where the session was; without one (the bug was outside any
    session) it is "connect", as for any error that names no stage.

    >>> internal_error("a@example.org", KeyError("x"), stage="rcpt").status
    'transient'
    >>> internal_error("a@example.org", KeyError("x"), stage="message", dot_sent=True).status
    'unknown'
    """
    return result_from_error(
        recipient,
        SMTPError(f"internal error: {exc!r}", stage=stage),
        host=host,
        tls=tls,
        elapsed=elapsed,
        dot_sent=dot_sent,
        key=key,
    )
