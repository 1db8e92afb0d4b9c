"""A private Dovecot LMTP server for asmtp's tests: the local delivery agent Postfix
hands mail to, answering LMTP (RFC 2033) per recipient after the data.

Each :class:`DovecotServer` is a Dovecot ``master`` run in the foreground from a
configuration written into its own temporary folder (``-c``: the system's /etc/dovecot
and its service are never read or touched), serving LMTP alone, on 127.0.0.1 and on a
Unix socket in that folder. Its users come from a passwd-file there: each mailbox of
``mailboxes`` gets a Maildir (owned by ``nobody``), any other recipient ``550 5.1.1``
at RCPT; a mailbox in ``quota`` (``{"bob@example.test": "1K"}``) is refused after the
data when a message would exceed it (``552 5.2.2``), the others of the same
transaction still getting theirs::

    server = dovecot(mailboxes=["ann@example.test", "bob@example.test"], quota={...})
    ...                                 # asmtp sends to server.port or server.socket
    [(mailbox, msg)] = server.messages()

Dovecot's ``master`` must start as root (its services drop to ``dovecot`` and the
mail user); the ``dovecot`` fixture skips when it cannot. The fixture stops every
server it started: SIGTERM to the master, which ends its services.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path

import pytest

from servers import free_port

__all__ = ["DovecotServer", "dovecot", "dovecot_missing"]

#: the name Dovecot gives itself (greeting, LHLO reply)
HOSTNAME = "lmtp.asmtp.test"
_DOVECOT = "/usr/sbin/dovecot"
#: the user mail is stored as (Dovecot refuses to deliver as root)
_MAIL_USER = "nobody"


def dovecot_missing() -> str | None:
    """Why Dovecot's LMTP cannot run here (None when it can)."""
    if not os.path.exists(_DOVECOT):
        return "Dovecot is not installed (apt-get install dovecot-core dovecot-lmtpd)"
    if not os.path.exists("/usr/lib/dovecot/lmtp"):
        return "Dovecot's LMTP server is not installed (apt-get install dovecot-lmtpd)"
    if os.geteuid() != 0:
        return "Dovecot's master must start as root"
    for user in ("dovecot", "dovenull", _MAIL_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user!r} user (the Debian package makes dovecot and dovenull)"
    return None


class DovecotServer:
    """A private Dovecot serving LMTP; see the module docstring."""

    def __init__(
        self, *, mailboxes: Sequence[str] = (), quota: Mapping[str, str] | None = None
    ) -> None:
        self.mailboxes = tuple(mailboxes)
        self.quota = dict(quota or {})
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        # Not pytest's tmp_path: its parent is root's alone (0700), and Dovecot's
        # services, running as other users, open paths under this folder by name.
        self.root = Path(tempfile.mkdtemp(prefix="asmtp-dovecot-"))
        self.root.chmod(0o755)
        self._master: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        """The Unix socket Dovecot's LMTP listens on."""
        return str(self.root / "lmtp.sock")

    @property
    def log(self) -> Path:
        return self.root / "dovecot.log"

    def _maildir(self, mailbox: str) -> Path:
        return self.root / "mail" / mailbox / "Maildir"

    def _write_config(self) -> None:
        user = pwd.getpwnam(_MAIL_USER)
        root = self.root
        for name in ("run", "state", "mail"):
            (root / name).mkdir()
        os.chown(root / "mail", user.pw_uid, user.pw_gid)
        lines = []
        for mailbox in self.mailboxes:
            home = root / "mail" / mailbox
            extra = (
                f"userdb_quota_rule=*:storage={self.quota[mailbox]}"
                if mailbox in self.quota
                else ""
            )
            lines.append(f"{mailbox}::{user.pw_uid}:{user.pw_gid}::{home}::{extra}\n")
        (root / "users").write_text("".join(lines))
        (root / "dovecot.conf").write_text(
            f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {self.log}
hostname = {HOSTNAME}
protocols = lmtp
listen = {self.host}
ssl = no
mail_location = maildir:~/Maildir
first_valid_uid = 1
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
mail_plugins = quota
passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  inet_listener lmtp {{
    address = {self.host}
    port = {self.port}
  }}
  unix_listener {self.socket} {{
    mode = 0666
  }}
}}
"""
        )

    def start(self) -> DovecotServer:
        self._write_config()
        with (self.root / "master.err").open("wb") as errors:  # the child keeps its own
            self._master = subprocess.Popen(
                [_DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15.0
        while not self._answers():
            if self._master.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Dovecot did not start: {self._diagnostics()}")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), 1):
            return True
        return False

    def _diagnostics(self) -> str:
        texts = [p.read_text(errors="replace") for p in (self.root / "master.err", self.log)]
        return " | ".join(t.strip() for t in texts if t.strip()) or "(no log)"

    def stop(self) -> None:
        master, self._master = self._master, None
        if master is not None and master.poll() is None:
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                os.killpg(master.pid, signal.SIGKILL)
                master.wait(timeout=10.0)
        shutil.rmtree(self.root, ignore_errors=True)

    def messages(self) -> list[tuple[str, EmailMessage]]:
        """Every message delivered, as (mailbox, message), mailbox by mailbox."""
        found = []
        for mailbox in self.mailboxes:
            new = self._maildir(mailbox) / "new"
            for path in sorted(new.iterdir()) if new.is_dir() else ():
                msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                assert isinstance(msg, EmailMessage)
                found.append((mailbox, msg))
        return found


@pytest.fixture
def dovecot() -> Iterator[Callable[..., DovecotServer]]:
    """Factory: ``dovecot(mailboxes=[...], quota={...})`` -> a started
    :class:`DovecotServer`; skips when Dovecot cannot run here. Each is stopped at
    teardown."""
    missing = dovecot_missing()
    if missing is not None:
        pytest.skip(missing)
    started: list[DovecotServer] = []

    def make(**options: object) -> DovecotServer:
        server = DovecotServer(**options)  # type: ignore[arg-type]
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.stop()
