"""Pooled sessions to a relay, for services that send a message per request: the TCP
connection, TLS handshake and AUTH are paid once and reused.

Owns the life of pooled sessions: at most ``max_connections`` open; a session serves
one send at a time (commands of concurrent sends never interleave), at most
``max_messages`` sends and for at most ``max_age`` seconds (reuse bounded by time, so a
slow server does not attract all the traffic); one idle longer than ``check_after``
is checked with RSET before reuse, and one idle longer than ``idle_timeout`` is closed.
Time is a parameter: what to do with a session is :func:`verdict`, a pure function of
its :class:`Usage`, the settings and the time, which the pool reads from its ``clock``.

Also owns one send on a pooled session (:meth:`SessionPool.deliver`): borrow a session,
send, give it back; a reused session the server had closed is replaced once (that is
:func:`worth_a_fresh_session`, pure too), and the recipient's deadline bounds it all.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import anyio

from .._core.prepared import PreparedMessage
from ..config import Timeouts, check_number
from ..errors import SMTPError, deadline_passed
from ..results import RecipientResult, result_from_error
from . import telemetry
from .endpoint import Endpoint
from .session import Session
from .transaction import NO_EXTRAS, Extras

__all__ = [
    "Pool",
    "PooledSession",
    "SessionPool",
    "Usage",
    "Verdict",
    "verdict",
    "worth_a_fresh_session",
]

logger = logging.getLogger("asmtp")


@dataclass(frozen=True, slots=True)
class Pool:
    """Settings of a session pool (``asmtp.Mailer(relay, pool=asmtp.Pool(...))``)."""

    max_connections: int = 10
    max_messages: int = 100
    max_age: float = 300.0
    idle_timeout: float = 30.0
    check_after: float = 1.0

    def __post_init__(self) -> None:
        check_number("Pool max_connections", self.max_connections, integer=True)
        check_number("Pool max_messages", self.max_messages, integer=True)
        check_number("Pool max_age", self.max_age)
        check_number("Pool idle_timeout", self.idle_timeout)
        check_number("Pool check_after", self.check_after, above=False)


@dataclass(slots=True)
class Usage:
    """What the pool knows of a session: when it was opened and last given back (on
    the pool's clock), and how many sends it has served."""

    created: float
    last_used: float
    messages: int = 0


Verdict = Literal["reuse", "check", "retire"]


def verdict(usage: Usage, settings: Pool, now: float) -> Verdict:
    """What a session not on loan is good for at ``now``: ``"retire"`` once it has
    served ``max_messages`` sends, lived ``max_age`` seconds or idled ``idle_timeout``
    seconds; ``"check"`` (RSET before reuse) once it has idled ``check_after``
    seconds; else ``"reuse"``."""
    idle = now - usage.last_used
    if (
        usage.messages >= settings.max_messages
        or now - usage.created >= settings.max_age
        or idle >= settings.idle_timeout
    ):
        return "retire"
    return "check" if idle >= settings.check_after else "reuse"


def worth_a_fresh_session(
    result: RecipientResult, *, still_open: bool, reused: bool, fresh: bool
) -> bool:
    """Whether a send that ended in ``result`` is tried again on a new session: only
    when it failed transiently on a ``reused`` session that is no longer open (the
    server closed it while it idled in the pool, which says nothing of the message),
    and not when that try was already on a ``fresh`` session."""
    return result.status == "transient" and not still_open and reused and not fresh


class PooledSession:
    """A session on loan from the pool, with its :class:`Usage`."""

    __slots__ = ("session", "usage")

    def __init__(self, session: Session, now: float) -> None:
        self.session = session
        self.usage = Usage(created=now, last_used=now)

    @property
    def reused(self) -> bool:
        return self.usage.messages > 0


class SessionPool:
    """Sessions to one endpoint, lent out one send at a time."""

    def __init__(
        self,
        endpoint: Endpoint,
        timeouts: Timeouts,
        settings: Pool,
        *,
        debug: bool = False,
        clock: Callable[[], float] = anyio.current_time,
    ) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.settings = settings
        self.debug = debug
        #: the time sessions age by (tests pass a clock they move themselves)
        self.clock = clock
        self._idle: list[PooledSession] = []
        self._slots = anyio.Semaphore(settings.max_connections)
        self._closed = False
        #: sessions opened so far (for tests and metrics)
        self.opened = 0

    async def acquire(self, *, fresh: bool = False) -> PooledSession:
        """A session ready for a transaction: an idle one (checked if it idled long),
        or a new one. Raises an :class:`~asmtp.errors.SMTPError` when a new session
        cannot be opened.

        The semaphore counts borrowers, not sessions: a session is either lent out
        or idle, and a new one is opened only when none is idle, so no more than
        ``max_connections`` ever exist."""
        try:
            self._slots.acquire_nowait()  # uncontended: no trip round the event loop
        except anyio.WouldBlock:
            await self._slots.acquire()
        try:
            while self._idle and not fresh:
                pooled = self._idle.pop()  # most recently used: warm, least likely closed
                fit = verdict(pooled.usage, self.settings, self.clock())
                if fit == "retire":
                    await self._close(pooled, polite=True)
                    continue
                if fit == "check":
                    try:
                        await pooled.session.reset()
                    except SMTPError as exc:
                        logger.debug("pooled session to %s is gone: %s", self.endpoint.host, exc)
                        await self._close(pooled, polite=False)
                        continue
                return pooled
            refused = self.endpoint.auth_cache.refusal()
            if refused is not None:
                raise refused  # the relay refused these credentials: no new session asks
            hooks = telemetry.hooks
            observer = None if hooks is None else hooks.pooled_session(self.endpoint)
            session = Session(self.endpoint, self.timeouts, debug=self.debug, on_stage=observer)
            try:
                await session.connect()
            except BaseException:
                session.abort()
                raise
        except BaseException:
            self._slots.release()
            raise
        self.opened += 1
        if telemetry.hooks is not None:
            telemetry.hooks.pool_size(self.endpoint, session, 1)
        return PooledSession(session, self.clock())

    async def deliver(
        self,
        sender: str,
        recipient: str,
        prepared: PreparedMessage,
        *,
        extras: Extras = NO_EXTRAS,
        deadline: float | None = None,
    ) -> RecipientResult:
        """One send on a pooled session; a reused session that turns out to be dead
        before the dot is replaced by a fresh one, once. ``deadline`` (event loop time)
        bounds the wait for a session and the send."""
        fresh = False
        session: Session | None = None
        with anyio.move_on_at(math.inf if deadline is None else deadline):
            while True:
                try:
                    pooled = await self.acquire(fresh=fresh)
                except SMTPError as exc:
                    return result_from_error(recipient, exc, host=self.endpoint.host)
                session = pooled.session
                try:
                    [result] = await session.deliver(sender, [recipient], prepared, extras=extras)
                except BaseException:
                    await self.discard(pooled)  # its state is unknown: never reused
                    raise
                if worth_a_fresh_session(
                    result, still_open=session.is_open, reused=pooled.reused, fresh=fresh
                ):
                    await self.discard(pooled)
                    fresh = True
                    continue
                await self.release(pooled)
                return result
        # The deadline passed, waiting for a session or during the send.
        return result_from_error(
            recipient,
            deadline_passed(session.stage if session is not None else "connect"),
            host=self.endpoint.host,
            tls=session.tls if session is not None else "none",
            dot_sent=session.dot_sent if session is not None else False,
        )

    async def release(self, pooled: PooledSession) -> None:
        """Give a session back after a send: kept for reuse while it is healthy and
        within its limits, else closed."""
        usage = pooled.usage
        usage.messages += 1
        usage.last_used = self.clock()
        try:
            if (
                self._closed
                or not pooled.session.is_open
                or verdict(usage, self.settings, usage.last_used) == "retire"
            ):
                await self._close(pooled, polite=pooled.session.is_open)
            else:
                self._idle.append(pooled)
        finally:
            self._slots.release()

    async def discard(self, pooled: PooledSession) -> None:
        """Close a session on loan that must not be reused (its state is unknown)."""
        try:
            await self._close(pooled, polite=False)
        finally:
            self._slots.release()

    async def _close(self, pooled: PooledSession, *, polite: bool) -> None:
        if telemetry.hooks is not None:
            telemetry.hooks.pool_size(self.endpoint, pooled.session, -1)
        if polite:
            with anyio.move_on_after(self.timeouts.command or 5.0, shield=True):
                await pooled.session.quit()
        pooled.session.abort()

    async def reap(self, every: float | None = None) -> None:
        """Close idle sessions due to retire (idle past ``idle_timeout``, or past
        ``max_age``); runs until the pool closes, looking every ``every`` seconds of
        the event loop's time (default: four times per ``idle_timeout``)."""
        period = every if every is not None else max(0.05, self.settings.idle_timeout / 4)
        while not self._closed:
            await anyio.sleep(period)
            now = self.clock()
            stale = [p for p in self._idle if verdict(p.usage, self.settings, now) == "retire"]
            for pooled in stale:
                if pooled in self._idle:
                    self._idle.remove(pooled)
                    await self._close(pooled, polite=True)

    async def aclose(self) -> None:
        """Close every idle session: QUIT on all of them at once, so closing a pool of
        N sessions costs one round trip (and at most one command timeout), not N."""
        self._closed = True
        idle, self._idle = self._idle, []
        async with anyio.create_task_group() as tg:
            for pooled in idle:
                tg.start_soon(functools.partial(self._close, pooled, polite=True))
