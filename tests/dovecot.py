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

Given ``ca`` (a trustme CA) and ``passwords`` (``{"ann@example.test": "s3cret"}``), it
serves the Maildirs over IMAP and POP3 too, with a certificate from that CA: implicit
TLS on ``imaps_port`` and ``pop3s_port``, STARTTLS/STLS on ``imap_port`` and
``pop3_port``. :meth:`DovecotServer.deliver` puts a message straight into a Maildir
(as a delivery agent would), :meth:`DovecotServer.stored` says where each one is now
(folder, seen or not), for the tests of :mod:`asmtp.bounces`.

Dovecot's ``master`` must start as root (its services drop to ``dovecot`` and the
mail user); the ``dovecot`` fixture skips when it cannot. The fixture stops every
server it started: SIGTERM to the master, which ends its services.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme

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
    for name, package in (("imap", "dovecot-imapd"), ("pop3", "dovecot-pop3d")):
        if not os.path.exists(f"/usr/lib/dovecot/{name}"):
            return f"Dovecot's {name.upper()} server is not installed (apt-get install {package})"
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
        self,
        *,
        mailboxes: Sequence[str] = (),
        quota: Mapping[str, str] | None = None,
        passwords: Mapping[str, str] | None = None,
        ca: trustme.CA | None = None,
    ) -> None:
        self.mailboxes = tuple(mailboxes)
        self.quota = dict(quota or {})
        self.passwords = dict(passwords or {})
        self.ca = ca
        self.host = "127.0.0.1"
        self._pick_ports()
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
            (root / name).mkdir(exist_ok=True)  # started again: there already
        os.chown(root / "mail", user.pw_uid, user.pw_gid)
        lines = []
        for mailbox in self.mailboxes:
            home = root / "mail" / mailbox
            extra = (
                f"userdb_quota_rule=*:storage={self.quota[mailbox]}"
                if mailbox in self.quota
                else ""
            )
            password = f"{{PLAIN}}{self.passwords[mailbox]}" if mailbox in self.passwords else ""
            lines.append(f"{mailbox}:{password}:{user.pw_uid}:{user.pw_gid}::{home}::{extra}\n")
        (root / "users").write_text("".join(lines))
        (root / "dovecot.conf").write_text(self._config() + self._mail_access_config())

    def _config(self) -> str:
        root = self.root
        return f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {self.log}
hostname = {HOSTNAME}
protocols = lmtp{" imap pop3" if self.ca is not None else ""}
listen = {self.host}
ssl = {"no" if self.ca is None else "yes"}
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

    def _mail_access_config(self) -> str:
        """IMAP and POP3 with TLS (a certificate from ``ca``), when ``ca`` is given."""
        if self.ca is None:
            return ""
        pem = self.root / "tls.pem"
        self.ca.issue_cert(
            "127.0.0.1", "localhost", HOSTNAME
        ).private_key_and_cert_chain_pem.write_to_path(str(pem))
        pem.chmod(0o600)  # read by the master, as root
        host = self.host
        return f"""\
ssl_cert = <{pem}
ssl_key = <{pem}
# no plaintext login, not even on loopback (Dovecot trusts the local address otherwise)
disable_plaintext_auth = yes
auth_failure_delay = 0
ssl_min_protocol = TLSv1.2
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Bounces {{
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {host}
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = {host}
    port = {self.imaps_port}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {host}
    port = {self.pop3_port}
  }}
  inet_listener pop3s {{
    address = {host}
    port = {self.pop3s_port}
    ssl = yes
  }}
}}
"""

    def _pick_ports(self) -> None:
        self.port = free_port(self.host)
        #: IMAP (STARTTLS), IMAPS, POP3 (STLS), POP3S: served when ``ca`` is given
        self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port = (
            (free_port(self.host) for _ in range(4)) if self.ca is not None else (0, 0, 0, 0)
        )

    def start(self) -> DovecotServer:
        """Start Dovecot; a master that exits at once (another process took one of its
        free ports between their choice and its bind, as parallel tests can) is started
        again on fresh ports, twice at most."""
        for attempt in range(3):
            self._write_config()
            with (self.root / "master.err").open("wb") as errors:  # the child keeps its own
                self._master = subprocess.Popen(
                    [_DOVECOT, "-F", "-c", str(self.root / "dovecot.conf")],
                    stdout=subprocess.DEVNULL,
                    stderr=errors,
                    start_new_session=True,
                )
            deadline = time.monotonic() + 30.0
            while not self._answers():
                exited = self._master.poll() is not None
                if exited or time.monotonic() > deadline:
                    why = self._diagnostics()  # before stop() removes the folder
                    if exited and attempt < 2:
                        self._pick_ports()
                        break
                    self.stop()
                    raise RuntimeError(f"Dovecot did not start: {why}")
                time.sleep(0.05)
            else:
                return self
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _answers(self) -> bool:
        if not os.path.exists(self.socket):
            return False
        ports = [self.port, self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port]
        for port in (p for p in ports if p):
            try:
                socket.create_connection((self.host, port), 1).close()
            except OSError:
                return False
        return True

    def _diagnostics(self) -> str:
        paths = (self.root / "master.err", self.log)
        texts = [p.read_text(errors="replace") for p in paths if p.exists()]
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

    def deliver(self, mailbox: str, raw: bytes, sender: str = "") -> str:
        """Deliver ``raw`` into ``mailbox`` through Dovecot's own LMTP (its index then
        knows the message at once, as with any delivery; a file dropped into the
        Maildir would be seen only at Dovecot's next full scan). ``sender`` is the
        envelope's, ``<>`` by default, as a bounce's. Returns its Message-ID."""
        with smtplib.LMTP(self.socket, timeout=10) as lmtp:
            lmtp.sendmail(sender, [mailbox], raw)
        return _message_id(raw)

    def stored(self, mailbox: str) -> dict[str, tuple[str, bool]]:
        """Where each message of ``mailbox`` is now, by Message-ID: its folder ("INBOX"
        or the folder's name) and whether it is flagged seen (``S`` in its Maildir name)."""
        maildir = self._maildir(mailbox)
        folders = [("INBOX", maildir), *((p.name[1:], p) for p in maildir.glob(".?*"))]
        found = {}
        for folder, path in folders:
            for message in [*path.glob("new/*"), *path.glob("cur/*")]:
                info = message.name.partition(":2,")[2]
                found[_message_id(message.read_bytes())] = (folder, "S" in info)
        return found

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


def _message_id(raw: bytes) -> str:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    return str(message["Message-ID"] or "").strip()


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
