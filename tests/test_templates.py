"""Templates rendered per recipient with Jinja2 (``asmtp.Template``, the ``jinja`` extra):
values HTML-escaped in the HTML body only, a sandbox, a missing value or a line break in
the subject refused before any connection, and the same through ``asmtp.sendmail``,
``asmtp.Mailer`` jobs and ``asmtp send --recipients FILE.csv --template jinja``, each
checked on a real outbox on loopback. Per-recipient copies filled into a compiled
message (``Template.prepared``, ``bind`` jobs, ``sendmail(per_recipient=)``) read, to
the email parser, exactly as the message built whole, over hostile values."""

from __future__ import annotations

import datetime
import doctest
import json
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import markupsafe
import pytest

import asmtp
import asmtp._core.template
from asmtp._core.dkim import DKIM
from asmtp._core.prepared import PreparedMessage, prepare_message
from asmtp._delivery.personalise import envelope_sender
from asmtp.testing import Outbox, SentMessage
from test_compiled import ATTACHMENT, HOSTILE, SUBJECTS, parsed, shape
from test_dependencies import python, without

SENDER = "news@example.com"
WELCOME = asmtp.Template(
    subject="Welcome, {{ first }}",
    body="Hi {{ first }}, your plan: {{ plan }}.\n",
    html="<p>Hi <b>{{ first }}</b>, your plan: {{ plan|upper }}.</p>\n",
)


def by_recipient(outbox: Outbox) -> dict[str, SentMessage]:
    """The outbox's messages by their one envelope recipient."""
    found: dict[str, SentMessage] = {}
    for message in outbox.messages:
        [rcpt] = message.rcpt_tos
        found[rcpt] = message
    return found


# --------------------------------------------------------------------------- rendering


def test_the_modules_examples_run() -> None:
    result = doctest.testmod(asmtp._core.template)
    assert result.attempted and not result.failed


def test_each_part_is_rendered_with_the_recipients_values() -> None:
    template = asmtp.Template(
        subject="{{ n }} new {{ 'message' if n == 1 else 'messages' }}",
        body="{% for item in items %}- {{ item.title }}\n{% endfor %}",
    )
    rendered = template.render({"n": 2, "items": [{"title": "a"}, {"title": "b"}]})
    assert rendered == asmtp._core.template.Rendered("2 new messages", "- a\n- b\n", None)
    assert template.variables == {"n", "items"}  # Jinja's globals (range...) left out


def test_values_are_escaped_in_the_html_body_only() -> None:
    value = '<b>Ann</b> & "co"'
    rendered = WELCOME.render({"first": value, "plan": "gold"})
    assert rendered.subject == f"Welcome, {value}"
    assert rendered.body == f"Hi {value}, your plan: gold.\n"
    assert rendered.html == (
        "<p>Hi <b>&lt;b&gt;Ann&lt;/b&gt; &amp; &#34;co&#34;</b>, your plan: GOLD.</p>\n"
    )
    unescaped = asmtp.Template(html="<p>{{ first }}</p>", autoescape=False)
    assert unescaped.render({"first": value}).html == f"<p>{value}</p>"
    marked = asmtp.Template(html="<p>{{ first|safe }}</p>")  # the template's own choice
    assert marked.render({"first": "<i>x</i>"}).html == "<p><i>x</i></p>"


def test_a_missing_value_names_the_field_and_the_recipient() -> None:
    with pytest.raises(asmtp.InputError) as caught:
        WELCOME.render({"first": "Ann"}, recipient="ann@example.org")
    assert caught.value.message == "template body: 'plan' is undefined (recipient ann@example.org)"


def test_a_line_break_from_the_values_cannot_reach_the_subject() -> None:
    with pytest.raises(asmtp.InputError) as caught:
        WELCOME.render({"first": "Ann\r\nBcc: all@example.org", "plan": "x"}, recipient="a@x.org")
    assert caught.value.message.startswith("header 'Subject': ")
    assert "contains CR, LF" in caught.value.message
    assert caught.value.message.endswith("(recipient a@x.org)")


@pytest.mark.parametrize(
    "source",
    [
        "{{ first.__class__.__mro__[1].__subclasses__() }}",
        "{{ first.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ '{0.__class__}'.format(first) }}",
        "{{ items.append('x') }}",  # the values shared by every recipient stay as given
    ],
)
def test_the_sandbox_refuses_attribute_tricks(source: str) -> None:
    items = ["a"]
    with pytest.raises(asmtp.InputError, match="unsafe") as caught:
        asmtp.Template(body=source).render({"first": "Ann", "items": items}, recipient="a@x.org")
    assert caught.value.message.startswith("template body: access to attribute ")
    assert items == ["a"]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"subject": "Hi {{ first "}, "template subject: line 1: unexpected end of template"),
        ({"html": "<p>\n{% if x %}</p>"}, "template html: line 2: Unexpected end of template"),
        ({"body": "{% include 'footer.txt' %}"}, "template body: {% include %}, {% extends %}"),
        ({"body": "{% extends base %}"}, "template body: {% include %}, {% extends %}"),
        ({"body": 3}, "template body must be a string: 3"),
    ],
)
def test_a_template_that_cannot_be_used_is_refused_when_made(
    parts: dict[str, Any], message: str
) -> None:
    with pytest.raises(asmtp.InputError) as caught:
        asmtp.Template(**parts)
    assert caught.value.message.startswith(message)


def test_a_failing_filter_is_that_recipients_input_error() -> None:
    template = asmtp.Template(body="{{ 100 // (share|int) }}%")
    assert template.render({"share": "4"}).body == "25%"
    with pytest.raises(asmtp.InputError) as caught:
        template.render({"share": "0"}, recipient="a@x.org")
    assert caught.value.message == (
        "template body: ZeroDivisionError: integer division or modulo by zero (recipient a@x.org)"
    )


def test_importing_asmtp_does_not_import_jinja2() -> None:
    done = python("import sys, asmtp\nprint(sorted({'jinja2', 'markupsafe'} & set(sys.modules)))")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "[]\n"


def test_without_jinja2_making_a_template_names_the_extra(tmp_path: Path) -> None:
    done = python("import asmtp\nasmtp.Template(body='x')", without(tmp_path, {"jinja2"}))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "ModuleNotFoundError: asmtp.Template needs jinja2: pip install 'asmtp[jinja]'"
    )


# --------------------------------------------------------------------------- sendmail


async def test_sendmail_renders_a_message_for_each_recipient(asmtp_outbox: Outbox) -> None:
    report = await asmtp.sendmail(
        to="Ann <ann@example.org>, bee@example.net",
        from_=SENDER,
        template=WELCOME,
        data={"plan": "basic"},
        per_recipient={
            "ann@EXAMPLE.org": {"first": "<Ann>", "plan": "gold"},  # over data's values
            "bee@example.net": {"first": "Bee"},
        },
        relay=asmtp_outbox.relay,
    )
    assert [(r.recipient, r.status) for r in report] == [
        ("ann@example.org", "delivered"),
        ("bee@example.net", "delivered"),
    ]
    received = by_recipient(asmtp_outbox)  # in the order they arrived: any
    ann, bee = received["ann@example.org"], received["bee@example.net"]
    assert (ann.to, ann.message["To"], ann.subject) == (
        ["ann@example.org"],
        "Ann <ann@example.org>",
        "Welcome, <Ann>",
    )
    assert ann.text == "Hi <Ann>, your plan: gold.\n"
    assert ann.html == "<p>Hi <b>&lt;Ann&gt;</b>, your plan: GOLD.</p>\n"
    assert (bee.to, bee.subject, bee.text) == (
        ["bee@example.net"],
        "Welcome, Bee",
        "Hi Bee, your plan: basic.\n",
    )


async def test_sendmail_with_data_alone_sends_one_message_to_all(asmtp_outbox: Outbox) -> None:
    report = await asmtp.sendmail(
        to="ann@example.org, bee@example.net",
        from_=SENDER,
        template=asmtp.Template(subject="Order {{ order }}", body="Order {{ order }} shipped."),
        data={"order": 42},
        relay=asmtp_outbox.relay,
    )
    assert report.ok
    assert {(m.subject, tuple(m.to)) for m in asmtp_outbox.messages} == {
        ("Order 42", ("ann@example.org", "bee@example.net"))
    }


async def test_a_missing_value_is_refused_before_any_connection(asmtp_outbox: Outbox) -> None:
    with pytest.raises(asmtp.InputError) as caught:
        await asmtp.sendmail(
            to="ann@example.org, bee@example.net",
            from_=SENDER,
            template=WELCOME,
            per_recipient={
                "ann@example.org": {"first": "Ann", "plan": "gold"},
                "bee@example.net": {"first": "Bee"},
            },
            relay=asmtp_outbox.relay,
        )
    assert caught.value.message == "template body: 'plan' is undefined (recipient bee@example.net)"
    assert asmtp_outbox.sessions_opened == 0
    assert asmtp_outbox.messages == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"per_recipient": {"ann@example.org": {"first": "Ann", "plan": "x"}}},
            "per_recipient has no values for bee@example.net",
        ),
        (
            {
                "per_recipient": {
                    "ann@example.org": {"first": "Ann", "plan": "x"},
                    "bee@example.net": {"first": "Bee\nBcc: all@example.org", "plan": "x"},
                }
            },
            "header 'Subject': 'Welcome, Bee\\nBcc: all@example.org' contains CR, LF",
        ),
        ({"subject": "Hello"}, "template= gives the subject and the bodies"),
        ({"per_recipient": {}, "cc": "cc@example.org"}, "cc= and bcc= do not go with"),
    ],
)
async def test_sendmail_refuses_bad_template_input_before_any_connection(
    asmtp_outbox: Outbox, arguments: dict[str, Any], message: str
) -> None:
    to = "ann@example.org, bee@example.net"
    with pytest.raises(asmtp.InputError) as caught:
        await asmtp.sendmail(
            to=to, from_=SENDER, template=WELCOME, relay=asmtp_outbox.relay, **arguments
        )
    assert caught.value.message.startswith(message)
    assert asmtp_outbox.sessions_opened == 0


async def test_values_without_a_template_are_refused(asmtp_outbox: Outbox) -> None:
    with pytest.raises(asmtp.InputError, match="data= and per_recipient= are a template's"):
        await asmtp.sendmail(
            to="ann@example.org", from_=SENDER, body="x", data={}, relay=asmtp_outbox.relay
        )


# --------------------------------------------------------------------------- Mailer jobs


async def test_mailer_jobs_render_when_their_turn_comes(asmtp_outbox: Outbox) -> None:
    rows = [
        {"email": "ann@example.org", "first": "Ann", "plan": "gold"},
        {"email": "bee@example.net", "first": "Bee"},  # no plan: that job fails alone
        {"email": "cy@example.com", "first": "Cy", "plan": "free"},
    ]
    jobs = [
        asmtp.Job(row["email"], WELCOME.bind(row, to=row["email"], from_=SENDER), key=row["email"])
        for row in rows
    ]
    async with asmtp.Mailer(asmtp_outbox.relay, retry=None) as mailer:
        results = {r.key: r async for r in mailer.deliver(jobs)}
    assert {key: r.status for key, r in results.items()} == {
        "ann@example.org": "delivered",
        "bee@example.net": "permanent",
        "cy@example.com": "delivered",
    }
    refused = results["bee@example.net"]
    assert (refused.stage, refused.message) == (
        "input",
        "template body: 'plan' is undefined (recipient bee@example.net)",
    )
    sent = by_recipient(asmtp_outbox)
    assert sorted(sent) == ["ann@example.org", "cy@example.com"]
    assert sent["cy@example.com"].html == "<p>Hi <b>Cy</b>, your plan: FREE.</p>\n"


# --------------------------------------------------------------------------- the command


def asmtp_send(
    outbox: Outbox, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "asmtp", "send", "--from", SENDER, "--json"]
    command += ["--relay", f"{outbox.host}:{outbox.port}", "--tls", "none", *args]
    return subprocess.run(
        command, capture_output=True, text=True, encoding="utf-8", env=env, timeout=60, check=False
    )


CSV = """email,first,plan
ann@example.org,<b>Ann</b>,gold
"Bee Doe <bee@example.net>",Bee,silver
"""


def test_the_command_renders_each_rows_message_with_jinja(
    asmtp_outbox: Outbox, tmp_path: Path
) -> None:
    (tmp_path / "rows.csv").write_text(CSV, encoding="utf-8")
    (tmp_path / "body.html").write_text(
        "<p>{{ first }}: {% if plan == 'gold' %}gold!{% else %}{{ plan|upper }}{% endif %}</p>\n"
        "<style>a {color: red}</style>\n",
        encoding="utf-8",
    )
    (tmp_path / "alt.txt").write_text("Hi {{ first }}, plan {{ plan }}\n", encoding="utf-8")
    done = asmtp_send(
        asmtp_outbox,
        "--recipients", str(tmp_path / "rows.csv"),
        "--subject", "Hi {{ first }} ({{ email }})",
        "--body-file", str(tmp_path / "body.html"),
        "--html",
        "--alt-text-file", str(tmp_path / "alt.txt"),
        "--template", "jinja",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted((r["recipient"], r["status"], r["line"]) for r in results) == [
        ("ann@example.org", "delivered", 2),
        ("bee@example.net", "delivered", 3),
    ]
    sent = by_recipient(asmtp_outbox)
    ann, bee = sent["ann@example.org"], sent["bee@example.net"]
    assert (ann.to, ann.subject) == (["ann@example.org"], "Hi <b>Ann</b> (ann@example.org)")
    assert ann.html == "<p>&lt;b&gt;Ann&lt;/b&gt;: gold!</p>\n<style>a {color: red}</style>\n"
    assert ann.text == "Hi <b>Ann</b>, plan gold\n"
    assert (bee.message["To"], bee.subject) == (
        "Bee Doe <bee@example.net>",
        "Hi Bee (Bee Doe <bee@example.net>)",
    )
    assert bee.html is not None and bee.html.startswith("<p>Bee: SILVER</p>")


def test_the_command_refuses_a_name_no_column_fills_before_sending(
    asmtp_outbox: Outbox, tmp_path: Path
) -> None:
    (tmp_path / "rows.csv").write_text(CSV, encoding="utf-8")
    done = asmtp_send(
        asmtp_outbox,
        "--recipients", str(tmp_path / "rows.csv"),
        "--subject", "Hi {{ frist }}",
        "--body", "{{ plan }} {{ coupon }}",
        "--template", "jinja",
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"asmtp: error: --template jinja: {{{{ coupon }}}}, {{{{ frist }}}} name no column of "
        f"{tmp_path / 'rows.csv'} (its columns: email, first, plan)\n"
    )
    assert asmtp_outbox.sessions_opened == 0


def test_the_command_refuses_a_row_whose_value_breaks_the_subject(
    asmtp_outbox: Outbox, tmp_path: Path
) -> None:
    rows = 'email,first,plan\nann@example.org,"Ann\nBcc: all@example.org",gold\n'
    (tmp_path / "rows.csv").write_text(rows, encoding="utf-8")
    done = asmtp_send(
        asmtp_outbox,
        "--recipients", str(tmp_path / "rows.csv"),
        "--subject", "Hi {{ first }}",
        "--body", "x",
        "--template", "jinja",
    )  # fmt: skip
    assert done.returncode == 2
    assert "line 2: a value for the subject holds a line break" in done.stderr
    assert asmtp_outbox.sessions_opened == 0


def test_the_command_names_a_templates_syntax_error_by_its_flag(
    asmtp_outbox: Outbox, tmp_path: Path
) -> None:
    (tmp_path / "rows.csv").write_text(CSV, encoding="utf-8")
    args = ["--recipients", str(tmp_path / "rows.csv"), "--subject", "x", "--template", "jinja"]
    done = asmtp_send(asmtp_outbox, *args, "--body", "<p>{% if plan %}</p>", "--html")
    assert done.returncode == 2
    assert done.stderr.startswith("asmtp: error: --body: line 1: Unexpected end of template")
    assert asmtp_outbox.sessions_opened == 0


def test_without_the_flag_jinja_syntax_is_sent_as_written(
    asmtp_outbox: Outbox, tmp_path: Path
) -> None:
    (tmp_path / "rows.csv").write_text(CSV, encoding="utf-8")
    done = asmtp_send(
        asmtp_outbox,
        "--recipients", str(tmp_path / "rows.csv"),
        "--subject", "{plan} {{ plan }}",
        "--body", "x",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert {m.subject for m in asmtp_outbox.messages} == {"gold {{ plan }}", "silver {{ plan }}"}


def test_the_command_without_jinja2_names_the_extra(asmtp_outbox: Outbox, tmp_path: Path) -> None:
    (tmp_path / "rows.csv").write_text(CSV, encoding="utf-8")
    done = asmtp_send(
        asmtp_outbox,
        "--recipients", str(tmp_path / "rows.csv"),
        "--subject", "Hi {{ first }}",
        "--body", "x",
        "--template", "jinja",
        env=without(tmp_path, {"jinja2"}),
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        "asmtp: error: --template jinja needs jinja2: pip install 'asmtp[jinja]'\n"
    )
    assert asmtp_outbox.sessions_opened == 0


def test_the_flag_goes_with_a_recipients_file(asmtp_outbox: Outbox) -> None:
    args = ["--to", "ann@example.org", "--body", "x", "--template", "jinja"]
    done = asmtp_send(asmtp_outbox, *args)
    assert done.returncode == 2
    assert "--template jinja goes with --recipients" in done.stderr


# --------------------------------------------------------------------------- compiled copies

LETTER = asmtp.Template(
    subject="Hi {{ first }}",
    body="Dear {{ first }},\n{{ text }}\n",
    html="<p>Dear {{ first }},</p>\n<pre>{{ text }}</pre>\n",
)
KINDS = {
    "text": asmtp.Template(subject=LETTER.subject, body=LETTER.body),
    "html": asmtp.Template(subject=LETTER.subject, html=LETTER.html),
    "html+alt": LETTER,
}
OPTIONS: dict[str, Any] = {
    "from_": "News <news@example.org>",
    "cc": "Desk <desk@example.org>",
    "headers": {"X-Campaign": "spring", "X-Mailer": None},
    "attachments": [ATTACHMENT],
    "reply_to": "help@example.org",
    "priority": "high",
    "list_headers": {"List-Id": "News <news.example.org>"},
    "date": datetime.datetime(2026, 3, 1, 9, 30, tzinfo=datetime.UTC),
    "message_id": "<letter.1@example.org>",
}


def fast_and_slow(
    template: asmtp.Template, data: dict[str, Any], **options: Any
) -> tuple[PreparedMessage, PreparedMessage]:
    """A copy filled into the template's compiled message, and the message built whole."""
    sender, fast = template.prepared(data, eager=True, **options)
    reference = template.message(data, **options)
    assert sender == envelope_sender(reference)
    return fast, prepare_message(reference)


def assert_same_reading(fast: PreparedMessage, reference: PreparedMessage) -> EmailMessage:
    """Both read the same to the parser: every field (Date and Message-ID too), each
    part's type and decoded content; and the same SMTP flags."""
    mine, theirs = parsed(fast), parsed(reference)
    assert shape(mine) == shape(theirs)
    for name in ("Date", "Message-ID"):
        assert str(mine[name]) == str(theirs[name])
    assert (fast.eight_bit, fast.smtputf8) == (reference.eight_bit, reference.smtputf8)
    return mine


def boundary_of(prepared: PreparedMessage) -> str | None:
    return parsed(prepared).get_boundary()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_a_filled_copy_reads_as_the_message_built_whole(kind: str, text: str) -> None:
    template = KINDS[kind]
    to = '"Zoë, Ann" <ann@example.net>'
    fast, reference = fast_and_slow(template, {"first": "Zoë", "text": text}, to=to, **OPTIONS)
    message = assert_same_reading(fast, reference)
    assert message["To"] == '"Zoë, Ann" <ann@example.net>'
    assert message["Date"] == "Sun, 01 Mar 2026 09:30:00 +0000"
    assert "X-Mailer" not in message
    assert boundary_of(fast) == boundary_of(
        template.prepared({"first": "x", "text": "y"}, to=to, **OPTIONS)[1]
    )


@pytest.mark.parametrize("subject", SUBJECTS, ids=range(len(SUBJECTS)))
def test_a_filled_subject_is_encoded_and_folded_as_when_built_whole(subject: str) -> None:
    fast, reference = fast_and_slow(
        LETTER, {"first": subject, "text": "x"}, to="ann@example.net", from_=SENDER
    )
    assert_same_reading_but_ids(fast, reference)


def assert_same_reading_but_ids(fast: PreparedMessage, reference: PreparedMessage) -> None:
    assert shape(parsed(fast)) == shape(parsed(reference))


def test_dots_at_the_start_of_lines_are_stuffed() -> None:
    _, copy = LETTER.prepared(
        {"first": "Ann", "text": ".\n.hidden\n..two"}, eager=True, to="a@x.org", from_=SENDER
    )
    assert b"\r\n..\r\n..hidden\r\n...two\r\n" in copy.data
    body = parsed(copy).get_body(("plain",))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n") == "Dear Ann,\n.\n.hidden\n..two\n"


def test_a_body_holding_a_boundary_is_read_as_written() -> None:
    options: dict[str, Any] = {"to": "a@x.org", "from_": SENDER}
    _, first = LETTER.prepared({"first": "Ann", "text": "x"}, eager=True, **options)
    boundary = boundary_of(first)
    assert boundary
    text = f"--{boundary}\nContent-Type: text/html\n\n<script>x</script>\n--{boundary}--"
    fast, reference = fast_and_slow(LETTER, {"first": "Ann", "text": text}, **options)
    assert_same_reading_but_ids(fast, reference)
    body = parsed(fast).get_body(("plain",))
    assert body is not None
    assert body.get_content().replace("\r\n", "\n") == f"Dear Ann,\n{text}\n"
    assert boundary_of(fast) != boundary  # built whole, with a boundary of its own


def test_a_value_holding_a_line_break_is_refused_naming_the_recipient() -> None:
    bound = LETTER.bind(
        {"first": "Ann\r\nBcc: all@example.org", "text": "x"}, to="a@x.org", from_=SENDER
    )
    for attempt in (bound.prepare, bound.prepare, bound):  # built whole, then compiled
        with pytest.raises(asmtp.InputError) as caught:
            attempt()
        assert "contains CR, LF" in caught.value.message
        assert caught.value.message.endswith("(recipient a@x.org)")
    missing = LETTER.bind({"first": "Ann"}, to="a@x.org", from_=SENDER)
    with pytest.raises(asmtp.InputError) as caught:
        missing.prepare()
    assert caught.value.message == "template body: 'text' is undefined (recipient a@x.org)"


def test_a_bound_message_called_is_still_an_email_message() -> None:
    bound = WELCOME.bind({"first": "Ann", "plan": "gold"}, to="ann@example.org", from_=SENDER)
    message = bound()
    assert isinstance(message, EmailMessage)
    assert (message["To"], message["Subject"]) == ("ann@example.org", "Welcome, Ann")
    sender, prepared = bound.prepare()
    assert sender == SENDER
    assert_same_reading_but_ids(prepared, prepare_message(message))


async def test_celery_queues_each_bound_copy_as_the_mailer_sends_it() -> None:
    # asmtp.celery stores each job's message as sent: a bound template's copy is filled
    # into the template's compiled message there too (not built whole), with the
    # template's sender unless the job gives one.
    from asmtp._delivery.redis_state.campaign import message_from_blob
    from asmtp.celery import _items

    letter = asmtp.Template(subject="Hi {{ first }}", body="Dear {{ first }},\n.\nbye\n")
    names = ["Ann", "Jörg <3", ".dot"]
    jobs = [
        asmtp.Job(
            f"u{i}@example.org", letter.bind({"first": n}, to=f"u{i}@example.org", from_=SENDER)
        )
        for i, n in enumerate(names)
    ]
    jobs.append(
        asmtp.Job(
            "u9@example.org",
            letter.bind({"first": "Ann"}, to="u9@example.org", from_=SENDER),
            sender="bounces@example.org",
        )
    )
    queued = [item async for item in _items(jobs)]
    assert len(letter._messages._kept) == 1  # compiled once, and filled for each job
    assert [entry[2] for entry, _, _ in queued] == [SENDER] * 3 + ["bounces@example.org"]
    for (entry, _, blob), job, name in zip(queued, jobs, [*names, "Ann"], strict=True):
        assert entry[0] == job.recipient
        built = prepare_message(letter.message({"first": name}, to=job.recipient, from_=SENDER))
        assert_same_reading_but_ids(message_from_blob(blob), built)


def test_options_are_compiled_on_their_second_sight_and_a_few_kept() -> None:
    template = asmtp.Template(subject="Hi {{ first }}", body="{{ first }}")
    kept = template._messages._kept

    def copy(**options: Any) -> PreparedMessage:
        return template.prepared({"first": "Ann"}, to="a@x.org", from_=SENDER, **options)[1]

    copy()
    assert kept == {}  # seen once: built whole
    copy()
    assert len(kept) == 1  # seen again: compiled, and kept
    for n in range(3):  # an attachment of its own each time: never compiled
        copy(attachments=[("a.txt", f"file {n}".encode(), "text/plain")])
    assert len(kept) == 1
    for n in range(12):
        copy(headers={"X-Batch": str(n)})
        copy(headers={"X-Batch": str(n)})
    assert len(kept) == 8  # the least recently used dropped
    # options that cannot be compared (a generator) or compiled (inline images) still
    # give the message, built whole
    headers = ((name, value) for name, value in [("X-Batch", "gen")])
    assert parsed(copy(headers=headers))["X-Batch"] == "gen"
    png = b"\x89PNG\r\n\x1a\n" + b"0" * 20
    with_image = asmtp.Template(html='<img src="cid:logo">{{ first }}')
    _, inline = with_image.prepared(
        {"first": "x"}, to="a@x.org", from_=SENDER, inline={"logo": png}
    )
    assert [p.get_content_type() for p in parsed(inline).walk()] == [
        "multipart/related",
        "text/html",
        "image/png",
    ]


def test_each_copy_gets_its_own_message_id_and_a_date_of_now() -> None:
    copies = [
        LETTER.prepared({"first": "Ann", "text": "x"}, eager=True, to="a@x.org", from_=SENDER)[1]
        for _ in range(3)
    ]
    ids = {parsed(c)["Message-ID"] for c in copies}
    assert len(ids) == 3 and all(i.endswith("@example.com>") for i in ids)
    for c in copies:  # RFC 5322 3.3: a date a reader parses, with a zone
        assert parsed(c)["Date"].datetime.tzinfo is not None


def test_a_non_ascii_recipient_is_built_whole_with_smtputf8() -> None:
    fast, reference = fast_and_slow(
        LETTER, {"first": "Änn", "text": "x"}, to="Änn <änn@example.net>", from_=SENDER
    )
    assert fast.smtputf8 and reference.smtputf8
    assert_same_reading_but_ids(fast, reference)


def test_a_message_id_given_per_copy_is_kept_and_checked() -> None:
    options: dict[str, Any] = {"to": "a@x.org", "from_": SENDER}
    for message_id in ("copy.1@example.org", "<ü.2@example.org>"):
        fast, reference = fast_and_slow(
            LETTER, {"first": "Ann", "text": "x"}, **options, message_id=message_id
        )
        assert_same_reading(fast, reference)  # a raw UTF-8 one needs SMTPUTF8, as built whole
    with pytest.raises(asmtp.InputError, match="message_id"):
        LETTER.prepared({"first": "Ann", "text": "x"}, **options, message_id="no-at-sign")


async def test_mailer_jobs_deliver_each_recipients_copy_signed(asmtp_outbox: Outbox) -> None:
    signer, txt = DKIM.generate("example.com", "sel", "ed25519")
    names = ["Ann", "Zoë Müller", "李", ".dot", "O'Brien, Pat", "Bee", "Cy", "Dee"]
    rows = [
        {"email": f"user{i}@example.org", "first": name, "text": f".\nline {i}\n= ü"}
        for i, name in enumerate(names)
    ]
    jobs = [
        asmtp.Job(row["email"], LETTER.bind(row, to=row["email"], from_=SENDER), key=row["email"])
        for row in rows
    ]
    async with asmtp.Mailer(
        asmtp_outbox.relay, retry=None, dkim=signer, unsubscribe="https://example.com/u/{token}"
    ) as mailer:
        results = [r async for r in mailer.deliver(jobs)]
    assert sorted((r.key, r.status) for r in results) == [(r["email"], "delivered") for r in rows]

    def lookup(name: bytes, timeout: float = 5) -> bytes:
        assert name == b"sel._domainkey.example.com."
        return txt.encode("ascii")

    sent = by_recipient(asmtp_outbox)
    for row in rows:
        got = sent[row["email"]]
        assert got.mail_from == SENDER
        assert (got.to, got.subject) == ([row["email"]], f"Hi {row['first']}")
        assert got.text == f"Dear {row['first']},\n{row['text']}\n"
        assert (
            got.html
            == f"<p>Dear {markupsafe.escape(row['first'])},</p>\n<pre>{row['text']}</pre>\n"
        )
        token = row["email"].replace("@", "=")
        assert got.message["List-Unsubscribe"] == f"<https://example.com/u/{token}>"
        assert dkim.verify(got.data, dnsfunc=lookup)
    assert len({m.message["Message-ID"] for m in asmtp_outbox.messages}) == len(rows)


async def test_sendmail_fills_each_recipients_copy(asmtp_outbox: Outbox) -> None:
    people = {f"p{i}@example.net": {"first": f"Person {i} ü", "text": f".{i}"} for i in range(5)}
    report = await asmtp.sendmail(
        to=", ".join(f'"P{i}, Ü" <p{i}@example.net>' for i in range(5)),
        from_=SENDER,
        template=LETTER,
        per_recipient=people,
        attachments=[ATTACHMENT],
        relay=asmtp_outbox.relay,
    )
    assert report.ok and len(report.results) == 5
    sent = by_recipient(asmtp_outbox)
    for i, (address, values) in enumerate(people.items()):
        got = sent[address]
        assert got.message["To"] == f'"P{i}, Ü" <{address}>'
        assert got.subject == f"Hi {values['first']}"
        assert got.text == f"Dear {values['first']},\n{values['text']}\n"
        [attachment] = got.attachments
        assert attachment.get_content() == ATTACHMENT[1]
