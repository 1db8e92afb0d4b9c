"""One ``asmtp bench`` worker's view of its sessions: :class:`Watch` and :class:`Slot`.

Owns turning a session's stage changes into latencies: :class:`Watch` is the
``on_stage`` observer handed to each :class:`~asmtp._delivery.session.Session`, called
as each reply is parsed, and adds each stage's time to its latency stage (RCPT and DATA
count in ``envelope``, the EHLO after STARTTLS in ``starttls``). :class:`Slot` holds a
worker's open session and names the stage a failure is counted under.
"""

from __future__ import annotations

from ..._delivery.session import Session
from ...errors import SMTPError
from .stats import LatencyRecorder

__all__ = ["Slot", "Watch"]

# A session stage's time adds to the latency stage of its name, but MAIL's to the
# envelope; and (_WITHIN) the stages that belong to the one before them: the second EHLO
# is part of STARTTLS, RCPT and DATA of the envelope.
_LATENCY_OF = {"mail": "envelope"}
_WITHIN = {"starttls": ("ehlo",), "mail": ("rcpt", "data")}


class Watch:
    """One worker's stage times, from its sessions' ``on_stage`` calls
    (:class:`~asmtp._delivery.session.Session`). A stage's time is recorded when the next one
    begins (it succeeded: the session went on); the stage that ends at ``"idle"`` is
    left in ``ended``/``took`` for the worker, which records it once it knows the
    outcome (a 5xx after the dot also ends the message stage)."""

    __slots__ = ("ended", "recorders", "since", "stage", "took")

    def __init__(self, recorders: dict[str, LatencyRecorder]) -> None:
        self.recorders = recorders
        self.stage = "idle"
        self.since = 0.0  # when it began
        self.ended = ""
        self.took = 0.0

    def __call__(self, stage: str, at: float) -> None:
        current = self.stage
        if stage in _WITHIN.get(current, ()):
            return
        took = at - self.since
        self.stage, self.since = stage, at
        if stage == "idle":
            self.ended, self.took = current, took
        elif current != "idle":
            self.recorders[_LATENCY_OF.get(current, current)].add(took)

    def forget(self) -> None:
        """The stage under way failed: it is not recorded (whatever begins next)."""
        self.stage = "idle"

    def record_ended(self) -> None:
        """Record the stage that ended at the last ``"idle"``."""
        self.recorders[_LATENCY_OF.get(self.ended, self.ended)].add(self.took)


class Slot:
    """One worker's state: its open session (kept with --reuse) and its stage times."""

    __slots__ = ("done_at", "ready", "session", "watch")

    def __init__(self, watch: Watch) -> None:
        self.session: Session | None = None
        self.watch = watch
        self.ready = False  # greeting, EHLO, STARTTLS and AUTH done
        self.done_at = 0.0  # when the message's final reply came

    def stage_of(self, error: SMTPError | None) -> str:
        """The stage a failure is counted under: the error's (else the session's),
        except that the TLS handshake and the EHLO after it count as STARTTLS's."""
        if self.watch.stage == "starttls":
            return "starttls"
        if error is not None and error.stage:
            return error.stage
        return self.session.stage if self.session is not None else "connect"

    async def close(self) -> None:
        """End the session (after QUIT)."""
        session, self.session, self.ready = self.session, None, False
        if session is not None:
            await session.close()

    def drop(self) -> None:
        """End the session at once, without QUIT."""
        session, self.session, self.ready = self.session, None, False
        if session is not None:
            session.abort()
