"""``asmtp bench`` as people run it, in a subprocess against real servers on loopback
(aiosmtpd and the fault server); its statistics and option parsing in process."""

from __future__ import annotations

import email
import json
import math
import os
import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from asmtp.cli.bench.config import build_bench_message, numbered
from asmtp.cli.bench.stats import PERCENTILES, LatencyRecorder
from asmtp.cli.options import rate, rate_per_second, size
from servers import FaultServer, SMTPTestServer, free_port, wait_until

MakeServer = Callable[..., SMTPTestServer]
MakeFaultServer = Callable[..., FaultServer]

# Until ``bench`` is wired into the asmtp command: the same options, on their own.
_ENTRY = (
    "import sys; from asmtp.cli.bench.main import standalone_main;"
    " sys.exit(standalone_main(sys.argv[1:]))"
)
_ORDER = ("min", *(f"p{p:g}" for p in PERCENTILES), "max")


def bench_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "asmtp", "bench", *args]


def bench(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``asmtp bench ARGS`` and return what it did."""
    full_env = dict(os.environ)
    full_env.pop("COLUMNS", None)
    full_env.update(env or {})
    return subprocess.run(
        bench_argv(*args),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=full_env,
        timeout=60,
        check=False,
    )


def bench_json(*args: str, env: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    done = bench(*args, "--json", env=env)
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


def target(server: SMTPTestServer | FaultServer) -> str:
    return f"{server.host}:{server.port}"


def number_of(address: str) -> int:
    m = re.fullmatch(r"rcpt-(\d+)@example\.test", address)
    assert m is not None, address
    return int(m.group(1))


def refuse_every(n: int) -> Callable[[str], str | None]:
    def reply(address: str) -> str | None:
        return "550 5.1.1 no" if number_of(address) % n == 0 else None

    return reply


def check_consistent(summary: dict[str, Any], messages: int | None = None) -> None:
    """The counts add up and every stage's percentiles are in order."""
    counts = summary["messages"]
    assert counts["sent"] == counts["ok"] + counts["failed"]
    if messages is not None:
        assert counts["sent"] == messages
    errors = summary["errors"]
    assert counts["failed"] == sum(e["count"] for s in errors.values() for e in s.values())
    timeline = summary["timeline"]
    assert sum(s["ok"] for s in timeline) == counts["ok"]
    assert sum(s["failed"] for s in timeline) == counts["failed"]
    assert summary["latency_ms"]["session"]["count"] == counts["ok"]
    for stage, stats in summary["latency_ms"].items():
        if stats["count"]:
            values = [stats[k] for k in _ORDER]
            assert values == sorted(values), (stage, stats)
            assert stats["min"] <= stats["mean"] <= stats["max"], (stage, stats)
            assert stats["exact"] is True
        else:
            assert all(stats[k] is None for k in _ORDER), (stage, stats)


# ----------------------------------------------------------------------- against a server


def test_counts_add_up_and_percentiles_are_ordered(smtp_server: MakeServer) -> None:
    server = smtp_server()
    code, summary = bench_json(target(server), "--messages", "60", "--concurrency", "8")
    assert code == 0
    check_consistent(summary, messages=60)
    assert summary["messages"]["ok"] == 60
    assert len(server.messages) == 60
    assert server.sessions_opened == 60  # a session per message without --reuse
    received = sorted(number_of(r) for m in server.messages for r in m.rcpt_tos)
    assert received == list(range(1, 61))
    assert all(
        len(m.content) + 3 == len(build_bench_message(2048, "a@b.c", "d.e").data)
        for m in server.messages[:1]
    )
    # Each message its own Message-ID (a server dropping duplicates sees 60 messages).
    ids = {email.message_from_bytes(m.content)["Message-ID"] for m in server.messages}
    assert len(ids) == 60
    latency = summary["latency_ms"]
    assert list(latency) == [
        "connect",
        "greeting",
        "ehlo",
        "envelope",
        "message",
        "session",
        "quit",
    ]
    for stage in ("connect", "greeting", "ehlo", "envelope", "message", "session", "quit"):
        assert latency[stage]["count"] == 60, stage
    # a whole session takes at least as long as its slowest part
    assert latency["session"]["max"] >= latency["message"]["min"]
    assert summary["sessions"] == {"attempted": 60, "ready": 60, "quit_errors": {}}
    assert summary["settings"]["size"] == 2048
    assert summary["throughput"]["messages_per_s"] > 0


def test_refused_recipients_show_under_their_code(smtp_server: MakeServer) -> None:
    server = smtp_server(rcpt_reply=refuse_every(4))
    code, summary = bench_json(target(server), "--messages", "20", "--concurrency", "3")
    assert code == 1  # some messages failed
    check_consistent(summary, messages=20)
    assert summary["messages"] == {"sent": 20, "ok": 15, "failed": 5}
    assert list(summary["errors"]) == ["rcpt"]
    assert summary["errors"]["rcpt"]["550"]["count"] == 5
    assert "550" in summary["errors"]["rcpt"]["550"]["example"]
    assert summary["recipients"] == {"sent": 20, "accepted": 15, "refused": {"550": 5}}
    assert len(server.messages) == 15


def test_reuse_uses_fewer_sessions_and_survives_refusals(smtp_server: MakeServer) -> None:
    server = smtp_server(rcpt_reply=refuse_every(5))
    code, summary = bench_json(target(server), "--messages", "40", "--concurrency", "4", "--reuse")
    assert code == 1
    check_consistent(summary, messages=40)
    assert summary["messages"]["ok"] == 32
    assert summary["errors"]["rcpt"]["550"]["count"] == 8
    # a refused transaction is reset (RSET), not a reason to reconnect
    assert server.sessions_opened <= 4 < 40
    assert summary["sessions"]["attempted"] == server.sessions_opened
    assert summary["latency_ms"]["quit"]["count"] == server.sessions_opened
    assert len(server.messages) == 32
    assert ("RSET", "") in server.commands


def test_several_recipients_per_message(smtp_server: MakeServer) -> None:
    server = smtp_server(rcpt_reply=refuse_every(3))
    code, summary = bench_json(
        target(server), "--messages", "10", "--recipients-per-message", "3", "--size", "1k"
    )
    assert code == 0  # each message keeps two of its three recipients
    check_consistent(summary, messages=10)
    assert summary["recipients"] == {"sent": 30, "accepted": 20, "refused": {"550": 10}}
    assert sorted(len(m.rcpt_tos) for m in server.messages) == [2] * 10
    assert summary["settings"]["size"] == 1024


def test_refuses_to_run_unbounded(smtp_server: MakeServer) -> None:
    server = smtp_server()
    done = bench(target(server))
    assert done.returncode == 2
    assert "--messages" in done.stderr and "--duration" in done.stderr
    assert server.sessions_opened == 0
    for bad in (["--messages", "0"], ["--messages", "3", "--rate", "fast"]):
        done = bench(target(server), *bad)
        assert done.returncode == 2, bad
    assert server.sessions_opened == 0


def test_duration_stops_by_itself(smtp_server: MakeServer) -> None:
    server = smtp_server()
    code, summary = bench_json(target(server), "--duration", "1", "--concurrency", "4")
    assert code == 0
    check_consistent(summary)
    assert summary["messages"]["sent"] > 0
    assert summary["settings"]["duration_s"] == 1.0
    assert len(server.messages) == summary["messages"]["ok"]


def test_duration_gives_up_on_a_silent_server(fault_server: MakeFaultServer) -> None:
    """No reply after the dot: the run still ends (timeout, then the grace after the
    deadline), each message counted as failed at the message stage."""
    server = fault_server(message="silence")
    code, summary = bench_json(
        target(server), "--duration", "1", "--concurrency", "2", "--timeout", "1"
    )
    assert code == 1
    check_consistent(summary)
    assert summary["messages"]["ok"] == 0
    assert summary["messages"]["failed"] >= 2
    assert list(summary["errors"]) == ["message"]
    assert set(summary["errors"]["message"]) <= {"SMTPTimeoutError", "Unfinished"}


def test_rate_sends_on_schedule(smtp_server: MakeServer) -> None:
    server = smtp_server()
    code, summary = bench_json(
        target(server), "--rate", "50/s", "--messages", "20", "--concurrency", "5"
    )
    assert code == 0
    check_consistent(summary, messages=20)
    assert summary["settings"]["rate_per_s"] == 50.0
    assert summary["latency_ms"]["queue"]["count"] == 20  # every start measured vs schedule
    assert len(server.messages) == 20
    assert rate_per_second("3000/m") == 50.0


def test_connect_errors_by_class() -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    code, summary = bench_json(f"127.0.0.1:{port}", "--messages", "3", "--concurrency", "2")
    assert code == 1
    check_consistent(summary, messages=3)
    assert summary["errors"] == {
        "connect": {
            "ConnectError": {
                "count": 3,
                "example": summary["errors"]["connect"]["ConnectError"]["example"],
            }
        }
    }
    assert summary["latency_ms"]["connect"]["count"] == 0


def test_reply_errors_at_each_stage(fault_server: MakeFaultServer) -> None:
    server = fault_server(mail="reply:451 4.3.0 try later")
    code, summary = bench_json(target(server), "--messages", "4", "--concurrency", "2")
    assert code == 1
    check_consistent(summary, messages=4)
    assert summary["errors"] == {
        "mail": {"451": {"count": 4, "example": "MAIL FROM refused: 451 4.3.0 try later"}}
    }
    assert summary["recipients"]["refused"] == {}  # RCPT replies after a refused MAIL


def test_report_has_its_charts(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server(rcpt_reply=refuse_every(10))
    out = tmp_path / "out.html"
    code, summary = bench_json(
        target(server), "--messages", "30", "--concurrency", "4", "--report", str(out)
    )
    assert code == 1
    page = out.read_text("utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") >= 3
    assert 'class="chart histogram"' in page
    assert 'class="chart timeseries throughput"' in page
    assert "<rect" in page  # bars were drawn
    # self-contained: nothing to fetch, no script
    assert "<script" not in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?https?:""", page)
    assert "550" in page and f"{summary['messages']['ok']:,}" in page


def test_human_table(smtp_server: MakeServer) -> None:
    server = smtp_server()
    done = bench(target(server), "--messages", "5", "--reuse")
    assert done.returncode == 0, done.stderr
    assert "5 sent: 5 ok, 0 failed" in done.stdout
    assert "messages/s" in done.stdout
    for stage in ("connect", "greeting", "ehlo", "envelope", "message", "session", "quit"):
        assert re.search(rf"\b{stage}\b", done.stdout), stage
    assert "p99.9" in done.stdout


def test_starttls_and_auth(smtp_server: MakeServer, tls_server_context: ssl.SSLContext) -> None:
    server = smtp_server(starttls_context=tls_server_context, auth={"bench": "s3cret"})
    code, summary = bench_json(
        target(server),
        "--messages",
        "4",
        "--concurrency",
        "2",
        "--tls",
        "starttls",
        "--no-verify",
        "--user",
        "bench",
        "--password-env",
        "BENCH_PW",
        env={"BENCH_PW": "s3cret"},
    )
    assert code == 0, summary["errors"]
    check_consistent(summary, messages=4)
    assert summary["latency_ms"]["starttls"]["count"] == 4
    assert summary["latency_ms"]["auth"]["count"] == 4
    assert len(server.messages) == 4
    # a wrong password fails every message at AUTH, under the server's code; a session
    # that failed to set up is not used for the next message, even with --reuse
    server.clear()
    code, summary = bench_json(
        target(server),
        "--reuse",
        "--concurrency",
        "1",
        "--messages",
        "2",
        "--tls",
        "starttls",
        "--no-verify",
        "--user",
        "bench",
        "--password-env",
        "BENCH_PW",
        env={"BENCH_PW": "wrong"},
    )
    assert code == 1
    assert list(summary["errors"]) == ["auth"]
    assert summary["errors"]["auth"]["535"]["count"] == 2
    assert server.sessions_opened == 2
    assert server.messages == []


def test_implicit_tls(smtp_server: MakeServer, tls_server_context: ssl.SSLContext) -> None:
    server = smtp_server(implicit_tls_context=tls_server_context)
    code, summary = bench_json(
        target(server), "--messages", "3", "--tls", "implicit", "--no-verify"
    )
    assert code == 0, summary["errors"]
    check_consistent(summary, messages=3)
    assert summary["target"]["tls"] == "implicit"
    assert len(server.messages) == 3


def test_interrupt_prints_what_was_done(fault_server: MakeFaultServer) -> None:
    server = fault_server(message="silence")
    proc = subprocess.Popen(
        bench_argv(target(server), "--messages", "3", "--concurrency", "3", "--json"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # all three sent DATA: each is now in the data or the message stage
        assert wait_until(lambda: sum(c.startswith("DATA") for c in server.commands) >= 3, 20)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout)
    assert summary["interrupted"] is True
    check_consistent(summary, messages=3)
    errors = summary["errors"]
    assert set(errors) <= {"data", "message"}
    assert sum(e["Unfinished"]["count"] for e in errors.values()) == 3


# ----------------------------------------------------------------------- in process


def test_recorder_exact_and_histogram_agree() -> None:
    exact, bounded = LatencyRecorder(), LatencyRecorder(exact_limit=100)
    values = [(i * 7919 % 10007 + 1) * 1e-5 for i in range(5000)]  # 10 µs .. 100 ms, shuffled
    for v in values:
        exact.add(v)
        bounded.add(v)
    assert exact.exact and not bounded.exact
    assert (bounded.count, bounded.min, bounded.max) == (exact.count, exact.min, exact.max)
    assert bounded.mean == pytest.approx(exact.mean, rel=1e-9)
    ordered = sorted(values)
    for p in (*PERCENTILES, 100.0):
        want = ordered[math.ceil(p / 100 * len(values)) - 1]  # nearest rank
        assert exact.percentile(p) == pytest.approx(want, rel=1e-12)
        assert bounded.percentile(p) == pytest.approx(exact.percentile(p), rel=0.0101)
    for recorder in (exact, bounded):
        summary = recorder.summary()
        values_ms = [summary[k] for k in _ORDER]
        assert values_ms == sorted(values_ms)
        assert summary["count"] == 5000
    assert sum(n for _, _, n in bounded.bins()) == 5000
    assert LatencyRecorder().summary()["p50"] is None


def test_message_size_is_exact() -> None:
    for octets in (400, 401, 479, 480, 2048, 100_000):
        prepared = build_bench_message(octets, "bench@example.test", "example.test")
        assert prepared.size == octets
        assert prepared.data.endswith(b"\r\n.\r\n")
        assert max(len(line) for line in prepared.data.split(b"\r\n")) <= 998


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("50", 50.0), ("50/s", 50.0), ("120/m", 2.0), ("36/h", 0.01), (".5", 0.5), ("5.", 5.0)],
)
def test_rates_are_one_grammar_for_send_and_bench(text: str, per_second: float) -> None:
    assert rate_per_second(text) == pytest.approx(per_second)
    if "/" in text:
        assert rate(text).per_second == pytest.approx(per_second)


def test_sizes() -> None:
    assert size("2048") == 2048
    assert size("4k") == 4096
    assert size("2M") == 2 * 1024 * 1024


def test_the_module_examples_hold() -> None:
    import doctest

    import asmtp.cli.bench.config
    import asmtp.cli.bench.stats
    import asmtp.cli.options

    for module in (asmtp.cli.bench.config, asmtp.cli.bench.stats, asmtp.cli.options):
        result = doctest.testmod(module)
        assert result.attempted >= 2 and result.failed == 0


def test_server_text_in_the_error_table_is_shown_as_text(fault_server: MakeFaultServer) -> None:
    # A reply carrying an escape sequence, a bell and rich markup: escaped and literal,
    # never interpreted by the terminal or by the table renderer.
    server = fault_server(mail="reply:451 4.3.0 \x1b[2J[/]later\x07")
    done = bench(target(server), "--messages", "2", "--concurrency", "1")
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "\\x1b[2J[/]later\\x07" in done.stdout


def test_credentials_never_go_in_plaintext_when_starttls_is_not_offered(
    smtp_server: MakeServer,
) -> None:
    # --tls opportunistic on a server without STARTTLS carries on in plaintext; the
    # session then refuses to send the password there, as every send does (bench's
    # old copy of the exchange sent AUTH in the clear).
    server = smtp_server(auth={"bench": "s3cret"}, auth_require_tls=False)
    code, summary = bench_json(
        target(server),
        "--messages",
        "2",
        "--concurrency",
        "1",
        "--tls",
        "opportunistic",
        "--user",
        "bench",
        "--password-env",
        "BENCH_PW",
        env={"BENCH_PW": "s3cret"},
    )
    assert code == 1
    check_consistent(summary, messages=2)
    assert list(summary["errors"]) == ["auth"]
    assert summary["errors"]["auth"]["AuthUnavailableError"]["count"] == 2
    assert "AUTH" not in [verb for verb, _ in server.commands]
    assert server.messages == []


def test_each_message_numbered_without_copying_the_message() -> None:
    number = numbered(build_bench_message(100_000, "bench@example.test", "example.test"))
    first, second = number(1), number(2)
    assert first.size == second.size == 100_000
    assert b".000000000001@" in first.data and b".000000000002@" in second.data
    # the headers before the number and the rest are the same bytes, shared
    assert first.parts[0] is second.parts[0] and first.parts[2] is second.parts[2]
    assert [len(p) for p in first.parts][1] == 12


def test_a_failed_stage_adds_no_latency_sample(fault_server: MakeFaultServer) -> None:
    # Every MAIL refused on a kept session: the envelope never succeeded, so it has
    # no latency, however the session goes on (RSET, the next MAIL, QUIT).
    server = fault_server(mail="reply:451 4.3.0 try later")
    code, summary = bench_json(target(server), "--messages", "3", "--concurrency", "1", "--reuse")
    assert code == 1
    check_consistent(summary, messages=3)
    assert summary["errors"]["mail"]["451"]["count"] == 3
    latency = summary["latency_ms"]
    assert latency["envelope"]["count"] == latency["message"]["count"] == 0
    assert latency["ehlo"]["count"] == latency["quit"]["count"] == 1
