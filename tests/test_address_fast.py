"""The one-match fast path of the address checks takes only addresses that the full
checks accept unchanged (so it loosens nothing)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asmtp._core import address
from asmtp._core.address import check_mailbox, parse_address_list
from asmtp.errors import InputError

# Address-like text: the fast path's own characters plus every kind the full checks
# care about (specials, quotes, spaces, controls, line breaks, non-ASCII, brackets).
_ALPHABET = "aZ09.-_+!#'`{|}~@@@\"\\ ()<>[],;:\r\n\x00\x0b\x7f\u0085\u2028é\t"


# Mostly the fast path's own characters, so that many candidates match it.
_PART = st.text(alphabet="aZ09.-_+'`{|}~" * 3 + _ALPHABET, min_size=0, max_size=12)
_CANDIDATES = st.text(alphabet=_ALPHABET, max_size=24) | st.builds(
    lambda local, domain: f"{local}@{domain}", _PART, _PART
)


@settings(max_examples=1000, deadline=None)
@given(_CANDIDATES)
def test_fast_match_implies_full_checks_accept_unchanged(text: str) -> None:
    if address._PLAIN_ADDR.fullmatch(text):
        assert address._check_mailbox_fully(text, "to", False) == text
        assert parse_address_list(text, field="to") == [("", text)]


@pytest.mark.parametrize(
    "addr",
    [
        "jack@example.org",
        "first.last+tag@mail.example.org",
        "o'brien@example.org",
        "a!#$%&'*+/=?^_`{|}~-@sub_domain.example",
    ],
)
def test_common_addresses_take_the_fast_path_as_they_are(addr: str) -> None:
    assert address._PLAIN_ADDR.fullmatch(addr)
    assert check_mailbox(addr, field="to") == addr
    assert parse_address_list([addr], field="to") == [("", addr)]


@pytest.mark.parametrize(
    "addr",
    [
        "jack@example.org\r\nRCPT TO:<x@evil.example>",
        "jack@example.org\n",
        "jack@exa\x00mple.org",
        "a@b@example.org",
        "@example.org",
        "jack@",
        "jack@example..org",
        "jack@.example.org",
        "ja ck@example.org",
        "jack@exa mple.org",
        "jack@-\u2028.example",
        'ja"ck@example.org',
        "ja\\ck@example.org",
        "ja(ck)@example.org",
        "jack@[192.0.2.1",
    ],
)
def test_bad_addresses_are_still_refused(addr: str) -> None:
    with pytest.raises(InputError):
        check_mailbox(addr, field="to")
    with pytest.raises(InputError):
        parse_address_list(addr, field="to")


def test_non_ascii_addresses_keep_the_full_path() -> None:
    assert not address._PLAIN_ADDR.fullmatch("jörg@example.org")
    assert check_mailbox("jack@bücher.example", field="to") == "jack@xn--bcher-kva.example"
    assert check_mailbox('"john doe"@example.org', field="to") == '"john doe"@example.org'
