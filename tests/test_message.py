"""Message building, envelopes and DATA preparation (sans-IO).

Round-trip convention checked by the properties below: a bare CR, a bare LF and a CRLF
each mean one line break, and a text body always ends with a line break (an empty body
is one empty line). So the text a server's reader sees is the intended text with
"\\r\\n" and "\\r" turned into "\\n" and a final "\\n" added when missing.
"""

from __future__ import annotations

import datetime
import doctest
import email.policy
import re
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asmtp._core.message
import asmtp._core.prepared
import asmtp._core.wire
from asmtp import __version__
from asmtp._core.message import X_MAILER, build_message, envelope_of
from asmtp._core.prepared import PreparedMessage, prepare_message
from asmtp.errors import InputError

PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def reassemble(data: bytes) -> bytes:
    """What a server stores: strip the terminator, undo dot-stuffing (RFC 5321 4.5.2)."""
    assert data.endswith(b"\r\n.\r\n") or data == b".\r\n"
    # The end-of-data sequence occurs only at the very end.
    assert not data.startswith(b".\r\n") or data == b".\r\n"
    assert data.find(b"\r\n.\r\n") == len(data) - 5
    # No bare CR or LF anywhere.
    assert data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")
    lines = data[:-3].split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def parse(data: bytes) -> EmailMessage:
    msg = BytesParser(policy=email.policy.default).parsebytes(reassemble(data))
    assert isinstance(msg, EmailMessage)
    return msg


def content_of(part: object) -> str:
    """A text part's content as a reader sees it: lines ending in "\\n".

    get_content() keeps the CRLFs of a 7bit/8bit body as received; quoted-printable and
    base64 bodies decode to "\\n".
    """
    assert isinstance(part, EmailMessage)
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def text_lines(text: str) -> str:
    """The round-trip convention for text bodies (see the module docstring)."""
    text = re.sub(r"\r\n|\r", "\n", text)
    return text if text.endswith("\n") else text + "\n"


def crlf_lines(content: bytes) -> bytes:
    content = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    return content if content.endswith(b"\r\n") else content + b"\r\n"


def simple(**kwargs: object) -> EmailMessage:
    args: dict[str, object] = {"to": "ann@example.net", "from_": "jack@example.org"}
    args.update(kwargs)
    return build_message(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "module",
    [asmtp._core.message, asmtp._core.prepared, asmtp._core.wire],
    ids=["message", "prepared", "wire"],
)
def test_docstring_examples(module: ModuleType) -> None:
    result = doctest.testmod(module)
    assert result.attempted >= 2
    assert result.failed == 0


# -- build_message ---------------------------------------------------------------------


def test_build_headers() -> None:
    msg = build_message(
        to="jack@example.org, Ann (work) <ann@example.net>",
        cc=["Bob <bob@bücher.example>", "carol@example.com"],
        from_="Zoë <zoe@example.org>",
        subject="Quarterly report",
        body="Hello.\n",
    )
    assert msg["To"] == "jack@example.org, Ann <ann@example.net>"
    assert msg["Cc"] == "Bob <bob@xn--bcher-kva.example>, carol@example.com"
    assert msg["From"] == "Zoë <zoe@example.org>"
    assert msg["Subject"] == "Quarterly report"
    assert msg["X-Mailer"] == X_MAILER == f"asmtp/{__version__}"
    assert msg["MIME-Version"] == "1.0"
    assert msg.get_content_type() == "text/plain"
    assert msg.get_content_charset() == "utf-8"
    assert content_of(msg) == "Hello.\n"
    assert re.fullmatch(r"<[^@<>]+@example\.org>", msg["Message-ID"])
    date = msg["Date"].datetime
    assert date.tzinfo is not None
    assert abs(date - datetime.datetime.now(datetime.UTC)) < datetime.timedelta(days=1)
    assert "Bcc" not in msg
    # Non-ASCII display names leave as RFC 2047 encoded words.
    assert b"From: =?utf-8?q?Zo=C3=AB?= <zoe@example.org>" in msg.as_bytes(policy=email.policy.SMTP)


def test_build_message_ids_differ() -> None:
    assert simple()["Message-ID"] != simple()["Message-ID"]


def test_build_html() -> None:
    msg = simple(mailtype="html", body="<p>Hi</p>")
    assert msg.get_content_type() == "text/html"
    assert msg.get_content_charset() == "utf-8"
    assert msg["Content-Type"] == 'text/html; charset="utf-8"'
    assert content_of(msg) == "<p>Hi</p>\n"


def test_build_alternative() -> None:
    msg = simple(mailtype="html", body="<p>Hi</p>", alt_text="Hi")
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert content_of(parts[0]) == "Hi\n"
    assert content_of(parts[1]) == "<p>Hi</p>\n"


def test_build_body_is_seven_bit() -> None:
    msg = simple(body="Grüße, 你好\n" + "long " * 100)
    prepared = prepare_message(msg)
    assert prepared.eight_bit is False
    assert content_of(parse(prepared.data)) == "Grüße, 你好\n" + "long " * 100 + "\n"


def test_build_refuses_bad_mailtype_and_alt_text() -> None:
    with pytest.raises(InputError, match="mailtype"):
        simple(mailtype="markdown")
    with pytest.raises(InputError, match="alt_text"):
        simple(mailtype="text", alt_text="plain")


def test_build_attachments(tmp_path: Path) -> None:
    png = tmp_path / "chart.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    unknown = tmp_path / "data.unknownext"
    unknown.write_bytes(b"opaque")
    tarball = tmp_path / "logs.tar.gz"
    tarball.write_bytes(b"\x1f\x8b")
    msg = simple(
        body="See attached.\n",
        attachments=[png, str(unknown), tarball, ("notes.txt", b"line 1\nline 2\n", "text/plain")],
    )
    assert msg.get_content_type() == "multipart/mixed"
    body, *attached = msg.iter_parts()
    assert content_of(body) == "See attached.\n"
    found = {
        part.get_filename(): (part.get_content_type(), part.get_payload(decode=True))
        for part in attached
    }
    assert found == {
        "chart.png": ("image/png", png.read_bytes()),
        "data.unknownext": ("application/octet-stream", b"opaque"),
        "logs.tar.gz": ("application/octet-stream", b"\x1f\x8b"),
        "notes.txt": ("text/plain", b"line 1\nline 2\n"),
    }
    # And the same after the trip through the wire format.
    received = parse(prepare_message(msg).data)
    assert [p.get_filename() for p in received.iter_attachments()] == list(found)
    assert next(received.iter_attachments()).get_content() == png.read_bytes()


def test_build_attachments_with_alternative() -> None:
    msg = simple(
        mailtype="html",
        body="<b>x</b>",
        alt_text="x",
        attachments=[("a.bin", b"\0", "application/octet-stream")],
    )
    assert msg.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "multipart/alternative",
        "application/octet-stream",
    ]


def test_build_attachment_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        simple(attachments=[tmp_path / "missing.pdf"])
    with pytest.raises(InputError, match="content type"):
        simple(attachments=[("a.txt", b"x", "text")])
    with pytest.raises(InputError, match="line-breaking"):
        simple(attachments=[("a\r\n.txt", b"x", "text/plain")])
    with pytest.raises(InputError, match="bytes"):
        simple(attachments=[("a.txt", "text", "text/plain")])
    with pytest.raises(InputError, match="neither"):
        simple(attachments=[b"raw bytes"])


def test_build_headers_override_and_drop() -> None:
    msg = simple(
        headers={
            "X-Mailer": "custom mailer",
            "Reply-To": "Desk <desk@Bücher.example>",
            "X-Campaign": "spring",
        }
    )
    assert msg.get_all("X-Mailer") == ["custom mailer"]
    assert msg["Reply-To"] == "Desk <desk@xn--bcher-kva.example>"
    assert msg["X-Campaign"] == "spring"

    dropped = simple(headers={"X-Mailer": None})
    assert "X-Mailer" not in dropped
    assert b"X-Mailer" not in prepare_message(dropped).data


def test_build_header_pairs_repeat() -> None:
    msg = simple(headers=[("Comments", "one"), ("Comments", "two"), ("X-Mailer", "m")])
    assert msg.get_all("Comments") == ["one", "two"]
    assert msg.get_all("X-Mailer") == ["m"]


@pytest.mark.parametrize(
    "name", ["To", "cc", "BCC", "From", "Subject", "Date", "Message-ID", "Content-Type"]
)
def test_build_reserved_headers_refused(name: str) -> None:
    with pytest.raises(InputError, match="cannot be given here"):
        simple(headers={name: "x@example.org"})


def test_build_header_refusals() -> None:
    with pytest.raises(InputError, match="line-breaking"):
        simple(headers={"X-Campaign": "a\r\nBcc: victim@example.org"})
    with pytest.raises(InputError, match="field name"):
        simple(headers={"X Campaign": "a"})
    with pytest.raises(InputError, match="Reply-To"):
        simple(headers={"Reply-To": "not an address"})
    with pytest.raises(InputError, match="exactly one"):
        simple(headers={"Sender": "a@example.org, b@example.org"})
    with pytest.raises(InputError, match="Reply-To"):
        simple(headers=[("Reply-To", "a@example.org"), ("Reply-To", "b@example.org")])


def test_build_never_writes_bcc() -> None:
    msg = simple(to=None, cc=None)
    assert "To" not in msg
    assert "Bcc" not in msg
    assert b"Bcc" not in prepare_message(msg).data


@pytest.mark.parametrize("breaker", ["\r\n", "\r", "\n", "\x00", "\u2028"])
def test_build_refuses_injection(breaker: str) -> None:
    with pytest.raises(InputError, match="Subject"):
        simple(subject=f"Hello{breaker}Bcc: victim@example.org")
    with pytest.raises(InputError, match="to:"):
        simple(to=f"ann@example.net{breaker}Bcc: victim@example.org")
    with pytest.raises(InputError, match="cc:"):
        simple(cc=f"Ann{breaker} <ann@example.net>")
    with pytest.raises(InputError, match="from_:"):
        simple(from_=f"jack@example.org{breaker}")


def test_build_refuses_unencodable_text() -> None:
    with pytest.raises(InputError, match="surrogate"):
        simple(subject="bad \ud800")
    with pytest.raises(InputError, match="surrogate"):
        simple(to="Bad \udcff <ann@example.net>")
    with pytest.raises(InputError, match="body"):
        simple(body="bad \ud800")
    with pytest.raises(InputError, match="body"):
        simple(mailtype="html", body="<p>x</p>", alt_text="bad \udfff")


def test_build_from_needs_one_address() -> None:
    with pytest.raises(InputError, match="exactly one"):
        simple(from_="a@example.org, b@example.org")
    with pytest.raises(InputError, match="exactly one"):
        simple(from_=None)


def test_build_date_and_message_id() -> None:
    when = datetime.datetime(2024, 5, 17, 9, 30, tzinfo=datetime.UTC)
    msg = simple(date=when, message_id="abc.123@example.org")
    assert msg["Date"] == "Fri, 17 May 2024 09:30:00 +0000"
    assert msg["Message-ID"] == "<abc.123@example.org>"
    msg = simple(date="Fri, 17 May 2024 11:30:00 +0200", message_id="<x@y>")
    assert msg["Date"].datetime == when
    assert msg["Message-ID"] == "<x@y>"
    with pytest.raises(InputError, match="date"):
        simple(date="yesterday")
    with pytest.raises(InputError, match="message_id"):
        simple(message_id="no at sign")


# -- envelope_of -----------------------------------------------------------------------


def test_envelope_sender_beats_from() -> None:
    msg = simple(headers={"Sender": "Desk <desk@example.org>"})
    assert envelope_of(msg) == ("desk@example.org", ["ann@example.net"])
    assert envelope_of(simple()) == ("jack@example.org", ["ann@example.net"])
    # An explicit sender beats both, and may be the null reverse-path.
    assert envelope_of(msg, sender="bounce@example.org")[0] == "bounce@example.org"
    assert envelope_of(msg, sender="")[0] == ""


def test_envelope_collects_to_cc_bcc() -> None:
    msg = build_message(
        to="a@example.net, Bee <b@example.net>",
        cc=["b@EXAMPLE.NET", "c@bücher.example"],
        from_="jack@example.org",
    )
    msg["Bcc"] = "d@example.net, a@example.net"
    sender, recipients = envelope_of(msg)
    assert sender == "jack@example.org"
    assert recipients == [
        "a@example.net",
        "b@example.net",
        "c@xn--bcher-kva.example",
        "d@example.net",
    ]


def test_envelope_recipients_argument() -> None:
    msg = simple()
    assert envelope_of(msg, recipients="x@example.com, X <x@Example.COM>, y@example.com") == (
        "jack@example.org",
        ["x@example.com", "y@example.com"],
    )
    with pytest.raises(InputError, match="recipients"):
        envelope_of(msg, recipients=["x@example.com\r\nDATA"])


def test_envelope_from_parsed_message() -> None:
    raw = (
        b"From: Jack <jack@example.org>\r\n"
        b"To: undisclosed-recipients:;\r\n"
        b"Bcc: hidden@example.net\r\n"
        b"Subject: x\r\n\r\nbody\r\n"
    )
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    assert envelope_of(msg) == ("jack@example.org", ["hidden@example.net"])


@pytest.mark.parametrize("policy", [email.policy.default, email.policy.compat32])
def test_envelope_from_raw_utf8_headers(policy: email.policy.Policy) -> None:
    raw = "From: Jörg <jörg@Bücher.example>\r\nTo: zoë@example.org\r\n\r\nx\r\n".encode()
    msg = BytesParser(policy=policy).parsebytes(raw)
    assert envelope_of(msg) == ("jörg@xn--bcher-kva.example", ["zoë@example.org"])  # type: ignore[arg-type]
    latin1 = BytesParser(policy=policy).parsebytes(b"From: j\xf6rg@example.org\r\n\r\n")
    with pytest.raises(InputError, match="not UTF-8"):
        envelope_of(latin1, recipients="a@example.org")  # type: ignore[arg-type]


def test_envelope_errors() -> None:
    msg = EmailMessage()
    msg["From"] = "a@example.org, b@example.org"
    msg["To"] = "c@example.org"
    with pytest.raises(InputError, match="exactly one"):
        envelope_of(msg)
    assert envelope_of(msg, sender="a@example.org")[1] == ["c@example.org"]
    nobody = simple(to=None)
    with pytest.raises(InputError, match="recipients"):
        envelope_of(nobody)
    bad = EmailMessage()
    bad["From"] = "jack@example.org"
    bad["To"] = "not-an-address"
    with pytest.raises(InputError, match="To"):
        envelope_of(bad)


# -- prepare_message -------------------------------------------------------------------


def test_prepare_bytes() -> None:
    raw = b"Subject: hi\n\n.starts with a dot\r\n.\n..\rbare CR\r\r\nlast"
    prepared = prepare_message(raw)
    assert isinstance(prepared, PreparedMessage)
    assert prepared.data == (
        b"Subject: hi\r\n\r\n..starts with a dot\r\n..\r\n...\r\nbare CR\r\n\r\nlast\r\n.\r\n"
    )
    assert prepared.size == len(prepared.data) - 3
    assert prepared.eight_bit is False
    assert prepared.smtputf8 is False
    assert reassemble(prepared.data) == crlf_lines(raw)


def test_prepare_dot_stuffs_first_line() -> None:
    prepared = prepare_message(b".\r\n")
    assert prepared.data == b"..\r\n.\r\n"
    assert prepare_message(b".x").data == b"..x\r\n.\r\n"


def test_prepare_terminator() -> None:
    assert prepare_message(b"a\r\n").data == b"a\r\n.\r\n"
    assert prepare_message(b"a").data == b"a\r\n.\r\n"
    assert prepare_message(b"").data == b"\r\n.\r\n"
    assert prepare_message(b"").size == 2


def test_prepare_flags_for_bytes() -> None:
    body_only = prepare_message("Subject: x\r\n\r\nGrüße\r\n".encode())
    assert (body_only.eight_bit, body_only.smtputf8) == (True, False)
    header = prepare_message("Subject: Grüße\r\n\r\nx\r\n".encode())
    assert (header.eight_bit, header.smtputf8) == (True, True)
    no_body = prepare_message("Subject: Grüße".encode())
    assert no_body.smtputf8 is True
    starts_with_body = prepare_message("\r\nGrüße".encode())
    assert (starts_with_body.eight_bit, starts_with_body.smtputf8) == (True, False)


def test_prepare_non_ascii_address_uses_smtputf8() -> None:
    msg = build_message(to="Jörg <jörg@example.de>", from_="jack@example.org", body="hi")
    prepared = prepare_message(msg)
    assert prepared.smtputf8 is True
    assert prepared.eight_bit is True
    assert "To: Jörg <jörg@example.de>\r\n".encode() in prepared.data
    assert b"=?" not in prepared.data
    # BytesParser reads header octets as ASCII; a UTF-8 aware reader parses text.
    received = email.message_from_string(
        reassemble(prepared.data).decode("utf-8"), policy=email.policy.default
    )
    assert received["To"].addresses[0].username == "jörg"


def test_prepare_ascii_message_flags() -> None:
    prepared = prepare_message(simple(subject="Grüße", body="Grüße"))
    assert (prepared.eight_bit, prepared.smtputf8) == (False, False)
    assert parse(prepared.data)["Subject"] == "Grüße"


def test_prepare_eight_bit_body() -> None:
    msg = EmailMessage()
    msg["From"] = "jack@example.org"
    msg.set_content("Grüße\n", cte="8bit")
    prepared = prepare_message(msg)
    assert (prepared.eight_bit, prepared.smtputf8) == (True, False)
    assert content_of(parse(prepared.data)) == "Grüße\n"


def test_prepare_removes_bcc_without_touching_caller() -> None:
    msg = simple()
    msg["Bcc"] = "hidden@example.net"
    before = msg.as_bytes()
    prepared = prepare_message(msg)
    assert b"hidden" not in prepared.data
    assert b"Bcc" not in prepared.data
    assert msg["Bcc"] == "hidden@example.net"
    assert msg.as_bytes() == before
    assert envelope_of(msg)[1] == ["ann@example.net", "hidden@example.net"]


def test_prepare_is_crlf_and_has_no_long_lines() -> None:
    prepared = prepare_message(simple(body="x" * 5000 + "\n.\n"))
    assert all(len(line) <= 998 for line in prepared.data.split(b"\r\n"))
    assert content_of(parse(prepared.data)) == "x" * 5000 + "\n.\n"


def test_prepare_reencodes_long_text_lines() -> None:
    msg = EmailMessage()
    msg["From"] = "jack@example.org"
    msg["Bcc"] = "hidden@example.net"
    text = "é" * 1500 + "\n.short\n" + "y" * 2000 + "\n"
    msg.set_content(text, cte="8bit")
    before = msg.as_bytes()
    prepared = prepare_message(msg)
    lines = prepared.data.split(b"\r\n")
    assert max(len(line) for line in lines) <= 998
    assert b"hidden" not in prepared.data
    received = parse(prepared.data)
    assert received["Content-Transfer-Encoding"] == "quoted-printable"
    assert content_of(received) == text
    assert msg.as_bytes() == before  # the caller's message is not re-encoded
    assert msg["Content-Transfer-Encoding"] == "8bit"


def test_prepare_reencodes_long_non_text_lines() -> None:
    payload = b'{"k": "' + b"v" * 3000 + b'"}\r\n'
    raw = (
        b"From: jack@example.org\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nshort\r\n"
        b"--b\r\nContent-Type: application/json\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        + payload
        + b"--b--\r\n"
    )
    msg = BytesParser(policy=email.policy.default).parsebytes(raw)
    assert isinstance(msg, EmailMessage)
    prepared = prepare_message(msg)
    assert max(len(line) for line in prepared.data.split(b"\r\n")) <= 998
    text_part, json_part = parse(prepared.data).iter_parts()
    assert content_of(text_part) == "short"  # the CRLF before "--b" is the boundary's
    assert json_part["Content-Transfer-Encoding"] == "base64"
    assert json_part.get_payload(decode=True) == payload[:-2]  # CRLF before "--b" too


def test_prepare_refuses_long_line_it_cannot_reencode() -> None:
    msg = simple(attachments=[("a.bin", b"x", "application/octet-stream")])
    msg.preamble = "p" * 1200
    with pytest.raises(InputError, match="longer than 998"):
        prepare_message(msg)


def test_prepare_refuses_long_lines_in_bytes() -> None:
    raw = b"Subject: x\r\n\r\nok\n" + b"z" * 999 + b"\r\n"
    with pytest.raises(InputError, match="line 4 is longer than 998"):
        prepare_message(raw)
    assert prepare_message(b"z" * 998).data == b"z" * 998 + b"\r\n.\r\n"


def test_prepare_refuses_other_types() -> None:
    with pytest.raises(InputError, match="expected"):
        prepare_message("Subject: str\r\n\r\n")  # type: ignore[arg-type]


def test_prepare_large_message_once() -> None:
    # 1.2 MB of short lines, every one needing dot-stuffing: linear work, one pass each.
    raw = b"Subject: big\r\n\r\n" + b".line\n" * 200_000
    prepared = prepare_message(raw)
    assert prepared.data.count(b"\r\n..line") == 200_000
    assert prepared.size == len(raw) + 200_000 * 2


# -- properties ------------------------------------------------------------------------

line_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from([".", "..", ". ", "From x", "=", "--", " ", "\t"]),
    st.text(max_size=10).map(lambda s: "." + s),
    st.tuples(st.sampled_from(["x", "é", "你", " ", "."]), st.integers(900, 2500)).map(
        lambda t: t[0] * t[1]
    ),
)
line_break = st.sampled_from(["\n", "\r\n", "\r", ""])
body_text = st.one_of(
    st.text(),
    st.lists(st.tuples(line_text, line_break), max_size=12).map(
        lambda pairs: "".join(a + b for a, b in pairs)
    ),
)


@PROPERTY_SETTINGS
@given(body=body_text)
def test_property_text_body_round_trips(body: str) -> None:
    msg = build_message(to="ann@example.net", from_="jack@example.org", subject="p", body=body)
    prepared = prepare_message(msg)
    assert all(len(line) <= 998 for line in prepared.data.split(b"\r\n"))
    assert prepared.size == len(prepared.data) - 3
    received = parse(prepared.data)
    assert received.get_content_type() == "text/plain"
    assert content_of(received) == text_lines(body)


@settings(PROPERTY_SETTINGS, max_examples=100)  # two bodies per example
@given(html=body_text, plain=body_text)
def test_property_alternative_round_trips(html: str, plain: str) -> None:
    msg = build_message(
        to="ann@example.net", from_="jack@example.org", mailtype="html", body=html, alt_text=plain
    )
    received = parse(prepare_message(msg).data)
    plain_part = received.get_body(preferencelist=("plain",))
    html_part = received.get_body(preferencelist=("html",))
    assert plain_part is not None and html_part is not None
    assert isinstance(plain_part, EmailMessage) and isinstance(html_part, EmailMessage)
    assert content_of(plain_part) == text_lines(plain)
    assert content_of(html_part) == text_lines(html)


line_bytes = st.one_of(
    st.binary(max_size=60),
    st.sampled_from([b".", b"..", b".\r", b"\r.", b"\n.\n"]),
    st.integers(900, 998).map(lambda n: b"." * n),
)
byte_break = st.sampled_from([b"\n", b"\r\n", b"\r", b""])
raw_content = st.one_of(
    st.binary(),
    st.lists(st.tuples(line_bytes, byte_break), max_size=12).map(
        lambda pairs: b"".join(a + b for a, b in pairs)
    ),
)


@PROPERTY_SETTINGS
@given(content=raw_content)
def test_property_bytes_round_trip(content: bytes) -> None:
    expected = crlf_lines(content)
    if any(len(line) > 998 for line in expected.split(b"\r\n")):
        with pytest.raises(InputError, match="longer than 998"):
            prepare_message(content)
        return
    if b"\0" in content:  # RFC 2045 2.7: never sent raw
        with pytest.raises(InputError, match="NUL"):
            prepare_message(content)
        return
    prepared = prepare_message(content)
    assert reassemble(prepared.data) == expected
    assert prepared.size == len(prepared.data) - 3
    assert prepared.eight_bit == any(octet > 127 for octet in content)
