"""Where telemetry watches delivery: the seam between the delivery modules and an
instrumentation such as :mod:`asmtp.otel`, which fills it (STYLE 13: observers watch the
session through hooks; none gets its own copy of the exchange).

Owns :data:`hooks`, the one switch. It is None unless an instrumentation is installed,
and then each hook point in the delivery modules costs one ``if telemetry.hooks is not
None``: no telemetry library is imported, no object made, no clock read. An
instrumentation sets it to an object with the methods of :class:`Hooks`; nothing here
knows which library it feeds.

The hook points, each in the module that owns the event:

* :func:`~asmtp._delivery.dispatch.run_session` (every session of ``send``, of direct
  delivery and of an unpooled Mailer): :meth:`Hooks.session` as the session starts;
  the :class:`SessionWatch` it returns gives the session its ``on_stage`` observer and
  is told how the session ended (its recipients' results and the error, if any);
* recipients that got a result with no session (the relay refused the run's
  credentials earlier; an MX lookup failed; the wait for a domain's session cap ran
  out): :meth:`Hooks.unsent`;
* the results callers get: :func:`~asmtp._delivery.dispatch.run_pool` (``send``,
  ``sendmail``) and the Mailer's record of each job's result: :meth:`Hooks.outcomes`;
* the Mailer's retries (:meth:`Hooks.retry`) and its sends on pooled sessions
  (:meth:`Hooks.pooled_send`);
* :class:`~asmtp._delivery.pool.SessionPool`: each pooled session's stages
  (:meth:`Hooks.pooled_session`, its observer) and the pool's size
  (:meth:`Hooks.pool_size`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal, Protocol

from ..errors import SMTPError
from ..results import RecipientResult
from .endpoint import Endpoint
from .session import Session, StageObserver

__all__ = ["Hooks", "SessionWatch", "hooks"]


class SessionWatch(Protocol):
    """What watches one session of :func:`~asmtp._delivery.dispatch.run_session`."""

    #: the session's ``on_stage`` (None: its stages are not watched)
    observer: StageObserver | None

    def end(
        self,
        session: Session,
        results: Sequence[RecipientResult],
        error: BaseException | None,
    ) -> None:
        """The session ended: its recipients' results (none when it was cancelled) and
        the error that ended it early, if one did."""


class Hooks(Protocol):
    """The hook points of delivery (see the module's docstring for where each is)."""

    def session(
        self, endpoint: Endpoint, recipients: Sequence[str], clock: Callable[[], float]
    ) -> SessionWatch:
        """A session to ``endpoint`` for ``recipients`` starts; ``clock`` is its clock."""

    def unsent(self, results: Sequence[RecipientResult], error: SMTPError) -> None:
        """Recipients got these results without a session, for ``error``."""

    def outcomes(self, results: Iterable[RecipientResult]) -> None:
        """Results as the caller gets them: one per recipient (Mailer: per job)."""

    def retry(self, result: RecipientResult) -> None:
        """The Mailer tries again after ``result``."""

    def pooled_send(
        self, endpoint: Endpoint, sending: Awaitable[RecipientResult]
    ) -> Awaitable[RecipientResult]:
        """One send on a pooled session to ``endpoint``: await ``sending`` (the pool's
        :meth:`~asmtp._delivery.pool.SessionPool.deliver`) and return its result."""

    def pooled_session(self, endpoint: Endpoint) -> StageObserver | None:
        """A pooled session to ``endpoint`` is made: its ``on_stage`` observer."""

    def pool_size(self, endpoint: Endpoint, session: Session, change: Literal[1, -1]) -> None:
        """A session joined the pool (``+1``, once connected) or left it (``-1``)."""


#: the installed instrumentation; None: no telemetry (the default)
hooks: Hooks | None = None
