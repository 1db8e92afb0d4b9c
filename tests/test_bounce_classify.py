"""Classifying returned messages (asmtp._core.bounce): DSNs (RFC 3464), feedback reports
(RFC 5965), automatic replies (RFC 3834), the common non-standard bounces, VERP, and
hostile input that must give "unknown", never an exception.

The samples in tests/bounce_samples/ are written after the RFCs' own examples (RFC 3464's
appendix, RFC 5965's example) and after what Postfix, qmail and Exim send.
"""

from __future__ import annotations

import doctest
import email
import email.policy
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import asmtp._core.bounce
from asmtp._core.bounce import MAX_DIAGNOSTIC, Bounce, classify
from asmtp._core.bounce_parse import MAX_FIELD, MAX_RECIPIENTS
from asmtp._core.sanitize import printable

SAMPLES = Path(__file__).resolve().parent / "bounce_samples"
VERP = "bounces+{token}@sender.example"
KINDS = {"hard", "soft", "complaint", "auto-reply", "unknown"}
SOURCES = {"dsn", "arf", "auto-reply", "verp", "text"}


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def summary(bounces: list[Bounce]) -> list[tuple[str | None, str, str | None, str | None, str]]:
    return [(b.recipient, b.kind, b.status, b.action, b.source) for b in bounces]


def assert_well_formed(bounces: list[Bounce]) -> None:
    """What every answer must be, whatever came in: Bounces with known kinds and
    sources, their text already made printable (no control character left) and bounded."""
    assert bounces
    assert len(bounces) <= MAX_RECIPIENTS
    for bounce in bounces:
        assert isinstance(bounce, Bounce)
        assert bounce.kind in KINDS
        assert bounce.source in SOURCES
        fields = (bounce.recipient, bounce.status, bounce.action, bounce.envelope_id)
        for text in (*fields, bounce.message_id):
            assert text is None or (printable(text) == text and 0 < len(text) <= MAX_FIELD)
        if bounce.diagnostic is not None:
            assert printable(bounce.diagnostic) == bounce.diagnostic
            assert len(bounce.diagnostic) <= MAX_DIAGNOSTIC


# --- every sample: who, what kind, which status ------------------------------------------

EXPECTED = {
    # RFC 3464 appendix: "failed" with a 4.0.0 status (a timeout) is soft
    "rfc3464_simple.eml": [
        ("louisl@larry.slip.example.edu", "soft", "4.0.0", "failed", "dsn"),
    ],
    # RFC 3464 appendix: three recipients in one DSN
    "rfc3464_multi.eml": [
        ("arathib@vnet.example.com", "hard", "5.0.0", "failed", "dsn"),
        ("johnh@hpnjld.example.com", "soft", "4.0.0", "delayed", "dsn"),
        ("wsnell@sdcc13.example.edu", "hard", "5.0.0", "failed", "dsn"),
    ],
    "rfc3464_delayed.eml": [("ann@slow.example.org", "soft", "4.4.7", "delayed", "dsn")],
    # Postfix's DSN carries Auto-Submitted too: the DSN wins
    "postfix_dsn.eml": [("bob@example.org", "hard", "5.1.1", "failed", "dsn")],
    # no Original-Recipient, Final-Recipient rewritten by an alias: VERP names bob
    "dsn_verp.eml": [("bob@example.org", "hard", "5.1.1", "failed", "dsn")],
    # ORCPT echoed in xtext is decoded; "ann+AB" is an address, not xtext
    "dsn_xtext.eml": [
        ("jöran+x@example.org", "hard", "5.1.1", "failed", "dsn"),
        ("ann+AB@example.org", "hard", "5.1.1", "failed", "dsn"),
    ],
    # delivered, expanded and relayed are reported, but are no bounce; 5.2.2 is soft
    "dsn_mixed_actions.eml": [
        ("ann@example.org", "unknown", "2.0.0", "delivered", "dsn"),
        ("list@example.org", "unknown", "2.0.0", "expanded", "dsn"),
        ("carol@example.org", "unknown", "2.0.0", "relayed", "dsn"),
        ("dave@example.org", "soft", "5.2.2", "failed", "dsn"),
    ],
    "arf_rfc5965.eml": [("user@example.com", "complaint", None, None, "arf")],
    # no Original-Rcpt-To: the VERP sender in the attached original's Return-Path
    "arf_fbl_redacted.eml": [("carol@example.org", "complaint", None, None, "arf")],
    "arf_not_spam.eml": [("erin@example.org", "unknown", None, None, "arf")],
    "autoreply_rfc3834.eml": [("ann@example.org", "auto-reply", None, None, "auto-reply")],
    "autoreply_outlook.eml": [("frank@example.org", "auto-reply", None, None, "auto-reply")],
    # the copy of the message below the marker (dave) is not read
    "postfix_old.eml": [
        ("bob@example.org", "hard", "5.1.1", None, "text"),
        ("carol@example.org", "soft", "4.2.2", None, "text"),
    ],
    "qmail.eml": [
        ("bob@example.org", "hard", "5.1.1", None, "text"),
        ("carol@example.org", "soft", "5.2.2", None, "text"),
    ],
    "exim.eml": [("gina@example.org", "hard", "5.1.1", None, "text")],
    # no code at all: the words and the VERP address
    "text_user_unknown.eml": [("hank@example.org", "hard", None, None, "text")],
    # a person's reply that mentions 550 and "user unknown" is no bounce
    "not_a_bounce.eml": [(None, "unknown", None, None, "text")],
    "verp_only.eml": [("jo@example.org", "unknown", None, None, "verp")],
}


def test_every_sample_has_an_expectation() -> None:
    assert sorted(p.name for p in SAMPLES.glob("*.eml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(name: str) -> None:
    bounces = classify(sample(name), verp=VERP)
    assert_well_formed(bounces)
    assert summary(bounces) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_crlf_and_parsed_messages_read_the_same(name: str) -> None:
    data = sample(name)
    expected = classify(data, verp=VERP)
    crlf = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert classify(crlf, verp=VERP) == expected
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    assert classify(parsed, verp=VERP) == expected
    modern = email.message_from_bytes(data, policy=email.policy.default)
    assert summary(classify(modern, verp=VERP)) == summary(expected)


# --- DSN details -----------------------------------------------------------------------


def test_dsn_fields_diagnostic_envelope_id_and_message_id() -> None:
    [bounce] = classify(sample("postfix_dsn.eml"))
    assert bounce.diagnostic == (
        "550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown in local"
        " recipient table (remote MTA mx.example.org)"
    )
    assert bounce.envelope_id == "run-42"
    assert bounce.message_id == "<20240603100001.4XyZ1@mail.sender.example>"


def test_rfc3464_multi_keeps_the_per_message_envelope_id_for_every_recipient() -> None:
    bounces = classify(sample("rfc3464_multi.eml"))
    assert {b.envelope_id for b in bounces} == {"0.0.4.2.5"}
    assert bounces[0].diagnostic == (
        "550 'arathib@vnet.example.com' is not a registered gateway user"
        " (remote MTA vnet.example.com)"
    )
    assert bounces[1].diagnostic is None


def test_original_recipient_wins_over_verp_and_final_recipient() -> None:
    dsn = dsn_message(
        b"Original-Recipient: rfc822;kim@example.org\n"
        b"Final-Recipient: rfc822;kim.lee@mailhost.example.org\nAction: failed\nStatus: 5.1.1\n",
        to=b"bounces+someone=example.org@sender.example",
    )
    assert [b.recipient for b in classify(dsn, verp=VERP)] == ["kim@example.org"]
    # without Original-Recipient, VERP; without VERP either, Final-Recipient
    dsn = dsn.replace(b"Original-Recipient: rfc822;kim@example.org\n", b"")
    assert [b.recipient for b in classify(dsn, verp=VERP)] == ["someone@example.org"]
    assert [b.recipient for b in classify(dsn)] == ["kim.lee@mailhost.example.org"]


def test_verp_names_one_recipient_so_a_dsn_about_several_keeps_final_recipient() -> None:
    blocks = b"".join(
        b"Final-Recipient: rfc822;%s@example.org\nAction: failed\nStatus: 5.1.1\n\n" % n
        for n in (b"a", b"b")
    )
    dsn = dsn_message(blocks, to=b"bounces+a=example.org@sender.example")
    assert [b.recipient for b in classify(dsn, verp=VERP)] == ["a@example.org", "b@example.org"]


def test_global_delivery_status_and_a_status_only_in_the_diagnostic() -> None:
    dsn = dsn_message(
        b"Final-Recipient: utf-8; l\xc3\xa9a@example.org\nAction: failed\n"
        b"Diagnostic-Code: smtp; 550 5.1.1 no such user\n",
        ctype=b"message/global-delivery-status",
    )
    [bounce] = classify(dsn)
    assert (bounce.recipient, bounce.kind, bounce.status) == ("léa@example.org", "hard", "5.1.1")


def test_delivery_status_fields_sent_as_text_plain() -> None:
    dsn = dsn_message(
        b"Final-Recipient: rfc822; max@example.org\nAction: failed\nStatus: 5.1.2\n",
        ctype=b"text/plain",
    )
    assert summary(classify(dsn)) == [("max@example.org", "hard", "5.1.2", "failed", "dsn")]


def test_a_message_that_is_no_bounce() -> None:
    [bounce] = classify(b"From: a@example.org\nSubject: hi\nMessage-ID: <m@x>\n\nhello\n")
    assert bounce == Bounce(None, "unknown", None, None, None, None, "<m@x>", "text")


def test_verp_templates() -> None:
    data = sample("verp_only.eml")
    assert classify(data, verp="bounces-{token}@sender.example")[0].recipient is None
    assert classify(data, verp="no-token@sender.example")[0].recipient is None
    assert classify(data, verp="bad{template@x")[0].recipient is None
    assert classify(data, verp="{{x}}+{token}@sender.example")[0].recipient is None
    # the fixed part compares case-insensitively (Delivered-To says BOUNCES+...@Sender.Example)
    assert classify(data, verp=VERP)[0].recipient == "jo@example.org"


# --- hostile input: bounded, printable, never an exception ---------------------------------


def dsn_message(
    recipient_blocks: bytes,
    *,
    to: bytes = b"news@sender.example",
    ctype: bytes = b"message/delivery-status",
) -> bytes:
    return (
        b"From: MAILER-DAEMON@mx.example.org\nTo: " + to + b"\nSubject: failure\n"
        b"Message-ID: <dsn@mx.example.org>\nMIME-Version: 1.0\n"
        b"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
        b"--b\nContent-Type: "
        + ctype
        + b"\n\nReporting-MTA: dns; mx.example.org\n\n"
        + recipient_blocks
        + b"\n--b--\n"
    )


def test_a_truncated_dsn_still_reports_what_arrived() -> None:
    data = sample("postfix_dsn.eml")
    cut = data.index(b"Remote-MTA:")  # after Status, before the closing boundary
    assert summary(classify(data[:cut])) == [("bob@example.org", "hard", "5.1.1", "failed", "dsn")]
    for end in range(0, len(data), 61):
        assert_well_formed(classify(data[:end], verp=VERP))


def test_control_characters_from_the_server_are_made_printable() -> None:
    dsn = dsn_message(
        b"Final-Recipient: rfc822; bob@example.org\nAction: failed\nStatus: 5.1.1\n"
        b"Diagnostic-Code: smtp; 550 gone\x1b[2J\x07\x00 \xc2\x9b31m\n"
    )
    [bounce] = classify(dsn)
    assert bounce.diagnostic == "550 gone\\x1b[2J\\x07\\x00 \\x9b31m"


def test_nul_bytes_everywhere() -> None:
    for name in ("postfix_dsn.eml", "qmail.eml", "arf_rfc5965.eml"):
        data = sample(name)
        assert_well_formed(classify(data.replace(b"\n", b"\x00\n"), verp=VERP))
        assert_well_formed(classify(data.replace(b"e", b"\x00"), verp=VERP))


def test_long_diagnostics_are_cut() -> None:
    dsn = dsn_message(
        b"Final-Recipient: rfc822; bob@example.org\nAction: failed\nStatus: 5.1.1\n"
        b"Diagnostic-Code: smtp; 550 " + b"x" * 100_000 + b"\n"
    )
    [bounce] = classify(dsn)
    assert bounce.diagnostic is not None and len(bounce.diagnostic) == MAX_DIAGNOSTIC
    assert bounce.diagnostic.endswith("...")


def test_huge_headers() -> None:
    long_subject = b"Subject: " + b"A" * 5_000_000 + b"\n"
    assert_well_formed(classify(long_subject + sample("qmail.eml")))
    many = b"".join(b"X-Junk-%d: y\n" % i for i in range(200_000))
    assert_well_formed(classify(many + sample("postfix_dsn.eml")))
    long_id = b"Message-ID: <" + b"m" * 50_000 + b"@x>\n\nbody"
    [bounce] = classify(long_id)
    assert bounce.message_id is not None and len(bounce.message_id) == MAX_FIELD


def test_ten_megabytes_of_junk() -> None:
    junk = random.Random(17).randbytes(10 * 1024 * 1024)
    assert summary(classify(junk)) == [(None, "unknown", None, None, "text")]
    assert_well_formed(classify(b"Content-Type: multipart/report; boundary=x\n\n" + junk))


def test_bad_encodings() -> None:
    bodies = [
        b"Content-Type: text/plain; charset=x-no-such-charset\n\n550 5.1.1 user unknown\n",
        b"Content-Type: text/plain; charset=rot13\n\n550 5.1.1 user unknown\n",
        b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
        b"NTUwIDUuMS4xIHVzZXIgdW5rbm93bg=!!*\n",
        b"Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n"
        b"\n550 5.1.1 =ZZ=\xff user unknown=\n",
        b"Content-Type: text/plain; charset=utf-16\n\n\xff\xfe5\x005\x000\x00 \x00",
    ]
    for body in bodies:
        message = b"From: MAILER-DAEMON@x.example\nSubject: =?utf-8?b?!!!?= \xff\xfe\n" + body
        assert_well_formed(classify(message))
    [bounce] = classify(b"From: MAILER-DAEMON@x.example\n" + bodies[2])
    assert (bounce.kind, bounce.status) == ("hard", "5.1.1")


def test_deeply_nested_and_very_many_parts() -> None:
    depth = 5_000
    nested = b"".join(
        b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (i, i) for i in range(depth)
    )
    assert_well_formed(classify(b"From: MAILER-DAEMON@x.example\n" + nested + b"\n550 5.1.1\n"))
    many = b"".join(b"--b\nContent-Type: text/plain\n\n550 5.1.1 no\n" for _ in range(5_000))
    message = b"From: MAILER-DAEMON@x\nContent-Type: multipart/mixed; boundary=b\n\n" + many
    assert_well_formed(classify(message + b"--b--\n"))


def test_very_many_recipients_in_one_dsn() -> None:
    blocks = b"".join(
        b"Final-Recipient: rfc822; r%d@example.org\nAction: failed\nStatus: 5.1.1\n\n" % i
        for i in range(MAX_RECIPIENTS + 500)
    )
    bounces = classify(dsn_message(blocks))
    assert_well_formed(bounces)
    assert len(bounces) == MAX_RECIPIENTS


def test_a_message_parsed_from_text_with_lone_surrogates() -> None:
    parsed = email.message_from_string(
        "From: MAILER-DAEMON@x.example\nMessage-ID: <\ud800@x>\n\n"
        "<b\udfff@example.org>: 550 5.1.1 \ud800 user unknown\n"
    )
    [bounce] = classify(parsed)
    assert_well_formed([bounce])
    assert (bounce.recipient, bounce.kind, bounce.status) == ("b?@example.org", "hard", "5.1.1")
    assert bounce.message_id == "<?@x>"


def test_not_bytes_at_all() -> None:
    assert_well_formed(classify(None))  # type: ignore[arg-type]
    assert_well_formed(classify(12))  # type: ignore[arg-type]


def test_mutated_samples_never_raise() -> None:
    rng = random.Random(3464)
    for path in sorted(SAMPLES.glob("*.eml")):
        data = path.read_bytes()
        for _ in range(40):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 20)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            start = rng.randrange(len(mutated))
            mutated[start:start] = mutated[rng.randrange(len(mutated)) :][:200]
            assert_well_formed(classify(bytes(mutated), verp=VERP))


@settings(max_examples=200, deadline=None)
@given(
    head=st.sampled_from(sorted(EXPECTED)),
    cut=st.integers(min_value=0, max_value=4000),
    noise=st.binary(max_size=300),
)
def test_any_bytes_spliced_into_a_sample(head: str, cut: int, noise: bytes) -> None:
    data = sample(head)
    assert_well_formed(classify(data[:cut] + noise + data[cut:], verp=VERP))


def test_the_docstring_example() -> None:
    result = doctest.testmod(asmtp._core.bounce)
    assert result.attempted > 0
    assert result.failed == 0
