"""Address lists, envelope addresses, IDN, and header injection (sans-IO)."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asmtp._core.address
from asmtp._core.address import (
    check_header,
    check_mailbox,
    domain_of,
    needs_smtputf8,
    parse_address_list,
    unique_addresses,
)
from asmtp.errors import InputError

# CR, LF, NUL and the other characters str.splitlines() breaks on.
LINE_BREAKERS = ["\r", "\n", "\r\n", "\x00", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029"]


def test_docstring_examples() -> None:
    result = doctest.testmod(asmtp._core.address)
    assert result.attempted > 10
    assert result.failed == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("jack@example.org", [("", "jack@example.org")]),
        (
            "jack@example.org, Ann (work) <ann@example.net>",
            [("", "jack@example.org"), ("Ann", "ann@example.net")],
        ),
        # A comment after a bare addr-spec is not a display name.
        ("jack@example.org (Jack)", [("", "jack@example.org")]),
        ("(nested (comment)) jack@example.org", [("", "jack@example.org")]),
        ('"Doe, John" <john@example.org>', [("Doe, John", "john@example.org")]),
        ('"Ann (work)" <ann@example.net>', [("Ann (work)", "ann@example.net")]),
        ("Jörg Müller <joerg@example.de>", [("Jörg Müller", "joerg@example.de")]),
        ('"john doe"@example.org', [("", '"john doe"@example.org')]),
        ('Q <"a\\"b"@example.org>', [("Q", '"a\\"b"@example.org')]),
        ("team: a@example.org, b@example.org;", [("", "a@example.org"), ("", "b@example.org")]),
        ("<bare@example.org>", [("", "bare@example.org")]),
        ("postmaster@[192.0.2.1]", [("", "postmaster@[192.0.2.1]")]),
        (" spaced@example.org ", [("", "spaced@example.org")]),
    ],
)
def test_parse_address_list(value: str, expected: list[tuple[str, str]]) -> None:
    assert parse_address_list(value, field="to") == expected


def test_parse_iterable_items_may_be_lists() -> None:
    result = parse_address_list(
        ["a@example.org, B <b@example.org>", "c@example.org", "  "], field="cc"
    )
    assert result == [("", "a@example.org"), ("B", "b@example.org"), ("", "c@example.org")]


def test_parse_nothing() -> None:
    assert parse_address_list(None, field="to") == []
    assert parse_address_list("", field="to") == []
    assert parse_address_list(["", " "], field="to") == []
    assert parse_address_list((), field="to") == []


def test_parse_keeps_duplicates() -> None:
    # De-duplication is for envelopes (unique_addresses), not for header lists.
    assert parse_address_list("a@x.org, a@x.org", field="to") == [("", "a@x.org")] * 2


def test_parse_converts_idn_domains() -> None:
    assert parse_address_list("Ann <ann@Bücher.example>", field="to") == [
        ("Ann", "ann@xn--bcher-kva.example")
    ]


@pytest.mark.parametrize(
    "value",
    [
        "alice@example.org)<bob@example.org>",  # the CVE-2023-27043 shape
        "alice@example.org<bob@example.org>",
        "Ann <ann@example.org> bob@example.org",
        "a@b@example.org",
        "foo",
        "@example.org",
        "jack@",
        "a b@example.org",
        "<a@example.org",
        "a@example.org>",
        "<<a@example.org>>",
        "(unclosed a@example.org",
        '"unclosed a@example.org',
        "a@example.org,,b@example.org",
        "a@example.org,",
        ",",
        "undisclosed-recipients:;",
        "Ann <user@[127.0.0.1]>",
        "x@exa mple.org",  # a lax parser would join this into x@example.org
        "x@exa mple.org, x@example.org",
        "x @ example.org",
        "x@example..org",
        "x@☃.example",
    ],
)
def test_parse_refuses_unparsable(value: str) -> None:
    with pytest.raises(InputError) as info:
        parse_address_list(value, field="to")
    assert "to:" in str(info.value)
    assert repr(value) in str(info.value) or "address" in str(info.value)


@pytest.mark.parametrize("breaker", LINE_BREAKERS)
@pytest.mark.parametrize(
    "template",
    [
        "victim@example.org{}Bcc: evil@example.org",
        "Ann{} <ann@example.org>",
        "ann@example.org{}",
        "{}ann@example.org",
        "a@example.org, B{}x <b@example.org>",
    ],
)
def test_parse_refuses_line_breaks(template: str, breaker: str) -> None:
    value = template.format(breaker)
    with pytest.raises(InputError, match="line-breaking") as info:
        parse_address_list(value, field="cc")
    assert str(info.value).startswith("cc: ")
    assert repr(value) in str(info.value)
    with pytest.raises(InputError, match="line-breaking"):
        parse_address_list(["ok@example.org", value], field="cc")


def test_parse_refuses_non_strings() -> None:
    with pytest.raises(InputError, match="not a string"):
        parse_address_list([b"a@example.org"], field="to")  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("addr", "normalized"),
    [
        ("jack@example.org", "jack@example.org"),
        ("Jack@Example.ORG", "Jack@Example.ORG"),
        ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
        ('"john doe"@example.org', '"john doe"@example.org'),
        ("jörg@bücher.example", "jörg@xn--bcher-kva.example"),
        ("a@straße.de", "a@xn--strae-oqa.de"),  # IDNA 2008, not the 2003 "strasse"
        ("a@例え。jp", "a@xn--r8jz45g.jp"),  # ideographic full stop mapped by UTS 46
        ("x@xn--bcher-kva.example", "x@xn--bcher-kva.example"),
        ("postmaster@[192.0.2.1]", "postmaster@[192.0.2.1]"),
        ("postmaster@[IPv6:2001:db8::1]", "postmaster@[IPv6:2001:db8::1]"),
    ],
)
def test_check_mailbox_accepts(addr: str, normalized: str) -> None:
    assert check_mailbox(addr, field="rcpt") == normalized


@pytest.mark.parametrize(
    "addr",
    [
        "<jack@example.org>",
        "Jack <jack@example.org>",
        "jack@example.org ",
        "ja ck@example.org",
        "jack",
        "a@b@example.org",
        '"a@b"@example.org',
        "@example.org",
        "jack@",
        '"unterminated@example.org',
        "jack\t@example.org",
        "jack@exa_mple..org",
        "jack@.example.org",
        "jack@example.org.",
        "jack@[300.1.1.1]",
        "jack@[IPv6:nonsense]",
        "jack@[192.0.2.1",
        "jack@exam<ple.org",
    ],
)
def test_check_mailbox_refuses(addr: str) -> None:
    with pytest.raises(InputError) as info:
        check_mailbox(addr, field="rcpt")
    assert str(info.value).startswith("rcpt: ")


@pytest.mark.parametrize("breaker", LINE_BREAKERS)
def test_check_mailbox_refuses_line_breaks(breaker: str) -> None:
    addr = f"jack@example.org{breaker}RCPT TO:<evil@example.net>"
    with pytest.raises(InputError, match="line-breaking") as info:
        check_mailbox(addr, field="sender")
    assert repr(addr) in str(info.value)


def test_check_mailbox_null_reverse_path() -> None:
    assert check_mailbox("", field="sender", allow_empty=True) == ""
    with pytest.raises(InputError, match="required"):
        check_mailbox("", field="rcpt")


def test_needs_smtputf8() -> None:
    assert needs_smtputf8("jack@example.org") is False
    assert needs_smtputf8("jack@bücher.example") is False  # IDNA suffices
    assert needs_smtputf8("jörg@example.org") is True
    assert needs_smtputf8("用户@例子.广告") is True
    assert needs_smtputf8("") is False


def test_domain_of() -> None:
    assert domain_of("Jack@Example.ORG") == "example.org"
    assert domain_of("jörg@Bücher.Example") == "xn--bcher-kva.example"
    assert domain_of("postmaster@[192.0.2.1]") == "[192.0.2.1]"
    with pytest.raises(InputError):
        domain_of("no-domain")


def test_unique_addresses() -> None:
    addrs = [
        "a@example.org",
        "b@example.org",
        "a@EXAMPLE.org",  # same mailbox: domains compare case-insensitively
        "A@example.org",  # different: the local part is case-sensitive
        "b@example.org",
        "",
        "",
    ]
    assert unique_addresses(addrs) == ["a@example.org", "b@example.org", "A@example.org", ""]
    assert unique_addresses(iter([])) == []


@pytest.mark.parametrize("name", ["X-Campaign", "Reply-To", "x", "X_Odd!~"])
def test_check_header_accepts(name: str) -> None:
    check_header(name, "any value, even ünïcode and : colons")
    check_header(name, "")


@pytest.mark.parametrize("name", ["", "X Campaign", "X:Campaign", "Ü-Header", "X-\x7f", "X\tY"])
def test_check_header_refuses_names(name: str) -> None:
    with pytest.raises(InputError, match="header name"):
        check_header(name, "value")


@pytest.mark.parametrize("breaker", LINE_BREAKERS)
def test_check_header_refuses_line_breaks(breaker: str) -> None:
    with pytest.raises(InputError, match="line-breaking") as info:
        check_header("X-Campaign", f"spring{breaker}Bcc: victim@example.org")
    assert "X-Campaign" in str(info.value)
    with pytest.raises(InputError, match="line-breaking"):
        check_header(f"X-Campaign{breaker}", "spring")


def test_check_header_refuses_non_strings() -> None:
    with pytest.raises(InputError, match="not a string"):
        check_header("X-Count", 3)  # type: ignore[arg-type]


address_text = st.lists(
    st.sampled_from([*'ab.@ <>(),;:"\\[]\r\n\x00éü-', "x@example.org", "1.2.3.4"]),
    max_size=25,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(value=address_text)
def test_property_parse_refuses_or_returns_valid(value: str) -> None:
    """Whatever the input, the result is checked addresses or an InputError, never
    another exception, and a returned address passes check_mailbox unchanged."""
    try:
        pairs = parse_address_list(value, field="to")
    except InputError as exc:
        assert str(exc).startswith("to: ")
        return
    for name, addr in pairs:
        assert check_mailbox(addr, field="to") == addr
        assert not any(c in name + addr for c in "\r\n\x00")
