"""``asmtp demo``: a local SMTP server on loopback (no outside network) that keeps every
message it receives as a ``.eml`` file, for trying asmtp out.

It is the test outbox (:class:`asmtp.testing.Outbox`) with a folder behind it.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
from pathlib import Path

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
        self.directory.mkdir(parents=True, exist_ok=True)
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
