"""Shared fixtures: real SMTP servers (aiosmtpd and a byte-level fault server), a real
DNS server and TLS material, all on loopback. See servers.py and dnsserver.py.

Also the event loops a test runs on: a coroutine test runs on asyncio (pytest-asyncio,
``asyncio_mode = "auto"``); one marked ``anyio`` runs once on asyncio and once on trio
(anyio's pytest plugin, with the ``anyio_backend`` fixture below).
"""

from __future__ import annotations

import pytest
from pytest_asyncio import is_async_test

from dnsserver import dns_server
from servers import (
    ca,
    ca_pem_file,
    fault_server,
    smtp_server,
    tls_client_context,
    tls_server_context,
)

__all__ = [
    "anyio_backend",
    "ca",
    "ca_pem_file",
    "dns_server",
    "fault_server",
    "smtp_server",
    "tls_client_context",
    "tls_server_context",
]

#: the event loops a test marked ``anyio`` runs on, each in turn
BACKENDS = ("asyncio", "trio")


@pytest.fixture(scope="module", params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """The event loop anyio's plugin runs this test on (named, so that a missing trio
    fails the run instead of quietly leaving it out)."""
    backend: str = request.param
    return backend


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Hand the tests marked ``anyio`` back to anyio's plugin.

    pytest-asyncio in auto mode claims every coroutine test, marked or not, and runs it
    on asyncio whatever ``anyio_backend`` names; such a test is made a plain test item
    again (as collected before pytest-asyncio took it), which anyio's plugin runs.
    """
    for index, item in enumerate(items):
        if not (is_async_test(item) and item.get_closest_marker("anyio") is not None):
            continue
        plain = pytest.Function.from_parent(
            item.parent,
            name=item.name,
            callspec=getattr(item, "callspec", None),
            callobj=item.obj,
            fixtureinfo=item._fixtureinfo,
            keywords={k: v for k, v in item.keywords.items() if k != "asyncio"},
            originalname=item.originalname,
        )
        plain.own_markers = [m for m in item.own_markers if m.name != "asyncio"]
        items[index] = plain
