"""Message parts beyond the body: inline images referred to as ``cid:`` (RFC 2392,
multipart/related of RFC 2387), calendar invites (RFC 5545 objects sent as RFC 6047
asks), List-* fields (RFC 2369, 2919, 8058), priority fields and Reply-To.

Each message is built, prepared for DATA as asmtp sends it, then parsed back as a mail
reader would (``BytesParser(policy=policy.default)``): the checks read the MIME tree,
the Content-IDs and the header fields a reader sees. One test sends such a message
through a real SMTP server on loopback (the ``asmtp_outbox`` fixture).
"""

from __future__ import annotations

import base64
import doctest
import re
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest

import asmtp
import asmtp._core.parts
import asmtp.testing
from asmtp import InputError, build_message, prepare_message
from asmtp.testing import Outbox

# The fixture, for runs where asmtp's pytest11 entry point is not installed (yet).
asmtp_outbox = asmtp.testing.asmtp_outbox

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
GIF = b"GIF89a" + bytes(32)
JPEG = b"\xff\xd8\xff\xe0" + bytes(32)

INVITE = (
    "BEGIN:VCALENDAR\r\n"
    "VERSION:2.0\r\n"
    "PRODID:-//example.org//planner//EN\r\n"
    "METHOD:REQUEST\r\n"
    "BEGIN:VEVENT\r\n"
    "UID:20250301-standup@example.org\r\n"
    "DTSTAMP:20250220T090000Z\r\n"
    "DTSTART:20250301T090000Z\r\n"
    "DTEND:20250301T091500Z\r\n"
    "SUMMARY:Stand-up, café corner\r\n"
    "ORGANIZER:mailto:jack@example.org\r\n"
    "ATTENDEE;RSVP=TRUE:mailto:ann@example.net\r\n"
    "END:VEVENT\r\n"
    "END:VCALENDAR\r\n"
)


def build(**kwargs: Any) -> EmailMessage:
    args: dict[str, Any] = {"to": "ann@example.net", "from_": "jack@example.org"}
    args.update(kwargs)
    return build_message(**args)


def received(msg: EmailMessage) -> EmailMessage:
    """The message as a server stores it and a reader parses it: the bytes sent after
    DATA, without the final dot, dot-stuffing undone (RFC 5321 4.5.2)."""
    data = prepare_message(msg).data
    assert data.endswith(b"\r\n.\r\n")
    lines = data[:-3].split(b"\r\n")
    raw = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    return parsed


def tree(part: EmailMessage) -> object:
    """The MIME tree: a leaf's content type, or (multipart type, [children])."""
    if not part.is_multipart():
        return part.get_content_type()
    return (part.get_content_type(), [tree(p) for p in part.iter_parts()])  # type: ignore[arg-type]


def leaves(msg: EmailMessage) -> dict[str, EmailMessage]:
    """The leaf parts by content type (the first of each)."""
    found: dict[str, EmailMessage] = {}
    for part in msg.walk():
        if not part.is_multipart():
            assert isinstance(part, EmailMessage)
            found.setdefault(part.get_content_type(), part)
    return found


def text(part: EmailMessage) -> str:
    content = part.get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def test_docstring_examples() -> None:
    result = doctest.testmod(asmtp._core.parts)
    assert result.attempted >= 5
    assert result.failed == 0


# --------------------------------------------------------------------- inline images


def test_inline_image_inside_the_alternative() -> None:
    msg = received(
        build(
            mailtype="html",
            body='<p>Hello</p><img src="cid:logo" alt="logo">',
            alt_text="Hello",
            inline={"logo": PNG},
        )
    )
    assert tree(msg) == (
        "multipart/alternative",
        ["text/plain", ("multipart/related", ["text/html", "image/png"])],
    )
    parts = leaves(msg)
    image = parts["image/png"]
    content_id = image["Content-ID"]
    assert re.fullmatch(r"<[^<>@]+\.logo@example\.org>", content_id)
    assert image.get_content_disposition() == "inline"
    assert image.get_filename() == "logo.png"
    assert image.get_content() == PNG
    # the HTML refers to the part by its Content-ID, not by the caller's name
    html = text(parts["text/html"])
    assert f'src="cid:{content_id[1:-1]}"' in html
    assert "cid:logo" not in html
    assert text(parts["text/plain"]) == "Hello\n"


def test_inline_images_without_alternative_and_with_attachments(tmp_path: Path) -> None:
    logo = tmp_path / "logo.gif"
    logo.write_bytes(GIF)
    msg = received(
        build(
            mailtype="html",
            body="<img src='cid:logo'><div style=\"background: url(cid:photo)\"></div>",
            inline={"logo": logo, "photo": str(logo)},
            attachments=[("notes.txt", b"notes\n", "text/plain")],
        )
    )
    assert tree(msg) == (
        "multipart/mixed",
        [("multipart/related", ["text/html", "image/gif", "image/gif"]), "text/plain"],
    )
    related = next(msg.iter_parts())
    assert isinstance(related, EmailMessage)
    images = list(related.iter_parts())[1:]
    ids = [str(image["Content-ID"]) for image in images]
    assert len(set(ids)) == 2
    assert [image.get_filename() for image in images] == ["logo.gif", "logo.gif"]
    html = text(leaves(msg)["text/html"])
    assert f"src='cid:{ids[0][1:-1]}'" in html
    assert f"url(cid:{ids[1][1:-1]})" in html
    [notes] = msg.iter_attachments()
    assert notes.get_filename() == "notes.txt"


def test_inline_types_from_bytes_name_or_tuple() -> None:
    msg = received(
        build(
            mailtype="html",
            body='<img src="cid:a"><img src="cid:b.jpg"><img src="cid:c">',
            inline={
                "a": JPEG,
                "b.jpg": b"not sniffed: the name says JPEG",
                "c": ("chart.svg", b"<svg/>", "image/svg+xml"),
            },
        )
    )
    related = leaves(msg)
    assert tree(msg) == (
        "multipart/related",
        ["text/html", "image/jpeg", "image/jpeg", "image/svg+xml"],
    )
    assert related["image/svg+xml"].get_filename() == "chart.svg"
    filenames = [p.get_filename() for p in msg.walk() if p.get_content_maintype() == "image"]
    assert filenames == ["a.jpg", "b.jpg", "chart.svg"]


def test_inline_content_id_named_by_the_caller() -> None:
    msg = received(
        build(
            mailtype="html",
            body='<img src="cid:logo.2025@example.org">',
            inline={"logo.2025@example.org": PNG},
        )
    )
    image = leaves(msg)["image/png"]
    assert image["Content-ID"] == "<logo.2025@example.org>"
    assert 'src="cid:logo.2025@example.org"' in text(leaves(msg)["text/html"])


def test_cid_reference_rules() -> None:
    # "placid:" is a word, not a reference; "CID:" is one (URL schemes ignore case)
    msg = received(
        build(mailtype="html", body="<p>placid: calm</p><img src=CID:logo>", inline={"logo": PNG})
    )
    content_id = leaves(msg)["image/png"]["Content-ID"]
    assert (
        text(leaves(msg)["text/html"]) == f"<p>placid: calm</p><img src=cid:{content_id[1:-1]}>\n"
    )
    # without inline= the HTML is left as it is
    plain = received(build(mailtype="html", body='<img src="cid:logo">'))
    assert text(plain) == '<img src="cid:logo">\n'


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"body": '<img src="cid:logo"><img src="cid:chart">', "inline": {"logo": PNG}},
            r"refers to cid:chart but inline= names only \['logo'\]",
        ),
        (
            {"body": '<img src="cid:logo">', "inline": {"logo": PNG, "unused": PNG}},
            r"\['unused'\] not referred to as cid:NAME",
        ),
        ({"body": "<p>no image</p>", "inline": {"logo": PNG}}, "not referred to"),
        ({"mailtype": "text", "inline": {"logo": PNG}}, "only used with mailtype='html'"),
        ({"inline": {"logo": b"plain bytes"}}, "cannot tell the type"),
        ({"inline": {"bad name": PNG}}, "neither a name"),
        ({"inline": {"logo\r\nBcc: x@example.org": PNG}}, "CR, LF, NUL"),
        ({"inline": {"logo": ("logo.png", PNG, "png")}}, "not a type/subtype"),
        ({"inline": ["logo.png"]}, "must be a mapping"),
    ],
)
def test_inline_refusals(kwargs: dict[str, Any], message: str) -> None:
    args = {"mailtype": "html", "body": '<img src="cid:logo">', **kwargs}
    with pytest.raises(InputError, match=message):
        build(**args)


def test_inline_path_must_be_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"inline\['logo'\]: .* is a directory"):
        build(mailtype="html", body='<img src="cid:logo">', inline={"logo": tmp_path})


# --------------------------------------------------------------------- calendar invites


def test_calendar_invite_with_plain_text() -> None:
    msg = received(build(subject="Stand-up", body="See the invite.\n", calendar=INVITE))
    assert tree(msg) == (
        "multipart/mixed",
        [("multipart/alternative", ["text/plain", "text/calendar"]), "application/ics"],
    )
    parts = leaves(msg)
    calendar = parts["text/calendar"]
    assert calendar.get_param("method") == "REQUEST"
    assert calendar.get_content_charset() == "utf-8"
    assert text(calendar) == INVITE.replace("\r\n", "\n")
    [ics] = msg.iter_attachments()
    assert ics.get_content_type() == "application/ics"
    assert ics.get_filename() == ics.get_param("name") == "invite.ics"
    assert ics.get_content_disposition() == "attachment"
    # the file keeps the CRLF line endings RFC 5545 3.1 asks for
    assert ics.get_content() == INVITE.encode("utf-8")


def test_calendar_method_from_the_object_or_added() -> None:
    cancel = INVITE.replace("METHOD:REQUEST", "METHOD:CANCEL")
    msg = received(build(calendar=cancel.encode("utf-8")))
    assert leaves(msg)["text/calendar"].get_param("method") == "CANCEL"
    without = (
        "BEGIN:VCALENDAR\nVERSION:2.0\nBEGIN:VEVENT\nUID:1@example.org\nEND:VEVENT\nEND:VCALENDAR"
    )
    msg = received(build(calendar=without))
    calendar = leaves(msg)["text/calendar"]
    assert calendar.get_param("method") == "REQUEST"
    # RFC 6047 2.4: the part's method and the object's METHOD agree
    assert text(calendar).splitlines()[:3] == ["BEGIN:VCALENDAR", "METHOD:REQUEST", "VERSION:2.0"]


def test_calendar_with_html_inline_images_and_attachments() -> None:
    msg = received(
        build(
            mailtype="html",
            body='<p>Stand-up</p><img src="cid:map">',
            alt_text="Stand-up",
            inline={"map": PNG},
            calendar=INVITE,
            attachments=[("agenda.txt", b"1. news\n", "text/plain")],
        )
    )
    assert tree(msg) == (
        "multipart/mixed",
        [
            (
                "multipart/alternative",
                [
                    "text/plain",
                    ("multipart/related", ["text/html", "image/png"]),
                    "text/calendar",
                ],
            ),
            "application/ics",
            "text/plain",
        ],
    )
    assert [a.get_filename() for a in msg.iter_attachments()] == ["invite.ics", "agenda.txt"]
    # a reader picks the HTML for display, the calendar for the invite
    assert msg.get_body(preferencelist=("html",)) is not None
    assert leaves(msg)["text/calendar"].get_param("method") == "REQUEST"


@pytest.mark.parametrize(
    ("calendar", "message"),
    [
        ("BEGIN:VEVENT\r\nEND:VEVENT\r\n", "from BEGIN:VCALENDAR to END:VCALENDAR"),
        ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\n", "from BEGIN:VCALENDAR to END:VCALENDAR"),
        (" BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n", "from BEGIN:VCALENDAR to END:VCALENDAR"),
        ("BEGIN:VCALENDAR\r\nSUMMARY:a\x00b\r\nEND:VCALENDAR", r"line 2 .* U\+0000"),
        ("BEGIN:VCALENDAR\r\nSUMMARY:\x1b[2J\r\nEND:VCALENDAR", r"U\+001B"),
        ("BEGIN:VCALENDAR\r\nMETHOD:RE QUEST\r\nEND:VCALENDAR", "not a method name"),
        (b"BEGIN:VCALENDAR\r\nSUMMARY:\xff\r\nEND:VCALENDAR", "not UTF-8"),
        ("BEGIN:VCALENDAR\r\nSUMMARY:\ud800\r\nEND:VCALENDAR", "not encodable"),
        (42, "must be str or bytes"),
    ],
)
def test_calendar_refusals(calendar: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build(calendar=calendar)


# --------------------------------------------------------------------- header fields


def test_list_fields() -> None:
    msg = received(
        build(
            list_headers={
                "List-Id": "Team news <news.example.org>",
                "list-unsubscribe": ["https://example.org/u?id=1", "<mailto:leave@example.org>"],
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                "List-Help": "mailto:help@example.org",
                "List-Subscribe": "<https://example.org/join>",
                "List-Post": "NO",
                "List-Owner": "mailto:owner@example.org",
                "List-Archive": "https://example.org/archive",
            }
        )
    )
    assert msg["List-Id"] == "Team news <news.example.org>"
    assert msg["List-Unsubscribe"] == "<https://example.org/u?id=1>, <mailto:leave@example.org>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert msg["List-Help"] == "<mailto:help@example.org>"
    assert msg["List-Subscribe"] == "<https://example.org/join>"
    assert msg["List-Post"] == "NO"
    assert msg["List-Owner"] == "<mailto:owner@example.org>"
    assert msg["List-Archive"] == "<https://example.org/archive>"
    assert received(build(list_headers={"List-Id": "news.example.org"}))["List-Id"] == (
        "<news.example.org>"
    )


def test_list_id_with_a_non_ascii_description() -> None:
    msg = received(build(list_headers={"List-Id": "Équipe <team.example.org>"}))
    assert msg["List-Id"] == "Équipe <team.example.org>"


@pytest.mark.parametrize(
    ("list_headers", "message"),
    [
        ({"List-Foo": "x"}, "not a List-\\* field"),
        ({"List-Id": "news"}, "must look like 'news.example.org'"),
        ({"List-Id": "news.example.org", "list-id": "news.example.org"}, "given twice"),
        ({"List-Help": "help@example.org"}, "not one ASCII URL"),
        ({"List-Help": "https://example.org/a https://example.org/b"}, "not one ASCII URL"),
        ({"List-Help": "https://exämple.org/"}, "not one ASCII URL"),
        ({"List-Help": []}, "no URL given"),
        ({"List-Help": "https://example.org/\r\nBcc: x@example.org"}, "CR, LF, NUL"),
        ({"List-Id": "News\r\n <news.example.org>"}, "CR, LF, NUL"),
        ({"List-Id": "News <news.example.org>\x00"}, "CR, LF, NUL"),
        (
            {
                "List-Unsubscribe": "mailto:u@example.org",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            },
            "needs a List-Unsubscribe with an https URL",
        ),
        ({"List-Unsubscribe-Post": "yes please"}, "only 'List-Unsubscribe=One-Click'"),
        ("List-Id: x", "must be a mapping"),
    ],
)
def test_list_field_refusals(list_headers: Any, message: str) -> None:
    with pytest.raises(InputError, match=message):
        build(list_headers=list_headers)


@pytest.mark.parametrize(
    ("priority", "fields"),
    [
        ("high", ("1 (Highest)", "high", "urgent")),
        ("normal", ("3 (Normal)", "normal", "normal")),
        ("low", ("5 (Lowest)", "low", "non-urgent")),
    ],
)
def test_priority_fields(priority: str, fields: tuple[str, str, str]) -> None:
    msg = received(build(priority=priority))
    assert (msg["X-Priority"], msg["Importance"], msg["Priority"]) == fields


def test_no_priority_no_fields() -> None:
    msg = received(build())
    assert all(msg[name] is None for name in ("X-Priority", "Importance", "Priority", "Reply-To"))
    with pytest.raises(InputError, match="'urgent' is not 'high', 'normal' or 'low'"):
        build(priority="urgent")


def test_reply_to() -> None:
    msg = received(build(reply_to="Help desk <help@example.org>, team@example.org"))
    assert msg["Reply-To"] == "Help desk <help@example.org>, team@example.org"
    assert [a.addr_spec for a in msg["Reply-To"].addresses] == [
        "help@example.org",
        "team@example.org",
    ]
    # checked and normalized like To: IDNA domain, SMTPUTF8 for the local part
    prepared = prepare_message(build(reply_to=["Jörg <jörg@bücher.example>"]))
    assert "Reply-To: Jörg <jörg@xn--bcher-kva.example>\r\n".encode() in prepared.data
    assert prepared.smtputf8
    with pytest.raises(InputError, match="reply_to"):
        build(reply_to="help@example.org\r\nBcc: victim@example.org")
    with pytest.raises(InputError, match="reply_to"):
        build(reply_to="not an address")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"reply_to": "a@example.org", "headers": {"Reply-To": "b@example.org"}}, "Reply-To"),
        ({"priority": "low", "headers": [("importance", "high")]}, "Importance"),
        (
            {
                "list_headers": {"List-Id": "a.example.org"},
                "headers": {"List-Id": "<b.example.org>"},
            },
            "List-Id",
        ),
    ],
)
def test_a_field_is_given_in_one_place(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(InputError, match=f"'{name}' is also set by"):
        build(**kwargs)


def test_list_fields_still_possible_through_headers() -> None:
    msg = received(build(headers={"List-Id": "<news.example.org>"}, priority="high"))
    assert msg["List-Id"] == "<news.example.org>"
    assert msg["X-Priority"] == "1 (Highest)"


# --------------------------------------------------------------------- through a server


async def test_sendmail_delivers_inline_images_and_invite(asmtp_outbox: Outbox) -> None:
    report = await asmtp.sendmail(
        to="Ann <ann@example.net>",
        from_="Jack <jack@example.org>",
        subject="Stand-up",
        body='<p>Stand-up at the <img src="cid:map" alt="map"></p>',
        mailtype="html",
        alt_text="Stand-up at the café",
        reply_to="team@example.org",
        priority="high",
        list_headers={
            "List-Id": "Team <team.example.org>",
            "List-Unsubscribe": "https://example.org/u?id=ann",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        },
        inline={"map": PNG},
        calendar=INVITE,
        attachments=[("agenda.txt", b"1. news\n", "text/plain")],
        relay=asmtp_outbox.relay,
    )
    assert report.ok, report
    [sent] = asmtp_outbox.messages
    msg = sent.message
    assert sent.rcpt_tos == ("ann@example.net",)
    assert (msg["Reply-To"], msg["X-Priority"], msg["Importance"], msg["Priority"]) == (
        "team@example.org",
        "1 (Highest)",
        "high",
        "urgent",
    )
    assert msg["List-Id"] == "Team <team.example.org>"
    assert msg["List-Unsubscribe"] == "<https://example.org/u?id=ann>"
    assert tree(msg) == (
        "multipart/mixed",
        [
            (
                "multipart/alternative",
                [
                    "text/plain",
                    ("multipart/related", ["text/html", "image/png"]),
                    "text/calendar",
                ],
            ),
            "application/ics",
            "text/plain",
        ],
    )
    image = leaves(msg)["image/png"]
    assert image.get_content() == PNG
    assert sent.html is not None and f'src="cid:{image["Content-ID"][1:-1]}"' in sent.html
    assert sent.text == "Stand-up at the café\n"
    assert [a.get_filename() for a in sent.attachments] == ["invite.ics", "agenda.txt"]
    assert leaves(msg)["text/calendar"].get_param("method") == "REQUEST"
    # the invite went base64 as a file and whole as the calendar part
    ics = sent.attachments[0]
    assert ics.get_content() == INVITE.encode("utf-8")
    assert base64.b64encode(INVITE.encode("utf-8"))[:40] in sent.data.replace(b"\r\n", b"")


async def test_sendmail_refuses_bad_parts_before_sending(asmtp_outbox: Outbox) -> None:
    with pytest.raises(InputError, match="cid:chart"):
        await asmtp.sendmail(
            to="ann@example.net",
            from_="jack@example.org",
            body='<img src="cid:chart">',
            mailtype="html",
            inline={"map": PNG},
            relay=asmtp_outbox.relay,
        )
    with pytest.raises(InputError, match="List-Help"):
        await asmtp.sendmail(
            to="ann@example.net",
            from_="jack@example.org",
            list_headers={"List-Help": "https://example.org/\nBcc: x@example.org"},
            relay=asmtp_outbox.relay,
        )
    assert len(asmtp_outbox) == 0
    assert asmtp_outbox.sessions_opened == 0
