"""The recipients-file reader (asmtp._core.recipients): plain lists and CSV, comments, byte
order marks, bad rows by line number, duplicates, and placeholder filling that leaves
every other brace alone. Pure functions of text: no servers."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

import asmtp._core.recipients
from asmtp import InputError
from asmtp._core.recipients import (
    BadRow,
    Duplicate,
    Placeholders,
    address_key,
    decode_recipients,
    parse_recipients,
)


def bad_lines(text: str | bytes) -> dict[int, str]:
    return {row.line: row.reason for row in parse_recipients(text).bad_rows}


# ----------------------------------------------------------------------- plain lists


def test_plain_list_skips_blank_and_comment_lines() -> None:
    found = parse_recipients(
        "# customers\n\nann@example.org\n   \n  # indented comment\nBee <bee@example.net>\n"
        "  spaced@example.org  \n"
    )
    assert not found.is_csv and found.columns == ()
    assert [(r.line, r.address, r.name) for r in found.recipients] == [
        (3, "ann@example.org", ""),
        (6, "bee@example.net", "Bee"),
        (7, "spaced@example.org", ""),
    ]
    assert found.bad_rows == () and found.duplicates == ()
    assert all(dict(r.fields) == {} for r in found.recipients)


def test_line_numbers_count_every_line_ending() -> None:
    # \r\n, \n and a lone \r each end one line, as an editor shows them
    found = parse_recipients("a@example.org\r\nb@example.org\rnope\nc@example.org\n")
    assert [(r.line, r.address) for r in found.recipients] == [
        (1, "a@example.org"),
        (2, "b@example.org"),
        (4, "c@example.org"),
    ]
    assert bad_lines("a@example.org\r\nb@example.org\rnope\nc@example.org\n") == {
        3: "'nope' is not an address"
    }


def test_plain_bad_rows_by_line_number() -> None:
    text = "ok@example.org\nnot an address\n\na@example.org, b@example.org\n<unclosed@x.org\n"
    assert bad_lines(text) == {
        2: "'not an address' is not an address",
        4: "'a@example.org, b@example.org' holds 2 addresses (one per row)",
        5: "'<unclosed@x.org' is not an address",
    }
    assert [r.address for r in parse_recipients(text).recipients] == ["ok@example.org"]


def test_csv_without_an_email_column_gets_a_hint() -> None:
    reasons = bad_lines("address,name\nann@example.org,Ann\n")
    assert sorted(reasons) == [1, 2]
    assert "header row naming an 'email' column" in reasons[1]


def test_idn_domains_are_normalized() -> None:
    [r] = parse_recipients("jörg@bücher.example\n").recipients
    assert r.address == "jörg@xn--bcher-kva.example"


def test_empty_file() -> None:
    for text in ("", "\n\n", "# nothing yet\n", "\ufeff"):
        found = parse_recipients(text)
        assert found.recipients == () and found.bad_rows == ()


# ----------------------------------------------------------------------- encodings


def test_byte_order_mark_is_dropped() -> None:
    data = "\ufeffemail,first\r\nann@example.org,Ann\r\n".encode()
    found = parse_recipients(data)
    assert found.email_column == "email"  # not "\ufeffemail"
    assert [r.address for r in found.recipients] == ["ann@example.org"]
    plain = parse_recipients("\ufeffann@example.org\n")
    assert [r.address for r in plain.recipients] == ["ann@example.org"]
    assert decode_recipients(b"\xef\xbb\xbfx") == "x"


def test_not_utf8_names_the_line() -> None:
    with pytest.raises(InputError, match="line 2: not UTF-8"):
        parse_recipients(b"ann@example.org\n\xff@example.org\n")


# ----------------------------------------------------------------------- CSV


def test_csv_rows_fill_fields() -> None:
    text = (
        "Email, first ,plan\n"
        "ann@example.org,Ann,gold\n"
        '"Bee Doe <bee@example.net>", Bee,"silver, yearly"\n'
        '"c@example.org","Cee ""the third""","multi\nline"\n'
        "d@example.org,Dee,bronze\n"
    )
    found = parse_recipients(text)
    assert found.is_csv
    assert found.columns == ("Email", "first", "plan")
    assert found.email_column == "Email"
    rows = [(r.line, r.address, r.name, dict(r.fields)) for r in found.recipients]
    assert rows == [
        (2, "ann@example.org", "", {"Email": "ann@example.org", "first": "Ann", "plan": "gold"}),
        (
            3,
            "bee@example.net",
            "Bee Doe",
            {"Email": "Bee Doe <bee@example.net>", "first": "Bee", "plan": "silver, yearly"},
        ),
        (
            4,
            "c@example.org",
            "",
            {"Email": "c@example.org", "first": 'Cee "the third"', "plan": "multi\nline"},
        ),
        # the quoted field spans two lines: the next row is on line 6
        (6, "d@example.org", "", {"Email": "d@example.org", "first": "Dee", "plan": "bronze"}),
    ]


def test_csv_email_column_anywhere_and_other_delimiters() -> None:
    found = parse_recipients("name;EMAIL\nAnn;ann@example.org\n")
    assert found.email_column == "EMAIL"
    assert [dict(r.fields) for r in found.recipients] == [
        {"name": "Ann", "EMAIL": "ann@example.org"}
    ]
    tabbed = parse_recipients("name\temail\nAnn\tann@example.org\n")
    assert [r.address for r in tabbed.recipients] == ["ann@example.org"]


def test_csv_bad_rows_by_line_number() -> None:
    text = (
        "# exported from the shop\n"
        "email,first\n"
        "ann@example.org,Ann\n"  # 3
        "not-an-address,Bob\n"  # 4
        ",Nobody\n"  # 5
        "cee@example.org\n"  # 6: one field
        "dee@example.org,Dee,extra\n"  # 7: three fields
        "\n"
        "# a comment between rows\n"
        'eve@example.org,"unclosed\n'  # 10: the quote runs to the end of the file
        "fay@example.org,Fay\n"
    )
    found = parse_recipients(text)
    assert [r.address for r in found.recipients] == ["ann@example.org"]
    assert found.bad_rows == (
        BadRow(4, "not-an-address", "'not-an-address' is not an address"),
        BadRow(5, "", "empty email"),
        BadRow(6, "cee@example.org", "1 fields, the header has 2"),
        BadRow(7, "dee@example.org", "3 fields, the header has 2"),
        BadRow(10, "", "not valid CSV: unexpected end of data"),
    )
    assert str(found.bad_rows[1]) == "line 5: empty email"


def test_csv_comment_lines_inside_a_quoted_field_are_data() -> None:
    found = parse_recipients('email,note\nann@example.org,"first\n# not a comment"\n')
    [r] = found.recipients
    assert r.fields["note"] == "first\n# not a comment"


@pytest.mark.parametrize(
    ("header", "why"),
    [("email,Email\n", "more than one email column"), ("email,x,x\n", "'x' appears twice")],
)
def test_csv_header_problems_refuse_the_file(header: str, why: str) -> None:
    with pytest.raises(InputError, match=why):
        parse_recipients(header + "ann@example.org,a,b\n")


# ----------------------------------------------------------------------- duplicates


def test_duplicates_keep_the_first_row() -> None:
    text = (
        "email,n\nann@example.org,1\nbee@example.org,2\nann@EXAMPLE.ORG,3\n"
        "Ann <ann@example.org>,4\nANN@example.org,5\n"
    )
    found = parse_recipients(text)
    # the domain compares case-insensitively, the local part exactly (RFC 5321 2.4)
    assert [(r.line, r.address, r.fields["n"]) for r in found.recipients] == [
        (2, "ann@example.org", "1"),
        (3, "bee@example.org", "2"),
        (6, "ANN@example.org", "5"),
    ]
    assert found.duplicates == (
        Duplicate(4, "ann@EXAMPLE.ORG", 2),
        Duplicate(5, "ann@example.org", 2),
    )
    assert found.bad_rows == ()  # not an error
    assert address_key("Ann@Example.ORG") == "Ann@example.org"


# ----------------------------------------------------------------------- placeholders


def test_placeholders_fill_columns_and_leave_other_braces() -> None:
    p = parse_recipients("email,first,plan name\nann@example.org,Ann,gold\n").placeholders()
    [r] = parse_recipients("email,first,plan name\nann@example.org,Ann,gold\n").recipients
    body = (
        "<style>a {color: red} p{margin:0}</style> Hi {first}! {plan name} plan. "
        "{{ {} {FIRST} {unknown} {first {{first}} }}"
    )
    assert p.fill(body, r.fields) == (
        "<style>a {color: red} p{margin:0}</style> Hi Ann! gold plan. "
        "{{ {} {FIRST} {unknown} {first {first} }}"
    )
    assert p.used(body) == {"first", "plan name"}
    assert p.used("a {color: red} {{first}}") == set()


def test_values_are_not_templates() -> None:
    # a value that looks like a placeholder, or like str.format syntax, is inserted as is
    p = Placeholders(["a", "b"])
    assert p.fill("{a}-{b}", {"a": "{b}", "b": "{0} {__class__}"}) == "{b}-{0} {__class__}"


def test_placeholders_without_columns_change_nothing() -> None:
    p = Placeholders([])
    assert p.fill("{email} {first}", {"email": "x"}) == "{email} {first}"
    assert p.used("{email}") == set()
    # a name with a brace can never be a placeholder; an empty one neither
    assert Placeholders(["x}", ""]).names == frozenset()


def test_a_missing_value_leaves_the_placeholder() -> None:
    assert Placeholders(["first"]).fill("Hi {first}", {}) == "Hi {first}"


@given(st.text(alphabet="{}ab xy:;", max_size=40))
def test_text_without_column_names_is_unchanged(text: str) -> None:
    assert Placeholders(["first"]).fill(text, {"first": "Ann"}) == text


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(asmtp._core.recipients)
    assert tried > 0 and failures == 0
