"""Sites for direct delivery: the set of MX hosts a domain resolves to. Every domain
on the same hosts shares one site, so one session limit, one rate, one adaptive state
and one connection cache (1,000 domains hosted by one provider are one destination
to that provider, not 1,000).

Owns the I/O side of shaping: :class:`SiteLimiter` (the sites of one run, found by
their hosts) and :class:`Site`, which lets a job in when the site's adaptive limit
(:mod:`~asmtp._delivery.shaping`, under the site's ``max_concurrency``) allows one
more, spaces messages and new connections to its rates, keeps paused and stopped
sites shut, and carries a finished session on to the next job waiting for the same
site (a :class:`Lease` holds it; reused up to ``max_messages_per_connection``
messages and ``max_connection_age`` seconds, as :func:`~asmtp._delivery.pool.verdict`
decides for a relay's pool). Every decision is taken by the pure functions of
:mod:`~asmtp._delivery.shaping`; this module reads the clock, waits and counts.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import anyio

from .._core.shaping_rules import Shaping
from .._io.resolver import MXHost
from ..errors import SMTPError, deadline_passed
from ..results import RecipientResult
from .pool import Pool, Usage, verdict
from .session import Session
from .shaping import (
    Decision,
    Observation,
    Outcome,
    SiteState,
    decide,
    initial_state,
    message_slot,
    observe,
)

__all__ = ["Lease", "Site", "SiteLimiter", "SitePaused", "SiteStopped", "site_name"]


def site_name(hosts: Sequence[MXHost]) -> str:
    """A site's name: its MX host names, sorted, comma separated.

    >>> site_name([MXHost("mx2.example.net", 20, ()), MXHost("MX1.example.net", 10, ())])
    'mx1.example.net,mx2.example.net'
    """
    return ",".join(sorted({h.name.lower() for h in hosts}))


class SitePaused(SMTPError):
    """The site is paused (a rule, or every attempt failed) past the job's wait."""


class SiteStopped(SMTPError):
    """The site refused us for policy (a "stop" rule): its recipients fail at once."""

    permanent = True


@dataclass(slots=True)
class Lease:
    """A job's place at a site: one session slot, and the session it carries on (a
    session handed over by the job before it, or the one it opened)."""

    site: Site
    session: Session | None = None
    usage: Usage | None = None
    #: the last outcome this job observed at the site
    outcome: Outcome | None = None

    def keep(self, session: Session, now: float) -> None:
        """The session this job opened: handed on at release if still fit."""
        self.session, self.usage = session, Usage(created=now, last_used=now)


@dataclass(slots=True)
class _Waiter:
    event: anyio.Event = field(default_factory=anyio.Event)
    queued: bool = False
    granted: bool = False
    session: Session | None = None
    usage: Usage | None = None


@dataclass(slots=True)
class SiteStats:
    """What a site saw: for progress lines, summaries and benchmarks."""

    sessions_opened: int = 0
    open_sessions: int = 0
    peak_sessions: int = 0
    reused: int = 0
    messages: int = 0
    refusals: int = 0
    decisions: collections.Counter[str] = field(default_factory=collections.Counter)
    #: (time, sessions allowed) each time the allowance changed (the last 1,000)
    history: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=1000)
    )


class Site:
    """One site of a run: its state, slots, rates and the sessions handed on."""

    def __init__(
        self, name: str, hosts: Sequence[str], shaping: Shaping, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self.shaping = shaping.limits_for(hosts)
        self.clock = clock
        self.state: SiteState = initial_state(self.shaping, clock())
        self.active = 0  # leases out (each a session open, opening or about to be)
        self.stats = SiteStats()
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._next_message = -math.inf
        #: when the deliveries of the last second were made (what a provider counts)
        self._recent: collections.deque[float] = collections.deque()
        self._next_connection = -math.inf
        self._reuse = Pool(
            max_messages=self.shaping.max_messages_per_connection,
            max_age=self.shaping.max_connection_age,
            # handed straight on, never idle: only messages and age count
            idle_timeout=1e9,
            check_after=1e9,
        )

    def allowed(self) -> int:
        return self.state.allowed(self.clock(), self.shaping.max_concurrency)

    # -- admission ----------------------------------------------------------------

    async def acquire(self, deadline: float | None) -> Lease:
        """A lease once the site lets one more job in (first come, first served):
        raises :class:`SiteStopped`, :class:`SitePaused` (paused past ``max_wait``)
        or a deadline error."""
        waiter = _Waiter()
        try:
            while True:
                self._closed_or_paused_too_long(deadline)
                now = self.clock()
                if self.state.paused(now):
                    await anyio.sleep(self.state.paused_until - now)
                    continue
                if not waiter.queued:
                    if not self._waiters and self.active < self.allowed():
                        self.active += 1
                        return Lease(self)
                    waiter.queued = True
                    self._waiters.append(waiter)
                self._grant()  # a pause that lifted, a limit that grew: nobody else looks
                if not waiter.granted:
                    # Woken by a grant, or look again after a while.
                    limit = 1.0 if deadline is None else max(0.0, min(1.0, deadline - now))
                    with anyio.move_on_after(limit):
                        await waiter.event.wait()
                if waiter.granted:
                    if waiter.session is not None:
                        self.stats.reused += 1
                    return Lease(self, waiter.session, waiter.usage)
                if deadline is not None and self.clock() >= deadline:
                    raise deadline_passed("connect", f"waiting for a session to {self.name}")
        except BaseException:
            if waiter.queued:
                self._give_back(waiter)  # a grant that came meanwhile goes to the next
            raise

    def _closed_or_paused_too_long(self, deadline: float | None) -> None:
        state, now = self.state, self.clock()
        if state.stopped is not None:
            raise SiteStopped(
                f"{self.name}: sending stopped by rule {state.stopped}", stage="connect"
            )
        if state.paused(now):
            wait = state.paused_until - now
            if wait > self.shaping.max_wait or (
                deadline is not None and state.paused_until >= deadline
            ):
                raise SitePaused(
                    f"{self.name}: site paused for {wait:.0f} s ({state.reason})",
                    stage="connect",
                )

    async def message_turn(self, deadline: float | None) -> None:
        """Wait for the site's message rate (evenly spaced messages), and for the
        quiet second after a rate refusal."""
        now = max(self.clock(), self.state.quiet_until)
        start, self._next_message = message_slot(self._next_message, now, self.state.rate)
        await self._until(start, deadline, "waiting for the site's message rate")

    async def connection_turn(self, deadline: float | None) -> None:
        """Wait for the site's connection rate."""
        start, self._next_connection = message_slot(
            self._next_connection, self.clock(), self.shaping.connection_rate
        )
        await self._until(start, deadline, "waiting for the site's connection rate")

    async def _until(self, start: float, deadline: float | None, during: str) -> None:
        wait = start - self.clock()
        if wait <= 0:
            return
        if deadline is not None and start >= deadline:
            raise deadline_passed("connect", during)
        await anyio.sleep(wait)

    # -- what happened --------------------------------------------------------------

    def opened(self) -> None:
        stats = self.stats
        stats.sessions_opened += 1
        stats.open_sessions += 1
        stats.peak_sessions = max(stats.peak_sessions, stats.open_sessions)

    def closed(self) -> None:
        self.stats.open_sessions -= 1

    def record(self, lease: Lease, results: Sequence[RecipientResult]) -> Decision:
        """Learn from one session's or one transaction's results."""
        seen: Observation | None = None
        for result in results:
            one = observe(result, self.shaping.rules, self.stats.open_sessions)
            if seen is None or one.outcome is not Outcome.DELIVERED:
                seen = one
            if one.outcome is not Outcome.DELIVERED:
                break
        if seen is None:
            return "hold"
        lease.outcome = seen.outcome
        now = self.clock()
        recent = self._recent
        while recent and now - recent[0] >= 1.0:
            recent.popleft()
        if seen.outcome is Outcome.DELIVERED:
            self.stats.messages += 1
            recent.append(now)
        elif seen.outcome is Outcome.RATE_LIMITED:
            seen = replace(seen, recent=len(recent))
        elif seen.outcome not in (Outcome.NEUTRAL, Outcome.TIMEOUT):
            self.stats.refusals += 1
        before = self.state.allowed(now, self.shaping.max_concurrency)
        self.state, decision = decide(self.state, seen, now, self.shaping)
        self.stats.decisions[decision] += 1
        after = self.state.allowed(now, self.shaping.max_concurrency)
        if after != before or not self.stats.history:
            self.stats.history.append((now, after))
        self._grant()
        return decision

    # -- giving the place back ------------------------------------------------------

    async def release(self, lease: Lease) -> None:
        """The job is done at the site: its session goes on to the next job waiting
        (when fit for reuse and the site is within its limit), or is closed."""
        session, usage = lease.session, lease.usage
        lease.session = lease.usage = None
        now = self.clock()
        if session is not None and usage is not None:
            usage.messages += 1
            usage.last_used = now
            fit = (
                session.is_open
                and verdict(usage, self._reuse, now) != "retire"
                and self.state.stopped is None
                and not self.state.paused(now)
                and self.active <= self.allowed()
            )
            if fit and self._waiters:
                waiter = self._waiters.popleft()
                waiter.granted, waiter.session, waiter.usage = True, session, usage
                waiter.event.set()
                return  # the slot goes on with the session
            await self.close(session)
        self.active -= 1
        self._grant()

    async def close(self, session: Session) -> None:
        """Close a session of this site politely (QUIT), within a command timeout."""
        try:
            with anyio.move_on_after(session.timeouts.command or 5.0, shield=True):
                await session.quit()
        finally:
            session.abort()
            self.closed()

    def _give_back(self, waiter: _Waiter) -> None:
        if not waiter.granted:
            self._waiters.remove(waiter)
            return
        if waiter.session is not None:
            waiter.session.abort()
            self.closed()
        self.active -= 1
        self._grant()

    def _grant(self) -> None:
        """Let waiting jobs in while the site allows more sessions."""
        if self.state.paused(self.clock()) or self.state.stopped is not None:
            return
        allowed = self.allowed()
        while self._waiters and self.active < allowed:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self.active += 1
            waiter.event.set()


class SiteLimiter:
    """The sites of one run, found by the MX hosts of each domain."""

    def __init__(self, shaping: Shaping, *, clock: Callable[[], float] = anyio.current_time):
        self.shaping = shaping
        self.clock = clock
        self.sites: dict[str, Site] = {}

    def site_for(self, hosts: Sequence[MXHost]) -> Site:
        name = site_name(hosts)
        site = self.sites.get(name)
        if site is None:
            names = [h.name for h in hosts]
            site = self.sites[name] = Site(name, names, self.shaping, self.clock)
        return site

    def summary(self) -> dict[str, int]:
        """Sites now paused, throttled lately, stopped: for a progress line."""
        now = self.clock()
        states = [s.state for s in self.sites.values()]
        return {
            "sites": len(states),
            "paused": sum(s.paused(now) for s in states),
            "throttled": sum(s.throttled(now) and not s.paused(now) for s in states),
            "stopped": sum(s.stopped is not None for s in states),
        }
