"""Immutable settings: :class:`Relay` (everything about the server to talk to),
:class:`Direct` (delivery to MX hosts), :class:`Proxy` (a SOCKS5 or HTTP CONNECT proxy
the connections go through) and :class:`Timeouts` (how long each network step may
take). Each setting lives in one place; nothing here does I/O. :func:`check_number`
is the one check of every number asmtp takes (finite, of the right kind and sign),
here and in the other settings.

Each lives in its own module (:mod:`.servers`, :mod:`.proxy`, :mod:`.timeouts`,
:mod:`.dsn`, :mod:`.checks`); this package is where they are imported from.
"""

from .._core.tlsmap import TLSLevel
from .checks import check_number as check_number
from .dsn import DSN
from .dsn import xtext as xtext
from .proxy import Proxy, ProxyScheme, as_proxy
from .servers import TLS_MODES as TLS_MODES
from .servers import Direct, FilePath, Password, Relay, TLSMode
from .timeouts import Timeouts, TimeoutSpec

__all__ = [
    "DSN",
    "Direct",
    "FilePath",
    "Password",
    "Proxy",
    "ProxyScheme",
    "Relay",
    "TLSLevel",
    "TLSMode",
    "TimeoutSpec",
    "Timeouts",
    "as_proxy",
]
