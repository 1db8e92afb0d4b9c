"""Direct delivery: each recipient's mail goes to its domain's mail exchangers
(RFC 5321 section 5.1), as a mail server sends it.

Owns walking the MX hosts and their addresses (with a cap), deciding after each try
whether the next address may still succeed (:func:`next_address_may_help`, a pure
function of the result), opportunistic TLS with a fall-back to an unverified session,
the per-domain cap on sessions, and batching and ordering the sessions
(:func:`plan_jobs`).
"""

from __future__ import annotations

import contextlib
import itertools
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
        self.resolver = MXResolver(settings.dns_servers, settings.dns_timeout, rng=settings.rng)
        self._context: ssl.SSLContext | None = None
        self._fallback: ssl.SSLContext | None = None
        if settings.tls != "none":
            self._context = settings.ssl_context or default_ssl_context()
            if settings.tls == "opportunistic":
                self._fallback = _unverified_context()
        self._limits: dict[str, anyio.Semaphore] = {}

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
        limit = self._limit(domain)
        try:
            with _until(deadline):
                await limit.acquire()
        except TimeoutError:
            cap = f"(per_domain={self.settings.per_domain})"
            waited = deadline_passed("connect", f"waiting for a session to {domain} {cap}")
            return job.failed(recipients, waited, host=hosts[0].name)
        try:
            return await self._walk(hosts, recipients, job)
        finally:
            limit.release()

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
        for host in hosts:
            for address in host.addresses:
                if budget <= 0 or not pending:
                    break
                if last and job.deadline is not None and anyio.current_time() >= job.deadline:
                    break
                budget -= 1
                sessions = await self._try(host.name, address, pending, job)
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
        return [_with_tried(final[r], tried[r]) for r in recipients]

    async def _try(
        self, host: str, address: str, recipients: Sequence[str], job: _Job
    ) -> list[list[RecipientResult]]:
        """One try at one address: the results of each session it took (two when a
        certificate that does not verify is retried without verification)."""
        settings = self.settings
        results, error = await self._session(
            host, address, recipients, job, settings.tls, self._context
        )
        sessions = [results]
        if isinstance(error, CertificateError) and self._fallback is not None:
            # Opportunistic TLS (RFC 7435): a certificate that does not verify still
            # beats plaintext. Connect again, encrypt without verifying, and say so.
            results, _ = await self._session(
                host, address, recipients, job, "opportunistic", self._fallback
            )
            sessions.append(results)
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


@dataclass(frozen=True, slots=True)
class _Job:
    """What every session of one :meth:`DirectDelivery.deliver` call shares (times
    are event loop time, as :func:`anyio.current_time` gives it)."""

    sender: str
    message: PreparedMessage
    extras: Extras
    deadline: float | None
    started: float

    def failed(
        self, recipients: Sequence[str], error: SMTPError, *, host: str | None
    ) -> list[RecipientResult]:
        elapsed = anyio.current_time() - self.started
        results = [result_from_error(r, error, host=host, elapsed=elapsed) for r in recipients]
        if telemetry.hooks is not None:
            telemetry.hooks.unsent(results, error)
        return results


def _until(deadline: float | None) -> contextlib.AbstractContextManager[object]:
    """A scope raising TimeoutError at ``deadline`` (event loop time), or no limit."""
    if deadline is None:
        return contextlib.nullcontext()
    return anyio.fail_after(max(0.0, deadline - anyio.current_time()))


def _with_tried(result: RecipientResult, tried: list[Attempt]) -> RecipientResult:
    if not tried:
        return result
    return replace(result, tried=tuple(tried))
