"""What a session asks of its driver, as data. No I/O.

A session's policy (:mod:`asmtp.session`) is written as generators that yield these
steps and are sent each step's outcome, so one policy runs on every driver: the
asyncio driver runs the steps from its read callback, writing each command the moment
the reply before it is parsed, with no task wakeup per reply; the anyio driver (trio)
awaits them one by one. Each driver's ``run(steps)`` returns what the generator
returns; an :class:`~asmtp.errors.SMTPError` met while taking a step (a timeout, the
connection lost, a malformed reply) is thrown into the generator at its ``yield``, so
the policy can handle it where it happened.

    def hello(proto: ClientProtocol) -> Steps[Reply]:
        greeting = yield Receive(30.0)
        if greeting.code != 220:
            raise ...
        return (yield Command(proto.ehlo("client.example"), 30.0))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, NamedTuple, TypeVar

__all__ = ["Await", "Command", "Receive", "Send", "Step", "Steps"]

T = TypeVar("T")


class Command(NamedTuple):
    """Write ``data`` and wait for the next reply (sent back: the
    :class:`~asmtp.reply.Reply`), both within one new step of ``timeout`` seconds
    (None: no limit)."""

    data: bytes
    timeout: float | None


class Receive(NamedTuple):
    """Wait for the next reply (sent back: the Reply) within a new step of ``timeout``
    seconds; with ``same_step`` within the step already running (the greeting shares
    the connect's)."""

    timeout: float | None
    same_step: bool = False


class Send(NamedTuple):
    """Write ``data`` within a new step of ``timeout`` seconds; with ``drain``, also
    wait until the kernel has taken all of it (so "sent" means handed to the network,
    as the end-of-data dot needs). Sent back: None."""

    data: bytes
    timeout: float | None
    drain: bool = False


class Await(NamedTuple):
    """Await ``call()`` in the session's task (the TLS handshake, a caller's hook, a
    password function); sent back: what it returns."""

    call: Callable[[], Awaitable[Any]]


Step = Command | Receive | Send | Await
Steps = Generator[Step, Any, T]
