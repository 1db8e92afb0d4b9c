"""asmtp from sync code: :func:`sendmail`, :func:`send` and :class:`Mailer` for plain
threads (Django and Flask views, Celery tasks, scripts), taking the async API's
arguments and returning its :class:`~asmtp.Report`.

Owns the process's one background event loop: a daemon thread running asyncio,
started on first use. Each sync call runs there as a task
(``asyncio.run_coroutine_threadsafe``) while the calling thread waits, at most
``call_timeout`` seconds; then the call is cancelled and
:class:`~asmtp.errors.SMTPTimeoutError` raised, so no call blocks forever. Any number
of threads may call at once. A forked child gets a loop of its own on its first call
(the parent's thread does not exist there, and the parent's sockets are left alone).
At exit, or on :func:`shutdown`, every Mailer is closed (sends under way get a grace
period, pooled sessions say QUIT) and the loop stops, within a few seconds.

A call from a thread that runs an event loop would stall every task of that loop: it
raises :class:`~asmtp.errors.RunningLoopError`, which points to the async API.

    >>> report = asmtp.sync.sendmail(to="ann@example.org", from_="app@example.com",
    ...                              subject="Hi", body="Hello", relay=relay)
    >>> MAILER = asmtp.sync.Mailer(relay)          # pooled: one per process is enough
    >>> [result] = MAILER.send(message)            # from any thread
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterable
from email.message import EmailMessage
from typing import Any, ParamSpec, TypedDict, TypeVar, Unpack

import asmtp

from ._delivery.shared_state import SharedLimits
from .config import DSN, Direct, Relay, TimeoutSpec, check_number
from .errors import InputError, RunningLoopError, SMTPError, SMTPTimeoutError
from .results import Report

__all__ = ["CALL_TIMEOUT", "Mailer", "MailerOptions", "run", "send", "sendmail", "shutdown"]

logger = logging.getLogger("asmtp")

#: How long (seconds) a sync call waits for its result unless told otherwise. A bound
#: against a call that never ends, not a schedule: per-step ``timeout`` and a Mailer's
#: ``recipient_deadline`` shape how long a send takes.
CALL_TIMEOUT = 600.0
#: How long (seconds) the exit handler gives sends under way and pooled sessions.
EXIT_TIMEOUT = 5.0

P = ParamSpec("P")
T = TypeVar("T")


# --------------------------------------------------------------------------- the loop


class _EventLoop:
    """The process's background event loop: a daemon thread in which asyncio runs
    ``_main`` (a root task, so that anyio's worker threads end with it) until stopped."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.stopping = False
        #: the Mailers open on this loop (touched in the loop's thread only)
        self.held: set[_Held] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._grace = 0.0
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="asmtp-sync", daemon=True)
        self.thread.start()
        if not self._ready.wait(10.0) or self.loop is None:
            raise SMTPError("asmtp.sync could not start its event loop thread")

    def _run(self) -> None:
        try:
            with asyncio.Runner() as runner:
                runner.run(self._main())
        finally:
            self._ready.set()  # a loop that could not start does not leave its starter waiting

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()
        held = list(self.held)
        if held:
            outcomes = await asyncio.gather(
                *(h.aclose(self._grace) for h in held), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    logger.error("asmtp.sync: closing a Mailer at shutdown: %r", outcome)
        # asyncio.Runner then cancels what is left, and closes the loop.

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        loop = self.loop
        if self.stopping or loop is None:
            coro.close()
            raise SMTPError("asmtp.sync is shutting down: nothing more is sent")
        try:
            return asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:  # the loop closed meanwhile
            coro.close()
            raise SMTPError("asmtp.sync is shutting down: nothing more is sent") from None

    def call(self, coro: Coroutine[Any, Any, T], timeout: float, what: str) -> T:
        return _wait(self.submit(coro), timeout, what)

    def stop(self, timeout: float) -> bool:
        """Close the Mailers (sends under way get up to 40% of ``timeout``, closing
        them up to 80% in all) and end the thread; True when it ended in ``timeout``."""
        self.stopping = True
        self._grace = timeout * 0.8
        loop, stop = self.loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                loop.call_soon_threadsafe(stop.set)
        self.thread.join(timeout)
        return not self.thread.is_alive()


_lock = threading.Lock()
_current: _EventLoop | None = None
#: A forked child's copies of its parent's loops: kept, never touched (their sockets
#: and sessions belong to the parent, and collecting them must not close anything).
_abandoned: list[_EventLoop] = []
#: Every sync Mailer, so that a forked child can renew their locks.
_mailers: weakref.WeakSet[Mailer] = weakref.WeakSet()


def _event_loop() -> _EventLoop:
    """This process's loop, started if needed; a child forked from a process with one
    starts its own."""
    global _current
    current = _current
    if current is not None and current.pid == os.getpid() and not current.stopping:
        return current
    with _lock:
        if _current is not None and _current.pid != os.getpid():
            _forget_parent()  # forked without the at-fork hook (not through os.fork)
        if _current is None or _current.stopping:
            _current = _EventLoop()
        return _current


def _forget_parent() -> None:
    global _current
    if _current is not None:
        _abandoned.append(_current)
        _current = None


def _after_fork_in_child() -> None:
    # Only the forking thread lives on in the child: a lock another thread held at
    # fork time would stay held forever, so each is made anew.
    global _lock
    _lock = threading.Lock()
    _forget_parent()
    for mailer in list(_mailers):
        mailer._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def shutdown(timeout: float = EXIT_TIMEOUT) -> None:
    """Close every Mailer and stop the background loop, within ``timeout`` seconds:
    sends under way get up to 40% of it, then pooled sessions say QUIT. Runs by itself
    at exit; a call after it starts a new loop (and reopens a Mailer used again)."""
    global _current
    _refuse_in_loop("asmtp.sync.shutdown", "close your asmtp.Mailer with `async with`")
    check_number("timeout (seconds)", timeout)
    with _lock:
        current, _current = _current, None
    if current is not None and current.pid == os.getpid() and not current.stop(timeout):
        logger.warning("asmtp.sync: the event loop did not stop within %g s", timeout)


def _at_exit() -> None:
    try:
        shutdown(EXIT_TIMEOUT)
    except Exception as exc:  # at exit, say what went wrong and let the process end
        logger.error("asmtp.sync: shutdown at exit: %r", exc)


atexit.register(_at_exit)


# --------------------------------------------------------------------------- waiting


def _refuse_in_loop(call: str, instead: str) -> None:
    """Raise :class:`~asmtp.errors.RunningLoopError` in a thread that runs an event
    loop (asyncio or trio), which a blocking ``call`` would stall; ``instead`` says what
    to do there (also for :mod:`asmtp.django`, whose calls block on this module's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = "trio" if _in_trio() else None
    else:
        running = "asyncio"
    if running is not None:
        raise RunningLoopError(
            f"{call}() blocks its thread, and this thread runs an {running} event loop "
            f"that it would stall: use the async API here ({instead})"
        )


def _in_trio() -> bool:
    trio = sys.modules.get("trio")
    if trio is None:
        return False
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _wait(future: concurrent.futures.Future[T], timeout: float, what: str) -> T:
    try:
        done, _ = concurrent.futures.wait((future,), timeout=max(0.0, timeout))
    except BaseException:  # KeyboardInterrupt in the waiting thread: stop the work too
        future.cancel()
        raise
    if not done:
        future.cancel()
        raise SMTPTimeoutError(
            f"asmtp.sync.{what} did not finish within {timeout:g} s (call_timeout) and was "
            "cancelled; a recipient whose message was under way may have received it"
        )
    if future.cancelled():
        raise SMTPError(f"asmtp.sync.{what} was cancelled: the event loop stopped (shutdown)")
    return future.result()


def run(coro: Coroutine[Any, Any, T], *, call_timeout: float = CALL_TIMEOUT) -> T:
    """Run one of asmtp's coroutines on the background loop and return its result,
    waiting at most ``call_timeout`` seconds: ``asmtp.sync.run(asmtp.sendmail(...),
    call_timeout=20)`` is :func:`sendmail` with another bound."""
    try:
        _refuse_in_loop("asmtp.sync.run", "await it")
        check_number("call_timeout (seconds)", call_timeout)
    except BaseException:
        coro.close()
        raise
    return _event_loop().call(coro, call_timeout, "run")


def _blocking(function: Callable[P, Coroutine[Any, Any, T]], doc: str) -> Callable[P, T]:
    """The sync twin of an async entry point: same arguments, same result."""
    name = function.__name__

    @functools.wraps(function)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        _refuse_in_loop(f"asmtp.sync.{name}", f"await asmtp.{name}(...)")
        return _event_loop().call(function(*args, **kwargs), CALL_TIMEOUT, name)

    call.__module__ = __name__
    call.__doc__ = doc
    return call


sendmail = _blocking(
    asmtp.sendmail,
    """:func:`asmtp.sendmail` from sync code: the same arguments, the same
    :class:`~asmtp.Report`, a session per recipient as there (pooled sessions: a
    :class:`Mailer`). Waits at most :data:`CALL_TIMEOUT` seconds (:func:`run` takes
    another bound).""",
)
send = _blocking(
    asmtp.send,
    """:func:`asmtp.send` from sync code: the same arguments, the same
    :class:`~asmtp.Report`. Waits at most :data:`CALL_TIMEOUT` seconds (:func:`run`
    takes another bound).""",
)


# --------------------------------------------------------------------------- Mailer


class MailerOptions(TypedDict, total=False):
    """The settings :class:`asmtp.Mailer` takes besides ``relay`` and ``pool``."""

    concurrency: int
    timeout: TimeoutSpec
    retry: asmtp.Retry | None
    rate: str | asmtp.Rate | None
    rate_per_domain: str | asmtp.Rate | None
    recipient_deadline: float | None
    journal: str | os.PathLike[str] | None
    resume: bool
    campaign: str | None
    identity: asmtp.JournalIdentity | None
    ignore_identity: bool
    dsn: DSN | None
    requiretls: bool
    unsubscribe: str | None
    verp: str | None
    dkim: asmtp.DKIM | None
    debug: bool
    suppress: str | os.PathLike[str] | asmtp.SuppressionList | Iterable[str] | None
    #: limits held with other processes (asmtp.celery's workers set it)
    shared_limits: SharedLimits | None


class _Held:
    """An :class:`asmtp.Mailer` held open on the loop by a task of its own (its task
    group must be left by the task that entered it), and the sends it has under way."""

    def __init__(
        self,
        owner: _EventLoop,
        mailer: asmtp.Mailer,
        closing: asyncio.Event,
        task: asyncio.Task[None],
    ) -> None:
        self.owner = owner
        self.mailer = mailer
        self.closing = closing
        self.task = task
        self.inflight: set[asyncio.Task[Any]] = set()

    async def send(
        self,
        message: EmailMessage | bytes,
        sender: str | None,
        recipients: str | Iterable[str] | None,
    ) -> Report:
        if self.closing.is_set():
            raise InputError("the asmtp.sync.Mailer was closed")
        task = asyncio.current_task()
        assert task is not None
        self.inflight.add(task)
        try:
            return await self.mailer.send(message, sender=sender, recipients=recipients)
        finally:
            self.inflight.discard(task)

    async def aclose(self, timeout: float) -> None:
        """Let sends under way finish (half of ``timeout``), then leave ``async with``
        (pooled sessions say QUIT); what is left after ``timeout`` ends with the loop."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        self.owner.held.discard(self)
        if self.inflight:
            await asyncio.wait(set(self.inflight), timeout=timeout / 2)
        self.closing.set()
        done, _ = await asyncio.wait({self.task}, timeout=max(0.0, end - loop.time()))
        if done and not self.task.cancelled():
            self.task.result()  # the Mailer's own error on closing (its journal)


class Mailer:
    """:class:`asmtp.Mailer` for sync code: create one per process (at import time
    is fine) and call :meth:`send` from any thread.

    >>> MAILER = asmtp.sync.Mailer(asmtp.Relay("smtp.example.com", username="app",
    ...                                        password=secret), call_timeout=30)
    >>> report = MAILER.send(message)          # a Report, as `await mailer.send()` gives

    Takes :class:`asmtp.Mailer`'s settings (:class:`MailerOptions`); ``pool`` defaults
    to True with a relay (sessions are kept open and lent to each send: no TCP, TLS and
    AUTH per call) and False for direct delivery. It opens on first use, in the
    background loop, and closes at exit or on :meth:`close` (or as ``with ... as
    mailer:``). ``call_timeout``: seconds a call waits at most (then it is cancelled and
    :class:`~asmtp.errors.SMTPTimeoutError` raised); ``recipient_deadline`` bounds each
    recipient's tries and turns an overrun into that recipient's result instead.
    """

    def __init__(
        self,
        relay: Relay | Direct | None = None,
        *,
        pool: bool | asmtp.Pool | None = None,
        call_timeout: float = CALL_TIMEOUT,
        **options: Unpack[MailerOptions],
    ) -> None:
        _refuse_in_loop("asmtp.sync.Mailer", "async with asmtp.Mailer(...)")
        check_number("call_timeout (seconds)", call_timeout)
        self.relay = relay
        self.call_timeout = call_timeout
        self._make: Callable[[], asmtp.Mailer] = functools.partial(
            asmtp.Mailer, relay, pool=isinstance(relay, Relay) if pool is None else pool, **options
        )
        self._lock = threading.Lock()
        self._held: _Held | None = None
        self._closed = False
        # Every setting is checked now (asmtp.Mailer is made in an event loop).
        _event_loop().call(self._check(), call_timeout, "Mailer")
        _mailers.add(self)

    async def _check(self) -> None:
        self._make()

    # -- lifetime -----------------------------------------------------------------

    def open(self) -> Mailer:
        """Open now rather than on the first send (a journal is locked, the relay's
        name resolved). Returns the Mailer."""
        _refuse_in_loop("asmtp.sync.Mailer.open", "async with asmtp.Mailer(...)")
        self._opened(self.call_timeout)
        return self

    def _opened(self, timeout: float) -> _Held:
        owner = _event_loop()
        held = self._held
        if held is not None and held.owner is owner and not held.closing.is_set():
            return held
        with self._lock:
            if self._closed:
                raise InputError("the asmtp.sync.Mailer was closed")
            held = self._held
            if held is None or held.owner is not owner or held.closing.is_set():
                # Opened in another loop (before a fork, or before shutdown()): anew here.
                held = self._held = owner.call(self._open(owner), timeout, "Mailer.open")
            return held

    async def _open(self, owner: _EventLoop) -> _Held:
        mailer = self._make()
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        closing = asyncio.Event()

        async def hold() -> None:
            try:
                async with mailer:
                    ready.set_result(None)
                    await closing.wait()
            except BaseException as exc:
                if ready.done():
                    raise  # on closing: close() hears of it
                if isinstance(exc, asyncio.CancelledError):
                    ready.cancel()
                    raise
                ready.set_exception(exc)  # could not open: the opener hears of it

        task = asyncio.create_task(hold(), name="asmtp.sync.Mailer")
        try:
            await asyncio.shield(ready)
        except asyncio.CancelledError:
            task.cancel()
            raise
        held = _Held(owner, mailer, closing, task)
        owner.held.add(held)
        return held

    def close(self, timeout: float = 10.0) -> None:
        """Let sends under way finish (half of ``timeout``), then close the pooled
        sessions politely. Idempotent; the Mailer cannot be used afterwards."""
        _refuse_in_loop("asmtp.sync.Mailer.close", "async with asmtp.Mailer(...)")
        check_number("timeout (seconds)", timeout)
        with self._lock:
            self._closed = True
            held, self._held = self._held, None
        if held is None or held.closing.is_set():
            return
        owner = held.owner
        if owner.pid != os.getpid() or owner.stopping:
            return  # the parent's (after a fork), or closed by shutdown()
        owner.call(held.aclose(timeout), timeout + 1.0, "Mailer.close")

    def __enter__(self) -> Mailer:
        return self.open()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- sending ------------------------------------------------------------------

    def submit(
        self,
        message: EmailMessage | bytes,
        *,
        sender: str | None = None,
        recipients: str | Iterable[str] | None = None,
    ) -> concurrent.futures.Future[Report]:
        """Start a send and return at once: a :class:`concurrent.futures.Future` of
        its :class:`~asmtp.Report` (for fanning several messages out from one
        thread; ``future.result(timeout)`` waits, ``future.cancel()`` stops it)."""
        _refuse_in_loop("asmtp.sync.Mailer.submit", "await mailer.send(...) on an asmtp.Mailer")
        held = self._opened(self.call_timeout)
        return held.owner.submit(held.send(message, sender, recipients))

    def send(
        self,
        message: EmailMessage | bytes,
        *,
        sender: str | None = None,
        recipients: str | Iterable[str] | None = None,
        call_timeout: float | None = None,
    ) -> Report:
        """:meth:`asmtp.Mailer.send` from sync code: one message to its recipients,
        one result each, in order. Waits at most ``call_timeout`` seconds (default:
        the Mailer's), opening included."""
        _refuse_in_loop("asmtp.sync.Mailer.send", "await mailer.send(...) on an asmtp.Mailer")
        bound = self.call_timeout if call_timeout is None else call_timeout
        check_number("call_timeout (seconds)", bound)
        deadline = time.monotonic() + bound
        held = self._opened(bound)
        future = held.owner.submit(held.send(message, sender, recipients))
        return _wait(future, deadline - time.monotonic(), "Mailer.send")

    @property
    def sessions_opened(self) -> int:
        """Pooled sessions opened so far by the Mailer open in this process."""
        held = self._held
        return held.mailer.sessions_opened if held is not None else 0

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open" if self._held is not None else "not open"
        return f"<asmtp.sync.Mailer {self.relay!r} {state}>"
