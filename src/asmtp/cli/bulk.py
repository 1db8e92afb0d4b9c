"""Bulk sending's recipients file (``asmtp send --recipients FILE``): reading it, checking
every row before anything is sent, keeping the checked rows out of memory, and making one
job per recipient, in file order, when its turn comes.

Every recipient gets a message addressed to them alone: rendered per recipient when a CSV
file's ``{column}`` placeholders are used (see :mod:`asmtp._core.recipients`), or with
``--template jinja`` when the template reads a column (:class:`asmtp.Template`, every
name it reads checked against the header first), else one message serialized once with
a To header and a Message-ID of each recipient's own. Bad rows are listed and nothing is
sent, or with ``--skip-invalid`` reported as failed.
Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import contextlib
import html
import json
import sqlite3
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from email.message import EmailMessage
from email.utils import formataddr, make_msgid
from functools import partial
from typing import Any, cast

from .._core.address import check_header, domain_of, parse_address_list
from .._core.compiled import CompiledMessage
from .._core.message import Attachment
from .._core.prepared import MessageIdRemover, PreparedMessage, prepare_message, with_headers
from .._core.recipients import BadRow, Placeholders, Recipient, RecipientRows, decode_lines
from .._core.sanitize import printable
from .._core.template import Rendered, Template
from .._delivery.mailer import Job
from ..errors import InputError
from .plan import MailerSettings, MessageParts, SendPlan

__all__ = ["plan_recipients_file"]

#: bad rows of a recipients file listed on stderr, at most
_BAD_ROWS_SHOWN = 50


def plan_recipients_file(
    args: argparse.Namespace, parts: MessageParts, sender: str, settings: MailerSettings
) -> SendPlan:
    """The plan of ``--recipients FILE`` (with ``--to`` recipients after the file's):
    the whole file read and checked, and the first personalised message rendered,
    before anything is sent."""
    source = "standard input" if args.recipients == "-" else args.recipients
    extras = parse_address_list(args.to, field="--to")
    # Made first: without jinja2, or with a template that does not parse, nothing is read.
    jinja = _jinja_template(parts) if args.template == "jinja" else None
    store = _RecipientStore()
    with _recipients_file(args.recipients) as lines:
        rows = RecipientRows(lines)
        placeholders = rows.placeholders()
        texts = [parts.subject, parts.body, *([parts.alt_text] if parts.alt_text else [])]
        if jinja is not None:
            _check_variables(jinja, rows, source)
            personal = bool(jinja.variables)
        else:
            personal = any(placeholders.used(text) for text in texts)
        if extras and personal:
            raise InputError(
                "--to does not go with {column} placeholders (or a --template jinja that "
                "reads columns): its recipients have no row to fill them from; add them "
                "to the recipients file"
            )
        # A value with a line break cannot go into a header: find such rows now.
        subject_of = _subject_filler(parts.subject, placeholders, jinja if personal else None)
        for row in rows:
            if isinstance(row, Recipient) and subject_of is not None:
                try:
                    check_header("Subject", subject_of(row))
                except InputError as exc:
                    # a template's own failure says what failed; a line break is plain
                    reason = "a value for the subject holds a line break or control character"
                    store.add(row, exc.message if exc.message.startswith("template") else reason)
                    continue
            store.add(row)
        for name, address in extras:
            store.add(Recipient(0, address, name))  # after the file's rows
        store.loaded()
    if store.refused and not args.skip_invalid:
        raise InputError(_bad_rows_text(source, store.refused, store.first_refused()))
    if not store.total:
        raise InputError(f"--recipients: no recipients in {source}")

    if jinja is not None and not personal:
        parts = _rendered(parts, jinja.render({}))  # the same for every recipient
    # Built once with every option checked (and attachments read) before anything is sent.
    base = parts.build(to=None, from_=args.from_)
    columns = rows.columns
    if personal:
        # the attachments as read once: (name, content, type), as build_message takes them
        loaded = [
            cast(
                Attachment,
                (part.get_filename(), part.get_payload(decode=True), part.get_content_type()),
            )
            for part in base.iter_attachments()
        ]

        # Values go into an HTML body as text, not markup: a value "<script>" must not
        # become a script. The subject and plain text take them as they are.
        escape = html.escape if parts.mailtype == "html" and parts.html_escape else None
        # Built and serialized once; each recipient's copy fills in its To, Subject,
        # Message-ID and bodies (asmtp._core.compiled), not a message built whole.
        compiled = CompiledMessage(
            from_=args.from_,
            mailtype=parts.mailtype,
            alternative=parts.alt_text is not None,
            headers=parts.headers,
            attachments=loaded,
        )

        def render(r: Recipient) -> PreparedMessage:
            if jinja is not None:
                personalised = _rendered(parts, jinja.render(r.fields, recipient=r.address))
            else:
                personalised = replace(
                    parts,
                    subject=placeholders.fill(parts.subject, r.fields),
                    body=placeholders.fill(parts.body, r.fields, escape=escape),
                    alt_text=(
                        placeholders.fill(parts.alt_text, r.fields) if parts.alt_text else None
                    ),
                )
            return compiled.fill(
                [(r.name, r.address)],
                personalised.subject,
                personalised.body,
                personalised.alt_text,
            )

        for first in store.recipients(columns, good_only=True):
            if isinstance(first, Recipient):
                render(first)  # whatever else could fail does so now
            break
    else:
        # One message for all: serialized once, with a To header and a Message-ID of
        # its own per recipient (so replies and bounces name their recipient).
        shared, found = MessageIdRemover()(prepare_message(base))
        id_domain = found or domain_of(sender)

    def in_order() -> Iterator[Job]:
        # file order, --to recipients after the file's; read back one row at a time
        for row in store.recipients(columns):
            if isinstance(row, BadRow):
                yield _refused_job(row, sender)
            elif personal:
                yield _personal_job(row, render, sender)
            else:
                yield _shared_job(row, shared, sender, id_domain)

    if jinja is None:  # with Jinja, {word} is text and a missing name was refused
        _warn_unknown_placeholders(rows, source, texts)
    return SendPlan(
        in_order, store.total, store.line_of, store.duplicates, settings, store.refusal_of
    )


# ----------------------------------------------------------------------- --template jinja

#: a template part, as :class:`asmtp.Template`'s errors name it, and the flag it came from
_TEXT_FLAGS = {"template subject": "--subject", "template body": "--body"}
_HTML_FLAGS = {
    "template subject": "--subject",
    "template html": "--body",
    "template body": "--alt-text-file",
}


def _jinja_template(parts: MessageParts) -> Template:
    """The message's texts as a :class:`asmtp.Template`: an --html body is its HTML
    (autoescaped unless --no-html-escape), --alt-text-file its plain text."""
    html = parts.mailtype == "html"
    try:
        return Template(
            subject=parts.subject,
            body=(parts.alt_text or "") if html else parts.body,
            html=parts.body if html else None,
            autoescape=parts.html_escape,
        )
    except ModuleNotFoundError:
        raise InputError("--template jinja needs jinja2: pip install 'asmtp[jinja]'") from None
    except InputError as exc:
        part, _, rest = exc.message.partition(":")
        flag = (_HTML_FLAGS if html else _TEXT_FLAGS).get(part)
        raise InputError(f"{flag}:{rest}" if flag else exc.message) from None


def _check_variables(jinja: Template, rows: RecipientRows, source: str) -> None:
    """Every name the template reads is a column: found before anything is sent,
    not as a failure per recipient."""
    missing = sorted(jinja.variables - set(rows.columns))
    if not missing:
        return
    names = ", ".join("{{ " + name + " }}" for name in missing)
    verb = "names" if len(missing) == 1 else "name"
    columns = f"its columns: {', '.join(rows.columns)}" if rows.is_csv else "a plain list has none"
    raise InputError(f"--template jinja: {names} {verb} no column of {source} ({columns})")


def _subject_filler(
    subject: str, placeholders: Placeholders, jinja: Template | None
) -> Callable[[Recipient], str] | None:
    """The subject as filled for a row, to check it before anything is sent (an
    InputError when it cannot be rendered); None when it is the same for every row."""
    if jinja is not None:
        alone = Template(subject=subject)  # the subject's rendering, not the bodies'
        if not alone.variables:
            return None
        return lambda row: alone.render(row.fields).subject
    if not placeholders.used(subject):
        return None
    return lambda row: placeholders.fill(subject, row.fields)


def _rendered(parts: MessageParts, rendered: Rendered) -> MessageParts:
    """``parts`` with the texts of ``rendered`` (see :func:`_jinja_template`)."""
    if parts.mailtype == "html":
        assert rendered.html is not None
        body, alt = rendered.html, rendered.body if parts.alt_text is not None else None
    else:
        body, alt = rendered.body, None
    return replace(parts, subject=rendered.subject, body=body, alt_text=alt)


def _warn_unknown_placeholders(rows: RecipientRows, source: str, texts: list[str]) -> None:
    """One warning naming every ``{word}`` that no column fills (a typo, or a file
    without that column): such words are sent as written."""
    placeholders = rows.placeholders()
    unknown = sorted(set().union(*(placeholders.unknown(text) for text in texts)))
    if not unknown:
        return
    names = ", ".join("{" + name + "}" for name in unknown)
    verb = "matches" if len(unknown) == 1 else "match"
    columns = f"its columns: {', '.join(rows.columns)}" if rows.is_csv else "a plain list"
    print(
        printable(
            f"asmtp: warning: {names} {verb} no column of {source} ({columns}); sent as written"
        ),
        file=sys.stderr,
        flush=True,
    )


class _RecipientStore:
    """A checked recipients file kept in a private temporary SQLite database rather
    than in memory, so that a file of a million rows costs the process a few MB: the
    rows go in as they are read, and come back one at a time as their turn comes.
    Duplicates are kept out by a unique key (the first row stays); a refused row (a
    bad one, kept for --skip-invalid) keeps its reason. SQLite deletes the database
    when the process ends, however it ends."""

    def __init__(self) -> None:
        # "": a private on-disk database, unlinked as soon as it is made
        self._db = sqlite3.connect("", isolation_level=None)  # BEGIN and COMMIT are ours
        self._db.executescript(
            """
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA cache_size = -8192;
            CREATE TABLE rows (
                seq INTEGER PRIMARY KEY, line INTEGER NOT NULL, address TEXT NOT NULL,
                name TEXT NOT NULL, fields TEXT, key TEXT UNIQUE, reason TEXT
            );
            """
        )
        self._db.execute("BEGIN")  # one transaction for the whole file: fast
        self.total = self.refused = self.duplicates = 0

    def add(self, row: Recipient | BadRow, reason: str | None = None) -> None:
        values: tuple[int, str, str, str | None, str | None, str | None]
        if isinstance(row, BadRow):
            values = (row.line, row.text, "", None, None, row.reason)
        else:
            fields = json.dumps(list(row.fields.values())) if row.fields else None
            values = (row.line, row.address, row.name, fields, row.key, reason)
        added = self._db.execute(
            "INSERT OR IGNORE INTO rows (line, address, name, fields, key, reason)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            values,
        ).rowcount
        if not added:
            self.duplicates += 1
            return
        self.total += 1
        if values[-1] is not None:
            self.refused += 1

    def loaded(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("CREATE INDEX refused ON rows (line) WHERE reason IS NOT NULL")

    def first_refused(self) -> list[BadRow]:
        found = self._db.execute(
            "SELECT line, address, reason FROM rows WHERE reason IS NOT NULL ORDER BY line LIMIT ?",
            (_BAD_ROWS_SHOWN,),
        )
        return [BadRow(line, text, reason) for line, text, reason in found]

    def recipients(
        self, columns: Sequence[str], *, good_only: bool = False
    ) -> Iterator[Recipient | BadRow]:
        """Every row in file order (``good_only``: those not refused)."""
        query = "SELECT line, address, name, fields, reason FROM rows"
        query += " WHERE reason IS NULL ORDER BY seq" if good_only else " ORDER BY seq"
        for line, address, name, fields, reason in self._db.execute(query):
            if reason is not None:
                yield BadRow(line, address, reason)
            elif fields is None:
                yield Recipient(line, address, name)
            else:
                cells = json.loads(fields)
                yield Recipient(line, address, name, dict(zip(columns, cells, strict=True)))

    def line_of(self, key: Any) -> int | None:
        """The file line of a job's key (for the JSON "line"); None for --to's."""
        if isinstance(key, int):  # a refused row's key is its line
            return key
        found = self._db.execute("SELECT line FROM rows WHERE key = ?", (key,)).fetchone()
        return found[0] if found and found[0] else None

    def refusal_of(self, key: Any) -> str | None:
        """Why the row keyed ``key`` (its line) was refused, as the result says it."""
        if not isinstance(key, int):
            return None
        found = self._db.execute(
            "SELECT reason FROM rows WHERE line = ? AND reason IS NOT NULL", (key,)
        ).fetchone()
        return f"line {key}: {found[0]}" if found else None


@contextlib.contextmanager
def _recipients_file(name: str) -> Iterator[Iterator[str]]:
    """The text lines of ``--recipients NAME`` ('-': standard input), read as they are
    used; a file that cannot be read, or is not UTF-8 or a valid list, is bad input."""
    try:
        with contextlib.ExitStack() as stack:
            binary = sys.stdin.buffer if name == "-" else stack.enter_context(open(name, "rb"))
            yield decode_lines(binary)
    except OSError as exc:
        raise InputError(f"--recipients: cannot read {name!r}: {exc.strerror}") from exc
    except sqlite3.Error as exc:  # e.g. the temporary folder is full
        raise InputError(f"--recipients: cannot keep the checked rows: {exc}") from exc
    except InputError as exc:
        if exc.message.startswith("--"):
            raise
        raise InputError(f"--recipients {name}: {exc.message}") from exc


def _personal_job(r: Recipient, render: Callable[[Recipient], PreparedMessage], sender: str) -> Job:
    # rendered when the job's turn comes: a long list never holds every message at once
    return Job(r.address, partial(render, r), sender=sender, key=r.key)


def _shared_job(r: Recipient, shared: PreparedMessage, sender: str, id_domain: str) -> Job:
    to = formataddr((r.name, r.address))
    headers = [("To", to), ("Message-ID", make_msgid(domain=id_domain))]
    return Job(r.address, with_headers(shared, headers), sender=sender, key=r.key)


def _refused_job(row: BadRow, sender: str) -> Job:
    """A bad row kept with --skip-invalid: the Mailer records it as a permanent
    failure at stage "input" (in the results and the journal) and sends nothing."""
    try:
        [(_, recipient)] = parse_address_list(row.text, field="recipient")
    except (InputError, ValueError):
        recipient = row.text

    def refuse() -> EmailMessage:
        raise InputError(f"line {row.line}: {row.reason}")  # unless the address fails first

    return Job(recipient, refuse, sender=sender, key=row.line)


def _bad_rows_text(source: str, n: int, first: Sequence[BadRow]) -> str:
    """The refusal of a file with ``n`` bad rows, listing the ``first`` of them."""
    lines = [
        f"{source}: {n} bad row{'s' if n != 1 else ''}; nothing was sent "
        "(fix them, or pass --skip-invalid to report them as failed and send to the rest):"
    ]
    lines += [f"  {row}" for row in first[:_BAD_ROWS_SHOWN]]
    if n > _BAD_ROWS_SHOWN:
        lines.append(f"  ... and {n - _BAD_ROWS_SHOWN} more")
    return "\n".join(lines)
