"""The journal keeps its promise under abuse: one writer at a time (a real OS lock, two
real processes), a run's identity checked on resume, files that are not journals never
written to, torn lines cut (a real journal cut at every byte offset), write failures
(a real file size limit) stopping the run cleanly, hostile contents refused, and resume
reading a large journal in bounded memory. The tests of the Mailer and the Journal run
on asyncio and on trio (the ``anyio`` mark; see conftest.py)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import tracemalloc
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asmtp
from asmtp._delivery.journal import Journal, read_journal
from asmtp._delivery.journal_format import MAX_LINE, JournalEntry, JournalIdentity
from asmtp.cli.main import main
from asmtp.errors import (
    JournalFormatError,
    JournalIdentityError,
    JournalLockedError,
    JournalRefusedError,
)
from servers import SMTPTestServer

pytestmark = pytest.mark.anyio

MakeServer = Callable[..., SMTPTestServer]
TIMEOUT = 60


def relay_to(server: SMTPTestServer) -> asmtp.Relay:
    return asmtp.Relay(server.host, server.port, tls="none", helo="journal.asmtp.test")


def relay_args(server: SMTPTestServer) -> list[str]:
    return ["--relay", f"{server.host}:{server.port}", "--tls", "none", "--helo", "j.test"]


RUN_ASMTP = "runpy.run_module('asmtp', run_name='__main__')"


def asmtp_process(*args: str, prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``asmtp send ARGS`` in a process of its own; ``prelude`` runs first in it."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv[0] = 'asmtp'\n" + RUN_ASMTP
    env = dict(os.environ)
    env.pop("COLUMNS", None)
    return subprocess.run(
        [sys.executable, "-c", code, "send", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=TIMEOUT,
        check=False,
    )


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def asmtp_send(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    """``asmtp send ARGS`` as the command runs it (:func:`asmtp.cli.main`), in this
    process: a new process each time would cost more than the run."""

    def run(*args: str) -> Ran:
        capsys.readouterr()
        code = main(["send", *args])
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def newsletter(subject: str = "news") -> EmailMessage:
    """Built afresh each call: a new Date, Message-ID and MIME boundary every time."""
    msg = EmailMessage()
    msg["From"] = "News <news@example.com>"
    msg["Subject"] = subject
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain="example.com")
    msg.set_content("hello\n")
    msg.add_attachment(b"\x00\x01 data", maintype="application", subtype="octet-stream",
                       filename="a.bin")  # fmt: skip
    return msg


def received(server: SMTPTestServer) -> Counter[str]:
    assert server.wait_idle()
    return Counter(r for m in server.messages for r in m.rcpt_tos)


async def received_async(server: SMTPTestServer) -> Counter[str]:
    """:func:`received` for async tests: waits without blocking the event loop."""
    assert await server.idle()
    return Counter(r for m in server.messages for r in m.rcpt_tos)


def write_list(tmp_path: Path, rcpts: list[str]) -> Path:
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(rcpts) + "\n", encoding="utf-8")
    return listing


# ----------------------------------------------------------------------- one writer

HOLDER = textwrap.dedent(
    """
    import sys, anyio, asmtp
    async def main():
        relay = asmtp.Relay("127.0.0.1", 9, tls="none")
        async with asmtp.Mailer(relay, journal=sys.argv[1], resume=True, campaign="c"):
            print("held", flush=True)
            await anyio.to_thread.run_sync(sys.stdin.read)
    anyio.run(main)
    """
)


def test_a_second_process_is_refused_until_the_holder_dies(
    smtp_server: MakeServer, tmp_path: Path, asmtp_send: Callable[..., Ran]
) -> None:
    server = smtp_server()
    journal = tmp_path / "run.jsonl"
    listing = write_list(tmp_path, ["a@example.org", "b@example.org"])
    argv = ["--from", "s@example.org", "--recipients", str(listing), "--body", "b",
            *relay_args(server), "--journal", str(journal), "--resume",
            "--campaign", "c"]  # fmt: skip

    async def open_mailer() -> None:
        async with asmtp.Mailer(
            relay_to(server), journal=journal, resume=True, campaign="c"
        ) as mailer:
            await mailer.send(newsletter(), recipients=["a@example.org"])

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(journal)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == "held\n"
        # the CLI: exit 2, the journal and the holder named, nothing sent
        done = asmtp_send(*argv)
        assert done.returncode == 2, done.stderr
        assert f"{journal} is in use by another asmtp run (pid {holder.pid})" in done.stderr
        # the API: refused on entering, before any connection
        with pytest.raises(JournalLockedError, match=f"pid {holder.pid}"):
            anyio.run(open_mailer)
        assert server.sessions_opened == 0
    finally:
        holder.kill()  # no clean-up in the holder: the kernel releases the lock
        holder.communicate()
    done = asmtp_send(*argv)
    assert done.returncode == 0, done.stderr
    assert received(server) == {"a@example.org": 1, "b@example.org": 1}


async def test_two_mailers_in_one_process(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server()
    journal = tmp_path / "run.jsonl"
    async with asmtp.Mailer(relay_to(server), journal=journal, campaign="c") as first:
        with pytest.raises(JournalLockedError, match=f"this process \\(pid {os.getpid()}\\)"):
            async with asmtp.Mailer(relay_to(server), journal=str(journal), campaign="c"):
                pass
        # the refused one touched nothing: the lock and its pid still stand for others
        done = await anyio.to_thread.run_sync(
            lambda: asmtp_process(
                "--from", "s@example.org", "--to", "x@example.org", "--body", "b",
                *relay_args(server), "--journal", str(journal), "--resume", "--campaign", "c",
            )
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert f"in use by another asmtp run (pid {os.getpid()})" in done.stderr
        await first.send(newsletter(), recipients=["a@example.org"])
    async with asmtp.Mailer(relay_to(server), journal=journal, resume=True, campaign="c") as again:
        await again.send(newsletter(), recipients=["a@example.org"])
        assert again.skipped == 1
    assert await received_async(server) == {"a@example.org": 1}


# ----------------------------------------------------------------------- identity


def test_resume_with_another_message_or_sender_is_refused(
    smtp_server: MakeServer, tmp_path: Path, asmtp_send: Callable[..., Ran]
) -> None:
    server = smtp_server()
    journal = tmp_path / "run.jsonl"
    listing = write_list(tmp_path, ["a@example.org", "b@example.org"])
    attachment = tmp_path / "price list.txt"
    attachment.write_text("apples 3\n", encoding="utf-8")

    def send(*extra: str, sender: str = "news@example.org", subject: str = "Hello") -> Ran:
        return asmtp_send(
            "--from", sender, "--recipients", str(listing), *relay_args(server),
            "--subject", subject, "--body", "Hi there", "--attach", str(attachment),
            "--journal", str(journal), *(["--resume"] if journal.exists() else []), *extra,
        )  # fmt: skip

    assert send().returncode == 0
    header = json.loads(journal.read_text(encoding="utf-8").splitlines()[0])
    assert header["asmtp"] == "journal" and header["format"] == 1
    assert header["version"] == asmtp.__version__ and header["sender"] == "news@example.org"
    assert header["message"].startswith("sha256:")
    before = journal.read_bytes()
    sender_differs = 'the sender differs (journal: "news@example.org", this run: "x@example.org")'
    for done, what in [
        (send(subject="Hello again"), "the message differs"),
        (send(sender="x@example.org"), sender_differs),
    ]:
        assert done.returncode == 2, done.stderr
        assert what in done.stderr and "--ignore-identity" in done.stderr
        assert journal.read_bytes() == before
    attachment.write_text("apples 4\n", encoding="utf-8")  # same name, new content
    done = send()
    assert done.returncode == 2 and "the message differs" in done.stderr
    assert received(server) == {"a@example.org": 1, "b@example.org": 1}
    # the explicit override continues it (done recipients skipped) and adopts it
    listing.write_text("a@example.org\nb@example.org\nc@example.org\n", encoding="utf-8")
    done = send("--ignore-identity")
    assert done.returncode == 0, done.stderr
    assert received(server) == {"a@example.org": 1, "b@example.org": 1, "c@example.org": 1}
    assert send().returncode == 0  # now this run's: no override needed


def test_a_campaign_names_the_run(
    smtp_server: MakeServer, tmp_path: Path, asmtp_send: Callable[..., Ran]
) -> None:
    server = smtp_server()
    journal = tmp_path / "run.jsonl"
    listing = write_list(tmp_path, ["a@example.org"])
    base = ["--from", "s@example.org", "--recipients", str(listing), *relay_args(server),
            "--journal", str(journal)]  # fmt: skip
    assert asmtp_send(*base, "--body", "v1", "--campaign", "spring").returncode == 0
    listing.write_text("a@example.org\nb@example.org\n", encoding="utf-8")
    done = asmtp_send(*base, "--body", "v1", "--resume", "--campaign", "autumn")
    assert done.returncode == 2
    assert 'the campaign differs (journal: "spring", this run: "autumn")' in done.stderr
    done = asmtp_send(*base, "--body", "v1", "--resume")
    assert done.returncode == 2 and "this run: none" in done.stderr
    # the same campaign: the message may change (a corrected template)
    done = asmtp_send(*base, "--body", "v2, fixed", "--resume", "--campaign", "spring")
    assert done.returncode == 0, done.stderr
    assert received(server) == {"a@example.org": 1, "b@example.org": 1}
    for bad in (["--campaign", "x"], ["--journal", str(tmp_path / "n"), "--ignore-identity"]):
        done = asmtp_send("--from", "s@example.org", "--to", "a@example.org", "--body", "b",
                          *relay_args(server), *bad)  # fmt: skip
        assert done.returncode == 2 and bad[-1].lstrip("x") in done.stderr


async def test_the_mailer_takes_its_identity_from_the_first_job(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server()
    journal = tmp_path / "run.jsonl"
    async with asmtp.Mailer(relay_to(server), journal=journal) as mailer:
        await mailer.send(newsletter(), recipients=["a@example.org", "b@example.org"])
    # built again (new Date, Message-ID, boundary): the same message, the same run
    async with asmtp.Mailer(relay_to(server), journal=journal, resume=True) as mailer:
        report = await mailer.send(newsletter(), recipients=["a@example.org", "c@example.org"])
        assert mailer.skipped == 1
    assert [(r.recipient, r.status) for r in report] == [("c@example.org", "delivered")]
    before = journal.read_bytes()
    with pytest.raises(JournalIdentityError, match="the message differs") as refused:
        async with asmtp.Mailer(relay_to(server), journal=journal, resume=True) as mailer:
            report = await mailer.send(newsletter("other"), recipients=["d@example.org"])
    assert len(report) == 0
    assert refused.value.differences == (
        "the message differs (subject, body, headers or attachments changed)",
    )
    assert journal.read_bytes() == before
    assert await received_async(server) == {
        "a@example.org": 1,
        "b@example.org": 1,
        "c@example.org": 1,
    }


NOT_JOURNALS = [
    pytest.param(b"<!doctype html>\n<p>my page</p>\n", id="html"),
    pytest.param(bytes(random.Random(7).randrange(256) for _ in range(3000)), id="random"),
    pytest.param(b"hello", id="a-word-without-newline"),
    pytest.param(b"\n", id="an-empty-line"),
    pytest.param(b'["event", "dot"]\n', id="json-not-a-record"),
]


@pytest.mark.parametrize("content", NOT_JOURNALS)
async def test_a_file_that_is_not_a_journal_is_never_written(
    smtp_server: MakeServer, tmp_path: Path, content: bytes
) -> None:
    server = smtp_server()
    path = tmp_path / "page.html"
    path.write_bytes(content)
    with pytest.raises(JournalFormatError, match="not an asmtp journal"):
        async with asmtp.Mailer(relay_to(server), journal=path, resume=True):
            pass
    assert path.read_bytes() == content
    assert server.sessions_opened == 0


def test_the_command_refuses_a_file_that_is_not_a_journal(
    smtp_server: MakeServer, tmp_path: Path, asmtp_send: Callable[..., Ran]
) -> None:
    server = smtp_server()
    page = tmp_path / "page.html"
    page.write_bytes(b"<!doctype html>\n<p>my page</p>\n")
    done = asmtp_send("--from", "s@example.org", "--to", "a@example.org", "--body", "b",
                      *relay_args(server), "--journal", str(page), "--resume")  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"asmtp: error: the journal {page} is not an asmtp journal" in done.stderr
    assert page.read_bytes() == b"<!doctype html>\n<p>my page</p>\n"
    empty = tmp_path / "empty.jsonl"  # an empty file is a new journal
    for extra in ([], ["--resume"]):
        empty.write_bytes(b"")
        done = asmtp_send("--from", "s@example.org", "--to", "a@example.org", "--body", "b",
                          *relay_args(server), "--journal", str(empty), *extra)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert empty.read_bytes().startswith(b'{"asmtp": "journal", "format": 1,')
    assert server.sessions_opened == 2


def test_a_journal_from_before_headers(
    smtp_server: MakeServer, tmp_path: Path, asmtp_send: Callable[..., Ran]
) -> None:
    server = smtp_server()
    journal = tmp_path / "old.jsonl"
    journal.write_text(
        '{"event": "dot", "key": "a@example.org", "recipient": "a@example.org"}\n'
        '{"event": "result", "key": "a@example.org", "status": "delivered"}\n',
        encoding="utf-8",
    )
    listing = write_list(tmp_path, ["a@example.org", "b@example.org"])
    argv = ["--from", "s@example.org", "--recipients", str(listing), "--body", "b",
            *relay_args(server), "--journal", str(journal), "--resume"]  # fmt: skip
    done = asmtp_send(*argv)
    assert done.returncode == 2
    assert "from before journals recorded their run" in done.stderr
    assert "--ignore-identity" in done.stderr
    done = asmtp_send(*argv, "--ignore-identity")
    assert done.returncode == 0, done.stderr
    assert received(server) == {"b@example.org": 1}
    # adopted: an identity line now says whose it is
    assert '"event": "identity"' in journal.read_text(encoding="utf-8")
    assert asmtp_send(*argv).returncode == 0
    assert received(server) == {"b@example.org": 1}


async def test_a_journal_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    journal = tmp_path / "new.jsonl"
    journal.write_text('{"asmtp": "journal", "format": 2, "event": "identity"}\n')
    with pytest.raises(JournalFormatError, match="newer asmtp"):
        await Journal.open(journal, resume=True)


# ----------------------------------------------------------------------- torn lines


def decisions(entries: dict[str, JournalEntry]) -> dict[str, str]:
    """What a resume does per key: skip it, or report it unknown."""
    return {
        key: "unknown" if e.event == "dot" or e.status == "unknown" else "skip"
        for key, e in entries.items()
    }


def expected_decisions(data: bytes) -> dict[str, str]:
    """The model: the last whole record per key (its JSON complete, newline or not)."""
    out: dict[str, str] = {}
    for line in data.split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        key = json.dumps(record.get("key"), ensure_ascii=False)
        if record.get("event") == "dot":
            out[key] = "unknown"
        elif record.get("event") == "result":
            status = record["status"]
            if status == "transient":
                out.pop(key, None)
            else:
                out[key] = "unknown" if status == "unknown" else "skip"
    return out


async def test_a_real_journal_cut_at_every_byte(smtp_server: MakeServer, tmp_path: Path) -> None:
    server = smtp_server(rcpt_reply=lambda a: "550 5.1.1 no" if a.startswith("bad") else None)
    rcpts = ["a@example.org", "bad@example.org", "c@example.org"]
    journal = tmp_path / "run.jsonl"
    async with asmtp.Mailer(relay_to(server), journal=journal, campaign="cut", retry=None) as m:
        await m.send(newsletter(), recipients=rcpts)
    data = journal.read_bytes()
    assert data.count(b'"event": "dot"') == 2 and data.count(b'"event": "result"') == 3
    identity = JournalIdentity(campaign="cut")
    cut = tmp_path / "cut.jsonl"
    ends = {n + 1 for n, octet in enumerate(data) if octet == ord("\n")}
    for offset in range(len(data) + 1):
        prefix = data[:offset]
        cut.unlink(missing_ok=True)  # a new file: rewriting one in place costs a flush
        cut.write_bytes(prefix)
        assert decisions(read_journal(cut)) == expected_decisions(prefix), offset
        if offset % 5 and not ends & {offset - 1, offset, offset + 1}:
            continue  # every prefix read back above; some opened (and repaired) too
        opened = await Journal.open(cut, resume=True)
        try:
            if offset % 3 == 0:  # (writes the header again when it was cut: an fsync)
                await opened.claim(identity)
            assert decisions(opened.entries) == expected_decisions(prefix), offset
        finally:
            await opened.aclose()
        after = cut.read_bytes()
        # whole lines only, nothing of the prefix's whole lines lost
        assert after.startswith(prefix[: prefix.rfind(b"\n") + 1]), offset
        assert after == b"" or after.endswith(b"\n"), offset
        assert all(json.loads(line) for line in after.splitlines()), offset

    # a few real resumed sends: never a resend of a recipient whose dot line is whole
    header_end = data.index(b"\n") + 1
    first_dot = data.index(b"\n", data.index(b'"event": "dot"')) + 1
    first_result = data.index(b'"event": "result"')
    for offset in (10, header_end, first_dot - 1, first_dot, first_result + 20, len(data)):
        prefix = data[:offset]
        cut.write_bytes(prefix)
        server.clear()
        async with asmtp.Mailer(
            relay_to(server), journal=cut, resume=True, campaign="cut", retry=None
        ) as mailer:
            report = await mailer.send(newsletter(), recipients=rcpts)
        known = expected_decisions(prefix)
        again = {r for r in rcpts if json.dumps(r) not in known and not r.startswith("bad")}
        assert set(await received_async(server)) == again, offset
        for r in report:
            if known.get(json.dumps(r.recipient)) == "unknown":
                assert r.status == "unknown", (offset, r)
        # nothing was appended to the torn fragment: every line reads, and the next
        # resume finds everyone done or unknown
        assert all(json.loads(line) for line in cut.read_bytes().splitlines()), offset
        async with asmtp.Mailer(
            relay_to(server), journal=cut, resume=True, campaign="cut", retry=None
        ) as mailer:
            await mailer.send(newsletter(), recipients=rcpts)
        assert await received_async(server) == dict.fromkeys(again, 1), offset


# ----------------------------------------------------------------------- write failures

#: a process whose files cannot grow past LIMIT octets: writes beyond fail with EFBIG
FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


def test_a_journal_that_cannot_be_written_stops_the_run(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server()
    everyone = [f"r{i:02d}@example.org" for i in range(20)]
    listing = write_list(tmp_path, everyone)
    journal = tmp_path / "run.jsonl"
    argv = ["--from", "s@example.org", "--recipients", str(listing), "--body", "b",
            *relay_args(server), "--concurrency", "3", "--journal", str(journal)]  # fmt: skip
    done = asmtp_process(*argv, "--json", prelude=FILE_SIZE_LIMIT.format(limit=2500))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("asmtp: error:")]
    assert len(errors) == 1
    assert f"the journal {journal} cannot be written (File too large)" in errors[0]
    assert "recipients:" in done.stderr  # the summary
    first = received(server)
    assert 0 < len(first) < len(everyone)  # stopped part way
    # every message that went out has its whole dot line: none was sent unrecorded
    text = journal.read_text(encoding="utf-8")
    whole = text[: text.rfind("\n") + 1]
    dots = {json.loads(line)["key"] for line in whole.splitlines() if '"event": "dot"' in line}
    assert set(first) <= dots
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(r["status"] in ("delivered", "transient") for r in results)

    resumed = asmtp_process(*argv, "--resume", "--json")
    assert resumed.returncode in (0, 1), resumed.stderr
    assert "Traceback" not in resumed.stderr
    total = received(server)
    assert all(n == 1 for n in total.values())  # nothing sent twice
    # a dot line made whole by a write that then failed: never sent, and told unknown
    unsent = dots - set(first)
    assert set(total) == set(everyone) - unsent
    statuses = {r["key"]: r["status"] for r in map(json.loads, resumed.stdout.splitlines())}
    assert all(statuses[k] == "unknown" for k in dots - set(first))


def special_file(kind: str, tmp_path: Path) -> Path:
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
        return path
    return tmp_path if kind == "folder" else Path(kind)


@pytest.mark.parametrize("kind", ["/dev/full", "/dev/zero", "fifo", "folder"])
@pytest.mark.parametrize("resume", [False, True])
async def test_a_journal_must_be_a_regular_file(
    smtp_server: MakeServer, tmp_path: Path, kind: str, resume: bool
) -> None:
    server = smtp_server()
    path = special_file(kind, tmp_path)
    with pytest.raises(JournalFormatError, match="must be a regular file"):
        async with asmtp.Mailer(relay_to(server), journal=path, resume=resume):
            pass  # (a FIFO is never opened: it would block)
    assert server.sessions_opened == 0


@pytest.mark.parametrize(
    ("kind", "resume"), [("/dev/full", False), ("/dev/zero", True), ("fifo", True)]
)
def test_the_command_refuses_a_journal_that_is_not_a_regular_file(
    smtp_server: MakeServer,
    tmp_path: Path,
    asmtp_send: Callable[..., Ran],
    kind: str,
    resume: bool,
) -> None:
    server = smtp_server()
    path = special_file(kind, tmp_path)
    extra = ["--resume"] if resume else []
    done = asmtp_send("--from", "s@example.org", "--to", "a@example.org", "--body", "b",
                      *relay_args(server), "--journal", str(path), *extra)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"--journal: '{path}' is not a regular file" in done.stderr
    assert server.sessions_opened == 0


# ----------------------------------------------------------------------- hostile contents

HEADER = b'{"asmtp": "journal", "format": 1, "event": "identity", "campaign": "h"}\n'
KEYS = st.sampled_from(["a@x", "b@x", "c@x", 7, ["k", 1]])
RECORDS = st.one_of(
    st.builds(lambda k: {"event": "dot", "key": k, "recipient": "r@x"}, KEYS),
    st.builds(
        lambda k, s, h: {"event": "result", "key": k, "status": s, "host": h},
        KEYS,
        st.sampled_from(["delivered", "transient", "permanent", "unknown"]),
        st.sampled_from([None, "mx.example"]),
    ),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)
#: complete lines that are no journal record, by construction
HOSTILE = st.one_of(
    st.binary(max_size=60).map(lambda b: b"\xff" + b.replace(b"\n", b"")),  # not UTF-8
    st.text(max_size=40)
    .filter(lambda t: not t.lstrip().startswith("{"))
    .map(lambda t: t.replace("\n", "").encode("utf-8", "surrogatepass")),
    JSON.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.sampled_from(
        [
            b'{"event": "dot"}',
            b'{"event": 5, "key": "a@x"}',
            b'{"event": "result", "key": "a@x", "status": 7}',
            b'{"event": "result", "key": "a@x", "status": "delivered", "host": 3}',
            b'{"event": "identity", "sender": ["x"]}',
            b'{"event": "dot", "key": "a\x00b"}',
            b'{"asmtp": "journal", "format": 1}',
            b"[" * 100_000,
            b"\x00" * 64,
            b"a" * (MAX_LINE + 1),
        ]
    ),
)


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record).encode() + b"\n"


@st.composite
def journals(draw: st.DrawFn) -> tuple[bytes, bool]:
    """(content, whether a resume must refuse it)"""
    if draw(st.booleans()):
        data = draw(st.binary(max_size=300))
        return data, data != b"" and not b'{"asmtp": "journal"'.startswith(data)
    records = draw(st.lists(RECORDS, max_size=8))
    lines = [encode(r) for r in records]
    hostile = draw(st.lists(st.tuples(st.integers(0, len(lines)), HOSTILE), max_size=2))
    for at, line in hostile:
        lines.insert(at, line + b"\n")
    header = draw(st.sampled_from([HEADER, b'{"asmtp": "journal", "format": 1, "sender": 5}\n']))
    tail = b""
    if records and draw(st.booleans()):  # torn: a strict prefix of a record's line
        whole = encode(draw(RECORDS))
        tail = whole[: draw(st.integers(1, len(whole) - 2))]
    refuse = bool(hostile) or header != HEADER
    return header + b"".join(lines) + tail, refuse


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(journals())
def test_hostile_contents_are_refused_or_resumed_correctly(case: tuple[bytes, bool]) -> None:
    content, refuse = case
    with _scratch() as path:
        path.write_bytes(content)

        async def resume() -> dict[str, str]:
            journal = await Journal.open(path, resume=True)
            try:
                await journal.claim(JournalIdentity(campaign="h"), ignore_identity=True)
                return decisions(journal.entries)
            finally:
                await journal.aclose()

        try:
            got = anyio.run(resume)
        except JournalRefusedError as exc:
            assert refuse, (exc, content[:200])
            assert path.read_bytes() == content  # never written to
            return
        assert not refuse, content[:200]
        whole = content[: content.rfind(b"\n") + 1]
        assert got == expected_decisions(whole)
        after = path.read_bytes()
        assert after == b"" or after.endswith(b"\n")


class _scratch:
    """A file name of its own for each hypothesis example (no function-scoped fixture)."""

    def __enter__(self) -> Path:
        import tempfile

        self._dir = tempfile.TemporaryDirectory()
        return Path(self._dir.name) / "journal.jsonl"

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()


# ----------------------------------------------------------------------- memory


def test_resume_reads_a_large_journal_in_little_memory(tmp_path: Path) -> None:
    keys = 10_000
    result = asmtp.RecipientResult(
        recipient="someone@example.org", status="delivered", code=250,
        message="2.0.0 Ok: queued as 4Bq2Xk1Z0Yz9", host="smtp.example.org", tls="tls",
    ).as_dict()  # fmt: skip
    journal = tmp_path / "big.jsonl"
    with journal.open("wb") as out:
        out.write(HEADER)
        for i in range(keys):
            key = f"user{i:06d}@example.org"
            out.write(encode({"event": "dot", "key": key, "recipient": key, "time": "t"}))
            status = "unknown" if i % 10 == 0 else "delivered"
            record = {**result, "key": key, "recipient": key, "status": status}
            out.write(encode({**record, "event": "result", "time": "t"}))
    size = journal.stat().st_size
    tracemalloc.start()
    try:
        entries = read_journal(journal)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(entries) == keys
    assert len({id(e) for e in entries.values()}) == 2  # shared, not one record per key
    # the file is never held whole, nor a record dict per key: about 100 octets a key
    assert peak < size / 2, (peak, size)
    assert peak < 200 * keys, peak


async def test_a_line_of_a_gigabyte_is_not_read_into_memory(tmp_path: Path) -> None:
    journal = tmp_path / "huge.jsonl"
    with journal.open("wb") as out:
        out.write(HEADER)
        out.truncate(1 << 30)  # a hole: a 1 GB line of NULs, no disk used
    tracemalloc.start()
    try:
        with pytest.raises(JournalFormatError, match="longer than"):
            await Journal.open(journal, resume=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MAX_LINE, peak
    assert journal.stat().st_size == 1 << 30  # refused, not changed
