"""A bulk run's jobs and how the mailer's workers take them: :class:`Job` (one
recipient's delivery), :class:`JobSource` (jobs pulled one at a time for many workers)
and :class:`Run` (the workers of one ``deliver()`` call, cancelled together).

Owns laziness: a job is taken only when a worker is free for it, so a million jobs
from a generator never become a million tasks, and a message given as a function is
rendered only when its job's turn comes.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio

from ..errors import InputError
from .personalise import MessageSource

__all__ = ["Job", "JobSource", "Run"]


@dataclass(frozen=True, slots=True)
class Job:
    """One recipient's delivery: ``message`` is an EmailMessage, ready bytes, a
    :class:`~asmtp._core.prepared.PreparedMessage`, or a function that renders one (called
    when the job's turn comes, so a long list never holds every message at once), such
    as :meth:`asmtp.Template.bind`'s; one that raises :class:`~asmtp.errors.InputError`
    (a value its template lacks) fails that job alone, at stage "input".
    ``sender`` defaults to the message's Sender/From; ``key`` identifies the job in
    results and in the journal (default: the recipient)."""

    recipient: str
    message: MessageSource
    sender: str | None = None
    key: Any = None


class Run:
    """The workers of one deliver() call, so that they can be cancelled together
    (the consumer stopped iterating, or the mailer is closing)."""

    def __init__(self) -> None:
        self._scopes: set[anyio.CancelScope] = set()
        self._cancelled = False

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        with anyio.CancelScope() as scope:
            if self._cancelled:
                scope.cancel()
            self._scopes.add(scope)
            try:
                yield
            finally:
                self._scopes.discard(scope)

    def cancel(self) -> None:
        self._cancelled = True
        for scope in list(self._scopes):
            scope.cancel()


class JobSource:
    """Pulls jobs one at a time for many workers, from a sync or async iterable; ends
    early once ``stopping()`` says the mailer stops."""

    def __init__(
        self, jobs: Iterable[Job] | AsyncIterable[Job], stopping: Callable[[], bool]
    ) -> None:
        self._stopping = stopping
        self._lock = anyio.Lock()
        self._sync = iter(jobs) if isinstance(jobs, Iterable) else None
        self._async = aiter(jobs) if isinstance(jobs, AsyncIterable) else None
        self._done = False

    async def next(self) -> Job | None:
        if self._done or self._stopping():
            return None
        if self._sync is not None:
            job = next(self._sync, None)
        else:
            assert self._async is not None
            async with self._lock:
                if self._done:
                    return None
                try:
                    job = await anext(self._async)
                except StopAsyncIteration:
                    job = None
        if job is None:
            self._done = True
        elif not isinstance(job, Job):
            raise InputError(f"deliver() takes asmtp.Job items, not {type(job).__name__}")
        return job
