"""What a :class:`~asmtp._delivery.mailer.Mailer` asks of state it shares with other
processes or machines (layer 4): a journal held elsewhere than in a file
(:class:`SharedJournal`) and limits that hold across every sender at once
(:class:`SharedLimits`).

Owns the two protocols, nothing else: the Mailer decides when to write a dot record, a
result, when to take a rate token and when to hold a connection lease; an
implementation (:mod:`asmtp._delivery.redis_state`) decides where that state lives. A
queue engine (Celery today) only carries chunks of jobs to the processes that hold a
Mailer over such state, so another engine can be added over the same state.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import Any, Protocol, runtime_checkable

from ..results import RecipientResult
from .journal_format import JournalEntry, JournalIdentity

__all__ = ["SharedJournal", "SharedLimits"]


@runtime_checkable
class SharedJournal(Protocol):
    """A journal the Mailer writes as it writes its file journal: a dot record before
    each dot (the dot waits for it), the final result after. ``entries`` is what the
    journal says last of the keys of the jobs being delivered (the Mailer's resume
    decisions read it); the owner fills it before handing those jobs over."""

    entries: MutableMapping[str, JournalEntry]

    async def claim(self, identity: JournalIdentity, *, ignore_identity: bool = False) -> None:
        """Check that the journal is this run's (raise a JournalIdentityError if not)."""

    async def dot(self, key: Any, recipient: str) -> None:
        """Record, durably, that the dot for ``recipient`` is about to go out."""

    async def result(self, result: RecipientResult) -> None:
        """Record ``result`` as the key's final outcome."""

    async def aclose(self) -> None:
        """The Mailer is done with the journal (the owner may keep it open)."""


class SharedLimits(Protocol):
    """Rates and caps that hold across every process sending for one run."""

    async def take(self, domain: str) -> None:
        """Wait for a token of the overall rate and of ``domain``'s rate."""

    def connection(self, domain: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold one of ``domain``'s connection slots while a delivery to it runs."""


@contextlib.asynccontextmanager
async def no_lease() -> AsyncIterator[None]:
    """A connection slot that is always free (no cap)."""
    yield
