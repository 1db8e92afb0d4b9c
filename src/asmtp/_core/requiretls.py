"""REQUIRETLS (RFC 8689), the client's part: a message sent with ``REQUIRETLS`` on MAIL
FROM may only go over TLS that was authenticated (the web PKI and the host name, DANE,
or MTA-STS) to a server that offers REQUIRETLS, which then owes the next hop the same.

Pure: the decision and the MAIL parameter, from the server's EHLO and the session's TLS
outcome. The session keeps the TLS outcome; direct delivery makes sure a REQUIRETLS
message never falls back to an unverified or plaintext session.
"""

from __future__ import annotations

from .capabilities import Capabilities
from .reply import Reply  # noqa: F401 (the doctest's)

__all__ = ["AUTHENTICATED_TLS", "REQUIRETLS_STATUS", "requiretls_refusal"]

#: the TLS outcomes RFC 8689 section 4.2.1 accepts
AUTHENTICATED_TLS = frozenset({"verified", "dane", "sts"})
#: section 5: "REQUIRETLS support required"
REQUIRETLS_STATUS = "5.7.30"


def requiretls_refusal(capabilities: Capabilities, tls: str, host: str) -> str | None:
    """Why a REQUIRETLS message must not be sent on this session (None: it may,
    with the ``REQUIRETLS`` MAIL parameter).

    >>> caps = Capabilities.from_ehlo(Reply(250, ("mx.example.org", "STARTTLS", "REQUIRETLS")))
    >>> requiretls_refusal(caps, "verified", "mx.example.org") is None
    True
    >>> requiretls_refusal(caps, "unverified", "mx.example.org")
    '5.7.30 REQUIRETLS: the TLS session with mx.example.org is not authenticated (unverified)'
    """
    if tls not in AUTHENTICATED_TLS:
        return (
            f"{REQUIRETLS_STATUS} REQUIRETLS: the TLS session with {host} is not "
            f"authenticated ({tls})"
        )
    if "REQUIRETLS" not in capabilities:
        return f"{REQUIRETLS_STATUS} REQUIRETLS: {host} does not offer REQUIRETLS (RFC 8689)"
    return None
