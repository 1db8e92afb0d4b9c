"""What a session asks of its driver, as data. No I/O.

A session's policy (:mod:`asmtp._delivery.session`) is written as generators that yield these
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

What a step writes is :data:`Data`: bytes, or pieces written in order as if joined (the
message content and a pipelined QUIT; BDAT commands and their chunks, views of the
message's blocks), so that no step copies a message to add a command to it. A driver
writes at most :data:`WRITE_BLOCK` octets at a time and the next block only once the
kernel has taken the one before, so however many sessions send one message at once,
each holds views of the same bytes, not copies of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, Final, NamedTuple, TypeVar

__all__ = [
    "GREETING",
    "WRITE_BLOCK",
    "Await",
    "Command",
    "Data",
    "Receive",
    "Send",
    "Step",
    "Steps",
    "command",
    "receive",
    "send",
]

T = TypeVar("T")

_tuple_new: Final = tuple.__new__

Data = bytes | tuple[bytes | memoryview, ...]
"""What a step writes: bytes, or pieces written one after the other without waiting
for a reply in between (RFC 2920 pipelining) and without being joined into a copy."""

WRITE_BLOCK: Final = 65536
"""The most a driver hands its transport at once. Data up to this size is written in
one piece (a small message and its pipelined QUIT: one write, one system call); larger
data goes in blocks, each written once the kernel has taken the one before, so what
a slow reader leaves queued per session is at most about one block, and each block's
progress restarts the step's timeout (RFC 5321 4.5.3.2: a timeout per data block)."""


class Command(NamedTuple):
    """Write ``data`` and wait for the next reply (sent back: the
    :class:`~asmtp._core.reply.Reply`), both within one new step of ``timeout`` seconds
    (None: no limit)."""

    data: Data
    timeout: float | None


def command(data: Data, timeout: float | None) -> Command:
    """``Command(data, timeout)``, made without the Python-level ``__new__`` a NamedTuple
    is called through (a command or two a message: the difference is measurable)."""
    return _tuple_new(Command, (data, timeout))


class Receive(NamedTuple):
    """Wait for the next reply (sent back: the Reply) within a new step of ``timeout``
    seconds; with ``same_step`` within the step already running (the greeting shares
    the connect's)."""

    timeout: float | None
    same_step: bool = False


#: the greeting, read within the connect's step
GREETING: Final = Receive(None, same_step=True)

_RECEIVES: Final[dict[float | None, Receive]] = {}


def receive(timeout: float | None) -> Receive:
    """``Receive(timeout)``, made once per timeout: a step is a value, and a session
    waits for a reply several times a message with the same few timeouts."""
    step = _RECEIVES.get(timeout)
    if step is None:
        if len(_RECEIVES) >= 64:
            _RECEIVES.clear()
        step = _RECEIVES[timeout] = Receive(timeout)
    return step


class Send(NamedTuple):
    """Write ``data`` within a new step of ``timeout`` seconds (restarted by each block
    of :data:`WRITE_BLOCK` octets the kernel takes); with ``drain``, also wait until
    the kernel has taken all of it (so "sent" means handed to the network, as the
    end-of-data dot needs; over TLS, all of its encrypted bytes). Sent back: None."""

    data: Data
    timeout: float | None
    drain: bool = False


def send(data: Data, timeout: float | None, drain: bool = False) -> Send:
    """``Send(data, timeout, drain)``, made as :func:`command` makes a Command."""
    return _tuple_new(Send, (data, timeout, drain))


class Await(NamedTuple):
    """Await ``call()`` in the session's task (the TLS handshake, a caller's hook, a
    password function); sent back: what it returns."""

    call: Callable[[], Awaitable[Any]]


Step = Command | Receive | Send | Await
Steps = Generator[Step, Any, T]
