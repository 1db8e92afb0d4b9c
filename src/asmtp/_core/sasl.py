"""SASL mechanisms for SMTP AUTH (RFC 4954): PLAIN, LOGIN, CRAM-MD5 and XOAUTH2,
and the rule for choosing one. Sans-IO: each mechanism turns challenges into responses.

An AUTH LOGIN exchange, as asmtp speaks it (``C:`` client, ``S:`` server)::

    C: AUTH LOGIN
    S: 334 VXNlcm5hbWU6            ("Username:")
    C: dXNlcg==                    ("user")
    S: 334 UGFzc3dvcmQ6            ("Password:")
    C: c2VjcmV0                    ("secret")
    S: 235 2.7.0 Authentication successful

Responses carry secrets; the protocol core never writes them into a transcript.
"""

from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import hmac

from ..errors import AuthUnavailableError, RemoteProtocolError

__all__ = ["MECHANISMS", "Mechanism", "choose_mechanism", "make_mechanism"]

#: the mechanisms asmtp picks from on its own, strongest first. XOAUTH2 is used only
#: when named, since its "password" must be an OAuth2 access token.
PREFERENCE = ("CRAM-MD5", "PLAIN", "LOGIN")
MECHANISMS = ("CRAM-MD5", "PLAIN", "LOGIN", "XOAUTH2")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(challenge: str) -> bytes:
    try:
        return base64.b64decode(challenge.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RemoteProtocolError(
            f"AUTH challenge is not base64: {challenge[:40]!r}", stage="auth"
        ) from exc


class Mechanism(abc.ABC):
    """One SASL exchange. ``initial()`` is the initial response sent with the AUTH
    command (None: wait for the first challenge); ``respond(challenge)`` answers each
    334 challenge (the base64 text of the reply)."""

    name = ""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self.steps = 0

    def initial(self) -> str | None:
        return None

    @abc.abstractmethod
    def respond(self, challenge: str) -> str:
        """The (base64) answer to one 334 challenge."""


class Plain(Mechanism):
    """RFC 4616: ``AUTH PLAIN base64(\\0user\\0password)`` in one line."""

    name = "PLAIN"

    def initial(self) -> str:
        return _b64(f"\0{self.username}\0{self.password}".encode())

    def respond(self, challenge: str) -> str:
        # A server that refuses initial responses sends an empty 334 first.
        self.steps += 1
        if self.steps > 1:
            raise RemoteProtocolError("unexpected second AUTH PLAIN challenge", stage="auth")
        return self.initial()


class Login(Mechanism):
    """The LOGIN mechanism: user name, then password, each after a 334."""

    name = "LOGIN"

    def respond(self, challenge: str) -> str:
        self.steps += 1
        if self.steps == 1:
            return _b64(self.username.encode())
        if self.steps == 2:
            return _b64(self.password.encode())
        raise RemoteProtocolError("unexpected third AUTH LOGIN challenge", stage="auth")


class CramMD5(Mechanism):
    """RFC 2195: the server's challenge signed with HMAC-MD5 keyed by the password."""

    name = "CRAM-MD5"

    def respond(self, challenge: str) -> str:
        self.steps += 1
        if self.steps > 1:
            raise RemoteProtocolError("unexpected second CRAM-MD5 challenge", stage="auth")
        digest = hmac.new(self.password.encode(), _unb64(challenge), hashlib.md5).hexdigest()
        return _b64(f"{self.username} {digest}".encode())


class XOAuth2(Mechanism):
    """XOAUTH2: ``user=U^Aauth=Bearer TOKEN^A^A``. On failure the server sends a 334
    with a JSON error; the client answers with an empty line and gets the 5xx."""

    name = "XOAUTH2"

    def initial(self) -> str:
        return _b64(f"user={self.username}\x01auth=Bearer {self.password}\x01\x01".encode())

    def respond(self, challenge: str) -> str:
        return ""


_CLASSES: dict[str, type[Mechanism]] = {
    "PLAIN": Plain,
    "LOGIN": Login,
    "CRAM-MD5": CramMD5,
    "XOAUTH2": XOAuth2,
}


def choose_mechanism(offered: tuple[str, ...], wanted: str | None) -> str:
    """Pick the mechanism to use: ``wanted`` if the server offers it, else the strongest
    offered that asmtp knows.

    >>> choose_mechanism(("LOGIN", "PLAIN"), None)
    'PLAIN'
    """
    if wanted is not None:
        wanted = wanted.upper()
        if wanted not in _CLASSES:
            raise AuthUnavailableError(f"unknown AUTH mechanism {wanted}", stage="auth")
        if wanted not in offered:
            raise AuthUnavailableError(
                f"the server does not offer AUTH {wanted} (offers: {' '.join(offered) or 'none'})",
                stage="auth",
            )
        return wanted
    for name in PREFERENCE:
        if name in offered:
            return name
    raise AuthUnavailableError(
        f"no AUTH mechanism in common (server offers: {' '.join(offered) or 'none'})",
        stage="auth",
    )


def make_mechanism(name: str, username: str, password: str) -> Mechanism:
    return _CLASSES[name.upper()](username, password)
