"""Immutable settings: :class:`Relay` (everything about the server to talk to),
:class:`Direct` (delivery to MX hosts), :class:`Proxy` (a SOCKS5 or HTTP CONNECT proxy
the connections go through) and :class:`Timeouts` (how long each network step may
take). Each setting lives in one place; nothing here does I/O. :func:`check_number`
is the one check of every number asmtp takes (finite, of the right kind and sign),
here and in the other settings.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from .errors import InputError

__all__ = [
    "DSN",
    "Direct",
    "FilePath",
    "Password",
    "Proxy",
    "ProxyScheme",
    "Relay",
    "TLSMode",
    "TimeoutSpec",
    "Timeouts",
    "as_proxy",
]

TLSMode = Literal["starttls", "implicit", "opportunistic", "none"]
TLS_MODES: tuple[str, ...] = ("starttls", "implicit", "opportunistic", "none")

#: a password, or a function returning one (sync or async) so that a short-lived
#: credential such as an OAuth2 access token is fetched fresh for each session.
Password = str | Callable[[], str] | Callable[[], Awaitable[str]]

#: a file's path, as a string or a :class:`pathlib.Path`
FilePath = str | os.PathLike[str]

_SUBMISSION_PORT = 587  # RFC 6409
#: Linux's sun_path holds 108 octets, the terminating NUL included (macOS's 104)
_UNIX_PATH_MAX = 107


def _check_text(what: str, value: str) -> None:
    if any(ch in value for ch in "\r\n\0"):
        raise InputError(f"{what} must not contain CR, LF or NUL: {value!r}")


def _check_flag(what: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{what} must be True or False: {value!r}")


def _file_path(what: str, value: object) -> str:
    """``value`` (a str or a path-like object) as a str, checked: not empty, no NUL."""
    try:
        path = os.fspath(value)  # type: ignore[call-overload]
    except TypeError:
        raise InputError(f"{what} must be a path (str or pathlib.Path): {value!r}") from None
    if not isinstance(path, str) or not path:
        raise InputError(f"{what} must be a non-empty path: {value!r}")
    _check_text(what, path)
    return path


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


ProxyScheme = Literal["socks5", "http"]
#: the URL schemes :meth:`Proxy.parse` takes ("socks5h" too: asmtp's SOCKS5 always
#: lets the proxy resolve names)
_PROXY_SCHEMES: dict[str, ProxyScheme] = {"socks5": "socks5", "socks5h": "socks5", "http": "http"}
_SOCKS_PORT = 1080  # IANA's port for SOCKS
_PROXY_EXTRA = "pip install 'asmtp[proxy]'"


def _python_socks_installed() -> bool:
    """Whether python-socks (the ``proxy`` extra) is there, without importing it."""
    try:
        return importlib.util.find_spec("python_socks") is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True, slots=True, repr=False)
class Proxy:
    """A proxy that connections to SMTP servers go through: ``"socks5"`` (RFC 1928,
    with RFC 1929's user name and password when given) or ``"http"`` (HTTP CONNECT,
    RFC 9110 section 9.3.6, with Basic credentials when given).

    Usually written as a URL: ``Relay(..., proxy="socks5://user:pass@host:1080")`` and
    ``Direct(proxy=...)`` parse it with :meth:`parse`. The proxy is asked to connect to
    the SMTP server's name (a relay's name is resolved by the proxy, never locally) or,
    in direct delivery, to the MX host's address; TLS is still verified against the
    SMTP server's name, end to end through the tunnel. SOCKS5 goes through python-socks,
    the ``proxy`` extra (``pip install 'asmtp[proxy]'``).

    Credentials never show: ``repr()`` and ``str()`` give the URL with ``***`` in their
    place, and every message naming the proxy gives :attr:`label`.

    >>> proxy = Proxy.parse("socks5://ann:s3cret@127.0.0.1:1080")
    >>> proxy, proxy.label, proxy.username
    (Proxy('socks5://***:***@127.0.0.1:1080'), 'socks5 proxy 127.0.0.1:1080', 'ann')
    """

    scheme: ProxyScheme
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in ("socks5", "http"):
            raise InputError(f"proxy scheme must be socks5 or http: {self.scheme!r}")
        if not self.host or not isinstance(self.host, str):
            raise InputError("proxy host must be a non-empty string")
        _check_text("proxy host", self.host)
        if any(ch in self.host for ch in " \t/@?#[]"):
            raise InputError(f"proxy host must be a host name or an IP address: {self.host!r}")
        check_number("proxy port", self.port, integer=True)
        if self.port > 65535:
            raise InputError(f"proxy port must be 1-65535: {self.port!r}")
        if (self.username is None) != (self.password is None):
            raise InputError("a proxy user name needs a password, and a password a user name")
        for what, value in (("user name", self.username), ("password", self.password)):
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise InputError(f"proxy {what} must be a non-empty string")
            if any(ch in value for ch in "\r\n\0"):
                raise InputError(f"proxy {what} must not contain CR, LF or NUL")
            if len(value.encode("utf-8")) > 255:  # RFC 1929: one octet of length
                raise InputError(f"proxy {what} must be at most 255 octets (UTF-8)")
        if self.scheme == "http" and self.username is not None and ":" in self.username:
            raise InputError("an HTTP proxy user name must not contain ':' (RFC 7617)")
        if self.scheme == "socks5" and not _python_socks_installed():
            raise InputError(f"a SOCKS5 proxy needs python-socks: {_PROXY_EXTRA}")

    @classmethod
    def parse(cls, url: str, *, password: str | None = None) -> Proxy:
        """A proxy from ``scheme://[user:password@]host[:port]``: schemes ``socks5``
        (``socks5h`` too; port default 1080) and ``http`` (the port is required). The
        user name and password are percent-decoded (``%40`` for ``@``). ``password``
        is the password of the URL's user kept out of the URL (``socks5://ann@host``),
        as from a secret store. A bad URL is an :class:`~asmtp.errors.InputError`
        whose message never holds the password.

        >>> Proxy.parse("http://[::1]:3128").label
        'http proxy [::1]:3128'
        """
        if not isinstance(url, str):
            raise InputError(f"proxy must be a URL such as socks5://host:1080: {url!r}")
        shown = _redacted(url)
        if any(ch in url for ch in "\r\n\0"):
            raise InputError(f"proxy URL must not contain CR, LF or NUL: {shown!r}")
        try:
            parts = urllib.parse.urlsplit(url.strip())
            port = parts.port
        except ValueError:  # its words may quote the password: not shown
            raise InputError(
                "proxy URL does not parse (a port 1-65535? an IPv6 address in []? '/', "
                f"':', '@' and '#' in the user name or password %-encoded?): {shown!r}"
            ) from None
        scheme = _PROXY_SCHEMES.get(parts.scheme.lower())
        if scheme is None:
            raise InputError(
                f"proxy URL must start with socks5:// or http:// "
                f"(socks4 and https proxies are not supported): {shown!r}"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise InputError(f"proxy URL must be scheme://[user:password@]host:port: {shown!r}")
        if not parts.hostname:
            raise InputError(f"proxy URL has no host: {shown!r}")
        if port is None:
            if scheme != "socks5":
                raise InputError(f"proxy URL needs a port (http://host:3128): {shown!r}")
            port = _SOCKS_PORT
        username = None
        if parts.password is not None and password is not None:
            raise InputError(f"proxy password given twice, in the URL and apart: {shown!r}")
        if parts.password is not None:
            password = urllib.parse.unquote(parts.password)
        if parts.username is not None or password is not None:
            username = urllib.parse.unquote(parts.username or "")
            if not username or not password:
                raise InputError(f"proxy URL needs both a user name and a password: {shown!r}")
        return cls(scheme, parts.hostname, port, username, password)

    @property
    def label(self) -> str:
        """How messages name the proxy: ``"socks5 proxy 127.0.0.1:1080"`` (never the
        credentials)."""
        return f"{self.scheme} proxy {self._address}"

    @property
    def _address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        credentials = "***:***@" if self.username is not None else ""
        return f"{self.scheme}://{credentials}{self._address}"

    def __repr__(self) -> str:
        return f"Proxy({str(self)!r})"


def _redacted(url: str) -> str:
    """``url`` for an error message: everything between the scheme and the last ``@``
    hidden (a password holding an unescaped ``/`` or ``#`` must not show either).

    >>> _redacted("socks5://ann:pa/ss@host:1080")
    'socks5://***@host:1080'
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


def as_proxy(value: object) -> Proxy | None:
    """``proxy=`` as given (a :class:`Proxy`, a URL, or None) made a :class:`Proxy` or None."""
    if value is None or isinstance(value, Proxy):
        return value
    if isinstance(value, str):
        return Proxy.parse(value)
    raise InputError(f"proxy must be a URL such as socks5://host:1080 or an asmtp.Proxy: {value!r}")


@dataclass(frozen=True, slots=True)
class Relay:
    """The SMTP server that takes the mail for delivery (a smarthost or submission port).

    Secure by default: port 587 with ``tls="starttls"`` (a server that does not offer
    STARTTLS fails, never falls back to plaintext); port 465 given alone means implicit
    TLS (RFC 8314). Certificates are verified against ``host`` with the system's trust
    store (``SSL_CERT_FILE`` works) unless ``ssl_context`` is given.

    ``proxy``: connect through a SOCKS5 or HTTP CONNECT proxy, given as a URL
    (``"socks5://user:pass@proxy.example:1080"``) or a :class:`Proxy`; the proxy
    resolves ``host``, and TLS is still verified against ``host``.

    ``chunking``: when the server offers CHUNKING (RFC 3030), send each message with
    BDAT: MAIL, RCPT and the content in one write, not dot-stuffed, with no wait for
    DATA's 354 (one round trip less per message). False always uses DATA.

    ``lmtp``: the server speaks LMTP (RFC 2033), as Dovecot, Cyrus and Postfix's
    ``lmtp`` take local delivery: LHLO instead of EHLO (no HELO), and after the end of
    data one reply per recipient, each that recipient's own result. LMTP over TCP has
    no standard port: give ``port`` (24 is common) or ``path``.

    ``path``: connect to this Unix-domain socket instead of TCP (``port`` and name
    lookups play no part; ``host``, default ``"localhost"``, names the server in
    results and for TLS). The socket never leaves the machine, so ``tls`` defaults to
    ``"none"`` there; give ``tls="starttls"`` if the server offers it. AUTH in
    plaintext still needs ``allow_plaintext_auth``.

    ``client_cert`` (and ``client_key``, when the key is not in the same PEM file):
    present this certificate to a relay that authenticates clients by certificate.
    The relay's own certificate is verified as ever (system trust store). For a key
    with a passphrase, or trust of your own, give ``ssl_context`` instead, with
    :meth:`ssl.SSLContext.load_cert_chain` called on it.

    >>> Relay("smtp.example.com").port, Relay("smtp.example.com").tls
    (587, 'starttls')
    >>> Relay("smtp.example.com", 465).tls
    'implicit'
    >>> Relay(path="/run/dovecot/lmtp", lmtp=True).host, Relay(path="/run/x.sock").tls
    ('localhost', 'none')
    """

    host: str = ""
    #: 0 (not given): 587, or none with ``path``; LMTP over TCP needs one given
    port: int = 0
    username: str | None = None
    password: Password | None = field(default=None, repr=False)
    tls: TLSMode | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    auth_mechanism: str | None = None
    allow_plaintext_auth: bool = False
    helo: str | None = None
    source_address: str | None = None
    #: a :class:`Proxy`, or its URL (made a Proxy when the Relay is made)
    proxy: Proxy | str | None = None
    chunking: bool = True
    lmtp: bool = False
    #: a Unix-domain socket to connect to instead of TCP (made a str)
    path: FilePath | None = None
    #: PEM files: the client certificate (and its key, if not in the same file)
    client_cert: FilePath | None = None
    client_key: FilePath | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "proxy", as_proxy(self.proxy))
        _check_flag("lmtp", self.lmtp)
        if self.path is not None:
            self._check_path()
        if not isinstance(self.host, str) or not (self.host or self.path is not None):
            raise InputError("Relay host must be a non-empty string")
        _check_text("Relay host", self.host)
        if self.port == 0 and type(self.port) is int:  # not given
            if self.path is None and self.lmtp:
                raise InputError(
                    "LMTP over TCP has no standard port: give Relay(port=...) (24 is "
                    "common), or path= for a Unix socket"
                )
            if self.path is None:
                object.__setattr__(self, "port", _SUBMISSION_PORT)
        else:
            check_number("Relay port", self.port, integer=True)
            if self.port > 65535:
                raise InputError(f"Relay port must be 1-65535: {self.port!r}")
        tls = self.tls
        if tls is None:
            if self.path is not None:
                tls = "none"  # a Unix socket never leaves the machine
            else:
                tls = "implicit" if self.port == 465 else "starttls"
            object.__setattr__(self, "tls", tls)
        if tls not in TLS_MODES:
            raise InputError(f"tls must be one of {', '.join(TLS_MODES)}: {tls!r}")
        self._check_client_cert()
        if self.helo is not None:
            _check_text("helo", self.helo)
            if not self.helo or " " in self.helo:
                raise InputError(f"helo must be a host name or address literal: {self.helo!r}")
        if self.username is not None:
            _check_text("username", self.username)
            if self.password is None:
                raise InputError("a username needs a password (or a function returning one)")
        _check_flag("chunking", self.chunking)
        if self.auth_mechanism is not None:
            from ._core.sasl import MECHANISMS

            if self.auth_mechanism.upper() not in MECHANISMS:
                raise InputError(
                    f"auth_mechanism must be one of {', '.join(MECHANISMS)}: "
                    f"{self.auth_mechanism!r}"
                )

    def _check_path(self) -> None:
        path = _file_path("Relay path", self.path)
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise InputError(
                f"Relay path is too long for a Unix socket (at most {_UNIX_PATH_MAX} "
                f"octets): {path!r}"
            )
        object.__setattr__(self, "path", path)
        if not self.host:
            object.__setattr__(self, "host", "localhost")
        if self.proxy is not None:
            raise InputError("a Relay on a Unix socket (path=) cannot go through a proxy")
        if self.source_address is not None:
            raise InputError("source_address is for TCP, not a Unix socket (path=)")

    def _check_client_cert(self) -> None:
        if self.client_key is not None and self.client_cert is None:
            raise InputError("client_key goes with client_cert")
        if self.client_cert is None:
            return
        object.__setattr__(self, "client_cert", _file_path("client_cert", self.client_cert))
        if self.client_key is not None:
            object.__setattr__(self, "client_key", _file_path("client_key", self.client_key))
        if self.tls == "none":
            raise InputError('a client certificate needs TLS (tls is "none")')
        if self.ssl_context is not None:
            raise InputError(
                "give client_cert or ssl_context, not both (call load_cert_chain on "
                "your ssl_context)"
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
    preference (seed it for a reproducible order). ``proxy`` (a URL or a
    :class:`Proxy`): every session goes through it, to each MX host's address; the MX
    lookups themselves go to the DNS servers as usual (SOCKS5 here carries TCP only).
    ``chunking`` as for :class:`Relay`: BDAT (RFC 3030) to the MX hosts that offer
    CHUNKING.
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
    #: a :class:`Proxy`, or its URL (made a Proxy when the Direct is made)
    proxy: Proxy | str | None = None
    chunking: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "proxy", as_proxy(self.proxy))
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
        _check_flag("chunking", self.chunking)
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
