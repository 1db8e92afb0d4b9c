"""CompiledMessage: a personalised copy filled into a message compiled once reads, to the
email parser, exactly as the same message built and serialized whole (build_message,
prepare_message), over hostile values; and it keeps the wire rules (CRLF, line lengths,
dot-stuffing, the final dot) and DKIM over the bytes sent."""

from __future__ import annotations

import doctest
import email
import email.policy
import re
from collections.abc import Callable
from email.headerregistry import Address
from email.message import EmailMessage
from html import escape as html_escape
from pathlib import Path
from typing import Any

import dkim
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import asmtp._core.compiled
from asmtp._core.compiled import CompiledMessage, subject_field, to_field
from asmtp._core.dkim import DKIM
from asmtp._core.message import build_message
from asmtp._core.mime import body_octets
from asmtp._core.prepared import PreparedMessage, prepare_message
from asmtp.cli import main as cli_main
from asmtp.errors import InputError
from servers import SMTPTestServer

ATTACHMENT = ("report.pdf", bytes(range(256)) * 90, "application/pdf")

SHAPES: dict[str, dict[str, Any]] = {
    "text": {"mailtype": "text"},
    "html": {"mailtype": "html"},
    "html+alt+attachment": {
        "mailtype": "html",
        "alternative": True,
        "attachments": [ATTACHMENT],
        "headers": {"X-Campaign": "spring"},
        "reply_to": "help@example.org",
    },
}

HOSTILE = [
    "plain",
    "",
    "Grüße aus Köln, Müller",
    "日本語のテキスト、長い行を含む" * 5,
    "x" * 2000,
    " ".join(["word"] * 400),
    ".\n..\n.hidden\n.",
    "a = b =?utf-8?q?x?= =3D",
    "line one\r\nline two\rline three\nend",
    "NUL\0inside",
    "trailing spaces   \nand\ttabs\t\n",
    "-- \n--not a boundary\n",
    "From the start\n>From quoted",
    "\u2028\u2029\x85 separators",
    "a" * 78 + "\n" + "b" * 79,
]

SUBJECTS = [
    "Hi Ann",
    "",
    "Grüße, Ann",
    "=?utf-8?q?looks_encoded?=",
    "double  spaced  subject",
    " leading and trailing ",
    "long " * 40,
    "日本語の件名",
    "tab\there",
]

NAMES = ["Ann", "", "Müller, Hans", 'A "quoted" name', "Dr. Who", "x" * 100, "李"]


#: fields that differ by design: per copy, or chosen again per copy
UNCOMPARED = ("date", "message-id", "content-type", "content-transfer-encoding")


def test_docstring_examples() -> None:
    result = doctest.testmod(asmtp._core.compiled, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5
    assert result.failed == 0


def received(prepared: PreparedMessage) -> bytes:
    """What a server stores from the DATA bytes (RFC 5321 4.5.2), with the wire checked:
    CRLF only, no line over 998 octets, ends with CRLF . CRLF."""
    data = prepared.data
    assert data.endswith(b"\r\n.\r\n")
    assert len(data) - 3 == prepared.size
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
    lines = data[:-3].split(b"\r\n")[:-1]
    assert all(len(line) <= 998 for line in lines)
    assert all(line != b"." for line in lines)
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines) + b"\r\n"


def parsed(prepared: PreparedMessage) -> EmailMessage:
    message = email.message_from_bytes(received(prepared), policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    assert not message.defects
    return message


def shape(message: EmailMessage) -> list[Any]:
    """What a reader sees: every field but Date and Message-ID (and MIME boundaries
    and transfer encodings), each part's type, parameters, disposition and decoded
    content."""
    out: list[Any] = []
    for part in message.walk():
        fields = [
            (name.lower(), str(value))
            for name, value in part.items()
            if name.lower() not in UNCOMPARED
        ]
        params = sorted((k, v) for k, v in part.get_params() or [] if k != "boundary")
        content: Any = None
        if not part.is_multipart():
            content = part.get_content()
            if isinstance(content, str):  # a text's line breaks are CRLF on the wire
                content = content.replace("\r\n", "\n")
        out.append((sorted(fields), params, part.get_content_disposition(), content))
    return out


def slow(
    options: dict[str, Any], to: list[tuple[str, str]], subject: str, body: str, alt: str | None
) -> PreparedMessage:
    options = dict(options)
    options.pop("alternative", None)
    message = build_message(
        to=[asmtp_address(name, addr) for name, addr in to] or None,
        from_="News <news@example.org>",
        subject=subject,
        body=body,
        alt_text=alt,
        **options,
    )
    return prepare_message(message)


def asmtp_address(name: str, address: str) -> str:
    local, _, domain = address.rpartition("@")
    return str(Address(display_name=name, username=local, domain=domain))


def compiled_for(options: dict[str, Any]) -> CompiledMessage:
    return CompiledMessage(from_="News <news@example.org>", **options)


def assert_equivalent(
    options: dict[str, Any], to: list[tuple[str, str]], subject: str, body: str
) -> PreparedMessage:
    alt = f"Plain: {body}" if options.get("alternative") else None
    compiled = compiled_for(options)
    fast = compiled.fill(to, subject, body, alt)
    reference = slow(options, to, subject, body, alt)
    assert shape(parsed(fast)) == shape(parsed(reference))
    assert (fast.eight_bit, fast.smtputf8) == (reference.eight_bit, reference.smtputf8)
    return fast


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("body", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_read_as_the_slow_path(kind: str, body: str) -> None:
    assert_equivalent(SHAPES[kind], [("Ann", "ann@example.net")], "Hi", body)


@pytest.mark.parametrize("subject", SUBJECTS)
@pytest.mark.parametrize("name", NAMES)
def test_hostile_subjects_and_names_read_as_the_slow_path(subject: str, name: str) -> None:
    assert_equivalent(SHAPES["text"], [(name, "ann@example.net")], subject, "Hello")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=120),
    name=st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=40),
    body=st.text(
        st.one_of(st.characters(blacklist_categories=["Cs"]), st.sampled_from(".=\r\n- ")),
        max_size=400,
    ),
)
def test_any_values_read_as_the_slow_path(subject: str, name: str, body: str) -> None:
    assert_equivalent(SHAPES["html+alt+attachment"], [(name, "ann@example.net")], subject, body)


def test_plain_values_are_byte_identical_but_for_date_and_id() -> None:
    """Where the email package writes a value as it is, so does the fast path."""
    options = SHAPES["html+alt+attachment"]
    to = [("Ann Lee", "ann@example.net")]
    fast = compiled_for(options).fill(to, "Hi Ann", "Dear Ann,\nhello.\n", "Plain\n")
    reference = slow(options, to, "Hi Ann", "Dear Ann,\nhello.\n", "Plain\n")

    def normal(data: bytes) -> bytes:
        data = re.sub(rb"Date: [^\r]*", b"Date: -", data)
        data = re.sub(rb"Message-ID: <[^>]*>", b"Message-ID: -", data)
        return re.sub(rb"=============[0-9]+==", b"boundary", data)

    assert normal(fast.data) == normal(reference.data)


def test_copies_share_the_attachment_and_get_their_own_message_id() -> None:
    compiled = compiled_for(SHAPES["html+alt+attachment"])
    assert compiled.compiled
    one = compiled.fill([("", "a@example.net")], "s", "b", "t")
    two = compiled.fill([("", "b@example.net")], "s", "b", "t")
    ids = [parsed(copy)["Message-ID"] for copy in (one, two)]
    assert ids[0] != ids[1] and all(i.endswith("@example.org>") for i in ids)
    shared = [p for p in one.parts if len(p) > 16_000]
    assert shared and shared[0] is next(p for p in two.parts if len(p) > 16_000)


def test_a_body_holding_a_boundary_gets_new_boundaries() -> None:
    options = SHAPES["html+alt+attachment"]
    compiled = compiled_for(options)
    first = compiled.fill([("", "a@example.net")], "s", "b", "t").data
    boundary = re.search(rb'boundary="([^"]+)"', first)
    assert boundary is not None
    hostile = f"text\n--{boundary.group(1).decode()}\nContent-Type: text/plain\n\ninjected\n"
    fast = assert_equivalent(options, [("", "a@example.net")], "s", hostile)
    assert len(list(parsed(fast).walk())) == 5
    assert boundary.group(1) not in fast.data.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize("value", ["a\r\nBcc: x@example.org", "a\nb", "a\rb", "a\0b"])
def test_line_breaks_and_nul_in_header_values_are_refused(value: str) -> None:
    compiled = compiled_for(SHAPES["text"])
    with pytest.raises(InputError):
        compiled.fill([("Ann", "ann@example.net")], value, "body")
    with pytest.raises(InputError):
        compiled.fill([(value, "ann@example.net")], "subject", "body")
    with pytest.raises(InputError):
        slow(SHAPES["text"], [("Ann", "ann@example.net")], value, "body", None)


def test_a_lone_surrogate_in_a_body_is_refused() -> None:
    with pytest.raises(InputError, match="UTF-8"):
        compiled_for(SHAPES["text"]).fill([("", "a@example.net")], "s", "bad \udc80")


def test_non_ascii_address_takes_the_slow_path_with_smtputf8() -> None:
    fast = assert_equivalent(SHAPES["text"], [("Ann", "änn@example.net")], "Hi", "Hello")
    assert fast.smtputf8


def test_inline_images_take_the_slow_path() -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 20
    compiled = CompiledMessage(from_="news@example.org", mailtype="html", inline={"logo": png})
    assert not compiled.compiled
    copy = compiled.fill([("", "a@example.net")], "s", '<img src="cid:logo">')
    assert [p.get_content_type() for p in parsed(copy).walk()] == [
        "multipart/related",
        "text/html",
        "image/png",
    ]


def test_options_are_checked_once_when_compiled() -> None:
    with pytest.raises(InputError, match="from_"):
        CompiledMessage(from_="not an address", mailtype="text")


def test_leading_dots_are_stuffed_and_unstuffed_for_bdat() -> None:
    copy = compiled_for(SHAPES["text"]).fill([("", "a@example.net")], "s", ".one\n..two\n")
    assert b"\r\n..one\r\n...two\r\n" in copy.data
    chunk = b"".join(bytes(p) for chunk in copy.chunks() for p in chunk)
    assert b"\r\n.one\r\n..two\r\n" in chunk and chunk == received(copy)


def test_dkim_signature_over_a_filled_copy_verifies() -> None:
    signer, txt = DKIM.generate("example.org", "sel", "ed25519")
    copy = compiled_for(SHAPES["html+alt+attachment"]).fill(
        [("Müller", "m@example.net")], "Grüße", ".dots\n= and ü", "alt"
    )
    signed = signer.sign(copy)

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        assert name == b"sel._domainkey.example.org."
        return txt.encode("ascii")

    assert dkim.verify(received(signed), dnsfunc=lookup)
    tampered = received(signed).replace(b"alt", b"ALT")
    assert not dkim.verify(tampered, dnsfunc=lookup)


def test_field_and_body_helpers() -> None:
    assert subject_field("x" * 69) == b"Subject: " + b"x" * 69 + b"\r\n"
    assert b"\r\n " in subject_field("word " * 30)  # folded
    assert to_field([("Dr. Who", "who@example.net")]) == b'To: "Dr. Who" <who@example.net>\r\n'
    assert body_octets("a" * 78)[0] == "7bit"
    assert body_octets("a" * 79)[0] == "quoted-printable"
    assert body_octets("日本語" * 30)[0] == "base64"
    assert body_octets("NUL\0")[0] == "quoted-printable"


def test_the_command_line_fills_hostile_rows_into_one_compiled_message(
    smtp_server: Callable[..., SMTPTestServer], tmp_path: Path
) -> None:
    """``asmtp send --recipients`` with placeholders, end to end: what a real server
    received reads, for each row, as that row's message."""
    names = ["Ann Müller", 'Bo, "the" Lee', ".dot =?x?= <b> & =3D", "y" * 200]
    rows = "".join(
        f'r{i}@example.net,"{n.replace(chr(34), 2 * chr(34))}"\n' for i, n in enumerate(names)
    )
    rows += "Zoë Ünal <zoe@example.net>,Zoë\n"  # a display name of its own
    (tmp_path / "r.csv").write_text("email,name\n" + rows, encoding="utf-8")
    (tmp_path / "b.html").write_text("<p>Hi {name}</p>\n.{name}\n", encoding="utf-8")
    (tmp_path / "alt.txt").write_text("Hi {name}\n", encoding="utf-8")
    data = bytes(range(256)) * 100
    (tmp_path / "file.bin").write_bytes(data)
    server = smtp_server()
    code = cli_main(
        [
            "send", "--from", "News <news@example.org>", "--recipients", str(tmp_path / "r.csv"),
            "--subject", "Grüße {name}", "--body-file", str(tmp_path / "b.html"), "--html",
            "--alt-text-file", str(tmp_path / "alt.txt"), "--attach", str(tmp_path / "file.bin"),
            "--relay", f"{server.host}:{server.port}", "--tls", "none", "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    assert server.wait_idle()
    received = {m.rcpt_tos[0]: m for m in server.messages}
    for i, name in enumerate(names):
        msg = email.message_from_bytes(
            received[f"r{i}@example.net"].content, policy=email.policy.default
        )
        assert isinstance(msg, EmailMessage) and not msg.defects
        assert msg["Subject"] == f"Grüße {name}"
        assert msg["To"].addresses[0].addr_spec == f"r{i}@example.net"
        plain, html = msg.get_body(("plain",)), msg.get_body(("html",))
        assert plain is not None and html is not None
        # (the parser may keep the wire's CRLF in a decoded body)
        assert plain.get_content().replace("\r\n", "\n") == f"Hi {name}\n"
        escaped = html_escape(name)
        text = html.get_content().replace("\r\n", "\n")
        assert text == f"<p>Hi {escaped}</p>\n.{escaped}\n"
        [attachment] = msg.iter_attachments()
        assert attachment.get_content() == data
    zoe = email.message_from_bytes(received["zoe@example.net"].content, policy=email.policy.default)
    assert zoe["To"].addresses[0].display_name == "Zoë Ünal"
    assert zoe["Subject"] == "Grüße Zoë"
