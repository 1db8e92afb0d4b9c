"""MTA-STS (RFC 8461) as pure functions (asmtp._core.mtasts): the TXT record, the
policy file, MX pattern matching and the cache decision (time is a parameter), and the
policy map's text (asmtp._core.tlsmap). Also what happens without httpx."""

from __future__ import annotations

import doctest
import subprocess
import sys
from pathlib import Path

import pytest

import asmtp._core.mtasts
import asmtp._core.tlsmap
from asmtp._core.mtasts import (
    MAX_AGE_LIMIT,
    CacheAction,
    CachedPolicy,
    PolicyParseError,
    STSPolicy,
    STSRecord,
    cache_action,
    mx_matches,
    parse_policy,
    parse_txt,
)
from asmtp._core.tlsmap import parse_policy_map
from asmtp.errors import InputError
from test_dependencies import without


def test_doctests() -> None:
    for module in (asmtp._core.mtasts, asmtp._core.tlsmap):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),
        (["v=STSv1;id=abc"], "abc"),
        (["v=STSv1; id=abc; ext=1"], "abc"),
        (["v=spf1 -all"], None),
        ([], None),
        (["v=STSv1; id=a", "v=STSv1; id=b"], None),  # two records: none (3.1)
        (["v=STSv1; id="], None),
        (["v=STSv1; id=not-alnum"], None),
        (["v=STSv1; id=" + "a" * 33], None),
        (["v=STSv2; id=abc"], None),
        ([" v=STSv1; id=abc"], "abc"),
    ],
)
def test_parse_txt(records: list[str], expected: str | None) -> None:
    found = parse_txt(records)
    assert (found.id if found is not None else None) == expected


GOOD = (
    "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
    "max_age: 604800\r\n"
)


def test_parse_policy() -> None:
    policy = parse_policy(GOOD)
    assert (policy.mode, policy.mx, policy.max_age) == (
        "enforce",
        ("mail.example.com", "*.example.net"),
        604800,
    )
    assert policy.lines() == [
        "version: STSv1",
        "mode: enforce",
        "mx: mail.example.com",
        "mx: *.example.net",
        "max_age: 604800",
    ]
    # LF line ends, unknown keys, spaces after the colon, case of mx folded
    loose = parse_policy(
        "version: STSv1\nmode:testing\nfoo: bar\nmx:   MX.Example.ORG.\nmax_age: 1"
    )
    assert (loose.mode, loose.mx) == ("testing", ("mx.example.org",))
    # a max_age over the RFC's limit is capped to it (11 digits and more are refused)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999").max_age == MAX_AGE_LIMIT


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("mode: enforce\nmx: a.test\nmax_age: 1", "version"),
        ("version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1", "version"),
        ("version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: -1", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1d", "max_age"),
        ("version: STSv1\nmode: enforce\nmx: a.test", "max_age"),
        ("version: STSv1\nmode: enforce\nmax_age: 1", "names no mx"),
        ("version: STSv1\nmode: enforce\nmode: none\nmx: a.test\nmax_age: 1", "twice"),
        ("version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1", "host name pattern"),
        ("version: STSv1\nmode: enforce\nmx: *.*.test\nmax_age: 1", "host name pattern"),
        ("version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 1\n<html>", "key: value"),
        ("version: STSv1\nmode: enforce\nmax_age: 9999999999999", "max_age"),
    ],
)
def test_parse_policy_refuses(text: str, why: str) -> None:
    with pytest.raises(PolicyParseError, match=why):
        parse_policy(text)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.example.com.", True),
        ("mail.example.com", "mail2.example.com", False),
        ("*.example.com", "mx1.example.com", True),
        ("*.example.com", "example.com", False),  # the wildcard is one whole label
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "mx1.example.com.evil.test", False),
        ("*.example.com", "mx1.notexample.com", False),
    ],
)
def test_mx_matches(pattern: str, host: str, matches: bool) -> None:
    assert mx_matches(pattern, host) is matches


POLICY = STSPolicy("enforce", ("mx.example.org",), max_age=600)


@pytest.mark.parametrize(
    ("cached", "record", "now", "action"),
    [
        (None, None, 0, CacheAction.NO_POLICY),
        (None, STSRecord("a"), 0, CacheAction.FETCH),
        (CachedPolicy("a", POLICY, 1000), STSRecord("a"), 1599, CacheAction.USE_CACHED),
        (CachedPolicy("a", POLICY, 1000), STSRecord("a"), 1600, CacheAction.FETCH),  # expired
        (CachedPolicy("a", POLICY, 1000), STSRecord("b"), 1001, CacheAction.FETCH),  # new id
        # the record gone (or its lookup failed, maybe by an attacker): the policy stands
        (CachedPolicy("a", POLICY, 1000), None, 1599, CacheAction.USE_CACHED),
        (CachedPolicy("a", POLICY, 1000), None, 1600, CacheAction.NO_POLICY),
    ],
)
def test_cache_action(
    cached: CachedPolicy | None, record: STSRecord | None, now: float, action: CacheAction
) -> None:
    assert cache_action(cached, record, now) is action


def test_policy_map_text() -> None:
    text = "# domain level\nexample.org dane\n\n.bank.test  verify  # all of the bank's\n"
    policy_map = parse_policy_map(text)
    assert dict(policy_map) == {".bank.test": "starttls", "example.org": "dane"}
    assert policy_map.level_for("pay.bank.test") == "starttls"
    assert policy_map.level_for("bank.test") is None
    assert hash(policy_map) == hash(parse_policy_map(text))
    with pytest.raises(InputError, match="line 1: expected 'domain level'"):
        parse_policy_map("example.org dane extra")
    with pytest.raises(InputError, match="must be one of"):
        parse_policy_map("example.org encrypt")


SCRIPT = """
import asmtp
from asmtp.config import Direct
print(Direct().tls)
try:
    Direct(tls="sts")
except asmtp.errors.InputError as exc:
    print(exc)
"""


def test_without_httpx_the_default_works_and_sts_says_which_extra(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=without(tmp_path, {"httpx"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "policy",
        "MTA-STS fetches policies with httpx: pip install 'asmtp[sts]'",
    ]
