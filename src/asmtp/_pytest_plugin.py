"""asmtp's pytest plugin (the ``pytest11`` entry point ``asmtp``): owns the
``asmtp_outbox`` fixture, and nothing else.

pytest loads this module in every run of every project where asmtp is installed, so it
imports nothing but pytest (and the ``asmtp`` package it sits in): the outbox
(:class:`asmtp.testing.Outbox`, an SMTP server built on aiosmtpd) is imported when a
test asks for the fixture. Without aiosmtpd that test fails with a line naming the
extra to install (``asmtp[testing]``); the project's other tests run as before.

PYTEST_DONT_REWRITE: pytest loads this module as a plugin; it has no test asserts to
rewrite.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .testing import Outbox

__all__ = ["asmtp_outbox"]


@pytest.fixture
def asmtp_outbox() -> Iterator[Outbox]:
    """A started :class:`asmtp.testing.Outbox` for one test, stopped afterwards.

    Send with ``relay=asmtp_outbox.relay``; assert on ``asmtp_outbox.messages``.
    """
    with _outbox_class()() as outbox:
        yield outbox


def _outbox_class() -> type[Outbox]:
    """:class:`asmtp.testing.Outbox`, imported now (it brings aiosmtpd), or the test
    fails with the one line that says what to install."""
    try:
        from .testing import Outbox
    except ModuleNotFoundError as exc:
        missing = exc
    else:
        return Outbox
    pytest.fail(f"asmtp_outbox: {missing}", pytrace=False)  # outside the except: no chain
