"""SASL mechanisms as the server sees them (RFC 4616, RFC 2195, XOAUTH2)."""

from __future__ import annotations

import base64

import pytest

from asmtp._core.sasl import choose_mechanism, make_mechanism
from asmtp.errors import AuthUnavailableError, RemoteProtocolError


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_plain_is_one_initial_response() -> None:
    mech = make_mechanism("PLAIN", "tim", "tanstaaf")
    assert base64.b64decode(mech.initial() or "") == b"\0tim\0tanstaaf"
    # a server that refuses initial responses sends an empty challenge first
    assert mech.respond("") == mech.initial()
    with pytest.raises(RemoteProtocolError):
        mech.respond("")


def test_login_answers_user_then_password() -> None:
    mech = make_mechanism("LOGIN", "tim", "tanstaaf")
    assert mech.initial() is None
    assert mech.respond(b64("Username:")) == b64("tim")
    assert mech.respond(b64("Password:")) == b64("tanstaaf")
    with pytest.raises(RemoteProtocolError):
        mech.respond(b64("Again:"))


def test_cram_md5_rfc2195_example() -> None:
    mech = make_mechanism("CRAM-MD5", "tim", "tanstaaftanstaaf")
    challenge = b64("<1896.697170952@postoffice.reston.mci.net>")
    assert base64.b64decode(mech.respond(challenge)) == b"tim b913a602c7eda7a495b4e6e7334d3890"


def test_cram_md5_refuses_a_challenge_that_is_not_base64() -> None:
    with pytest.raises(RemoteProtocolError, match="not base64"):
        make_mechanism("CRAM-MD5", "tim", "x").respond("@@not base64@@")


def test_xoauth2_initial_response_and_error_challenge() -> None:
    mech = make_mechanism("XOAUTH2", "someone@example.com", "ya29.token")
    raw = base64.b64decode(mech.initial() or "")
    assert raw == b"user=someone@example.com\x01auth=Bearer ya29.token\x01\x01"
    assert mech.respond(b64('{"status":"401"}')) == ""  # an empty line gets the 535


def test_choose_the_strongest_offered_or_the_one_named() -> None:
    assert choose_mechanism(("LOGIN", "PLAIN", "CRAM-MD5"), None) == "CRAM-MD5"
    assert choose_mechanism(("LOGIN", "PLAIN"), None) == "PLAIN"
    assert choose_mechanism(("LOGIN",), None) == "LOGIN"
    assert choose_mechanism(("PLAIN", "XOAUTH2"), "xoauth2") == "XOAUTH2"
    # XOAUTH2 needs a token, so it is never picked on its own
    with pytest.raises(AuthUnavailableError, match="no AUTH mechanism in common"):
        choose_mechanism(("XOAUTH2", "GSSAPI"), None)
    with pytest.raises(AuthUnavailableError, match="does not offer AUTH LOGIN"):
        choose_mechanism(("PLAIN",), "LOGIN")
    assert not AuthUnavailableError("x").permanent  # a configuration problem: transient
