"""``asmtp demo``: a local SMTP server on loopback (no outside network) that keeps every
message it receives as a ``.eml`` file, for trying asmtp out.

It is the test outbox (:class:`asmtp.testing.Outbox`) with a folder behind it, so it
needs aiosmtpd, which the ``cli`` extra installs (``pip install 'asmtp[cli]'``). The
folder is checked when the server is made: one that cannot be made or written to is an
:class:`~asmtp.errors.InputError`, before anything is sent.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
from pathlib import Path

from .errors import InputError
from .testing import Outbox, SentMessage

__all__ = ["LocalServer"]


class LocalServer(Outbox):
    """An SMTP server on 127.0.0.1; each message lands in ``directory`` (a new
    temporary folder unless given) as ``NNNNN-recipient.eml``, with its envelope in
    ``X-Envelope-From``/``X-Envelope-To`` header lines.

    >>> async with LocalServer() as server:
    ...     relay = asmtp.Relay(server.host, server.port, tls="none")
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="asmtp-demo-"))
        _check_folder(self.directory)
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        super().__init__(hostname="demo.asmtp.test", on_message=self._keep)

    @property
    def received(self) -> int:
        return len(self)

    def _keep(self, message: SentMessage) -> None:
        with self._lock:
            number = next(self._numbers)
        rcpts = ",".join(message.rcpt_tos)
        path = self.directory / f"{number:05d}-{rcpts[:60].replace('/', '_')}.eml"
        envelope = f"X-Envelope-From: <{message.mail_from}>\r\nX-Envelope-To: {rcpts}\r\n"
        path.write_bytes(envelope.encode() + message.data)


def _check_folder(directory: Path) -> None:
    """Make ``directory`` if needed and try writing in it: a file, a path under a
    file, or a place that cannot be written (a read-only mount, /proc) is refused now
    rather than as a failure in the server's thread for every message."""
    shown = str(directory)
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{shown!r} is not a folder")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise InputError(f"cannot keep messages in {shown!r}: {exc.strerror}") from None
