"""The rules of the client's side of an SMTP session, as data (RFC 5321, with 2920
PIPELINING, 3207 STARTTLS, 4954 AUTH and 3030 CHUNKING; RFC 2033 LMTP): the states, the
replies that mean success for each command, what each reply does to the state, in which
states each command may be sent and which commands may be pipelined; and how an error
names the reply it was awaiting. Sans-IO, and no state of its own:
:class:`~asmtp._core.protocol.ClientProtocol` applies these rules to the bytes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Final, Literal

from ..errors import STAGE_TEXT, RemoteProtocolError, Stage
from .reply import Reply

__all__ = [
    "AFTER_REPLY",
    "AUTH_CONTINUE",
    "NAMES",
    "PIPELINABLE",
    "PIPELINE_AFTER",
    "SENDABLE_IN",
    "SIMPLE_SUCCESS",
    "SUCCESS_CODES",
    "CommandName",
    "State",
    "awaited",
    "unexpected",
]


class State(enum.Enum):
    GREETING = "greeting"  # connected, waiting for the server's 220
    REFUSED = "refused"  # the greeting was not 220: only QUIT may follow (RFC 5321 3.1)
    CONNECTED = "connected"  # greeted (or TLS just started): EHLO or HELO must come next
    READY = "ready"  # EHLO/HELO done, no mail transaction open
    TLS_HANDSHAKE = "tls-handshake"  # STARTTLS got 220: the driver must run the handshake
    AUTH = "auth"  # a SASL exchange is under way
    MAIL = "mail"  # MAIL FROM accepted: a transaction is open
    DATA = "data"  # DATA got 354: the message content must be sent
    CLOSED = "closed"  # QUIT answered, 421 received, or the stream ended


# The states as module constants: on Python 3.11 ``State.X`` goes through the enum
# metaclass's __getattr__ (an object made and a slow lookup per access), too slow for
# code that runs for every reply.
GREETING: Final = State.GREETING
REFUSED: Final = State.REFUSED
CONNECTED: Final = State.CONNECTED
READY: Final = State.READY
TLS_HANDSHAKE: Final = State.TLS_HANDSHAKE
AUTH: Final = State.AUTH
MAIL: Final = State.MAIL
DATA: Final = State.DATA
CLOSED: Final = State.CLOSED


#: The replies that mean success, for each command whose reply the client awaits
#: (RFC 5321 4.3.2; "greeting" is the server's opening, "message" the end-of-data dot
#: or the last BDAT chunk, "bdat" any other chunk (RFC 3030 2); RFC 3207 for STARTTLS,
#: RFC 4954 for AUTH). A 4xx or 5xx is a refusal. Anything else (another 2xx or 3xx,
#: say 354 to RCPT or 221 to the dot) answers no command sent: the session is closed,
#: since the replies can no longer be trusted to answer the commands they follow.
SUCCESS_CODES: Final[Mapping[Stage, frozenset[int]]] = {
    "greeting": frozenset({220}),
    "ehlo": frozenset({250}),
    "helo": frozenset({250}),
    "lhlo": frozenset({250}),  # RFC 2033 4.1: LMTP's EHLO
    "starttls": frozenset({220}),
    "auth": frozenset({235}),
    "mail": frozenset({250}),
    "rcpt": frozenset({250, 251}),  # 251: not local, will forward (RFC 5321 3.4)
    "data": frozenset({354}),
    "bdat": frozenset({250}),
    "message": frozenset({250}),
    "rset": frozenset({250}),
    "noop": frozenset({250}),
    "quit": frozenset({221}),
}
#: AUTH's one intermediate reply: the server asks for the next SASL response (RFC 4954 4).
AUTH_CONTINUE: Final = 334

#: What each reply does to the state: (after a success, after a refusal); None leaves
#: the state as it is. Back to READY ends the mail transaction (RFC 5321 4.1.1.5: so do
#: RSET and the end of data; 4.1.1.2: a refused MAIL opens none; RFC 3030 2: so does a
#: refused BDAT chunk, and the last chunk's reply, as the dot's). Beside the table: a
#: 421 to any command closes (RFC 5321 3.8), and AUTH's 334 asks for the next response.
AFTER_REPLY: Final[Mapping[Stage, tuple[State | None, State | None]]] = {
    "greeting": (CONNECTED, REFUSED),  # refused: only QUIT may follow (3.1)
    "ehlo": (READY, None),  # refused: HELO may follow (RFC 5321 3.2)
    "helo": (READY, None),
    "lhlo": (READY, None),  # refused: nothing else greets an LMTP server
    "starttls": (TLS_HANDSHAKE, None),  # refused: the client decides (RFC 3207 4)
    "auth": (READY, READY),
    "mail": (MAIL, READY),
    "rcpt": (None, None),  # a refused recipient leaves the transaction open
    "data": (DATA, READY),
    "bdat": (None, READY),  # accepted: more chunks follow
    "message": (READY, READY),  # LMTP: after the last recipient's reply
    "rset": (READY, None),
    "noop": (None, None),
    "quit": (CLOSED, CLOSED),
}

#: The fast path of every reply: command -> (its success codes, the state they lead
#: to (None: the state stays)), for the commands whose success does nothing else (not
#: DATA's 354, EHLO's, HELO's, LHLO's, STARTTLS's or AUTH's 235: see
#: :meth:`ClientProtocol._apply`).
SIMPLE_SUCCESS: Final[Mapping[Stage, tuple[frozenset[int], State | None]]] = {
    kind: (codes, AFTER_REPLY[kind][0])
    for kind, codes in SUCCESS_CODES.items()
    if kind not in ("data", "ehlo", "helo", "lhlo", "starttls", "auth")
}
#: A command, as :data:`SENDABLE_IN` knows it: each awaits the reply of the stage of
#: its name but "auth-response", the answer to AUTH's 334 challenge (an "auth" reply).
CommandName = Stage | Literal["auth-response"]

#: The states each command may be sent in (RFC 5321 4.1.4: EHLO or HELO first, again
#: after STARTTLS, RFC 3207 4.2, or LHLO on an LMTP session, RFC 2033 4.1; then MAIL,
#: RCPT, DATA or BDAT in order; RFC 4954 4: AUTH outside a transaction). RCPT, DATA and
#: BDAT in READY: pipelined behind MAIL (RFC 2920). The message content after DATA has
#: its own rule (:meth:`ClientProtocol.message`).
SENDABLE_IN: Final[Mapping[CommandName, tuple[State, ...]]] = {
    "ehlo": (CONNECTED, READY),
    "helo": (CONNECTED, READY),
    "lhlo": (CONNECTED, READY),
    "starttls": (READY,),
    "auth": (READY,),
    "auth-response": (AUTH,),
    "mail": (READY,),
    "rcpt": (READY, MAIL),
    "data": (READY, MAIL),
    "bdat": (READY, MAIL),
    "rset": (READY, MAIL),
    "noop": (READY, MAIL),
    "quit": (REFUSED, CONNECTED, READY, MAIL, AUTH),
}
#: The commands that may be sent while replies to earlier ones are outstanding, when
#: the server offers PIPELINING and those are all replies to :data:`PIPELINE_AFTER`
#: commands (RFC 2920 3.1: DATA, EHLO, STARTTLS, AUTH, NOOP and QUIT each end a group,
#: and LHLO as EHLO; RFC 3030 4.2: BDAT chunks may be pipelined, behind RCPT and one
#: another).
PIPELINABLE: Final = frozenset({"mail", "rcpt", "data", "bdat", "rset"})
PIPELINE_AFTER: Final = frozenset({"mail", "rcpt", "bdat", "rset"})

# How a reply's command is named in an error message.
NAMES: Final[Mapping[Stage, str]] = {
    **STAGE_TEXT,
    "greeting": "the greeting",
    "message": "the end of data",
}


def awaited(kind: Stage) -> str:
    """How an error names the reply awaited for ``kind``."""
    return "the greeting" if kind == "greeting" else f"the reply to {NAMES[kind]}"


def unexpected(kind: Stage, reply: Reply) -> RemoteProtocolError:
    """The error for a reply that is neither success nor refusal for ``kind``."""
    code = reply.code
    text = " ".join(reply.lines).strip()
    if len(text) > 200:
        text = text[:200] + "..."
    if kind == "greeting":
        what = f"the server greeted with {code} (not a valid greeting)"
    elif kind == "message":
        what = (
            f"the server answered the end of data with {code} (not a valid reply to it: "
            "the message may or may not have been delivered)"
        )
    else:
        name = NAMES[kind]
        what = f"{name} answered {code} (not a valid reply to {name})"
    return RemoteProtocolError(f"{what}: {text}" if text else what, stage=kind)
