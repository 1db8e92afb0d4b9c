"""Dependencies by audience: sending mail needs anyio, dnspython and idna; the ``asmtp``
command (rich, and aiosmtpd for ``asmtp demo``) and the test outbox (aiosmtpd) are extras.

Each claim is checked on the real thing: the installed package's metadata, a fresh
interpreter's ``sys.modules``, pytest runs of a small project, and processes in which
rich and aiosmtpd cannot be imported (a ``sitecustomize`` on ``PYTHONPATH`` puts a finder
first on ``sys.meta_path`` that refuses them, as an interpreter without them would).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from dnsserver import DNSServer
from servers import SMTPTestServer

MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]

#: the console script pip installed beside this interpreter
ASMTP = Path(sys.executable).with_name("asmtp")

BLOCKER = """\
import sys


class RefuseExtras:
    \"\"\"Refuses the packages in ``blocked``, as if they were not installed.\"\"\"

    blocked = frozenset({blocked!r})

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, RefuseExtras())
"""


def without(tmp_path: Path, blocked: Collection[str]) -> dict[str, str]:
    """The environment of a process in which ``blocked`` packages cannot be imported."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted(blocked)))
    return dict(os.environ, PYTHONPATH=str(site))


def run(
    command: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def python(script: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-c", script], env=env)


# --------------------------------------------------------------------------- metadata


def requirements() -> list[Requirement]:
    return [Requirement(line) for line in importlib.metadata.requires("asmtp") or []]


def names_for(extra: str | None) -> set[str]:
    """The packages installing asmtp (with ``extra``) adds, on this platform."""
    environment = {"extra": extra or ""}
    return {r.name for r in requirements() if r.marker is None or r.marker.evaluate(environment)}


def test_sending_mail_needs_only_anyio_dnspython_and_idna() -> None:
    unconditional = {r.name for r in requirements() if r.marker is None}
    assert unconditional == {"anyio", "dnspython", "idna"}


@pytest.mark.parametrize(
    ("extra", "brings"),
    [
        ("cli", {"rich", "aiosmtpd"}),
        ("testing", {"aiosmtpd"}),
        ("test", {"rich", "aiosmtpd", "dkimpy", "pytest", "pytest-asyncio", "trio"}),
        ("bench", {"rich", "aiosmtplib"}),
    ],
)
def test_each_extra_brings_what_its_audience_needs(extra: str, brings: set[str]) -> None:
    assert brings <= names_for(extra) - names_for(None)


def test_the_pytest_plugin_entry_point_is_the_thin_module() -> None:
    [plugin] = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "asmtp"]
    assert plugin.value == "asmtp._pytest_plugin"


# --------------------------------------------------------------------------- imports


def test_importing_asmtp_and_its_pytest_plugin_loads_no_extra() -> None:
    done = python(
        "import sys, asmtp, asmtp._pytest_plugin\n"
        "print(sorted({m.partition('.')[0] for m in sys.modules} & {'aiosmtpd', 'rich'}))\n"
        "print('asmtp.testing' in sys.modules)"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "False"]


PROJECT_TESTS = """\
import sys


def test_a_test_without_the_fixture():
    assert "asmtp._pytest_plugin" in sys.modules  # pytest loaded asmtp's plugin
    assert "aiosmtpd" not in sys.modules
    assert "asmtp.testing" not in sys.modules


def test_a_test_with_the_fixture(asmtp_outbox):
    assert asmtp_outbox.relay.port == asmtp_outbox.port > 0
"""


def pytest_project(tmp_path: Path, env: Mapping[str, str] | None = None) -> str:
    """Run pytest, as another project would, on a test file of that project."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_project.py").write_text(PROJECT_TESTS)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    # hypothesis's plugin (installed here, unrelated to asmtp) would double the start-up
    command += ["-p", "no:hypothesispytest", "-p", "no:randomly"]
    done = run([*command, "test_project.py"], env=env, cwd=project)
    return done.stdout + done.stderr


def test_another_projects_pytest_loads_the_outbox_only_for_the_fixture(tmp_path: Path) -> None:
    output = pytest_project(tmp_path)
    assert "2 passed" in output, output


def test_without_aiosmtpd_only_the_fixtures_test_fails_and_it_says_why(tmp_path: Path) -> None:
    output = pytest_project(tmp_path, without(tmp_path, {"aiosmtpd"}))
    assert "1 passed, 1 error" in output, output
    assert "asmtp_outbox: asmtp's test outbox" in output
    assert "needs aiosmtpd: pip install 'asmtp[testing]'" in output
    assert "Traceback" not in output
    assert "During handling" not in output
    assert "direct cause" not in output


# --------------------------------------------------------------------------- without extras


def test_without_rich_and_aiosmtpd_asmtp_still_sends(
    tmp_path: Path, smtp_server: MakeServer
) -> None:
    server = smtp_server()
    script = f"""
import asyncio, sys
import asmtp
report = asyncio.run(asmtp.sendmail(
    to="a@example.org, b@example.org", from_="s@example.com", subject="lean",
    body="hello", relay=asmtp.Relay("{server.host}", {server.port}, tls="none")))
print(sorted(r.status for r in report))
print(sorted({{m.partition(".")[0] for m in sys.modules}} & {{"aiosmtpd", "rich"}}))
"""
    done = python(script, without(tmp_path, {"aiosmtpd", "rich"}))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["['delivered', 'delivered']", "[]"]
    assert sorted(r for m in server.messages for r in m.rcpt_tos) == [
        "a@example.org",
        "b@example.org",
    ]


def test_without_aiosmtpd_the_outbox_import_names_the_extra(tmp_path: Path) -> None:
    done = python("import asmtp.testing", without(tmp_path, {"aiosmtpd"}))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "ModuleNotFoundError: asmtp's test outbox (asmtp.testing, asmtp.testing) needs"
        " aiosmtpd: pip install 'asmtp[testing]'"
    )


@pytest.mark.parametrize(
    ("blocked", "missing"),
    [({"aiosmtpd", "rich"}, "rich"), ({"aiosmtpd"}, "aiosmtpd"), ({"rich"}, "rich")],
)
def test_asmtp_demo_without_the_cli_extra_says_which_to_install(
    tmp_path: Path, blocked: set[str], missing: str
) -> None:
    done = run([str(ASMTP), "demo", "--recipients", "3"], env=without(tmp_path, blocked))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"asmtp: error: asmtp demo needs {missing}, which the cli extra installs:"
        " pip install 'asmtp[cli]'\n"
    )


def test_asmtp_send_without_rich_says_so_before_sending(
    tmp_path: Path, smtp_server: MakeServer
) -> None:
    server = smtp_server()
    relay = ["--relay", f"{server.host}:{server.port}", "--tls", "none"]
    command = [str(ASMTP), "send", "--from", "s@example.com", "--to", "a@example.org"]
    command += ["--subject", "hi", "--body", "hi", "--json", *relay]
    done = run(command, env=without(tmp_path, {"rich"}))
    assert done.returncode == 2
    assert done.stderr == (
        "asmtp: error: asmtp send needs rich, which the cli extra installs:"
        " pip install 'asmtp[cli]'\n"
    )
    assert server.messages == []
    assert server.sessions_opened == 0


def test_asmtp_mx_needs_no_extra(tmp_path: Path, dns_server: MakeDNS) -> None:
    dns = dns_server({"example.test": "@ MX 10 mx1\nmx1 A 127.0.0.2"})
    command = [str(ASMTP), "mx", "example.test", "--dns-server", dns.spec, "--json"]
    done = run(command, env=without(tmp_path, {"aiosmtpd", "rich"}))
    assert done.returncode == 0, done.stderr
    assert '"host": "mx1.example.test"' in done.stdout
