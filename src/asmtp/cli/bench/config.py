"""What one ``asmtp bench`` run sends, and how: :class:`BenchConfig` and the message.

Owns the run's settings (a frozen dataclass, checked when made) and the message every
transaction sends (:func:`build_bench_message`, built once), numbered per transaction
(:func:`numbered`) so that no two messages of a run share a Message-ID.
"""

from __future__ import annotations

import math
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate

from ..._core.prepared import PreparedMessage, prepare_message
from ...config import TLS_MODES, Proxy, TLSMode
from ...errors import InputError

__all__ = ["DEFAULT_SIZE", "BenchConfig", "build_bench_message", "numbered"]

#: the default message size in octets (headers and body, before the final dot)
DEFAULT_SIZE = 2048


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """Everything one benchmark run needs, checked when made (:class:`InputError`).

    At least one of ``messages`` and ``duration`` bounds the run; with both, whichever
    comes first. ``rate`` (messages per second) makes the run open loop.
    """

    host: str
    port: int = 25
    messages: int | None = None
    duration: float | None = None
    concurrency: int = 10
    size: int = DEFAULT_SIZE
    recipients_per_message: int = 1
    reuse: bool = False
    rate: float | None = None
    tls: TLSMode = "none"
    verify: bool = True
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    allow_plaintext_auth: bool = False
    sender: str = "bench@example.test"
    to_domain: str = "example.test"
    helo: str = "bench.asmtp.invalid"
    timeout: float = 30.0
    #: connect through this proxy (which resolves ``host``)
    proxy: Proxy | None = None

    def __post_init__(self) -> None:
        if self.messages is None and self.duration is None:
            raise InputError("give --messages N or --duration SECONDS (or both)")
        if self.messages is not None and self.messages < 1:
            raise InputError(f"messages must be at least 1: {self.messages}")
        if self.duration is not None and not 0 < self.duration < math.inf:
            raise InputError(f"duration must be a positive number of seconds: {self.duration}")
        for name in ("concurrency", "recipients_per_message", "port"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1: {getattr(self, name)}")
        if self.rate is not None and not 0 < self.rate < math.inf:
            raise InputError(f"rate must be a positive number: {self.rate}")
        if not 0 < self.timeout < math.inf:
            raise InputError(f"timeout must be a positive number of seconds: {self.timeout}")
        if self.tls not in TLS_MODES:
            raise InputError(f"tls must be one of {', '.join(TLS_MODES)}: {self.tls!r}")
        if self.username is not None:
            if self.password is None:
                raise InputError("--user needs a password (--password-env VAR)")
            if self.tls == "none" and not self.allow_plaintext_auth:
                raise InputError(
                    "refusing to send credentials without TLS (use --tls, or "
                    "--allow-plaintext-auth)"
                )
        for what, value in (("helo", self.helo), ("from", self.sender)):
            if not value or any(c in value for c in " \r\n\0<>"):
                raise InputError(f"{what} must not be empty or hold spaces or <>: {value!r}")
        domain = self.to_domain
        if not domain or any(c in domain for c in " \r\n\0<>@"):
            raise InputError(f"to-domain must be a domain: {domain!r}")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client TLS context (system trust store, or no checks with verify=False)."""
        if self.tls == "none":
            return None
        context = ssl.create_default_context()
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


#: the Message-ID's number field in the bench message: each transaction writes its own
#: number there (:func:`numbered`), so no two messages of a run share a Message-ID
#: (servers and filters that drop duplicates would otherwise skew the load).
_NUMBER = b"000000000000"


def build_bench_message(size: int, sender: str, to_domain: str) -> PreparedMessage:
    """The message every transaction sends: plain ASCII text of exactly ``size``
    octets (headers, body and the CRLF before the dot), built once; each transaction
    numbers its Message-ID (:func:`numbered`).

    >>> build_bench_message(600, "a@example.test", "example.test").size
    600
    """
    head = (
        f"From: <{sender}>\r\n"
        f"To: <rcpt@{to_domain}>\r\n"
        "Subject: asmtp bench\r\n"
        f"Date: {formatdate(usegmt=True)}\r\n"
        f"Message-ID: <bench.{os.getpid()}.{time.time_ns()}.{_NUMBER.decode()}@asmtp.invalid>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n"
    ).encode("ascii")
    remaining = size - len(head)
    if remaining < 2:
        raise InputError(f"size must be at least {len(head) + 2} octets (the headers): {size}")
    filler = b"asmtp bench padding line, the same text every time. 0123456789 abcdefghijkl"
    lines = []
    while remaining > 0:
        n = min(len(filler) + 2, remaining)
        if remaining - n == 1:  # leave room for one whole CRLF line
            n -= 1
        lines.append(filler[: n - 2] + b"\r\n")
        remaining -= n
    prepared = prepare_message(head + b"".join(lines))
    assert prepared.size == size, (prepared.size, size)
    return prepared


def numbered(message: PreparedMessage) -> Callable[[int], PreparedMessage]:
    """The message :func:`build_bench_message` made, numbered: a function of the
    number giving the same message with that number in its Message-ID. The content
    is split once around the number, so each numbered copy is three parts (the
    headers before the number, the number, the rest) sharing the same bytes: no
    message is serialized or copied again.

    >>> number = numbered(build_bench_message(600, "a@example.test", "example.test"))
    >>> copy = number(42)
    >>> b".000000000042@" in copy.data, copy.size, len(copy.parts)
    (True, 600, 3)
    """
    data = message.data
    at = data.index(b"." + _NUMBER + b"@") + 1
    head, tail, size = data[:at], data[at + len(_NUMBER) :], message.size

    def copy(number: int) -> PreparedMessage:
        part = b"%012d" % (number % 10**12)
        return PreparedMessage(data=(head, part, tail), size=size, eight_bit=False, smtputf8=False)

    return copy
