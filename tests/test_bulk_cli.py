"""``asmtp send --recipients FILE`` and the other bulk options, run as people run them
(``python -m asmtp`` in a subprocess) against real servers on loopback: per-recipient
messages with placeholders, bad rows, killing a run and resuming it from its journal,
Ctrl-C, retries and rates."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from servers import FaultServer, Received, SMTPTestServer, wait_until

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]

SUBPROCESS_TIMEOUT = 60


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "asmtp", "send", *args]


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    return env


def asmtp_send(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(*args),
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=environment(),
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        env=environment(),
    )


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def relay(server: SMTPTestServer | FaultServer) -> list[str]:
    return ["--relay", f"{server.host}:{server.port}", "--tls", "none", "--helo", "bulk.test"]


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def parse(received: Received) -> EmailMessage:
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def summary_count(stderr: str, label: str) -> int:
    """The count in the summary table's row starting with ``label`` (0 when absent)."""
    found = re.search(rf"{re.escape(label)}\b[^\n]*?(\d+)\s*\S?\s*$", stderr, re.MULTILINE)
    return int(found.group(1)) if found else 0


def journal_events(path: Path) -> list[dict[str, Any]]:
    """The journal's dot and result records (not its header)."""
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):  # a line torn by SIGKILL
            event = json.loads(line)
            if event.get("event") in ("dot", "result"):
                events.append(event)
    return events


def last_events(path: Path) -> dict[str, dict[str, Any]]:
    return {str(e["key"]): e for e in journal_events(path)}


def slow(seconds: float) -> Callable[[Received], None]:
    """A data_reply that holds each message a little (in the server's thread)."""

    def reply(message: Received) -> None:
        time.sleep(seconds)

    return reply


# ----------------------------------------------------------------------- recipients files


def test_plain_list_one_message_per_recipient(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    listing = tmp_path / "list.txt"
    listing.write_text(
        "# the list\nann@example.test\n\nBee Doe <bee@example.test>\n"
        "cee@example.test\nann@EXAMPLE.test\n",
        encoding="utf-8",
    )
    done = asmtp_send(
        "--from",
        "News <news@example.test>",
        "--recipients",
        str(listing),
        "--subject",
        "Monthly {news}",
        "--body",
        "Hello {first}",
        *relay(server),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    results = json_lines(done.stdout)
    assert {(r["recipient"], r["key"], r["line"], r["status"]) for r in results} == {
        ("ann@example.test", "ann@example.test", 2, "delivered"),
        ("bee@example.test", "bee@example.test", 4, "delivered"),
        ("cee@example.test", "cee@example.test", 5, "delivered"),
    }
    assert summary_count(done.stderr, "duplicates") == 1

    assert server.wait_idle()
    by_rcpt = {m.rcpt_tos[0]: m for m in server.messages}
    assert sorted(by_rcpt) == ["ann@example.test", "bee@example.test", "cee@example.test"]
    assert all(len(m.rcpt_tos) == 1 for m in server.messages)
    bee = parse(by_rcpt["bee@example.test"])
    assert bee["To"] == "Bee Doe <bee@example.test>"
    for rcpt, received in by_rcpt.items():
        msg = parse(received)
        assert msg["To"].addresses[0].addr_spec == rcpt  # addressed to them alone
        assert len(msg["To"].addresses) == 1
        assert msg["From"] == "News <news@example.test>"
        # a plain list has no columns: braces stay as written
        assert msg["Subject"] == "Monthly {news}"
        assert msg.get_content().strip() == "Hello {first}"
        assert received.mail_from == "news@example.test"


def test_csv_placeholders_render_per_recipient(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    listing = tmp_path / "customers.csv"
    listing.write_text(
        "\ufeffEmail,first,plan\n"
        "ann@example.test,Ann,gold\n"
        '"Bee <bee@example.test>",Bee,"silver, yearly"\n'
        "cee@example.test,{plan},x\n",
        encoding="utf-8",
    )
    body = tmp_path / "body.html"
    body.write_text(
        "<style>a {color: red}</style><p>Dear {first}, your {plan} plan {{ {unknown} {{first}}</p>",
        encoding="utf-8",
    )
    done = asmtp_send(
        "--from",
        "shop@example.test",
        "--recipients",
        str(listing),
        "--subject",
        "{first}: your {plan} plan",
        "--body-file",
        str(body),
        "--html",
        *relay(server),
        "--concurrency",
        "2",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    results = json_lines(done.stdout)
    assert sorted((r["key"], r["line"]) for r in results) == [
        ("ann@example.test", 2),
        ("bee@example.test", 3),
        ("cee@example.test", 4),
    ]
    assert server.wait_idle()
    msgs = {m.rcpt_tos[0]: parse(m) for m in server.messages}
    expected = {
        "ann@example.test": ("Ann", "gold"),
        "bee@example.test": ("Bee", "silver, yearly"),
        "cee@example.test": ("{plan}", "x"),  # a value is inserted as is, not re-filled
    }
    for rcpt, (first, plan) in expected.items():
        msg = msgs[rcpt]
        assert msg["Subject"] == f"{first}: your {plan} plan"
        html = msg.get_body(("html",))
        assert html is not None
        assert html.get_content().strip() == (
            f"<style>a {{color: red}}</style><p>Dear {first}, your {plan} plan "
            "{{ {unknown} {first}</p>"
        )
        assert msg["To"].addresses[0].addr_spec == rcpt
    assert msgs["bee@example.test"]["To"] == "Bee <bee@example.test>"
    assert len({m["Message-ID"] for m in msgs.values()}) == 3  # one message each


BAD_CSV = (
    "email,first\n"
    "ann@example.test,Ann\n"  # 2
    "not an address,Bob\n"  # 3
    "bee@example.test,Bee\n"  # 4
    ",Nobody\n"  # 5
    "cee@example.test,Cee,extra\n"  # 6
    "dee@example.test,Dee\n"  # 7
)


def test_bad_rows_exit_2_and_send_nothing(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    listing = tmp_path / "bad.csv"
    listing.write_text(BAD_CSV, encoding="utf-8")
    done = asmtp_send(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "Hi {first}",
        *relay(server), "--json",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("asmtp: error: ")
    assert "3 bad rows" in done.stderr
    listed = re.findall(r"^\s+line (\d+): (.*)$", done.stderr, re.MULTILINE)
    assert [(int(n), why) for n, why in listed] == [
        (3, "'not an address' is not an address"),
        (5, "empty email"),
        (6, "3 fields, the header has 2"),
    ]
    assert "--skip-invalid" in done.stderr
    assert server.sessions_opened == 0


def test_skip_invalid_reports_bad_rows_as_input_failures(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server()
    listing = tmp_path / "bad.csv"
    listing.write_text(BAD_CSV, encoding="utf-8")
    journal = tmp_path / "run.jsonl"
    done = asmtp_send(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "Hi {first}",
        *relay(server), "--skip-invalid", "--journal", str(journal), "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # not everyone was delivered
    results = {r["line"]: r for r in json_lines(done.stdout)}
    assert sorted(results) == [2, 3, 4, 5, 6, 7]
    for line in (3, 5, 6):
        r = results[line]
        assert (r["status"], r["stage"], r["key"]) == ("permanent", "input", line)
        assert r["message"].startswith(f"line {line}: ")
    assert results[6]["recipient"] == "cee@example.test"  # its address was fine, its row not
    for line in (2, 4, 7):
        assert results[line]["status"] == "delivered"
    assert summary_count(done.stderr, "permanent") == 3
    assert summary_count(done.stderr, "delivered") == 3

    assert server.wait_idle()
    assert sorted(m.rcpt_tos[0] for m in server.messages) == [
        "ann@example.test",
        "bee@example.test",
        "dee@example.test",
    ]
    recorded = last_events(journal)
    assert {k: e["status"] for k, e in recorded.items() if e["event"] == "result"} == {
        "3": "permanent",
        "5": "permanent",
        "6": "permanent",
        "ann@example.test": "delivered",
        "bee@example.test": "delivered",
        "dee@example.test": "delivered",
    }


# ----------------------------------------------------------------------- kill and resume


def test_killed_run_resumes_without_losing_or_repeating(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server(data_reply=slow(0.015))
    everyone = [f"user{i:03d}@example.test" for i in range(300)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(everyone) + "\n", encoding="utf-8")
    journal = tmp_path / "run.jsonl"
    argv = [
        "--from", "s@example.test", "--recipients", str(listing), "--subject", "s",
        "--body", "b", *relay(server), "--concurrency", "10", "--journal", str(journal),
        "--json",
    ]  # fmt: skip

    proc = start(*argv)
    try:
        assert wait_until(lambda: len(server.messages) >= 100, timeout=30.0)
        proc.send_signal(signal.SIGKILL)
    finally:
        finish(proc)
    assert server.wait_idle(10.0)
    first_run = Counter(m.rcpt_tos[0] for m in server.messages)
    assert 100 <= sum(first_run.values()) < 300  # killed part way

    before = last_events(journal)
    unknown = {k for k, e in before.items() if e["event"] == "dot"}
    done_before = {k for k, e in before.items() if e.get("status") == "delivered"}
    assert len(unknown) <= 10  # at most one per session in flight
    assert all(first_run[k] == 1 for k in done_before)

    resumed = asmtp_send(*argv, "--resume")
    assert resumed.returncode == (1 if unknown else 0), resumed.stderr
    results = {r["key"]: r for r in json_lines(resumed.stdout)}
    # done in the first run: skipped, no result; the rest: exactly one result each
    assert set(results) == set(everyone) - done_before
    assert summary_count(resumed.stderr, "skipped") == len(done_before)
    for key, r in results.items():
        assert r["status"] == ("unknown" if key in unknown else "delivered"), r

    assert server.wait_idle()
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    for rcpt in everyone:
        if rcpt in unknown:
            # the dot went out before the kill: it may have arrived, and is not resent
            assert received[rcpt] in (0, 1)
            assert received[rcpt] == first_run[rcpt]
        else:
            assert received[rcpt] == 1, rcpt
    after = last_events(journal)
    assert all(e["event"] == "result" for e in after.values())
    assert set(after) == set(everyone)


def test_killed_while_the_server_holds_the_dot(fault_server: MakeFault, tmp_path: Path) -> None:
    # the first three sessions never get an answer to their dot; later ones do
    server = fault_server(message="silence", fail_first=3)
    everyone = [f"r{i}@example.test" for i in range(6)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(everyone) + "\n", encoding="utf-8")
    journal = tmp_path / "run.jsonl"
    argv = [
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--concurrency", "3", "--timeout", "30", "--journal", str(journal),
        "--json",
    ]  # fmt: skip

    def dots() -> set[str]:
        if not journal.exists():
            return set()
        return {e["key"] for e in journal_events(journal) if e["event"] == "dot"}

    proc = start(*argv)
    try:
        assert wait_until(lambda: len(dots()) == 3, timeout=30.0)
        proc.send_signal(signal.SIGKILL)
    finally:
        finish(proc)
    held = dots()
    assert len(held) == 3
    assert server.messages == []  # no dot was answered

    resumed = asmtp_send(*argv, "--resume")
    assert resumed.returncode == 1, resumed.stderr
    results = {r["key"]: r for r in json_lines(resumed.stdout)}
    assert set(results) == set(everyone)
    for key, r in results.items():
        if key in held:
            assert r["status"] == "unknown"
            assert "may have been delivered" in r["message"]
        else:
            assert r["status"] == "delivered", r
    assert summary_count(resumed.stderr, "unknown") == 3
    assert server.wait_idle()
    # not sent again: each held recipient was named to the server once, in the first run
    named = Counter(server.recipients)
    assert all(named[k] == 1 for k in held)
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(set(everyone) - held)


# ----------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_finishes_sessions_in_flight_and_exits_130(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server(data_reply=slow(0.03))
    everyone = [f"user{i:03d}@example.test" for i in range(200)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(everyone) + "\n", encoding="utf-8")
    journal = tmp_path / "run.jsonl"
    proc = start(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--concurrency", "4", "--journal", str(journal), "--json",
    )  # fmt: skip
    try:
        assert wait_until(lambda: len(server.messages) >= 10, timeout=30.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = finish(proc)
    finally:
        finish(proc)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    results = json_lines(stdout)
    not_attempted = summary_count(stderr, "not attempted")
    assert not_attempted > 0
    assert len(results) + not_attempted == len(everyone)
    assert all(r["status"] == "delivered" for r in results)  # the ones in flight finished

    # the journal is complete: every dot has its result after it
    events = journal_events(journal)
    for n, event in enumerate(events):
        if event["event"] == "dot":
            assert any(
                e["event"] == "result" and e["key"] == event["key"] for e in events[n + 1 :]
            ), event
    assert server.wait_idle()
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(r["key"] for r in results)


def test_second_ctrl_c_stops_at_once(fault_server: MakeFault, tmp_path: Path) -> None:
    # no dot is ever answered: only a second Ctrl-C ends the sessions in flight
    server = fault_server(message="silence")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"r{i}@example.test\n" for i in range(5)), encoding="utf-8")
    journal = tmp_path / "run.jsonl"
    proc = start(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--concurrency", "2", "--timeout", "60", "--journal", str(journal),
        "--json",
    )  # fmt: skip
    try:
        assert wait_until(
            lambda: journal.exists() and len(journal_events(journal)) == 2, timeout=30.0
        )
        for _ in range(20):  # one Ctrl-C after another until it ends (signals may merge)
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
            if proc.returncode is not None:
                break
        stdout, stderr = finish(proc)
    finally:
        finish(proc)
    assert proc.returncode == 130, stderr
    assert "stopped at once" in stderr
    assert stdout == ""  # no result came
    # the two sessions in flight, and any job a worker had taken while waiting its turn
    cut_off = summary_count(stderr, "unfinished")
    assert cut_off >= 2
    assert cut_off + summary_count(stderr, "not attempted") == 5
    # the two dots stay without a result: a resumed run reports them as unknown
    assert [e["event"] for e in journal_events(journal)] == ["dot", "dot"]


# ----------------------------------------------------------------------- retries, rates, options


def test_retries_and_rate(fault_server: MakeFault) -> None:
    flaky = fault_server(rcpt="reply:451 4.3.0 try again later", fail_first=1)
    done = asmtp_send(
        "--from", "s@example.test", "--to", "a@example.test", "--body", "b", *relay(flaky),
        "--retries", "2", "--rate", "50/s", "--rate-per-domain", "10/s", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [r] = json_lines(done.stdout)
    assert (r["status"], r["attempts"], r["key"]) == ("delivered", 2, "a@example.test")
    assert flaky.connections == 2

    no_retry = fault_server(rcpt="reply:451 4.3.0 try again later", fail_first=1)
    done = asmtp_send(
        "--from", "s@example.test", "--to", "a@example.test", "--body", "b",
        *relay(no_retry), "--retries", "0", "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    [r] = json_lines(done.stdout)
    assert (r["status"], r["code"], r.get("attempts", 1)) == ("transient", 451, 1)
    assert summary_count(done.stderr, "transient") == 1
    assert no_retry.connections == 1


def test_unsubscribe_verp_and_dsn(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    listing = tmp_path / "list.txt"
    listing.write_text("ann@example.test\nbee@example.test\n", encoding="utf-8")
    done = asmtp_send(
        "--from", "news@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--unsubscribe-url", "https://u.example.test/?r={recipient}",
        "--verp", "bounces+{token}@example.test", "--dsn",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""  # no failures to list; the summary is on stderr
    assert summary_count(done.stderr, "delivered") == 2
    assert server.wait_idle()
    for m in server.messages:
        [rcpt] = m.rcpt_tos
        local, domain = rcpt.split("@")
        assert m.mail_from == f"bounces+{local}={domain}@example.test"
        msg = parse(m)
        assert msg["List-Unsubscribe"] == f"<https://u.example.test/?r={rcpt}>"
        assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert msg["To"] == rcpt


def test_progress_bar_when_forced(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    listing = tmp_path / "list.txt"
    listing.write_text("a@example.test\nb@example.test\nc@example.test\n", encoding="utf-8")
    done = asmtp_send(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--progress",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "3/3" in done.stderr and "3 delivered" in done.stderr
    quiet = asmtp_send(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--no-progress",
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    assert "3/3" not in quiet.stderr


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        pytest.param(["--resume"], "--resume needs --journal", id="resume-without-journal"),
        pytest.param(["--rate", "fast"], "50/s", id="bad-rate"),
        pytest.param(["--retries", "-1"], "--retries", id="negative-retries"),
        pytest.param(["--cc", "c@example.test"], "--cc", id="cc-with-recipients"),
        pytest.param(["--unsubscribe-url", "http://u.test/{recipient}"], "https", id="http"),
        pytest.param(["--unsubscribe-url", "https://u.test/{who}"], "{recipient}", id="field"),
        pytest.param(["--verp", "bounces@example.test"], "{token}", id="verp-token"),
        pytest.param(["--journal", "USED"], "--resume", id="journal-in-use"),
        pytest.param(["--subject", "Hi {first}"], "line break", id="subject-line-break"),
    ],
)
def test_bad_bulk_options_exit_2(
    smtp_server: MakeServer, tmp_path: Path, extra: list[str], why: str
) -> None:
    server = smtp_server()
    listing = tmp_path / "list.csv"
    listing.write_text('email,first\na@example.test,"A\nB"\n', encoding="utf-8")
    used = tmp_path / "used.jsonl"
    used.write_text('{"event": "dot", "key": "x@example.test"}\n', encoding="utf-8")
    extra = [str(used) if item == "USED" else item for item in extra]
    done = asmtp_send(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), *extra,
    )  # fmt: skip
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert why in done.stderr
    assert done.stdout == ""
    assert server.sessions_opened == 0


def test_skip_invalid_needs_a_recipients_file(smtp_server: MakeServer) -> None:
    server = smtp_server()
    done = asmtp_send(
        "--from", "s@example.test", "--to", "a@example.test", "--body", "b", *relay(server),
        "--skip-invalid",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--skip-invalid goes with --recipients" in done.stderr
    assert server.sessions_opened == 0


def test_recipients_from_standard_input(smtp_server: MakeServer) -> None:
    server = smtp_server()
    done = subprocess.run(
        command("--from", "s@example.test", "--recipients", "-", "--body", "b", *relay(server),
                "--json"),
        input="a@example.test\nb@example.test\n",
        capture_output=True,
        text=True,
        env=environment(),
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(r["recipient"] for r in json_lines(done.stdout)) == [
        "a@example.test",
        "b@example.test",
    ]
