"""``asmtp sink``, the load-test server: its exchange fed bytes directly (sans-IO), then
the server in process on a free loopback port driven by asmtp and by smtplib, then the
command as people run it. Round trips are counted from the batches of replies the sink
wrote, never timed on the client."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

import asmtp
from asmtp.cli.sink.main import is_loopback
from asmtp.cli.sink.server import Batch, SinkServer
from asmtp.cli.sink.session import Counters, End, SinkSession, SinkSettings

MESSAGE = b"From: a@example.org\r\nSubject: sink\r\n\r\nHello.\r\n..a stuffed dot\r\n"
SENDER = "sender@example.org"
HELO = "client.asmtp.test"


def session(**settings: object) -> tuple[SinkSession, Counters]:
    """A session past its greeting and EHLO."""
    counters = Counters()
    s = SinkSession(SinkSettings(**settings), counters)  # type: ignore[arg-type]
    assert s.greeting() == b"220 sink.asmtp.test ESMTP asmtp sink\r\n"
    assert s.receive(b"EHLO client.asmtp.test\r\n").startswith(b"250-sink.asmtp.test\r\n")
    return s, counters


def relay(sink: SinkServer) -> asmtp.Relay:
    return asmtp.Relay("127.0.0.1", sink.port, tls="none", helo=HELO)


@asynccontextmanager
async def recording_sink(**settings: object) -> AsyncIterator[tuple[SinkServer, list[Batch]]]:
    """A sink on a free loopback port, with every batch of replies it writes."""
    batches: list[Batch] = []
    sink = SinkServer(SinkSettings(**settings), on_batch=batches.append)  # type: ignore[arg-type]
    async with sink:
        yield sink, batches


def by_connection(batches: list[Batch]) -> dict[int, list[tuple[int, ...]]]:
    """Each connection's batches as their reply codes, in the order written."""
    seen: dict[int, list[tuple[int, ...]]] = {}
    for batch in batches:
        seen.setdefault(batch.connection, []).append(batch.codes)
    return seen


# ----------------------------------------------------------------------- the exchange


def test_ehlo_offers_the_extensions_and_chunking_only_when_asked() -> None:
    plain = SinkSession(SinkSettings(), Counters()).receive(b"EHLO c.example\r\n")
    assert plain == (
        b"250-sink.asmtp.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
    )
    chunking = SinkSession(SinkSettings(chunking=True), Counters()).receive(b"EHLO c\r\n")
    assert chunking.endswith(b"250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n")
    bare = SinkSession(SinkSettings(pipelining=False), Counters()).receive(b"EHLO c\r\n")
    assert b"PIPELINING" not in bare


def test_a_pipelined_transaction_and_an_end_of_data_split_across_reads() -> None:
    s, counters = session()
    assert s.receive(b"MAIL FROM:<a@example.org> SIZE=60 BODY=8BITMIME\r\n") == (
        b"250 2.1.0 Ok\r\n"
    )
    assert s.receive(b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n") == (
        b"250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    )
    assert s.receive(b"Subject: x\r\n\r\n..stuffed, not the end\r\nlast line\r") == b""
    assert s.receive(b"\n.") == b""
    assert s.receive(b"\r\nQUIT\r\n") == b"250 2.0.0 Ok: queued, 49 octets\r\n221 2.0.0 Bye\r\n"
    assert s.end is End.CLOSE
    assert s.receive(b"NOOP\r\n") == b""  # nothing is read after QUIT
    assert (counters.messages, counters.recipients, counters.via_bdat) == (1, 2, 0)


def test_an_empty_message_and_the_transaction_rules() -> None:
    s, counters = session(max_size=100)
    assert s.receive(b"DATA\r\n") == b"503 5.5.1 Send MAIL first\r\n"
    assert s.receive(b"RCPT TO:<b@example.org>\r\n") == b"503 5.5.1 Send MAIL first\r\n"
    assert s.receive(b"MAIL FROM:<a@example.org> SIZE=101\r\n") == (
        b"552 5.3.4 Message too big for this sink\r\n"
    )
    assert s.receive(b"MAIL FROM:<a@example.org> RET=FULL\r\n").startswith(b"555 5.5.4")
    assert s.receive(b"MAIL FROM:<>\r\nMAIL FROM:<>\r\nDATA\r\n") == (
        b"250 2.1.0 Ok\r\n503 5.5.1 A transaction is already open: RSET first\r\n"
        b"554 5.5.1 No valid recipients\r\n"
    )
    assert s.receive(b"RCPT TO:<b@example.org>\r\nDATA\r\n.\r\n").endswith(
        b"354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued, 0 octets\r\n"
    )
    assert s.receive(b"FROB\r\nVRFY x\r\nRSET\r\nNOOP\r\n") == (
        b"500 5.5.2 Command not recognized\r\n252 2.5.2 Cannot verify, but will accept\r\n"
        b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"
    )
    assert counters.messages == 1


def test_mail_before_ehlo_and_a_line_too_long() -> None:
    s = SinkSession(SinkSettings(), Counters())
    assert s.receive(b"MAIL FROM:<a@example.org>\r\n") == b"503 5.5.1 Send EHLO first\r\n"
    assert s.receive(b"X" * 5000) == b"421 4.7.0 Line too long: closing\r\n"
    assert s.end is End.CLOSE


def test_refused_recipients_are_spread_evenly() -> None:
    s, counters = session(refuse_rcpt=0.25)
    s.receive(b"MAIL FROM:<a@example.org>\r\n")
    replies = s.receive(b"".join(b"RCPT TO:<u%d@example.org>\r\n" % i for i in range(8)))
    codes = [line[:3] for line in replies.splitlines()]
    assert codes == [b"250", b"250", b"250", b"550"] * 2
    assert b"550 5.1.1 <u3@example.org> refused" in replies
    assert counters.refused == 2


def test_421_after_n_messages_on_a_connection() -> None:
    s, counters = session(close_after=1)
    message = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nHi\r\n.\r\n"
    assert s.receive(message).endswith(b"250 2.0.0 Ok: queued, 4 octets\r\n")
    assert s.receive(b"NOOP\r\n" + message) == (
        b"250 2.0.0 Ok\r\n421 4.7.0 Closing after 1 messages on this connection\r\n"
    )
    assert s.end is End.CLOSE
    assert (counters.messages, counters.closed_421) == (1, 1)


def test_bdat_reads_exactly_the_octets_it_announces() -> None:
    s, counters = session(chunking=True)
    # the chunk holds an end-of-data line and a command: octets, not lines
    chunk = b"Subject: x\r\n\r\n.\r\nQUIT\r\n"
    sent = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nBDAT %d\r\n" % len(chunk)
    assert s.receive(sent + chunk[:5]) == b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
    assert s.receive(chunk[5:] + b"BDAT 3 LAST\r\nend") == (
        b"250 2.0.0 23 octets received\r\n250 2.0.0 Ok: queued, 26 octets\r\n"
    )
    assert s.receive(b"BDAT 0 LAST\r\n") == b"503 5.5.1 Send MAIL first\r\n"
    assert s.end is None
    assert (counters.messages, counters.via_bdat, counters.octets) == (1, 1, 26)


def test_a_refused_bdat_still_skips_its_octets() -> None:
    s, counters = session(chunking=True, refuse_rcpt=1.0)
    replies = s.receive(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nBDAT 6 LAST\r\nNOOP\r\nNOOP\r\n"
    )
    assert replies.splitlines()[-2:] == [b"554 5.5.1 No valid recipients", b"250 2.0.0 Ok"]
    assert counters.messages == 0
    no_chunking, _ = session()
    assert no_chunking.receive(b"BDAT 4 LAST\r\n") == b"502 5.5.1 Not offered by this sink\r\n"


def test_settings_are_checked() -> None:
    for bad in ({"rtt": -1.0}, {"refuse_rcpt": 1.5}, {"close_after": 0}, {"hostname": "a b"}):
        with pytest.raises(ValueError):
            SinkSettings(**bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- asmtp and smtplib


async def test_asmtp_fan_out_is_counted() -> None:
    async with SinkServer() as sink:
        recipients = [f"user{i:02d}@example.org" for i in range(30)]
        report = await asmtp.send(
            MESSAGE, sender=SENDER, recipients=recipients, relay=relay(sink), concurrency=10
        )
        assert report.ok, report.failed()
        counters = sink.counters
        assert (counters.messages, counters.recipients, counters.connections) == (30, 30, 30)
        assert counters.peak_open <= 10
        assert counters.round_trips == 30 * 4  # greeting, EHLO, envelope, the dot and QUIT


async def test_asmtp_sees_the_refused_share() -> None:
    async with SinkServer(SinkSettings(refuse_rcpt=0.2)) as sink:
        recipients = [f"user{i:02d}@example.org" for i in range(20)]
        report = await asmtp.send(
            MESSAGE, sender=SENDER, recipients=recipients, relay=relay(sink), concurrency=5
        )
        refused = [r for r in report if r.status == "permanent"]
        assert len(refused) == 4 and all(r.code == 550 and r.stage == "rcpt" for r in refused)
        assert len([r for r in report if r.status == "delivered"]) == 16
        assert (sink.counters.refused, sink.counters.messages) == (4, 16)


async def test_asmtp_pool_reconnects_after_421() -> None:
    async with SinkServer(SinkSettings(close_after=3)) as sink:
        pool = asmtp.Pool(max_connections=1)
        async with asmtp.Mailer(relay(sink), pool=pool, retry=None, timeout=10) as mailer:
            for i in range(7):
                report = await mailer.send(MESSAGE, sender=SENDER, recipients=[f"u{i}@x.org"])
                assert report.ok, report.failed()
        # three messages a connection; each fourth MAIL got 421 and a fresh session
        assert (sink.counters.messages, sink.counters.connections) == (7, 3)
        assert sink.counters.closed_421 == 2


def _smtplib_421_after_two(port: int) -> int:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=10) as client:
        client.sendmail(SENDER, ["a@example.org"], MESSAGE)
        client.sendmail(SENDER, ["b@example.org"], MESSAGE)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(SENDER, ["c@example.org"], MESSAGE)
        return refused.value.smtp_code


async def test_smtplib_gets_421_after_two_messages() -> None:
    async with SinkServer(SinkSettings(close_after=2)) as sink:
        assert await asyncio.to_thread(_smtplib_421_after_two, sink.port) == 421
        assert (sink.counters.messages, sink.counters.closed_421) == (2, 1)


def _bdat_by_hand(port: int) -> list[tuple[int, bytes]]:
    """MAIL, RCPT and two BDAT chunks, the last pipelined after the first's octets."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=10) as client:
        client.ehlo()
        assert client.has_extn("chunking")
        replies = [client.docmd("MAIL", f"FROM:<{SENDER}>"), client.docmd("RCPT", "TO:<b@x.org>")]
        head, body = MESSAGE[:20], MESSAGE[20:]
        client.send(b"BDAT %d\r\n%sBDAT %d LAST\r\n%s" % (len(head), head, len(body), body))
        replies += [client.getreply(), client.getreply(), client.docmd("NOOP")]
        return replies


async def test_bdat_is_accepted_when_offered() -> None:
    async with SinkServer(SinkSettings(chunking=True)) as sink:
        replies = await asyncio.to_thread(_bdat_by_hand, sink.port)
        assert [code for code, _ in replies] == [250, 250, 250, 250, 250]
        assert replies[3][1] == b"2.0.0 Ok: queued, %d octets" % len(MESSAGE)
        assert (sink.counters.messages, sink.counters.via_bdat) == (1, 1)


def _smtplib_send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=10) as client:
        client.sendmail(SENDER, ["b@example.org"], MESSAGE)


async def test_each_wait_costs_one_emulated_round_trip() -> None:
    rtt = 0.02
    async with recording_sink(rtt=rtt) as (sink, batches):
        report = await asmtp.send(
            MESSAGE, sender=SENDER, recipients=["b@example.org"], relay=relay(sink)
        )
        assert report.ok, report.failed()
        await asyncio.to_thread(_smtplib_send, sink.port)
    asmtp_session, smtplib_session = by_connection(batches).values()
    # asmtp pipelines MAIL, RCPT and DATA (RFC 2920), and QUIT after the dot
    assert asmtp_session == [(220,), (250,), (250, 250, 354), (250, 221)]
    # smtplib waits for every reply
    assert smtplib_session == [(220,), (250,), (250,), (250,), (354,), (250,), (221,)]
    for batch in batches:
        assert batch.written - batch.received >= rtt - 0.001  # the sink's own timer
    for earlier, later in itertools.pairwise(batches):
        if earlier.connection == later.connection:
            assert later.received >= earlier.written  # the client waited for the replies


async def test_pipelined_commands_in_one_read_are_one_batch() -> None:
    settings = {"rtt": 0.01, "slow_greeting": 0.02, "handshake_rtt": True}
    async with recording_sink(**settings) as (sink, batches):
        reader, writer = await asyncio.open_connection("127.0.0.1", sink.port)
        assert (await reader.readline()).startswith(b"220 ")
        writer.write(b"EHLO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nRSET\r\n")
        writer.write_eof()  # nothing more to say: the replies still come, then the close
        rest = await reader.read()
        writer.close()
        await writer.wait_closed()
    assert rest.endswith(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok\r\n")
    greeting, answers = batches
    # the greeting: the handshake's round trip, its own, and the slow greeting
    assert greeting.written - greeting.received >= 0.01 + 0.01 + 0.02 - 0.001
    assert answers.codes == (250, 250, 250, 250)
    assert answers.written - answers.received >= 0.01 - 0.001
    assert sink.counters.round_trips == 2


def _starttls_send(port: int, context: ssl.SSLContext) -> bool:
    with smtplib.SMTP("127.0.0.1", port, local_hostname=HELO, timeout=10) as client:
        client.starttls(context=context)
        client.ehlo()
        offered_again = client.has_extn("starttls")
        client.sendmail(SENDER, ["b@example.org"], MESSAGE)
        return offered_again


@pytest.mark.parametrize("rtt", [0.0, 0.01])
async def test_starttls_when_asked(
    rtt: float, tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext
) -> None:
    sink = SinkServer(SinkSettings(rtt=rtt), ssl_context=tls_server_context)
    async with sink:
        offered_again = await asyncio.to_thread(_starttls_send, sink.port, tls_client_context)
        assert not offered_again
        assert sink.counters.messages == 1


async def test_max_messages_sets_done() -> None:
    async with SinkServer(max_messages=2) as sink:
        await asmtp.send(MESSAGE, sender=SENDER, recipients=["a@x.org"], relay=relay(sink))
        assert not sink.done.is_set()
        await asmtp.send(MESSAGE, sender=SENDER, recipients=["b@x.org"], relay=relay(sink))
        assert sink.done.is_set()


# ----------------------------------------------------------------------- the command


def sink_process(*args: str) -> subprocess.Popen[str]:
    """``asmtp sink ARGS`` on a free loopback port, bounded by --duration."""
    argv = [sys.executable, "-m", "asmtp", "sink", "--listen", "127.0.0.1:0", *args]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8"
    )


def test_the_command_stops_after_max_messages_and_prints_json() -> None:
    proc = sink_process("--json", "--max-messages", "3", "--rtt", "5", "--duration", "30")
    assert proc.stdout is not None
    listening = json.loads(proc.stdout.readline())
    assert listening["host"] == "127.0.0.1" and listening["settings"]["rtt_ms"] == 5
    with smtplib.SMTP("127.0.0.1", listening["port"], local_hostname=HELO, timeout=10) as c:
        c.sendmail(SENDER, ["a@example.org"], MESSAGE)
        proc.send_signal(signal.SIGUSR1)
        so_far = json.loads(proc.stdout.readline())
        c.sendmail(SENDER, ["b@example.org", "c@example.org"], MESSAGE)
        c.sendmail(SENDER, ["d@example.org"], MESSAGE)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert (so_far["final"], so_far["messages"]) == (False, 1)
    final = json.loads(out.splitlines()[-1])
    assert final["final"] and (final["messages"], final["recipients"]) == (3, 4)


def test_the_command_stops_after_its_duration() -> None:
    proc = sink_process("--duration", "0.3", "--refuse-rcpt", "10%", "--421-after", "5")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    first, last = out.splitlines()[0], out.splitlines()[-1]
    assert first.startswith("asmtp sink: listening on 127.0.0.1:")
    assert "10% of RCPTs refused, 421 after 5 messages" in first
    assert last.startswith("final: ") and "0 messages" in last


def test_sigterm_stops_the_command() -> None:
    proc = sink_process("--duration", "30", "--json")
    assert proc.stdout is not None
    json.loads(proc.stdout.readline())
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert json.loads(out.splitlines()[-1])["final"] is True


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--refuse-rcpt", "1.5"], "a share is from 0 to 1"),
        (["--starttls"], "--starttls needs --cert"),
        (["--rtt", "-1"], "must be 0 to 3600000 milliseconds"),
    ],
)
def test_bad_usage_is_refused(args: list[str], says: str) -> None:
    proc = sink_process(*args, "--duration", "5")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert says in err


def test_an_address_in_use_is_refused() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [sys.executable, "-m", "asmtp", "sink", "--listen", f"127.0.0.1:{port}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr


@pytest.mark.parametrize(
    ("addresses", "loopback"),
    [
        (["127.0.0.1"], True),
        (["127.0.0.2", "::1"], True),
        (["0.0.0.0"], False),
        (["::"], False),
        (["192.0.2.1"], False),
        (["localhost"], False),  # a name is not an address: warned about
    ],
)
def test_the_loopback_check(addresses: list[str], loopback: bool) -> None:
    assert is_loopback(addresses) is loopback


async def test_asmtp_send_uses_bdat_where_offered_unless_told_not_to() -> None:
    async with SinkServer(SinkSettings(chunking=True)) as sink:
        for flags in ([], ["--no-chunking"]):
            command = ["send", "--relay", f"127.0.0.1:{sink.port}", "--tls", "none"]
            command += ["--from", SENDER, "--to", "ann@example.org", "--subject", "s"]
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "asmtp", *command, "--body", "b", *flags,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            _, err = await process.communicate()
            assert process.returncode == 0, err
        assert (sink.counters.messages, sink.counters.via_bdat) == (2, 1)
