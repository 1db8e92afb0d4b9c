"""The ``asmtp`` command under abuse, against real servers on loopback: counts rather
than a row per recipient, server text that tries to repaint the terminal, a log file
that cannot be opened, Ctrl-C in a plain send, bad ``mx`` and ``demo`` arguments,
messages that name the flags, the open-file limit, and ``{placeholders}`` in an HTML
body. Ctrl-C and the open-file limit run ``python -m asmtp`` in a subprocess; the rest
call :func:`asmtp.cli.main` as the command does, with its output captured."""

from __future__ import annotations

import argparse
import contextlib
import email
import email.policy
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from asmtp.cli.main import build_parser, main
from dnsserver import DNSServer
from servers import FaultServer, Received, SMTPTestServer, wait_until

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]
MakeDNS = Callable[..., DNSServer]

TIMEOUT = 60


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    env.update(extra or {})
    return env


def asmtp(*args: str, **options: Any) -> subprocess.CompletedProcess[str]:
    """Run ``python -m asmtp ARGS`` and return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "asmtp", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=environment(),
        timeout=TIMEOUT,
        check=False,
        **options,
    )


class Ran:
    """What a command did: its exit status and output."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    """``asmtp ARGS`` in this process (the command's own code path, without the
    interpreter's start-up in a subprocess for every case)."""
    capsys.readouterr()
    try:
        returncode = main(list(args))
    except SystemExit as exc:  # argparse's usage errors
        returncode = int(exc.code or 0)
    out, err = capsys.readouterr()
    return Ran(returncode, out, err)


Capture = pytest.CaptureFixture[str]


def relay(server: SMTPTestServer | FaultServer) -> list[str]:
    return ["--relay", f"{server.host}:{server.port}", "--tls", "none", "--helo", "cli.test"]


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def summary_count(stderr: str, label: str) -> int:
    """The count that ends the summary row starting with ``label`` (0 when absent)."""
    found = re.search(rf"^\W*{re.escape(label)}\b[^\n]*?(\d+)\s*\S?\s*$", stderr, re.MULTILINE)
    return int(found.group(1)) if found else 0


def parse(received: Received) -> EmailMessage:
    msg = email.message_from_bytes(received.content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


# ----------------------------------------------------------------------- counts, not results

MANY = 2000


def test_many_refused_recipients_get_a_bounded_summary(
    fault_server: MakeFault, tmp_path: Path, capsys: Capture
) -> None:
    server = fault_server(rcpt="reply:550 5.1.1 no such user")
    everyone = [f"user{i:04d}@example.test" for i in range(MANY)]
    log = tmp_path / "send.log"
    done = run(
        capsys,
        "send", "--from", "s@example.test", "--to", ",".join(everyone), "--body", "b",
        *relay(server), "--json", "--log-file", str(log),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    # every recipient's detail: a JSON line and a log line each
    results = json_lines(done.stdout)
    assert sorted(r["recipient"] for r in results) == everyone
    assert {(r["status"], r["code"], r["enhanced_status"]) for r in results} == {
        ("permanent", 550, "5.1.1")
    }
    assert not {"key", "line", "attempts"} & results[0].keys()  # a plain send's fields
    assert len(log.read_text(encoding="utf-8").splitlines()) == MANY
    # the summary: one row for the one reply, a few sample recipients, the counts
    lines = done.stderr.splitlines()
    assert len(lines) <= 20, done.stderr
    assert summary_count(done.stderr, "permanent") == MANY
    assert f"and {MANY - 3} more" in done.stderr
    assert sum(address in done.stderr for address in everyone) == 3
    assert f"{MANY} recipients: {MANY} permanent" in done.stderr


def test_many_refused_rows_of_a_file_print_no_table_on_stdout(
    fault_server: MakeFault, tmp_path: Path, capsys: Capture
) -> None:
    server = fault_server(rcpt="reply:550 5.1.1 no such user")
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"user{i:03d}@example.test\n" for i in range(300)), "utf-8")
    done = run(
        capsys,
        "send", "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--retries", "0",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stdout == ""  # no row per failure: the detail is for --json/--log-file
    assert len(done.stderr.splitlines()) <= 20, done.stderr
    assert summary_count(done.stderr, "permanent") == 300


def test_a_plain_send_keeps_its_batches_per_domain(
    smtp_server: MakeServer, dns_server: MakeDNS, capsys: Capture
) -> None:
    """A plain send goes through the same output path; --batch-per-domain still lets a
    domain's recipients share one session, as asmtp.send does."""
    dns = dns_server({"example.test": "@ MX 10 mx1\nmx1 A 127.0.0.2"})
    mx1 = smtp_server(host="127.0.0.2")
    rcpts = "a@example.test,b@example.test,c@example.test"
    done = run(
        capsys, "send", "--from", "s@origin.test", "--to", rcpts, "--body", "b",
        "--dns-server", dns.spec, "--mx-port", str(mx1.port), "--tls", "none",
        "--helo", "cli.test", "--batch-per-domain", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(r["recipient"] for r in json_lines(done.stdout)) == rcpts.split(",")
    assert mx1.wait_idle()
    assert [sorted(m.rcpt_tos) for m in mx1.messages] == [rcpts.split(",")]
    assert mx1.sessions_opened == 1


# ----------------------------------------------------------------------- terminal safety

HOSTILE = "550 5.1.1 no\x1b[2J such\x07 user\x1b]0;owned\x07"


def test_server_text_cannot_repaint_the_terminal(fault_server: MakeFault, capsys: Capture) -> None:
    server = fault_server(rcpt=f"reply:{HOSTILE}")
    done = run(
        capsys,
        "send", "--from", "s@example.test", "--to", "a@example.test", "--body", "b",
        *relay(server), "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    # the summary shows the reply, its control characters escaped
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
    for shown in ("no\\x1b[2J", "such\\x07", "\\x1b]0;owned\\x07"):
        assert shown in done.stderr
    # JSON keeps the text as received (json escapes it)
    [result] = json_lines(done.stdout)
    assert "no\x1b[2J such\x07 user" in result["message"]
    assert "\x1b" not in done.stdout

    # with a progress bar (rich draws it with its own escape sequences)
    shown = run(
        capsys,
        "send", "--from", "s@example.test", "--to", "a@example.test", "--body", "b",
        *relay(server), "--progress",
    )  # fmt: skip
    assert shown.returncode == 1, shown.stderr
    assert "\x1b[2J" not in shown.stderr and "\x07" not in shown.stderr
    assert "\\x1b[2J" in shown.stderr


# ----------------------------------------------------------------------- --log-file


@pytest.mark.parametrize("bulk", [False, True], ids=["plain", "bulk"])
@pytest.mark.parametrize("where", ["no-folder", "a-folder"])
def test_log_file_that_cannot_be_opened_sends_nothing(
    smtp_server: MakeServer, tmp_path: Path, bulk: bool, where: str, capsys: Capture
) -> None:
    server = smtp_server()
    log = tmp_path / "missing" / "send.log" if where == "no-folder" else tmp_path
    extra = ["--retries", "1"] if bulk else []
    done = run(
        capsys,
        "send", "--from", "s@example.test", "--to", "a@example.test", "--body", "b",
        *relay(server), "--log-file", str(log), *extra,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("asmtp: error: --log-file: cannot open")
    assert "Traceback" not in done.stderr
    assert server.sessions_opened == 0
    assert server.messages == []


# ----------------------------------------------------------------------- Ctrl-C, plain send


def test_ctrl_c_in_a_plain_send_reports_what_finished(fault_server: MakeFault) -> None:
    # the server never answers the dot of two recipients; the others go through
    stalled = ["stall1@example.test", "stall2@example.test"]
    server = fault_server(message="silence", only_recipients=stalled)
    others = [f"user{i:02d}@example.test" for i in range(40)]
    everyone = stalled + others
    argv = [
        sys.executable, "-m", "asmtp", "send", "--from", "s@example.test",
        "--to", ",".join(everyone), "--body", "b", *relay(server),
        "--concurrency", "3", "--timeout", "60", "--json",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment()
    )
    assert proc.stdout is not None
    # the JSON Lines as they stream (each is flushed as its result comes)
    streamed: list[str] = []
    reader = threading.Thread(target=lambda: streamed.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        assert wait_until(
            lambda: set(stalled) <= set(server.recipients) and len(server.messages) >= 5,
            timeout=30.0,
        )
        # the first Ctrl-C: no new session; the one not stalled finishes and is told
        proc.send_signal(signal.SIGINT)
        assert wait_until(
            lambda: server.active <= 2 and len(streamed) == len(server.messages), timeout=30.0
        )
        # the second: the stalled ones are cut off (signals may merge: send until it ends)
        for _ in range(20):
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
            if proc.returncode is not None:
                break
        proc.wait(timeout=TIMEOUT)
        reader.join(timeout=TIMEOUT)  # stdout is the reader's alone
        assert proc.stderr is not None
        stderr = proc.stderr.read()  # a summary: well within a pipe's buffer
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()  # closes the pipes
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "stopped at once" in stderr
    results = json_lines("".join(streamed))
    # every recipient whose session finished is reported, exactly those the server took
    assert all(r["status"] == "delivered" for r in results)
    assert sorted(r["recipient"] for r in results) == sorted(m.rcpt_tos[0] for m in server.messages)
    assert summary_count(stderr, "delivered") == len(results)
    # the stalled two at least (and a job taken as the first Ctrl-C came); the rest
    unfinished = summary_count(stderr, "unfinished")
    not_attempted = summary_count(stderr, "not attempted")
    assert unfinished >= 2
    assert not_attempted > 0
    assert len(results) + unfinished + not_attempted == len(everyone)


# ----------------------------------------------------------------------- asmtp mx


BAD_DOMAINS = [
    "",
    "example.test\r\nMX x",
    "a@b@example.test",
    "bad..example.test",
    "exa mple.test",
    "x" * 64 + ".example.test",
]


def test_mx_refuses_bad_arguments_without_asking_dns(dns_server: MakeDNS, capsys: Capture) -> None:
    dns = dns_server({"example.test": "@ MX 10 mx1\nmx1 A 127.0.0.2"})
    for domain in BAD_DOMAINS:
        done = run(capsys, "mx", "example.test", domain, "--dns-server", dns.spec)
        assert done.returncode == 2, (domain, done.stdout, done.stderr)
        assert "not a mail domain" in done.stderr
        assert repr(domain) in done.stderr
        assert done.stdout == ""
    assert dns.count() == 0
    # the same arguments as send takes them: a domain, a trailing dot, an address
    done = run(capsys, "mx", "example.test.", "ann@example.test", "--dns-server", dns.spec)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("mx1.example.test") == 2


# ----------------------------------------------------------------------- asmtp demo --dir


def test_demo_dir_that_is_a_file(tmp_path: Path, capsys: Capture) -> None:
    afile = tmp_path / "a-file"
    afile.write_text("not a folder", encoding="utf-8")
    for where in (afile, afile / "under"):
        done = run(capsys, "demo", "--recipients", "2", "--dir", str(where))
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("asmtp: error: --dir: ")
        assert str(where) in done.stderr
        assert "Traceback" not in done.stderr
    assert afile.read_text(encoding="utf-8") == "not a folder"


def test_demo_dir_that_cannot_be_written(tmp_path: Path, capsys: Capture) -> None:
    if os.geteuid() == 0:
        # root writes anywhere a mode allows; /proc takes no files of ours
        where = Path("/proc")
    else:
        where = tmp_path / "read-only"
        where.mkdir()
        where.chmod(0o500)
    done = run(capsys, "demo", "--recipients", "2", "--dir", str(where))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"asmtp: error: --dir: cannot keep messages in '{where}'")
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------------- flags in messages


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        pytest.param("--from", "bad", "--from", id="from"),
        pytest.param("--from", "a@b@example.test", "--from", id="from-two-ats"),
        pytest.param("--attach", "/nonexistent/asmtp-file", "--attach", id="attach"),
        pytest.param("--helo", "two words", "--helo", id="helo"),
    ],
)
def test_errors_name_the_flags(
    smtp_server: MakeServer, flag: str, value: str, named: str, capsys: Capture
) -> None:
    server = smtp_server()
    given = {"--from": "s@example.test", "--to": "a@example.test", "--body": "b"}
    given[flag] = value
    argv = [item for pair in given.items() for item in pair]
    if flag != "--helo":
        argv += ["--helo", "cli.test"]
    done = run(capsys, "send", *argv, "--relay", f"{server.host}:{server.port}", "--tls", "none")
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"asmtp: error: {named}"), done.stderr
    # never the API's parameter names
    assert not re.search(r"\b(from_|attachments|helo)\b(?!\.)", done.stderr.replace(named, ""))
    assert server.sessions_opened == 0


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub.choices[name] for name in ("send", "mx", "demo")}


@pytest.mark.parametrize("command", ["send", "mx", "demo"])
def test_every_option_has_help_and_repeatable_ones_say_so(command: str) -> None:
    parser = _subcommands()[command]
    checked = 0
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"asmtp {command} {name} has no help"
        if isinstance(action, argparse._AppendAction):
            assert "may repeat" in action.help, f"asmtp {command} {name}: say it may repeat"
        checked += 1
    assert checked >= (30 if command == "send" else 3)


# ----------------------------------------------------------------------- open files


def _nofile(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_NOFILE is a POSIX limit")
@pytest.mark.parametrize("raisable", [False, True], ids=["capped", "raised"])
def test_concurrency_beyond_the_open_file_limit(smtp_server: MakeServer, raisable: bool) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raisable and hard != resource.RLIM_INFINITY and hard < 1024:
        pytest.skip("the hard open-file limit is too low to raise the soft one")
    server = smtp_server()
    everyone = [f"user{i:03d}@example.test" for i in range(200)]
    done = asmtp(
        "send", "--from", "s@example.test", "--to", ",".join(everyone), "--body", "b",
        *relay(server), "--concurrency", "500", "--json",
        preexec_fn=_nofile(64, hard if raisable else 64),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json_lines(done.stdout)
    assert sorted(r["recipient"] for r in results) == everyone
    assert all(r["status"] == "delivered" for r in results)
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    if raisable:
        assert warnings == []  # the soft limit was raised
    else:
        [warning] = warnings
        assert "--concurrency 500" in warning and "open files" in warning
    assert "Too many open files" not in done.stderr


# ----------------------------------------------------------------------- {placeholders}

PEOPLE = (
    "email,first\n"
    'ann@example.test,"<script>alert(1)</script>"\n'
    'bee@example.test,"Bee & <b>Co</b>"\n'
    "cee@example.test,Cee\n"
)


def _send_csv(
    capsys: Capture, server: SMTPTestServer, tmp_path: Path, body: str, *extra: str
) -> tuple[Ran, dict[str, EmailMessage]]:
    listing = tmp_path / "people.csv"
    listing.write_text(PEOPLE, encoding="utf-8")
    body_file = tmp_path / "body.html"
    body_file.write_text(body, encoding="utf-8")
    alt = tmp_path / "alt.txt"
    alt.write_text("Hi {first}", encoding="utf-8")
    done = run(
        capsys, "send", "--from", "s@example.test", "--recipients", str(listing),
        "--subject", "For {first}", "--body-file", str(body_file), "--html",
        "--alt-text-file", str(alt), *relay(server), *extra,
    )  # fmt: skip
    assert server.wait_idle()
    return done, {m.rcpt_tos[0]: parse(m) for m in server.messages}


def _parts(msg: EmailMessage) -> tuple[str, str]:
    html_part, text_part = msg.get_body(("html",)), msg.get_body(("plain",))
    assert html_part is not None and text_part is not None
    return html_part.get_content().strip(), text_part.get_content().strip()


def test_placeholders_in_an_html_body_are_escaped(
    smtp_server: MakeServer, tmp_path: Path, capsys: Capture
) -> None:
    server = smtp_server()
    done, msgs = _send_csv(capsys, server, tmp_path, "<p>Hi {first}</p>")
    assert done.returncode == 0, done.stderr
    html_body, text = _parts(msgs["ann@example.test"])
    assert html_body == "<p>Hi &lt;script&gt;alert(1)&lt;/script&gt;</p>"
    assert text == "Hi <script>alert(1)</script>"  # plain text: as it is
    assert msgs["ann@example.test"]["Subject"] == "For <script>alert(1)</script>"
    html_body, text = _parts(msgs["bee@example.test"])
    assert html_body == "<p>Hi Bee &amp; &lt;b&gt;Co&lt;/b&gt;</p>"
    assert text == "Hi Bee & <b>Co</b>"
    assert _parts(msgs["cee@example.test"]) == ("<p>Hi Cee</p>", "Hi Cee")
    assert "warning" not in done.stderr


def test_no_html_escape_inserts_values_as_they_are(
    smtp_server: MakeServer, tmp_path: Path, capsys: Capture
) -> None:
    server = smtp_server()
    done, msgs = _send_csv(capsys, server, tmp_path, "<p>Hi {first}</p>", "--no-html-escape")
    assert done.returncode == 0, done.stderr
    assert _parts(msgs["bee@example.test"])[0] == "<p>Hi Bee & <b>Co</b></p>"


def test_no_html_escape_goes_with_html(smtp_server: MakeServer, capsys: Capture) -> None:
    server = smtp_server()
    done = run(
        capsys,
        "send", "--from", "s@example.test", "--to", "a@example.test", "--body", "b",
        *relay(server), "--no-html-escape",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--no-html-escape goes with --html" in done.stderr
    assert server.sessions_opened == 0


def test_an_unknown_placeholder_gets_one_warning(
    smtp_server: MakeServer, tmp_path: Path, capsys: Capture
) -> None:
    server = smtp_server()
    body = (
        "<style>p { color: red } a {color:blue}</style>"
        "<p>Hi {first}, {frist} and {frist} again, {{first}}</p>"
    )
    done, msgs = _send_csv(capsys, server, tmp_path, body)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, done.stderr
    [warning] = warnings
    assert "{frist}" in warning and "people.csv" in warning
    assert "color" not in warning and "{first}" not in warning
    html_body, _ = _parts(msgs["cee@example.test"])
    assert html_body == (
        "<style>p { color: red } a {color:blue}</style>"
        "<p>Hi Cee, {frist} and {frist} again, {first}</p>"
    )


# ----------------------------------------------------------------------- the README's sample

README = Path(__file__).resolve().parent.parent / "README.md"
# what differs from run to run: the timing, the port, the folder
VARYING = [
    (re.compile(r"\(\d+\.\d\d s, \d+\.\d/s\)"), "(T)"),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:PORT"),
    (re.compile(r"/tmp/asmtp-demo-\w+"), "DIR"),
    # the samples are the first recipients to finish, in whatever order they do
    (re.compile(r"user\d{3}@demo\.example"), "userNNN@demo.example"),
]


def test_the_readme_shows_what_asmtp_demo_prints(
    tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    [sample] = re.findall(r"```\n\$ asmtp demo\n(.*?)```", README.read_text("utf-8"), re.S)
    monkeypatch.setenv("COLUMNS", "100")  # the sample's terminal
    done = run(capsys, "demo", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr

    def normal(text: str) -> list[str]:
        for pattern, fixed in VARYING:
            text = pattern.sub(fixed, text)
        return [line.rstrip() for line in text.strip().splitlines()]

    shown = (done.stderr + done.stdout).replace(str(tmp_path), "DIR")
    assert normal(shown) == normal(sample)
