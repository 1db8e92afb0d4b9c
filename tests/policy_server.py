"""A loopback HTTPS server playing ``mta-sts.<domain>`` for the MTA-STS tests: the
standard library's HTTP server under a trustme certificate, in a thread, counting the
policy fetches it answers.

    server = PolicyServer(ca, "example.test", POLICY).start()
    Direct(..., sts_port=server.port)   # the zone says: mta-sts A 127.0.0.9
    server.fetches                      # how many GETs of the policy came
    server.stop()

``policy`` (the body), ``status``, ``content_type`` and ``location`` (a redirect) can
be changed while it runs; ``names`` are the certificate's names (default
``mta-sts.<domain>``).
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import trustme

from servers import free_port

__all__ = ["PolicyServer", "policy_server"]

POLICY_PATH = "/.well-known/mta-sts.txt"


class PolicyServer:
    def __init__(
        self,
        ca: trustme.CA,
        domain: str,
        policy: str,
        *,
        host: str = "127.0.0.9",
        port: int = 0,
        names: tuple[str, ...] = (),
    ) -> None:
        self.domain = domain
        self.policy = policy
        self.status = 200
        self.content_type = "text/plain"
        self.location: str | None = None
        self.host = host
        self.port = port or free_port(host)
        self.fetches = 0
        self.hosts_asked: list[str] = []
        self._lock = threading.Lock()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert(*(names or (f"mta-sts.{domain}",))).configure_cert(context)
        self._context = context
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> PolicyServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.hosts_asked.append(self.headers.get("Host", ""))
                    if self.path == POLICY_PATH:
                        owner.fetches += 1
                body = owner.policy.encode() if self.path == POLICY_PATH else b"not here"
                status = owner.status if self.path == POLICY_PATH else 404
                self.send_response(status)
                if owner.location is not None:
                    self.send_header("Location", owner.location)
                self.send_header("Content-Type", owner.content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer((self.host, self.port), Handler)
        server.daemon_threads = True
        server.socket = self._context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


@pytest.fixture
def policy_server(ca: trustme.CA) -> Iterator[Callable[..., PolicyServer]]:
    """``make(domain, policy, **options)`` starts a :class:`PolicyServer` under the
    session CA; every one started is stopped at teardown."""
    started: list[PolicyServer] = []

    def make(domain: str, policy: str, **options: Any) -> PolicyServer:
        server = PolicyServer(ca, domain, policy, **options)
        started.append(server.start())
        return server

    yield make
    for server in started:
        server.stop()
