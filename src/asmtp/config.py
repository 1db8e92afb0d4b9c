"""Immutable settings: :class:`Relay` (everything about the server to talk to) and
:class:`Timeouts` (how long each network step may take). Each setting lives in one
place; nothing here does I/O. :func:`check_number` is the one check of every number
asmtp takes (finite, of the right kind and sign), here and in the other settings.
"""

from __future__ import annotations

import math
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import InputError

__all__ = ["DSN", "Direct", "Password", "Relay", "TLSMode", "TimeoutSpec", "Timeouts"]

TLSMode = Literal["starttls", "implicit", "opportunistic", "none"]
TLS_MODES: tuple[str, ...] = ("starttls", "implicit", "opportunistic", "none")

#: a password, or a function returning one (sync or async) so that a short-lived
#: credential such as an OAuth2 access token is fetched fresh for each session.
Password = str | Callable[[], str] | Callable[[], Awaitable[str]]


def _check_text(what: str, value: str) -> None:
    if any(ch in value for ch in "\r\n\0"):
        raise InputError(f"{what} must not contain CR, LF or NUL: {value!r}")


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float: 10**400 seconds
        return False


def check_number(
    what: str,
    value: object,
    *,
    minimum: float = 0.0,
    above: bool = True,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """The one check for every number asmtp takes: a finite int or float (never a bool,
    NaN or an infinity) above ``minimum`` (or at least it, ``above=False``); a whole
    number when ``integer``; ``None`` passes when ``optional`` (it means "no limit").

    NaN compares false with everything, so a plain ``value <= 0`` test lets it through
    and a NaN timeout silently disables the timeout.

    >>> check_number("timeout", 2.5)
    >>> check_number("timeout", float("nan"))
    Traceback (most recent call last):
    ...
    asmtp.errors.InputError: timeout must be a positive finite number: nan
    """
    if value is None and optional:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (integer and not isinstance(value, int))
        or (not integer and not _finite(value))
        or (value <= minimum if above else value < minimum)
    ):
        kind = "whole number" if integer else "finite number"
        if minimum == 0 and above:
            bound = f"a positive {kind}"
        elif minimum == 0:
            bound = f"a {kind} >= 0"
        else:
            bound = f"a {kind} {'>' if above else '>='} {minimum:g}"
        none = " or None" if optional else ""
        raise InputError(f"{what} must be {bound}{none}: {value!r}")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds each network step may take; ``None`` means no limit.

    A step is one command and its whole reply (or the connect and the greeting): a
    server trickling bytes cannot stretch it. ``Timeouts.rfc5321()`` gives the figures
    of RFC 5321 section 4.5.3.2.
    """

    connect: float | None = 30.0  # TCP connect, TLS (implicit) and the greeting
    command: float | None = 30.0  # EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA, RSET, QUIT
    data_block: float | None = 30.0  # each block of message content written
    data_end: float | None = 30.0  # the reply after the end-of-data dot

    def __post_init__(self) -> None:
        for name in ("connect", "command", "data_block", "data_end"):
            check_number(f"Timeouts {name}", getattr(self, name), optional=True)

    @classmethod
    def uniform(cls, seconds: float | None) -> Timeouts:
        return cls(seconds, seconds, seconds, seconds)

    @classmethod
    def rfc5321(cls) -> Timeouts:
        """Greeting 5 min, commands 5 min, each data block 3 min, after the dot 10 min."""
        return cls(connect=300.0, command=300.0, data_block=180.0, data_end=600.0)

    @classmethod
    def of(cls, value: TimeoutSpec) -> Timeouts:
        if isinstance(value, Timeouts):
            return value
        check_number("timeout (seconds)", value, optional=True)
        return cls.uniform(None if value is None else float(value))


TimeoutSpec = float | int | None | Timeouts


@dataclass(frozen=True, slots=True)
class Relay:
    """The SMTP server that takes the mail for delivery (a smarthost or submission port).

    Secure by default: port 587 with ``tls="starttls"`` (a server that does not offer
    STARTTLS fails, never falls back to plaintext); port 465 given alone means implicit
    TLS (RFC 8314). Certificates are verified against ``host`` with the system's trust
    store (``SSL_CERT_FILE`` works) unless ``ssl_context`` is given.

    >>> Relay("smtp.example.com").port, Relay("smtp.example.com").tls
    (587, 'starttls')
    >>> Relay("smtp.example.com", 465).tls
    'implicit'
    """

    host: str
    port: int = 587
    username: str | None = None
    password: Password | None = field(default=None, repr=False)
    tls: TLSMode | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    auth_mechanism: str | None = None
    allow_plaintext_auth: bool = False
    helo: str | None = None
    source_address: str | None = None

    def __post_init__(self) -> None:
        if not self.host or not isinstance(self.host, str):
            raise InputError("Relay host must be a non-empty string")
        _check_text("Relay host", self.host)
        check_number("Relay port", self.port, integer=True)
        if self.port > 65535:
            raise InputError(f"Relay port must be 1-65535: {self.port!r}")
        tls = self.tls
        if tls is None:
            tls = "implicit" if self.port == 465 else "starttls"
            object.__setattr__(self, "tls", tls)
        if tls not in TLS_MODES:
            raise InputError(f"tls must be one of {', '.join(TLS_MODES)}: {tls!r}")
        if self.helo is not None:
            _check_text("helo", self.helo)
            if not self.helo or " " in self.helo:
                raise InputError(f"helo must be a host name or address literal: {self.helo!r}")
        if self.username is not None:
            _check_text("username", self.username)
            if self.password is None:
                raise InputError("a username needs a password (or a function returning one)")
        if self.auth_mechanism is not None:
            from ._core.sasl import MECHANISMS

            if self.auth_mechanism.upper() not in MECHANISMS:
                raise InputError(
                    f"auth_mechanism must be one of {', '.join(MECHANISMS)}: "
                    f"{self.auth_mechanism!r}"
                )

    @property
    def tls_mode(self) -> TLSMode:
        assert self.tls is not None
        return self.tls

    def with_(self, **changes: object) -> Relay:
        """A copy with some settings changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Direct:
    """Deliver straight to each recipient domain's mail exchangers, as a mail server
    does (``relay=None`` means ``Direct()``).

    ``tls``: "opportunistic" (default: STARTTLS when offered, the certificate checked
    against the MX host name and the result saying "verified" or "unverified"; an
    unverified session still delivers, as RFC 7435 allows), "starttls" (encrypted and
    verified, or that host is skipped), or "none". ``per_domain`` caps the sessions open
    to one domain at once; ``max_addresses`` caps the addresses tried per recipient.
    ``batch_per_domain`` lets recipients of one domain share transactions (up to
    ``max_rcpts_per_transaction`` RCPTs each). ``dns_servers`` (``"IP[:PORT]"``) and
    ``port`` are for tests and unusual networks; ``rng`` orders MX hosts of equal
    preference (seed it for a reproducible order).
    """

    dns_servers: Sequence[str] | None = None
    dns_timeout: float = 5.0
    port: int = 25
    tls: TLSMode = "opportunistic"
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    helo: str | None = None
    per_domain: int = 10
    max_addresses: int = 5
    batch_per_domain: bool = False
    max_rcpts_per_transaction: int = 100
    source_address: str | None = None
    rng: random.Random | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tls not in ("opportunistic", "starttls", "none"):
            raise InputError(
                f"tls for direct delivery must be opportunistic, starttls or none: {self.tls!r}"
            )
        check_number("port", self.port, integer=True)
        if self.port > 65535:
            raise InputError(f"port must be 1-65535: {self.port!r}")
        for name in ("per_domain", "max_addresses", "max_rcpts_per_transaction"):
            check_number(name, getattr(self, name), integer=True)
        check_number("dns_timeout", self.dns_timeout)
        if self.helo is not None:
            _check_text("helo", self.helo)
        if isinstance(self.dns_servers, str):
            object.__setattr__(self, "dns_servers", (self.dns_servers,))
        elif self.dns_servers is not None:
            object.__setattr__(self, "dns_servers", tuple(self.dns_servers))


_DSN_NOTIFY = ("SUCCESS", "FAILURE", "DELAY")


def xtext(value: str) -> str:
    """RFC 3461 section 4: "+", "=" and anything outside printable ASCII as +HH.

    >>> xtext("rfc822;jöran+x@example.org")
    'rfc822;j+C3+B6ran+2Bx@example.org'
    """
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class DSN:
    """Delivery status notification requests (RFC 3461), sent only to servers that
    offer DSN. ``notify``: any of "SUCCESS", "FAILURE", "DELAY", or ("NEVER",);
    ``ret``: "FULL" or "HDRS"; ``envid``: an envelope id echoed in the reports;
    ``orcpt``: send each recipient's original address (ORCPT=rfc822;...)."""

    notify: tuple[str, ...] | None = ("FAILURE", "DELAY")
    ret: Literal["FULL", "HDRS"] | None = "HDRS"
    envid: str | None = None
    orcpt: bool = True

    def __post_init__(self) -> None:
        if self.notify is not None:
            notify = tuple(n.upper() for n in self.notify)
            if notify != ("NEVER",) and not all(n in _DSN_NOTIFY for n in notify):
                raise InputError(f"DSN notify must be NEVER or of {_DSN_NOTIFY}: {self.notify!r}")
            object.__setattr__(self, "notify", notify)
        if self.ret not in (None, "FULL", "HDRS"):
            raise InputError(f"DSN ret must be FULL or HDRS: {self.ret!r}")
        if self.envid is not None:
            _check_text("DSN envid", self.envid)

    def mail_params(self) -> list[str]:
        params = []
        if self.ret is not None:
            params.append(f"RET={self.ret}")
        if self.envid is not None:
            params.append(f"ENVID={xtext(self.envid)}")
        return params

    def rcpt_params(self, recipient: str) -> list[str]:
        params = []
        if self.notify is not None:
            params.append(f"NOTIFY={','.join(self.notify)}")
        if self.orcpt:
            params.append(f"ORCPT=rfc822;{xtext(recipient)}")
        return params
