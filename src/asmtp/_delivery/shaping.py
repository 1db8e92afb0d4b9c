"""Adaptive traffic shaping per site: pure decisions, no I/O.

Owns a site's adaptive state (:class:`SiteState`: its session limit, its rate, when
it is paused or stopped), what a delivery result tells about the site
(:func:`observe`: success, throttled for concurrency or for rate, refused, timed out,
pause or stop as a reply rule says, or nothing), and the one transition
(:func:`decide`: (state, observation, now) -> (new state, decision)). The settings and
the reply rules are :class:`~asmtp._core.shaping_rules.Shaping` and
:class:`~asmtp._core.shaping_rules.Rule`. Time is a parameter (STYLE 14): the site
limiter (:mod:`~asmtp._delivery.sites`) reads the clock and does the waiting.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Literal

from .._core.shaping_rules import Rule, Shaping, match_rule
from ..results import RecipientResult

__all__ = [
    "Decision",
    "Observation",
    "Outcome",
    "SiteState",
    "decide",
    "initial_state",
    "message_slot",
    "observe",
    "recent_rate",
]


class Outcome(enum.Enum):
    """What one delivery result says about its site."""

    DELIVERED = "delivered"  # the site took the message (or refused the recipient alone)
    THROTTLED = "throttled"  # too many sessions: 421 or 4.7.x before the transaction
    RATE_LIMITED = "rate_limited"  # too many messages: 4.7.x to MAIL or RCPT
    REFUSED = "refused"  # the connection was refused or reset
    TIMEOUT = "timeout"
    PAUSE = "pause"  # a rule: stop sending for a while
    STOP = "stop"  # a rule: the site refuses us for policy
    NEUTRAL = "neutral"  # says nothing about the site (e.g. a full mailbox)


@dataclass(frozen=True, slots=True)
class Observation:
    outcome: Outcome
    #: sessions open to the site when the result came
    sessions: int = 0
    #: for PAUSE: how long; for PAUSE/STOP: the rule's name
    seconds: float = 0.0
    rule: str | None = None
    #: deliveries to the site in the second before (when the caller counts them)
    recent: int | None = None


Decision = Literal["grow", "shrink", "pause", "stop", "hold"]


@dataclass(frozen=True, slots=True)
class SiteState:
    """A site's adaptive state; times are the limiter's clock (seconds)."""

    #: sessions allowed at once (fractional: congestion avoidance adds 1/limit)
    limit: float
    #: slow start below this, one more per round above it
    threshold: float
    #: sessions never exceed this until ``ceiling_until`` (learned from a refusal)
    ceiling: float = math.inf
    ceiling_until: float = -math.inf
    last_shrink: float = -math.inf
    last_slower: float = -math.inf
    #: messages per second (None: no limit yet)
    rate: float | None = None
    rate_ceiling: float = math.inf
    rate_ceiling_until: float = -math.inf
    #: deliveries counted in the current one-second window, and the last full one's rate
    window_start: float = -math.inf
    window_count: int = 0
    measured: float = 0.0
    #: when failures with no delivery in between began, and how many
    failing_since: float | None = None
    failures: int = 0
    paused_until: float = -math.inf
    #: no message starts before this (a rate refusal lets the provider's count drain)
    quiet_until: float = -math.inf
    #: why the site stopped (a rule's name), or None
    stopped: str | None = None
    #: the last throttling reply seen, and when (for progress lines)
    throttled_at: float = -math.inf
    reason: str = ""

    def allowed(self, now: float, ceiling: int) -> int:
        """Sessions allowed at ``now`` under the run's ``ceiling``."""
        cap = self.ceiling if now < self.ceiling_until else math.inf
        return max(1, min(int(self.limit), int(min(cap, ceiling))))

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def throttled(self, now: float, recent: float = 5.0) -> bool:
        return now - self.throttled_at < recent


def initial_state(shaping: Shaping, now: float) -> SiteState:
    """A site seen for the first time: ``initial`` sessions, the configured rate."""
    return SiteState(
        limit=float(min(shaping.initial, shaping.max_concurrency)),
        threshold=float(shaping.slow_start_threshold),
        rate=shaping.rate,
        window_start=now,
    )


_THROTTLE_STAGES = frozenset({"connect", "greeting", "ehlo", "starttls", "helo"})
_RATE_STAGES = frozenset({"mail", "rcpt", "data", "message"})


def observe(
    result: RecipientResult, rules: tuple[Rule, ...] = (), sessions: int = 0
) -> Observation:
    """What ``result`` says about its site: a matching reply rule first, then the
    general reading (a 421 or a 4.7.x before the transaction: too many sessions; a
    4.7.x to MAIL or RCPT: too fast; a refused or reset connection; a timeout).

    >>> from asmtp.results import RecipientResult as R
    >>> observe(R("a@x", "transient", 421, "4.7.0", "Try again later", "greeting")).outcome
    <Outcome.THROTTLED: 'throttled'>
    >>> observe(R("a@x", "transient", 451, "4.7.1", "rate limited", "mail")).outcome
    <Outcome.RATE_LIMITED: 'rate_limited'>
    >>> observe(R("a@x", "permanent", 550, "5.1.1", "no such user", "rcpt")).outcome
    <Outcome.DELIVERED: 'delivered'>
    """
    if result.status == "delivered":
        return Observation(Outcome.DELIVERED, sessions)
    code, enhanced = result.code, result.enhanced_status
    if code is not None or enhanced is not None:
        rule = match_rule(code, enhanced, result.message, rules)
        if rule is not None:
            if rule.action == "ignore":
                return Observation(Outcome.NEUTRAL, sessions)
            if rule.action == "pause":
                return Observation(Outcome.PAUSE, sessions, rule.seconds, rule.name)
            if rule.action == "stop":
                return Observation(Outcome.STOP, sessions, rule=rule.name)
            early = result.stage in _THROTTLE_STAGES or code == 421
            kind = Outcome.THROTTLED if early else Outcome.RATE_LIMITED
            return Observation(kind, sessions, rule=rule.name)
    if code is None:
        if result.stage != "connect" or result.status == "permanent":
            return Observation(Outcome.NEUTRAL, sessions)
        if "deadline passed" in result.message:
            return Observation(Outcome.NEUTRAL, sessions)  # the caller's budget ran out
        if "timed out" in result.message or "timeout" in result.message:
            return Observation(Outcome.TIMEOUT, sessions)
        return Observation(Outcome.REFUSED, sessions)
    policy = (enhanced or "").startswith("4.7.")
    if result.stage in _THROTTLE_STAGES and (code == 421 or policy):
        return Observation(Outcome.THROTTLED, sessions)
    if result.stage in _RATE_STAGES and (policy or code == 421):
        return Observation(Outcome.RATE_LIMITED, sessions)
    if result.status == "permanent":
        # a 5xx for the recipient or the message: the site itself works
        return Observation(Outcome.DELIVERED if result.stage != "greeting" else Outcome.NEUTRAL)
    return Observation(Outcome.NEUTRAL, sessions)


def decide(
    state: SiteState, seen: Observation, now: float, shaping: Shaping
) -> tuple[SiteState, Decision]:
    """The site's next state after ``seen`` at ``now``, and what changed.

    >>> s = initial_state(Shaping(initial=2), 0.0)
    >>> s, d = decide(s, Observation(Outcome.DELIVERED), 0.1, Shaping(initial=2))
    >>> d, s.limit
    ('grow', 3.0)
    >>> s, d = decide(s, Observation(Outcome.THROTTLED, sessions=3), 0.2, Shaping())
    >>> d, s.limit, s.allowed(0.3, 100)
    ('shrink', 1.5, 1)
    """
    outcome = seen.outcome
    if state.stopped is not None:
        return state, "hold"
    if outcome is Outcome.DELIVERED:
        return _delivered(state, now, shaping)
    if outcome is Outcome.NEUTRAL:
        return state, "hold"
    if outcome is Outcome.STOP:
        return replace(state, stopped=seen.rule or "policy", reason=seen.rule or ""), "stop"
    state = _failed(state, now)
    if outcome is Outcome.PAUSE:
        until = max(state.paused_until, now + seen.seconds)
        state = replace(state, paused_until=until, throttled_at=now, reason=seen.rule or "")
        return _shrunk(state, seen, now, shaping, force=True)[0], "pause"
    if (
        state.failing_since is not None
        and state.failures >= shaping.dead_failures
        and now - state.failing_since >= shaping.dead_after
    ):
        # every attempt failed for a while: a dead site is not hammered (Postfix marks
        # such a destination dead and waits)
        state = replace(state, paused_until=now + shaping.pause, reason="no delivery succeeds")
        return replace(state, failing_since=now, failures=0), "pause"
    if not shaping.adaptive:
        return state, "hold"
    if outcome is Outcome.RATE_LIMITED:
        return _slower(state, seen, now, shaping)
    return _shrunk(state, seen, now, shaping)


def _delivered(state: SiteState, now: float, shaping: Shaping) -> tuple[SiteState, Decision]:
    count, start, measured = state.window_count + 1, state.window_start, state.measured
    if now - start >= 1.0:
        measured, count, start = count / (now - start), 0, now
    state = replace(
        state, window_count=count, window_start=start, measured=measured,
        failing_since=None, failures=0,
    )  # fmt: skip
    if not shaping.adaptive:
        return state, "hold"
    rate = state.rate
    if rate is not None and shaping.rate_step and state.rate_ceiling < math.inf:
        cap = (
            state.rate_ceiling * shaping.rate_margin if now < state.rate_ceiling_until else math.inf
        )
        rate = min(cap, rate * (1 + shaping.rate_step))
        if cap == math.inf and shaping.rate is None:
            rate = None if rate > state.rate_ceiling * 2 else rate  # the probe went well
        if shaping.rate is not None and rate is not None:
            rate = min(rate, shaping.rate)
    # slow start: +1 per delivery; then +1 per round (limit deliveries)
    step = 1.0 if state.limit < state.threshold else 1.0 / max(1, int(state.limit))
    limit = min(float(shaping.max_concurrency), state.limit + step)
    if now < state.ceiling_until:
        limit = min(limit, max(state.ceiling, float(shaping.min_concurrency)))
    grew = int(limit) > int(state.limit)
    return replace(state, limit=limit, rate=rate), "grow" if grew else "hold"


def _failed(state: SiteState, now: float) -> SiteState:
    since = state.failing_since if state.failing_since is not None else now
    return replace(state, failing_since=since, failures=state.failures + 1)


def _shrunk(
    state: SiteState, seen: Observation, now: float, shaping: Shaping, *, force: bool = False
) -> tuple[SiteState, Decision]:
    if seen.sessions:
        # the provider refused one more than the sessions it had: stay at those
        ceiling = max(float(shaping.min_concurrency), float(seen.sessions))
        state = replace(
            state, ceiling=min(ceiling, state.ceiling) if now < state.ceiling_until else ceiling,
            ceiling_until=now + shaping.probe_every,
        )  # fmt: skip
    state = replace(state, throttled_at=now, reason=seen.rule or seen.outcome.value)
    if not force and now - state.last_shrink < shaping.shrink_every:
        return state, "hold"  # sessions already in flight saw the same limit
    low = float(shaping.min_concurrency)
    limit = max(low, state.limit * shaping.shrink)
    return replace(state, limit=limit, threshold=max(low, limit), last_shrink=now), "shrink"


def _slower(
    state: SiteState, seen: Observation, now: float, shaping: Shaping
) -> tuple[SiteState, Decision]:
    """A rate refusal: the rate measured is too fast for this site."""
    state = replace(state, throttled_at=now, reason=seen.rule or seen.outcome.value)
    if now - state.last_slower < shaping.shrink_every:
        return state, "hold"  # messages already on their way met the same limit
    measured = float(seen.recent) if seen.recent is not None else recent_rate(state, now)
    if measured <= 0:
        measured = state.rate if state.rate is not None else 1.0
    if state.rate is not None:
        measured = min(measured, state.rate)
    rate = max(0.1, measured * shaping.rate_backoff)
    return replace(
        state, rate=rate, rate_ceiling=measured, rate_ceiling_until=now + shaping.probe_every,
        last_slower=now,
        # a burst at no rate filled the provider's count: let it drain first
        quiet_until=now + shaping.rate_quiet if state.rate is None else state.quiet_until,
    ), "shrink"  # fmt: skip


def recent_rate(state: SiteState, now: float) -> float:
    """Deliveries in the second before ``now``, as a provider counting per second
    sees them: the current window's count plus the part of the last window's rate
    still inside the second (a sliding window from two fixed ones).

    >>> s = SiteState(limit=1, threshold=1, window_start=10.0, window_count=30, measured=80.0)
    >>> recent_rate(s, 10.25)
    90.0
    """
    elapsed = now - state.window_start
    if elapsed >= 1.0:
        return state.window_count / elapsed
    return state.measured * (1.0 - max(0.0, elapsed)) + state.window_count


def message_slot(next_free: float, now: float, rate: float | None) -> tuple[float, float]:
    """When the next message may start under ``rate`` (per second) and the slot after
    it: evenly spaced; a message that came late may make up for one slot missed (a
    provider counting per second sees at most ``rate`` and one).
    Returns (start, next_free).

    >>> message_slot(1.1, 1.0, 10.0)
    (1.1, 1.2000000000000002)
    >>> message_slot(0.5, 1.0, 10.0)  # late: the next slot is sooner
    (1.0, 1.0)
    """
    if rate is None:
        return now, now
    interval = 1.0 / rate
    start = max(now, next_free)
    if next_free == -math.inf:  # the first message: nothing to make up for
        return start, start + interval
    return start, max(next_free, now - interval) + interval
