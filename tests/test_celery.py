"""asmtp on Celery with Redis, end to end (``pytest -m redis``): a private redis-server,
real ``asmtp worker`` processes (Celery prefork, one pool process each), and a slowed
aiosmtpd sink on loopback that records every message, when it arrived, and how many
transactions to each domain were open at once.

What must hold: every recipient exactly once across workers (a pool process
``kill -9``ed mid-run included: its chunk is handed out again, what it had done is
skipped, what it had dotted without a recorded reply is reported ``unknown``); the
rate across workers; a per-domain connection cap across workers, never exceeded at
the sink; ``asmtp send --broker`` with the output and exit codes of a local run,
resumed by running it again; ``asmtp campaign status`` and ``cancel``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from redis import Redis

import asmtp
from asmtp import celery as queue
from redis_server import RedisServer, started
from servers import free_port

pytestmark = [pytest.mark.redis, pytest.mark.timeout(150)]

WORKERS = 3


class SlowSink:
    """aiosmtpd handler: each transaction's DATA answered after ``delay`` seconds;
    records each message's recipients, arrival time, and the most transactions to
    one recipient domain open at once (from RCPT to the DATA reply)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.lock = threading.Lock()
        self.received: list[tuple[str, float]] = []
        self.open: collections.Counter[str] = collections.Counter()
        self.most_open: collections.Counter[str] = collections.Counter()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        with self.lock:
            self.open[domain] += 1
            self.most_open[domain] = max(self.most_open[domain], self.open[domain])
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        now = time.monotonic()
        with self.lock:
            for rcpt in envelope.rcpt_tos:
                self.received.append((rcpt, now))
                self.open[rcpt.rpartition("@")[2].lower()] -= 1
        return "250 2.0.0 queued"

    def counts(self) -> collections.Counter[str]:
        with self.lock:
            return collections.Counter(rcpt for rcpt, _ in self.received)


@pytest.fixture
def sink() -> Iterator[tuple[SlowSink, int]]:
    handler = SlowSink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


class Workers:
    """``asmtp worker`` processes on one Redis (``url``: another database of it), each
    in a process group of its own (the main process and its pool: one machine)."""

    def __init__(
        self,
        redis: RedisServer,
        folder: Path,
        *,
        url: str | None = None,
        options: tuple[str, ...] = (),
    ) -> None:
        self.redis = redis
        self.url = url or redis.url
        self.options = options
        self.folder = folder
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self, count: int) -> None:
        for _ in range(count):
            log = self.folder / f"worker{len(self.logs)}.log"
            self.logs.append(log)
            with log.open("wb") as out:
                self.processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "asmtp",
                            "worker",
                            "--broker",
                            self.url,
                            "--concurrency",
                            "1",
                            "--loglevel",
                            "INFO",
                            *self.options,
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "COLUMNS": "200"},
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(b" ready." in log.read_bytes() for log in self.logs):
                return
            time.sleep(0.1)
        raise AssertionError(
            "workers not ready:\n" + "\n".join(log.read_text()[-1500:] for log in self.logs)
        )

    def pool_children(self, index: int) -> list[int]:
        path = Path(f"/proc/{self.processes[index].pid}/task/{self.processes[index].pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


@pytest.fixture(scope="module")
def redis_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = started(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_url(redis_service: RedisServer) -> str:
    return redis_service.url


@pytest.fixture(scope="module")
def workers(
    redis_service: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workers]:
    pool = Workers(redis_service, tmp_path_factory.mktemp("workers"))
    pool.start(WORKERS)
    try:
        yield pool
    finally:
        pool.stop()


def message() -> bytes:
    return b"From: news@example.com\r\nSubject: hi\r\n\r\nHello\r\n"


def jobs(count: int, domains: int = 5) -> list[asmtp.Job]:
    return [
        asmtp.Job(f"user{i}@d{i % domains}.test", message(), sender="news@example.com", key=f"k{i}")
        for i in range(count)
    ]


async def follow_all(campaign: queue.Campaign) -> list[asmtp.RecipientResult]:
    return [result async for result in queue.follow(campaign)]


def relay(port: int) -> asmtp.Relay:
    return asmtp.Relay("127.0.0.1", port=port, tls="none")


async def test_campaign_exactly_once_with_a_worker_killed(
    workers: Workers, redis_url: str, sink: tuple[SlowSink, int]
) -> None:
    handler, port = sink
    handler.delay = 0.01
    app = queue.make_app(redis_url)
    count = 3000
    campaign = await queue.enqueue_async(
        app,
        "killed",
        jobs(count),
        relay=relay(port),
        chunk=250,
        concurrency=20,
        lease_ttl=3.0,
        retry=None,
    )
    assert (campaign.recipients, campaign.chunks, campaign.resumed) == (count, 12, False)
    # kill -9 one worker's pool process once it is sending
    deadline = time.monotonic() + 60
    while len(handler.received) < 400 and time.monotonic() < deadline:  # noqa: ASYNC110 (polling another process)
        await asyncio.sleep(0.02)
    [child] = workers.pool_children(0)
    os.kill(child, signal.SIGKILL)
    results = await asyncio.wait_for(follow_all(campaign), 120)
    by_key = collections.Counter(r.key for r in results)
    statuses = collections.Counter(r.status for r in results)
    received = handler.counts()
    # exactly once: no recipient arrived twice; every recipient has one final result
    assert max(received.values()) == 1
    assert set(by_key) == {f"k{i}" for i in range(count)}
    assert max(by_key.values()) == 1
    delivered = {r.recipient for r in results if r.status == "delivered"}
    unknown = {r.recipient for r in results if r.status == "unknown"}
    assert statuses["delivered"] + statuses["unknown"] == count, statuses
    assert delivered <= set(received)
    # the unknowns: at most the killed process's sessions in flight
    assert len(unknown) <= 20
    assert set(received) - delivered <= unknown
    # the journal agrees with the results
    counts = Redis.from_url(redis_url).hgetall("asmtp:{killed}:n")
    assert int(counts[b"delivered"]) == len(delivered)
    assert int(counts.get(b"dot", 0)) == 0
    # running it again resumes: nothing is sent twice, every recipient is skipped or
    # reported unknown again
    before = len(handler.received)
    again = await queue.enqueue_async(app, "killed", jobs(count), relay=relay(port), chunk=250)
    assert again.run == campaign.run + 1
    rerun = await asyncio.wait_for(follow_all(again), 60)
    assert len(handler.received) == before
    assert {r.recipient for r in rerun} == unknown
    assert all(r.status == "unknown" for r in rerun)


async def test_a_whole_machine_dies(
    redis_service: RedisServer, sink: tuple[SlowSink, int], tmp_path: Path
) -> None:
    """A worker's main process and its pool killed at once (``kill -9`` of its process
    group: the machine is lost): nobody acknowledges or rejects its chunk. A second
    worker, already running, takes the chunk up after the broker's visibility timeout
    (3 s here, ``asmtp worker --visibility-timeout``), skips what the journal says is
    done and reports ``unknown`` what was dotted without a reply."""
    handler, port = sink
    handler.delay = 0.05
    url = redis_service.url.rpartition("/")[0] + "/1"  # a queue and state of their own
    machines = Workers(redis_service, tmp_path, url=url, options=("--visibility-timeout", "3"))
    machines.start(2)
    try:
        app = queue.make_app(url)
        count, chunk, concurrency = 480, 40, 4
        campaign = await queue.enqueue_async(
            app,
            "machine",
            jobs(count),
            relay=relay(port),
            chunk=chunk,
            concurrency=concurrency,
            lease_ttl=2.0,
            retry=None,
        )
        # wait until the victim's pool process holds a chunk and has sent some of it
        [pool] = machines.pool_children(0)
        state = Redis.from_url(url)
        held: int | None = None
        deadline = time.monotonic() + 60
        while held is None and time.monotonic() < deadline:
            for key in state.scan_iter(match=f"asmtp:{{machine}}:lease:{campaign.run}:*"):
                if f":{pool}:".encode() in (state.get(key) or b"") and len(handler.received) > 20:
                    held = int(key.rpartition(b":")[2])
            await asyncio.sleep(0.01)
        assert held is not None, "the victim never held a chunk"
        os.killpg(machines.processes[0].pid, signal.SIGKILL)
        results = await asyncio.wait_for(follow_all(campaign), 90)
    finally:
        machines.stop()
    by_key = collections.Counter(r.key for r in results)
    statuses = collections.Counter(r.status for r in results)
    received = handler.counts()
    assert max(received.values()) == 1  # nothing sent twice
    assert set(by_key) == {f"k{i}" for i in range(count)} and max(by_key.values()) == 1
    assert statuses["delivered"] + statuses["unknown"] == count, statuses
    delivered = {r.recipient for r in results if r.status == "delivered"}
    unknown = {r.recipient for r in results if r.status == "unknown"}
    assert delivered <= set(received)
    assert set(received) - delivered <= unknown
    assert len(unknown) <= concurrency  # at most the dead machine's sessions in flight
    # the dead machine's chunk was taken up by the other worker and finished
    assert state.sismember(f"asmtp:{{machine}}:run:{campaign.run}:done", held)
    victim = {f"user{i}@d{i % 5}.test" for i in range(held * chunk, (held + 1) * chunk)}
    assert victim <= delivered | unknown
    counts = state.hgetall("asmtp:{machine}:n")
    assert int(counts.get(b"dot", 0)) == 0 and int(counts[b"delivered"]) == len(delivered)
    state.close()


async def test_rate_holds_across_workers(
    workers: Workers, redis_url: str, sink: tuple[SlowSink, int]
) -> None:
    handler, port = sink
    app = queue.make_app(redis_url)
    count, rate = 300, 50
    campaign = await queue.enqueue_async(
        app, "rated", jobs(count), relay=relay(port), chunk=20, rate=f"{rate}/s", lease_ttl=3.0
    )
    results = await asyncio.wait_for(follow_all(campaign), 60)
    assert [r.status for r in results] == ["delivered"] * count
    times = sorted(t for _, t in handler.received)
    # the GCRA lets a burst (100 ms worth) and each worker's batch through at once,
    # then one token every 20 ms whoever takes it: the rate holds within 10 %
    span = times[-1] - times[0]
    assert (count - 1) / span <= rate * 1.10, (count - 1) / span


async def test_per_domain_cap_across_workers(
    workers: Workers, redis_url: str, sink: tuple[SlowSink, int]
) -> None:
    handler, port = sink
    handler.delay = 0.03
    app = queue.make_app(redis_url)
    count = 240
    campaign = await queue.enqueue_async(
        app,
        "capped",
        jobs(count, domains=2),
        relay=relay(port),
        chunk=20,
        concurrency=10,
        connections_per_domain=3,
        lease_ttl=3.0,
    )
    results = await asyncio.wait_for(follow_all(campaign), 60)
    assert [r.status for r in results] == ["delivered"] * count
    assert dict(handler.most_open) == {"d0.test": 3, "d1.test": 3}


def asmtp_cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asmtp", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_send_broker_cli_output_resume_status(
    workers: Workers, redis_url: str, sink: tuple[SlowSink, int], tmp_path: Path
) -> None:
    handler, port = sink
    listing = tmp_path / "rcpts.csv"
    listing.write_text("email\n" + "".join(f"r{i}@d{i % 3}.test\n" for i in range(120)))
    send = [
        "send",
        "--relay",
        f"127.0.0.1:{port}",
        "--tls",
        "none",
        "--from",
        "news@example.com",
        "--subject",
        "hi",
        "--body",
        "Hello",
        "--recipients",
        str(listing),
        "--broker",
        redis_url,
        "--campaign",
        "cli",
        "--chunk",
        "25",
        "--json",
    ]
    first = asmtp_cli(*send)
    assert first.returncode == 0, first.stderr
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(lines) == 120 and {line["status"] for line in lines} == {"delivered"}
    assert {line["recipient"] for line in lines} == {f"r{i}@d{i % 3}.test" for i in range(120)}
    assert "120 delivered" in first.stderr
    assert max(handler.counts().values()) == 1 and len(handler.received) == 120
    # again: a new run that skips every recipient, sends nothing
    second = asmtp_cli(*send)
    assert second.returncode == 0, second.stderr
    assert second.stdout == ""
    assert "already done" in second.stderr and len(handler.received) == 120
    status = asmtp_cli("campaign", "status", "cli", "--broker", redis_url, "--json")
    assert status.returncode == 0, status.stderr
    record = json.loads(status.stdout)
    assert record["counts"] == {"delivered": 120}
    assert (record["run"], record["finished"], record["skipped"]) == (2, True, 120)


async def test_cancel_stops_taking_chunks(
    workers: Workers, redis_url: str, sink: tuple[SlowSink, int]
) -> None:
    handler, port = sink
    app = queue.make_app(redis_url)
    count = 400
    campaign = await queue.enqueue_async(
        app, "cancelled", jobs(count), relay=relay(port), chunk=10, rate="40/s", lease_ttl=3.0
    )
    deadline = time.monotonic() + 30
    while len(handler.received) < 20 and time.monotonic() < deadline:  # noqa: ASYNC110 (polling another process)
        await asyncio.sleep(0.05)
    cancel = await asyncio.to_thread(
        asmtp_cli, "campaign", "cancel", "cancelled", "--broker", redis_url
    )
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout
    results = await asyncio.wait_for(follow_all(campaign), 60)
    # those under way finished, the rest were not taken
    assert 20 <= len(results) < count
    assert len(handler.received) == len(results)
    status = asmtp_cli("campaign", "status", "cancelled", "--broker", redis_url)
    assert status.returncode == 0
    assert f"delivered: {len(results)}" in status.stdout and "finished" in status.stdout


async def test_redis_restarted_mid_run(
    redis_service: RedisServer, sink: tuple[SlowSink, int], tmp_path: Path
) -> None:
    """Redis (append-only file, fsync always) stopped and started again mid-run: the
    workers reconnect, the chunks whose journal writes failed are handed out again,
    and the run ends with nothing sent twice. A chunk's task the outage left
    unacknowledged comes back after the broker's visibility timeout (10 s for these
    workers, as ``asmtp worker --visibility-timeout`` sets it; 600 s by default)."""
    handler, port = sink
    handler.delay = 0.01
    url = redis_service.url.rpartition("/")[0] + "/2"  # a queue and state of their own
    machines = Workers(redis_service, tmp_path, url=url, options=("--visibility-timeout", "10"))
    machines.start(WORKERS)
    try:
        app = queue.make_app(url)
        count = 1000
        campaign = await queue.enqueue_async(
            app,
            "restarted",
            jobs(count),
            relay=relay(port),
            chunk=100,
            concurrency=10,
            lease_ttl=3.0,
            retry=None,
        )
        deadline = time.monotonic() + 60
        while len(handler.received) < 200 and time.monotonic() < deadline:  # noqa: ASYNC110 (polling another process)
            await asyncio.sleep(0.02)
        await asyncio.to_thread(redis_service.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(redis_service.start)
        try:
            results = await asyncio.wait_for(follow_all(campaign), 120)
        except TimeoutError:  # say what the workers were doing (a hang seen twice, loaded)
            tails = "\n".join(f"{log.name}:\n{log.read_text()[-3000:]}" for log in machines.logs)
            raise AssertionError(
                f"the run did not end; {len(handler.received)} received\n{tails}"
            ) from None
    finally:
        machines.stop()
    received = handler.counts()
    assert max(received.values()) == 1  # nothing sent twice
    by_key = collections.Counter(r.key for r in results)
    assert set(by_key) == {f"k{i}" for i in range(count)} and max(by_key.values()) == 1
    delivered = {r.recipient for r in results if r.status == "delivered"}
    assert delivered <= set(received)
    assert {r.status for r in results} <= {"delivered", "unknown"}


def test_ctrl_c_stops_following_not_the_campaign(
    workers: Workers, redis_url: str, sink: tuple[SlowSink, int], tmp_path: Path
) -> None:
    handler, port = sink
    send = [
        sys.executable, "-m", "asmtp", "send", "--relay", f"127.0.0.1:{port}", "--tls", "none",
        "--from", "news@example.com", "--subject", "hi", "--body", "Hello",
        "--broker", redis_url, "--campaign", "interrupted", "--rate", "40/s",
        *(f"--to=u{i}@d{i % 3}.test" for i in range(80)),
    ]  # fmt: skip
    follower = subprocess.Popen(send, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(handler.received) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 130, err
    assert "no longer following; the campaign interrupted goes on" in err
    # the workers finish it: following it again (the same command) sees it to the end
    again = asmtp_cli(*send[3:])
    assert again.returncode == 0, again.stderr
    assert "still under way; following it" in again.stderr or "already done" in again.stderr
    assert sorted(handler.counts().values()) == [1] * 80


def test_your_own_app_and_the_sync_api(
    workers: Workers, redis_url: str, sink: tuple[SlowSink, int]
) -> None:
    """asmtp's task registered on the caller's own Celery app (no second app), its
    campaign enqueued from sync code and followed: asmtp's workers run it."""
    import celery

    handler, port = sink
    app = celery.Celery("shop", broker=redis_url, set_as_current=False)
    task = queue.register(app)
    assert task.name == queue.TASK_NAME and queue.TASK_NAME in app.tasks
    built = [asmtp.Job(f"s{i}@shop.test", message(), sender="shop@example.com") for i in range(30)]
    campaign = queue.enqueue(app, "own-app", built, relay=relay(port), chunk=7)
    assert (campaign.chunks, campaign.recipients) == (5, 30)

    async def results() -> list[asmtp.RecipientResult]:
        return await asyncio.wait_for(follow_all(campaign), 60)

    got = asyncio.run(results())
    assert sorted(r.recipient for r in got) == sorted(job.recipient for job in built)
    assert {r.status for r in got} == {"delivered"}
    assert sorted(handler.counts().values()) == [1] * 30
