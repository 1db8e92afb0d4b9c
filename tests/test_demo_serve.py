"""``asmtp demo --serve``: the demo server kept running for other programs' sends, on
the port asked for or a free one, stopped by Ctrl-C or by itself."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import asmtp
from asmtp.testing import LocalServer


def start_serving(*args: str) -> tuple[subprocess.Popen[str], int, Path]:
    process = subprocess.Popen(
        [sys.executable, "-m", "asmtp", "demo", "--serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    found = re.match(r"asmtp demo server on 127\.0\.0\.1:(\d+); messages go to (\S+)", first)
    assert found, first + process.stderr.read() if process.stderr else first
    return process, int(found.group(1)), Path(found.group(2))


async def test_serve_keeps_the_server_running_until_ctrl_c() -> None:
    process, port, folder = start_serving("--minutes", "1")
    try:
        report = await asmtp.sendmail(
            to="ann@example.org, bob@example.net",
            from_="me@example.com",
            subject="served",
            body="hello",
            relay=asmtp.Relay("127.0.0.1", port, tls="none"),
        )
        assert report.counts() == {"delivered": 2}
    finally:
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "received 2 message(s)" in out
    kept = sorted(folder.glob("*.eml"))
    assert len(kept) == 2 and b"Subject: served" in kept[0].read_bytes()


def test_serve_listens_on_the_port_asked_for_and_stops_by_itself() -> None:
    with socket.socket() as probe:  # a free port, released for the server to take
        probe.bind(("127.0.0.1", 0))
        wanted = probe.getsockname()[1]
    process, port, _ = start_serving("--port", str(wanted), "--minutes", "0.01")
    out, err = process.communicate(timeout=30)
    assert port == wanted
    assert process.returncode == 0, err
    assert "received 0 message(s)" in out


def test_a_port_in_use_and_options_without_serve_are_usage_errors() -> None:
    with LocalServer() as busy:
        done = subprocess.run(
            [sys.executable, "-m", "asmtp", "demo", "--serve", "--port", str(busy.port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{busy.port}" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "asmtp", "demo", "--port", "2525"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "go with --serve" in done.stderr
