"""Direct delivery: each recipient's mail goes to its domain's mail exchangers
(RFC 5321 section 5.1), as a mail server sends it.

Owns walking the MX hosts and their addresses (with a cap), deciding after each try
whether the next address may still succeed (:func:`next_address_may_help`, a pure
function of the result), each host's TLS as the domain's policy has it (DANE, MTA-STS,
the policy map: :mod:`~asmtp._delivery.tlspolicy` decides, this module connects), with
opportunistic TLS's fall-back to an unverified session,
the per-domain cap on sessions, and batching and ordering the sessions
(:func:`plan_jobs`). With ``Direct(shaping=...)``, a job first takes its place at its
site (:mod:`~asmtp._delivery.sites`: the limits, rates and adaptive state shared by
every domain on the same MX hosts), carries on a session the site hands over, keeps
the session it opened for the next job, and is tried again at the site when the site
throttled it (:meth:`DirectDelivery._shaped`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace

import anyio

from .._core.address import domain_of
from .._core.prepared import PreparedMessage
from .._io.resolver import MXHost, MXResolver
from ..config import Direct, Timeouts, TLSMode, as_proxy
from ..errors import CertificateError, ResolveError, SMTPError, Stage, deadline_passed
from ..results import Attempt, RecipientResult, result_from_error
from . import telemetry
from .dispatch import run_session
from .endpoint import Endpoint, default_ssl_context
from .pool import worth_a_fresh_session
from .session import Session
from .shaping import Outcome
from .sites import Lease, Site, SiteLimiter, site_name
from .tlspolicy import (
    DomainPolicy,
    HostPlan,
    TLSPolicies,
    plan_host,
    refused_by_policy,
    session_fits,
)
from .transaction import NO_EXTRAS, Extras

__all__ = ["DirectDelivery", "next_address_may_help", "plan_jobs"]

# Stages before the recipient was accepted: a failure there says nothing about the
# recipient, so another exchanger may take the mail.
_BEFORE_TRANSACTION: frozenset[Stage] = frozenset(
    {"connect", "greeting", "ehlo", "starttls", "auth"}
)
_TRANSIENT_RETRYABLE: frozenset[Stage] = _BEFORE_TRANSACTION | {"mail", "rcpt"}


def next_address_may_help(result: RecipientResult) -> bool:
    """Whether to try the next MX address after this result.

    Connection failures, timeouts, a 4xx or 5xx greeting, a TLS failure, or a 4xx
    before the recipient was accepted: yes. Delivered, a 5xx to MAIL or RCPT, a
    failure after the recipient was accepted, or an unknown outcome (the dot went out):
    no, that result is final.
    """
    if result.status == "transient":
        return result.stage in _TRANSIENT_RETRYABLE
    if result.status == "permanent":
        return result.stage in _BEFORE_TRANSACTION
    return False


def plan_jobs(recipients: Sequence[str], settings: Direct) -> list[list[int]]:
    """Group recipient indexes into sessions, in the order to run them.

    One recipient per session, or with ``batch_per_domain`` up to
    ``max_rcpts_per_transaction`` of one domain per session. The sessions of the
    different domains take turns: the pool starts jobs in list order, and a list
    opening with one busy domain would leave every worker waiting for that domain's
    ``per_domain`` cap while the other domains' mail sat behind it.

    >>> plan_jobs(["a@x.test", "b@x.test", "c@X.test", "d@y.test"], Direct())
    [[0], [3], [1], [2]]
    >>> plan_jobs(["a@x.test", "b@y.test", "c@x.test"], Direct(batch_per_domain=True))
    [[0, 2], [1]]
    """
    size = settings.max_rcpts_per_transaction if settings.batch_per_domain else 1
    by_domain: dict[str, list[list[int]]] = {}
    for i, rcpt in enumerate(recipients):
        jobs = by_domain.setdefault(domain_of(rcpt), [])
        if not jobs or len(jobs[-1]) >= size:
            jobs.append([])
        jobs[-1].append(i)
    turns = itertools.zip_longest(*by_domain.values())
    return [job for turn in turns for job in turn if job is not None]


def _unverified_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class DirectDelivery:
    """Delivers to MX hosts with one resolver (shared cache) and per-domain limits.
    Built once per send; shared by all its sessions."""

    def __init__(
        self, settings: Direct, timeouts: Timeouts, *, helo: str, debug: bool = False
    ) -> None:
        self.settings = settings
        self.timeouts = timeouts
        self.helo = helo
        self.debug = debug
        self.resolver = MXResolver(
            settings.dns_servers, settings.dns_timeout, rng=settings.rng, trust_ad=settings.trust_ad
        )
        # the policy map may give each domain its own level: every context is at hand
        self._context = settings.ssl_context or default_ssl_context()
        self._fallback = _unverified_context()
        #: each domain's TLS policy (levels, MTA-STS cache, DANE lookups)
        self.policies = TLSPolicies(settings, self.resolver, unverified=self._fallback)
        self._limits: dict[str, anyio.Semaphore] = {}
        #: the sites of this run (None: no shaping, fixed limits)
        self.sites = SiteLimiter(settings.shaping) if settings.shaping is not None else None

    def _limit(self, domain: str) -> anyio.Semaphore:
        sem = self._limits.get(domain)
        if sem is None:
            sem = self._limits[domain] = anyio.Semaphore(self.settings.per_domain)
        return sem

    async def deliver(
        self,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        *,
        extras: Extras = NO_EXTRAS,
        deadline: float | None = None,
    ) -> list[RecipientResult]:
        """Deliver to recipients of one domain; one result each, in order.

        Each result carries every attempt in ``tried``; one that ran out of addresses
        is the last failure, made transient when an earlier attempt failed only for
        now (a 5xx greeting from a backup while the primary is down is no bounce).
        ``deadline`` (event loop time) bounds the lookup, the wait for the domain's
        session cap and every session; no new address is tried once it has passed.
        """
        job = _Job(sender, message, extras, deadline, anyio.current_time())
        domain = domain_of(recipients[0])
        try:
            with _until(deadline):
                hosts = await self.resolver.resolve(domain)
        except ResolveError as exc:
            return job.failed(recipients, exc, host=None)
        except TimeoutError:
            late = deadline_passed("dns", "during the MX lookup", domain=domain)
            return job.failed(recipients, late, host=None)
        job = replace(job, site=site_name(hosts))
        limit = self._limit(domain)
        try:
            with _until(deadline):
                await limit.acquire()
        except TimeoutError:
            cap = f"(per_domain={self.settings.per_domain})"
            waited = deadline_passed("connect", f"waiting for a session to {domain} {cap}")
            return job.failed(recipients, waited, host=hosts[0].name)
        try:
            if self.sites is not None:
                return await self._shaped(self.sites.site_for(hosts), hosts, recipients, job)
            return await self._walk(hosts, recipients, job)
        finally:
            limit.release()

    async def _shaped(
        self, site: Site, hosts: list[MXHost], recipients: Sequence[str], job: _Job
    ) -> list[RecipientResult]:
        """Deliver through the site: take a place there (waiting for its limit, pause
        and rate), send on the session handed over or walk the MX hosts, hand the
        session on; recipients the site throttled go again, up to ``requeue`` times."""
        assert self.settings.shaping is not None
        final: dict[str, RecipientResult] = {}
        pending = list(recipients)
        results: list[RecipientResult] = []
        for round_ in range(self.settings.shaping.requeue + 1):
            try:
                lease = await site.acquire(job.deadline)
            except SMTPError as exc:
                for result in job.failed(pending, exc, host=hosts[0].name):
                    final[result.recipient] = result
                break
            try:
                handed = None
                if lease.session is not None:
                    handed = await self._on_handed_over(lease, pending, job)
                if handed is None:
                    handed = await self._walk(hosts, pending, replace(job, lease=lease))
                results = handed
            finally:
                await site.release(lease)
            throttled = lease.outcome in _THROTTLED and round_ < self.settings.shaping.requeue
            for result in results:
                if not (throttled and result.status == "transient"):
                    final[result.recipient] = result
            pending = [r for r in pending if r not in final]
            if not pending or (job.deadline is not None and anyio.current_time() >= job.deadline):
                break
        for result in results if pending else ():
            final.setdefault(result.recipient, result)
        return [final[r] for r in recipients]

    async def _on_handed_over(
        self, lease: Lease, recipients: Sequence[str], job: _Job
    ) -> list[RecipientResult] | None:
        """A transaction on the session the site handed over (no new connection, no
        RSET: the last transaction ended cleanly); None when that session turned out
        to be gone before anything was sent (then the job opens its own)."""
        session, site = lease.session, lease.site
        assert session is not None
        # The site's domains share MX hosts, not TLS policies: a session opened for one
        # domain carries another's mail only if it meets that domain's policy too.
        policy = await self.policies.for_domain(domain_of(recipients[0]))
        host = session.endpoint.host
        plan = plan_host(policy, host, await self.policies.tlsa(policy, host))
        if not session_fits(plan, session.tls, requiretls=job.extras.requiretls):
            return None
        try:
            await site.message_turn(job.deadline)
        except SMTPError as exc:
            return job.failed(recipients, exc, host=session.endpoint.host)
        results = None
        with anyio.move_on_at(math.inf if job.deadline is None else job.deadline):
            results = await session.deliver_all(
                job.sender, recipients, job.message, started=job.started, extras=job.extras
            )
        if results is None:  # the deadline passed
            late = deadline_passed(session.stage)
            results = [
                result_from_error(
                    r, late, host=session.endpoint.host, tls=session.tls, dot_sent=session.dot_sent
                )
                for r in recipients
            ]
        if worth_a_fresh_session(results[0], still_open=session.is_open, reused=True, fresh=False):
            lease.session = lease.usage = None
            await site.close(session)
            return None
        site.record(lease, results)
        address = session.endpoint.addresses[0] if session.endpoint.addresses else ""
        return [
            _with_tried(r, [Attempt(host, address, r.stage, r.code, r.message)], job.site)
            for r in policy.applied(plan, results)
        ]

    async def _walk(
        self, hosts: list[MXHost], recipients: Sequence[str], job: _Job
    ) -> list[RecipientResult]:
        tried: dict[str, list[Attempt]] = {r: [] for r in recipients}
        final: dict[str, RecipientResult] = {}
        # recipients that met a temporary failure somewhere: a later try may get through
        deferred: set[str] = set()
        pending = list(recipients)
        budget = self.settings.max_addresses
        last: list[RecipientResult] = []
        policy = await self.policies.for_domain(domain_of(recipients[0]))
        for host in hosts:
            if not pending:
                break
            plan = plan_host(policy, host.name, await self.policies.tlsa(policy, host.name))
            if not plan.use:  # the domain's policy rules this host out (TLS-RPT counts it)
                refused = refused_by_policy(pending, host.name, plan, policy, job.started)
                self.policies.report(policy, plan, host.name, "", refused, None)
                for result in refused:
                    tried[result.recipient].append(
                        Attempt(host.name, "", result.stage, None, result.message)
                    )
                    deferred.add(result.recipient)
                last = last or refused  # a session's own failure says more
                continue
            for address in host.addresses:
                if budget <= 0 or not pending:
                    break
                if last and job.deadline is not None and anyio.current_time() >= job.deadline:
                    break
                budget -= 1
                sessions = await self._try(host.name, address, pending, job, policy, plan)
                for results in sessions:
                    for result in results:
                        tried[result.recipient].append(
                            Attempt(host.name, address, result.stage, result.code, result.message)
                        )
                last = sessions[-1]
                for result in last:
                    if not next_address_may_help(result):
                        final[result.recipient] = result
                    elif result.status == "transient":
                        deferred.add(result.recipient)
                pending = [r for r in pending if r not in final]
        for result in last:  # out of addresses: the last failure stands
            if result.recipient not in final:
                if result.status == "permanent" and result.recipient in deferred:
                    # e.g. the primary unreachable, the backup refusing at greeting:
                    # not a reason to give up on the recipient for good
                    result = replace(result, status="transient")
                final[result.recipient] = result
        return [_with_tried(final[r], tried[r], job.site) for r in recipients]

    async def _try(
        self,
        host: str,
        address: str,
        recipients: Sequence[str],
        job: _Job,
        policy: DomainPolicy,
        plan: HostPlan,
    ) -> list[list[RecipientResult]]:
        """One try at one address, with the TLS ``plan`` says: the results of each
        session it took (two when a certificate that does not verify is retried without
        verification), each marked with the policy and its TLS outcome."""
        if job.extras.requiretls:  # RFC 8689: authenticated TLS or nothing
            plan = plan.authenticated()
        context = self.policies.context_for(plan, host, policy.domain, self._context)
        results, error = await self._session(host, address, recipients, job, plan.tls, context)
        results = policy.applied(plan, results)
        self.policies.report(policy, plan, host, address, results, error)
        sessions = [results]
        if isinstance(error, CertificateError) and plan.fallback:
            # Opportunistic TLS (RFC 7435): a certificate that does not verify still
            # beats plaintext. Connect again, encrypt without verifying, and say so.
            results, _ = await self._session(
                host, address, recipients, job, "opportunistic", self._fallback
            )
            sessions.append(policy.applied(plan, results))
        return sessions

    async def _session(
        self,
        host: str,
        address: str,
        recipients: Sequence[str],
        job: _Job,
        tls: TLSMode,
        context: ssl.SSLContext | None,
    ) -> tuple[list[RecipientResult], SMTPError | None]:
        settings = self.settings
        endpoint = Endpoint(
            host=host,
            port=settings.port,
            helo=self.helo,
            tls=tls,
            ssl_context=context,
            addresses=(address,),
            source_address=settings.source_address,
            proxy=as_proxy(settings.proxy),
            chunking=settings.chunking,
        )
        if job.lease is not None:
            return await self._kept_session(endpoint, recipients, job, job.lease)
        return await run_session(
            endpoint,
            self.timeouts,
            job.sender,
            recipients,
            job.message,
            debug=self.debug,
            started=job.started,
            extras=job.extras,
            deadline=job.deadline,
        )

    async def _kept_session(
        self, endpoint: Endpoint, recipients: Sequence[str], job: _Job, lease: Lease
    ) -> tuple[list[RecipientResult], SMTPError | None]:
        """A new session to ``endpoint`` within the site's rates, left open in
        ``lease`` after its transaction, for the site to hand on."""
        site = lease.site
        try:
            await site.connection_turn(job.deadline)
            await site.message_turn(job.deadline)
        except SMTPError as exc:
            return job.failed(recipients, exc, host=endpoint.host), exc
        hooks = telemetry.hooks
        observer = None if hooks is None else hooks.pooled_session(endpoint)
        session = Session(endpoint, self.timeouts, debug=self.debug, on_stage=observer)
        error: SMTPError | None = None
        try:
            with _until(job.deadline):
                await session.connect()
        except SMTPError as exc:
            error = exc
        except TimeoutError:
            error = deadline_passed(session.stage)
        except BaseException:
            session.abort()
            raise
        if error is not None:
            session.abort()
            results = job.failed(recipients, error, host=endpoint.host)
            results = [replace(r, tls=session.tls) for r in results]
            site.record(lease, results)
            return results, error
        site.opened()
        if lease.session is not None:  # an earlier address's session: not the one to keep
            await site.close(lease.session)
        lease.keep(session, site.clock())
        final = None
        with anyio.move_on_at(math.inf if job.deadline is None else job.deadline):
            final = await session.deliver_all(
                job.sender, recipients, job.message, started=job.started, extras=job.extras
            )
        if final is None:
            late = deadline_passed(session.stage)
            final = [
                result_from_error(
                    r, late, host=endpoint.host, tls=session.tls, dot_sent=session.dot_sent
                )
                for r in recipients
            ]
        site.record(lease, final)
        return final, None


_THROTTLED = frozenset({Outcome.THROTTLED, Outcome.RATE_LIMITED, Outcome.PAUSE})


@dataclass(frozen=True, slots=True)
class _Job:
    """What every session of one :meth:`DirectDelivery.deliver` call shares (times
    are event loop time, as :func:`anyio.current_time` gives it)."""

    sender: str
    message: PreparedMessage
    extras: Extras
    deadline: float | None
    started: float
    #: the job's site (direct delivery names it in every result)
    site: str | None = None
    #: the job's place at its site, when shaping
    lease: Lease | None = None

    def failed(
        self, recipients: Sequence[str], error: SMTPError, *, host: str | None
    ) -> list[RecipientResult]:
        elapsed = anyio.current_time() - self.started
        results = [
            result_from_error(r, error, host=host, elapsed=elapsed, site=self.site)
            for r in recipients
        ]
        if telemetry.hooks is not None:
            telemetry.hooks.unsent(results, error)
        return results


def _until(deadline: float | None) -> contextlib.AbstractContextManager[object]:
    """A scope raising TimeoutError at ``deadline`` (event loop time), or no limit."""
    if deadline is None:
        return contextlib.nullcontext()
    return anyio.fail_after(max(0.0, deadline - anyio.current_time()))


def _with_tried(
    result: RecipientResult, tried: list[Attempt], site: str | None = None
) -> RecipientResult:
    if not tried and site is None:
        return result
    return replace(result, tried=tuple(tried) or result.tried, site=site or result.site)
