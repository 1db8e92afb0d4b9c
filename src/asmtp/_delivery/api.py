"""The public entry points: :func:`sendmail` (build a message and fan it out),
:func:`send` (fan out a message the caller built) and :func:`connect` (one session the
caller drives). Every input is checked here, before any connection is made.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import replace
from email.headerregistry import Address
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal, TextIO, overload

import anyio

from .._core.address import check_mailbox, parse_address_list
from .._core.message import Attachment, InlineInput, ListHeadersInput, Priority, build_message
from .._core.parts import load_attachment
from .._core.prepared import PreparedMessage, prepare_envelope
from .._core.recipients import address_key
from .._core.template import MessageOptions, Template
from ..config import Direct, Relay, Timeouts, TimeoutSpec, check_number
from ..errors import InputError, SMTPError
from ..results import RecipientResult, Report
from .direct import DirectDelivery, plan_jobs
from .dispatch import Job, run_pool, run_session
from .endpoint import Endpoint, default_helo
from .session import Session, enable_debug

__all__ = ["connect", "send", "sendmail"]

logger = logging.getLogger("asmtp")

AddressList = str | Iterable[str] | None
Headers = Mapping[str, str | None] | Iterable[tuple[str, str | None]] | None


async def sendmail(
    to: AddressList,
    from_: str,
    subject: str = "",
    body: str = "",
    mailtype: Literal["text", "html"] = "text",
    *,
    alt_text: str | None = None,
    cc: AddressList = None,
    bcc: AddressList = None,
    headers: Headers = None,
    attachments: Iterable[Attachment] = (),
    reply_to: AddressList = None,
    priority: Priority | None = None,
    list_headers: ListHeadersInput = None,
    inline: InlineInput = None,
    calendar: str | bytes | None = None,
    template: Template | None = None,
    data: Mapping[str, Any] | None = None,
    per_recipient: Mapping[str, Mapping[str, Any]] | None = None,
    relay: Relay | Direct | None,
    concurrency: int = 100,
    timeout: TimeoutSpec = 30.0,
    debug: bool = False,
    log_file: str | os.PathLike[str] | None = None,
) -> Report:
    """Send one message to every address in ``to``, ``cc`` and ``bcc``, one session
    per recipient, at most ``concurrency`` at once. Returns one result per recipient
    (in input order, a recipient named twice counted once); raises only for bad input,
    before anything is sent.

    ``attachments`` and ``inline`` images (see :func:`~asmtp._core.message.build_message`,
    like ``reply_to``, ``priority``, ``list_headers`` and ``calendar``) are read and encoded in
    a worker thread, never on the event loop; a path that is not a regular file
    (a device, FIFO, directory, socket) is an :class:`~asmtp.errors.InputError`.
    ``log_file`` is opened (for appending) before anything is sent: a path that cannot
    be opened is an :class:`~asmtp.errors.InputError`; a line per recipient is
    written once all are done.

    ``template`` (an :class:`~asmtp.Template`; the ``jinja`` extra) gives the subject
    and bodies instead of ``subject``, ``body``, ``mailtype`` and ``alt_text``, rendered
    with ``data``: one message for all. With ``per_recipient`` (each ``to`` address's
    own values, looked up before ``data``'s), each recipient gets a message rendered for
    them and addressed to them alone (no ``cc`` or ``bcc``). Every message is rendered
    before any connection: a value missing for one recipient is an
    :class:`~asmtp.errors.InputError` naming it and the recipient, and nothing is sent.
    For long lists, give :class:`~asmtp.Mailer` jobs made with :meth:`~asmtp.Template.bind`.

    >>> import asyncio, asmtp
    >>> async def main() -> None:
    ...     report = await asmtp.sendmail(
    ...         to="jack@example.org, Ann (work) <ann@example.net>",
    ...         from_="someone@example.com", subject="Hello", body="Hi!",
    ...         relay=asmtp.Relay("smtp.example.com", 587, username="u", password="p"),
    ...     )
    ...     print(report.ok)
    """
    recipients = [a for _, a in parse_address_list(to, field="to")]
    recipients += [a for _, a in parse_address_list(cc, field="cc")]
    recipients += [a for _, a in parse_address_list(bcc, field="bcc")]
    senders = parse_address_list(from_, field="from_")
    if len(senders) != 1:
        raise InputError(f"from_ must be exactly one address: {from_!r}")
    _check_template(template, data, per_recipient, subject, body, mailtype, alt_text)
    attachments = list(attachments)
    options: MessageOptions = {
        "to": to,
        "from_": from_,
        "cc": cc,
        "headers": headers,
        "attachments": attachments,
        "reply_to": reply_to,
        "priority": priority,
        "list_headers": list_headers,
        "inline": inline,
        "calendar": calendar,
    }
    build: Callable[[], EmailMessage]
    if template is not None and per_recipient is not None:
        if cc is not None or bcc is not None:
            raise InputError(
                "cc= and bcc= do not go with per_recipient=: each message is addressed "
                "to its recipient alone"
            )
        sender = senders[0][1]
        named = _named_recipients(to, per_recipient)
        each = functools.partial(_render_each, template, named, data or {}, options)
        # Reading and encoding files blocks: a worker thread does it (as below).
        prepared = await anyio.to_thread.run_sync(each) if attachments or inline else each()
        rcpts = [address for _, address, _ in named]
        return await _deliver(sender, rcpts, prepared, relay, concurrency, timeout, debug, log_file)
    if template is not None:
        build = functools.partial(template.message, data or {}, **options)
    else:
        build = functools.partial(
            build_message,
            subject=subject,
            body=body,
            mailtype=mailtype,
            alt_text=alt_text,
            **options,
        )
    # Reading and encoding files blocks: a web backend's event loop keeps serving
    # while a worker thread does it.
    message = await anyio.to_thread.run_sync(build) if attachments or inline else build()
    return await send(
        message,
        sender=senders[0][1],
        recipients=recipients,
        relay=relay,
        concurrency=concurrency,
        timeout=timeout,
        debug=debug,
        log_file=log_file,
    )


def _check_template(
    template: Template | None,
    data: Mapping[str, Any] | None,
    per_recipient: Mapping[str, Mapping[str, Any]] | None,
    subject: str,
    body: str,
    mailtype: str,
    alt_text: str | None,
) -> None:
    """Refuse texts given twice (a template and subject=/body=), values without a
    template, and values that are not mappings."""
    if template is None:
        if data is not None or per_recipient is not None:
            raise InputError("data= and per_recipient= are a template's values: give template=")
        return
    if not isinstance(template, Template):
        raise InputError(f"template must be an asmtp.Template: {template!r}")
    if subject or body or mailtype != "text" or alt_text is not None:
        raise InputError(
            "template= gives the subject and the bodies: leave out subject=, body=, "
            "mailtype= and alt_text="
        )
    if data is not None and not isinstance(data, Mapping):
        raise InputError(f"data must be a mapping of names to values: {type(data).__name__}")
    if per_recipient is not None and not isinstance(per_recipient, Mapping):
        raise InputError(
            f"per_recipient must map addresses to their values: {type(per_recipient).__name__}"
        )


def _named_recipients(
    to: AddressList, per_recipient: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, Mapping[str, Any]]]:
    """(display name, address, values) for each ``to`` recipient (one named twice
    counted once); an InputError names the recipients ``per_recipient`` has no values
    for. Addresses match as duplicates do: the domain case-insensitively."""
    values: dict[str, Mapping[str, Any]] = {}
    for key, fields in per_recipient.items():
        address = check_mailbox(key, field="per_recipient")
        if not isinstance(fields, Mapping):
            raise InputError(f"per_recipient[{key!r}] must be a mapping: {type(fields).__name__}")
        values[address_key(address)] = fields
    named: list[tuple[str, str, Mapping[str, Any]]] = []
    seen: set[str] = set()
    missing: list[str] = []
    for name, address in parse_address_list(to, field="to"):
        key = address_key(address)
        if key in seen:
            continue
        seen.add(key)
        if key not in values:
            missing.append(address)
        else:
            named.append((name, address, values[key]))
    if missing:
        raise InputError(f"per_recipient has no values for {', '.join(missing)}")
    if not named:
        raise InputError("no recipients")
    return named


def _render_each(
    template: Template,
    named: Sequence[tuple[str, str, Mapping[str, Any]]],
    data: Mapping[str, Any],
    options: MessageOptions,
) -> list[PreparedMessage]:
    """A message rendered for each recipient, addressed to them alone, as sent:
    attachments are read once for all, and each message is filled into the
    template's compiled message (built whole for one recipient alone)."""
    loaded: MessageOptions = {
        **options,
        "attachments": [load_attachment(a) for a in options.get("attachments", ())],
    }
    messages = []
    for name, address, fields in named:
        alone: MessageOptions = {**loaded, "to": str(Address(display_name=name, addr_spec=address))}
        _, prepared = template.prepared({**data, **fields}, eager=len(named) > 1, **alone)
        messages.append(prepared)
    return messages


async def send(
    message: EmailMessage | bytes,
    *,
    sender: str | None = None,
    recipients: AddressList = None,
    relay: Relay | Direct | None,
    concurrency: int = 100,
    timeout: TimeoutSpec = 30.0,
    debug: bool = False,
    log_file: str | os.PathLike[str] | None = None,
) -> Report:
    """Fan out a message the caller built (an :class:`~email.message.EmailMessage`
    or ready bytes). The envelope comes from Sender/From and To/Cc/Bcc unless
    ``sender``/``recipients`` are given; Bcc is never sent; the message is serialized
    once for all recipients. A message without Date or Message-ID gets them in what
    is sent (the caller's object is not changed), as :func:`sendmail` does.
    ``timeout`` is seconds per network step (a finite positive number), None for no
    limit, or a :class:`~asmtp.Timeouts`."""
    sender, rcpts, prepared = prepare_envelope(message, sender, recipients)
    return await _deliver(sender, rcpts, prepared, relay, concurrency, timeout, debug, log_file)


async def _deliver(
    sender: str,
    rcpts: list[str],
    prepared: PreparedMessage | Sequence[PreparedMessage],
    relay: Relay | Direct | None,
    concurrency: int,
    timeout: TimeoutSpec,
    debug: bool,
    log_file: str | os.PathLike[str] | None,
) -> Report:
    """The rest of :func:`send`, for one message or one per recipient (in order)."""
    concurrency = _check_concurrency(concurrency)
    timeouts = Timeouts.of(timeout)
    if relay is None:
        relay = Direct()
    if not isinstance(relay, (Relay, Direct)):
        raise InputError(f"relay must be an asmtp.Relay, an asmtp.Direct or None: {relay!r}")
    # The last check before any I/O on the net: a bad path sends nothing.
    log = await anyio.to_thread.run_sync(_open_log, log_file) if log_file is not None else None
    try:
        report = await _fan_out(sender, rcpts, prepared, relay, concurrency, timeouts, debug)
        if log is not None:
            await _write_log(log, report.results)
    finally:
        if log is not None:
            with contextlib.suppress(OSError):  # what could not be written was reported
                log.close()
    return report


async def _fan_out(
    sender: str,
    rcpts: list[str],
    prepared: PreparedMessage | Sequence[PreparedMessage],
    relay: Relay | Direct,
    concurrency: int,
    timeouts: Timeouts,
    debug: bool,
) -> Report:
    """``prepared``: one message for every recipient, or one each (in ``rcpts``
    order; then no two recipients share a transaction)."""
    if debug:
        enable_debug()

    def message_of(job: Job) -> PreparedMessage:
        return prepared if isinstance(prepared, PreparedMessage) else prepared[job[0]]

    if isinstance(relay, Direct):
        direct = DirectDelivery(
            relay, timeouts, helo=relay.helo or await default_helo(), debug=debug
        )

        async def by_mx(job: Job) -> tuple[list[RecipientResult], None]:
            return await direct.deliver(sender, [rcpts[i] for i in job], message_of(job)), None

        run: Callable[[Job], Awaitable[tuple[Sequence[RecipientResult], SMTPError | None]]]
        run = by_mx
        jobs: Sequence[Job]

        if not isinstance(prepared, PreparedMessage):
            relay = replace(relay, batch_per_domain=False)
        jobs = plan_jobs(rcpts, relay)
    elif isinstance(relay, Relay):
        endpoint = await Endpoint.for_relay(relay)

        def by_relay(
            job: Job,
        ) -> Coroutine[Any, Any, tuple[list[RecipientResult], SMTPError | None]]:
            # The session's own coroutine, none around it: an object and a level fewer.
            recipients = [rcpts[job[0]]]  # every job here is one recipient's (_Alone)
            return run_session(endpoint, timeouts, sender, recipients, message_of(job), debug=debug)

        run = by_relay

        jobs = _Alone(len(rcpts))
    results = await run_pool(len(rcpts), jobs, concurrency, run)
    return Report(tuple(results))


class _Alone(Sequence[tuple[int]]):
    """Every recipient in a session of its own: the jobs (0,), (1,), ... each made as the
    pool takes it, not a list per recipient made up front and kept for the whole run
    (which, besides the memory, the garbage collector walked again and again)."""

    __slots__ = ("_count",)

    def __init__(self, count: int) -> None:
        self._count = count

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> tuple[int]: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[tuple[int]]: ...
    def __getitem__(self, index: int | slice) -> tuple[int] | Sequence[tuple[int]]:
        if isinstance(index, slice):
            return [(i,) for i in range(self._count)[index]]
        return (range(self._count)[index],)

    def __iter__(self) -> Iterator[tuple[int]]:
        return zip(range(self._count))  # the tuples made in C, one at a time


def _check_concurrency(concurrency: int) -> int:
    check_number("concurrency", concurrency, integer=True)
    return concurrency


@contextlib.asynccontextmanager
async def connect(
    relay: Relay,
    *,
    timeout: TimeoutSpec = 30.0,
    debug: bool = False,
    sock: socket.socket | None = None,
) -> AsyncIterator[ConnectedSession]:
    """One session the caller drives: several transactions over one connection.

    ``sock``: a stream socket the caller has connected to the server already (through a
    tunnel of its own, say): the session runs on it instead of connecting, and closes
    it when it ends. One socket serves one session. ``relay`` still says who the server
    is (TLS is verified against ``relay.host``) and how to talk to it; its port and
    proxy play no part.

    >>> async def main() -> None:
    ...     async with asmtp.connect(asmtp.Relay("smtp.example.com")) as session:
    ...         report = await session.sendmail("me@example.com", ["you@example.org"], msg)
    """
    if not isinstance(relay, Relay):
        raise InputError(f"relay must be an asmtp.Relay: {relay!r}")
    if sock is not None:
        _check_socket(sock, relay)
    if debug:
        enable_debug()
    endpoint = await Endpoint.for_relay(relay, resolve=sock is None)
    session = Session(endpoint, Timeouts.of(timeout), debug=debug)
    try:
        await session.connect(sock)
        yield ConnectedSession(session)
    except BaseException:
        session.abort()
        raise
    await session.quit()


def _check_socket(sock: object, relay: Relay) -> None:
    """``sock=`` must be a connected stream socket, and the relay must not name a
    proxy too (the socket is connected already)."""
    if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
        raise InputError(f"sock must be a connected stream socket (socket.socket): {sock!r}")
    if relay.proxy is not None:
        raise InputError("give sock= or a relay with a proxy, not both")
    try:
        sock.getpeername()
    except OSError:
        raise InputError(f"sock must be connected already: {sock!r}") from None


class ConnectedSession:
    """A session opened by :func:`connect`."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @property
    def tls(self) -> str:
        return self._session.tls

    @property
    def capabilities(self) -> object:
        return self._session.proto.capabilities

    async def sendmail(
        self,
        sender: str,
        recipients: str | Iterable[str],
        message: EmailMessage | bytes,
    ) -> Report:
        """One mail transaction on this session: one result per recipient."""
        env_sender, rcpts, prepared = prepare_envelope(message, sender, recipients)
        results = await self._session.deliver(env_sender, rcpts, prepared)
        return Report(tuple(results))

    async def noop(self) -> None:
        """Check the session is alive (raises an :class:`~asmtp.errors.SMTPError` if not)."""
        await self._session.noop()


def format_log_line(result: RecipientResult, *, when: float | None = None) -> str:
    """One line per recipient for ``log_file``: time, pid, outcome."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(when))
    code = f" {result.code}" if result.code is not None else ""
    status = f" {result.enhanced_status}" if result.enhanced_status else ""
    host = f" host={result.host}" if result.host else ""
    return (
        f"{stamp} asmtp[{os.getpid()}]: <{result.recipient}> {result.status}{code}{status}"
        f" stage={result.stage}{host} tls={result.tls} {result.message!r}\n"
    )


def _open_log(path: str | os.PathLike[str]) -> TextIO:
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"log_file must be a path: {path!r}")
    try:
        return Path(path).open("a", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"log_file: cannot open {str(path)!r}: {exc.strerror}") from None


async def _write_log(log: TextIO, results: Sequence[RecipientResult]) -> None:
    """A line per recipient to an open log, off the event loop. The mail has gone: a
    failing write is reported in asmtp's log, and the results are still returned."""
    text = "".join(format_log_line(r) for r in results)

    def append() -> None:
        log.write(text)
        log.flush()

    try:
        await anyio.to_thread.run_sync(append)
    except OSError as exc:
        logger.error("log_file %r: cannot write: %s", log.name, exc.strerror)
