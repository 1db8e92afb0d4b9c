"""A small LMTP server (RFC 2033) for asmtp's tests, on loopback TCP or a Unix-domain
socket: the exchange a local delivery agent speaks, answered per recipient.

Written here rather than taken from aiosmtpd: ``aiosmtpd.lmtp.LMTP`` greets with LHLO
but answers the end of data once, as SMTP does, never once per recipient, which is the
whole point of LMTP (RFC 2033 4.2). Dovecot's LMTP, the real thing, runs behind the
``dovecot`` marker (tests/dovecot.py); this one runs in the default suite.

    with LMTPServer(delivery_reply=lambda rcpt: "452 4.2.2 full" if "bob" in rcpt else None) as s:
        ...  # asmtp sends to s.port (or s.path); s.deliveries lists what was saved

It speaks LHLO (EHLO and HELO get 500, as RFC 2033 4.1 has them unknown), MAIL, RCPT,
DATA and BDAT (CHUNKING, RFC 3030; with LAST, one reply per recipient as for DATA),
RSET, NOOP and QUIT, in order, so commands may arrive pipelined. Options:

* ``path``: listen on this Unix socket instead of 127.0.0.1;
* ``pipelining``, ``chunking``: whether LHLO offers them;
* ``rcpt_reply(address)``: a reply line, or None for ``250 2.1.5 OK``;
* ``delivery_reply(address)``: each accepted recipient's reply after the data, or None
  for ``250 2.0.0 <address> saved`` (a 2xx reply records a delivery); a ``421`` closes
  the connection after it is sent;
* ``close_after``: close the connection (without QUIT's courtesy) once that many
  per-recipient replies of a transaction have been sent;
* ``stall_after``: once that many per-recipient replies have been sent, say nothing
  more (the connection stays open until the client goes).

Records (thread-safe snapshots): :attr:`deliveries` (one per recipient saved),
:attr:`commands` (command lines as received), :attr:`connections`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["Delivery", "LMTPServer"]

_T = TypeVar("_T")
Script = Callable[[str], str | None]


@dataclass(frozen=True)
class Delivery:
    """One recipient's copy of a message, as the server saved it."""

    mail_from: str
    recipient: str
    data: bytes  # the content as the client meant it (dot-unstuffed, without the dot)


def _address(argument: bytes) -> str:
    """``FROM:<a@example.com> SIZE=12`` -> ``a@example.com``."""
    text = argument.decode("utf-8", "replace")
    return text.partition("<")[2].partition(">")[0]


class LMTPServer:
    """See the module docstring."""

    def __init__(
        self,
        *,
        path: str | None = None,
        pipelining: bool = True,
        chunking: bool = True,
        rcpt_reply: Script | None = None,
        delivery_reply: Script | None = None,
        close_after: int | None = None,
        stall_after: int | None = None,
    ) -> None:
        self.path = path
        self.host = "127.0.0.1"
        self.port = 0
        self.pipelining = pipelining
        self.chunking = chunking
        self.rcpt_reply = rcpt_reply
        self.delivery_reply = delivery_reply
        self.close_after = close_after
        self.stall_after = stall_after
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        self._commands: list[str] = []
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    # ----------------------------------------------------------------- life cycle

    def start(self) -> LMTPServer:
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="LMTPServer", daemon=True)
        self._thread.start()
        self._run(self._open())
        return self

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10.0)

    async def _open(self) -> None:
        if self.path is not None:
            self._server = await asyncio.start_unix_server(self._serve, self.path)
        else:
            self._server = await asyncio.start_server(self._serve, self.host, 0)
            self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), loop).result(10.0)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(10.0)
        loop.close()
        if self.path is not None and os.path.exists(self.path):
            os.unlink(self.path)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()

    def __enter__(self) -> LMTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- records

    @property
    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    @property
    def commands(self) -> list[str]:
        with self._lock:
            return list(self._commands)

    @property
    def connections(self) -> int:
        return self._connections

    # ----------------------------------------------------------------- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self._connections += 1
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 lmtp.test LMTP ready\r\n")
        sender: str | None = None
        accepted: list[str] = []
        chunks: list[bytes] = []
        for _ in range(10_000):  # bounded: a test session is a few commands
            await writer.drain()
            line = await reader.readline()
            if not line:
                return
            with self._lock:
                self._commands.append(line.rstrip(b"\r\n").decode("utf-8", "replace"))
            verb, _, argument = line.strip().partition(b" ")
            verb = verb.upper()
            if verb == b"LHLO":
                offers = ["lmtp.test", "8BITMIME", "ENHANCEDSTATUSCODES"]
                offers += ["PIPELINING"] * self.pipelining + ["CHUNKING"] * self.chunking
                lines = [f"250-{o}" for o in offers[:-1]] + [f"250 {offers[-1]}"]
                writer.write("".join(f"{x}\r\n" for x in lines).encode())
            elif verb in (b"EHLO", b"HELO"):
                writer.write(b"500 5.5.1 LMTP greets with LHLO\r\n")
            elif verb == b"MAIL":
                sender, accepted, chunks = _address(argument), [], []
                writer.write(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                rcpt = _address(argument)
                reply = self.rcpt_reply(rcpt) if self.rcpt_reply is not None else None
                if sender is None:
                    reply = "503 5.5.1 MAIL first"
                elif reply is None or reply.startswith("2"):
                    accepted.append(rcpt)
                writer.write(f"{reply or '250 2.1.5 OK'}\r\n".encode())
            elif verb == b"DATA":
                if not accepted:
                    writer.write(b"503 5.5.1 No valid recipients\r\n")
                    continue
                writer.write(b"354 OK\r\n")
                await writer.drain()
                data = await _read_data(reader)
                assert sender is not None
                if not await self._answer(writer, sender, accepted, data):
                    return
                sender, accepted = None, []
            elif verb == b"BDAT":
                size, _, last = argument.partition(b" ")
                chunks.append(await reader.readexactly(int(size)))
                if not accepted:
                    writer.write(b"503 5.5.1 No valid recipients\r\n")
                elif last.upper() != b"LAST":
                    writer.write(f"250 2.0.0 {int(size)} octets\r\n".encode())
                else:
                    assert sender is not None
                    if not await self._answer(writer, sender, accepted, b"".join(chunks)):
                        return
                    sender, accepted, chunks = None, [], []
            elif verb == b"RSET":
                sender, accepted, chunks = None, [], []
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"NOOP":
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"500 5.5.2 unknown command\r\n")

    async def _answer(
        self, writer: asyncio.StreamWriter, sender: str, accepted: list[str], data: bytes
    ) -> bool:
        """One reply per accepted recipient, in RCPT order (RFC 2033 4.2); False when
        the connection is to end."""
        for sent, rcpt in enumerate(accepted):
            if self.close_after is not None and sent == self.close_after:
                await writer.drain()
                writer.transport.abort()
                return False
            if self.stall_after is not None and sent == self.stall_after:
                await writer.drain()
                await writer.wait_closed()  # silence until the client gives up
                return False
            script = self.delivery_reply
            reply = (script(rcpt) if script is not None else None) or f"250 2.0.0 <{rcpt}> saved"
            if reply.startswith("2"):
                with self._lock:
                    self._deliveries.append(Delivery(sender, rcpt, data))
            writer.write(f"{reply}\r\n".encode())
            if reply.startswith("421"):
                await writer.drain()
                return False
        return True


async def _read_data(reader: asyncio.StreamReader) -> bytes:
    """The content after 354, up to the lone dot, dot-unstuffed (RFC 5321 4.5.2)."""
    lines = []
    while (line := await reader.readline()) != b".\r\n":
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        lines.append(line[1:] if line.startswith(b".") else line)
    return b"".join(lines)
