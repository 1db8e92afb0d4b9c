"""Proxies: SOCKS5 (a real microsocks on loopback, with and without RFC 1929 user name
and password) and HTTP CONNECT (a small real CONNECT proxy below, on loopback, in its
own thread), per relay and for direct delivery, on asyncio (uvloop too) and on trio;
and ``sock=``, a socket the caller connected. The SMTP servers are the aiosmtpd ones of
servers.py; the MX names come from the loopback DNS server of dnsserver.py.

What is shown: mail goes through the tunnel; TLS through it is verified against the SMTP
server's name (never the proxy's); every failure of the proxy is one clear "connect"
error naming the proxy, never its credentials; and the credentials appear in no
``repr``, log line, debug transcript or command output.

The integration tests run on asyncio and on trio (the ``anyio`` mark; see conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import logging
import os
import random
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme

import asmtp
from asmtp.errors import CertificateError, ConnectError, InputError, SMTPTimeoutError
from dnsserver import DNSServer
from servers import SMTPTestServer, free_port, server_ssl_context, wait_until

MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]

USER, PASSWORD = "proxy-user-7", "s3cret-Proxy-Pw"
TIMEOUT = 5.0
MX1 = "127.0.0.2"
ONE_MX = """
    @    MX 10 mx1
    mx1  A 127.0.0.2
"""


# --------------------------------------------------------------------------- SOCKS5: microsocks

_INSTALL_LOCK = Path(tempfile.gettempdir()) / "asmtp-test-microsocks.lock"
_install_failure: str | None = None


def _microsocks() -> str:
    """The microsocks binary; installed with apt-get when missing and this process may
    (root, apt-get there), once, under a lock (pytest-xdist workers share the machine).
    Skips the test, saying why, only when it is absent and cannot be installed."""
    global _install_failure
    found = shutil.which("microsocks")
    if found is not None:
        return found
    if _install_failure is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            _install_failure = "not root, or no apt-get"
        else:
            with _INSTALL_LOCK.open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if shutil.which("microsocks") is None:
                    _install_failure = _apt_install("microsocks")
            found = shutil.which("microsocks")
            if found is not None:
                return found
    pytest.skip(
        f"microsocks (the SOCKS5 proxy) is not installed and could not be: {_install_failure} "
        "(apt-get install microsocks; .ci/run installs it)"
    )


def _apt_install(package: str) -> str:
    try:
        done = subprocess.run(
            ["apt-get", "install", "-y", "-q", package],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            text=True,
            timeout=45,  # within the test's own time limit
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "apt-get install took too long"
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if done.returncode and lines else f"apt-get install exited {done.returncode}"


@dataclass
class SocksProxy:
    """A microsocks process on a loopback port, run from a temporary folder."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def url(self, *, password: str | None = None) -> str:
        if self.username is None:
            return f"socks5://{self.host}:{self.port}"
        return f"socks5://{self.username}:{password or self.password}@{self.host}:{self.port}"

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def _started(process: subprocess.Popen[bytes], host: str, port: int) -> bool:
    """Whether ``process`` answers on ``port`` (False: it ended, as when the port was taken)."""
    wait_until(lambda: process.poll() is not None or _answers(host, port))
    return process.poll() is None and _answers(host, port)


@pytest.fixture
def socks_proxy(tmp_path: Path) -> Iterator[Callable[..., SocksProxy]]:
    """``make(username=None, password=None, host="127.0.0.1")``: a started microsocks
    (with RFC 1929 authentication when given a user); each is stopped at teardown, and
    none outlives five minutes even if this process dies (``timeout`` wraps it)."""
    binary = _microsocks()
    proxies: list[SocksProxy] = []

    def make(
        username: str | None = None, password: str | None = None, host: str = "127.0.0.1"
    ) -> SocksProxy:
        for _ in range(3):  # a port found free may be taken before microsocks binds it
            proxy = SocksProxy(host, free_port(host), username, password)
            command = ["timeout", "300", binary, "-i", host, "-p", str(proxy.port)]
            if username is not None and password is not None:
                command += ["-u", username, "-P", password]
            with (tmp_path / f"microsocks-{proxy.port}.log").open("wb") as log:
                proxy.process = subprocess.Popen(
                    command, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log
                )
            proxies.append(proxy)
            if _started(proxy.process, host, proxy.port):
                return proxy
        raise RuntimeError("microsocks did not start")

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()


# --------------------------------------------------------------------------- HTTP CONNECT


class ConnectProxy:
    """A real HTTP CONNECT proxy (RFC 9110 9.3.6) on loopback, in its own thread and event
    loop: it resolves names from ``names`` (as a proxy resolves them, not the client),
    asks for Basic credentials when given ``credentials``, and records each CONNECT
    target. ``pack_greeting``: wait for the server's first bytes and send them in the
    same write as the 200, as a proxy that has them buffered already does."""

    def __init__(
        self,
        *,
        names: dict[str, str] | None = None,
        credentials: tuple[str, str] | None = None,
        pack_greeting: bool = False,
    ) -> None:
        self.names = names or {}
        self.credentials = credentials
        self.pack_greeting = pack_greeting
        self.targets: list[str] = []
        self.headers: list[bytes] = []
        self.host, self.port = "127.0.0.1", 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> ConnectProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=5)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            self.headers.append(head)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            self.targets.append(target)
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                return
            if self.credentials is not None:
                pair = ":".join(self.credentials).encode()
                expected = b"Proxy-Authorization: Basic " + base64.b64encode(pair)
                if expected not in head.split(b"\r\n"):
                    writer.write(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b'Proxy-Authenticate: Basic realm="asmtp test"\r\n\r\n'
                    )
                    return
            host, _, port = target.rpartition(":")
            host = self.names.get(host.strip("[]"), host.strip("[]"))
            try:
                up_reader, upstream = await asyncio.open_connection(host, int(port))
            except OSError:
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
                return
            reply = b"HTTP/1.1 200 Connection established\r\n\r\n"
            if self.pack_greeting:
                reply += await asyncio.wait_for(up_reader.read(65536), TIMEOUT)
            writer.write(reply)
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()
            self._tasks.discard(task)  # type: ignore[arg-type]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.write_eof()


@pytest.fixture
def connect_proxy() -> Iterator[Callable[..., ConnectProxy]]:
    """``make(**options)``: a started :class:`ConnectProxy`; each is stopped at teardown."""
    proxies: list[ConnectProxy] = []

    def make(**options: Any) -> ConnectProxy:
        proxy = ConnectProxy(**options).start()
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.stop()


# --------------------------------------------------------------------------- helpers


async def send(relay: asmtp.Relay | asmtp.Direct, *to: str, debug: bool = False) -> asmtp.Report:
    return await asmtp.sendmail(
        to=list(to) or ["ann@example.test"],
        from_="sender@client.test",
        subject="through a proxy",
        body="hello through the tunnel",
        relay=relay,
        timeout=TIMEOUT,
        debug=debug,
    )


def plain_relay(server: SMTPTestServer, proxy: str, **options: Any) -> asmtp.Relay:
    return asmtp.Relay(server.host, server.port, tls="none", proxy=proxy, **options)


def rcpts_of(server: SMTPTestServer) -> list[str]:
    return [rcpt for message in server.messages for rcpt in message.rcpt_tos]


# --------------------------------------------------------------------------- settings


def test_a_proxy_url_becomes_a_proxy_whose_password_never_shows() -> None:
    proxy = asmtp.Proxy.parse(f"socks5://{USER}:{PASSWORD}@127.0.0.1:1081")
    assert (proxy.scheme, proxy.host, proxy.port) == ("socks5", "127.0.0.1", 1081)
    assert (proxy.username, proxy.password) == (USER, PASSWORD)
    assert repr(proxy) == "Proxy('socks5://***:***@127.0.0.1:1081')"
    assert str(proxy) == "socks5://***:***@127.0.0.1:1081"
    assert proxy.label == "socks5 proxy 127.0.0.1:1081"
    relay = asmtp.Relay("smtp.example.com", proxy=f"socks5://{USER}:{PASSWORD}@127.0.0.1:1081")
    assert relay.proxy == proxy  # the URL, parsed once when the Relay is made
    for settings in (
        asmtp.Relay("smtp.example.com", proxy=f"socks5://{USER}:{PASSWORD}@proxy.example"),
        asmtp.Direct(proxy=f"http://{USER}:{PASSWORD}@proxy.example:3128"),
    ):
        assert PASSWORD not in repr(settings)
        assert USER not in repr(settings)


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "user"),
    [
        ("socks5://proxy.example", "socks5", "proxy.example", 1080, None),
        ("SOCKS5H://Proxy.Example:9050", "socks5", "proxy.example", 9050, None),
        ("http://[::1]:3128", "http", "::1", 3128, None),
        ("socks5://a%40b:p%3Aw@10.0.0.1:1080/", "socks5", "10.0.0.1", 1080, "a@b"),
    ],
)
def test_proxy_urls(url: str, scheme: str, host: str, port: int, user: str | None) -> None:
    proxy = asmtp.Proxy.parse(url)
    assert (proxy.scheme, proxy.host, proxy.port, proxy.username) == (scheme, host, port, user)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("socks4://proxy.example:1080", "socks5:// or http://"),
        ("https://proxy.example:443", "socks5:// or http://"),
        ("http://proxy.example", "needs a port"),
        ("socks5://proxy.example:99999", "does not parse"),
        (f"socks5://{USER}@proxy.example", "both a user name and a password"),
        (f"socks5://{USER}:@proxy.example", "both a user name and a password"),
        (f"socks5://{USER}:{PASSWORD}@proxy.example/x", "scheme://[user:password@]host:port"),
        (f"socks5://{USER}:{PASSWORD}@:1080", "no host"),
        (f"socks5://{USER}:pa/{PASSWORD}@proxy.example:1080", "does not parse"),
        ("socks5://proxy.example\r\n:1080", "CR, LF or NUL"),
    ],
)
def test_bad_proxy_urls_are_input_errors_without_the_password(url: str, says: str) -> None:
    with pytest.raises(InputError, match="proxy") as caught:
        asmtp.Proxy.parse(url)
    assert says in caught.value.message
    assert PASSWORD not in caught.value.message


def test_a_proxy_must_be_a_url_or_a_proxy() -> None:
    with pytest.raises(InputError, match="URL such as socks5://host:1080"):
        asmtp.Relay("smtp.example.com", proxy=1080)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="user name needs a password"):
        asmtp.Proxy("socks5", "proxy.example", 1080, username=USER)
    with pytest.raises(InputError, match="must not contain ':'"):
        asmtp.Proxy("http", "proxy.example", 3128, username="a:b", password=PASSWORD)
    with pytest.raises(InputError, match="at most 255 octets"):
        asmtp.Proxy("socks5", "proxy.example", 1080, username="u" * 256, password="p")
    with pytest.raises(InputError, match="given twice"):
        asmtp.Proxy.parse(f"socks5://{USER}:{PASSWORD}@proxy.example", password=PASSWORD)
    kept_apart = asmtp.Proxy.parse(f"socks5://{USER}@proxy.example", password=PASSWORD)
    assert kept_apart.password == PASSWORD


BLOCKER = """\
import sys


class RefusePythonSocks:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "python_socks":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, RefusePythonSocks())
"""


def python(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_importing_asmtp_and_naming_a_proxy_loads_no_python_socks() -> None:
    done = python(
        "import sys, asmtp, asmtp.cli.main\n"
        "asmtp.Relay('smtp.example.com', proxy='socks5://127.0.0.1:1080')\n"
        "asmtp.Direct(proxy='http://127.0.0.1:3128')\n"
        "print('python_socks' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]


def test_without_the_extra_a_socks5_proxy_names_it(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    done = python(
        "import asmtp\n"
        "print(asmtp.Relay('smtp.example.com', proxy='http://127.0.0.1:3128').proxy)\n"
        "try:\n"
        "    asmtp.Relay('smtp.example.com', proxy='socks5://127.0.0.1:1080')\n"
        "except asmtp.InputError as exc:\n"
        "    print(exc)\n",
        env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "http://127.0.0.1:3128",  # HTTP CONNECT is asmtp's own: no extra needed
        "a SOCKS5 proxy needs python-socks: pip install 'asmtp[proxy]'",
    ]


# --------------------------------------------------------------------------- SOCKS5 relay


@pytest.mark.anyio
async def test_relay_through_socks5_without_authentication(
    smtp_server: MakeServer, socks_proxy: Callable[..., SocksProxy]
) -> None:
    server = smtp_server()
    proxy = socks_proxy()
    report = await send(plain_relay(server, proxy.url()), "ann@example.test", "bob@example.test")
    assert report.ok, report.failed()
    assert sorted(rcpts_of(server)) == ["ann@example.test", "bob@example.test"]


@pytest.mark.anyio
async def test_relay_through_socks5_with_user_and_password(
    smtp_server: MakeServer, socks_proxy: Callable[..., SocksProxy]
) -> None:
    server = smtp_server()
    proxy = socks_proxy(USER, PASSWORD)
    [result] = await send(plain_relay(server, proxy.url()))
    assert result.status == "delivered", result
    assert rcpts_of(server) == ["ann@example.test"]


@pytest.mark.anyio
async def test_wrong_proxy_password_is_a_clear_connect_error(
    smtp_server: MakeServer, socks_proxy: Callable[..., SocksProxy]
) -> None:
    server = smtp_server()
    proxy = socks_proxy(USER, PASSWORD)
    [result] = await send(plain_relay(server, proxy.url(password="not-" + PASSWORD)))
    assert (result.status, result.stage) == ("transient", "connect")
    assert result.message == (
        f"cannot connect to {server.host} through socks5 proxy 127.0.0.1:{proxy.port}: "
        "Username and password authentication failure"
    )
    [result] = await send(plain_relay(server, f"socks5://127.0.0.1:{proxy.port}"))
    assert result.stage == "connect" and "authentication methods" in result.message
    assert server.sessions_opened == 0


@pytest.mark.anyio
async def test_a_server_the_proxy_cannot_reach(socks_proxy: Callable[..., SocksProxy]) -> None:
    proxy = socks_proxy()
    closed = free_port()
    relay = asmtp.Relay("127.0.0.1", closed, tls="none", proxy=proxy.url())
    with pytest.raises(ConnectError) as caught:
        async with asmtp.connect(relay, timeout=TIMEOUT):
            pass
    assert caught.value.stage == "connect"
    assert caught.value.message == (
        f"cannot connect to 127.0.0.1 through socks5 proxy 127.0.0.1:{proxy.port}: "
        "Connection refused by destination host"
    )


@pytest.mark.anyio
async def test_proxy_down_gives_every_recipient_one_transient_result() -> None:
    down = free_port()
    relay = asmtp.Relay("smtp.example.com", tls="none", proxy=f"socks5://127.0.0.1:{down}")
    report = await send(relay, "ann@example.test", "bob@example.test", "cid@example.test")
    assert len(report) == 3
    for result in report:
        assert (result.status, result.stage) == ("transient", "connect")
        assert (
            result.message == f"cannot connect to socks5 proxy 127.0.0.1:{down}: Connection refused"
        )


@pytest.mark.anyio
async def test_a_silent_proxy_times_out_in_the_connect_stage() -> None:
    with socket.socket() as silent:  # listens, never answers: connects, then nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        relay = asmtp.Relay("smtp.example.com", tls="none", proxy=f"socks5://127.0.0.1:{port}")
        with pytest.raises(SMTPTimeoutError) as caught:
            async with asmtp.connect(relay, timeout=0.5):
                pass
    assert caught.value.stage == "connect"
    assert caught.value.message == (
        f"timed out after 0.5 s connecting to smtp.example.com through socks5 proxy "
        f"127.0.0.1:{port}"
    )


@pytest.mark.anyio
async def test_starttls_through_the_tunnel_is_verified_against_the_smtp_server(
    smtp_server: MakeServer,
    socks_proxy: Callable[..., SocksProxy],
    ca: trustme.CA,
    tls_client_context: ssl.SSLContext,
) -> None:
    # the certificate names the SMTP server (127.0.0.1), never the proxy (127.0.0.7)
    server = smtp_server(starttls_context=server_ssl_context(ca, "127.0.0.1"))
    proxy = socks_proxy(USER, PASSWORD, host="127.0.0.7")
    relay = asmtp.Relay(server.host, server.port, ssl_context=tls_client_context, proxy=proxy.url())
    async with asmtp.connect(relay, timeout=TIMEOUT) as session:
        assert session.tls == "verified"
        report = await session.sendmail(
            "sender@client.test", ["ann@example.test"], b"Subject: x\r\n\r\nhi\r\n"
        )
        assert report.ok
    assert await server.idle()
    [message] = server.messages
    assert message.tls
    # a certificate for another name is refused, through the tunnel as without it
    other = smtp_server(starttls_context=server_ssl_context(ca, "127.0.0.7", "other.test"))
    relay = relay.with_(port=other.port)
    with pytest.raises(CertificateError):
        async with asmtp.connect(relay, timeout=TIMEOUT):
            pass
    assert other.messages == []


@pytest.mark.anyio
async def test_implicit_tls_through_socks5(
    smtp_server: MakeServer,
    socks_proxy: Callable[..., SocksProxy],
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(implicit_tls_context=tls_server_context)
    proxy = socks_proxy()
    relay = asmtp.Relay(
        "localhost", server.port, tls="implicit", ssl_context=tls_client_context, proxy=proxy.url()
    )
    [result] = await send(relay)
    assert (result.status, result.tls) == ("delivered", "verified"), result
    assert await server.idle()


# --------------------------------------------------------------------------- direct delivery


@pytest.mark.anyio
async def test_direct_delivery_through_socks5_verifies_the_mx_name(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    socks_proxy: Callable[..., SocksProxy],
    ca: trustme.CA,
    tls_client_context: ssl.SSLContext,
) -> None:
    dns = dns_server({"example.test": ONE_MX})
    port = free_port(MX1)
    server = smtp_server(
        host=MX1, port=port, starttls_context=server_ssl_context(ca, "mx1.example.test")
    )
    proxy = socks_proxy(USER, PASSWORD)
    settings = asmtp.Direct(
        dns_servers=[dns.spec],
        port=port,
        tls="starttls",  # verified, or not at all
        ssl_context=tls_client_context,
        helo="client.asmtp.test",
        rng=random.Random(1),
        proxy=proxy.url(),
    )
    [result] = await send(settings)
    assert (result.status, result.tls, result.host) == ("delivered", "verified", "mx1.example.test")
    assert [(a.address, a.stage) for a in result.tried] == [(MX1, "message")]
    assert await server.idle()
    assert rcpts_of(server) == ["ann@example.test"]


@pytest.mark.anyio
async def test_direct_delivery_with_the_proxy_down_is_transient(dns_server: MakeDNS) -> None:
    dns = dns_server({"example.test": ONE_MX})
    down = free_port()
    settings = asmtp.Direct(
        dns_servers=[dns.spec], port=25, tls="none", proxy=f"socks5://127.0.0.1:{down}"
    )
    report = await send(settings, "ann@example.test", "bob@example.test")
    assert [(r.status, r.stage) for r in report] == [("transient", "connect")] * 2
    assert all(f"socks5 proxy 127.0.0.1:{down}" in r.message for r in report)


# --------------------------------------------------------------------------- HTTP CONNECT


@pytest.mark.anyio
async def test_relay_through_http_connect_sends_the_name_for_the_proxy_to_resolve(
    smtp_server: MakeServer,
    connect_proxy: Callable[..., ConnectProxy],
    ca: trustme.CA,
    tls_client_context: ssl.SSLContext,
) -> None:
    name = "smtp.proxied.test"  # only the proxy knows where it is
    server = smtp_server(starttls_context=server_ssl_context(ca, name))
    proxy = connect_proxy(names={name: server.host}, credentials=(USER, PASSWORD))
    url = f"http://{USER}:{PASSWORD}@{proxy.host}:{proxy.port}"
    relay = asmtp.Relay(name, server.port, ssl_context=tls_client_context, proxy=url)
    [result] = await send(relay)
    assert (result.status, result.tls) == ("delivered", "verified"), result
    assert proxy.targets == [f"{name}:{server.port}"]
    assert await server.idle()


@pytest.mark.anyio
async def test_a_greeting_in_the_same_segment_as_the_200_is_not_lost(
    smtp_server: MakeServer, connect_proxy: Callable[..., ConnectProxy]
) -> None:
    server = smtp_server()
    proxy = connect_proxy(pack_greeting=True)
    [result] = await send(plain_relay(server, proxy.url))
    assert result.status == "delivered", result


@pytest.mark.anyio
async def test_http_proxy_refusals_are_clear_connect_errors(
    smtp_server: MakeServer, connect_proxy: Callable[..., ConnectProxy]
) -> None:
    server = smtp_server()
    proxy = connect_proxy(credentials=(USER, PASSWORD))
    label = f"http proxy 127.0.0.1:{proxy.port}"
    [no_credentials] = await send(plain_relay(server, proxy.url))
    wrong = f"http://{USER}:not-{PASSWORD}@127.0.0.1:{proxy.port}"
    [wrong_password] = await send(plain_relay(server, wrong))
    unreachable = asmtp.Relay(
        "127.0.0.1",
        free_port(),
        tls="none",
        proxy=f"http://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}",
    )
    [bad_gateway] = await send(unreachable)
    assert [(r.status, r.stage, r.message) for r in (no_credentials, wrong_password)] == [
        (
            "transient",
            "connect",
            f"cannot connect to {server.host} through {label}: "
            "407 Proxy Authentication Required (credentials needed)",
        ),
        (
            "transient",
            "connect",
            f"cannot connect to {server.host} through {label}: "
            "407 Proxy Authentication Required (credentials refused)",
        ),
    ]
    assert bad_gateway.message.endswith(f"through {label}: 502 Bad Gateway")
    assert server.sessions_opened == 0


@pytest.mark.anyio
async def test_http_proxy_down_names_the_proxy() -> None:
    down = free_port()
    relay = asmtp.Relay("smtp.example.com", tls="none", proxy=f"http://127.0.0.1:{down}")
    [result] = await send(relay)
    assert (result.status, result.stage) == ("transient", "connect")
    assert result.message == f"connection to http proxy 127.0.0.1:{down} refused"


# --------------------------------------------------------------------------- sock=


@pytest.mark.anyio
async def test_a_session_on_a_socket_the_caller_connected(
    smtp_server: MakeServer,
    ca: trustme.CA,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(starttls_context=server_ssl_context(ca, "smtp.own-tunnel.test"))
    sock = socket.create_connection(server.address, timeout=TIMEOUT)
    # the relay says who the server is (TLS is checked against that name); no port used
    relay = asmtp.Relay("smtp.own-tunnel.test", 1, ssl_context=tls_client_context)
    async with asmtp.connect(relay, sock=sock, timeout=TIMEOUT) as session:
        assert session.tls == "verified"
        for n in range(2):
            report = await session.sendmail(
                "sender@client.test", [f"rcpt{n}@example.test"], b"Subject: own\r\n\r\nhi\r\n"
            )
            assert report.ok
    assert sock.fileno() == -1  # the session took it, and closed it
    assert await server.idle()
    assert rcpts_of(server) == ["rcpt0@example.test", "rcpt1@example.test"]


@pytest.mark.anyio
async def test_sock_must_be_a_connected_stream_socket_and_no_proxy_too(
    smtp_server: MakeServer,
) -> None:
    server = smtp_server()
    relay = asmtp.Relay(server.host, server.port, tls="none")
    with socket.socket() as unconnected, pytest.raises(InputError, match="connected already"):
        async with asmtp.connect(relay, sock=unconnected):
            pass
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram,
        pytest.raises(InputError, match="stream socket"),
    ):
        async with asmtp.connect(relay, sock=datagram):
            pass
    with (
        socket.create_connection(server.address) as sock,
        pytest.raises(InputError, match="not both"),
    ):
        async with asmtp.connect(relay.with_(proxy="socks5://127.0.0.1:1080"), sock=sock):
            pass


# --------------------------------------------------------------------------- credentials


async def test_credentials_are_in_no_log_transcript_or_result(
    smtp_server: MakeServer,
    socks_proxy: Callable[..., SocksProxy],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    server = smtp_server()
    proxy = socks_proxy(USER, PASSWORD)
    good = plain_relay(server, proxy.url())
    bad = plain_relay(server, proxy.url(password="not-" + PASSWORD))
    with caplog.at_level(logging.DEBUG, logger="asmtp"):
        delivered = await send(good, debug=True)
        refused = await send(bad, debug=True)
    assert delivered.ok and not refused.ok
    assert "EHLO" in caplog.text  # the transcript was on
    shown = "\n".join(
        [caplog.text, *capfd.readouterr(), repr(good), repr(bad), repr(delivered), repr(refused)]
        + [str(r.as_dict()) for r in (*delivered, *refused)]
    )
    assert PASSWORD not in shown
    assert USER not in shown


def test_cli_send_and_bench_through_a_proxy_keep_the_password_out(
    smtp_server: MakeServer, socks_proxy: Callable[..., SocksProxy]
) -> None:
    server = smtp_server()
    proxy = socks_proxy(USER, PASSWORD)
    url = f"socks5://{USER}@127.0.0.1:{proxy.port}"
    env = {**os.environ, "PROXY_PW": PASSWORD}
    env.pop("COLUMNS", None)

    def asmtp_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "asmtp", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    sent = asmtp_cli(
        "send",
        "--relay", f"{server.host}:{server.port}", "--tls", "none",
        "--from", "sender@client.test", "--to", "ann@example.test",
        "--subject", "cli", "--body", "through the proxy",
        "--proxy", url, "--proxy-password-env", "PROXY_PW", "--json", "--debug",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    assert '"delivered"' in sent.stdout
    benched = asmtp_cli(
        "bench", f"{server.host}:{server.port}", "--messages", "3", "--json",
        "--proxy", url, "--proxy-password-env", "PROXY_PW",
    )  # fmt: skip
    assert benched.returncode == 0, benched.stderr
    assert rcpts_of(server).count("ann@example.test") == 1 and len(server.messages) == 4
    refused = asmtp_cli(
        "send", "--relay", "smtp.example.com", "--from", "s@client.test", "--to", "a@b.test",
        "--proxy", f"socks5://{USER}:{PASSWORD}@127.0.0.1:1080",
    )  # fmt: skip
    assert refused.returncode == 2
    assert "--proxy-password-env" in refused.stderr
    for done in (sent, benched, refused):
        assert PASSWORD not in done.stdout + done.stderr


# --------------------------------------------------------------------------- other loops


def test_trio_through_socks5_and_http_connect(
    smtp_server: MakeServer,
    socks_proxy: Callable[..., SocksProxy],
    connect_proxy: Callable[..., ConnectProxy],
) -> None:
    """asmtp.sendmail run by trio.run (the anyio driver), through each kind of proxy."""
    server = smtp_server()
    socks = socks_proxy(USER, PASSWORD)
    http = connect_proxy(pack_greeting=True)

    async def main() -> list[str]:
        assert trio.lowlevel.current_trio_token() is not None
        statuses = []
        for url in (socks.url(), http.url):
            [result] = await send(plain_relay(server, url))
            statuses.append(result.status)
        return statuses

    assert trio.run(main) == ["delivered", "delivered"]
    assert len(server.messages) == 2


def test_uvloop_through_socks5_and_http_connect(
    smtp_server: MakeServer,
    socks_proxy: Callable[..., SocksProxy],
    connect_proxy: Callable[..., ConnectProxy],
) -> None:
    """The asyncio driver on uvloop: the tunnel's socket handed to its create_connection."""
    uvloop = pytest.importorskip("uvloop")
    server = smtp_server()
    socks = socks_proxy(USER, PASSWORD)
    http = connect_proxy(pack_greeting=True)

    async def main() -> list[str]:
        statuses = []
        for url in (socks.url(), http.url):
            [result] = await send(plain_relay(server, url))
            statuses.append(result.status)
        return statuses

    assert uvloop.run(main()) == ["delivered", "delivered"]
