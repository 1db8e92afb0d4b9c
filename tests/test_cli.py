"""The ``asmtp`` command as people run it: ``python -m asmtp`` in a subprocess, against
real servers on loopback (aiosmtpd, the fault server, the test DNS server)."""

from __future__ import annotations

import base64
import contextlib
import email
import email.policy
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

import asmtp
from dnsserver import DNSServer
from servers import FaultServer, SMTPTestServer, wait_until

MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]

RESULT_FIELDS = {
    "recipient",
    "status",
    "code",
    "enhanced_status",
    "message",
    "stage",
    "host",
    "tls",
    "elapsed",
}

ZONES = {
    "example.test": """
        @    MX 10 mx1
        @    MX 20 mx2
        mx1  A 127.0.0.2
        mx2  A 127.0.0.3
    """,
    "null.test": "@ MX 0 .",
}


def asmtp_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m asmtp ARGS`` and return what it did."""
    full_env = dict(os.environ)
    full_env.pop("COLUMNS", None)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "asmtp", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=full_env,
        timeout=60,
        check=False,
    )


def relay_args(server: SMTPTestServer) -> list[str]:
    return ["--relay", f"{server.host}:{server.port}", "--tls", "none", "--helo", "cli.test"]


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def parse(content: bytes) -> EmailMessage:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


# ----------------------------------------------------------------------- send via a relay


def test_send_json_one_line_per_recipient(smtp_server: MakeServer) -> None:
    server = smtp_server()
    done = asmtp_cli(
        "send",
        "--from",
        "Sender <sender@example.test>",
        "--to",
        "a@example.test, Bee <b@example.test>",
        "--to",
        "c@example.test",
        "--cc",
        "d@example.test",
        "--bcc",
        "hidden@example.test",
        "--subject",
        "Hello there",
        "--body",
        "Hi all",
        *relay_args(server),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    results = json_lines(done.stdout)
    # one line each, streamed as results come (completion order)
    assert sorted(r["recipient"] for r in results) == [
        "a@example.test",
        "b@example.test",
        "c@example.test",
        "d@example.test",
        "hidden@example.test",
    ]
    for r in results:
        assert r.keys() >= RESULT_FIELDS
        assert r["status"] == "delivered"
        assert r["code"] == 250
        assert r["tls"] == "none"

    assert server.wait_idle()
    messages = server.messages
    assert sorted(rcpt for m in messages for rcpt in m.rcpt_tos) == sorted(
        r["recipient"] for r in results
    )
    for m in messages:
        assert m.mail_from == "sender@example.test"
        msg = parse(m.content)
        assert msg["Subject"] == "Hello there"
        assert msg["From"] == "Sender <sender@example.test>"
        assert msg["To"] == "a@example.test, Bee <b@example.test>, c@example.test"
        assert msg["Cc"] == "d@example.test"
        assert msg["Bcc"] is None
        assert b"hidden@example.test" not in m.content
        assert msg.get_content().strip() == "Hi all"


def test_send_html_with_attachment_and_table(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    (tmp_path / "body.html").write_text("<p>Hello <b>you</b></p>", encoding="utf-8")
    (tmp_path / "alt.txt").write_text("Hello you", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("attached notes", encoding="utf-8")
    done = asmtp_cli(
        "send",
        "--from",
        "sender@example.test",
        "--to",
        "a@example.test,b@example.test",
        "--subject",
        "Table",
        "--body-file",
        str(tmp_path / "body.html"),
        "--html",
        "--alt-text-file",
        str(tmp_path / "alt.txt"),
        "--attach",
        str(tmp_path / "notes.txt"),
        *relay_args(server),
    )
    assert done.returncode == 0, done.stderr
    # the summary (stderr) names sample recipients; stdout is for --json alone
    assert "a@example.test" in done.stderr and "b@example.test" in done.stderr
    assert "2 recipients: 2 delivered" in done.stderr
    assert done.stdout == ""
    assert server.wait_idle()
    assert len(server.messages) == 2
    msg = parse(server.messages[0].content)
    html = msg.get_body(("html",))
    text = msg.get_body(("plain",))
    assert html is not None and "<b>you</b>" in html.get_content()
    assert text is not None and text.get_content().strip() == "Hello you"
    [attachment] = list(msg.iter_attachments())
    assert attachment.get_filename() == "notes.txt"
    assert attachment.get_content() == "attached notes"


def test_refused_recipient_exits_1(smtp_server: MakeServer) -> None:
    server = smtp_server(
        rcpt_reply=lambda a: "550 5.1.1 no such user" if a.startswith("x") else None
    )
    done = asmtp_cli(
        "send",
        "--from",
        "sender@example.test",
        "--to",
        "ok@example.test,x@example.test",
        "--subject",
        "s",
        "--body",
        "b",
        *relay_args(server),
        "--json",
    )
    assert done.returncode == 1, done.stderr
    by_rcpt = {r["recipient"]: r for r in json_lines(done.stdout)}
    assert by_rcpt["ok@example.test"]["status"] == "delivered"
    refused = by_rcpt["x@example.test"]
    assert refused["status"] == "permanent"
    assert refused["code"] == 550
    assert refused["enhanced_status"] == "5.1.1"
    assert refused["stage"] == "rcpt"
    assert server.wait_idle()
    assert [m.rcpt_tos for m in server.messages] == [["ok@example.test"]]


def test_narrow_table_stays_within_the_width(smtp_server: MakeServer) -> None:
    server = smtp_server(
        rcpt_reply=lambda a: "550 5.1.1 mailbox unavailable" if a.startswith("x") else None
    )
    done = asmtp_cli(
        "send",
        "--from",
        "sender@example.test",
        "--to",
        "ok@example.test,x-a-rather-long-local-part@example.test",
        "--body",
        "b",
        *relay_args(server),
        env={"COLUMNS": "40"},
    )
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert max(len(line) for line in lines) <= 40, done.stderr
    words = " ".join(done.stderr.split())  # rich wraps long lines at spaces
    # the refusal is still told, below the table
    assert "550 5.1.1: x-a-rather-long-local-part@example.test: " in words
    assert "mailbox unavailable" in words
    assert "2 recipients: 1 delivered, 1 permanent" in words


def test_auth_over_starttls_never_shows_the_password(
    smtp_server: MakeServer, tls_server_context: Any, ca_pem_file: Path
) -> None:
    password = "pw-Zq8v-never-printed"
    server = smtp_server(starttls_context=tls_server_context, auth={"alice": password})
    done = asmtp_cli(
        "send",
        "--from",
        "alice@example.test",
        "--to",
        "bob@example.test",
        "--subject",
        "secret",
        "--body",
        "b",
        "--relay",
        f"localhost:{server.port}",
        "--tls",
        "starttls",
        "--user",
        "alice",
        "--password-env",
        "ASMTP_TEST_PASSWORD",
        "--debug",
        "--json",
        env={"SSL_CERT_FILE": str(ca_pem_file), "ASMTP_TEST_PASSWORD": password},
    )
    assert done.returncode == 0, done.stderr
    [result] = json_lines(done.stdout)
    assert result["status"] == "delivered"
    assert result["tls"] == "verified"
    assert "AUTH" in done.stderr  # --debug did show the transcript
    output = done.stdout + done.stderr
    plain = base64.b64encode(f"\0alice\0{password}".encode()).decode()
    login = base64.b64encode(password.encode()).decode()
    for secret in (password, plain, login):
        assert secret not in output
    assert server.wait_idle()
    [message] = server.messages
    assert message.tls and message.auth_user == "alice"


# ----------------------------------------------------------------------- bad input

BAD_INPUT = [
    pytest.param(["--subject", "a\r\nb"], "--subject", id="subject-crlf"),
    pytest.param(["--to", "not an address@@"], "not a valid address", id="unparsable-to"),
    pytest.param(["--from", "a@b.test, c@d.test"], "exactly one address", id="two-senders"),
    pytest.param(["--user", "alice"], "--password-env", id="user-without-password-env"),
    pytest.param(
        ["--user", "alice", "--password-env", "ASMTP_TEST_UNSET_VARIABLE"],
        "ASMTP_TEST_UNSET_VARIABLE",
        id="password-env-unset",
    ),
    pytest.param(["--header", "X-Note: a\nb"], "X-Note", id="header-newline"),
    pytest.param(["--attach", "/nonexistent/asmtp-cli-file"], "cannot read", id="missing-attach"),
    pytest.param(["--dns-server", "10.0.0.1"], "--dns-server", id="dns-server-with-relay"),
]


@pytest.mark.parametrize(("extra", "why"), BAD_INPUT)
def test_bad_input_exits_2_without_connecting(
    smtp_server: MakeServer, extra: list[str], why: str
) -> None:
    server = smtp_server()
    base = {"--from": "sender@example.test", "--to": "a@example.test", "--body": "b"}
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        base[flag] = value  # a bad value replaces the good one
    argv = [item for pair in base.items() for item in pair]
    done = asmtp_cli("send", *argv, *relay_args(server))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.startswith("asmtp: error: ")
    assert why in done.stderr
    assert done.stdout == ""
    assert server.sessions_opened == 0


def test_missing_body_file_exits_2(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    missing = tmp_path / "no-such-body.txt"
    done = asmtp_cli(
        "send",
        "--from",
        "s@example.test",
        "--to",
        "a@example.test",
        "--body-file",
        str(missing),
        *relay_args(server),
    )
    assert done.returncode == 2
    assert "asmtp: error: --body-file" in done.stderr and str(missing) in done.stderr
    assert server.sessions_opened == 0


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        pytest.param(["--tls", "implicit"], "implicit", id="implicit-tls"),
        pytest.param(["--user", "u", "--password-env", "HOME"], "--user", id="user"),
        pytest.param(["--dns-server", "not-an-ip"], "not-an-ip", id="bad-dns-server"),
    ],
)
def test_bad_direct_options_exit_2(dns_server: MakeDNS, extra: list[str], why: str) -> None:
    dns = dns_server(ZONES)
    done = asmtp_cli(
        "send",
        "--from",
        "s@example.test",
        "--to",
        "a@example.test",
        "--body",
        "b",
        "--dns-server",
        dns.spec,
        *extra,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("asmtp: error: ") and why in done.stderr
    assert dns.count() == 0


def test_usage_error_exits_2() -> None:
    done = asmtp_cli("send", "--to", "a@example.test", "--body", "b")  # no --from
    assert done.returncode == 2
    assert "--from" in done.stderr


# ----------------------------------------------------------------------- direct delivery


def test_direct_delivery_to_mx_hosts(smtp_server: MakeServer, dns_server: MakeDNS) -> None:
    dns = dns_server(ZONES)
    mx1 = smtp_server(host="127.0.0.2")
    done = asmtp_cli(
        "send",
        "--from",
        "sender@origin.test",
        "--to",
        "a@example.test,b@example.test",
        "--subject",
        "direct",
        "--body",
        "b",
        "--dns-server",
        dns.spec,
        "--mx-port",
        str(mx1.port),
        "--tls",
        "none",
        "--helo",
        "cli.test",
        "--timeout",
        "10",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    results = json_lines(done.stdout)
    assert [r["recipient"] for r in results] == ["a@example.test", "b@example.test"]
    for r in results:
        assert r["status"] == "delivered"
        assert r["host"] == "mx1.example.test"
        assert r["tried"] == [
            {
                "host": "mx1.example.test",
                "address": "127.0.0.2",
                "stage": "message",
                "code": 250,
                "message": r["message"],
            }
        ]
    assert mx1.wait_idle()
    assert sorted(rcpt for m in mx1.messages for rcpt in m.rcpt_tos) == [
        "a@example.test",
        "b@example.test",
    ]
    assert dns.count("example.test.", "MX") == 1  # one resolver, one MX query


def test_direct_delivery_null_mx_is_permanent(smtp_server: MakeServer, dns_server: MakeDNS) -> None:
    dns = dns_server(ZONES)
    mx1 = smtp_server(host="127.0.0.2")
    done = asmtp_cli(
        "send",
        "--from",
        "sender@origin.test",
        "--to",
        "a@example.test,nobody@null.test",
        "--body",
        "b",
        "--dns-server",
        dns.spec,
        "--mx-port",
        str(mx1.port),
        "--tls",
        "none",
        "--batch-per-domain",
        "--per-domain",
        "2",
        "--dns-timeout",
        "5",
        "--json",
    )
    assert done.returncode == 1, done.stderr
    by_rcpt = {r["recipient"]: r for r in json_lines(done.stdout)}
    assert by_rcpt["a@example.test"]["status"] == "delivered"
    null = by_rcpt["nobody@null.test"]
    assert (null["status"], null["stage"], null["enhanced_status"]) == (
        "permanent",
        "dns",
        "5.1.10",
    )
    assert "tried" not in null


# ----------------------------------------------------------------------- asmtp mx


def test_mx_human(dns_server: MakeDNS) -> None:
    dns = dns_server(ZONES)
    ok = asmtp_cli("mx", "example.test", "--dns-server", dns.spec)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.index("mx1.example.test") < ok.stdout.index("mx2.example.test")
    assert "127.0.0.2" in ok.stdout and "127.0.0.3" in ok.stdout

    null = asmtp_cli("mx", "null.test", "--dns-server", dns.spec)
    assert null.returncode == 1
    assert "null.test: accepts no mail" in null.stdout

    nx = asmtp_cli("mx", "nowhere.example.test", "--dns-server", dns.spec)
    assert nx.returncode == 1
    assert "no such domain" in nx.stdout


def test_mx_json(dns_server: MakeDNS) -> None:
    dns = dns_server(ZONES)
    done = asmtp_cli(
        "mx",
        "example.test",
        "null.test",
        "nowhere.example.test",
        "someone@example.test",
        "--dns-server",
        dns.spec,
        "--dns-timeout",
        "5",
        "--json",
    )
    assert done.returncode == 1, done.stderr
    ok, null, nx, again = json_lines(done.stdout)
    # each resolved domain's TLS policy (no _mta-sts record here: opportunistic)
    assert [h["policy"] for h in ok.pop("tls_policy")["hosts"]] == ["opportunistic"] * 2
    again.pop("tls_policy")
    assert ok == {
        "domain": "example.test",
        "status": "ok",
        "hosts": [
            {"host": "mx1.example.test", "preference": 10, "addresses": ["127.0.0.2"]},
            {"host": "mx2.example.test", "preference": 20, "addresses": ["127.0.0.3"]},
        ],
        "site": "mx1.example.test,mx2.example.test",
    }
    assert again == ok  # an address is taken for its domain
    assert (null["domain"], null["status"], null["hosts"]) == ("null.test", "null_mx", [])
    assert "null MX" in null["message"]
    assert (nx["status"], nx["hosts"]) == ("nxdomain", [])
    assert "NXDOMAIN" in nx["message"]
    # one resolver for every domain: the second ask of example.test came from its cache
    assert dns.count("example.test.", "MX") == 1


def test_mx_all_ok_exits_0_and_bad_server_exits_2(dns_server: MakeDNS) -> None:
    dns = dns_server(ZONES)
    done = asmtp_cli("mx", "example.test", "--dns-server", dns.spec, "--json")
    assert done.returncode == 0
    assert [line["status"] for line in json_lines(done.stdout)] == ["ok"]
    bad = asmtp_cli("mx", "example.test", "--dns-server", "nowhere:53")
    assert bad.returncode == 2
    assert bad.stderr.startswith("asmtp: error: ")


# ----------------------------------------------------------------------- demo, version, ^C


def test_demo(tmp_path: Path) -> None:
    where = tmp_path / "received"
    done = asmtp_cli("demo", "--recipients", "5", "--dir", str(where))
    assert done.returncode == 0, done.stderr
    assert "5 recipients: 5 delivered" in done.stderr  # the summary
    assert str(where) in done.stdout
    assert len(list(where.glob("*.eml"))) == 5


def test_closed_stdout_keeps_the_exit_status(tmp_path: Path) -> None:
    """``asmtp ... | head``: a reader that went away is not a failed delivery."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "asmtp", "demo", "--recipients", "3", "--dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # long before the table is written: imports alone take longer
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Broken pipe" not in stderr
    assert len(list(tmp_path.glob("*.eml"))) == 3


def test_version() -> None:
    done = asmtp_cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"asmtp {asmtp.__version__}"


def test_interrupt_exits_130(fault_server: Callable[..., FaultServer]) -> None:
    server = fault_server(greeting="silence")
    env = dict(os.environ)
    argv = ["send", "--from", "s@example.test", "--to", "a@example.test", "--body", "b"]
    argv += ["--relay", f"{server.host}:{server.port}", "--tls", "none", "--timeout", "60"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "asmtp", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert wait_until(lambda: server.connections >= 1, timeout=30.0)
        # the first Ctrl-C waits for the session in flight (which the server never
        # greets), the second stops at once (signals may merge: send until it ends)
        for _ in range(20):
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
            if proc.returncode is not None:
                break
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
