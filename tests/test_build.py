"""The wheel, as ``pip`` builds it from this checkout: pure Python by default, and with
``ASMTP_COMPILE=1`` (hatch_build.py) the hot path compiled by mypyc, still sending mail.

Both builds run in this environment (``--no-build-isolation``: hatchling, mypy and
setuptools come with the test extra), so nothing is downloaded.
"""

from __future__ import annotations

import email
import importlib.metadata
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from servers import SMTPTestServer

MakeServer = Callable[..., SMTPTestServer]

REPO = Path(__file__).resolve().parent.parent
COMPILED = ("reply", "capabilities", "protocol", "steps", "endpoint", "transaction", "session")


def build_wheel(out: Path, *, compile: bool) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "ASMTP_COMPILE"}
    if compile:
        env["ASMTP_COMPILE"] = "1"
    command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps"]
    command += ["--quiet", "--wheel-dir", str(out), str(REPO)]
    subprocess.run(command, env=env, check=True, timeout=300, capture_output=True)
    [wheel] = out.glob("asmtp-*.whl")
    return wheel


def extensions(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith((".so", ".pyd"))]
    return {n.split("/")[-1].split(".")[0] for n in names}


@pytest.fixture(scope="module")
def default_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("dist"), compile=False)


def test_the_default_wheel_is_pure_python(default_wheel: Path) -> None:
    assert default_wheel.name.endswith("-py3-none-any.whl")
    assert extensions(default_wheel) == set()


def test_the_wheel_declares_what_the_installed_package_does(default_wheel: Path) -> None:
    """tests/test_dependencies.py reads the installed metadata; the wheel, what pip
    installs from a fresh checkout, declares the same requirements and pytest plugin."""
    with zipfile.ZipFile(default_wheel) as zf:
        info = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(zf.read(info))
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert sorted(metadata.get_all("Requires-Dist") or []) == sorted(
        importlib.metadata.requires("asmtp") or []
    )
    assert "[pytest11]\nasmtp = asmtp._pytest_plugin\n" in entry_points


@pytest.mark.compiled
@pytest.mark.timeout(300)
def test_a_compiled_wheel_runs_the_hot_path_as_extensions(
    tmp_path: Path, smtp_server: MakeServer
) -> None:
    wheel = build_wheel(tmp_path / "dist", compile=True)
    assert not wheel.name.endswith("-none-any.whl")  # a platform wheel
    assert set(COMPILED) <= extensions(wheel)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    server = smtp_server()
    script = f"""
import asyncio, asmtp, asmtp._delivery.session
assert asmtp._delivery.session.__file__.endswith((".so", ".pyd")), asmtp._delivery.session.__file__
report = asyncio.run(asmtp.sendmail(
    to="a@example.org, b@example.org", from_="s@example.com", subject="compiled",
    body="hello", relay=asmtp.Relay("{server.host}", {server.port}, tls="none")))
print(sorted(r.status for r in report))
"""
    env = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['delivered', 'delivered']"
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == [
        "a@example.org",
        "b@example.org",
    ]
