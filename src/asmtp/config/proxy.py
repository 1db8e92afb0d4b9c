""":class:`Proxy`: a SOCKS5 or HTTP CONNECT proxy the connections go through, parsed
from its URL, and :func:`as_proxy` (what ``proxy=`` takes, made a Proxy).
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from typing import Literal

from ..errors import InputError
from .checks import _check_text, check_number, installed

ProxyScheme = Literal["socks5", "http"]
#: the URL schemes :meth:`Proxy.parse` takes ("socks5h" too: asmtp's SOCKS5 always
#: lets the proxy resolve names)
_PROXY_SCHEMES: dict[str, ProxyScheme] = {"socks5": "socks5", "socks5h": "socks5", "http": "http"}
_SOCKS_PORT = 1080  # IANA's port for SOCKS
_PROXY_EXTRA = "pip install 'asmtp[proxy]'"


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
        if self.scheme == "socks5" and not installed("python_socks"):
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
