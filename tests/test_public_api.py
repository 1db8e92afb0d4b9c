"""The public surface as users see it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import asmtp


def test_all_is_a_tuple_of_importable_names() -> None:
    assert isinstance(asmtp.__all__, tuple)
    assert len(set(asmtp.__all__)) == len(asmtp.__all__)
    for name in asmtp.__all__:
        assert getattr(asmtp, name) is not None, name


def test_one_exception_tree() -> None:
    errors = [getattr(asmtp, n) for n in asmtp.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, asmtp.SMTPError) for e in errors)
    assert issubclass(asmtp.InputError, ValueError)
    assert issubclass(asmtp.SMTPTimeoutError, TimeoutError)


def test_relay_is_frozen_and_secure_by_default() -> None:
    relay = asmtp.Relay("smtp.example.com")
    assert (relay.port, relay.tls, relay.allow_plaintext_auth) == (587, "starttls", False)
    assert asmtp.Relay("smtp.example.com", 465).tls == "implicit"
    with pytest.raises(AttributeError):
        relay.port = 25  # type: ignore[misc]
    assert "p4ss" not in repr(asmtp.Relay("h.example", username="u", password="p4ss"))
    with pytest.raises(asmtp.InputError):
        asmtp.Relay("smtp.example.com", tls="sometimes")  # type: ignore[arg-type]
    with pytest.raises(asmtp.InputError):
        asmtp.Relay("smtp.example.com", username="u")  # a user needs a password


def test_timeouts() -> None:
    assert asmtp.Timeouts.of(5).command == 5.0
    assert asmtp.Timeouts.of(None).data_end is None
    rfc = asmtp.Timeouts.rfc5321()
    assert (rfc.connect, rfc.command, rfc.data_block, rfc.data_end) == (300, 300, 180, 600)
    with pytest.raises(asmtp.InputError):
        asmtp.Timeouts.of(-1)


def test_typed_usage_passes_mypy_strict() -> None:
    here = Path(__file__).parent
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-incremental",
            str(here / "typed_usage.py"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
