"""Where the mail goes: :class:`Relay` (everything about the server to talk to) and
:class:`Direct` (delivery to each domain's MX hosts: TLS policy, limits, shaping).
"""

from __future__ import annotations

import os
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from .._core.shaping_rules import Shaping
from .._core.tlsmap import TLSLevel, TLSPolicyMap, level_of
from .._core.tlsrpt import TLSReportLog
from ..errors import InputError
from .checks import _check_flag, _check_text, _file_path, check_number
from .checks import installed as _installed
from .proxy import Proxy, as_proxy

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
            from .._core.sasl import MECHANISMS

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

    ``tls``, the level (README "TLS policy"): "policy" (default: DANE for MX hosts
    with validated TLSA records when ``trust_ad``, else the domain's MTA-STS policy
    when it publishes one, else opportunistic), "dane" or "sts" (only the one),
    "opportunistic" (STARTTLS when offered, the certificate checked against the MX host
    name and the result saying "verified" or "unverified"; an unverified session still
    delivers, as RFC 7435 allows), "starttls" (encrypted and verified, or that host is
    skipped), or "none". ``tls_policy`` maps domains to their own level
    (``{"example.org": "dane", ".bank.test": "starttls"}``; a leading dot: the domains
    under it). ``trust_ad``: the DNS servers validate DNSSEC and the path to them is
    trusted (a local unbound): their AD bit is believed, and only then are TLSA records
    (DANE) used. ``sts_cache``: a directory keeping MTA-STS policies between runs (the
    run's memory keeps them anyway). ``tls_report``: a :class:`~asmtp.TLSReportLog`
    recording each TLS outcome for TLS-RPT (RFC 8460). ``sts_port`` is for tests.
    ``per_domain`` caps the sessions open
    to one domain at once; ``max_addresses`` caps the addresses tried per recipient.
    ``batch_per_domain`` lets recipients of one domain share transactions (up to
    ``max_rcpts_per_transaction`` RCPTs each). ``dns_servers`` (``"IP[:PORT]"``) and
    ``port`` are for tests and unusual networks; ``rng`` orders MX hosts of equal
    preference (seed it for a reproducible order). ``proxy`` (a URL or a
    :class:`Proxy`): every session goes through it, to each MX host's address; the MX
    lookups themselves go to the DNS servers as usual (SOCKS5 here carries TCP only).
    ``chunking`` as for :class:`Relay`: BDAT (RFC 3030) to the MX hosts that offer
    CHUNKING. ``shaping`` (an :class:`~asmtp.Shaping`): recipients grouped by the MX
    hosts their domains share ("sites"), each site's sessions and rate adapting to
    its replies, sessions reused for the site's next recipients; ``per_domain`` still
    caps each domain within its site. The default is ``Shaping()`` (the built-in
    settings and rules); None: fixed limits, one session per job.
    """

    dns_servers: Sequence[str] | None = None
    dns_timeout: float = 5.0
    port: int = 25
    tls: TLSLevel = "policy"
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
    shaping: Shaping | None = field(default_factory=Shaping)
    #: domain → level (a mapping, made a TLSPolicyMap)
    tls_policy: TLSPolicyMap | Mapping[str, str] | None = None
    trust_ad: bool = False
    sts_cache: FilePath | None = None
    sts_port: int = 443
    tls_report: TLSReportLog | None = field(default=None, repr=False, compare=False)

    def level_for(self, domain: str) -> TLSLevel:
        """The TLS level of recipient domain ``domain`` (the policy map's, else ``tls``)."""
        mapped = None if self.tls_policy is None else self.tls_policy_map.level_for(domain)
        return self.tls if mapped is None else mapped

    @property
    def tls_policy_map(self) -> TLSPolicyMap:
        policy = self.tls_policy
        return policy if isinstance(policy, TLSPolicyMap) else TLSPolicyMap(policy or {})

    def __post_init__(self) -> None:
        object.__setattr__(self, "proxy", as_proxy(self.proxy))
        if self.shaping is not None and not isinstance(self.shaping, Shaping):
            raise InputError(f"shaping must be an asmtp.Shaping or None: {self.shaping!r}")
        object.__setattr__(self, "tls", level_of(self.tls, "tls for direct delivery"))
        if self.tls_policy is not None and not isinstance(self.tls_policy, TLSPolicyMap):
            if not isinstance(self.tls_policy, Mapping):
                raise InputError(f"tls_policy must map domains to levels: {self.tls_policy!r}")
            object.__setattr__(self, "tls_policy", TLSPolicyMap(self.tls_policy))
        self._check_tls_policy()
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

    def _check_tls_policy(self) -> None:
        _check_flag("trust_ad", self.trust_ad)
        check_number("sts_port", self.sts_port, integer=True)
        if self.sts_port > 65535:
            raise InputError(f"sts_port must be 1-65535: {self.sts_port!r}")
        if self.sts_cache is not None:
            object.__setattr__(self, "sts_cache", _file_path("sts_cache", self.sts_cache))
        levels = {self.tls, *self.tls_policy_map.values()}
        if "dane" in levels and not self.trust_ad:
            raise InputError(
                'tls "dane" needs DNSSEC-validated answers: a validating resolver you trust '
                "(a local unbound) in dns_servers or the system's, and trust_ad=True "
                "(asmtp send --trust-ad)"
            )
        if "sts" in levels and not _installed("httpx"):
            raise InputError("MTA-STS fetches policies with httpx: pip install 'asmtp[sts]'")
        if self.trust_ad and levels & {"dane", "policy"} and not _installed("cryptography"):
            raise InputError("DANE reads certificates with cryptography: pip install 'asmtp[dane]'")
