"""TLS policy for direct delivery: which TLS each recipient domain and each of its MX
hosts is owed, from the policy map, MTA-STS (RFC 8461) and DANE (RFC 7672).

Owns, per domain, the level (``Direct.tls`` or the policy map's entry), the MTA-STS
policy (looked up, fetched, cached in memory and on disk by policy id, refreshed
when the TXT id changes), and per MX host the plan (:func:`plan_host`, pure: use the
host or not, STARTTLS required or not, which certificate check), with DANE (TLSA
looked up only through a resolver the user marks as validating) before MTA-STS. Also
the certificate check DANE needs after the handshake (:func:`dane_context`), since
DANE trusts the TLSA record, not the web PKI.

Why asmtp does not validate DNSSEC itself: validating means walking the chain of
trust from the root keys with every answer's RRSIGs, keeping the root trust anchor
current (RFC 5011) and handling negative proofs (NSEC/NSEC3); a validating resolver
(unbound, BIND, systemd-resolved in validating mode) on the host does this well and
is what Postfix relies on too. asmtp believes its AD bit only when told to
(``Direct(trust_ad=True)``, glibc's ``trust-ad`` option in spirit).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import anyio
import anyio.to_thread

from .._core.dane import TLSARecord, dane_match, usable
from .._core.mtasts import (
    CacheAction,
    CachedPolicy,
    PolicyParseError,
    STSPolicy,
    cache_action,
    parse_policy,
    parse_txt,
    policy_host,
)
from .._core.tlsrpt import ReportPolicy
from .._io.policy_fetch import STS_EXTRA, fetch_policy, httpx_installed
from .._io.resolver import MXResolver, TLSAAnswer
from ..config import Direct, TLSLevel, TLSMode
from ..errors import (
    CertificateError,
    ReplyError,
    SMTPError,
    TLSError,
    TLSUnavailableError,
)
from ..results import RecipientResult, result_from_error
from .endpoint import default_ssl_context

__all__ = [
    "DomainPolicy",
    "HostPlan",
    "PolicyName",
    "TLSPolicies",
    "dane_context",
    "describe_policy",
    "peer_chain",
    "plan_host",
    "refused_by_policy",
    "session_fits",
]

logger = logging.getLogger("asmtp")

#: which policy decided a host's TLS (``RecipientResult.tls_policy``)
PolicyName = Literal["dane", "sts", "sts-testing", "starttls", "opportunistic", "none"]

#: the fetch gets this long at most (RFC 8461 section 3.3 leaves it to the sender)
_FETCH_TIMEOUT = 10.0
_CACHE_ENTRIES = 10_000
#: the warning that MTA-STS goes unhonoured without httpx was given (once a process)
_warned_httpx = False


@dataclass(frozen=True, slots=True)
class DomainPolicy:
    """What a recipient domain is owed: its ``level``, its MTA-STS policy (None: none
    applies), the policy id, and ``failure`` ``(result type, reason)`` when the domain
    published a policy that could not be had (RFC 8460's words, for the TLS report)."""

    domain: str
    level: TLSLevel
    sts: STSPolicy | None = None
    sts_id: str | None = None
    failure: tuple[str, str] | None = None

    @property
    def enforced(self) -> bool:
        return self.sts is not None and self.sts.mode == "enforce"

    def describe(self) -> str:
        """``MTA-STS policy of example.org (enforce, id 2026...)`` for messages."""
        if self.sts is None:
            return f"TLS policy of {self.domain} ({self.level})"
        return f"MTA-STS policy of {self.domain} ({self.sts.mode}, id {self.sts_id})"

    def applied(self, plan: HostPlan, results: Sequence[RecipientResult]) -> list[RecipientResult]:
        """``results`` of a session held to ``plan``, saying so: ``tls_policy``, the
        TLS outcome as the policy names it ("dane" for a TLSA match, "sts" for a
        verified session under an MTA-STS policy), and a TLS failure naming the policy
        that required TLS."""
        out = []
        for result in results:
            tls = result.tls
            if plan.check == "dane" and tls == "unverified":
                tls = "dane"  # the DANE context verifies by TLSA, after the handshake
            elif plan.policy in ("sts", "sts-testing") and tls == "verified":
                tls = "sts"
            message = result.message
            if result.stage == "starttls" and not result.ok and plan.policy in ("sts", "dane"):
                what = self.describe() if plan.policy == "sts" else "DANE (TLSA records)"
                message = f"{message} (required by the {what})"
            out.append(replace(result, tls=tls, tls_policy=plan.policy, message=message))
        return out


@dataclass(frozen=True, slots=True)
class HostPlan:
    """How to talk to one MX host: ``use`` it or not (``reason`` says why not);
    ``tls`` is the session's mode ("starttls": encrypted or not at all); ``check``
    the certificate check ("pkix": the web PKI and the MX name, "dane": the TLSA
    records, "none": encrypted, not authenticated); ``fallback``: a certificate that
    does not verify may be retried unverified (opportunistic TLS, MTA-STS testing)."""

    use: bool
    policy: PolicyName
    tls: TLSMode = "opportunistic"
    check: Literal["pkix", "dane", "none"] = "pkix"
    fallback: bool = False
    tlsa: tuple[TLSARecord, ...] = ()
    reason: str = ""

    def authenticated(self) -> HostPlan:
        """This plan for a REQUIRETLS message (RFC 8689 section 4.2.1): STARTTLS
        required, the certificate verified (the web PKI unless DANE), no fallback."""
        if self.check == "dane":
            return replace(self, tls="starttls", fallback=False)
        return replace(self, tls="starttls", check="pkix", fallback=False)


def plan_host(domain: DomainPolicy, host: str, tlsa: TLSAAnswer | None) -> HostPlan:
    """The plan for MX ``host`` of ``domain`` (pure). ``tlsa``: the host's TLSA answer
    when DANE applies to this domain (a level with DANE and a trusted resolver), else
    None.

    DANE first (RFC 8461 section 2: MTA-STS must not override DANE): validated TLSA
    records make the host DANE-authenticated or unusable; a failed TLSA lookup makes it
    unusable (a validating resolver fails forged answers). Then MTA-STS: in enforce
    mode a host the policy does not name is not used and TLS must verify; in testing
    mode both are only reported. Then the level itself.

    >>> d = DomainPolicy("example.org", "policy", STSPolicy("enforce", ("mx.example.org",), 60))
    >>> plan_host(d, "mx.example.org", None).tls, plan_host(d, "evil.example", None).use
    ('starttls', False)
    """
    level = domain.level
    if level == "none":
        return HostPlan(True, "none", tls="none")
    if level == "starttls":
        return HostPlan(True, "starttls", tls="starttls")
    if level == "opportunistic":
        return HostPlan(True, "opportunistic", fallback=True)
    if tlsa is not None:
        if tlsa.failure is not None:
            return HostPlan(False, "dane", reason=f"TLSA lookup for {host} failed: {tlsa.failure}")
        if tlsa.authenticated and tlsa.records:
            records = tuple(usable(tlsa.records))
            # RFC 7672 section 2.2: only unusable records: TLS still owed, no authentication
            return HostPlan(
                True, "dane", tls="starttls", check="dane" if records else "none", tlsa=records
            )
    sts = domain.sts
    if sts is not None and sts.mode == "enforce":
        if not sts.allows(host):
            return HostPlan(
                False,
                "sts",
                reason=f"{host} is not an MX host the {domain.describe()} allows "
                f"(mx: {', '.join(sts.mx)})",
            )
        return HostPlan(True, "sts", tls="starttls")
    if sts is not None and sts.mode == "testing":
        return HostPlan(True, "sts-testing", fallback=True)
    return HostPlan(True, "opportunistic", fallback=True)


class TLSPolicies:
    """The domains' policies for one :class:`~asmtp._delivery.direct.DirectDelivery`:
    the MTA-STS cache (in memory; on disk too with ``Direct(sts_cache=DIR)``), one
    lookup and fetch per domain at a time. ``clock`` gives wall-clock seconds (the
    cache's times outlive the process)."""

    def __init__(
        self,
        settings: Direct,
        resolver: MXResolver,
        *,
        clock: Callable[[], float] = time.time,
        unverified: ssl.SSLContext | None = None,
    ) -> None:
        self.settings = settings
        self.resolver = resolver
        self.clock = clock
        self.fetches = 0
        self._memory: dict[str, CachedPolicy] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._dir = None if settings.sts_cache is None else Path(os.fspath(settings.sts_cache))
        self._context = settings.ssl_context or default_ssl_context()
        self._unverified = unverified
        self._dane: dict[tuple[str, tuple[TLSARecord, ...]], ssl.SSLContext] = {}

    def context_for(
        self, plan: HostPlan, host: str, domain: str, verified: ssl.SSLContext
    ) -> ssl.SSLContext | None:
        """The TLS context of a session held to ``plan`` (None: plaintext)."""
        if plan.tls == "none":
            return None
        if plan.check == "none" and self._unverified is not None:
            return self._unverified
        if plan.check == "dane":
            key = (host, plan.tlsa)
            context = self._dane.get(key)
            if context is None:
                if len(self._dane) >= _CACHE_ENTRIES:
                    self._dane.clear()
                context = self._dane[key] = dane_context(plan.tlsa, (host, domain))
            return context
        return verified

    def report(
        self,
        policy: DomainPolicy,
        plan: HostPlan,
        host: str,
        address: str,
        results: Sequence[RecipientResult],
        error: SMTPError | None,
    ) -> None:
        """Count one session (or one host ruled out) in ``Direct(tls_report=...)``."""
        log = self.settings.tls_report
        if log is None or not results:
            return
        now = self.clock()
        sending = self.settings.source_address or ""
        target = _report_policy(policy, plan)
        if policy.failure is not None and plan.policy not in ("sts", "sts-testing", "dane"):
            kind, why = policy.failure
            log.failure(target, kind, mx_host=host, receiving_ip=address, reason=why, now=now)
            return
        outcome = _outcome(plan, results[0], error)
        if outcome is None:
            return
        if outcome == "":
            log.success(target, now=now)
        else:
            reason = plan.reason if not plan.use else (error.message if error else "")
            log.failure(
                target,
                outcome,
                mx_host=host,
                receiving_ip=address,
                sending_ip=sending,
                reason=reason,
                now=now,
            )

    def level(self, domain: str) -> TLSLevel:
        return self.settings.level_for(domain)

    def dane_applies(self, policy: DomainPolicy) -> bool:
        return self.settings.trust_ad and policy.level in ("dane", "policy")

    async def tlsa(self, policy: DomainPolicy, host: str) -> TLSAAnswer | None:
        """The TLSA answer of ``host`` when DANE applies to ``policy``'s domain."""
        if not self.dane_applies(policy) or not _is_name(host):
            return None
        return await self.resolver.tlsa(host, 25)

    async def for_domain(self, domain: str) -> DomainPolicy:
        """``domain``'s level and, when the level honours MTA-STS, its policy."""
        domain = domain.lower().rstrip(".")
        level = self.level(domain)
        if level not in ("sts", "policy") or not _is_name(domain):
            return DomainPolicy(domain, level)
        lock = self._locks.get(domain)
        if lock is None:
            lock = self._locks[domain] = anyio.Lock()
        try:
            async with lock:  # concurrent recipients of a domain: one lookup, one fetch
                return await self._sts(domain, level)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._locks.pop(domain, None)  # the memory cache answers from now on

    async def _sts(self, domain: str, level: TLSLevel) -> DomainPolicy:
        strings = await self.resolver.txt(f"_mta-sts.{domain}")
        record = parse_txt(strings or ())
        cached = self._memory.get(domain)
        if cached is None and self._dir is not None:
            cached = await anyio.to_thread.run_sync(_read_cached, self._dir, domain)
        now = self.clock()
        action = cache_action(cached, record, now)
        if action is CacheAction.NO_POLICY:
            return DomainPolicy(domain, level)
        if action is CacheAction.USE_CACHED:
            assert cached is not None
            self._remember(domain, cached)
            return _applied(domain, level, cached)
        assert record is not None
        fetched, failure = await self._fetch(domain, record.id, now)
        if fetched is not None:
            self._remember(domain, fetched)
            if self._dir is not None:
                await anyio.to_thread.run_sync(_write_cached, self._dir, domain, fetched)
            return _applied(domain, level, fetched)
        # RFC 8461 section 5.1: a failed refresh keeps a fresh cached policy; without
        # one the domain is treated as having none (and the failure reported)
        if cached is not None and cached.fresh(now):
            return _applied(domain, level, cached, failure)
        return DomainPolicy(domain, level, failure=failure)

    async def _fetch(
        self, domain: str, record_id: str, now: float
    ) -> tuple[CachedPolicy | None, tuple[str, str]]:
        self.fetches += 1
        addresses = await self.resolver.addresses(policy_host(domain))
        got = await fetch_policy(
            domain,
            addresses,
            ssl_context=self._context,
            timeout=min(_FETCH_TIMEOUT, 2 * self.settings.dns_timeout + 5.0),
            port=self.settings.sts_port,
        )
        if got.text is None:
            global _warned_httpx
            if not httpx_installed() and not _warned_httpx:
                _warned_httpx = True
                logger.warning(
                    "%s publishes an MTA-STS policy and httpx is not installed: MTA-STS "
                    "policies are not honoured (%s)",
                    domain,
                    STS_EXTRA,
                )
            logger.info("MTA-STS policy of %s not fetched: %s", domain, got.failure)
            return None, (got.result_type, got.failure)
        try:
            policy = parse_policy(got.text)
        except PolicyParseError as exc:
            logger.info("MTA-STS policy of %s not valid: %s", domain, exc)
            return None, ("sts-policy-invalid", str(exc))
        return CachedPolicy(record_id, policy, now), ("", "")

    def _remember(self, domain: str, cached: CachedPolicy) -> None:
        if domain not in self._memory and len(self._memory) >= _CACHE_ENTRIES:
            del self._memory[next(iter(self._memory))]
        self._memory[domain] = cached


async def describe_policy(
    policies: TLSPolicies, domain: str, hosts: Sequence[str]
) -> dict[str, object]:
    """What direct delivery would hold ``domain``'s MX ``hosts`` to, as JSON
    (``asmtp mx --json``): the level, the MTA-STS policy (or why there is none) and
    each host's plan."""
    policy = await policies.for_domain(domain)
    out: dict[str, object] = {"level": policy.level}
    if policy.sts is not None:
        out["mta_sts"] = {
            "id": policy.sts_id,
            "mode": policy.sts.mode,
            "mx": list(policy.sts.mx),
            "max_age": policy.sts.max_age,
        }
    if policy.failure is not None:
        out["mta_sts_error"] = {"result_type": policy.failure[0], "message": policy.failure[1]}
    plans = []
    for host in hosts:
        tlsa = await policies.tlsa(policy, host)
        plan = plan_host(policy, host, tlsa)
        entry: dict[str, object] = {"host": host, "policy": plan.policy, "use": plan.use}
        entry["tls"] = "required" if plan.tls == "starttls" else plan.tls
        if plan.reason:
            entry["reason"] = plan.reason
        if tlsa is not None and tlsa.records:
            entry["tlsa"] = [r.text() for r in tlsa.records]
            entry["tlsa_authenticated"] = tlsa.authenticated
        plans.append(entry)
    out["hosts"] = plans
    return out


def session_fits(plan: HostPlan, tls: str, *, requiretls: bool = False) -> bool:
    """Whether an open session whose TLS outcome is ``tls`` may carry mail held to
    ``plan`` (a session kept for reuse may have been opened for another domain).

    >>> strict = HostPlan(True, "sts", tls="starttls")
    >>> session_fits(strict, "unverified"), session_fits(strict, "verified")
    (False, True)
    """
    if not plan.use:
        return False
    if requiretls or plan.tls == "starttls":
        if plan.check == "dane":
            return tls == "dane"
        if plan.check == "none":
            return tls != "none" and not requiretls
        return tls in ("verified", "sts", "dane")
    return True


def refused_by_policy(
    recipients: Sequence[str], host: str, plan: HostPlan, policy: DomainPolicy, started: float
) -> list[RecipientResult]:
    """The results when ``plan`` rules MX ``host`` out: transient, at the TLS stage,
    the message naming the policy (another host, or a later try, may do)."""
    error = TLSError(plan.reason, stage="starttls")
    elapsed = max(0.0, anyio.current_time() - started)
    return [
        replace(
            result_from_error(r, error, host=host, elapsed=elapsed),
            tls_policy=plan.policy,
        )
        for r in recipients
    ]


def _report_policy(policy: DomainPolicy, plan: HostPlan) -> ReportPolicy:
    if plan.policy == "dane":
        return ReportPolicy("tlsa", policy.domain, tuple(r.text() for r in plan.tlsa))
    if plan.policy in ("sts", "sts-testing") and policy.sts is not None:
        return ReportPolicy("sts", policy.domain, tuple(policy.sts.lines()), policy.sts.mx)
    if policy.failure is not None:
        return ReportPolicy("sts", policy.domain)
    return ReportPolicy("no-policy-found", policy.domain)


def _outcome(plan: HostPlan, first: RecipientResult, error: SMTPError | None) -> str | None:
    """RFC 8460's word for one session: "" for a success, a result type for a
    failure, None for a session that says nothing of TLS (plaintext by choice, or
    ended before STARTTLS: a refused connection)."""
    if not plan.use:
        return "dnssec-invalid" if plan.reason.startswith("TLSA lookup") else "validation-failure"
    if error is not None and error.stage == "starttls":
        if isinstance(error, (TLSUnavailableError, ReplyError)):
            return "starttls-not-supported"
        if isinstance(error, CertificateError):
            text = error.message.lower()
            if "dane:" in text:
                return "validation-failure"
            if "hostname mismatch" in text or "match" in text:
                return "certificate-host-mismatch"
            if "expired" in text:
                return "certificate-expired"
            return "certificate-not-trusted"
        return "validation-failure"
    if first.tls in ("verified", "dane", "sts"):
        return ""
    if first.tls == "unverified":
        # encrypted, not authenticated: a success only when nothing more was owed
        return "" if plan.policy in ("opportunistic", "dane") else None
    if plan.policy == "sts-testing" and first.stage not in ("connect", "greeting", "ehlo"):
        return "starttls-not-supported"  # testing mode: went on in plaintext
    return None


def _applied(
    domain: str, level: TLSLevel, cached: CachedPolicy, failure: tuple[str, str] | None = None
) -> DomainPolicy:
    if cached.policy.mode == "none":  # section 5: as if there were no policy
        return DomainPolicy(domain, level, failure=failure)
    return DomainPolicy(domain, level, cached.policy, cached.id, failure)


def _is_name(host: str) -> bool:
    """A DNS name, not an address literal's address."""
    return any(c.isalpha() for c in host) and ":" not in host


def _cache_file(directory: Path, domain: str) -> Path:
    return directory / f"{domain}.json"


def _read_cached(directory: Path, domain: str) -> CachedPolicy | None:
    """The policy cached on disk for ``domain``; None when there is none or the file
    does not hold one (a broken file is only a cache miss)."""
    try:
        data = json.loads(_cache_file(directory, domain).read_text("utf-8"))
        return CachedPolicy(str(data["id"]), parse_policy(data["policy"]), float(data["fetched"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cached(directory: Path, domain: str, cached: CachedPolicy) -> None:
    """Write the cache file whole (a temporary file renamed over it)."""
    record = {"domain": domain, "id": cached.id, "fetched": cached.fetched}
    record["policy"] = cached.policy.text
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target = _cache_file(directory, domain)
        temporary = target.with_name(f".{target.name}.{os.getpid()}")
        temporary.write_text(json.dumps(record), "utf-8")
        os.replace(temporary, target)
    except OSError as exc:
        logger.warning("MTA-STS cache %s not written: %s", directory, exc)


# --------------------------------------------------------------------------- DANE


class _DANEObject(ssl.SSLObject):
    """Runs the context's DANE check once the handshake is done: the certificate
    check of a DANE host is the TLSA match, made before any SMTP command is sent."""

    def do_handshake(self) -> None:
        super().do_handshake()  # raises SSLWantReadError until the handshake is done
        context = self.context
        assert isinstance(context, _DANEContext)
        result = dane_match(context.tlsa, peer_chain(self), context.names, _utcnow())
        if not result.ok:
            error = ssl.SSLCertVerificationError(1, f"DANE: {result.reason}")
            error.verify_message = f"DANE: {result.reason}"
            error.verify_code = 1
            raise error


class _DANEContext(ssl.SSLContext):
    """A client context whose handshake is checked against TLSA records, not the web
    PKI (which DANE-EE and DANE-TA do without)."""

    sslobject_class = _DANEObject
    #: what the session's results say of TLS under this context (tls_state_of)
    tls_state = "dane"
    tlsa: tuple[TLSARecord, ...]
    names: tuple[str, ...]


def dane_context(tlsa: tuple[TLSARecord, ...], names: tuple[str, ...]) -> ssl.SSLContext:
    """A context for a DANE host: TLS 1.2 or later, no web-PKI verification (the TLSA
    match after the handshake replaces it); ``names`` are DANE-TA's reference
    identifiers (the MX host name, then the recipient domain)."""
    context = _DANEContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.tlsa = tlsa
    context.names = names
    return context


def peer_chain(obj: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, its own first, as DER.

    Python 3.13 has ``get_unverified_chain()``; 3.11 and 3.12 have the same method on
    the C object under it (``_sslobj``). Without either, the server's own certificate
    alone (DANE-EE still works; DANE-TA then needs the anchor to be that certificate).
    """
    getter = getattr(obj, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(obj, "_sslobj", None), "get_unverified_chain", None)
    chain = getter() if getter is not None else None
    if chain:
        return [c if isinstance(c, bytes) else c.public_bytes(_DER) for c in chain]
    leaf = obj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


_DER = 2  # _ssl.ENCODING_DER


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
