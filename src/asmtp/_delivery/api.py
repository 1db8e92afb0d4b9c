"""The public entry points: :func:`sendmail` (build a message and fan it out),
:func:`send` (fan out a message the caller built) and :func:`connect` (one session the
caller drives). Every input is checked here, before any connection is made.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Literal, TextIO

import anyio

from .._core.address import parse_address_list
from .._core.message import (
    Attachment,
    InlineInput,
    ListHeadersInput,
    PreparedMessage,
    Priority,
    build_message,
    prepare_envelope,
)
from ..config import Direct, Relay, Timeouts, TimeoutSpec, check_number
from ..errors import InputError
from ..results import RecipientResult, Report
from .direct import DirectDelivery, plan_jobs
from .dispatch import Job, deliver_one, run_pool
from .session import Endpoint, Session, default_helo, enable_debug

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
    attachments = list(attachments)
    build = functools.partial(
        build_message,
        to=to,
        from_=from_,
        subject=subject,
        body=body,
        mailtype=mailtype,
        alt_text=alt_text,
        cc=cc,
        headers=headers,
        attachments=attachments,
        reply_to=reply_to,
        priority=priority,
        list_headers=list_headers,
        inline=inline,
        calendar=calendar,
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
    prepared: PreparedMessage,
    relay: Relay | Direct,
    concurrency: int,
    timeouts: Timeouts,
    debug: bool,
) -> Report:
    if debug:
        enable_debug()
    if isinstance(relay, Direct):
        direct = DirectDelivery(
            relay, timeouts, helo=relay.helo or await default_helo(), debug=debug
        )

        async def run(job: Job) -> list[RecipientResult]:
            return await direct.deliver(sender, [rcpts[i] for i in job], prepared)

        jobs = plan_jobs(rcpts, relay)
    elif isinstance(relay, Relay):
        endpoint = await Endpoint.for_relay(relay)

        async def run(job: Job) -> list[RecipientResult]:
            return await deliver_one(
                endpoint, timeouts, sender, [rcpts[i] for i in job], prepared, debug=debug
            )

        jobs = [[i] for i in range(len(rcpts))]
    results = await run_pool(len(rcpts), jobs, concurrency, run)
    return Report(tuple(results))


def _check_concurrency(concurrency: int) -> int:
    check_number("concurrency", concurrency, integer=True)
    return concurrency


@contextlib.asynccontextmanager
async def connect(
    relay: Relay,
    *,
    timeout: TimeoutSpec = 30.0,
    debug: bool = False,
) -> AsyncIterator[ConnectedSession]:
    """One session the caller drives: several transactions over one connection.

    >>> async def main() -> None:
    ...     async with asmtp.connect(asmtp.Relay("smtp.example.com")) as session:
    ...         report = await session.sendmail("me@example.com", ["you@example.org"], msg)
    """
    if not isinstance(relay, Relay):
        raise InputError(f"relay must be an asmtp.Relay: {relay!r}")
    if debug:
        enable_debug()
    endpoint = await Endpoint.for_relay(relay)
    session = Session(endpoint, Timeouts.of(timeout), debug=debug)
    try:
        await session.connect()
        yield ConnectedSession(session)
    except BaseException:
        session.abort()
        raise
    await session.quit()


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
