"""The ceiling client with asmtp's protocol inside: what asmtp's sans-IO core costs in a
real fan-out, with nothing else of asmtp around it.

This file owns that one client. It is ``ceiling_client.py`` (the same tasks, connections,
shared read buffer, one future per session, the whole session run from the read
callback, QUIT pipelined with the content) with every byte going through a
:class:`asmtp._core.protocol.ClientProtocol`: the commands are the protocol's
(``ehlo()``, ``envelope()``, ``message(..., then_quit=True)``), every reply is parsed
and checked by it (``next_reply()``) and its code checked against the step. No session
policy, no driver, no dispatcher, no results. Whatever any client built on asmtp's
protocol costs at least, this row shows.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence

from ceiling_client import Outcome, ReplyCodeError, _Session, run_sessions

from asmtp._core.prepared import prepare_message
from asmtp._core.protocol import ClientProtocol
from asmtp._core.reply import NEED_DATA, Reply
from asmtp._core.steps import Data
from asmtp.errors import SMTPError

# The codes each step's replies must have, in order: the greeting; EHLO; MAIL, RCPT and
# DATA (one write); the end of data and QUIT (one write).
_EXPECT = ((220,), (250,), (250, 250, 354), (250, 221))
_STAGES = ("greeting", "EHLO", "MAIL, RCPT and DATA", "end of data and QUIT")


class _ProtocolSession(_Session):
    """One connection, one message, every byte through a ClientProtocol."""

    __slots__ = ("_content", "_got", "_helo", "_proto", "_sender", "_step", "_to")

    def __init__(
        self,
        helo: str,
        sender: str,
        content: Data,
        recipient: str,
        buffer: memoryview,
        done: asyncio.Future[None],
        task: asyncio.Task[None] | None,
    ) -> None:
        # What the inherited callbacks use (connection_made, get_buffer, _finish, _fail,
        # connection_lost, time_out); the rest of _Session's state is its own exchange's.
        self._buffer = buffer
        self._done = done
        self._task = task
        self._transport = None
        self.timed_out = False
        self._proto = ClientProtocol()
        self._helo, self._sender, self._content, self._to = helo, sender, content, recipient
        self._step = 0  # the index in _EXPECT of the step whose replies come next
        self._got = 0  # its replies read so far

    def buffer_updated(self, nbytes: int) -> None:
        proto = self._proto
        proto.inbox += self._buffer[:nbytes]  # copied at once: the buffer is shared
        try:
            while (reply := proto.next_reply()) is not NEED_DATA:
                assert isinstance(reply, Reply)
                expected = _EXPECT[self._step]
                if reply.code != expected[self._got]:
                    raise ReplyCodeError(f"{_STAGES[self._step]}: {reply}")
                self._got += 1
                if self._got == len(expected) and not self._advance():
                    return
        except (SMTPError, ReplyCodeError) as exc:
            self._fail(exc if isinstance(exc, ReplyCodeError) else ReplyCodeError(str(exc)))

    def _advance(self) -> bool:
        """The current step is answered: write the next one's bytes. False at the end."""
        self._step += 1
        self._got = 0
        proto, transport = self._proto, self._transport
        assert transport is not None
        if self._step == 1:
            transport.write(proto.ehlo(self._helo))
        elif self._step == 2:
            if not proto.capabilities.pipelining:
                raise ReplyCodeError("EHLO: no PIPELINING (this client needs it)")
            transport.write(proto.envelope(self._sender, [self._to], ()))
        elif self._step == 3:
            data = proto.message(self._content, then_quit=True)
            transport.write(data if isinstance(data, bytes) else b"".join(data))
        else:
            self._finish()
            return False
        return True


async def send_all(
    host: str,
    port: int,
    message: bytes,
    sender: str,
    recipients: Sequence[str],
    *,
    concurrency: int,
    helo: str,
    message_timeout: float = 30.0,
) -> list[Outcome]:
    """As ``ceiling_client.send_all``, through asmtp's protocol."""
    # make(recipient, buffer, done, task), as run_sessions calls it
    make = functools.partial(_ProtocolSession, helo, sender, prepare_message(message).parts)
    return await run_sessions(
        host, port, recipients, make, concurrency=concurrency, message_timeout=message_timeout
    )
