"""A campaign's shared state in Redis (asmtp._delivery.redis_state): the pure parts
(states, resume decisions, settings as JSON, token batches) in the default run, and
the journal, rates, connection leases and runs against a real redis-server on
loopback (``pytest -m redis``). The workers and Celery are tests/test_celery.py's.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator

import anyio
import pytest

import asmtp
from asmtp._core.prepared import prepare_message
from asmtp._delivery.journal_format import JournalEntry, JournalIdentity
from asmtp._delivery.redis_state import (
    CampaignSpec,
    CampaignStore,
    LeaseKeeper,
    RedisJournal,
    RedisLimits,
)
from asmtp._delivery.redis_state.campaign import message_blob, message_from_blob
from asmtp._delivery.redis_state.journal import parse_state, resume_entry
from asmtp._delivery.redis_state.keys import ACQUIRE
from asmtp._delivery.redis_state.limits import rate_batch
from asmtp._delivery.redis_state.rows import result_from_row, result_row
from asmtp._delivery.redis_state.spec import PASSWORD_ENV
from asmtp._delivery.resume import resume_action
from asmtp._delivery.retry import Rate
from asmtp.errors import InputError, JournalWriteError
from asmtp.results import Attempt, RecipientResult
from redis_server import RedisServer, redis_server

__all__ = ["redis_server"]

# -- pure: states, resume, settings ------------------------------------------------


@pytest.mark.parametrize(
    ("state", "this_run", "action"),
    [
        (None, 2, "send"),
        ("dot|1", 2, "unknown"),  # dotted in an earlier run, no reply recorded
        ("dot|2", 2, "unknown"),  # dotted by a worker of this run that died
        ("delivered|1|", 2, "skip"),
        ("permanent|1|", 2, "skip"),
        ("unknown|1|mx.test", 2, "unknown"),
        ("transient|1|", 2, "send"),  # tried and failed for now: again
        # a result of this very run (a chunk handed out twice): never a second result
        ("transient|2|", 2, "skip"),
        ("unknown|2|mx.test", 2, "skip"),
        ("delivered|2|", 2, "skip"),
    ],
)
def test_resume_decisions(state: str | None, this_run: int, action: str) -> None:
    entry = resume_entry(*parse_state(state), this_run=this_run)
    assert resume_action(entry, retry_unknown=False) == action


def test_an_unknown_keeps_its_host() -> None:
    entry = resume_entry(*parse_state("unknown|1|mx.test"), this_run=2)
    assert entry == JournalEntry("result", "unknown", "mx.test")


def test_tokens_are_taken_in_small_batches() -> None:
    assert rate_batch(Rate(50)) == (1, 5)
    assert rate_batch(Rate(5000)) == (100, 500)
    assert rate_batch(Rate(1, 3600)) == (1, 1)


def test_settings_cross_as_json_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = CampaignSpec(
        identity=JournalIdentity(campaign="spring"),
        relay=asmtp.Relay("smtp.test", port=2525, username="ann", password="s3cret"),
        concurrency=7,
        timeout=asmtp.Timeouts(connect=5.0),
        retry=asmtp.Retry(attempts=4, jitter=0),
        rate=Rate(50),
        rate_per_domain=Rate(5, 60),
        connections_per_domain=3,
        dsn=asmtp.DSN(),
        unsubscribe="https://x.test/u/{recipient}",
        verp="bounces+{token}@x.test",
        lease_ttl=5.0,
    )
    text = spec.to_json()
    assert "s3cret" not in text
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    back = CampaignSpec.from_json(text)
    assert back.relay.password == "from-env"  # type: ignore[union-attr]
    assert back == spec.__class__(**{**spec.__dict__, "relay": back.relay})
    assert back.relay == dataclasses.replace(spec.relay, password="from-env")
    direct = CampaignSpec(
        identity=JournalIdentity(campaign="d"), relay=asmtp.Direct(dns_servers=["127.0.0.1:53"])
    )
    moved = CampaignSpec.from_json(direct.to_json(), source_address="127.0.0.9")
    assert moved.relay == asmtp.Direct(dns_servers=("127.0.0.1:53",), source_address="127.0.0.9")


def test_direct_delivery_crosses_with_its_shaping() -> None:
    shaping = asmtp.Shaping(
        initial=2,
        rate=20.0,
        rules=(asmtp.Rule("busy", action="pause", code=421, text="too busy"),),
        sites=(asmtp.SiteLimits("*.big.test", max_concurrency=5),),
    )
    relay = asmtp.Direct(dns_servers=["127.0.0.1:53"], per_domain=4, shaping=shaping)
    spec = CampaignSpec(identity=JournalIdentity(campaign="direct"), relay=relay)
    back = CampaignSpec.from_json(spec.to_json())
    assert back.relay == relay
    assert isinstance(back.relay, asmtp.Direct) and back.relay.shaping is not None
    assert back.relay.shaping.rules[0].matches(421, None, "Too Busy now")  # checks ran again
    unshaped = CampaignSpec(
        identity=JournalIdentity(campaign="d"), relay=asmtp.Direct(shaping=None)
    )
    assert CampaignSpec.from_json(unshaped.to_json()).relay == asmtp.Direct(shaping=None)


def test_live_objects_are_refused() -> None:
    import ssl

    with pytest.raises(InputError, match="ssl_context"):
        CampaignSpec(
            identity=JournalIdentity(campaign="x"),
            relay=asmtp.Relay("smtp.test", ssl_context=ssl.create_default_context()),
        )
    with pytest.raises(InputError, match="connections_per_domain"):
        CampaignSpec(
            identity=JournalIdentity(campaign="x"),
            relay=asmtp.Relay("smtp.test"),
            connections_per_domain=0,
        )


def test_messages_and_results_round_trip() -> None:
    prepared = prepare_message(b"Subject: hi\n\n.dot\nbody \xc3\xa9\n")
    ref, blob = message_blob(prepared)
    back = message_from_blob(blob)
    assert (back.data, back.size, back.eight_bit, back.smtputf8) == (
        prepared.data,
        prepared.size,
        prepared.eight_bit,
        prepared.smtputf8,
    )
    assert message_blob(back)[0] == ref


@pytest.mark.parametrize(
    "result",
    [
        RecipientResult("a@x.test", "delivered", 250, "2.0.0", "queued", host="r.test", key="k"),
        RecipientResult("b@x.test", "unknown", host="mx.test", elapsed=1.25, key={"id": 7}),
        RecipientResult(
            "c@x.test",
            "transient",
            code=451,
            tried=(Attempt("mx.x.test", "127.0.0.2", "rcpt", 451, "later"),),
            key="k1",
            attempts=2,
            tls="verified",
            tls_policy="sts",
            site="mx.x.test",
        ),
        RecipientResult("d@ü.test", "permanent", 550, message="nö", stage="rcpt"),
    ],
)
def test_results_cross_the_stream_as_rows(result: RecipientResult) -> None:
    assert result_from_row(json.loads(json.dumps(result_row(result)))) == result


def test_a_lost_machines_chunk_is_looked_for_often_enough() -> None:
    from asmtp import celery as queue

    options = queue.make_app("redis://127.0.0.1:1/0").conf.broker_transport_options
    # handed out again after 10 minutes, looked for every 10 s (Redis's default: 100 s)
    assert options == {
        "visibility_timeout": 600.0,
        "unacked_restore_interval": 10.0,
        "unacked_restore_throttle": 1,
    }
    short = queue.make_app("redis://127.0.0.1:1/0", visibility_timeout=3)
    assert short.conf.broker_transport_options["unacked_restore_interval"] == 0.5
    with pytest.raises(InputError, match="visibility_timeout"):
        queue.make_app("redis://127.0.0.1:1/0", visibility_timeout=0)


# -- against a real redis-server --------------------------------------------------


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[object]:
    from redis.asyncio import Redis

    client = Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.redis
async def test_journal_records_and_resumes(redis: object) -> None:
    from redis.asyncio import Redis

    assert isinstance(redis, Redis)
    first = RedisJournal(redis, "c", 1)
    await first.dot("a", "a@x.test")
    await first.result(RecipientResult("a@x.test", "delivered", key="a"))
    await first.dot("b", "b@x.test")  # then the worker died
    await first.dot("c", "c@x.test")
    await first.result(RecipientResult("c@x.test", "transient", key="c"))
    await first.dot("d", "d@x.test")
    await first.result(RecipientResult("d@x.test", "unknown", host="mx.test", key="d"))
    await first.flush()  # a result is written without its writer waiting: flush waits
    counts = {k.decode(): int(v) for k, v in (await redis.hgetall("asmtp:{c}:n")).items()}
    assert counts == {"delivered": 1, "dot": 1, "transient": 1, "unknown": 1}
    stream = await redis.xrange("asmtp:{c}:out")
    rows = [row for _, fields in stream for row in json.loads(fields[b"rs"])]
    assert [result_from_row(row).key for row in rows] == ["a", "c", "d"]
    second = RedisJournal(redis, "c", 2)
    keys = [json.dumps(k) for k in "abcde"]
    assert await second.load(keys) == 1  # "a": done in an earlier run
    entries = second.entries
    assert [resume_action(entries.get(k), retry_unknown=False) for k in keys] == [
        "skip",
        "unknown",
        "send",
        "unknown",
        "send",
    ]
    assert entries[json.dumps("d")].host == "mx.test"


@pytest.mark.redis
async def test_dots_at_once_share_a_round_trip(redis: object) -> None:
    from redis.asyncio import Redis

    assert isinstance(redis, Redis)
    journal = RedisJournal(redis, "g", 1)
    await redis.config_resetstat()
    async with anyio.create_task_group() as tg:
        for n in range(200):
            tg.start_soon(journal.dot, f"k{n}", f"r{n}@x.test")
    stats = await redis.info("commandstats")
    calls = stats["cmdstat_evalsha"]["calls"] + stats.get("cmdstat_eval", {"calls": 0})["calls"]
    assert calls < 20  # 200 dot records in a handful of group commits
    assert int(await redis.hlen("asmtp:{g}:j")) == 200


@pytest.mark.redis
async def test_a_journal_that_cannot_be_written_fails_closed(
    redis: object, redis_server: RedisServer
) -> None:
    from redis.asyncio import Redis

    assert isinstance(redis, Redis)
    journal = RedisJournal(redis, "f", 1)
    await journal.dot("a", "a@x.test")
    redis_server.stop()
    with pytest.raises(JournalWriteError, match="cannot be written"):
        await journal.dot("b", "b@x.test")
    redis_server.start()
    with pytest.raises(JournalWriteError):  # failed once: no dot goes out unrecorded
        await journal.dot("c", "c@x.test")


@pytest.mark.redis
async def test_the_rate_holds_across_workers(redis: object) -> None:
    from redis.asyncio import Redis

    assert isinstance(redis, Redis)
    rate = Rate(200)
    limits = [
        RedisLimits(
            LeaseKeeper(redis), "r", rate=rate, rate_per_domain=None, connections_per_domain=None
        )
        for _ in range(3)
    ]
    taken: list[float] = []
    start = time.monotonic()

    async def take(limit: RedisLimits) -> None:
        with anyio.move_on_after(1.0):
            while True:
                await limit.take("x.test")
                taken.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        for limit in limits:
            for _ in range(5):
                tg.start_soon(take, limit)
    elapsed = time.monotonic() - start
    _, burst = rate_batch(rate)
    # GCRA: at most the burst plus one token per interval, whoever asks
    assert len(taken) <= burst + rate.per_second * elapsed + 1
    assert len(taken) >= rate.per_second * 0.5  # and the workers did take tokens


@pytest.mark.redis
async def test_each_domain_has_a_rate_of_its_own(redis: object) -> None:
    from redis.asyncio import Redis

    assert isinstance(redis, Redis)
    per_domain = Rate(50)
    limits = [
        RedisLimits(
            LeaseKeeper(redis),
            "pd",
            rate=None,
            rate_per_domain=per_domain,
            connections_per_domain=None,
        )
        for _ in range(2)
    ]
    taken: dict[str, int] = {"a.test": 0, "b.test": 0}
    start = time.monotonic()

    async def take(limit: RedisLimits, domain: str) -> None:
        with anyio.move_on_after(0.6):
            while True:
                await limit.take(domain)
                taken[domain] += 1

    async with anyio.create_task_group() as tg:
        for limit in limits:
            for domain in taken:
                tg.start_soon(take, limit, domain)
    elapsed = time.monotonic() - start
    _, burst = rate_batch(per_domain)
    for domain, count in taken.items():
        # each domain's own bound, whichever worker takes; neither waits for the other
        assert burst <= count <= burst + per_domain.per_second * elapsed + 1, domain


@pytest.mark.redis
async def test_the_connection_cap_holds_across_workers(redis: object) -> None:
    from redis.asyncio import Redis

    assert isinstance(redis, Redis)
    limits = [
        RedisLimits(
            LeaseKeeper(redis), "cap", rate=None, rate_per_domain=None, connections_per_domain=2
        )
        for _ in range(3)
    ]
    held = most = 0

    async def deliver(limit: RedisLimits) -> None:
        nonlocal held, most
        async with limit.connection("x.test"):
            held += 1
            most = max(most, held)
            await anyio.sleep(0.01)
            held -= 1

    async with anyio.create_task_group() as tg:
        for n in range(30):
            tg.start_soon(deliver, limits[n % 3])
    assert most == 2
    assert await redis.zcard("asmtp:{cap}:conn:x.test") == 0  # every lease given back


@pytest.mark.redis
async def test_a_dead_workers_lease_expires_a_live_ones_does_not(redis: object) -> None:
    from redis.asyncio import Redis

    assert isinstance(redis, Redis)
    key = "asmtp:{dead}:conn:x.test"
    acquire = redis.register_script(ACQUIRE)
    alive = LeaseKeeper(redis, ttl=1.0)
    lease = alive.lease_id()
    assert await acquire(keys=[key], args=[1, alive.ttl_ms, lease]) == 1
    alive.connections[lease] = key
    await anyio.sleep(0.6)
    await alive.renew()  # a live worker renews
    await anyio.sleep(0.6)  # past the first expiry
    assert await acquire(keys=[key], args=[1, 1000, "other"]) == 0
    await anyio.sleep(1.2)  # it died: no more renewals, its slot frees itself
    assert await acquire(keys=[key], args=[1, 1000, "other"]) == 1


@pytest.mark.redis
async def test_runs_of_a_campaign(redis: object) -> None:
    from redis.asyncio import Redis

    assert isinstance(redis, Redis)
    spec = CampaignSpec(identity=JournalIdentity(campaign="runs"), relay=asmtp.Relay("s.test"))
    store = CampaignStore(redis, "runs")
    assert await store.open_run(spec) == (1, False)
    # the first run is under way: running the campaign again follows it
    assert await store.open_run(spec) == (1, True)
    journal = RedisJournal(redis, "runs", 1)
    await journal.result(RecipientResult("a@x.test", "delivered", key="a"))
    await journal.flush()
    await store.enqueued(1, chunks=1, recipients=1)
    results = []

    async def follow() -> None:
        async for result in store.follow(1, poll=0.05, pace=0.01):
            results.append(result.key)

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        await anyio.sleep(0.2)
        assert results == ["a"]  # followed, not finished: the chunk is not done
        await store.chunk_done(1, 0, skipped=0)
    assert results == ["a"]
    progress = await store.progress(1)
    assert progress.finished and (progress.chunks, progress.done) == (1, 1)
    assert await store.open_run(spec) == (2, False)  # finished: a new run
    # cancelled with a chunk still being sent: no new run until it ends
    assert await store.cancel() == 2
    keeper = LeaseKeeper(redis)
    assert await keeper.take_chunk(store.chunk_lease(2, 0))
    with pytest.raises(InputError, match="still being sent"):
        await store.open_run(spec)
    await keeper.release_chunk(store.chunk_lease(2, 0))
    assert await store.open_run(spec) == (3, False)
    assert await store.counts() == {"delivered": 1}


# -- the command line's checks (no Redis needed: refused before anything is queued) ---

_SEND = ["send", "--relay", "127.0.0.1:2525", "--tls", "none", "--from", "a@x.test"]
_SEND += ["--to", "b@y.test", "--subject", "s", "--body", "b"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        ([*_SEND, "--broker", "redis://127.0.0.1:1/0"], "--broker needs --campaign"),
        ([*_SEND, "--broker", "http://x", "--campaign", "c"], "must be a redis:// URL"),
        ([*_SEND, "--chunk", "5"], "--chunk goes with --broker"),
        (
            [*_SEND, "--broker", "redis://127.0.0.1:1/0", "--campaign", "c", "--journal", "j"],
            "--journal does not go with --broker",
        ),
        (["campaign", "status", "c", "--broker", "http://x"], "must be a redis:// URL"),
        (["worker", "--broker", "amqp://x"], "must be a redis:// URL"),
    ],
)
def test_broker_options_are_checked_first(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from asmtp.cli.main import main

    assert main(argv) == 2
    assert says in capsys.readouterr().err


def test_a_visibility_timeout_is_a_number_of_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    from asmtp.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["worker", "--broker", "redis://127.0.0.1:1/0", "--visibility-timeout", "0"])
    assert exited.value.code == 2
    assert "--visibility-timeout: must be a positive number" in capsys.readouterr().err
