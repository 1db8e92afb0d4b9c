"""build_message's fast path (asmtp._core.mime): the fields stored raw and the parts
put together without the email package's header parser write the same octets as the
email package's own set_content, add_alternative and add_attachment (plain values), or
read the same to its parser (hostile values); the message stays an ordinary
EmailMessage that can be read and changed after it is built."""

from __future__ import annotations

import doctest
import email
import email.policy
import re
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from typing import Any

import pytest

import asmtp._core.mime
from asmtp._core.message import X_MAILER, build_message
from asmtp._core.prepared import prepare_message

DATE = "Mon, 01 Jan 2024 10:00:00 +0000"
MESSAGE_ID = "<1.2@example.org>"
PDF = ("report.pdf", bytes(range(256)) * 40, "application/pdf")
CSV = ("data.csv", b"a,b\n1,2\n", "text/csv")

SHAPES: dict[str, dict[str, Any]] = {
    "text": {"mailtype": "text"},
    "html": {"mailtype": "html"},
    "html+alt": {"mailtype": "html", "alt_text": "Plain text\n"},
    "text+attachments": {"mailtype": "text", "attachments": [PDF, CSV]},
    "html+attachment": {"mailtype": "html", "attachments": [PDF]},
    "html+alt+attachment": {"mailtype": "html", "alt_text": "Plain\n", "attachments": [PDF]},
}


def test_docstring_examples() -> None:
    result = doctest.testmod(asmtp._core.mime)
    assert result.attempted >= 6
    assert result.failed == 0


def stock(
    *, to: str, subject: str, body: str, mailtype: str, alt_text: str | None = None, **kw: Any
) -> EmailMessage:
    """The same message made with the email package alone, as build_message once did."""
    msg = EmailMessage(policy=email.policy.default.clone(cte_type="7bit"))
    msg["From"] = "News <news@example.org>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = DATE
    msg["Message-ID"] = MESSAGE_ID
    msg["X-Mailer"] = X_MAILER
    subtype = "plain" if mailtype == "text" else "html"
    if alt_text is None:
        msg.set_content(body, subtype=subtype, charset="utf-8")
    else:
        msg.set_content(alt_text, subtype="plain", charset="utf-8")
        msg.add_alternative(body, subtype="html", charset="utf-8")
    for filename, data, content_type in kw.get("attachments", []):
        maintype, _, sub = content_type.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=sub, filename=filename)
    return msg


def built(**kw: Any) -> EmailMessage:
    return build_message(from_="News <news@example.org>", date=DATE, message_id=MESSAGE_ID, **kw)


def wire(msg: EmailMessage) -> bytes:
    data = prepare_message(msg).data
    return re.sub(rb"=============[0-9]+==", b"boundary", data)


@pytest.mark.parametrize("shape", list(SHAPES))
def test_plain_values_write_the_same_octets_as_the_email_package(shape: str) -> None:
    kw = {"to": "Ann Lee <ann@example.net>", "subject": "Your order", "body": "Hi.\nBye.\n"}
    kw.update(SHAPES[shape])
    assert wire(built(**kw)) == wire(stock(**kw))


HOSTILE_FIELDS = [
    ("Grüße Müller <m@example.net>", "Grüße"),
    ('"Lee, Ann" <ann@example.net>', "=?utf-8?q?encoded?= looking"),
    ("ann@example.net", "  spaced   out  "),
    ("x" * 70 + " <ann@example.net>", "long " * 30),
    ('"a\\"b" <ann@example.net>', "tab\there"),
]


def reading(msg: EmailMessage) -> list[Any]:
    parsed = email.message_from_bytes(
        prepare_message(msg).data[:-3].replace(b"\r\n..", b"\r\n."), policy=email.policy.default
    )
    out = []
    for part in parsed.walk():
        fields = sorted((k.lower(), str(v)) for k, v in part.items() if k.lower() != "content-type")
        content = None if part.is_multipart() else part.get_content()
        out.append((part.get_content_type(), fields, content))
    return out


@pytest.mark.parametrize(("to", "subject"), HOSTILE_FIELDS)
@pytest.mark.parametrize("body", ["plain\n", "Grüße = ü\n" * 3, "x" * 300, ".dot\n\0nul"])
def test_hostile_values_read_as_with_the_email_package(to: str, subject: str, body: str) -> None:
    kw = {"to": to, "subject": subject, "body": body, **SHAPES["html+alt+attachment"]}

    def without_cte(found: list[Any]) -> list[Any]:
        return [
            (kind, [f for f in fields if f[0] != "content-transfer-encoding"], content)
            for kind, fields, content in found
        ]

    assert without_cte(reading(built(**kw))) == without_cte(reading(stock(**kw)))


def test_raw_fields_read_back_parsed() -> None:
    msg = built(to="Ann Lee <ann@example.net>, bo@example.net", subject="Hi", body="x")
    to = msg["To"]
    assert isinstance(to, AddressHeader)
    assert [a.addr_spec for a in to.addresses] == ["ann@example.net", "bo@example.net"]
    assert msg["Subject"] == "Hi" and msg.get_content_type() == "text/plain"
    assert msg.get_content() == "x\n"


def test_a_built_message_can_be_changed_and_sent() -> None:
    msg = built(to="ann@example.net", subject="Hi", body="Body\n", mailtype="html")
    del msg["Subject"]
    msg["Subject"] = "Changed"
    msg.add_attachment(b"data", maintype="application", subtype="octet-stream", filename="d")
    parsed = email.message_from_bytes(prepare_message(msg).data[:-3], policy=email.policy.default)
    assert parsed["Subject"] == "Changed"
    assert [p.get_content_type() for p in parsed.walk()] == [
        "multipart/mixed",
        "text/html",
        "application/octet-stream",
    ]


def test_an_unusual_file_name_takes_the_email_package() -> None:
    kw = {
        "to": "ann@example.net",
        "subject": "s",
        "body": "b",
        "mailtype": "text",
        "attachments": [('ré"sumé.pdf', b"x", "application/pdf")],
    }
    *_, part = built(**kw).iter_parts()
    assert part.get_filename() == 'ré"sumé.pdf'
    assert reading(built(**kw)) == reading(stock(**kw))
