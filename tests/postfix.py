"""A private Postfix on loopback for asmtp's tests: the real MTA, not a fake of one.

Each :class:`PostfixServer` is a Postfix ``master`` run in the foreground from a
configuration written into its own temporary folder (main.cf, master.cf, maps, a
Cyrus sasldb, a trustme certificate), with its own queue, data directory and log: the
system's /etc/postfix and mail service are never touched. Its ``smtpd`` listens on one
or more loopback addresses (all on one port, as MX hosts in tests/dnsserver.py's zones
are) and hands what it accepts to Postfix's queue; the ``virtual`` delivery agent
writes each message into a Maildir per mailbox, which :meth:`PostfixServer.messages`
reads back::

    server = postfix(mailboxes=["ann@example.test"], users={"alice": "s3cret"}, ca=ca)
    ...                       # asmtp sends to server.host, server.port
    await server.settled()    # Postfix's queue is empty: every message has been delivered
    [(mailbox, msg)] = [(m.mailbox, m.message) for m in server.messages()]

Mail for ``domains`` (example.test) is Postfix's own: ``mailboxes`` there have a
Maildir, other users get ``550 5.1.1``. Mail for any other domain is relayed, which
only an authenticated client may ask for, and lands in the same Maildirs when its
address is one of ``mailboxes``. ``access`` is the recipient access table every RCPT
is checked against; ``maps`` are more tables (``texthash:$config_directory/NAME``).
``main`` overrides any main.cf setting; a :class:`Listener`'s ``options`` are
``-o name=value`` for that smtpd alone.

Postfix's ``master`` must start as root (it binds, then each daemon drops to
``mail_owner``); the ``postfix`` fixture skips when it cannot. The fixture stops every
server it started: SIGTERM to the master, which ends every daemon of its process group.
"""

from __future__ import annotations

import contextlib
import email
import email.policy
import grp
import ipaddress
import os
import pty
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import anyio
import pytest
import trustme

from servers import free_port

__all__ = ["Delivered", "Listener", "PostfixServer", "postfix", "postfix_missing"]

#: the host name Postfix gives itself (banner, Received headers, SASL realm)
HOSTNAME = "mx.asmtp.test"
#: Postfix's own domain for the tests' mailboxes unless told otherwise
DOMAIN = "example.test"

_QUEUE_DIRS = ("incoming", "active", "deferred", "hold", "maildrop", "bounce", "defer")
_DISCONNECT = re.compile(r"smtpd\[\d+\]: disconnect from \S+ (.*)")
_RECEIVED = re.compile(r"\bby (\S+) \(Postfix\)(?: with (\S+))? id (\w+)")


def _which(name: str) -> str | None:
    """Postfix's and Cyrus's commands live in /usr/sbin, not always on a user's PATH."""
    return shutil.which(name, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin")


def _tool(name: str) -> str:
    path = _which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed")
    return path


def _postconf(name: str) -> str:
    out = subprocess.run(
        [_tool("postconf"), "-d", "-h", name],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    )
    return out.stdout.strip()


def postfix_missing() -> str | None:
    """Why Postfix cannot run here (None when it can)."""
    if _which("postconf") is None:
        return "Postfix is not installed (apt-get install postfix)"
    if _which("saslpasswd2") is None:
        return "saslpasswd2 is not installed (apt-get install sasl2-bin)"
    if os.geteuid() != 0:
        return "Postfix's master must start as root"
    if not sys.platform.startswith("linux"):
        return "the fixture reads Linux's /proc to see Postfix listen"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "no 'postfix' user (mail_owner)"
    return None


@dataclass(frozen=True)
class Listener:
    """One smtpd service: its loopback address and its own ``-o`` settings."""

    host: str = "127.0.0.1"
    options: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not ipaddress.ip_address(self.host).is_loopback:
            raise ValueError(f"Postfix in the tests listens on loopback, not {self.host}")


@dataclass(frozen=True)
class Delivered:
    """One message the virtual delivery agent wrote into a Maildir."""

    mailbox: str  # the address whose Maildir holds it
    by: str  # the host name in Postfix's Received header (which smtpd took it)
    protocol: str  # "ESMTP", "ESMTPS" (TLS), "ESMTPSA" (TLS and AUTH), "UTF8SMTPS"...
    queue_id: str  # one per mail transaction
    message: EmailMessage


class PostfixServer:
    """A private Postfix instance; see the module docstring."""

    def __init__(
        self,
        *,
        listeners: Sequence[Listener] = (Listener(),),
        port: int | None = None,
        domains: Sequence[str] = (DOMAIN,),
        mailboxes: Sequence[str] = (),
        users: Mapping[str, str] | None = None,
        access: Mapping[str, str] | None = None,
        maps: Mapping[str, Mapping[str, str]] | None = None,
        ca: trustme.CA | None = None,
        cert_names: Sequence[str] = ("localhost", "127.0.0.1", HOSTNAME),
        main: Mapping[str, str] | None = None,
    ) -> None:
        self.listeners = tuple(listeners)
        self._fixed_port = port is not None
        self.port = port or free_port(*(listener.host for listener in self.listeners))
        self.domains = tuple(domains)
        self.mailboxes = tuple(mailboxes)
        self.users = dict(users or {})
        self.maps = {"access": dict(access or {}), **(maps or {})}
        self.ca = ca
        self.cert_names = tuple(cert_names)
        self.main = dict(main or {})
        # Not pytest's tmp_path: its parent is root's alone (0700), and the daemons,
        # running as mail_owner, open paths under this folder by name.
        self.root = Path(tempfile.mkdtemp(prefix="asmtp-postfix-"))
        self.root.chmod(0o755)
        self._master: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.listeners[0].host

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def maillog(self) -> Path:
        return self.root / "maillog"

    # -- configuration ---------------------------------------------------------------

    def _main_cf(self, owner: pwd.struct_passwd) -> dict[str, str]:
        root, conf = self.root, self.conf
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": f"{root}/queue",
            "data_directory": f"{root}/data",
            "mail_owner": owner.pw_name,
            "setgid_group": "postdrop",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(root),
            "myhostname": HOSTNAME,
            "mydomain": "asmtp.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            # Postfix's own addresses (it checks they are an interface's); each smtpd
            # service binds the loopback address master.cf gives it.
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            # Loopback is the only network here; no restriction says permit_mynetworks,
            # and the connection limits apply to it too.
            "mynetworks": "127.0.0.0/8",
            "smtpd_client_event_limit_exceptions": "",
            "smtpd_peername_lookup": "no",
            # Strict about the wire: a bare LF, or a command sent where RFC 2920 says
            # to wait for a reply, ends the session (and fails the test).
            "smtpd_forbid_bare_newline": "reject",
            "smtpd_forbid_bare_newline_exclusions": "",
            "smtpd_forbid_unauth_pipelining": "yes",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            # Postfix's own mail: each address of ``mailboxes`` has a Maildir.
            "virtual_mailbox_domains": ", ".join(self.domains),
            "virtual_mailbox_base": f"{root}/mail",
            "virtual_mailbox_maps": f"texthash:{conf}/mailboxes",
            "virtual_minimum_uid": "1",
            "virtual_uid_maps": f"static:{owner.pw_uid}",
            "virtual_gid_maps": f"static:{owner.pw_gid}",
            # Relayed mail (other domains) goes into the same Maildirs, not out to the net.
            "default_transport": "virtual",
            "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
            "smtpd_recipient_restrictions": f"check_recipient_access texthash:{conf}/access",
            "smtputf8_enable": "yes",
            "notify_classes": "",
        }
        if self.ca is not None:
            settings |= {
                "smtpd_tls_security_level": "may",
                "smtpd_tls_chain_files": f"{conf}/tls.pem",
                "smtpd_tls_received_header": "yes",
                "tls_random_source": "dev:/dev/urandom",
            }
        if self.users:
            settings |= {
                "smtpd_sasl_auth_enable": "yes",
                "smtpd_sasl_type": "cyrus",
                "smtpd_sasl_path": "smtpd",
                "cyrus_sasl_config_path": f"{conf}/sasl",
                "smtpd_sasl_local_domain": HOSTNAME,
            }
            if self.ca is not None:
                settings["smtpd_tls_auth_only"] = "yes"
        settings |= self.main
        return settings

    def _master_cf(self) -> str:
        services = []
        for listener in self.listeners:
            options = "".join(_option(name, value) for name, value in listener.options.items())
            services.append(f"{listener.host}:{self.port} inet n - n - - smtpd{options}")
        # name, type, private, unprivileged, chroot, wakeup, process limit, command;
        # nothing chrooted: the paths are the temporary folder's
        services += [
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "tlsmgr unix - - n 1000? 1 tlsmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "proxymap unix - - n - - proxymap",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "virtual unix - n n - - virtual",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        return "\n".join(services) + "\n"

    def _write(self) -> None:
        owner = pwd.getpwnam("postfix")
        uid, gid = owner.pw_uid, owner.pw_gid
        conf = self.conf
        conf.mkdir(mode=0o755)
        queue = self.root / "queue"
        queue.mkdir(mode=0o755)
        (queue / "pid").mkdir(mode=0o755)
        for name in (*_QUEUE_DIRS, "private", "public", "corrupt", "flush", "saved", "trace"):
            path = queue / name
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, uid, gid)
        postdrop = _group_id("postdrop")
        os.chown(queue / "public", uid, postdrop)
        (queue / "public").chmod(0o710)
        os.chown(queue / "maildrop", uid, postdrop)
        (queue / "maildrop").chmod(0o730)
        for name in ("data", "mail"):
            (self.root / name).mkdir(mode=0o700)
            os.chown(self.root / name, uid, gid)
        main = "".join(f"{name} = {value}\n" for name, value in self._main_cf(owner).items())
        (conf / "main.cf").write_text(main)
        self._write_master_cf()
        (conf / "mailboxes").write_text("".join(f"{a} {a}/\n" for a in self.mailboxes))
        for name, table in self.maps.items():
            (conf / name).write_text("".join(f"{k} {v}\n" for k, v in table.items()))
        if self.ca is not None:
            tls = conf / "tls.pem"
            self.ca.issue_cert(*self.cert_names).private_key_and_cert_chain_pem.write_to_path(
                str(tls)
            )
            tls.chmod(0o600)  # read by smtpd as root, before it drops privileges
        if self.users:
            self._write_sasl(uid, gid)
        for path in conf.rglob("*"):
            _in_the_past(path)

    def _write_master_cf(self) -> None:
        master_cf = self.conf / "master.cf"
        master_cf.write_text(self._master_cf())
        _in_the_past(master_cf)

    def _write_sasl(self, uid: int, gid: int) -> None:
        sasl = self.conf / "sasl"
        sasl.mkdir(mode=0o755)
        db = sasl / "sasldb2"
        (sasl / "smtpd.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\n"
            f"mech_list: PLAIN LOGIN\nsasldb_path: {db}\n"
        )
        for user, password in self.users.items():
            subprocess.run(
                [_tool("saslpasswd2"), "-p", "-c", "-f", str(db), "-u", HOSTNAME, user],
                input=password.encode(),
                check=True,
                capture_output=True,
                timeout=10,
            )
        os.chown(db, uid, gid)  # smtpd reads it as mail_owner
        db.chmod(0o600)

    # -- running ---------------------------------------------------------------------

    def start(self, timeout: float = 15.0, attempts: int = 3) -> PostfixServer:
        """Write the configuration and start the master; return once every smtpd
        service listens. A port taken meanwhile (by another test's server) is
        replaced by a new free one, unless the port was given."""
        self._write()
        for _ in range(attempts):
            if self._run_master(timeout):
                return self
            if not self._fixed_port:
                self.port = free_port(*(listener.host for listener in self.listeners))
                self._write_master_cf()
        raise RuntimeError(
            f"Postfix did not start on port {self.port}:\n{self.log()}{_complaint(self.conf)}"
        )

    def _run_master(self, timeout: float) -> bool:
        """Start the master; True once it alone listens on every smtpd address."""
        master = Path(_postconf("daemon_directory")) / "master"
        # Foreground (-d), in a process group of its own: stop() ends it and its daemons.
        with (self.root / "master.err").open("ab") as errors:
            self._master = subprocess.Popen(
                [str(master), "-d", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=errors,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        # Listening is checked in the kernel's table, not by connecting: a probe
        # session would count against smtpd_client_connection_count_limit.
        pid = self._master.pid
        while True:
            listeners = [_listeners(lsn.host, self.port) for lsn in self.listeners]
            if all(_holds(pid, inodes) for inodes in listeners):
                break
            if self._master.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return False  # a port already taken is fatal to the master
            time.sleep(0.02)
        if any(len(inodes) > 1 for inodes in listeners):
            # Postfix binds with SO_REUSEPORT: a second listener on the port (another
            # Postfix) would get some of the connections meant for this one.
            self.stop()
            return False
        return True

    def stop(self) -> None:
        master, self._master = self._master, None
        if master is None:
            return
        if master.poll() is None:
            # The master passes SIGTERM on to every daemon of its process group.
            master.send_signal(signal.SIGTERM)
            try:
                master.wait(timeout=10)
            except subprocess.TimeoutExpired:
                master.kill()
                master.wait(timeout=10)
        # Daemons finishing a request outlive the master a moment (they are in its
        # process group; once they exit, init reaps them).
        deadline = time.monotonic() + 5
        while (left := _live_members(master.pid)) and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what Postfix did --------------------------------------------------------------

    def log(self) -> str:
        """The master's errors and Postfix's mail log, for failure messages."""
        parts = []
        for path in (self.root / "master.err", self.maillog):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    async def sessions(self, count: int, timeout: float = 15.0) -> list[str]:
        """The statistics smtpd logs as each session ends (``ehlo=1 mail=1 rcpt=2/3
        data=1 quit=1 commands=6/7``: commands accepted / sent), once ``count``
        sessions have ended."""
        with anyio.move_on_after(timeout):
            # Polled, as settled() is: Postfix's log grows in another process.
            while len(found := _DISCONNECT.findall(self.log())) < count:  # noqa: ASYNC110
                await anyio.sleep(0.02)
            return found
        raise AssertionError(f"fewer than {count} sessions ended:\n{self.log()}")

    def queued(self) -> list[str]:
        """Queue ids of the messages still in Postfix's queue (any state)."""
        queue = self.root / "queue"
        return sorted(
            path.name
            for name in _QUEUE_DIRS
            for path in (queue / name).rglob("*")
            if path.is_file()
        )

    async def settled(self, timeout: float = 15.0) -> None:
        """Wait until Postfix's queue is empty: each message it accepted has been
        delivered (or given up on). Fails, with the mail log, when it stays busy."""
        with anyio.move_on_after(timeout):
            # Polled: Postfix's processes change the queue; nothing here to wait on.
            while self.queued():  # noqa: ASYNC110
                await anyio.sleep(0.02)
            return
        raise AssertionError(f"Postfix's queue still holds {self.queued()}:\n{self.log()}")

    def messages(self) -> list[Delivered]:
        """Every message in the Maildirs, ordered by mailbox and queue id."""
        found = []
        for path in sorted((self.root / "mail").glob("*/new/*")):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            match = _RECEIVED.search(" ".join(str(message["Received"]).split()))
            assert match is not None, message["Received"]
            by, protocol, queue_id = match.groups()
            mailbox = path.parent.parent.name
            found.append(Delivered(mailbox, by, protocol or "", queue_id, message))
        return sorted(found, key=lambda d: (d.mailbox, d.queue_id))


def _complaint(conf: Path) -> str:
    """What Postfix says of a configuration its master would not start with. The
    master dies before its log is up, and the ``postfix`` command writes such errors
    to a terminal only: it is given one (and asked only for a read-only status)."""
    primary, secondary = pty.openpty()
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [_tool("postfix"), "-c", str(conf), "status"],
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=secondary,
            timeout=10,
        )
    os.close(secondary)
    said = b""
    with contextlib.suppress(OSError):  # EIO: everything has been read
        while chunk := os.read(primary, 4096):
            said += chunk
    os.close(primary)
    return said.decode(errors="replace")


def _in_the_past(path: Path) -> None:
    """Date a file a minute back: Postfix takes a configuration file written in the
    current second for one still being edited, and sleeps before reading it again."""
    past = time.time() - 60
    os.utime(path, (past, past))


def _option(name: str, value: str) -> str:
    """``-o name=value`` for master.cf; braces around a value with spaces (Postfix 3.0)."""
    return f" -o {{ {name} = {value} }}" if " " in value else f" -o {name}={value}"


def _group_id(name: str) -> int:
    return grp.getgrnam(name).gr_gid


def _live_members(group: int) -> list[int]:
    """The processes of a process group that have not exited (Linux: /proc)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses
            state, _, pgrp = stat.read_text().rpartition(")")[2].split()[:3]
            if int(pgrp) == group and state != "Z":
                live.append(int(stat.parent.name))
    return live


def _listeners(host: str, port: int) -> set[str]:
    """The sockets listening on TCP host:port, as /proc/PID/fd links name them
    (Linux: the kernel's table in /proc/net/tcp)."""
    address = int.from_bytes(socket.inet_aton(host), sys.byteorder)
    local = f"{address:08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        next(table)
        return {
            f"socket:[{fields[9]}]"
            for fields in (line.split() for line in table)
            if fields[1] == local and fields[3] == "0A"  # 0A: LISTEN
        }


def _holds(pid: int, sockets: set[str]) -> bool:
    """Whether process ``pid`` has one of ``sockets`` open."""
    if not sockets:
        return False
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) in sockets:
                    return True
    return False


@pytest.fixture
def postfix() -> Iterator[Callable[..., PostfixServer]]:
    """``postfix(**options) -> PostfixServer``, started; see :class:`PostfixServer` for
    the options. Every server made is stopped and its folder removed at teardown."""
    reason = postfix_missing()
    if reason is not None:
        pytest.skip(reason)
    servers: list[PostfixServer] = []

    def make(**options: Any) -> PostfixServer:
        server = PostfixServer(**options)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()
        server.remove()
