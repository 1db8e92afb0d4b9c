"""Pooled sessions to a relay, for services that send a message per request: the TCP
connection, TLS handshake and AUTH are paid once and reused.

Owns the life of pooled sessions: at most ``max_connections`` open; a session serves
one send at a time (commands of concurrent sends never interleave), at most
``max_messages`` sends and for at most ``max_age`` seconds (reuse bounded by time, so a
slow server does not attract all the traffic); one idle longer than ``check_after``
is checked with RSET before reuse, and one idle longer than ``idle_timeout`` is closed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from .config import Timeouts, check_number
from .errors import SMTPError
from .session import Endpoint, Session

__all__ = ["Pool", "PooledSession", "SessionPool"]

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


class PooledSession:
    """A session on loan from the pool, with its bookkeeping."""

    __slots__ = ("created", "last_used", "messages", "session")

    def __init__(self, session: Session, now: float) -> None:
        self.session = session
        self.created = now
        self.last_used = now
        self.messages = 0

    @property
    def reused(self) -> bool:
        return self.messages > 0


class SessionPool:
    """Sessions to one endpoint, lent out one send at a time."""

    def __init__(
        self, endpoint: Endpoint, timeouts: Timeouts, settings: Pool, *, debug: bool = False
    ) -> None:
        self.endpoint = endpoint
        self.timeouts = timeouts
        self.settings = settings
        self.debug = debug
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
                now = anyio.current_time()
                if self._expired(pooled, now):
                    await self._close(pooled, polite=True)
                    continue
                if now - pooled.last_used >= self.settings.check_after:
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
            session = Session(self.endpoint, self.timeouts, debug=self.debug)
            try:
                await session.connect()
            except BaseException:
                session.abort()
                raise
        except BaseException:
            self._slots.release()
            raise
        self.opened += 1
        return PooledSession(session, anyio.current_time())

    async def release(self, pooled: PooledSession) -> None:
        """Give a session back after a send: kept for reuse while it is healthy and
        within its limits, else closed."""
        now = anyio.current_time()
        pooled.messages += 1
        pooled.last_used = now
        try:
            if self._closed or not pooled.session.is_open or self._expired(pooled, now):
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

    def _expired(self, pooled: PooledSession, now: float) -> bool:
        s = self.settings
        return (
            pooled.messages >= s.max_messages
            or now - pooled.created >= s.max_age
            or now - pooled.last_used >= s.idle_timeout
        )

    async def _close(self, pooled: PooledSession, *, polite: bool) -> None:
        if polite:
            with anyio.move_on_after(self.timeouts.command or 5.0, shield=True):
                await pooled.session.quit()
        pooled.session.abort()

    async def reap(self) -> None:
        """Close sessions idle past ``idle_timeout``; runs until the pool closes."""
        while not self._closed:
            await anyio.sleep(max(0.05, self.settings.idle_timeout / 4))
            now = anyio.current_time()
            stale = [p for p in self._idle if self._expired(p, now)]
            for pooled in stale:
                if pooled in self._idle:
                    self._idle.remove(pooled)
                    await self._close(pooled, polite=True)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for pooled in idle:
            await self._close(pooled, polite=True)
