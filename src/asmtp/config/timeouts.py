""":class:`Timeouts`: how long each network step may take."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import check_number


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
