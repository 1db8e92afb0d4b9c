"""TLS-RPT (RFC 8460): the aggregate report's structure, checked against the shape RFC
8460 section 4.4 gives (encoded below as a small schema; the RFC's own example report
passes it), the counting log (bounded, merged, saved and read back), and the command
line as people run it: ``asmtp send --tlsrpt FILE`` then ``asmtp tlsrpt FILE``, and
``asmtp mx --json`` showing each domain's TLS policy."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import trustme

from asmtp._core.tlsrpt import MAX_FAILURE_KINDS, RESULT_TYPES, ReportPolicy, TLSReportLog
from asmtp.cli.main import main
from dnsserver import DNSServer
from policy_server import PolicyServer, policy_server
from servers import SMTPTestServer, free_port, server_ssl_context
from test_tlspolicy import ZONE, policy

__all__ = ["policy_server"]  # the fixture, used by name

MakeServer = Callable[..., SMTPTestServer]
MakeDNS = Callable[..., DNSServer]
MakePolicy = Callable[..., PolicyServer]

# --------------------------------------------------------------------------- the shape

_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)")


def _ip(value: object) -> bool:
    try:
        ipaddress.ip_address(str(value))
    except ValueError:
        return False
    return True


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _text(value: object) -> bool:
    return isinstance(value, str) and bool(value)


#: RFC 8460 section 4.4: each object's fields, (check, required); no other field allowed
SCHEMA: dict[str, dict[str, tuple[Callable[[Any], bool] | str, bool]]] = {
    "report": {
        "organization-name": (_text, True),
        "date-range": ("date-range", True),
        "contact-info": (_text, True),
        "report-id": (_text, True),
        "policies": ("policies", True),
    },
    "date-range": {
        "start-datetime": (lambda v: bool(_DATETIME.fullmatch(str(v))), True),
        "end-datetime": (lambda v: bool(_DATETIME.fullmatch(str(v))), True),
    },
    "policy-entry": {
        "policy": ("policy", True),
        "summary": ("summary", True),
        "failure-details": ("failure-details", False),
    },
    "policy": {
        "policy-type": (lambda v: v in ("tlsa", "sts", "no-policy-found"), True),
        "policy-string": (_strings, False),
        "policy-domain": (_text, True),
        "mx-host": (_strings, False),
    },
    "summary": {
        "total-successful-session-count": (_count, True),
        "total-failure-session-count": (_count, True),
    },
    "failure-detail": {
        "result-type": (lambda v: v in RESULT_TYPES, True),
        "sending-mta-ip": (_ip, False),
        "receiving-mx-hostname": (_text, False),
        "receiving-mx-helo": (_text, False),
        "receiving-ip": (_ip, False),
        "failed-session-count": (_count, True),
        "additional-information": (_text, False),
        "failure-reason-code": (_text, False),
    },
}


def problems(value: Any, kind: str = "report", where: str = "$") -> list[str]:
    """Where ``value`` departs from the shape of ``kind`` (empty: it conforms)."""
    if kind == "policies":
        if not isinstance(value, list) or not value:
            return [f"{where}: a non-empty array"]
        return [
            p for i, v in enumerate(value) for p in problems(v, "policy-entry", f"{where}[{i}]")
        ]
    if kind == "failure-details":
        if not isinstance(value, list):
            return [f"{where}: an array"]
        return [
            p for i, v in enumerate(value) for p in problems(v, "failure-detail", f"{where}[{i}]")
        ]
    if not isinstance(value, Mapping):
        return [f"{where}: an object"]
    fields = SCHEMA[kind]
    found = [f"{where}.{k}: not a field of {kind}" for k in value if k not in fields]
    for name, (check, required) in fields.items():
        if name not in value:
            if required:
                found.append(f"{where}.{name}: missing")
        elif isinstance(check, str):
            found += problems(value[name], check, f"{where}.{name}")
        elif not check(value[name]):
            found.append(f"{where}.{name}: {value[name]!r} is not valid")
    return found


#: RFC 8460 section 4.6's example report, as the RFC prints it
RFC_EXAMPLE = {
    "organization-name": "Company-X",
    "date-range": {
        "start-datetime": "2016-04-01T00:00:00Z",
        "end-datetime": "2016-04-01T23:59:59Z",
    },
    "contact-info": "sts-reporting@company-x.example",
    "report-id": "5065427c-23d3-47ca-b6e0-946ea0e8c4be",
    "policies": [
        {
            "policy": {
                "policy-type": "sts",
                "policy-string": [
                    "version: STSv1",
                    "mode: testing",
                    "mx: *.mail.company-y.example",
                    "max_age: 86400",
                ],
                "policy-domain": "company-y.example",
                "mx-host": ["*.mail.company-y.example"],
            },
            "summary": {
                "total-successful-session-count": 5326,
                "total-failure-session-count": 303,
            },
            "failure-details": [
                {
                    "result-type": "certificate-expired",
                    "sending-mta-ip": "2001:db8:abcd:0012::1",
                    "receiving-mx-hostname": "mx1.mail.company-y.example",
                    "failed-session-count": 100,
                },
                {
                    "result-type": "starttls-not-supported",
                    "sending-mta-ip": "2001:db8:abcd:0013::1",
                    "receiving-mx-hostname": "mx2.mail.company-y.example",
                    "receiving-ip": "203.0.113.56",
                    "failed-session-count": 200,
                    "additional-information": "https://reports.company-x.example/"
                    "report_info?id=5065427c-23d3#StarttlsNotSupported",
                },
                {
                    "result-type": "validation-failure",
                    "sending-mta-ip": "198.51.100.62",
                    "receiving-ip": "203.0.113.58",
                    "receiving-mx-hostname": "mx-backup.mail.company-y.example",
                    "failed-session-count": 3,
                    "failure-reason-code": "X509_V_ERR_PROOF_OF_POSSESSION",
                },
            ],
        }
    ],
}

STS = ReportPolicy(
    "sts",
    "company-y.example",
    ("version: STSv1", "mode: testing", "mx: *.mail.company-y.example", "max_age: 86400"),
    ("*.mail.company-y.example",),
)
TLSA = ReportPolicy("tlsa", "company-y.example", ("3 1 1 abcd",))


def test_the_shape_takes_the_rfcs_example_and_nothing_else() -> None:
    assert problems(RFC_EXAMPLE) == []
    broken = json.loads(json.dumps(RFC_EXAMPLE))
    del broken["report-id"]
    broken["policies"][0]["summary"]["total-failure-session-count"] = -1
    broken["policies"][0]["failure-details"][0]["result-type"] = "bad-luck"
    broken["policies"][0]["policy"]["colour"] = "blue"
    assert sorted(problems(broken)) == [
        "$.policies[0].failure-details[0].result-type: 'bad-luck' is not valid",
        "$.policies[0].policy.colour: not a field of policy",
        "$.policies[0].summary.total-failure-session-count: -1 is not valid",
        "$.report-id: missing",
    ]


def test_a_log_makes_one_conforming_report_per_policy_domain() -> None:
    log = TLSReportLog()
    start = 1_459_468_800.0  # 2016-04-01T00:00:00Z
    for _ in range(5):
        log.success(STS, now=start)
    log.failure(STS, "certificate-expired", mx_host="mx1.mail.company-y.example", now=start)
    log.failure(
        STS,
        "starttls-not-supported",
        mx_host="mx2.mail.company-y.example",
        receiving_ip="203.0.113.56",
        sending_ip="2001:db8::1",
        count=2,
        now=start + 86399,
    )
    log.failure(TLSA, "validation-failure", reason="DANE: no TLSA record matches")
    other = ReportPolicy("no-policy-found", "other.example")
    log.success(other)
    reports = log.reports("asmtp tests", "mailto:tlsrpt@example.net")
    assert [problems(r) for r in reports] == [[], []]
    assert [r["policies"][0]["policy"]["policy-domain"] for r in reports] == [
        "company-y.example",
        "other.example",
    ]
    first = reports[0]
    assert first["date-range"] == {
        "start-datetime": "2016-04-01T00:00:00Z",
        "end-datetime": "2016-04-01T23:59:59Z",
    }
    sts, tlsa = first["policies"]
    assert sts["summary"] == {"total-successful-session-count": 5, "total-failure-session-count": 3}
    assert [(d["result-type"], d["failed-session-count"]) for d in sts["failure-details"]] == [
        ("certificate-expired", 1),
        ("starttls-not-supported", 2),
    ]
    assert tlsa["policy"] == {
        "policy-type": "tlsa",
        "policy-domain": "company-y.example",
        "policy-string": ["3 1 1 abcd"],
    }
    assert tlsa["failure-details"][0]["failure-reason-code"] == "DANE: no TLSA record matches"


def test_the_log_is_bounded_saved_and_merged() -> None:
    log = TLSReportLog()
    for i in range(MAX_FAILURE_KINDS + 50):
        log.failure(STS, "validation-failure", receiving_ip=f"192.0.2.{i % 250}", reason=str(i))
    [report] = log.reports("o", "c")
    [entry] = report["policies"]
    assert entry["summary"]["total-failure-session-count"] == MAX_FAILURE_KINDS + 50
    assert len(entry["failure-details"]) == MAX_FAILURE_KINDS  # kinds capped, counts kept
    again = TLSReportLog.from_dict(json.loads(json.dumps(log.as_dict())))
    again.merge(log)
    [merged] = again.reports("o", "c")
    summary = merged["policies"][0]["summary"]
    assert summary["total-failure-session-count"] == 2 * (MAX_FAILURE_KINDS + 50)
    with pytest.raises(ValueError, match="RFC 8460 result type"):
        log.failure(STS, "bad-luck")
    with pytest.raises(ValueError, match="not a TLS report log"):
        TLSReportLog.from_dict({"policies": [{"policy": {}}]})


# --------------------------------------------------------------------------- the CLI


def asmtp_cli(*args: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asmtp", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env={**os.environ, **env},
        timeout=60,
        check=False,
    )


def test_send_tlsrpt_then_asmtp_tlsrpt(
    dns_server: MakeDNS,
    smtp_server: MakeServer,
    ca: trustme.CA,
    ca_pem_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    zone = "@ MX 10 mx1\nmx1 A 127.0.0.2\n@ MX 20 mx2\nmx2 A 127.0.0.3"
    dns = dns_server({"example.test": zone})
    port = free_port("127.0.0.2", "127.0.0.3")
    smtp_server(host="127.0.0.2", port=port, starttls_context=server_ssl_context(ca, "wrong.test"))
    smtp_server(
        host="127.0.0.3", port=port, starttls_context=server_ssl_context(ca, "mx2.example.test")
    )
    tls_policy = tmp_path / "tls_policy"
    tls_policy.write_text("# partners\nexample.test  verify\n")
    counts = tmp_path / "tlsrpt.json"
    env = {"SSL_CERT_FILE": str(ca_pem_file)}
    done = asmtp_cli(
        "send", "--from", "s@client.test", "--to", "ann@example.test",
        "--subject", "s", "--body", "b", "--dns-server", dns.spec,
        "--mx-port", str(port), "--tls-policy", str(tls_policy),
        "--tlsrpt", str(counts), "--helo", "client.asmtp.test", "--json",
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    line = json.loads(done.stdout.splitlines()[0])
    assert (line["host"], line["tls"], line["tls_policy"]) == (
        "mx2.example.test", "verified", "starttls",
    )  # fmt: skip
    # a second run adds up in the same file (made here from the first one's counts)
    first = TLSReportLog.from_dict(json.loads(counts.read_text()))
    twice = TLSReportLog.from_dict(first.as_dict())
    twice.merge(first)
    counts.write_text(json.dumps(twice.as_dict()))
    status = main(
        ["tlsrpt", str(counts), "--organization", "asmtp tests",
         "--contact", "mailto:tlsrpt@client.test"]
    )  # fmt: skip
    assert status == 0
    [report] = json.loads(capsys.readouterr().out)
    assert problems(report) == []
    [entry] = report["policies"]
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "example.test"}
    assert entry["summary"] == {  # each run: mx1's certificate refused, mx2 verified
        "total-successful-session-count": 2,
        "total-failure-session-count": 2,
    }
    [detail] = entry["failure-details"]
    assert (detail["result-type"], detail["receiving-mx-hostname"]) == (
        "certificate-host-mismatch", "mx1.example.test",
    )  # fmt: skip
    out = tmp_path / "reports"
    status = main(
        ["tlsrpt", str(counts), "--organization", "o", "--contact", "c@client.test",
         "--out", str(out)]
    )  # fmt: skip
    assert status == 0
    [written] = out.iterdir()
    assert re.fullmatch(r"client\.test!example\.test!\d+!\d+\.json", written.name)
    assert problems(json.loads(written.read_text())) == []


def test_a_bad_tls_policy_file_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "tls_policy"
    bad.write_text("example.test  sometimes\n")
    status = main(
        ["send", "--from", "s@client.test", "--to", "a@example.test", "--subject", "s",
         "--body", "b", "--tls-policy", str(bad)]
    )  # fmt: skip
    assert status == 2
    err = capsys.readouterr().err
    assert "tls_policy level of example.test must be one of policy, dane, sts" in err


def test_mx_json_shows_each_domains_policy(
    dns_server: MakeDNS, policy_server: MakePolicy, ca_pem_file: Path
) -> None:
    dns = dns_server({"example.test": ZONE, "plain.test": "@ MX 10 mx\nmx A 127.0.0.5"}, ad=True)
    web = policy_server("example.test", policy("enforce", "mx2.example.test"))
    done = asmtp_cli(
        "mx", "example.test", "plain.test", "--json", "--dns-server", dns.spec,
        "--sts-port", str(web.port), env={"SSL_CERT_FILE": str(ca_pem_file)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    first, second = (json.loads(line) for line in done.stdout.splitlines())
    sts = first["tls_policy"]
    assert sts["level"] == "policy"
    assert sts["mta_sts"] == {
        "id": "20261206a",
        "mode": "enforce",
        "mx": ["mx2.example.test"],
        "max_age": 86400,
    }
    assert [(h["host"], h["policy"], h["use"], h["tls"]) for h in sts["hosts"]] == [
        ("mx1.example.test", "sts", False, "opportunistic"),
        ("mx2.example.test", "sts", True, "required"),
    ]
    assert second["tls_policy"] == {
        "level": "policy",
        "hosts": [
            {
                "host": "mx.plain.test",
                "policy": "opportunistic",
                "use": True,
                "tls": "opportunistic",
            }
        ],
    }
    assert web.fetches == 1
