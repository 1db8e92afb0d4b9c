"""OpenTelemetry for asmtp: a span per SMTP session and per recipient delivery, and
metrics, through the OpenTelemetry API only (``pip install 'asmtp[otel]'``; the
application brings the SDK and its exporters)::

    import asmtp.otel

    asmtp.otel.instrument()  # the global tracer and meter providers
    ...
    asmtp.otel.uninstrument()

Owns the names, attributes and instruments asmtp reports, and their mapping from
sessions and results; the delivery modules call them through
:mod:`asmtp._delivery.telemetry`, which costs one ``if`` per hook point while nothing is
instrumented (this module is imported by nothing in asmtp).

Spans (the caller's current span is the parent: a span active around ``await
asmtp.send(...)`` or ``await mailer.send(...)`` gets asmtp's spans as children):

* ``smtp.session`` (CLIENT): one SMTP session, from connecting to QUIT, with an event
  as each stage begins (``connect``, ``greeting``, ``ehlo``, ``starttls``, ``auth``,
  ``mail``, ``rcpt``, ``data``, ``message``, ``quit``);
* ``smtp.delivery``: one recipient's delivery on that session (its child), or one send
  of a Mailer on a pooled session (CLIENT; a pooled session outlives the requests it
  serves, so it has no span of its own), or a recipient whose delivery ended before any
  session (an MX lookup that failed).

Attributes: ``server.address``, ``server.port``, ``network.transport``,
``network.peer.address`` (the address connected to, when the session had one),
``error.type`` (the reply code for a refusal, else the exception's class), and
``smtp.stage``, ``smtp.reply.code``, ``smtp.enhanced_status``, ``asmtp.status``,
``asmtp.tls``, ``asmtp.recipients`` (how many a session carried). No address, server
text or message content is recorded; ``instrument(recipient_domain=True)`` adds
``smtp.recipient.domain`` to delivery spans.

Metrics:

* ``asmtp.messages`` (counter): results as callers get them (each recipient of
  ``send``; each job of a Mailer, after its retries), by ``asmtp.status``,
  ``smtp.stage`` and ``smtp.reply.code``;
* ``asmtp.sessions`` (counter): SMTP sessions started, by ``server.address`` and
  ``server.port``;
* ``asmtp.session.duration`` (histogram, s): each session's life, with ``error.type``
  when an error ended it (a pooled session: from joining the pool to leaving it);
* ``asmtp.stage.duration`` (histogram, s): each stage, by ``smtp.stage`` (with
  ``error.type`` for the stage a session failed in);
* ``asmtp.pool.size`` (up-down counter): sessions open in Mailer pools;
* ``asmtp.retries`` (counter): the Mailer's retries, by the status, stage and reply code
  of the try that is retried.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final, Literal

try:
    from opentelemetry import metrics, trace
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind, Status, StatusCode
    from opentelemetry.util.types import AttributeValue
except ModuleNotFoundError as exc:  # an extra, not a dependency of asmtp: say which
    raise ModuleNotFoundError(
        "asmtp.otel needs the OpenTelemetry API: pip install 'asmtp[otel]'", name=exc.name
    ) from exc

from ._delivery import telemetry
from ._delivery.endpoint import Endpoint
from ._delivery.session import Session, StageObserver
from ._version import __version__
from .errors import ReplyError, SMTPError, Stage
from .results import RecipientResult

__all__ = ["instrument", "is_instrumented", "uninstrument"]

Attributes = dict[str, AttributeValue]

SCOPE: Final = "asmtp"
SESSION_SPAN: Final = "smtp.session"
DELIVERY_SPAN: Final = "smtp.delivery"
#: OpenTelemetry's value of ``error.type`` when nothing better names the error
OTHER_ERROR: Final = "_OTHER"
# Seconds: SMTP stages take milliseconds on a LAN and minutes at worst (RFC 5321 4.5.3.2).
_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def instrument(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    recipient_domain: bool = False,
    stages: bool = True,
) -> None:
    """Report asmtp's spans and metrics from now on, to the given providers (by default
    the global ones, as set with ``opentelemetry.trace.set_tracer_provider``, and those
    set later: the API hands out proxies until an SDK is configured).

    ``recipient_domain=True`` adds each recipient's domain to its delivery span (never
    to metrics). ``stages=False`` leaves out the stage events and
    ``asmtp.stage.duration``: with an SDK recording, they are about half of what
    telemetry costs a session. Calling it again replaces the providers and settings."""
    tracer = trace.get_tracer(SCOPE, __version__, tracer_provider)
    meter = metrics.get_meter(SCOPE, __version__, meter_provider)
    telemetry.hooks = _Instruments(tracer, meter, recipient_domain=recipient_domain, stages=stages)


def uninstrument() -> None:
    """Stop reporting: from now on asmtp makes no span and records no metric (a session
    already running finishes its spans)."""
    if isinstance(telemetry.hooks, _Instruments):
        telemetry.hooks = None


def is_instrumented() -> bool:
    return isinstance(telemetry.hooks, _Instruments)


# -- what is recorded -------------------------------------------------------------------


def error_type(error: BaseException | None) -> str:
    """``error.type`` for an exception: the reply code of a refusal ("421"), else the
    exception's qualified class name (``asmtp.errors.ConnectError``)."""
    if error is None:
        return OTHER_ERROR
    if isinstance(error, ReplyError):
        return str(error.code)
    cls = type(error)
    return f"{cls.__module__}.{cls.__qualname__}"


def _server(endpoint: Endpoint) -> Attributes:
    """Where the session goes, in OTel's words: a Unix socket's path is the server's
    address, with no port (``network.transport`` ``unix``)."""
    if endpoint.path is not None:
        return {"server.address": endpoint.path, "network.transport": "unix"}
    return {
        "server.address": endpoint.host,
        "server.port": endpoint.port,
        "network.transport": "tcp",
    }


def _outcome(result: RecipientResult) -> Attributes:
    """The low-cardinality attributes of a result (what metrics are counted by)."""
    attributes: Attributes = {"asmtp.status": result.status, "smtp.stage": result.stage}
    if result.code is not None:
        attributes["smtp.reply.code"] = result.code
    return attributes


def _delivery(
    result: RecipientResult, error: BaseException | None, *, port: int | None, domain: bool
) -> Attributes:
    """A delivery span's attributes: the result's, never its address or server text."""
    attributes = _outcome(result)
    attributes["asmtp.tls"] = result.tls
    if result.host is not None:
        attributes["server.address"] = result.host
        if port is not None:
            attributes["server.port"] = port
    if result.enhanced_status:
        attributes["smtp.enhanced_status"] = result.enhanced_status
    if result.status != "delivered":
        attributes["error.type"] = (
            str(result.code) if result.code is not None else error_type(error)
        )
    if domain:
        attributes["smtp.recipient.domain"] = result.recipient.rpartition("@")[2].lower()
    return attributes


def _failure(result: RecipientResult) -> Status:
    """An ERROR status saying where and with what code, in asmtp's words only."""
    words: list[str] = [result.status, result.stage]
    if result.code is not None:
        words.append(str(result.code))
    if result.enhanced_status:
        words.append(result.enhanced_status)
    return Status(StatusCode.ERROR, " ".join(words))


class _Instruments:
    """The OpenTelemetry side of :class:`asmtp._delivery.telemetry.Hooks`."""

    def __init__(
        self, tracer: trace.Tracer, meter: metrics.Meter, *, recipient_domain: bool, stages: bool
    ) -> None:
        self.tracer = tracer
        self.recipient_domain = recipient_domain
        self.stages = stages
        self.messages = meter.create_counter(
            "asmtp.messages", "{message}", "Recipients' results, as the caller gets them"
        )
        self.sessions = meter.create_counter("asmtp.sessions", "{session}", "SMTP sessions started")
        self.session_duration = _histogram(meter, "asmtp.session.duration", "SMTP sessions")
        self.stage_duration = _histogram(meter, "asmtp.stage.duration", "Stages of SMTP sessions")
        self.pool = meter.create_up_down_counter(
            "asmtp.pool.size", "{session}", "Sessions open in Mailer pools"
        )
        self.retries = meter.create_counter(
            "asmtp.retries", "{retry}", "Tries the Mailer made again after a transient failure"
        )
        # pooled sessions counted in asmtp.pool.size, with when they joined it
        self._pooled: dict[int, float] = {}

    # -- sessions of run_session

    def session(
        self, endpoint: Endpoint, recipients: Sequence[str], clock: Callable[[], float]
    ) -> _SessionWatch:
        where = _server(endpoint)
        self.sessions.add(1, where)
        attributes: Attributes = {
            **where,
            "asmtp.recipients": len(recipients),
        }
        if len(endpoint.addresses) == 1:
            attributes["network.peer.address"] = endpoint.addresses[0]
        span = self.tracer.start_span(SESSION_SPAN, kind=SpanKind.CLIENT, attributes=attributes)
        return _SessionWatch(self, where, clock, span)

    def unsent(self, results: Sequence[RecipientResult], error: SMTPError) -> None:
        for result in results:
            self._delivery_span(result, error, None, port=None)

    def _delivery_span(
        self,
        result: RecipientResult,
        error: BaseException | None,
        parent: Context | None,
        *,
        port: int | None,
        start: int | None = None,
    ) -> None:
        attributes = _delivery(result, error, port=port, domain=self.recipient_domain)
        span = self.tracer.start_span(
            DELIVERY_SPAN, parent, attributes=attributes, start_time=start
        )
        if result.status != "delivered":
            span.set_status(_failure(result))
        span.end()

    # -- results, retries

    def outcomes(self, results: Iterable[RecipientResult]) -> None:
        add = self.messages.add
        for result in results:
            add(1, _outcome(result))

    def retry(self, result: RecipientResult) -> None:
        self.retries.add(1, _outcome(result))

    # -- pooled sessions

    async def pooled_send(
        self, endpoint: Endpoint, sending: Awaitable[RecipientResult]
    ) -> RecipientResult:
        attributes: Attributes = _server(endpoint)
        span = self.tracer.start_span(DELIVERY_SPAN, kind=SpanKind.CLIENT, attributes=attributes)
        try:
            result = await sending
        except BaseException as exc:
            span.set_attribute("error.type", error_type(exc))
            span.set_status(Status(StatusCode.ERROR))
            span.end()
            raise
        if span.is_recording():
            span.set_attributes(
                _delivery(result, None, port=endpoint.port, domain=self.recipient_domain)
            )
            if result.status != "delivered":
                span.set_status(_failure(result))
        span.end()
        return result

    def pooled_session(self, endpoint: Endpoint) -> StageObserver | None:
        where = _server(endpoint)
        self.sessions.add(1, where)
        return _Stages(self, where).on_stage if self.stages else None

    def pool_size(self, endpoint: Endpoint, session: Session, change: Literal[1, -1]) -> None:
        key = id(session)
        if change > 0:
            self._pooled[key] = time.monotonic()
            self.pool.add(1, _server(endpoint))
            return
        joined = self._pooled.pop(key, None)
        if joined is not None:  # else it joined before instrument()
            where = _server(endpoint)
            self.pool.add(-1, where)
            self.session_duration.record(time.monotonic() - joined, where)


def _histogram(meter: metrics.Meter, name: str, what: str) -> metrics.Histogram:
    description = f"Duration of {what}"
    try:
        return meter.create_histogram(
            name, "s", description, explicit_bucket_boundaries_advisory=_BUCKETS
        )
    except TypeError:  # opentelemetry-api before 1.23 takes no advice on buckets
        return meter.create_histogram(name, "s", description)


class _Stages:
    """A session's stage observer: each stage's duration into ``asmtp.stage.duration``."""

    __slots__ = ("began", "instruments", "stage", "where")

    def __init__(self, instruments: _Instruments, where: Attributes) -> None:
        self.instruments = instruments
        self.where = where
        self.stage: Stage | None = None
        self.began = 0.0

    def on_stage(self, stage: Stage | Literal["idle"], at: float) -> None:
        if self.stage is not None:
            self._record(at, self.where)
        if stage == "idle":
            self.stage = None
        else:
            self.stage, self.began = stage, at

    def _record(self, now: float, where: Attributes) -> None:
        assert self.stage is not None
        self.instruments.stage_duration.record(
            now - self.began, {**where, "smtp.stage": self.stage}
        )


class _SessionWatch(_Stages):
    """One session of ``run_session``: its span, its stages (as span events too) and,
    when it ends, its recipients' delivery spans."""

    __slots__ = ("clock", "mail_at", "observer", "span", "started")

    def __init__(
        self,
        instruments: _Instruments,
        where: Attributes,
        clock: Callable[[], float],
        span: trace.Span,
    ) -> None:
        super().__init__(instruments, where)
        self.clock = clock
        self.span = span
        self.started = clock()
        self.observer: StageObserver | None = self.on_stage if instruments.stages else None
        #: when the first transaction began (wall clock, ns): its recipients' spans start there
        self.mail_at: int | None = None

    def on_stage(self, stage: Stage | Literal["idle"], at: float) -> None:
        super().on_stage(stage, at)
        if stage != "idle":
            self.span.add_event(stage)
            if stage == "mail" and self.mail_at is None:
                self.mail_at = time.time_ns()

    def end(
        self,
        session: Session,
        results: Sequence[RecipientResult],
        error: BaseException | None,
    ) -> None:
        now = self.clock()
        instruments, span, where = self.instruments, self.span, self.where
        if error is not None:
            where = {**where, "error.type": error_type(error)}
        if self.stage is not None:  # the stage the session failed in (or was cut in)
            self._record(now, where)
            self.stage = None
        instruments.session_duration.record(now - self.started, where)
        if span.is_recording():
            span.set_attribute("asmtp.tls", session.tls)
            if error is not None:
                span.set_attributes(
                    {"error.type": where["error.type"], "smtp.stage": session.stage}
                )
                if isinstance(error, ReplyError):
                    span.set_attribute("smtp.reply.code", error.code)
                    if error.enhanced_status:
                        span.set_attribute("smtp.enhanced_status", error.enhanced_status)
                span.set_status(Status(StatusCode.ERROR, f"session ended at {session.stage}"))
            parent = trace.set_span_in_context(span)
            port = session.endpoint.port
            for result in results:
                instruments._delivery_span(result, error, parent, port=port, start=self.mail_at)
        span.end()
