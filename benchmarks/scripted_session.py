"""asmtp's sans-IO parts alone, on the fan-out's message: what they cost a message before
any I/O. ``benchmarks/instructions.py --clients core,policy`` measures them beside the
full clients.

This file owns driving them with scripted server replies (no socket, no event loop, no
timer), one message each, as the fan-out's sessions go against smtp-sink: greeting,
EHLO with PIPELINING, MAIL+RCPT+DATA in one write and their three replies read at once,
then the content with QUIT and both replies.

- ``core``: the :class:`~asmtp._core.protocol.ClientProtocol` alone: every command's
  bytes and checks, every reply parsed and applied to the state;
- ``policy``: the session's steps (``Session.one_shot``: greeting, EHLO, the
  transaction, the recipient's result, QUIT) on that protocol, taken as the asyncio
  driver takes them (a reply to every ``Command`` and ``Receive``, nothing for a
  ``Send``).
"""

from __future__ import annotations

import asyncio
import time

from asmtp._core.prepared import PreparedMessage, prepare_message
from asmtp._core.protocol import ClientProtocol
from asmtp._core.reply import NEED_DATA, Reply
from asmtp._core.steps import Command, Receive
from asmtp._delivery.endpoint import Endpoint
from asmtp._delivery.session import Session
from asmtp.config import Relay, Timeouts
from asmtp.results import RecipientResult

SENDER = "bench@example.test"
HELO = "bench.example.test"
# What smtp-sink answers, read by read (a pipelined group's replies come in one read).
READS = (
    b"220 sink.example.test ESMTP\r\n",
    b"250-sink.example.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n250 DSN\r\n",
    b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n",
    b"250 2.0.0 Ok: queued as 4F2A9\r\n221 2.0.0 Bye\r\n",
)


def run(kind: str, message: bytes, recipients: list[str]) -> None:
    """One scripted session per recipient: ``kind`` is "core" or "policy"."""
    prepared = prepare_message(message)
    if kind == "core":
        for rcpt in recipients:
            _core(rcpt, prepared)
        return
    endpoint = asyncio.run(
        Endpoint.for_relay(Relay("127.0.0.1", 25, tls="none", helo=HELO), resolve=False)
    )
    timeouts = Timeouts.of(30.0)
    for rcpt in recipients:
        _policy(Session(endpoint, timeouts), rcpt, prepared)


def _core(rcpt: str, prepared: PreparedMessage) -> None:
    proto = ClientProtocol()
    reads = iter(READS)

    def reply(code: int) -> None:
        got = proto.next_reply()
        if got is NEED_DATA:
            proto.receive_data(next(reads))
            got = proto.next_reply()
        assert isinstance(got, Reply) and got.code == code, got

    reply(220)
    proto.ehlo(HELO)
    reply(250)
    proto.envelope(SENDER, [rcpt], ())
    reply(250)
    reply(250)
    reply(354)
    proto.message(prepared.parts, then_quit=True)
    reply(250)
    reply(221)
    assert proto.closed


def _policy(session: Session, rcpt: str, prepared: PreparedMessage) -> None:
    proto = session.proto
    reads = iter(READS)
    results: dict[str, RecipientResult] = {}
    steps = session.one_shot(SENDER, [rcpt], prepared, results, started=0.0, clock=time.monotonic)
    value = None
    try:
        while True:
            step = steps.send(value)
            if type(step) is Receive or type(step) is Command:
                value = proto.next_reply()
                if value is NEED_DATA:
                    proto.receive_data(next(reads))
                    value = proto.next_reply()
            else:
                value = None  # a Send: written
    except StopIteration:
        pass
    assert results[rcpt].status == "delivered", results
