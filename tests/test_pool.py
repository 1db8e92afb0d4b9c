"""Pooled sessions for web backends: reuse counted on the server side, dead sessions
replaced, limits honoured, concurrent sends kept apart. Sessions age on a clock the
test moves (:class:`Clock`), never by sleeping; what the pool does with a session is
:func:`asmtp._delivery.pool.verdict`, tested here without sockets too.

The integration tests run on asyncio and on trio (the ``anyio`` mark; see conftest.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from typing import Any

import anyio
import pytest
import sniffio
from hypothesis import given, settings
from hypothesis import strategies as st

import asmtp
from asmtp._core.prepared import prepare_message
from asmtp._delivery.endpoint import Endpoint
from asmtp._delivery.pool import SessionPool, Usage, Verdict, verdict
from servers import FaultServer, SMTPTestServer, free_port

pytestmark = pytest.mark.anyio

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]


class Clock:
    """A clock the test moves by hand: pooled sessions age only when it is told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextlib.asynccontextmanager
async def session_pool(
    server: SMTPTestServer, limits: asmtp.Pool, clock: Clock, *, reap_every: float = 0.01
) -> AsyncIterator[SessionPool]:
    """A pool to ``server`` on ``clock``, its reaper looking every ``reap_every`` seconds."""
    endpoint = await Endpoint.for_relay(asmtp.Relay(server.host, server.port, tls="none"))
    pool = SessionPool(endpoint, asmtp.Timeouts.of(5.0), limits, clock=clock)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.reap, reap_every)
        try:
            yield pool
        finally:
            await pool.aclose()
            tg.cancel_scope.cancel()


async def send_pooled(pool: SessionPool, n: int) -> None:
    """One send on a session borrowed from ``pool`` and given back, as the Mailer sends."""
    pooled = await pool.acquire()
    [result] = await pooled.session.deliver(
        "app@example.com", [f"user{n}@example.org"], prepare_message(note(n))
    )
    await pool.release(pooled)
    assert result.ok, result


async def test_each_backend_runs_the_test_on_its_own_loop(anyio_backend: str) -> None:
    # pytest-asyncio's auto mode would run every coroutine test on asyncio (conftest.py)
    assert sniffio.current_async_library() == anyio_backend


def note(n: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["To"] = f"user{n}@example.org"
    msg["Subject"] = f"note {n}"
    msg.set_content(f"body {n}\n")
    return msg


async def test_many_concurrent_sends_share_few_authenticated_sessions(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(starttls_context=tls_server_context, auth={"app": "pw"})
    relay = asmtp.Relay(
        "localhost", server.port, username="app", password="pw", ssl_context=tls_client_context
    )
    results: dict[int, asmtp.Report] = {}
    async with asmtp.Mailer(relay, pool=asmtp.Pool(max_connections=4)) as mailer:

        async def send(n: int) -> None:
            results[n] = await mailer.send(note(n))

        async with anyio.create_task_group() as tg:
            for n in range(120):
                tg.start_soon(send, n)
        assert mailer.sessions_opened <= 4
    assert all(r.ok for r in results.values())
    assert server.sessions_opened <= 4
    assert server.max_concurrent_sessions <= 4
    # never interleaved: each recipient got its own message, intact
    for m in server.messages:
        n = int(m.rcpt_tos[0][4:].split("@")[0])
        assert f"Subject: note {n}".encode() in m.content and f"body {n}".encode() in m.content
    assert len(server.messages) == 120
    assert {m.auth_user for m in server.messages} == {"app"}


async def test_message_cap_opens_a_new_session(smtp_server: MakeServer) -> None:
    server = smtp_server()
    relay = asmtp.Relay(server.host, server.port, tls="none")
    async with asmtp.Mailer(relay, pool=asmtp.Pool(max_messages=3)) as mailer:
        for n in range(10):
            assert (await mailer.send(note(n))).ok
    assert server.sessions_opened == 4  # 3 + 3 + 3 + 1


async def test_age_cap_opens_a_new_session(smtp_server: MakeServer) -> None:
    server = smtp_server()
    clock = Clock()
    async with session_pool(server, asmtp.Pool(max_age=60), clock) as pool:
        for n in range(3):
            await send_pooled(pool, n)
            clock.advance(61)
    assert server.sessions_opened == 3


async def test_idle_sessions_are_closed(smtp_server: MakeServer) -> None:
    server = smtp_server()
    clock = Clock()
    async with session_pool(server, asmtp.Pool(idle_timeout=60), clock) as pool:
        await send_pooled(pool, 1)
        assert server.active_sessions == 1
        clock.advance(61)
        assert await server.idle()  # the reaper, in this loop, closes it meanwhile
        await send_pooled(pool, 2)
    assert server.sessions_opened == 2


async def test_a_server_that_dropped_the_session_is_survived(smtp_server: MakeServer) -> None:
    port = free_port("127.0.0.1")
    first = smtp_server(port=port)
    relay = asmtp.Relay("127.0.0.1", port, tls="none")
    async with asmtp.Mailer(relay, pool=asmtp.Pool(check_after=60), retry=None) as mailer:
        assert (await mailer.send(note(1))).ok
        first.stop()  # drops the pooled connection
        second = smtp_server(port=port)
        report = await mailer.send(note(2))
    assert report.ok, report.failed()
    assert [m.rcpt_tos for m in second.messages] == [["user2@example.org"]]


async def test_checked_before_reuse_after_idling(smtp_server: MakeServer) -> None:
    server = smtp_server()
    clock = Clock()
    async with session_pool(server, asmtp.Pool(check_after=10), clock) as pool:
        await send_pooled(pool, 1)
        clock.advance(11)
        await send_pooled(pool, 2)
    assert server.sessions_opened == 1
    assert [verb for verb, _ in server.commands].count("RSET") == 1


async def test_recipient_deadline_applies_to_pooled_sends(fault_server: MakeFault) -> None:
    server = fault_server(rcpt="silence")
    relay = asmtp.Relay(server.host, server.port, tls="none")
    async with asmtp.Mailer(
        relay, pool=True, retry=None, timeout=60, recipient_deadline=1.5
    ) as mailer:
        [r] = await mailer.send(note(1))
        assert (r.status, r.stage) == ("transient", "rcpt")
        assert "deadline" in r.message
    assert await server.idle()  # the cut-short session was not kept


async def test_a_session_whose_pre_dot_hook_fails_is_never_lent_again(
    smtp_server: MakeServer,
) -> None:
    # The journal's pre-dot line could not be written: the session is in DATA with no
    # content to send, so it is closed (the server drops the transaction), not reused.
    from asmtp._core.prepared import prepare_message
    from asmtp._delivery.endpoint import Endpoint
    from asmtp._delivery.session import Session
    from asmtp._delivery.transaction import Extras

    server = smtp_server()
    endpoint = await Endpoint.for_relay(asmtp.Relay(server.host, server.port, tls="none"))

    async def journal_full(recipients: object) -> None:
        raise asmtp.JournalWriteError("the journal cannot be written: No space left on device")

    session = Session(endpoint, asmtp.Timeouts.of(5.0))
    await session.connect()
    [result] = await session.deliver(
        "app@example.com", ["user1@example.org"], prepare_message(note(1)),
        extras=Extras(before_dot=journal_full),
    )  # fmt: skip
    assert result.status == "transient" and "No space left" in result.message
    assert not session.is_open
    assert server.messages == []


# --------------------------------------------------------------------------- verdict

LIMITS = asmtp.Pool(max_messages=3, max_age=60, idle_timeout=30, check_after=1)


@pytest.mark.parametrize(
    ("usage", "now", "expected"),
    [
        (Usage(created=0, last_used=0), 0, "reuse"),
        (Usage(created=0, last_used=0, messages=2), 0.5, "reuse"),
        (Usage(created=0, last_used=0), 1, "check"),  # idle check_after: RSET first
        (Usage(created=0, last_used=10), 39.9, "check"),
        (Usage(created=0, last_used=10), 40, "retire"),  # idle idle_timeout
        (Usage(created=0, last_used=59.5), 60, "retire"),  # lived max_age, however busy
        (Usage(created=0, last_used=5, messages=3), 5, "retire"),  # served max_messages
    ],
)
def test_verdict(usage: Usage, now: float, expected: Verdict) -> None:
    assert verdict(usage, LIMITS, now) == expected


def test_check_after_zero_checks_every_reuse() -> None:
    assert verdict(Usage(created=0, last_used=0), asmtp.Pool(check_after=0), 0) == "check"


@settings(max_examples=200, deadline=None)
@given(
    created=st.floats(0, 100),
    idle_since=st.floats(0, 100),
    messages=st.integers(0, 5),
    now=st.floats(0, 200),
    later=st.floats(0, 200),
)
def test_time_only_ever_worsens_the_verdict(
    created: float, idle_since: float, messages: int, now: float, later: float
) -> None:
    usage = Usage(created=created, last_used=created + idle_since, messages=messages)
    now = max(now, usage.last_used)
    rank = {"reuse": 0, "check": 1, "retire": 2}
    assert rank[verdict(usage, LIMITS, now + later)] >= rank[verdict(usage, LIMITS, now)]


class _QuitBarrier(asyncio.Protocol):
    """A minimal SMTP server that answers QUIT only once every connection it holds has
    sent QUIT while all of them are still open: a pool that says QUIT to one session,
    waits for its 221, then goes on to the next, never gets an answer."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.state["open"].add(self)
        transport.write(b"220 barrier ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.state["open"].discard(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.state["in_data"].get(self):
                if line == b".":
                    self.state["in_data"][self] = False
                    self.transport.write(b"250 queued\r\n")
                continue
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-barrier\r\n250 PIPELINING\r\n")
            elif verb == b"DATA":
                self.state["in_data"][self] = True
                self.transport.write(b"354 go ahead\r\n")
            elif verb == b"QUIT":
                self.state["quit"].add(self)
                if self.state["quit"] == self.state["open"]:
                    self.state["together"] = True
                    for peer in self.state["quit"]:
                        peer.transport.write(b"221 bye\r\n")
                        peer.transport.close()
            else:
                self.transport.write(b"250 ok\r\n")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_closing_a_pool_says_quit_to_every_session_at_once(anyio_backend: str) -> None:
    state: dict[str, Any] = {"open": set(), "quit": set(), "in_data": {}, "together": False}
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _QuitBarrier(state), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        endpoint = await Endpoint.for_relay(asmtp.Relay("127.0.0.1", port, tls="none"))
        limits = asmtp.Pool(max_connections=3)
        pool = SessionPool(endpoint, asmtp.Timeouts.of(2.0), limits, clock=Clock())
        message = prepare_message(b"From: a@example.com\r\n\r\nhi\r\n")
        async with anyio.create_task_group() as tg:
            for n in range(3):
                tg.start_soon(pool.deliver, "a@example.com", f"r{n}@example.org", message)
        assert len(state["open"]) == 3
        await pool.aclose()
    finally:
        server.close()
        await server.wait_closed()
    # All three QUITs arrived while all three sessions were open; each got its 221.
    assert state["together"] and len(state["quit"]) == 3
