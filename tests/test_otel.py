"""asmtp.otel: the spans and metrics of real sends, read back from the OpenTelemetry
SDK's in-memory exporters. Sends go to real servers on loopback: the ``asmtp_outbox``
fixture, the byte-level fault server for a 421, a closed port for a refused
connection, and a DNS server naming mail exchangers for direct delivery.

Also: nothing is recorded when asmtp is not instrumented or has been uninstrumented,
no address reaches an attribute unless asked, and ``import asmtp`` never imports
OpenTelemetry.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import asmtp
import asmtp.otel
import asmtp.sync
import asmtp.testing
from asmtp._delivery import telemetry
from asmtp.testing import Outbox
from dnsserver import DNSServer
from servers import FaultServer, SMTPTestServer, free_port

# The fixture, for runs where asmtp's pytest11 entry point is not installed (yet).
asmtp_outbox = asmtp.testing.asmtp_outbox

MakeFault = Callable[..., FaultServer]
MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]

FAST = asmtp.Retry(attempts=3, backoff=0.01, jitter=0)


@dataclass
class Telemetry:
    """What asmtp reported during a test, through an SDK of the test's own."""

    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer: trace.Tracer

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name in (None, s.name)]

    def points(self, metric: str) -> list[tuple[dict[str, Any], Any]]:
        """``(attributes, value)`` of each data point of ``metric``: a number for
        counters, the number of values recorded for histograms."""
        data = self.reader.get_metrics_data()
        found: list[tuple[dict[str, Any], Any]] = []
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for m in scope.metrics:
                    if m.name != metric:
                        continue
                    for point in m.data.data_points:
                        value = (
                            point.count if isinstance(point, HistogramDataPoint) else point.value
                        )
                        found.append((dict(point.attributes or {}), value))
        return found

    def count(self, metric: str, where: Mapping[str, Any] | None = None) -> Any:
        """The sum over the data points of ``metric`` whose attributes include ``where``."""
        return sum(
            value
            for attributes, value in self.points(metric)
            if all(attributes.get(k) == v for k, v in (where or {}).items())
        )


def make_providers() -> tuple[
    TracerProvider, InMemorySpanExporter, MeterProvider, InMemoryMetricReader
]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    return tracer_provider, exporter, MeterProvider(metric_readers=[reader]), reader


Instrument = Callable[..., Telemetry]


@pytest.fixture
def instrument() -> Iterator[Instrument]:
    """``instrument(**options)``: ``asmtp.otel.instrument(**options)`` with an SDK of the
    test's own (in-memory exporters); uninstrumented at teardown."""
    providers: list[tuple[TracerProvider, MeterProvider]] = []

    def make(**options: Any) -> Telemetry:
        tracer_provider, exporter, meter_provider, reader = make_providers()
        providers.append((tracer_provider, meter_provider))
        asmtp.otel.instrument(
            tracer_provider=tracer_provider, meter_provider=meter_provider, **options
        )
        return Telemetry(exporter, reader, tracer_provider.get_tracer("the application"))

    try:
        yield make
    finally:
        asmtp.otel.uninstrument()
        for tracer_provider, meter_provider in providers:
            meter_provider.shutdown()
            tracer_provider.shutdown()


@pytest.fixture
def otel(instrument: Instrument) -> Telemetry:
    """asmtp instrumented with the defaults, for the test's own SDK."""
    return instrument()


def note(to: str | list[str]) -> Any:
    return asmtp.build_message(to=to, from_="app@example.com", subject="Hi", body="hello\n")


def attributes(span: ReadableSpan) -> Mapping[str, Any]:
    return span.attributes or {}


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


# -- one session, one recipient ----------------------------------------------------------


async def test_a_delivered_recipient(otel: Telemetry, asmtp_outbox: Outbox) -> None:
    report = await asmtp.send(note("ann@example.org"), relay=asmtp_outbox.relay)
    assert report.ok

    [session] = otel.spans("smtp.session")
    assert session.kind == SpanKind.CLIENT
    assert session.status.status_code == StatusCode.UNSET
    assert dict(attributes(session)) == {
        "server.address": "127.0.0.1",
        "server.port": asmtp_outbox.port,
        "network.transport": "tcp",
        "network.peer.address": "127.0.0.1",
        "asmtp.recipients": 1,
        "asmtp.tls": "none",
    }
    stages = [event.name for event in session.events]
    assert stages == ["connect", "greeting", "ehlo", "mail", "rcpt", "data", "message", "quit"]

    [delivery] = otel.spans("smtp.delivery")
    assert parent_of(delivery) == span_id(session)
    assert dict(attributes(delivery)) == {
        "asmtp.status": "delivered",
        "smtp.stage": "message",
        "smtp.reply.code": 250,
        "smtp.enhanced_status": "2.0.0",
        "asmtp.tls": "none",
        "server.address": "127.0.0.1",
        "server.port": asmtp_outbox.port,
    }

    assert otel.count("asmtp.messages", {"asmtp.status": "delivered", "smtp.reply.code": 250}) == 1
    assert otel.count("asmtp.sessions", {"server.address": "127.0.0.1"}) == 1
    [(where, n)] = otel.points("asmtp.session.duration")
    assert n == 1 and "error.type" not in where
    timed = {a["smtp.stage"] for a, _ in otel.points("asmtp.stage.duration")}
    assert timed == {"connect", "greeting", "ehlo", "mail", "rcpt", "data", "message", "quit"}


async def test_a_refused_rcpt(otel: Telemetry, asmtp_outbox: Outbox) -> None:
    asmtp_outbox.refuse("bob@example.org", "550 5.1.1 <bob@example.org> no such user")
    report = await asmtp.send(
        note(["ann@example.org", "bob@example.org"]), relay=asmtp_outbox.relay
    )
    assert [r.status for r in report] == ["delivered", "permanent"]

    sessions = otel.spans("smtp.session")
    assert len(sessions) == 2  # one per recipient, and neither failed as a session
    assert all(s.status.status_code == StatusCode.UNSET for s in sessions)
    [refused] = [
        s for s in otel.spans("smtp.delivery") if attributes(s)["asmtp.status"] == "permanent"
    ]
    assert {k: attributes(refused)[k] for k in ("smtp.stage", "smtp.reply.code")} == {
        "smtp.stage": "rcpt",
        "smtp.reply.code": 550,
    }
    assert attributes(refused)["smtp.enhanced_status"] == "5.1.1"
    assert attributes(refused)["error.type"] == "550"
    assert refused.status.status_code == StatusCode.ERROR
    assert refused.status.description == "permanent rcpt 550 5.1.1"  # no server text
    assert parent_of(refused) in {span_id(s) for s in sessions}

    assert otel.count("asmtp.messages", {"asmtp.status": "delivered"}) == 1
    assert otel.count("asmtp.messages", {"asmtp.status": "permanent", "smtp.stage": "rcpt"}) == 1
    assert otel.count("asmtp.messages", {"smtp.reply.code": 550}) == 1


async def test_a_refused_connection(otel: Telemetry) -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    relay = asmtp.Relay("127.0.0.1", port, tls="none", helo="client.asmtp.test")
    [result] = await asmtp.send(note("ann@example.org"), relay=relay, timeout=5)
    assert (result.status, result.stage) == ("transient", "connect")

    [session] = otel.spans("smtp.session")
    assert session.status.status_code == StatusCode.ERROR
    assert attributes(session)["error.type"] == "asmtp.errors.ConnectError"
    assert attributes(session)["smtp.stage"] == "connect"
    assert [event.name for event in session.events] == ["connect"]
    [delivery] = otel.spans("smtp.delivery")
    assert attributes(delivery)["error.type"] == "asmtp.errors.ConnectError"
    assert attributes(delivery)["asmtp.status"] == "transient"
    assert "smtp.reply.code" not in attributes(delivery)

    [(where, n)] = otel.points("asmtp.session.duration")
    assert (where["error.type"], n) == ("asmtp.errors.ConnectError", 1)
    failed = [a for a, _ in otel.points("asmtp.stage.duration") if "error.type" in a]
    assert [a["smtp.stage"] for a in failed] == ["connect"]
    assert otel.count("asmtp.messages", {"asmtp.status": "transient", "smtp.stage": "connect"}) == 1


async def test_a_421_greeting(otel: Telemetry, fault_server: MakeFault) -> None:
    server = fault_server(greeting="reply:421 4.3.2 too busy")
    relay = asmtp.Relay(server.host, server.port, tls="none", helo="client.asmtp.test")
    [result] = await asmtp.send(note("ann@example.org"), relay=relay, timeout=5)
    assert (result.status, result.code) == ("transient", 421)

    [session] = otel.spans("smtp.session")
    assert session.status.status_code == StatusCode.ERROR
    assert {
        k: attributes(session)[k]
        for k in ("error.type", "smtp.stage", "smtp.reply.code", "smtp.enhanced_status")
    } == {
        "error.type": "421",
        "smtp.stage": "greeting",
        "smtp.reply.code": 421,
        "smtp.enhanced_status": "4.3.2",
    }
    [delivery] = otel.spans("smtp.delivery")
    assert (attributes(delivery)["error.type"], attributes(delivery)["asmtp.status"]) == (
        "421",
        "transient",
    )
    assert otel.count("asmtp.session.duration", {"error.type": "421"}) == 1


# -- the Mailer: retries and pooled sessions -------------------------------------------


async def test_mailer_retries_count_once_per_retry(otel: Telemetry, asmtp_outbox: Outbox) -> None:
    asmtp_outbox.fail_next(1, "421 4.3.2 try later", stage="mail")
    async with asmtp.Mailer(asmtp_outbox.relay, retry=FAST) as mailer:
        [result] = await mailer.send(note("ann@example.org"))
    assert (result.status, result.attempts) == ("delivered", 2)

    # a session per try (the 421 ended a transaction: the session gave its result and
    # ended well); the result the caller got counted once
    assert len(otel.spans("smtp.session")) == 2
    tries = [attributes(s).get("error.type") for s in otel.spans("smtp.delivery")]
    assert tries == ["421", None]
    assert otel.count("asmtp.retries") == 1
    assert otel.count("asmtp.retries", {"asmtp.status": "transient", "smtp.reply.code": 421}) == 1
    assert otel.count("asmtp.messages") == 1
    assert otel.count("asmtp.messages", {"asmtp.status": "delivered"}) == 1


async def test_pooled_sends_and_the_pool_size(otel: Telemetry, asmtp_outbox: Outbox) -> None:
    async with asmtp.Mailer(asmtp_outbox.relay, pool=True) as mailer:
        for name in ("ann", "bob"):
            [result] = await mailer.send(note(f"{name}@example.org"))
            assert result.ok
        assert otel.count("asmtp.pool.size") == 1  # one session, reused
    assert otel.count("asmtp.pool.size") == 0  # closed with the Mailer

    assert otel.spans("smtp.session") == []  # a pooled session outlives any one request
    deliveries = otel.spans("smtp.delivery")
    assert len(deliveries) == 2
    for span in deliveries:
        assert span.kind == SpanKind.CLIENT
        assert attributes(span)["server.address"] == "127.0.0.1"
        assert attributes(span)["asmtp.status"] == "delivered"
    assert otel.count("asmtp.sessions") == 1
    assert otel.count("asmtp.session.duration") == 1  # recorded as it left the pool
    timed = {a["smtp.stage"] for a, _ in otel.points("asmtp.stage.duration")}
    assert {"connect", "greeting", "ehlo", "mail", "message", "quit"} <= timed
    assert otel.count("asmtp.messages", {"asmtp.status": "delivered"}) == 2


# -- the caller's span is the parent ------------------------------------------------------


@pytest.mark.anyio
async def test_sessions_are_children_of_the_callers_span(
    otel: Telemetry, asmtp_outbox: Outbox
) -> None:
    """The fan-out's workers run in task groups started from the caller's task: they
    carry its context (asyncio and trio alike), so each session's span is a child of
    the span current around ``await asmtp.send(...)``."""
    recipients = [f"r{i}@example.org" for i in range(6)]
    with otel.tracer.start_as_current_span("request") as request:
        report = await asmtp.send(note(recipients), relay=asmtp_outbox.relay, concurrency=3)
    assert report.ok
    with otel.tracer.start_as_current_span("another request"):
        async with asmtp.Mailer(asmtp_outbox.relay, concurrency=2) as mailer:
            with otel.tracer.start_as_current_span("mailer request") as mailer_request:
                await mailer.send(note(["x@example.org", "y@example.org"]))

    sessions = otel.spans("smtp.session")
    assert len(sessions) == 8
    by_parent = sorted(parent_of(s) or 0 for s in sessions)
    request_id = request.get_span_context().span_id
    mailer_id = mailer_request.get_span_context().span_id
    assert by_parent == sorted([request_id] * 6 + [mailer_id] * 2)
    trace_ids = {s.context.trace_id for s in sessions if s.context is not None}
    assert trace_ids == {
        request.get_span_context().trace_id,
        mailer_request.get_span_context().trace_id,
    }


async def test_pooled_sends_are_children_of_the_callers_span(
    otel: Telemetry, asmtp_outbox: Outbox
) -> None:
    async with asmtp.Mailer(asmtp_outbox.relay, pool=True) as mailer:
        for name in ("a", "b"):
            with otel.tracer.start_as_current_span(f"request {name}") as request:
                await mailer.send(note(f"{name}@example.org"))
            [delivery] = otel.spans("smtp.delivery")
            assert parent_of(delivery) == request.get_span_context().span_id
            otel.exporter.clear()


def test_sync_callers_spans_are_children_of_the_threads_span(
    otel: Telemetry, asmtp_outbox: Outbox
) -> None:
    """asmtp.sync hands each call to its background loop with the calling thread's
    context (``run_coroutine_threadsafe`` copies it), so a Django or Flask view's span
    is the parent there too."""
    with (
        asmtp.sync.Mailer(asmtp_outbox.relay) as mailer,
        otel.tracer.start_as_current_span("view") as view,
    ):
        assert asmtp.sync.send(note("ann@example.org"), relay=asmtp_outbox.relay).ok
        assert mailer.send(note("bob@example.org")).ok
    [session] = otel.spans("smtp.session")
    pooled = [s for s in otel.spans("smtp.delivery") if s.kind == SpanKind.CLIENT]
    assert [parent_of(s) for s in (session, *pooled)] == [view.get_span_context().span_id] * 2


# -- direct delivery -------------------------------------------------------------------


async def test_direct_delivery_spans(
    otel: Telemetry, dns_server: MakeDNS, smtp_server: MakeServer
) -> None:
    dns = dns_server({"example.test": "@ MX 10 mx1\nmx1 A 127.0.0.2"})
    port = free_port("127.0.0.2")
    smtp_server(host="127.0.0.2", port=port)
    settings = asmtp.Direct(
        dns_servers=[dns.spec],
        port=port,
        tls="none",
        helo="client.asmtp.test",
        rng=random.Random(1),
        dns_timeout=2.0,
        shaping=None,  # one session per job, traced as one span (kept sessions: metrics)
    )
    report = await asmtp.send(
        note(["ann@example.test", "ann@nosuch.example.test"]), relay=settings, timeout=5
    )
    assert [(r.status, r.stage) for r in report] == [("delivered", "message"), ("permanent", "dns")]

    [session] = otel.spans("smtp.session")
    assert attributes(session)["server.address"] == "mx1.example.test"
    assert attributes(session)["network.peer.address"] == "127.0.0.2"
    by_stage = {attributes(s)["smtp.stage"]: s for s in otel.spans("smtp.delivery")}
    delivered, unsent = by_stage["message"], by_stage["dns"]
    assert parent_of(delivered) == span_id(session)
    assert parent_of(unsent) is None  # no session: straight under the caller's (no) span
    assert attributes(unsent)["smtp.stage"] == "dns"
    assert attributes(unsent)["error.type"] == "asmtp.errors.NoSuchDomainError"
    assert attributes(unsent)["smtp.enhanced_status"] == "5.1.2"
    assert otel.count("asmtp.messages", {"asmtp.status": "permanent", "smtp.stage": "dns"}) == 1


# -- what is not recorded -------------------------------------------------------------


async def test_no_address_in_any_attribute_by_default(
    otel: Telemetry, asmtp_outbox: Outbox, fault_server: MakeFault
) -> None:
    asmtp_outbox.refuse("bob@example.org", "550 5.1.1 <bob@example.org> no such user")
    await asmtp.send(note(["ann@example.org", "bob@example.org"]), relay=asmtp_outbox.relay)
    server = fault_server(rcpt="reply:451 4.7.1 <cy@example.org> greylisted")
    relay = asmtp.Relay(server.host, server.port, tls="none", helo="client.asmtp.test")
    await asmtp.send(note("cy@example.org"), relay=relay, timeout=5)

    spans = otel.spans()
    assert len(spans) == 6
    seen = [str(v) for s in spans for v in attributes(s).values()]
    seen += [s.status.description or "" for s in spans]
    seen += [e.name for s in spans for e in s.events]
    seen += [str(v) for m in METRICS for a, _ in otel.points(m) for v in a.values()]
    assert not [v for v in seen if "@" in v or "ann" in v or "bob" in v or "cy" in v]


METRICS = (
    "asmtp.messages",
    "asmtp.sessions",
    "asmtp.session.duration",
    "asmtp.stage.duration",
    "asmtp.pool.size",
    "asmtp.retries",
)


async def test_the_recipient_domain_when_asked(
    instrument: Instrument, asmtp_outbox: Outbox
) -> None:
    otel = instrument(recipient_domain=True)
    await asmtp.send(note("Ann@Example.ORG"), relay=asmtp_outbox.relay)
    [delivery] = otel.spans("smtp.delivery")
    assert attributes(delivery)["smtp.recipient.domain"] == "example.org"
    assert not [v for v in attributes(delivery).values() if "@" in str(v)]
    # never in metrics: one series per domain would be unbounded
    assert [a for a, _ in otel.points("asmtp.messages")] == [
        {"asmtp.status": "delivered", "smtp.stage": "message", "smtp.reply.code": 250}
    ]


async def test_nothing_after_uninstrument(instrument: Instrument, asmtp_outbox: Outbox) -> None:
    otel = instrument()
    assert asmtp.otel.is_instrumented()
    asmtp.otel.uninstrument()
    assert not asmtp.otel.is_instrumented() and telemetry.hooks is None

    report = await asmtp.send(note("ann@example.org"), relay=asmtp_outbox.relay)
    async with asmtp.Mailer(asmtp_outbox.relay, pool=True) as mailer:
        await mailer.send(note("bob@example.org"))
    assert report.ok and len(asmtp_outbox.messages) == 2
    assert otel.spans() == []
    assert [otel.points(m) for m in METRICS] == [[]] * len(METRICS)


async def test_not_instrumented_is_the_default(asmtp_outbox: Outbox) -> None:
    """With an SDK configured by the application but asmtp not instrumented, a send
    works as ever and reports nothing."""
    assert telemetry.hooks is None
    tracer_provider, exporter, _, _ = make_providers()
    with tracer_provider.get_tracer("app").start_as_current_span("request"):
        report = await asmtp.send(note("ann@example.org"), relay=asmtp_outbox.relay)
    assert report.ok
    assert [s.name for s in exporter.get_finished_spans()] == ["request"]


#: a ``sitecustomize`` that makes OpenTelemetry impossible to import, as if not installed
NO_OTEL = """
import sys

class RefuseOpenTelemetry:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, RefuseOpenTelemetry())
"""


def python(script: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )


def test_without_opentelemetry_asmtp_sends_and_asmtp_otel_names_the_extra(
    tmp_path: Path,
) -> None:
    """Zero cost when not installed: ``import asmtp``, a send and a pooled Mailer import
    no OpenTelemetry module; only ``import asmtp.otel`` needs it, and says so."""
    (tmp_path / "sitecustomize.py").write_text(NO_OTEL)
    script = """
import asyncio, sys
import asmtp, asmtp.testing

async def main():
    with asmtp.testing.Outbox() as outbox:
        msg = asmtp.build_message(to="a@example.org", from_="b@example.com", body="x")
        report = await asmtp.send(msg, relay=outbox.relay)
        async with asmtp.Mailer(outbox.relay, pool=True) as mailer:
            [result] = await mailer.send(msg)
    print(report.ok and result.ok)

asyncio.run(main())
try:
    import asmtp.otel
except ModuleNotFoundError as exc:
    print(exc)
"""
    done = python(script, PYTHONPATH=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "True",
        "asmtp.otel needs the OpenTelemetry API: pip install 'asmtp[otel]'",
    ]


def test_instrument_uses_the_global_providers_by_default() -> None:
    """Run apart: a process sets its global providers once."""
    script = """
import asyncio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
import asmtp, asmtp.otel, asmtp.testing

asmtp.otel.instrument()  # before the SDK is set up: the API's proxies follow it
exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)
metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

async def main():
    with asmtp.testing.Outbox() as outbox:
        msg = asmtp.build_message(to="a@example.org", from_="b@example.com", body="x")
        await asmtp.send(msg, relay=outbox.relay)

asyncio.run(main())
print(sorted(s.name for s in exporter.get_finished_spans()))
names = {m.name for r in reader.get_metrics_data().resource_metrics
         for s in r.scope_metrics for m in s.metrics}
print(sorted(n for n in names if n.startswith("asmtp.")))
"""
    done = python(script)
    assert done.returncode == 0, done.stderr
    spans, names = done.stdout.splitlines()
    assert spans == "['smtp.delivery', 'smtp.session']"
    assert names == str(
        ["asmtp.messages", "asmtp.session.duration", "asmtp.sessions", "asmtp.stage.duration"]
    )


async def test_cancelled_sessions_end_their_spans(otel: Telemetry, fault_server: MakeFault) -> None:
    server = fault_server(rcpt="silence")
    relay = asmtp.Relay(server.host, server.port, tls="none", helo="client.asmtp.test")
    with anyio.move_on_after(0.5):
        await asmtp.send(note("ann@example.org"), relay=relay, timeout=30)
    [session] = otel.spans("smtp.session")
    assert session.status.status_code == StatusCode.ERROR
    assert attributes(session)["error.type"] == "asyncio.exceptions.CancelledError"
    assert otel.spans("smtp.delivery") == []  # the call was cancelled: no result made up


async def test_stages_can_be_left_out(instrument: Instrument, asmtp_outbox: Outbox) -> None:
    otel = instrument(stages=False)
    async with asmtp.Mailer(asmtp_outbox.relay, pool=True) as mailer:
        await mailer.send(note("ann@example.org"))
    await asmtp.send(note("bob@example.org"), relay=asmtp_outbox.relay)
    [session] = otel.spans("smtp.session")
    assert session.events == ()
    assert len(otel.spans("smtp.delivery")) == 2
    assert otel.points("asmtp.stage.duration") == []
    assert otel.count("asmtp.session.duration") == 2


async def test_a_session_on_a_unix_socket_says_so(otel: Telemetry) -> None:
    from aiosmtpd.controller import UnixSocketController
    from aiosmtpd.handlers import Sink
    from aiosmtpd.smtp import SMTP

    class Controller(UnixSocketController):
        def factory(self) -> SMTP:
            return SMTP(self.handler, loop=self.loop, **self.SMTP_kwargs)

    folder = Path(tempfile.mkdtemp(prefix="asmtp-otel-"))  # short: sun_path holds 107 octets
    path = str(folder / "smtp.sock")
    controller = Controller(Sink(), unix_socket=path)
    controller.start()
    try:
        report = await asmtp.send(note("ann@example.org"), relay=asmtp.Relay(path=path))
    finally:
        controller.stop()
        shutil.rmtree(folder, ignore_errors=True)
    assert report.ok
    [session] = otel.spans("smtp.session")
    where = attributes(session)
    assert (where["network.transport"], where["server.address"]) == ("unix", path)
    assert "server.port" not in where
