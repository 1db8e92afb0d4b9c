"""A private redis-server on loopback for the Celery and shared-state tests (the
``redis`` marker): Debian's ``redis-server`` started from a configuration written in a
temporary folder, on a free port of 127.0.0.1, with its append-only file on (fsync
always, as the README asks of a campaign's Redis), stopped at teardown.

>>> def test_x(redis_server): redis_server.url  # 'redis://127.0.0.1:PORT/0'
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import free_port

__all__ = ["RedisServer", "redis_server", "started"]

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class RedisServer:
    """One redis-server process in ``folder`` (its configuration, log and data)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        config = self.folder / "redis.conf"
        config.write_text(
            f"bind {self.host}\nport {self.port}\nprotected-mode yes\n"
            f"dir {self.folder}\nlogfile {self.folder / 'redis.log'}\n"
            "daemonize no\nsave ''\nappendonly yes\nappendfsync always\n"
            "databases 4\nmaxclients 1000\n"
        )
        self.process = subprocess.Popen(
            [REDIS_SERVER, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        log = self.folder / "redis.log"
        self.stop()
        raise RuntimeError(
            "redis-server did not start: " + (log.read_text()[-2000:] if log.exists() else "")
        )

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def started(folder: Path) -> RedisServer:
    """A redis-server started in ``folder`` (created)."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
    folder.mkdir(parents=True, exist_ok=True)
    return RedisServer(folder).start()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A started private redis-server, stopped at teardown."""
    server = started(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()
