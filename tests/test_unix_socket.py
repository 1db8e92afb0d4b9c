"""Relays on Unix-domain sockets (``Relay(path=...)``, ``--relay unix:/PATH``), as
Postfix, Dovecot and Cyrus take local delivery: a real server (aiosmtpd's
UnixSocketController) on a socket in a temporary folder, on asyncio and trio; TLS over
the socket verified against ``host``; and the connect's failures (no such file,
permission denied, refused) through the one exception map, naming the path.
LMTP over a Unix socket is in tests/test_lmtp.py.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import UnixSocketController
from aiosmtpd.smtp import SMTP, Envelope, Session

import asmtp
from asmtp.errors import InputError

SENDER = "a@example.com"
RCPT = "b@example.org"


class Recorder:
    """aiosmtpd handler keeping each envelope it accepts."""

    def __init__(self) -> None:
        self.envelopes: list[Envelope] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 2.0.0 queued"


class _Controller(UnixSocketController):
    def factory(self) -> SMTP:
        # An explicit loop keeps aiosmtpd from probing for one (see tests/servers.py).
        return SMTP(self.handler, loop=self.loop, **self.SMTP_kwargs)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A folder for sockets whose paths stay short (sun_path holds 107 octets), which
    other users may enter (the permission test connects as ``nobody``)."""
    folder = Path(tempfile.mkdtemp(prefix="asmtp-unix-"))
    folder.chmod(0o755)
    yield folder
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()


@pytest.fixture
def unix_smtp(socket_dir: Path) -> Iterator[Any]:
    """``unix_smtp(**smtp_options)``: aiosmtpd on a Unix socket, with its Recorder."""
    started: list[_Controller] = []

    def start(**options: Any) -> tuple[str, Recorder]:
        path = str(socket_dir / f"smtp{len(started)}.sock")
        handler = Recorder()
        controller = _Controller(handler, unix_socket=path, **options)
        controller.start()
        started.append(controller)
        return path, handler

    yield start
    for controller in started:
        controller.stop()


def message() -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = SENDER, RCPT, "on a socket"
    msg.set_content("hello over a Unix socket\n")
    return msg


@pytest.mark.anyio
async def test_smtp_on_a_unix_socket(unix_smtp: Any) -> None:
    path, recorder = unix_smtp()
    relay = asmtp.Relay(path=path, helo="client.test")
    assert (relay.host, relay.tls) == ("localhost", "none")
    report = await asmtp.send(message(), relay=relay, timeout=10)
    [result] = report
    assert (result.status, result.code, result.host, result.tls) == (
        "delivered",
        250,
        "localhost",
        "none",
    )
    [envelope] = recorder.envelopes
    assert (envelope.mail_from, envelope.rcpt_tos) == (SENDER, [RCPT])


@pytest.mark.anyio
async def test_starttls_on_a_unix_socket_is_verified_against_host(
    unix_smtp: Any, ca: trustme.CA, tls_client_context: ssl.SSLContext
) -> None:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("lmtp.internal").configure_cert(server_context)
    path, recorder = unix_smtp(tls_context=server_context, require_starttls=True)
    relay = asmtp.Relay("lmtp.internal", path=path, tls="starttls", ssl_context=tls_client_context)
    [result] = await asmtp.send(message(), relay=relay, timeout=10)
    assert (result.status, result.tls) == ("delivered", "verified")
    [wrong] = await asmtp.send(message(), relay=relay.with_(host="other.internal"), timeout=10)
    assert (wrong.status, wrong.stage) == ("transient", "starttls")
    assert "certificate of other.internal not trusted" in wrong.message
    assert len(recorder.envelopes) == 1


@pytest.mark.anyio
async def test_no_such_socket(socket_dir: Path) -> None:
    path = str(socket_dir / "missing.sock")
    [result] = await asmtp.send(message(), relay=asmtp.Relay(path=path), timeout=10)
    assert (result.status, result.stage) == ("transient", "connect")
    assert result.message == f"cannot connect to {path}: No such file or directory"


@pytest.mark.anyio
async def test_a_socket_nobody_listens_on_refuses(socket_dir: Path) -> None:
    path = str(socket_dir / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)  # the file stays, with no listener: as after a crash
    with pytest.raises(asmtp.ConnectError) as refused:
        async with asmtp.connect(asmtp.Relay(path=path), timeout=10):
            pass
    assert (refused.value.stage, refused.value.message) == (
        "connect",
        f"connection to {path} refused",
    )


#: connects as ``nobody`` (root may open any socket): run by a child Python as root,
#: which gives up root before it connects
_AS_NOBODY = """
import asyncio, os, pwd, sys
import asmtp

async def main(path):
    try:
        async with asmtp.connect(asmtp.Relay(path=path), timeout=10):
            pass
    except asmtp.ConnectError as exc:
        return f"{exc.stage} {exc.message}"

asyncio.run(main(sys.argv[1] + ".missing"))  # as root: every module it needs imported
nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
print(asyncio.run(main(sys.argv[1])))
"""


@pytest.mark.anyio
async def test_a_socket_we_may_not_open(socket_dir: Path) -> None:
    path = str(socket_dir / "private.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as private:
        private.bind(path)
        private.listen()
        os.chmod(path, 0o600 if os.geteuid() == 0 else 0)
        expected = f"connect cannot connect to {path}: Permission denied"
        if os.geteuid() == 0:
            done = subprocess.run(  # noqa: ASYNC221 (a short child: the test waits for it)
                [sys.executable, "-c", _AS_NOBODY, path],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert done.stdout.strip() == expected, done.stderr
            return
        with pytest.raises(asmtp.ConnectError) as denied:
            async with asmtp.connect(asmtp.Relay(path=path), timeout=10):
                pass
        assert f"{denied.value.stage} {denied.value.message}" == expected


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"path": "/run/" + "x" * 120}, "too long for a Unix socket"),
        ({"path": "/run/x\0y"}, "must not contain CR, LF or NUL"),
        ({"path": ""}, "must be a non-empty path"),
        ({"path": 42}, "must be a path"),
        ({"path": "/run/x", "proxy": "http://proxy.test:3128"}, "cannot go through a proxy"),
        ({"path": "/run/x", "source_address": "127.0.0.1"}, "source_address is for TCP"),
    ],
)
def test_bad_socket_settings_are_refused(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        asmtp.Relay(**options)


def test_a_path_relay_names_its_server_by_host() -> None:
    relay = asmtp.Relay("mx.internal", path=Path("/run/postfix/smtp.sock"), tls="starttls")
    assert (relay.host, relay.path, relay.tls) == (
        "mx.internal",
        "/run/postfix/smtp.sock",
        "starttls",
    )
