"""Direct delivery: each recipient's mail goes to its domain's mail exchangers
(RFC 5321 section 5.1), as a mail server sends it.

Owns walking the MX hosts and their addresses (with a cap), deciding after each try
whether the next address may still succeed (:func:`next_address_may_help`, a pure
function of the result), opportunistic TLS with a fall-back to an unverified session,
the per-domain cap on sessions, and batching recipients of one domain.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Sequence
from dataclasses import replace

import anyio

from .address import domain_of
from .config import Direct, Timeouts
from .dispatch import run_session
from .errors import CertificateError, ResolveError
from .message import PreparedMessage
from .resolver import MXHost, MXResolver
from .results import Attempt, RecipientResult, result_from_error
from .session import Endpoint, default_ssl_context

__all__ = ["DirectDelivery", "next_address_may_help", "plan_jobs"]

# Stages before the recipient was accepted: a failure there says nothing about the
# recipient, so another exchanger may take the mail.
_BEFORE_TRANSACTION = frozenset({"connect", "greeting", "ehlo", "starttls", "auth"})
_TRANSIENT_RETRYABLE = _BEFORE_TRANSACTION | {"mail", "rcpt"}


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
    """Group recipient indexes into sessions: one each, or with ``batch_per_domain``,
    up to ``max_rcpts_per_transaction`` of one domain per session."""
    if not settings.batch_per_domain:
        return [[i] for i in range(len(recipients))]
    by_domain: dict[str, list[int]] = {}
    for i, rcpt in enumerate(recipients):
        by_domain.setdefault(domain_of(rcpt), []).append(i)
    size = settings.max_rcpts_per_transaction
    return [group[k : k + size] for group in by_domain.values() for k in range(0, len(group), size)]


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
        self, sender: str, recipients: Sequence[str], message: PreparedMessage
    ) -> list[RecipientResult]:
        """Deliver to recipients of one domain; one result each, in order."""
        t0 = asyncio.get_running_loop().time()
        domain = domain_of(recipients[0])
        try:
            hosts = await self.resolver.resolve(domain)
        except ResolveError as exc:
            elapsed = asyncio.get_running_loop().time() - t0
            return [result_from_error(r, exc, host=None, elapsed=elapsed) for r in recipients]
        async with self._limit(domain):
            return await self._walk(hosts, sender, recipients, message, t0)

    async def _walk(
        self,
        hosts: list[MXHost],
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        t0: float,
    ) -> list[RecipientResult]:
        settings = self.settings
        tried: dict[str, list[Attempt]] = {r: [] for r in recipients}
        final: dict[str, RecipientResult] = {}
        pending = list(recipients)
        budget = settings.max_addresses
        last: list[RecipientResult] = []
        for host in hosts:
            for address in host.addresses:
                if budget <= 0 or not pending:
                    break
                budget -= 1
                last = await self._try(host.name, address, sender, pending, message, t0)
                for result in last:
                    tried[result.recipient].append(
                        Attempt(host.name, address, result.stage, result.code, result.message)
                    )
                    if not next_address_may_help(result):
                        final[result.recipient] = result
                pending = [r for r in pending if r not in final]
        for result in last:  # out of addresses: the last failure stands
            final.setdefault(result.recipient, result)
        return [_with_tried(final[r], tried[r]) for r in recipients]

    async def _try(
        self,
        host: str,
        address: str,
        sender: str,
        recipients: Sequence[str],
        message: PreparedMessage,
        t0: float,
    ) -> list[RecipientResult]:
        settings = self.settings
        endpoint = Endpoint(
            host=host,
            port=settings.port,
            helo=self.helo,
            tls=settings.tls,
            ssl_context=self._context,
            addresses=(address,),
            source_address=settings.source_address,
        )
        results, error = await run_session(
            endpoint, self.timeouts, sender, recipients, message, debug=self.debug, started=t0
        )
        if isinstance(error, CertificateError) and self._fallback is not None:
            # Opportunistic TLS (RFC 7435): a certificate that does not verify still
            # beats plaintext. Connect again, encrypt without verifying, and say so.
            fallback = Endpoint(
                host=host,
                port=settings.port,
                helo=self.helo,
                tls="opportunistic",
                ssl_context=self._fallback,
                addresses=(address,),
                source_address=settings.source_address,
            )
            results, _ = await run_session(
                fallback,
                self.timeouts,
                sender,
                recipients,
                message,
                debug=self.debug,
                started=t0,
            )
        return results


def _with_tried(result: RecipientResult, tried: list[Attempt]) -> RecipientResult:
    if not tried:
        return result
    return replace(result, tried=tuple(tried))
