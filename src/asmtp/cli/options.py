"""Argument types shared by the ``asmtp`` commands (``send``, ``mx``, ``demo``,
``bench``): each turns a command-line word into a value or a clear usage error."""

from __future__ import annotations

import argparse
import math

from .._core.address import check_mailbox
from ..errors import InputError

__all__ = ["mail_domain", "positive_float", "positive_int"]

# RFC 1035 2.3.4: 63 octets a label, 253 characters a name written without its last dot
_LABEL_MAX, _NAME_MAX = 63, 253


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value!r}")
    return number


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0 < number < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {value!r}")
    return number


def mail_domain(value: str) -> str:
    """A mail domain, or the domain of an address, checked as ``send`` checks a
    recipient's: ``example.org``, ``example.org.``, ``ann@example.org``, ``[192.0.2.1]``,
    ``bücher.example``. Returned as written (an address gives its domain)."""
    domain = value.rpartition("@")[2] if "@" in value else value
    # the domain checks of a recipient address, with the address's own checks on top
    address = value if "@" in value else f"postmaster@{value.removesuffix('.')}"
    try:
        ascii_name = check_mailbox(address, field="DOMAIN").rpartition("@")[2]
    except InputError as exc:
        reason = exc.message.removeprefix("DOMAIN: ").removeprefix(repr(address) + " ")
        raise argparse.ArgumentTypeError(
            f"not a mail domain or address: {value!r} ({reason})"
        ) from None
    if not ascii_name.startswith("["):
        labels = ascii_name.removesuffix(".").split(".")
        if len(ascii_name) > _NAME_MAX or any(len(label) > _LABEL_MAX for label in labels):
            raise argparse.ArgumentTypeError(
                f"not a mail domain: {value!r} (longer than DNS allows, RFC 1035 2.3.4)"
            )
    return domain
