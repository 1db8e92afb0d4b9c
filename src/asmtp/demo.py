"""``asmtp demo``: a local SMTP server on loopback (aiosmtpd, no outside network) that
keeps every message it receives as a ``.eml`` file, and a fan-out through it.

Uses only the public API, as a newcomer would.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller

__all__ = ["LocalServer"]


@dataclass
class _Saver:
    directory: Path
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.count += 1
            n = self.count
        rcpts = ",".join(envelope.rcpt_tos)
        path = self.directory / f"{n:05d}-{rcpts[:60].replace('/', '_')}.eml"
        content = envelope.original_content or envelope.content or b""
        if isinstance(content, str):
            content = content.encode()
        header = f"X-Envelope-From: <{envelope.mail_from}>\r\nX-Envelope-To: {rcpts}\r\n"
        path.write_bytes(header.encode() + content)
        return f"250 2.0.0 Ok: kept as {path.name}"


class LocalServer:
    """An SMTP server on 127.0.0.1 for trying asmtp out. Messages land in
    ``directory`` (a new temporary folder unless given)."""

    def __init__(self, directory: str | Path | None = None, port: int = 0) -> None:
        self.directory = Path(directory or tempfile.mkdtemp(prefix="asmtp-demo-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.handler = _Saver(self.directory)
        self.host = "127.0.0.1"
        self.port = port or _free_port(self.host)
        self._controller = Controller(
            self.handler,
            hostname=self.host,
            port=self.port,
            server_hostname="demo.asmtp.test",
            ready_timeout=10.0,
            server_kwargs={"enable_SMTPUTF8": True},
        )

    @property
    def received(self) -> int:
        return self.handler.count

    def start(self) -> LocalServer:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    async def __aenter__(self) -> LocalServer:
        await asyncio.get_running_loop().run_in_executor(None, self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.stop)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
