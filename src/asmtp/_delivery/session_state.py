"""What a mail transaction reads and updates of the session it runs in
(:class:`SessionState`, which a :class:`~asmtp._delivery.session.Session` is), what a
bulk sender adds to each transaction (:class:`Extras`: DSN, the hook before the dot,
REQUIRETLS), the error a refusal becomes (:func:`reply_error`) and the result a
recipient's answer becomes (:func:`answered`). The steps that use them are
:mod:`asmtp._delivery.transaction`'s; compiled with them by mypyc.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from .._core.protocol import ClientProtocol
from .._core.reply import Reply
from .._core.steps import Receive
from .._io.anyio_driver import AnyConnection
from ..config import DSN, Timeouts
from ..errors import ReplyError, Stage
from ..results import RecipientResult, Status, TLSState
from .endpoint import Endpoint

__all__ = [
    "NO_EXTRAS",
    "NO_REPLIES",
    "BeforeDot",
    "Extras",
    "SessionState",
    "StageObserver",
    "answered",
    "reply_error",
]

StageObserver = Callable[[Stage | Literal["idle"], float], None]
"""``on_stage(stage, at)``: called by a :class:`Session <asmtp._delivery.session.Session>`
as a stage begins, with the session's clock; ``"idle"`` ends the stage before it."""

BeforeDot = Callable[[Sequence[str]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Extras:
    """What a bulk sender adds to each transaction: DSN requests (used only when the
    server offers DSN), a hook awaited just before the end-of-data dot is sent,
    with the recipients that will get the message (the journal's pre-dot line), and
    ``requiretls`` (RFC 8689: only over authenticated TLS to a server offering it)."""

    dsn: DSN | None = None
    before_dot: BeforeDot | None = None
    requiretls: bool = False


NO_EXTRAS: Final[Extras] = Extras()

#: an empty map of recipients to replies, never written: a session's ``_refused`` and
#: ``_answered`` before its first transaction, and ``_answered`` while no LMTP server has
#: answered for anyone (``_per_recipient`` makes a dict of its own), so not one per
#: transaction
NO_REPLIES: Final[dict[str, Reply]] = {}


def reply_error(reply: Reply, stage: Stage) -> ReplyError:
    """The error for an error reply to the ``stage`` command."""
    return ReplyError(reply.code, reply.message, enhanced_status=reply.enhanced_status, stage=stage)


# Each field's slot, to fill it without the frozen class's per-field object.__setattr__
# (a result is made per recipient: the fan-out's hot path); the nine a server's answer
# sets, and every other one with its default.
_SLOT: Final[dict[str, Callable[[Any, Any], None]]] = {
    f.name: getattr(RecipientResult, f.name).__set__ for f in dataclasses.fields(RecipientResult)
}
_SET_RECIPIENT: Final = _SLOT["recipient"]
_SET_STATUS: Final = _SLOT["status"]
_SET_CODE: Final = _SLOT["code"]
_SET_ENHANCED: Final = _SLOT["enhanced_status"]
_SET_MESSAGE: Final = _SLOT["message"]
_SET_STAGE: Final = _SLOT["stage"]
_SET_HOST: Final = _SLOT["host"]
_SET_TLS: Final = _SLOT["tls"]
_SET_ELAPSED: Final = _SLOT["elapsed"]
_SET_TRIED: Final = _SLOT["tried"]
_SET_KEY: Final = _SLOT["key"]
_SET_ATTEMPTS: Final = _SLOT["attempts"]
_SET_TLS_POLICY: Final = _SLOT["tls_policy"]
_SET_SITE: Final = _SLOT["site"]
#: the fields an answer does not set, with the defaults ``answered`` gives them
_REST: Final = {"tried": (), "key": None, "attempts": 1, "tls_policy": None, "site": None}
#: every field is one of the nine an answer sets or one of _REST with that default, and
#: nothing checks a result as it is made
QUICK: Final = (
    {f.name: f.default for f in dataclasses.fields(RecipientResult) if f.name in _REST} == _REST
    and len(_SLOT) == 9 + len(_REST)
    and not hasattr(RecipientResult, "__post_init__")
)


def answered(
    recipient: str,
    status: Status,
    code: int,
    enhanced_status: str | None,
    message: str,
    stage: Stage,
    host: str | None,
    tls: TLSState,
    elapsed: float,
) -> RecipientResult:
    """``RecipientResult(recipient, status, code, ...)`` for a server's answer, every
    other field at its default; the same value, made about three times as fast (ten
    compiled)."""
    if not QUICK:  # a field without a default, or a check in __post_init__
        return RecipientResult(
            recipient, status, code, enhanced_status, message, stage, host, tls, elapsed
        )
    result: RecipientResult = object.__new__(RecipientResult)
    _SET_RECIPIENT(result, recipient)
    _SET_STATUS(result, status)
    _SET_CODE(result, code)
    _SET_ENHANCED(result, enhanced_status)
    _SET_MESSAGE(result, message)
    _SET_STAGE(result, stage)
    _SET_HOST(result, host)
    _SET_TLS(result, tls)
    _SET_ELAPSED(result, elapsed)
    _SET_TRIED(result, ())  # each default written out: no loop over a table
    _SET_KEY(result, None)
    _SET_ATTEMPTS(result, 1)
    _SET_TLS_POLICY(result, None)
    _SET_SITE(result, None)
    return result


class SessionState:
    """What a mail transaction reads and updates of the session it runs in (set by
    :class:`Session <asmtp._delivery.session.Session>`, which is one)."""

    __slots__ = (
        "_answered",
        "_clock",
        "_conn",
        "_needs_rset",
        "_refused",
        "dot_sent",
        "endpoint",
        "on_stage",
        "proto",
        "stage",
        "timeouts",
        "tls",
        "wait_end",
        "wait_reply",
    )

    endpoint: Endpoint
    timeouts: Timeouts
    #: the steps that wait for a reply within the command timeout, and for the end of
    #: data's within its own (made once per session: ``receive(timeouts.command)``...)
    wait_reply: Receive
    wait_end: Receive
    proto: ClientProtocol
    #: told as each stage begins, with the time from ``_clock`` (see StageObserver)
    on_stage: StageObserver | None
    _clock: Callable[[], float] | None
    #: the end of data is out and its reply not read: a failure leaves the fate unknown
    dot_sent: bool
    tls: TLSState
    #: where the session is: the stage a failure is reported in
    stage: Stage
    #: a failed transaction may be open on the server still: RSET before the next MAIL
    _needs_rset: bool
    #: the current transaction's refused recipients, kept when the transaction then
    #: fails: a 550 read before a 421 is that recipient's answer, not the 421
    _refused: dict[str, Reply]
    #: LMTP: the accepted recipients' own replies to the end of data read so far, kept
    #: when the transaction then fails (the connection lost before the others came)
    _answered: dict[str, Reply]
    _conn: AnyConnection | None

    def _mark(self, stage: Stage | Literal["idle"]) -> None:
        """Tell the observer ``stage`` begins (callers check there is one first)."""
        on_stage, clock = self.on_stage, self._clock
        assert on_stage is not None and clock is not None
        on_stage(stage, clock())

    def abort(self) -> None:
        """Close at once, without QUIT (errors, cancellation)."""
        if self._conn is not None:
            self._conn.abort()
