"""Running a session's steps on a scripted server's replies, as asmtp's drivers run them,
with no I/O: the helper of the tests that script a server command by command
(``test_reply_codes.py``, ``test_every_recipient_answered.py``).

PYTEST_DONT_REWRITE: a helper module, imported by the tests, not collected.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from asmtp._core.reply import NEED_DATA
from asmtp._core.steps import Await, Send, Steps
from asmtp._delivery.session import Session
from asmtp.errors import SMTPError

__all__ = ["Answers", "drive"]

T = TypeVar("T")


class Answers(Protocol):
    """A scripted server: the bytes it answers when the client awaits ``kind`` (the
    protocol's ``awaiting``); empty bytes close the connection."""

    def reply(self, kind: str | None) -> bytes: ...


def drive(session: Session, steps: Steps[T], server: Answers) -> T:
    """Run ``steps`` as asmtp's drivers do: each reply sent back, each SMTPError met
    while reading thrown in at the step's ``yield``; what is written is not looked at
    (the server answers by what the protocol awaits)."""
    proto = session.proto
    value: Any = None
    error: SMTPError | None = None
    while True:
        try:
            step = steps.send(value) if error is None else steps.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        value = error = None
        assert not isinstance(step, Await), "nothing is awaited in these sessions"
        if isinstance(step, Send):
            continue
        try:
            while (value := proto.next_reply()) is NEED_DATA:
                proto.receive_data(server.reply(proto.awaiting))
        except SMTPError as exc:
            value, error = None, exc
