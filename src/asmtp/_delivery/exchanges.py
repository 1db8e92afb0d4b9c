"""The steps of single exchanges a session is made of, over the sans-IO protocol: a
command and its reply, HELO when EHLO is refused, LHLO on LMTP, and AUTH with its
challenges (RFC 5321 3.2, RFC 2033 4.1, RFC 4954). Each raises the error its refusal
means; the session (:mod:`asmtp._delivery.session`) decides what follows.
"""

from __future__ import annotations

from .._core.protocol import AUTH_CONTINUE, SUCCESS_CODES, ClientProtocol
from .._core.reply import Reply
from .._core.sasl import Mechanism
from .._core.steps import Steps, command
from ..errors import AuthenticationError
from .session_state import reply_error

__all__ = ["authenticate", "exchange", "helo_instead", "lhlo"]


def exchange(line: bytes, timeout: float | None) -> Steps[Reply]:
    """One command (``line``, as the protocol made it) and its reply."""
    reply: Reply = yield command(line, timeout)
    return reply


def lhlo(proto: ClientProtocol, name: str, timeout: float | None) -> Steps[None]:
    """LHLO, on an LMTP session (RFC 2033 4.1): no HELO to fall back to."""
    reply: Reply = yield command(proto.lhlo(name), timeout)
    if reply.code not in SUCCESS_CODES["lhlo"]:
        raise reply_error(reply, "lhlo")


def helo_instead(
    proto: ClientProtocol, name: str, timeout: float | None, reply: Reply
) -> Steps[None]:
    """After EHLO was refused with ``reply``: HELO for a server that does not know
    EHLO (a 5xx, the session still open: RFC 5321 3.2), else the refusal's error."""
    if reply.code >= 500 and not proto.closed:
        reply = yield command(proto.helo(name), timeout)
        if reply.code in SUCCESS_CODES["helo"]:
            return
    raise reply_error(reply, "ehlo")


def authenticate(
    proto: ClientProtocol, name: str, mech: Mechanism, timeout: float | None
) -> Steps[None]:
    """AUTH with ``mech`` (RFC 4954): the command, an answer to each 334 challenge,
    and :class:`~asmtp.errors.AuthenticationError` unless the end is 235."""
    reply: Reply = yield command(proto.auth(name, mech.initial()), timeout)
    while reply.code == AUTH_CONTINUE:
        challenge = reply.lines[0] if reply.lines else ""
        reply = yield command(proto.auth_response(mech.respond(challenge)), timeout)
    if reply.code not in SUCCESS_CODES["auth"]:
        raise AuthenticationError(reply.code, reply.message, enhanced_status=reply.enhanced_status)
