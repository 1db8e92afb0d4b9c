"""What a careful user hits when building and sending a message, against real servers
on loopback: attachments that are not regular files (and read off the event loop),
NUL bytes and control characters, non-finite numbers, Date and Message-ID added to a
caller's message, a Message-ID per personalised copy, and a log file opened before
anything is sent."""

from __future__ import annotations

import email
import email.policy
import os
import re
import socket
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anyio
import dkim
import dns.resolver
import pytest

import asmtp
from asmtp._core.message import build_message
from asmtp._core.prepared import MessageIdRemover, prepare_message, with_headers
from asmtp._delivery.mailer import Job
from asmtp._delivery.pool import Pool
from asmtp._delivery.retry import Rate
from dnsserver import DNSServer
from servers import SMTPTestServer

MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]

NAN = float("nan")
INF = float("inf")
# RFC 5322 3.6.4 msg-id as email.utils.make_msgid writes it: <left@domain>
MSG_ID = r"<[^<>@\s]+@[A-Za-z0-9.-]+>"


def relay_to(server: SMTPTestServer) -> asmtp.Relay:
    return asmtp.Relay(server.host, server.port, tls="none", helo="hardening.asmtp.test")


def parsed(content: bytes) -> EmailMessage:
    message = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def text_of(part: EmailMessage) -> str:
    """A text part's content with the wire's CRLF line breaks read back as LF."""
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    return subprocess.run(
        [sys.executable, "-m", "asmtp", "send", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=60,
        check=False,
    )


def cli_relay(server: SMTPTestServer) -> list[str]:
    return ["--relay", f"{server.host}:{server.port}", "--tls", "none", "--helo", "cli.test"]


# ------------------------------------------------------------------ attachments


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        yield path


def special_file(kind: str, tmp_path: Path, unix_socket: Path) -> tuple[str, str]:
    """(path, what the refusal calls it)"""
    if kind == "device":
        return "/dev/zero", "character device"
    if kind == "fifo":
        fifo = tmp_path / "pipe"
        os.mkfifo(fifo)  # no writer ever comes: reading it would block for ever
        return str(fifo), "FIFO"
    if kind == "directory":
        return str(tmp_path), "directory"
    return str(unix_socket), "socket"


@pytest.mark.parametrize("kind", ["device", "fifo", "directory", "socket"])
def test_attachment_that_is_not_a_regular_file_is_refused(
    kind: str, tmp_path: Path, unix_socket: Path
) -> None:
    path, what = special_file(kind, tmp_path, unix_socket)
    tracemalloc.start()
    try:
        with pytest.raises(asmtp.InputError, match=what) as refused:
            build_message(to="ann@example.org", from_="jack@example.com", attachments=[path])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert repr(path) in str(refused.value)
    assert peak < 1 << 20  # refused before reading: /dev/zero never ends


async def test_sendmail_refuses_a_device_before_connecting(smtp_server: MakeServer) -> None:
    server = smtp_server()
    with pytest.raises(asmtp.InputError, match="/dev/zero"):
        await asmtp.sendmail(
            "ann@example.org", "jack@example.com", attachments=["/dev/zero"], relay=relay_to(server)
        )
    assert server.sessions_opened == 0


def test_cli_attach_fifo_is_exit_2_and_sends_nothing(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    done = cli(
        *cli_relay(server),
        "--from", "jack@example.com", "--to", "ann@example.org", "--body", "hi",
        "--attach", str(fifo),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "FIFO" in done.stderr and str(fifo) in done.stderr
    assert server.sessions_opened == 0


def test_regular_file_attachment_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "report.pdf"
    data = os.urandom(5000) + b"\0" * 10
    path.write_bytes(data)
    message = build_message(to="ann@example.org", from_="jack@example.com", attachments=[path])
    [part] = list(parsed(prepare_message(message).data[:-3]).iter_attachments())
    assert part.get_content_type() == "application/pdf"
    assert part.get_content() == data


class OpenWatch:
    """Sees, through the interpreter's audit hook for "open" (PEP 578), which thread
    opens one path, and holds that thread until the event loop has run a heartbeat.

    If the file were read on the event loop's thread, the heartbeat could not run
    while the opener waits: the wait ends unanswered and the test sees it."""

    active: OpenWatch | None = None
    installed = False

    def __init__(self, path: Path) -> None:
        self.path = os.fspath(path)
        self.opened_in: list[int] = []
        self.reading = threading.Event()
        self.ticked = threading.Event()
        self.answered: list[bool] = []

    @classmethod
    def hook(cls, event: str, args: tuple[Any, ...]) -> None:
        watch = cls.active
        if watch is None or event != "open" or not args:
            return
        if not isinstance(args[0], (str, os.PathLike)) or os.fspath(args[0]) != watch.path:
            return
        watch.opened_in.append(threading.get_ident())
        watch.reading.set()
        watch.answered.append(watch.ticked.wait(5))

    def __enter__(self) -> OpenWatch:
        if not OpenWatch.installed:
            sys.addaudithook(OpenWatch.hook)  # cannot be removed: inert while inactive
            OpenWatch.installed = True
        OpenWatch.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        OpenWatch.active = None


async def test_sendmail_reads_attachments_off_the_event_loop(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server()
    path = tmp_path / "large.bin"
    path.write_bytes(os.urandom(1 << 20))
    loop_thread = threading.get_ident()
    report: list[asmtp.Report] = []

    with OpenWatch(path) as watch:

        async def heartbeat() -> None:
            while True:
                if watch.reading.is_set():
                    watch.ticked.set()  # the loop ran while the file was being read
                await anyio.sleep(0.001)

        async with anyio.create_task_group() as tg:
            tg.start_soon(heartbeat)
            report.append(
                await asmtp.sendmail(
                    "ann@example.org",
                    "jack@example.com",
                    attachments=[path],
                    relay=relay_to(server),
                )
            )
            tg.cancel_scope.cancel()

    assert report[0].ok, report[0].failed()
    assert watch.opened_in and loop_thread not in watch.opened_in
    assert watch.answered == [True] * len(watch.opened_in)
    [received] = server.messages
    [part] = list(parsed(received.content).iter_attachments())
    assert part.get_content() == path.read_bytes()


# ------------------------------------------------------------ NUL and control characters


def test_nul_in_a_built_body_is_quoted_printable_never_raw() -> None:
    message = build_message(
        to="ann@example.org",
        from_="jack@example.com",
        body="<p>a\0b</p>",
        mailtype="html",
        alt_text="a\0b",
    )
    data = prepare_message(message).data
    assert b"\0" not in data
    parts = [p for p in parsed(data[:-3]).walk() if not p.is_multipart()]
    assert [p["Content-Transfer-Encoding"] for p in parts] == ["quoted-printable"] * 2
    assert [text_of(p) for p in parts] == ["a\0b\n", "<p>a\0b</p>\n"]


def test_nul_in_a_callers_7bit_part_is_reencoded() -> None:
    message = EmailMessage()
    message["From"] = "jack@example.com"
    message.set_content("text\0with NUL\n", cte="7bit")
    message.add_attachment(b"bin\0ary", maintype="application", subtype="x-raw", cte="7bit")
    before = message.as_bytes()
    data = prepare_message(message).data
    assert b"\0" not in data
    text, binary = [p for p in parsed(data[:-3]).walk() if not p.is_multipart()]
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(text) == "text\0with NUL\n"
    assert binary["Content-Transfer-Encoding"] == "base64"
    assert binary.get_content() == b"bin\0ary"
    assert message.as_bytes() == before  # the caller's message is not changed


def test_nul_that_cannot_be_encoded_is_refused() -> None:
    with pytest.raises(asmtp.InputError, match=r"line 4 holds a NUL"):
        prepare_message(b"From: a@example.com\r\n\r\nok\r\nNUL\0here\r\n")
    header = EmailMessage()
    header["From"] = "jack@example.com"
    header["X-Note"] = "a\0b"
    header.set_content("fine\n")
    with pytest.raises(asmtp.InputError, match="NUL"):
        prepare_message(header)


async def test_nul_body_arrives_encoded(smtp_server: MakeServer) -> None:
    server = smtp_server()
    report = await asmtp.sendmail(
        "ann@example.org", "jack@example.com", "s", "one\0two\n", relay=relay_to(server)
    )
    assert report.ok
    [received] = server.messages
    assert b"\0" not in received.content
    assert text_of(parsed(received.content)) == "one\0two\n"


CONTROLS = ["\x1b[2J", "\x07", "\x7f", "\x08", "\x9b31m", "\x1f"]


@pytest.mark.parametrize("control", CONTROLS)
def test_control_characters_in_built_headers_are_refused(control: str) -> None:
    with pytest.raises(asmtp.InputError, match=r"Subject.*control character U\+00"):
        build_message(to="a@example.org", from_="b@example.com", subject=f"hi{control}")
    with pytest.raises(asmtp.InputError, match=r"X-Tag.*control character"):
        build_message(to="a@example.org", from_="b@example.com", headers={"X-Tag": control})
    with pytest.raises(asmtp.InputError, match="control character"):
        build_message(
            to="a@example.org",
            from_="b@example.com",
            attachments=[(f"a{control}.txt", b"x", "text/plain")],
        )


def test_a_tab_and_non_ascii_text_in_a_subject_are_fine() -> None:
    message = build_message(to="a@example.org", from_="b@example.com", subject="a\tb café")
    assert parsed(prepare_message(message).data[:-3])["Subject"] == "a\tb café"


async def test_a_callers_subject_with_escape_is_refused_before_sending(
    smtp_server: MakeServer,
) -> None:
    server = smtp_server()
    message = EmailMessage()
    message["From"] = "jack@example.com"
    message["To"] = "ann@example.org"
    message["Subject"] = "\x1b]0;owned\x07"
    message.set_content("hi\n")
    with pytest.raises(asmtp.InputError, match=r"'Subject' holds the control character U\+001B"):
        await asmtp.send(message, relay=relay_to(server))
    assert server.sessions_opened == 0


# --------------------------------------------------------------- non-finite numbers


async def _mailer(**options: Any) -> None:
    asmtp.Mailer(asmtp.Relay("smtp.example.com"), **options)


async def _sendmail(**options: Any) -> None:
    await asmtp.sendmail(
        "a@example.org", "b@example.com", relay=asmtp.Relay("127.0.0.1"), **options
    )


async def _send(**options: Any) -> None:
    await asmtp.send(
        b"Subject: x\r\n\r\nx\r\n",
        sender="b@example.com",
        recipients="a@example.org",
        relay=asmtp.Relay("127.0.0.1"),
        **options,
    )


def _sync(make: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        make()

    return run


BAD_NUMBERS: list[tuple[str, Callable[[], Awaitable[None]], str]] = [
    ("timeout=nan", _sync(lambda: asmtp.Timeouts.of(NAN)), "timeout"),
    ("timeout=inf", _sync(lambda: asmtp.Timeouts.of(INF)), "timeout"),
    ("timeout=True", _sync(lambda: asmtp.Timeouts.of(True)), "timeout"),
    ("timeout=10**400", _sync(lambda: asmtp.Timeouts.of(10**400)), "timeout"),
    ("Timeouts(connect=nan)", _sync(lambda: asmtp.Timeouts(connect=NAN)), "connect"),
    ("Timeouts(data_end=inf)", _sync(lambda: asmtp.Timeouts(data_end=INF)), "data_end"),
    ("Timeouts.uniform(-inf)", _sync(lambda: asmtp.Timeouts.uniform(-INF)), "connect"),
    ("Retry(backoff=nan)", _sync(lambda: asmtp.Retry(backoff=NAN)), "backoff"),
    ("Retry(multiplier=inf)", _sync(lambda: asmtp.Retry(multiplier=INF)), "multiplier"),
    ("Retry(max_backoff=nan)", _sync(lambda: asmtp.Retry(max_backoff=NAN)), "max_backoff"),
    ("Retry(jitter=nan)", _sync(lambda: asmtp.Retry(jitter=NAN)), "jitter"),
    ("Retry(deadline=nan)", _sync(lambda: asmtp.Retry(deadline=NAN)), "deadline"),
    ("Retry(deadline=inf)", _sync(lambda: asmtp.Retry(deadline=INF)), "deadline"),
    ("Retry(attempts=2.0)", _sync(lambda: asmtp.Retry(attempts=2.0)), "attempts"),
    ("Rate nan/s", _sync(lambda: Rate.parse("nan/s")), "rate"),
    ("Rate inf/s", _sync(lambda: Rate.parse("inf/s")), "rate"),
    ("Rate 1e400/s", _sync(lambda: Rate.parse("1" + "0" * 400 + "/s")), "rate"),
    ("Rate(nan)", _sync(lambda: Rate(NAN)), "count"),
    ("Rate(1, per=inf)", _sync(lambda: Rate(1, per=INF)), "per"),
    ("Pool(max_age=nan)", _sync(lambda: Pool(max_age=NAN)), "max_age"),
    ("Pool(idle_timeout=inf)", _sync(lambda: Pool(idle_timeout=INF)), "idle_timeout"),
    ("Pool(check_after=nan)", _sync(lambda: Pool(check_after=NAN)), "check_after"),
    ("Pool(max_connections=2.0)", _sync(lambda: Pool(max_connections=2.0)), "max_connections"),
    ("Direct(dns_timeout=nan)", _sync(lambda: asmtp.Direct(dns_timeout=NAN)), "dns_timeout"),
    ("Direct(dns_timeout=inf)", _sync(lambda: asmtp.Direct(dns_timeout=INF)), "dns_timeout"),
    ("Direct(per_domain=2.0)", _sync(lambda: asmtp.Direct(per_domain=2.0)), "per_domain"),
    ("Direct(port=25.0)", _sync(lambda: asmtp.Direct(port=25.0)), "port"),
    ("Relay(port=nan)", _sync(lambda: asmtp.Relay("h", NAN)), "port"),
    ("Relay(port=True)", _sync(lambda: asmtp.Relay("h", True)), "port"),
    ("Mailer(timeout=nan)", lambda: _mailer(timeout=NAN), "timeout"),
    ("Mailer(concurrency=2.0)", lambda: _mailer(concurrency=2.0), "concurrency"),
    ("Mailer(recipient_deadline=nan)", lambda: _mailer(recipient_deadline=NAN), "deadline"),
    ("Mailer(recipient_deadline=inf)", lambda: _mailer(recipient_deadline=INF), "deadline"),
    ("sendmail(timeout=nan)", lambda: _sendmail(timeout=NAN), "timeout"),
    ("sendmail(concurrency=1.5)", lambda: _sendmail(concurrency=1.5), "concurrency"),
    ("send(timeout=-inf)", lambda: _send(timeout=-INF), "timeout"),
    ("send(concurrency=nan)", lambda: _send(concurrency=NAN), "concurrency"),
]


@pytest.mark.parametrize(
    ("make", "fragment"), [(m, f) for _, m, f in BAD_NUMBERS], ids=[i for i, _, _ in BAD_NUMBERS]
)
async def test_non_finite_and_mistyped_numbers_are_refused(
    make: Callable[[], Awaitable[None]], fragment: str
) -> None:
    with pytest.raises(asmtp.InputError, match=rf"(?i){fragment}"):
        await make()


async def test_none_still_means_no_limit_and_finite_numbers_pass() -> None:
    assert asmtp.Timeouts.of(None) == asmtp.Timeouts.uniform(None)
    assert asmtp.Timeouts.of(1e9).command == 1e9
    assert asmtp.Retry(deadline=None, backoff=0).delay(3) == 0
    asmtp.Mailer(asmtp.Relay("smtp.example.com"), recipient_deadline=None, timeout=None)
    assert Rate.parse("2.5/m").per_second == 2.5 / 60
    # many attempts with a steep multiplier: the wait is capped, not an OverflowError
    assert asmtp.Retry(attempts=5000, multiplier=10, jitter=0).delay(4000) == 300.0


async def test_nan_timeout_is_refused_before_connecting(smtp_server: MakeServer) -> None:
    server = smtp_server()
    with pytest.raises(asmtp.InputError, match="timeout"):
        await asmtp.sendmail("a@example.org", "b@example.com", relay=relay_to(server), timeout=NAN)
    assert server.sessions_opened == 0


# ------------------------------------------------------------ Date and Message-ID


def bare_message() -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Jack <jack@example.com>"
    message["To"] = "ann@example.org"
    message["Bcc"] = "hidden@example.org"
    message["Subject"] = "no date, no id"
    message.set_content("hi\n")
    return message


async def test_send_adds_date_and_message_id_without_changing_the_callers_message(
    smtp_server: MakeServer,
) -> None:
    server = smtp_server()
    message = bare_message()
    before = message.as_bytes()
    report = await asmtp.send(message, relay=relay_to(server))
    assert report.ok, report.failed()
    ids = set()
    for received in server.messages:
        got = parsed(received.content)
        assert got["Message-ID"] is not None and got["Date"] is not None
        assert parsedate_to_datetime(str(got["Date"])).tzinfo is not None
        assert str(got["Message-ID"]).endswith("@example.com>")
        ids.add(str(got["Message-ID"]))
        assert got["Bcc"] is None
    assert len(server.messages) == 2 and len(ids) == 1  # one message, two recipients
    assert message.as_bytes() == before
    assert "Date" not in message and "Message-ID" not in message


async def test_a_callers_date_and_message_id_are_kept(smtp_server: MakeServer) -> None:
    server = smtp_server()
    message = bare_message()
    message["Date"] = "Mon, 01 Jan 2024 10:00:00 +0000"
    message["Message-ID"] = "<given.1@example.com>"
    assert (await asmtp.send(message, relay=relay_to(server))).ok
    for received in server.messages:
        got = parsed(received.content)
        assert got.get_all("Message-ID") == ["<given.1@example.com>"]
        assert got.get_all("Date") == ["Mon, 01 Jan 2024 10:00:00 +0000"]


# ------------------------------------------------------- a Message-ID per copy


def message_ids(server: SMTPTestServer) -> dict[str, str]:
    """recipient -> the one Message-ID of what reached them"""
    found = {}
    for received in server.messages:
        [value] = parsed(received.content).get_all("Message-ID")
        assert value is not None
        found[received.rcpt_tos[0]] = str(value)
    return found


RECIPIENTS = [f"r{i}@example.org" for i in range(4)]


@pytest.mark.parametrize(
    "options",
    [
        {"unsubscribe": "https://example.com/u?r={recipient}"},
        {"verp": "bounces+{token}@example.com"},
    ],
    ids=["unsubscribe", "verp"],
)
async def test_each_personalised_copy_gets_its_own_message_id(
    smtp_server: MakeServer, options: dict[str, str]
) -> None:
    server = smtp_server()
    message = build_message(
        to="list@example.org", from_="news@example.com", message_id="<given@example.com>"
    )
    async with asmtp.Mailer(relay_to(server), **options) as mailer:
        report = await mailer.send(message, recipients=RECIPIENTS)
    assert report.ok, report.failed()
    ids = message_ids(server)
    assert sorted(ids) == RECIPIENTS
    assert len(set(ids.values())) == len(RECIPIENTS)
    for value in ids.values():
        assert re.fullmatch(MSG_ID, value), value
        assert value.endswith("@example.com>")  # the domain of the caller's own
    assert message["Message-ID"] == "<given@example.com>"


async def test_a_shared_message_keeps_the_callers_message_id(smtp_server: MakeServer) -> None:
    server = smtp_server()
    message = build_message(
        to="list@example.org", from_="news@example.com", message_id="<given@example.com>"
    )
    async with asmtp.Mailer(relay_to(server)) as mailer:
        assert (await mailer.send(message, recipients=RECIPIENTS)).ok
    assert set(message_ids(server).values()) == {"<given@example.com>"}


async def test_rendered_messages_keep_their_own_ids_and_get_one_if_missing(
    smtp_server: MakeServer,
) -> None:
    server = smtp_server()

    def render(i: int) -> EmailMessage:
        message = EmailMessage()
        message["From"] = "news@example.com"
        message["To"] = RECIPIENTS[i]
        if i % 2 == 0:
            message["Message-ID"] = f"<mine.{i}@example.com>"
        message.set_content(f"for {i}\n")
        return message

    jobs = [Job(r, lambda i=i: render(i)) for i, r in enumerate(RECIPIENTS)]
    async with asmtp.Mailer(
        relay_to(server), unsubscribe="https://example.com/u?r={recipient}"
    ) as mailer:
        results = [r async for r in mailer.deliver(jobs)]
    assert all(r.status == "delivered" for r in results)
    ids = message_ids(server)
    assert ids["r0@example.org"] == "<mine.0@example.com>"
    assert ids["r2@example.org"] == "<mine.2@example.com>"
    assert len(set(ids.values())) == len(RECIPIENTS)
    assert all(v.endswith("@example.com>") for v in ids.values())


def test_message_id_is_taken_out_of_copies_without_copying_their_body() -> None:
    shared = prepare_message(
        b"From: news@example.com\r\nMessage-ID:\r\n <folded.1@example.com>\r\n"
        b"Subject: s\r\n\r\n" + b"body line\r\n" * 1000
    )
    copies = [with_headers(shared, [("To", r)]) for r in RECIPIENTS]
    remove = MessageIdRemover()
    bases = [remove(copy) for copy in copies]
    for (base, domain), recipient in zip(bases, RECIPIENTS, strict=True):
        assert domain == "example.com"
        assert base.data == (
            f"To: {recipient}\r\nFrom: news@example.com\r\nSubject: s\r\n\r\n".encode()
            + b"body line\r\n" * 1000
            + b".\r\n"
        )
        assert base.size == len(base.data) - 3
    # the body is split off once and shared by every copy
    assert len({id(base.parts[-1]) for base, _ in bases}) == 1
    without = prepare_message(b"From: a@example.com\r\n\r\nno id\r\n")
    assert remove(without) == (without, None)


async def test_dkim_signs_each_copys_own_message_id(
    smtp_server: MakeServer, dns_server: MakeDNS
) -> None:
    signer, txt = asmtp.DKIM.generate("example.com", "hardening", "ed25519")
    served = dns_server({"example.com": f'hardening._domainkey IN TXT "{txt}"'})
    host, port = served.address
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port = [host], port

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        answer = resolver.resolve(name.decode("ascii"), "TXT", lifetime=max(timeout, 1))
        return b"".join(answer[0].strings)

    server = smtp_server()
    message = build_message(to="list@example.org", from_="news@example.com")
    async with asmtp.Mailer(
        relay_to(server), dkim=signer, unsubscribe="https://example.com/u?r={recipient}"
    ) as mailer:
        assert (await mailer.send(message, recipients=RECIPIENTS[:2])).ok
    assert len(set(message_ids(server).values())) == 2
    for received in server.messages:
        assert dkim.verify(received.content, dnsfunc=lookup)
        header = received.content.split(b"\r\n\r\n")[0].decode().lower()
        assert "message-id" in header.split("h=")[1].split(";")[0]


def test_cli_bulk_run_gives_every_copy_its_own_message_id(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server()
    listing = tmp_path / "list.csv"
    listing.write_text("email,name\n" + "".join(f"{r},N{i}\n" for i, r in enumerate(RECIPIENTS)))
    base = [*cli_relay(server), "--from", "news@example.com", "--recipients", str(listing)]
    for extra in (
        ["--subject", "Hello {name}"],  # rendered per recipient
        ["--subject", "Hello"],  # one message, a To header per recipient
        ["--subject", "Hello", "--unsubscribe-url", "https://example.com/u?r={recipient}"],
    ):
        server.clear()
        done = cli(*base, *extra, "--body", "hi\n")
        assert done.returncode == 0, done.stderr
        ids = message_ids(server)
        assert sorted(ids) == RECIPIENTS
        assert len(set(ids.values())) == len(RECIPIENTS), ids
        assert all(re.fullmatch(MSG_ID, v) for v in ids.values())


# ----------------------------------------------------------------------- log_file


@pytest.mark.parametrize("where", ["missing/dir/log", "."])
async def test_a_log_file_that_cannot_be_opened_sends_nothing(
    smtp_server: MakeServer, tmp_path: Path, where: str
) -> None:
    server = smtp_server()
    with pytest.raises(asmtp.InputError, match="log_file: cannot open"):
        await asmtp.sendmail(
            "ann@example.org",
            "jack@example.com",
            relay=relay_to(server),
            log_file=tmp_path / where,
        )
    assert server.sessions_opened == 0 and server.messages == []


async def test_log_file_gets_a_line_per_recipient(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    log = tmp_path / "send.log"
    report = await asmtp.sendmail(
        "ann@example.org, bob@example.org", "jack@example.com", relay=relay_to(server), log_file=log
    )
    assert report.ok
    lines = log.read_text().splitlines()
    assert [line.split("<")[1].split(">")[0] for line in lines] == [
        "ann@example.org",
        "bob@example.org",
    ]
