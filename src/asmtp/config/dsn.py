""":class:`DSN`: delivery status notification requests (RFC 3461), and
:func:`xtext`, their parameters' encoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import InputError
from .checks import _check_text

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
