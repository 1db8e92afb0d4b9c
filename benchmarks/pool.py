"""Pooled-session benchmark: one long-lived Mailer serving many small sends, as a web
service does, against a local relay that requires STARTTLS and AUTH.

This file owns the whole benchmark: the relay (aiosmtpd with STARTTLS on a throw-away
trustme certificate and AUTH PLAIN/LOGIN, in its own process, counting sessions, TLS
handshakes, AUTHs and messages), the parent that runs every client in a fresh subprocess
in interleaved rounds and measures it, the worker mode that runs one client once, and the
markdown report.

The work is the same for every client: S sends (default 1000) of one 2 KB message to one
recipient each, from T tasks (default 50) that share one sender object and each loop
"send, wait for the result, send the next" until S sends are done. The two Django rows
send the same S messages as a Django project does, from plain threads (default 20, each
sending its S/20 one after another with ``EmailMessage(...).send()``): through
``EMAIL_BACKEND = "asmtp.django.EmailBackend"`` (pooled sessions shared by every send),
and through Django's own ``django.core.mail.backends.smtp.EmailBackend`` (smtplib, a
session per send).

    python benchmarks/pool.py                        # 1000 sends, 50 tasks, 3 rounds
    python benchmarks/pool.py --sends 2000 --tasks 100 --rounds 5
    python benchmarks/pool.py --only asmtp-pool,aiosmtplib --rounds 1 --out /tmp/pool.md
    python benchmarks/pool.py --only django-asmtp,django-smtplib --threads 20

Documented peers: aiosmtplib (one connection per send), Django's SMTP backend (smtplib,
one connection per send), aiosmtpd (the relay), trustme (the certificates) and uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email
import email.policy
import json
import logging
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    HELO,
    HERE,
    HOST,
    SENDER,
    add_run_options,
    benchmark_message,
    cpu_self,
    emit,
    ensure_asmtp_importable,
    exit_reason,
    fmt,
    header,
    machine,
    percentile,
    place,
    process_cpu,
    reap,
    run_worker_process,
    select_clients,
    wait_for_quiet,
)

RELAY_NAME = "relay.bench.example.test"
USERNAME = "bench"
PASSWORD = "bench-password"
SEND_TIMEOUT = 30.0  # seconds per network step, in every client
POOL_CONNECTIONS = 10
MAX_SENDS = 100_000
MAX_TASKS = 1_000
PEER = "aiosmtplib"
DJANGO_PEER = "django-smtplib"  # the Django rows' own comparison
TARGET = 5.0  # the goal: pooled asmtp at least this many times aiosmtplib's sends/s

# name -> (event loop, what it is)
CLIENTS: dict[str, tuple[str, str]] = {
    "asmtp-pool": (
        "asyncio",
        f"asmtp.Mailer(relay, pool=asmtp.Pool(max_connections={POOL_CONNECTIONS}))",
    ),
    "asmtp-pool-uvloop": ("uvloop", "the same on uvloop"),
    "asmtp-nopool": ("asyncio", "asmtp.Mailer(relay) without a pool: one session per send"),
    "aiosmtplib": ("asyncio", "aiosmtplib.send(...) per send: one session per send"),
    "django-asmtp": (
        "threads",
        'Django\'s EmailMessage(...).send() with EMAIL_BACKEND = "asmtp.django.EmailBackend"'
        f" (one pooled asmtp.sync.Mailer, at most {POOL_CONNECTIONS} sessions)",
    ),
    "django-smtplib": (
        "threads",
        "the same with Django's django.core.mail.backends.smtp.EmailBackend (smtplib):"
        " one session per send",
    ),
}
#: the Django rows' EMAIL_BACKEND
DJANGO_BACKENDS = {
    "django-asmtp": "asmtp.django.EmailBackend",
    "django-smtplib": "django.core.mail.backends.smtp.EmailBackend",
}


# ---------------------------------------------------------------------------- the work


def build_message() -> bytes:
    """The one message every send carries: about 2 KB, CRLF line ends."""
    return benchmark_message(
        to="Benchmark user <user@example.test>",
        subject="asmtp pooled-session benchmark",
        message_id="<pool.1@bench.example.test>",
    )


def recipient(index: int) -> str:
    return f"user-{index:05d}@example.test"


# ---------------------------------------------------------------------------- the relay

#: what the relay counts; every key exists from the start, so the control thread can copy
#: the dict while the loop updates it (values change, the size never does).
STAT_KEYS = (
    "sessions",  # connections accepted (counted once, not again after STARTTLS)
    "active",
    "peak",  # most sessions open (and not yet past QUIT) at once
    "starttls",  # completed TLS handshakes
    "auth_PLAIN",
    "auth_LOGIN",
    "auth_failed",
    "messages",  # accepted at the end-of-data dot
    "rset",
    "quit",
)


def server_main(cert_file: str, key_file: str) -> int:
    """The relay: aiosmtpd on the standard asyncio loop (its STARTTLS is built on asyncio's
    own SSL protocol, which uvloop does not have). Prints ``{"port": N}`` once listening;
    then answers each ``stats`` line on stdin with its counters as one JSON line, and stops
    at the end of stdin."""
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

    logging.getLogger("mail.log").setLevel(logging.ERROR)
    stats = dict.fromkeys(STAT_KEYS, 0)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)

    class Handler:
        async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
            stats["messages"] += 1
            return "250 2.0.0 OK: queued"

        async def handle_RSET(self, server: SMTP, session: Any, envelope: Any) -> str:
            stats["rset"] += 1
            return "250 2.0.0 OK"

        async def handle_QUIT(self, server: SMTP, session: Any, envelope: Any) -> str:
            stats["quit"] += 1
            # Over once QUIT is answered: a client may open the session that replaces
            # this one before the relay has noticed the close.
            if isinstance(server, CountingSMTP):
                server.bench_closed()
            return "221 2.0.0 Bye"

        def handle_STARTTLS(self, server: SMTP, session: Any, envelope: Any) -> bool:
            stats["starttls"] += 1  # called once the handshake has completed
            return True

    def authenticate(
        server: SMTP, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        if (
            isinstance(data, LoginPassword)
            and data.login == USERNAME.encode()
            and data.password == PASSWORD.encode()
        ):
            key = f"auth_{mechanism.upper()}"
            stats[key if key in stats else "auth_PLAIN"] += 1
            return AuthResult(success=True, auth_data=USERNAME)
        stats["auth_failed"] += 1
        return AuthResult(success=False, handled=False)

    class CountingSMTP(SMTP):
        """Counts each connection once: aiosmtpd calls connection_made again, and
        connection_lost may come twice, after STARTTLS."""

        bench_state = 0  # 0 new, 1 counted open, 2 counted closed

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            if self.bench_state == 0:
                self.bench_state = 1
                stats["sessions"] += 1
                stats["active"] += 1
                stats["peak"] = max(stats["peak"], stats["active"])

        def bench_closed(self) -> None:
            if self.bench_state == 1:
                self.bench_state = 2
                stats["active"] -= 1

        def connection_lost(self, error: Exception | None) -> None:
            self.bench_closed()
            super().connection_lost(error)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        handler = Handler()
        stop = asyncio.Event()

        def factory() -> SMTP:
            # hostname given: aiosmtpd would otherwise look up the FQDN per connection;
            # loop given: it would otherwise probe for one.
            return CountingSMTP(
                handler,
                hostname=RELAY_NAME,
                tls_context=context,
                require_starttls=True,
                auth_required=True,
                auth_require_tls=True,
                authenticator=authenticate,
                decode_data=False,
                loop=loop,
            )

        server = await loop.create_server(factory, HOST, 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]

        def control() -> None:
            for line in sys.stdin:
                command = line.strip()
                if command == "stats":
                    emit(dict(stats))
                elif command == "reset-peak":  # between runs, when nothing else happens
                    stats["peak"] = stats["active"]
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=control, daemon=True).start()
        emit({"port": port})
        async with server:
            await stop.wait()

    asyncio.run(serve())
    return 0


class Relay:
    """The relay process, seen from the parent."""

    def __init__(self, tls_dir: Path, cpus: set[int] | None) -> None:
        argv = [sys.executable, str(Path(__file__).resolve()), "--server-worker"]
        argv += ["--cert", str(tls_dir / "server.pem"), "--key", str(tls_dir / "server.key")]
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr
        )
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)
        assert self.proc.stdout is not None
        killer = threading.Timer(15.0, self.proc.kill)  # it must start within 15 s
        killer.start()
        try:
            first = json.loads(self.proc.stdout.readline() or b"{}")
        finally:
            killer.cancel()
        if "port" not in first:
            raise SystemExit(f"the relay did not start: {self.exit_reason() or 'no port'}")
        self.port = int(first["port"])

    def stats(self) -> dict[str, int]:
        """The relay's counters now (empty if it has died)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(b"stats\n")
            self.proc.stdin.flush()
        except OSError:
            return {}
        line = self.proc.stdout.readline()
        return {k: int(v) for k, v in json.loads(line).items()} if line else {}

    def reset_peak(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b"reset-peak\n")
            self.proc.stdin.flush()

    def wait_for(
        self, key: str, target: int, limit: float = 2.0, *, invert: bool = False
    ) -> dict[str, int]:
        """The counters once ``key`` reaches ``target`` (falls to it, with ``invert``) or
        ``limit`` seconds pass."""
        deadline = time.monotonic() + limit
        while True:
            stats = self.stats()
            if not stats or time.monotonic() >= deadline:
                return stats
            if (stats[key] <= target) if invert else (stats[key] >= target):
                return stats
            time.sleep(0.02)

    def cpu(self) -> float:
        """The relay's CPU seconds so far (from /proc; 0 where there is none)."""
        return process_cpu(self.proc.pid)

    def exit_reason(self) -> str | None:
        return exit_reason(self.proc, self._stderr)

    def stop(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        reap(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def make_tls_material(directory: Path) -> None:
    """A throw-away CA (ca.pem, for the clients) and a certificate for 127.0.0.1 signed by
    it (server.pem, server.key, for the relay)."""
    import trustme

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(directory / "ca.pem"))
    leaf = ca.issue_cert(HOST, "localhost")
    leaf.private_key_pem.write_to_path(str(directory / "server.key"))
    with open(directory / "server.pem", "wb") as chain:
        for blob in leaf.cert_chain_pems:
            chain.write(blob.bytes())


# ---------------------------------------------------------------------------- worker side

#: one send: (delivered?, error text); the worker times each call around it.
SendOne = Callable[[int], Awaitable[tuple[bool, str]]]


@contextlib.asynccontextmanager
async def asmtp_sender(
    port: int, context: ssl.SSLContext, pooled: bool, stats: dict[str, Any]
) -> AsyncIterator[SendOne]:
    import asmtp

    relay = asmtp.Relay(
        HOST,
        port,
        username=USERNAME,
        password=PASSWORD,
        tls="starttls",
        ssl_context=context,
        helo=HELO,
    )
    pool = asmtp.Pool(max_connections=POOL_CONNECTIONS) if pooled else False
    message = build_message()
    # No retries: a failed send is counted as failed, as aiosmtplib's would be.
    async with asmtp.Mailer(relay, pool=pool, retry=None, timeout=SEND_TIMEOUT) as mailer:

        async def send_one(index: int) -> tuple[bool, str]:
            report = await mailer.send(message, sender=SENDER, recipients=[recipient(index)])
            result = report[0]
            if result.status == "delivered":
                return True, ""
            return False, f"{result.status} {result.code} at {result.stage}: {result.message}"

        try:
            yield send_one
        finally:
            stats["sessions_opened"] = mailer.sessions_opened


@contextlib.asynccontextmanager
async def aiosmtplib_sender(
    port: int, context: ssl.SSLContext, stats: dict[str, Any]
) -> AsyncIterator[SendOne]:
    import aiosmtplib

    message = build_message()

    async def send_one(index: int) -> tuple[bool, str]:
        try:
            await aiosmtplib.send(
                message,
                sender=SENDER,
                recipients=[recipient(index)],
                hostname=HOST,
                port=port,
                start_tls=True,
                username=USERNAME,
                password=PASSWORD,
                tls_context=context,
                local_hostname=HELO,
                timeout=SEND_TIMEOUT,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            return False, f"{type(exc).__name__}: {exc}"
        return True, ""

    yield send_one


def run_django_worker(
    client: str, port: int, ca_file: str, sends: int, threads: int, deadline: float
) -> dict[str, Any]:
    """One Django row, from plain threads (a Django view's, a Celery task's): thread k of
    ``threads`` sends messages k, k + threads, ... one after another, each with
    ``EmailMessage(...).send()``, which makes a backend per send as ``send_mail`` does.
    The same ready / go / result lines as :func:`run_worker`, the same result keys."""
    # Both backends verify the relay's certificate with ssl.create_default_context(),
    # which trusts the benchmark's CA through SSL_CERT_FILE (OpenSSL's default paths).
    os.environ["SSL_CERT_FILE"] = ca_file
    import django
    from django.conf import settings

    settings.configure(
        EMAIL_BACKEND=DJANGO_BACKENDS[client],
        EMAIL_HOST=HOST,
        EMAIL_PORT=port,
        EMAIL_HOST_USER=USERNAME,
        EMAIL_HOST_PASSWORD=PASSWORD,
        EMAIL_USE_TLS=True,
        EMAIL_TIMEOUT=SEND_TIMEOUT,
        DEFAULT_FROM_EMAIL=SENDER,
        ASMTP_MAILER_OPTIONS={"retry": None},  # no retries, as in every client
    )
    django.setup()
    from django.core.mail import EmailMessage, get_connection
    from django.core.mail.utils import DNS_NAME

    # The text of the other clients' message; Django builds the MIME message per send.
    parsed: Any = email.message_from_bytes(build_message(), policy=email.policy.default)
    subject, body = str(parsed["Subject"]), parsed.get_content()
    DNS_NAME.get_fqdn()  # Django's HELO name, looked up once per process: not timed
    stats: dict[str, Any] = {}
    if client == "django-asmtp":
        # The shared pooled Mailer entered (no session yet), as run_worker enters its own.
        get_connection().open()
    emit({"ready": True, "cpu": cpu_self(), "version": version_of(client)})
    if sys.stdin.readline().strip() != "go":
        return {"result": False}
    started = time.perf_counter()
    stop_at = time.monotonic() + deadline
    lock = threading.Lock()
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    counts = {"started": 0, "cut": 0}

    def send_share(first: int) -> None:
        for index in range(first, sends, threads):  # bounded: this thread's share
            if time.monotonic() >= stop_at:
                with lock:
                    counts["cut"] += 1
                return
            with lock:
                counts["started"] += 1
            start = time.perf_counter()
            try:
                sent = EmailMessage(subject, body, None, [recipient(index)]).send()
                error = "" if sent == 1 else f"send() returned {sent}"
            except Exception as exc:  # a failed send is counted, as in every client
                error = f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - start
            with lock:
                if error:
                    errors[error] += 1
                else:
                    latencies.append(elapsed)

    workers = [
        threading.Thread(target=send_share, args=(k,), name=f"sender-{k}", daemon=True)
        for k in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:  # a send under way at the deadline has its timeout to end
        worker.join(max(0.0, stop_at + SEND_TIMEOUT - time.monotonic()))
    work = time.perf_counter() - started
    work_cpu = cpu_self()
    with lock:
        timed_out = bool(counts["cut"]) or any(worker.is_alive() for worker in workers)
        delivered, failed = list(latencies), sum(errors.values())
        top = dict(errors.most_common(5))
    if client == "django-asmtp":
        import asmtp.sync

        stats["sessions_opened"] = get_connection().mailer.sessions_opened
        asmtp.sync.shutdown()  # QUIT to the pooled sessions, as the Mailer's close
    return {
        "result": True,
        "work": work,
        "work_cpu": work_cpu,
        "delivered": len(delivered),
        "failed": failed,
        "started": counts["started"],
        "timed_out": timed_out,
        "errors": top,
        "latencies": [round(x, 6) for x in delivered],
        **stats,
    }


def check_available(client: str) -> str | None:
    """None when the client can run in this interpreter, else why not."""
    try:
        if CLIENTS[client][0] == "uvloop":
            import uvloop  # noqa: F401
        if client.startswith("django"):
            import django  # noqa: F401

            if client == "django-asmtp":
                import asmtp.django
        elif client.startswith("asmtp"):
            import asmtp

            missing = [n for n in ("Mailer", "Pool", "Relay") if not hasattr(asmtp, n)]
            if missing:
                return f"asmtp has no {', '.join(missing)}"
        else:
            import aiosmtplib  # noqa: F401
    except ImportError as exc:
        return f"cannot import: {exc}"
    return None


def version_of(client: str) -> str:
    """The client's library and version ("; " between several)."""
    if client.startswith("django"):
        import django

        version = f"Django {django.__version__}"
        if client == "django-asmtp":
            import asmtp

            version = f"asmtp {getattr(asmtp, '__version__', '?')}; {version}"
        return version
    if client.startswith("asmtp"):
        import asmtp

        return f"asmtp {getattr(asmtp, '__version__', '?')}"
    import aiosmtplib

    return f"aiosmtplib {aiosmtplib.__version__}"


async def run_worker(
    client: str, port: int, ca_file: str, sends: int, tasks: int, deadline: float
) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=ca_file)
    stats: dict[str, Any] = {}
    if client.startswith("asmtp"):
        sender = asmtp_sender(port, context, client.startswith("asmtp-pool"), stats)
    else:
        sender = aiosmtplib_sender(port, context, stats)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    next_index = 0
    timed_out = False
    async with sender as send_one:
        # Ready: imports done, TLS context built, the Mailer entered (its pool is empty:
        # sessions open lazily, within the measured work).
        emit({"ready": True, "cpu": cpu_self(), "version": version_of(client)})
        loop = asyncio.get_running_loop()
        if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
            return {"result": False}
        started = time.perf_counter()

        async def task() -> None:
            nonlocal next_index
            while next_index < sends:  # bounded: every turn takes one of the S sends
                index = next_index
                next_index += 1
                start = time.perf_counter()
                ok, error = await send_one(index)
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[error] += 1

        try:
            async with asyncio.timeout(deadline):
                await asyncio.gather(*(task() for _ in range(tasks)))
        except TimeoutError:
            timed_out = True
        work = time.perf_counter() - started
        work_cpu = cpu_self()
    return {
        "result": True,
        "work": work,
        "work_cpu": work_cpu,
        "delivered": len(latencies),
        "failed": sum(errors.values()),
        "started": next_index,
        "timed_out": timed_out,
        "errors": dict(errors.most_common(5)),
        "latencies": [round(x, 6) for x in latencies],
        **stats,
    }


def worker_main(
    client: str, port: int, ca_file: str, sends: int, tasks: int, threads: int, deadline: float
) -> int:
    """Run one client once. One JSON line each way on stdout/stdin: ``{"ready"...}`` after
    setup; wait for ``go``; ``{"result"...}`` (written after the Mailer has closed), with
    the wall and CPU time of the sends alone."""
    if client.startswith(("asmtp", "django-asmtp")):
        ensure_asmtp_importable()
    why = check_available(client)
    if why is not None:
        emit({"unavailable": why})
        return 0
    if CLIENTS[client][0] == "threads":
        result = run_django_worker(client, port, ca_file, sends, threads, deadline)
        if result.get("result"):
            emit(result)
        return 0
    coro = run_worker(client, port, ca_file, sends, tasks, deadline)
    if CLIENTS[client][0] == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    if result.get("result"):
        emit(result)
    return 0


# ---------------------------------------------------------------------------- parent side


@dataclass
class Run:
    """One client run, as measured by the parent and the relay."""

    wall: float = 0.0  # the sends alone, go to the last result, timed in the worker
    cpu: float = 0.0  # the worker's CPU seconds for the sends alone
    window: float = 0.0  # go to the result line, timed in the parent (for the busy figures)
    relay_cpu: float = 0.0
    others_cpu: float = 0.0
    delivered: int = 0
    relay_messages: int = 0
    sessions: int = 0  # connections the relay saw
    peak: int = 0  # most open at once
    starttls: int = 0
    auths: dict[str, int] = field(default_factory=dict)
    rset: int = 0
    pool_opened: int | None = None  # asmtp's own count of pooled sessions opened
    latencies: list[float] = field(default_factory=list)
    error: str = ""
    version: str = ""


@dataclass
class Row:
    runs: list[Run] = field(default_factory=list)
    unavailable: str = ""


def run_client(
    client: str, relay: Relay, ca_file: Path, args: argparse.Namespace, cpus: set[int] | None
) -> Run | str:
    """One run in a fresh interpreter; a str means the client is unavailable."""
    # The worker stops its own sends shortly before the hard timeout, so that a hang is
    # reported with what was done; the hard timeout kills it if even that does not work.
    deadline = max(1.0, args.hard_timeout - min(30.0, args.hard_timeout / 4))
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", client]
    argv += ["--port", str(relay.port), "--ca", str(ca_file), "--deadline", f"{deadline:g}"]
    argv += ["--sends", str(args.sends), "--tasks", str(args.tasks), "--threads", str(args.threads)]

    def before_go() -> tuple[dict[str, int], float]:
        relay.reset_peak()
        return relay.stats(), relay.cpu()

    worker = run_worker_process(argv, cpus, args.hard_timeout, before_go)
    if isinstance(worker, str):
        return worker
    # Until the result line: the sends and the Mailer's close (QUIT to its pooled
    # sessions), which a service pays too, once, at shutdown.
    run = Run(window=worker.elapsed, error=worker.error, version=worker.version)
    if worker.error or worker.usage is None:
        return run
    before, relay_cpu_before = worker.before
    result, usage = worker.result, worker.usage
    run.wall = float(result["work"])
    run.cpu = float(result["work_cpu"]) - float(worker.ready["cpu"])
    run.delivered = int(result["delivered"])
    run.latencies = [float(x) for x in result["latencies"]]
    if "sessions_opened" in result and client in (
        "asmtp-pool",
        "asmtp-pool-uvloop",
        "django-asmtp",
    ):
        run.pool_opened = int(result["sessions_opened"])
    # The relay may count the last message or closed session a moment after the
    # client has moved on.
    after = relay.wait_for("messages", before.get("messages", 0) + run.delivered)
    if after and after["active"]:
        after = relay.wait_for("active", 0, invert=True)
    if after and before:
        run.relay_messages = after["messages"] - before["messages"]
        run.sessions = after["sessions"] - before["sessions"]
        run.peak = after["peak"]
        run.starttls = after["starttls"] - before["starttls"]
        run.rset = after["rset"] - before["rset"]
        run.auths = {
            key.removeprefix("auth_"): after[key] - before[key]
            for key in ("auth_PLAIN", "auth_LOGIN", "auth_failed")
            if after[key] - before[key]
        }
    run.relay_cpu = relay.cpu() - relay_cpu_before
    client_cpu = usage.ru_utime + usage.ru_stime - float(worker.ready["cpu"])
    run.others_cpu = max(0.0, worker.busy - client_cpu - run.relay_cpu)
    problems = []
    if result["timed_out"]:
        problems.append(
            f"not finished after {deadline:g} s: {result['started']} sends started,"
            f" {run.delivered} delivered"
        )
    if result["failed"]:
        problems.append(f"{result['failed']} failed: {result['errors']}")
    if run.delivered + int(result["failed"]) != args.sends and not result["timed_out"]:
        problems.append(f"{run.delivered + int(result['failed'])} results for {args.sends}")
    run.error = "; ".join(problems)
    return run


def django_work_lines(rows: dict[str, Row], args: argparse.Namespace) -> list[str]:
    """The report's line on the Django rows' work, when the table has them."""
    if not any(client.startswith("django") for client in rows):
        return []
    return [
        f"- Django rows: the same {args.sends} sends from {args.threads} plain threads (thread"
        f" k sends messages k, k+{args.threads}, ... one after another), each"
        " `EmailMessage(subject, body, None, [one]).send()` with the same subject and text"
        " (Django builds the MIME message and makes a backend per send, as `send_mail`"
        " does), EMAIL_USE_TLS and EMAIL_HOST_USER/PASSWORD, the relay's certificate"
        " verified by both (`ssl.create_default_context()`, the benchmark's CA through"
        " SSL_CERT_FILE); `django-asmtp`: `asmtp.django.EmailBackend`, every backend sharing"
        f" one pooled asmtp.sync.Mailer (at most {POOL_CONNECTIONS} sessions);"
        " `django-smtplib`: `django.core.mail.backends.smtp.EmailBackend`, a session per"
        " send (connect, EHLO, STARTTLS, EHLO, AUTH, the transaction, QUIT)",
    ]


def rate(run: Run) -> float:
    """Delivered sends per second (a run that failed or was cut short counts what it did)."""
    return run.delivered / run.wall if run.wall > 0 else 0.0


def render(
    rows: dict[str, Row],
    *,
    args: argparse.Namespace,
    size: int,
    placement: str,
    info: dict[str, str],
    versions: dict[str, str],
) -> str:
    sends, tasks = args.sends, args.tasks
    lines = [
        *header("asmtp pooled-session benchmark", info, placement, versions),
        f"- relay: aiosmtpd {info['aiosmtpd']} on {HOST} in its own process (standard asyncio"
        f" loop), STARTTLS required (trustme {info['trustme']} certificate, ECDSA P-256),"
        " AUTH PLAIN/LOGIN required",
        f"- work: {sends} sends of one {size}-byte message to one recipient each, from {tasks}"
        " tasks sharing one sender, each sending and awaiting one send at a time;"
        f" {args.rounds} round(s), clients interleaved, order rotated each round;"
        f" pooled clients: at most {POOL_CONNECTIONS} sessions, each reused for up to 100"
        " sends (asmtp.Pool's default max_messages); no retries in any client",
        *django_work_lines(rows, args),
        "- sends/s: delivered sends / wall time from the go signal to the last send's result"
        " (timed in the client; interpreter start, imports and setup excluded, and the"
        " Mailer's closing QUITs too); median (min-max) over rounds",
        "- latency: each `await mailer.send(...)` / `await aiosmtplib.send(...)` /"
        " `EmailMessage.send()`, timed in the client around the call (so pooled rows include"
        " the wait for a free session),"
        " delivered sends of all rounds pooled",
        "- CPU: the client process's user+system seconds over the same window, per 1000"
        " delivered sends, median over rounds",
        "- sessions: connections the relay accepted per run (median; min-max when rounds"
        " differ); sends/session: relay-counted messages over those; peak: most sessions open"
        " at once (a session counts as closed once its QUIT is answered); AUTH: the mechanism"
        " the relay saw",
        "- relay CPU: the relay process's CPU seconds from the go signal to the client's"
        " result line (its share of the sessions' closing included), per 1000 delivered"
        " sends, median over rounds: 1000 over it is the most sends/s this relay could take"
        " on one core from that client, however fast the client",
        "- delivered: the client's own count over all rounds / sends (the relay's count is"
        " checked against it under Problems); relay busy: the relay's CPU time over the run's"
        " wall time (near 100% means the relay set the pace); others busy: all other CPU time"
        " on the machine in the same window, in % of one CPU",
        f"- vs {PEER}: sends/s median over {PEER}'s (standard asyncio loop) on this table;"
        " above 1 is faster",
        "",
        "| client | sends/s median (min-max) | p50 ms | p99 ms | CPU s per 1000 sends"
        " | relay CPU s per 1000 sends | sessions | sends/session | peak | AUTH | delivered"
        f" | relay busy | others busy | vs {PEER} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    medians: dict[str, float] = {}
    for client, row in rows.items():
        good = [run for run in row.runs if run.delivered]
        if good:
            medians[client] = statistics.median(rate(run) for run in good)
    peer = medians.get(PEER)
    for client, row in rows.items():
        if row.unavailable:
            lines.append(f"| {client} | unavailable: {row.unavailable} |" + " |" * 12)
            continue
        good = [run for run in row.runs if run.delivered]
        if not good:
            reason = row.runs[0].error if row.runs else "not run"
            lines.append(f"| {client} | failed: {reason} |" + " |" * 12)
            continue
        rates = [rate(run) for run in good]
        cpu = statistics.median(run.cpu / run.delivered * 1000 for run in good)
        relay_cpu = statistics.median(run.relay_cpu / run.delivered * 1000 for run in good)
        latencies = [x for run in good for x in run.latencies]
        sessions = sorted(run.sessions for run in good)
        spread = f" ({sessions[0]}-{sessions[-1]})" if sessions[0] != sessions[-1] else ""
        per_session = statistics.median(
            run.relay_messages / run.sessions if run.sessions else 0.0 for run in good
        )
        mechanisms = Counter[str]()
        for run in good:
            mechanisms.update(run.auths)
        auth = ", ".join(sorted(mechanisms)) or "none"
        delivered = sum(run.delivered for run in row.runs)
        flag = "" if all(not run.error for run in row.runs) else " (!)"
        busy = statistics.median(run.relay_cpu / run.window * 100 for run in good)
        others = statistics.median(run.others_cpu / run.window * 100 for run in good)
        ratio = f"{medians[client] / peer:.2f}x" if peer else "n/a"
        lines.append(
            f"| {client} | {fmt(medians[client], 0)} ({fmt(min(rates), 0)}-{fmt(max(rates), 0)})"
            f" | {fmt(percentile(latencies, 0.5) * 1000)}"
            f" | {fmt(percentile(latencies, 0.99) * 1000)} | {fmt(cpu, 3)} | {fmt(relay_cpu, 3)}"
            f" | {statistics.median(sessions):g}{spread} | {per_session:.1f}"
            f" | {max(run.peak for run in good)} | {auth}"
            f" | {delivered}/{sends * len(row.runs)}{flag} | {busy:.0f}% | {others:.0f}%"
            f" | {ratio} |"
        )
    pooled = medians.get("asmtp-pool")
    if pooled is not None and peer:
        verdict = "met" if pooled / peer >= TARGET else "NOT met"
        lines += [
            "",
            f"Target (asmtp-pool at least {TARGET:g}x {PEER}'s sends/s): {verdict}"
            f" ({pooled / peer:.2f}x).",
        ]
    ours, django = medians.get("django-asmtp"), medians.get(DJANGO_PEER)
    if ours is not None and django:
        lines += [
            "",
            f"Django backend, {args.threads} threads: asmtp.django.EmailBackend"
            f" {fmt(ours, 0)} sends/s, Django's smtp backend {fmt(django, 0)} sends/s:"
            f" {ours / django:.2f}x.",
        ]
    problems = []
    for client, row in rows.items():
        for i, run in enumerate(row.runs):
            notes = [run.error] if run.error else []
            if run.relay_messages != run.delivered:
                notes.append(f"the relay counted {run.relay_messages} messages")
            if run.pool_opened is not None and run.pool_opened != run.sessions:
                notes.append(f"asmtp says it opened {run.pool_opened} sessions")
            if run.starttls != run.sessions:
                notes.append(f"{run.starttls} TLS handshakes for {run.sessions} sessions")
            if notes:
                problems.append(f"- {client} round {i + 1}: " + "; ".join(notes))
    if problems:
        lines += ["", "Problems:", *problems]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="clients: " + "; ".join(f"{name}: {what}" for name, (_, what) in CLIENTS.items()),
    )
    parser.add_argument("--sends", type=int, default=1000, help="sends per run (default 1000)")
    parser.add_argument("--tasks", type=int, default=50, help="concurrent tasks (default 50)")
    parser.add_argument(
        "--threads", type=int, default=20, help="the Django rows' sending threads (default 20)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--only", action="append", help="clients to run, comma-separated; repeatable"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pool-latest.md")
    add_run_options(parser, "relay")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--server-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca", help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=270.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.sends <= MAX_SENDS:
        parser.error(f"--sends must be between 1 and {MAX_SENDS}")
    if not 1 <= args.tasks <= MAX_TASKS:
        parser.error(f"--tasks must be between 1 and {MAX_TASKS}")
    if not 1 <= args.threads <= MAX_TASKS:
        parser.error(f"--threads must be between 1 and {MAX_TASKS}")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be between 1 and 20")
    if not 1 <= args.hard_timeout <= 3600:
        parser.error("--hard-timeout must be between 1 and 3600 seconds")
    select_clients(parser, args, list(CLIENTS))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(
            args.worker, args.port, args.ca, args.sends, args.tasks, args.threads, args.deadline
        )
    if args.server_worker:
        return server_main(args.cert, args.key)

    size = len(build_message())
    # Before pinning this process changes what nproc would say.
    info = machine(("uvloop", "aiosmtpd", "trustme"))
    # The relay (and this parent, idle but for reading counters) on one CPU, each client
    # on another.
    relay_cpus, cpus, placement = place(args.pin, args.settle, "relay")

    rows = {client: Row() for client in args.clients}
    with tempfile.TemporaryDirectory(prefix="asmtp-pool-bench-") as tmp:
        tls_dir = Path(tmp)
        make_tls_material(tls_dir)
        relay = Relay(tls_dir, relay_cpus)
        print(f"relay: aiosmtpd on {HOST}:{relay.port}", file=sys.stderr)
        try:
            for round_index in range(args.rounds):
                shift = round_index % len(args.clients)
                for client in args.clients[shift:] + args.clients[:shift]:
                    row = rows[client]
                    if row.unavailable:
                        continue
                    if args.settle > 0:
                        wait_for_quiet(args.settle)
                    outcome = run_client(client, relay, tls_dir / "ca.pem", args, cpus)
                    death = relay.exit_reason()
                    if isinstance(outcome, str):
                        row.unavailable = outcome
                        print(f"{client}: unavailable ({outcome})", file=sys.stderr)
                        continue
                    if death is not None:
                        outcome.error = "; ".join(
                            x for x in (outcome.error, f"the relay {death}") if x
                        )
                    row.runs.append(outcome)
                    print(
                        f"round {round_index + 1}/{args.rounds} {client}:"
                        f" {rate(outcome):,.0f} sends/s,"
                        f" {outcome.delivered}/{args.sends} delivered,"
                        f" relay counted {outcome.relay_messages} in {outcome.sessions} sessions;"
                        f" client CPU {outcome.cpu:.2f} s, relay CPU {outcome.relay_cpu:.2f} s,"
                        f" others {outcome.others_cpu:.2f} s in {outcome.window:.2f} s"
                        + (f"; {outcome.error}" if outcome.error else ""),
                        file=sys.stderr,
                    )
                    if death is not None:
                        raise SystemExit(f"the relay {death}; stopping")
        finally:
            relay.stop()
    versions = {
        version: version
        for row in rows.values()
        for run in row.runs
        for version in run.version.split("; ")
        if version
    }
    report = render(rows, args=args, size=size, placement=placement, info=info, versions=versions)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
