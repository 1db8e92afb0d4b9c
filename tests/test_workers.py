"""``asmtp send --workers N`` and :class:`asmtp.Workers`: one run on N processes of this
machine, run as people run it (``python -m asmtp`` in a subprocess, real worker
processes) against real servers on loopback: the same results as one process, a worker
or the parent killed with SIGKILL and the run resumed (counted at the server), the
global rate and a per-domain cap across the workers; and the pure decisions (which
worker a domain goes to, the sessions each gets)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import asmtp
from asmtp._delivery.worker_process import shard_of
from asmtp._delivery.workers import concurrency_shares
from dnsserver import DNSServer
from servers import SMTPTestServer, free_port, wait_until
from test_bulk_cli import (
    asmtp_send,
    finish,
    json_lines,
    last_events,
    relay,
    slow,
    start,
    summary_count,
)

MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]


def domains_for(workers: int, each: int = 2) -> list[str]:
    """Domains such that every one of ``workers`` workers gets ``each`` of them."""
    found: dict[int, list[str]] = {n: [] for n in range(workers)}
    n = 0
    while any(len(d) < each for d in found.values()):
        domain = f"d{n}.test"
        shard = found[shard_of(f"x@{domain}", workers)]
        if len(shard) < each:
            shard.append(domain)
        n += 1
    return [d for shard in found.values() for d in shard]


def recipients_file(tmp_path: Path, count: int, domains: list[str]) -> tuple[Path, list[str]]:
    everyone = [f"user{i:03d}@{domains[i % len(domains)]}" for i in range(count)]
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(everyone) + "\n", encoding="utf-8")
    return listing, everyone


def children_of(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


# ----------------------------------------------------------------------- pure decisions


def test_a_domain_is_always_one_workers() -> None:
    assert shard_of("ann@Example.ORG", 4) == shard_of("bob@example.org", 4)
    # an IDN and its punycode are one domain
    assert shard_of("a@bücher.example", 3) == shard_of("b@xn--bcher-kva.example", 3)
    assert {shard_of(f"x@d{n}.test", 1) for n in range(20)} == {0}
    spread = Counter(shard_of(f"x@d{n}.test", 4) for n in range(400))
    assert set(spread) == {0, 1, 2, 3}
    assert min(spread.values()) > 50  # not all on one worker
    # a refused row still has a worker (its job fails there, alone)
    assert shard_of("not an address", 2) in (0, 1)


def test_concurrency_is_shared_out_never_more_in_all() -> None:
    assert concurrency_shares(100, 3) == [34, 33, 33]
    assert concurrency_shares(4, 4) == [1, 1, 1, 1]
    for total in range(1, 40):
        for n in range(1, total + 1):
            shares = concurrency_shares(total, n)
            assert sum(shares) == total and min(shares) >= 1 and max(shares) - min(shares) <= 1
    with pytest.raises(asmtp.InputError, match="at least 3"):
        concurrency_shares(2, 3)


# ----------------------------------------------------------------------- the CLI


def test_two_workers_give_the_single_process_results(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    domains = domains_for(2)
    listing, everyone = recipients_file(tmp_path, 120, domains)
    refuse = lambda address: "550 5.1.1 no such user" if address.startswith("user00") else None  # noqa: E731
    runs = {}
    for name, extra in (("one", []), ("two", ["--workers", "2"])):
        server = smtp_server(rcpt_reply=refuse)
        done = asmtp_send(
            "--from", "s@example.test", "--recipients", str(listing), "--subject", "s",
            "--body", "b", *relay(server), "--concurrency", "8", "--retries", "0",
            "--journal", str(tmp_path / f"{name}.jsonl"), "--json", *extra,
        )  # fmt: skip
        assert done.returncode == 1, done.stderr  # the refused ones
        assert server.wait_idle()
        runs[name] = (done, json_lines(done.stdout), server)
    (one, one_results, one_server), (two, two_results, two_server) = runs.values()
    assert len(two_results) == len(everyone)
    assert {(r["key"], r["status"], r["code"]) for r in two_results} == {
        (r["key"], r["status"], r["code"]) for r in one_results
    }
    assert {tuple(sorted(r)) for r in two_results} == {tuple(sorted(r)) for r in one_results}
    assert sorted(m.rcpt_tos[0] for m in two_server.messages) == sorted(
        m.rcpt_tos[0] for m in one_server.messages
    )
    for label in ("delivered", "permanent"):
        assert summary_count(two.stderr, label) == summary_count(one.stderr, label) > 0
    # one journal, every recipient's result in it
    events = last_events(tmp_path / "two.jsonl")
    assert set(events) == set(everyone)
    assert all(e["event"] == "result" for e in events.values())


@pytest.mark.processes
def test_worker_killed_then_resume_loses_and_doubles_nothing(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server(data_reply=slow(0.02))
    listing, everyone = recipients_file(tmp_path, 300, domains_for(2, each=3))
    journal = tmp_path / "run.jsonl"
    argv = [
        "--from", "s@example.test", "--recipients", str(listing), "--subject", "s",
        "--body", "b", *relay(server), "--concurrency", "10", "--workers", "2",
        "--journal", str(journal), "--json",
    ]  # fmt: skip
    proc = start(*argv)
    try:
        assert wait_until(lambda: len(server.messages) >= 40, timeout=30.0)
        workers = children_of(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        stdout, stderr = finish(proc)
    finally:
        finish(proc)
    assert proc.returncode == 1, stderr
    assert server.wait_idle(10.0)
    first_run = Counter(m.rcpt_tos[0] for m in server.messages)
    results = json_lines(stdout)
    # the run still ends with one result per recipient
    assert sorted(r["key"] for r in results) == sorted(everyone)
    statuses = Counter(r["status"] for r in results)
    assert statuses["transient"] > 0, statuses  # the dead worker's share, not sent
    assert statuses["unknown"] <= 5  # at most its sessions in flight
    for r in results:
        if r["status"] == "delivered":
            assert first_run[r["key"]] == 1
        if r["status"] == "transient":
            assert first_run[r["key"]] == 0, r
            assert "worker process" in r["message"]

    resumed = asmtp_send(*argv, "--resume")
    again = {r["key"]: r for r in json_lines(resumed.stdout)}
    unknown = {r["key"] for r in results if r["status"] == "unknown"}
    assert set(again) == {r["key"] for r in results if r["status"] != "delivered"}
    for key, r in again.items():
        assert r["status"] == ("unknown" if key in unknown else "delivered"), r
    assert resumed.returncode == (1 if unknown else 0), resumed.stderr
    assert server.wait_idle()
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    for rcpt in everyone:
        if rcpt in unknown:
            assert received[rcpt] == first_run[rcpt] <= 1  # may have arrived; not resent
        else:
            assert received[rcpt] == 1, rcpt


@pytest.mark.processes
def test_parent_killed_takes_the_workers_then_resume(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server(data_reply=slow(0.02))
    listing, everyone = recipients_file(tmp_path, 200, domains_for(2))
    journal = tmp_path / "run.jsonl"
    argv = [
        "--from", "s@example.test", "--recipients", str(listing), "--subject", "s",
        "--body", "b", *relay(server), "--concurrency", "8", "--workers", "2",
        "--journal", str(journal), "--json",
    ]  # fmt: skip
    proc = start(*argv)
    try:
        assert wait_until(lambda: len(server.messages) >= 30, timeout=30.0)
        workers = children_of(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
    finally:
        finish(proc)
    assert wait_until(lambda: not any(alive(pid) for pid in workers), timeout=10.0)
    assert server.wait_idle(10.0)
    first_run = Counter(m.rcpt_tos[0] for m in server.messages)
    assert sum(first_run.values()) < len(everyone)

    before = last_events(journal)
    unknown = {k for k, e in before.items() if e["event"] == "dot"}
    assert len(unknown) <= 8
    resumed = asmtp_send(*argv, "--resume")
    assert resumed.returncode == (1 if unknown else 0), resumed.stderr
    for r in json_lines(resumed.stdout):
        assert r["status"] == ("unknown" if r["key"] in unknown else "delivered"), r
    assert server.wait_idle()
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    for rcpt in everyone:
        if rcpt in unknown:
            assert received[rcpt] == first_run[rcpt] <= 1
        else:
            assert received[rcpt] == 1, rcpt


@pytest.mark.processes
def test_worker_killed_in_a_resumed_run(smtp_server: MakeServer, tmp_path: Path) -> None:
    # A resumed run skips what the first did; the parent must number the dead worker's
    # share as the worker did (skipped jobs left out) to report the rest exactly once.
    server = smtp_server(data_reply=slow(0.02))
    listing, everyone = recipients_file(tmp_path, 300, domains_for(2, each=3))
    journal = tmp_path / "run.jsonl"
    argv = [
        "--from", "s@example.test", "--recipients", str(listing), "--subject", "s",
        "--body", "b", *relay(server), "--concurrency", "8", "--workers", "2",
        "--journal", str(journal), "--json",
    ]  # fmt: skip

    def killed(after: int, *, parent: bool) -> tuple[list[dict[str, Any]], str]:
        proc = start(*argv, *(["--resume"] if journal.exists() else []))
        try:
            assert wait_until(lambda: len(server.messages) >= after, timeout=30.0)
            target = proc.pid if parent else children_of(proc.pid)[1]
            os.kill(target, signal.SIGKILL)
            stdout, stderr = finish(proc)
        finally:
            finish(proc)
        return json_lines(stdout), stderr

    killed(60, parent=True)  # the first run: the parent killed
    done_first = {k for k, e in last_events(journal).items() if e.get("status") == "delivered"}
    assert done_first
    results, stderr = killed(len(server.messages) + 40, parent=False)
    keys = [r["key"] for r in results]
    assert sorted(keys) == sorted(set(everyone) - done_first), stderr  # one each
    assert summary_count(stderr, "skipped") == len(done_first)

    final = asmtp_send(*argv, "--resume")
    unknown = {k for k, e in last_events(journal).items() if e.get("status") == "unknown"}
    assert final.returncode == (1 if unknown else 0), final.stderr
    assert server.wait_idle()
    received = Counter(m.rcpt_tos[0] for m in server.messages)
    assert all(received[rcpt] <= 1 for rcpt in everyone)
    assert {rcpt for rcpt in everyone if received[rcpt] == 0} <= unknown


def test_ctrl_c_stops_every_worker_and_completes_the_journal(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server(data_reply=slow(0.03))
    listing, everyone = recipients_file(tmp_path, 200, domains_for(2))
    journal = tmp_path / "run.jsonl"
    proc = start(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--concurrency", "4", "--workers", "2", "--journal", str(journal),
        "--json",
    )  # fmt: skip
    try:
        assert wait_until(lambda: len(server.messages) >= 10, timeout=30.0)
        workers = children_of(proc.pid)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = finish(proc)
    finally:
        finish(proc)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    assert not any(alive(pid) for pid in workers)
    results = json_lines(stdout)
    not_attempted = summary_count(stderr, "not attempted")
    assert not_attempted > 0, (stderr, Counter(r["status"] for r in results))
    assert len(results) + not_attempted == len(everyone)
    assert all(r["status"] == "delivered" for r in results)  # those in flight finished
    events = last_events(journal)
    assert all(e["event"] == "result" for e in events.values())  # no dot left unanswered
    assert server.wait_idle()
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(r["key"] for r in results)


@pytest.mark.processes
def test_the_global_rate_holds_across_workers(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    listing, everyone = recipients_file(tmp_path, 60, domains_for(2))
    began = time.monotonic()
    done = asmtp_send(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        *relay(server), "--workers", "2", "--rate", "20/s", "--json",
    )  # fmt: skip
    elapsed = time.monotonic() - began
    assert done.returncode == 0, done.stderr
    assert len(server.messages) == len(everyone)
    # One bucket for both: a burst of 20, then 20/s: 2 s for the other 40. A bucket per
    # worker would take 0.5 s. Only a lower bound: a slow machine only adds time.
    assert elapsed >= 1.5, elapsed


def test_per_domain_cap_holds_across_workers(
    dns_server: MakeDNS, smtp_server: MakeServer, tmp_path: Path
) -> None:
    domains = domains_for(2)
    hosts = [f"127.0.0.{n + 2}" for n in range(len(domains))]
    dns = dns_server({d: f"@ MX 10 mx\nmx A {h}" for d, h in zip(domains, hosts, strict=True)})
    port = free_port(*hosts)
    servers = [smtp_server(host=h, port=port, data_reply=slow(0.05)) for h in hosts]
    listing, everyone = recipients_file(tmp_path, 80, domains)
    done = asmtp_send(
        "--from", "s@example.test", "--recipients", str(listing), "--body", "b",
        "--dns-server", dns.spec, "--mx-port", str(port), "--tls", "none",
        "--helo", "client.test", "--per-domain", "2", "--concurrency", "40",
        "--workers", "2", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert all(r["status"] == "delivered" for r in json_lines(done.stdout))
    for server in servers:
        assert server.wait_idle()
        assert len(server.messages) == len(everyone) // len(domains)
        assert 1 <= server.max_concurrent_sessions <= 2


def test_workers_option_checks(smtp_server: MakeServer) -> None:
    server = smtp_server()
    base = ["--from", "s@example.test", "--to", "a@example.test", "--body", "b", *relay(server)]
    done = asmtp_send(*base, "--workers", "4", "--concurrency", "2")
    assert done.returncode == 2
    assert "--workers 4 needs --concurrency 4" in done.stderr
    done = asmtp_send(*base, "--workers", "0")
    assert done.returncode == 2
    assert not server.messages


# ----------------------------------------------------------------------- the Python API


def test_workers_from_python(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    domains = domains_for(2)
    everyone = [f"p{i}@{domains[i % len(domains)]}" for i in range(30)]

    def jobs() -> Iterator[asmtp.Job]:
        for rcpt in everyone:
            message = asmtp.build_message(
                to=rcpt, from_="s@example.test", subject="hi", body=f"for {rcpt}"
            )
            yield asmtp.Job(rcpt, message)

    mailer = asmtp.Mailer(
        asmtp.Relay(server.host, server.port, tls="none"),
        concurrency=4,
        journal=tmp_path / "run.jsonl",
    )
    workers = asmtp.Workers(mailer, jobs, workers=2)
    assert len(workers.pids) == 2

    async def main() -> list[asmtp.RecipientResult]:
        async with workers:
            return [result async for result in workers.deliver()]

    results = asyncio.run(main())
    assert sorted(r.recipient for r in results) == sorted(everyone)
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    assert server.wait_idle()
    assert sorted(m.rcpt_tos[0] for m in server.messages) == sorted(everyone)
    assert workers.taken == len(everyone)
    assert not any(alive(pid) for pid in workers.pids)


def test_workers_refusals() -> None:
    mailer = asmtp.Mailer(asmtp.Relay("127.0.0.1", 1, tls="none"), concurrency=2)
    with pytest.raises(asmtp.InputError, match="at least 3"):
        asmtp.Workers(mailer, list, workers=3)
    with pytest.raises(asmtp.InputError, match="function"):
        asmtp.Workers(mailer, [], workers=1)  # type: ignore[arg-type]

    idle = asmtp.Workers(mailer, list, workers=2)  # never entered: closed by hand
    pids = idle.pids
    idle.close()
    assert not any(alive(pid) for pid in pids)

    async def inside_a_loop() -> Any:
        return asmtp.Workers(mailer, list, workers=1)

    with pytest.raises(asmtp.RunningLoopError, match="before the event loop"):
        asyncio.run(inside_a_loop())


def test_a_workers_mailer_keeps_every_setting_that_is_not_the_parents() -> None:
    """Each worker builds its own Mailer from the one given to Workers: every setting
    that is not the parent's to hold (the journal, the global rate, the concurrency
    shared out) must reach it, or a worker would send differently (e.g. without
    REQUIRETLS)."""
    from asmtp._delivery.worker_process import _worker_mailer

    relay = asmtp.Relay("127.0.0.1", 2525, tls="none")
    given = asmtp.Mailer(
        relay,
        timeout=7.0,
        retry=asmtp.Retry(attempts=5),
        rate_per_domain="5/s",
        recipient_deadline=60.0,
        dsn=asmtp.DSN(),
        requiretls=True,
        unsubscribe="https://example.test/u?r={recipient}",
        verp="bounces+{token}@example.test",
        suppress=["gone@example.test"],
    )
    worker = _worker_mailer(given, 3, None, None)
    kept = [
        "relay",
        "timeouts",
        "retry",
        "rate_per_domain",
        "recipient_deadline",
        "dsn",
        "requiretls",
        "unsubscribe",
        "verp",
        "dkim",
        "debug",
        "suppress",
        "pool",
    ]
    assert {name: getattr(worker, name) for name in kept} == {
        name: getattr(given, name) for name in kept
    }
    assert worker.concurrency == 3
