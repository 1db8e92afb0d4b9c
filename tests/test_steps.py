"""The step contract (:mod:`asmtp._core.steps`) on both drivers, against real servers on
loopback: what each step sends back into the session's generator, errors thrown in at
the ``yield`` where they happened, and a write that never finishes because the server
stopped reading.

The asyncio driver runs the steps from its protocol callbacks; the anyio driver (run
here under trio with ``trio.run``, as in test_trio.py) awaits them one by one. The same
generator must see the same thing on both.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
import trio

import asmtp
from asmtp._core.protocol import ClientProtocol
from asmtp._core.reply import Reply
from asmtp._core.steps import Await, Command, Receive, Send, Steps
from asmtp._io.anyio_driver import open_best
from asmtp.errors import SMTPTimeoutError
from servers import FaultServer, SMTPTestServer

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]


def conversation(proto: ClientProtocol, seen: list[Any]) -> Steps[str]:
    """Greeting, EHLO, an awaited call, a drained write, its reply, QUIT."""
    seen.append((yield Receive(5.0, same_step=True)))
    seen.append((yield Command(proto.ehlo("client.asmtp.test"), 5.0)))

    async def hook() -> int:
        await asmtp_sleep()
        return 42

    seen.append((yield Await(hook)))
    seen.append((yield Send(proto.noop(), 5.0, drain=True)))
    seen.append((yield Receive(5.0)))
    seen.append((yield Command(proto.quit(), 5.0)))
    return "done"


async def asmtp_sleep() -> None:
    await anyio.sleep(0.01)


def check_conversation(result: str, seen: list[Any]) -> None:
    assert result == "done"
    greeting, ehlo, hooked, sent, noop, bye = seen
    assert isinstance(greeting, Reply) and greeting.code == 220
    assert isinstance(ehlo, Reply) and ehlo.code == 250 and len(ehlo.lines) > 1
    assert hooked == 42
    assert sent is None
    assert isinstance(noop, Reply) and noop.code == 250
    assert isinstance(bye, Reply) and bye.code == 221


async def run_conversation(host: str, port: int) -> tuple[str, list[Any]]:
    proto = ClientProtocol()
    conn = await open_best(proto, host, port, timeout=5.0)
    seen: list[Any] = []
    try:
        result = await conn.run(conversation(proto, seen))
    finally:
        await conn.aclose()
    return result, seen


async def test_each_step_sends_back_its_outcome_on_asyncio(smtp_server: MakeServer) -> None:
    server = smtp_server()
    result, seen = await run_conversation(server.host, server.port)
    check_conversation(result, seen)
    assert [verb for verb, _ in server.commands][-3:] == ["EHLO", "NOOP", "QUIT"]


def test_each_step_sends_back_its_outcome_on_trio(smtp_server: MakeServer) -> None:
    server = smtp_server()
    result, seen = trio.run(run_conversation, server.host, server.port)
    check_conversation(result, seen)


def caught_timeout(proto: ClientProtocol) -> Steps[str]:
    # The steps before allow an hour: the short step must still end on its own time.
    yield Receive(3600.0, same_step=True)
    yield Command(proto.ehlo("client.asmtp.test"), 3600.0)
    try:
        yield Command(proto.noop(), 0.3)
    except SMTPTimeoutError as exc:
        return f"caught at {exc.stage}"
    return "no timeout"


async def run_caught_timeout(host: str, port: int) -> str:
    proto = ClientProtocol()
    conn = await open_best(proto, host, port, timeout=3600.0)
    try:
        with anyio.fail_after(60):  # a guard: the step ends at 0.3 s, not at the hour
            return await conn.run(caught_timeout(proto))
    finally:
        conn.abort()


async def test_a_timeout_is_thrown_in_at_the_yield_on_asyncio(fault_server: MakeFault) -> None:
    server = fault_server(noop="silence")
    assert await run_caught_timeout(server.host, server.port) == "caught at noop"


def test_a_timeout_is_thrown_in_at_the_yield_on_trio(fault_server: MakeFault) -> None:
    server = fault_server(noop="silence")
    assert trio.run(run_caught_timeout, server.host, server.port) == "caught at noop"


@contextlib.asynccontextmanager
async def stops_reading_after_354(says: bytes | None = None) -> AsyncIterator[tuple[str, int]]:
    """A server that answers up to DATA's 354, then reads nothing more (saying ``says``
    a moment later, if given: a 421 while the client still writes) and then resets the
    connection (SO_LINGER 0): the client's unsent content is lost and the server cannot
    have read the end-of-data dot."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stall.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-stall.test\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
        await asyncio.sleep(0.3)  # the client's writes fill the socket buffers meanwhile
        if says is not None:
            writer.write(says)
            await writer.drain()
        await asyncio.sleep(0.3)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield "127.0.0.1", server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def send_16_mb(host: str, port: int) -> asmtp.RecipientResult:
    """16 MB, which does not fit in loopback socket buffers: the write waits (drains)
    for the server to read."""
    body = "x" * 998 + "\r\n"
    message = asmtp.build_message(
        from_="s@example.com", to="a@example.org", subject="big", body=body * 16_000
    )
    report = await asmtp.send(
        message,
        sender="s@example.com",
        recipients=["a@example.org"],
        relay=asmtp.Relay(host, port, tls="none", helo="client.asmtp.test"),
        timeout=10,
    )
    [result] = report
    return result


async def test_a_write_cut_off_before_the_dot_left_is_transient_not_unknown() -> None:
    # The server no longer reads: the write waits until the reset.
    async with stops_reading_after_354() as (host, port):
        result = await send_16_mb(host, port)
    assert (result.status, result.stage) == ("transient", "message")
    assert "lost" in result.message or "reset" in result.message


def a_bug_after_the_greeting(proto: ClientProtocol) -> Steps[None]:
    yield Receive(3600.0, same_step=True)
    raise ValueError("a bug in the steps")


async def test_a_bug_in_the_steps_reaches_the_task_at_once(smtp_server: MakeServer) -> None:
    # Run from a read callback, the bug must still end the run (not wait for the hour).
    server = smtp_server()
    proto = ClientProtocol()
    conn = await open_best(proto, server.host, server.port, timeout=3600.0)
    try:
        with anyio.fail_after(60), pytest.raises(ValueError, match="a bug in the steps"):
            await conn.run(a_bug_after_the_greeting(proto))
    finally:
        conn.abort()


async def test_a_reply_while_the_message_is_still_being_written_waits_its_turn() -> None:
    # Bytes that arrive while a drained write waits for the kernel are the next
    # reply's: the steps go on writing (here until the reset), nothing is woken early.
    async with stops_reading_after_354(says=b"421 4.3.2 shutting down\r\n") as (host, port):
        result = await send_16_mb(host, port)
    assert (result.status, result.stage) == ("transient", "message"), result
    # the connection's loss, not an internal error from a step woken with nothing
    assert "lost" in result.message or "reset" in result.message, result.message
