"""asmtp.sync: the async API from plain threads, on one background event loop per
process; pooled sessions shared by many threads, a loop of its own in a forked child,
a clean stop at exit, and a clear refusal inside a running event loop."""

from __future__ import annotations

import collections
import functools
import inspect
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import anyio
import pytest

import asmtp
import asmtp.sync
from asmtp.errors import RunningLoopError
from asmtp.testing import Outbox
from servers import FaultServer, SMTPTestServer, wait_until

MakeServer = Callable[..., SMTPTestServer]
MakeFault = Callable[..., FaultServer]


def message(seq: str, to: str = "ann@example.org") -> EmailMessage:
    return asmtp.build_message(
        to=to, from_="app@example.com", subject=f"hello {seq}", body="hi", headers={"X-Seq": seq}
    )


def sequence_numbers(outbox: Outbox) -> list[str]:
    return sorted(str(m.message["X-Seq"]) for m in outbox.messages)


def open_fds() -> int | None:
    for folder in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(folder):
            return len(os.listdir(folder))
    return None


def test_sendmail_and_send_from_a_plain_thread(asmtp_outbox: Outbox) -> None:
    with ThreadPoolExecutor(1) as thread:
        report = thread.submit(
            asmtp.sync.sendmail,
            to="ann@example.org, bob@example.net",
            from_="app@example.com",
            subject="Welcome",
            body="Glad you are here.",
            relay=asmtp_outbox.relay,
        ).result()
    assert isinstance(report, asmtp.Report)
    assert [(r.recipient, r.status, r.code) for r in report] == [
        ("ann@example.org", "delivered", 250),
        ("bob@example.net", "delivered", 250),
    ]
    report = asmtp.sync.send(message("1"), relay=asmtp_outbox.relay)
    assert report.ok and isinstance(report[0], asmtp.RecipientResult)
    assert [m.subject for m in asmtp_outbox.messages] == ["Welcome", "Welcome", "hello 1"]


def test_a_pooled_mailer_keeps_one_tls_session_and_says_quit_on_close(
    smtp_server: MakeServer,
    tls_server_context: ssl.SSLContext,
    tls_client_context: ssl.SSLContext,
) -> None:
    server = smtp_server(
        starttls_context=tls_server_context, auth={"app": "secret"}, auth_required=True
    )
    relay = asmtp.Relay(
        "127.0.0.1", server.port, username="app", password="secret", ssl_context=tls_client_context
    )
    with asmtp.sync.Mailer(relay) as mailer:
        for n in range(3):
            [result] = mailer.send(message(str(n)))
            assert (result.status, result.tls) == ("delivered", "verified")
        assert mailer.sessions_opened == server.sessions_opened == 1
    assert server.wait_idle()
    assert [verb for verb, _ in server.commands].count("QUIT") == 1
    assert [(m.tls, m.auth_user) for m in server.messages] == [(True, "app")] * 3


def test_shutdown_closes_the_mailers_and_a_later_send_opens_anew(asmtp_outbox: Outbox) -> None:
    mailer = asmtp.sync.Mailer(asmtp_outbox.relay)
    assert mailer.send(message("1")).ok
    asmtp.sync.shutdown()
    assert not [t for t in threading.enumerate() if t.name == "asmtp-sync"]
    assert mailer.send(message("2")).ok  # on a new loop, with a new session
    assert asmtp_outbox.sessions_opened == 2
    mailer.close()
    with pytest.raises(asmtp.InputError, match="closed"):
        mailer.send(message("3"))
    assert sequence_numbers(asmtp_outbox) == ["1", "2"]


def test_settings_are_checked_when_the_mailer_is_made() -> None:
    with pytest.raises(asmtp.InputError, match="concurrency"):
        asmtp.sync.Mailer(asmtp.Relay("smtp.example.com"), concurrency=0)
    with pytest.raises(asmtp.InputError, match="pool"):
        asmtp.sync.Mailer(asmtp.Direct(), pool=True)
    with pytest.raises(asmtp.InputError, match="call_timeout"):
        asmtp.sync.Mailer(asmtp.Relay("smtp.example.com"), call_timeout=float("nan"))


def test_the_mailer_takes_every_setting_of_asmtp_mailer() -> None:
    parameters = inspect.signature(asmtp.Mailer).parameters
    assert set(asmtp.sync.MailerOptions.__annotations__) == set(parameters) - {"relay", "pool"}
    assert inspect.signature(asmtp.sync.sendmail) == inspect.signature(asmtp.sendmail)
    assert inspect.signature(asmtp.sync.send) == inspect.signature(asmtp.send)


def test_a_call_never_waits_longer_than_its_call_timeout(fault_server: MakeFault) -> None:
    server = fault_server(greeting="silence")
    relay = asmtp.Relay(server.host, server.port, tls="none")
    mailer = asmtp.sync.Mailer(relay, retry=None, call_timeout=0.25)
    with pytest.raises(asmtp.SMTPTimeoutError, match="call_timeout"):
        mailer.send(message("1"))
    with pytest.raises(asmtp.SMTPTimeoutError, match="call_timeout"):
        asmtp.sync.run(asmtp.send(message("2"), relay=relay), call_timeout=0.25)
    assert server.wait_idle()  # the cancelled sessions were closed
    mailer.close()


def test_a_hundred_threads_twenty_sends_each_every_message_once(asmtp_outbox: Outbox) -> None:
    asmtp.sync.shutdown()  # no loop yet: whatever is left afterwards, the run leaked
    threads, fds = set(threading.enumerate()), open_fds()
    pool = asmtp.Pool(max_connections=10, max_messages=1000)  # none retires during the run
    mailer = asmtp.sync.Mailer(asmtp_outbox.relay, pool=pool)
    start = threading.Barrier(100)

    def sender(thread: int) -> list[str]:
        start.wait()
        statuses = []
        for n in range(20):
            # Ready bytes: the run measures the sends, not the building of 2000 messages.
            data = f"From: app@example.com\r\nX-Seq: {thread}-{n}\r\n\r\nhi\r\n".encode()
            report = mailer.send(data, sender="app@example.com", recipients="ann@example.org")
            statuses += [result.status for result in report]
        return statuses

    with ThreadPoolExecutor(100) as pool:
        statuses = [status for done in pool.map(sender, range(100)) for status in done]
    assert statuses == ["delivered"] * 2000
    seen = collections.Counter(str(m.message["X-Seq"]) for m in asmtp_outbox.messages)
    assert seen == {f"{t}-{n}": 1 for t in range(100) for n in range(20)}
    assert asmtp_outbox.sessions_opened <= 10
    mailer.close()
    asmtp.sync.shutdown()
    assert wait_until(lambda: set(threading.enumerate()) <= threads), threading.enumerate()
    if fds is not None:
        assert wait_until(lambda: (open_fds() or 0) <= fds), (open_fds(), fds)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_sends_on_a_loop_of_its_own(asmtp_outbox: Outbox) -> None:
    mailer = asmtp.sync.Mailer(asmtp_outbox.relay)
    assert mailer.send(message("parent-1")).ok  # the parent's loop and session exist
    pid = os.fork()
    if pid == 0:  # the child: its own loop for the same Mailer, and for a one-off send
        code = 1
        try:
            ok = mailer.send(message("child-1")).ok
            ok = ok and asmtp.sync.send(message("child-2"), relay=asmtp_outbox.relay).ok
            asmtp.sync.shutdown()
            code = 0 if ok else 2
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30.0
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child did not finish")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert mailer.send(message("parent-2")).ok
    assert mailer.sessions_opened == 1  # the parent's pooled session outlived the fork
    assert sequence_numbers(asmtp_outbox) == ["child-1", "child-2", "parent-1", "parent-2"]
    mailer.close()


EXITING_SCRIPT = """\
import sys
import asmtp, asmtp.sync

relay = asmtp.Relay("127.0.0.1", int(sys.argv[1]), tls="none")
mailer = asmtp.sync.Mailer(relay)
message = asmtp.build_message(to="ann@example.org", from_="app@example.com", body="hi")
print(mailer.send(message).ok)
# no close(): the exit handler closes the Mailer and stops the loop
"""


def test_the_process_exits_cleanly_and_the_pooled_session_says_quit(
    smtp_server: MakeServer, tmp_path: Path
) -> None:
    server = smtp_server()
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(server.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "True\n", "")
    assert server.wait_idle()
    assert [verb for verb, _ in server.commands][-1] == "QUIT"


@pytest.mark.anyio
async def test_a_call_from_inside_an_event_loop_is_refused(asmtp_outbox: Outbox) -> None:
    relay = asmtp_outbox.relay
    calls: list[Callable[[], object]] = [
        functools.partial(asmtp.sync.send, message("1"), relay=relay),
        functools.partial(asmtp.sync.sendmail, "ann@example.org", "app@example.com", relay=relay),
        functools.partial(asmtp.sync.run, asmtp.send(message("1"), relay=relay)),
        functools.partial(asmtp.sync.Mailer, relay),
        asmtp.sync.shutdown,
    ]
    for call in calls:
        with pytest.raises(RunningLoopError, match="use the async API here"):
            call()
    with pytest.raises(RunningLoopError, match=r"await asmtp\.sendmail\(\.\.\.\)"):
        asmtp.sync.sendmail("ann@example.org", "app@example.com", relay=relay)
    assert issubclass(RunningLoopError, RuntimeError) and issubclass(
        RunningLoopError, asmtp.SMTPError
    )
    # A worker thread runs no loop: there the sync API serves, for a Mailer made there too.
    mailer = await anyio.to_thread.run_sync(asmtp.sync.Mailer, relay)
    with pytest.raises(RunningLoopError, match=r"await mailer\.send"):
        mailer.send(message("2"))
    report = await anyio.to_thread.run_sync(mailer.send, message("3"))
    assert report.ok
    await anyio.to_thread.run_sync(mailer.close)
    assert sequence_numbers(asmtp_outbox) == ["3"]
