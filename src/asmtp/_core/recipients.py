"""Recipients files for bulk sending (layer 1, sans-IO): text in, checked recipients out.

This module owns reading a recipients file (``asmtp send --recipients FILE``) and
filling ``{column}`` placeholders. Two forms:

* a plain list, one address per line (``ann@example.org`` or ``Ann <ann@example.org>``);
  blank lines and lines starting with ``#`` are ignored;
* CSV, recognized by a first row naming an ``email`` column (any case); the other
  columns fill ``{column}`` placeholders in the subject and body::

      email,first,plan
      ann@example.org,Ann,gold
      "Bee Doe <bee@example.net>",Bee,"silver, yearly"

A file is read as a stream of lines (:class:`RecipientRows`, with :func:`decode_lines`
for bytes), so that a caller can check a file of any length row by row without holding
it; :func:`parse_recipients` reads a whole one into a :class:`RecipientList`.

Every row is checked before anything is sent: a row whose address does not parse,
whose email cell is empty or whose field count differs from the header's becomes a
:class:`BadRow` with its line number (1-based, counted in the file as written). An
address given twice is sent once: the first row is kept, later ones are counted as
:class:`Duplicate` (not an error). Addresses compare as
:func:`~asmtp._core.address.unique_addresses` does: the domain case-insensitively, the
local part exactly.

Placeholders are a small substitution, never :meth:`str.format` on the user's text: only
``{name}`` where *name* is a column is replaced; every other brace is left alone (CSS
such as ``a {color: red}``, ``{{``, ``{unknown}``). ``{{name}}`` writes ``{name}``
literally. Values go into an HTML body HTML-escaped when the caller says so (``fill``'s
``escape``); a ``{word}`` that names no column is found by :meth:`Placeholders.unknown`
so that the caller can warn about it once.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import InputError
from .address import parse_address_list, split_mailbox

__all__ = [
    "BadRow",
    "Duplicate",
    "Placeholders",
    "Recipient",
    "RecipientList",
    "RecipientRows",
    "address_key",
    "decode_lines",
    "decode_recipients",
    "parse_recipients",
]

#: the CSV delimiters tried on the header row, in this order
_DELIMITERS = (",", ";", "\t")
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})
# What looks like a placeholder: a word in single braces. ``{{word}}`` is written out
# literally; CSS such as ``{color: red}`` or ``{ margin: 0 }`` is not a word.
_PLACEHOLDER_LIKE = re.compile(r"\{\{[^{}]*\}\}|\{([^\W\d][\w-]*)\}")


@dataclass(frozen=True, slots=True)
class Recipient:
    """One good row: ``address`` is the checked addr-spec (IDN domains in A-labels),
    ``name`` the display name written with it (``"Ann"`` for ``Ann <ann@x.example>``),
    ``fields`` the row's cells by column (empty for a plain list)."""

    line: int
    address: str
    name: str = ""
    fields: Mapping[str, str] = field(default_factory=lambda: _NO_FIELDS, hash=False)

    @property
    def key(self) -> str:
        """The address as compared for duplicates: the domain lower-cased."""
        return address_key(self.address)


@dataclass(frozen=True, slots=True)
class BadRow:
    """A row that cannot be sent to: ``text`` is its address as written ("" if none)."""

    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass(frozen=True, slots=True)
class Duplicate:
    """A row naming an address an earlier row (``first_line``) already named."""

    line: int
    address: str
    first_line: int


@dataclass(frozen=True, slots=True)
class RecipientList:
    """What a recipients file holds: good rows in file order (duplicates removed), bad
    rows, duplicates, and for CSV the columns (``()`` for a plain list)."""

    recipients: tuple[Recipient, ...]
    bad_rows: tuple[BadRow, ...] = ()
    duplicates: tuple[Duplicate, ...] = ()
    columns: tuple[str, ...] = ()
    email_column: str | None = None

    @property
    def is_csv(self) -> bool:
        return self.email_column is not None

    def placeholders(self) -> Placeholders:
        """The placeholders this file's columns fill."""
        return Placeholders(self.columns)


class Placeholders:
    """``{name}`` substitution for a fixed set of names; all other braces stay as they are.

    >>> p = Placeholders(["first", "plan"])
    >>> p.fill("Hi {first}, a {color: red} {{ {x} {plan}", {"first": "Ann", "plan": "gold"})
    'Hi Ann, a {color: red} {{ {x} gold'
    >>> p.fill("{{first}} is written {first}", {"first": "Ann"})
    '{first} is written Ann'
    >>> sorted(p.used("Dear {first} {first}, {unknown}"))
    ['first']
    >>> import html
    >>> p.fill("<p>{first}</p>", {"first": "<b>Ann</b>"}, escape=html.escape)
    '<p>&lt;b&gt;Ann&lt;/b&gt;</p>'
    >>> sorted(p.unknown("Hi {first} {frist}, a {color: red} {{x}} {last-name}"))
    ['frist', 'last-name']
    """

    def __init__(self, names: Iterable[str]) -> None:
        # A name holding a brace could never be matched unambiguously: not a placeholder.
        self.names = frozenset(n for n in names if n and "{" not in n and "}" not in n)
        self._pattern: re.Pattern[str] | None = None
        if self.names:
            # longest first, so that of "a" and "ab" the whole name wins
            choice = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True))
            self._pattern = re.compile(rf"\{{\{{({choice})\}}\}}|\{{({choice})\}}")

    def used(self, text: str) -> set[str]:
        """The names ``text`` fills (escaped ``{{name}}`` not counted)."""
        if self._pattern is None:
            return set()
        return {m.group(2) for m in self._pattern.finditer(text) if m.group(2) is not None}

    def unknown(self, text: str) -> set[str]:
        """The words in single braces in ``text`` that name no column: likely typos
        (``{frist}``) or a file without that column. Sent as written."""
        found = {m.group(1) for m in _PLACEHOLDER_LIKE.finditer(text) if m.group(1)}
        return found - self.names

    def fill(
        self,
        text: str,
        values: Mapping[str, str],
        *,
        escape: Callable[[str], str] | None = None,
    ) -> str:
        """``text`` with each ``{name}`` replaced by ``values[name]`` (left as is when
        ``values`` lacks it) and each ``{{name}}`` by ``{name}``. ``escape`` (such as
        :func:`html.escape` for an HTML body) is applied to each value inserted."""
        if self._pattern is None:
            return text

        def substitute(match: re.Match[str]) -> str:
            escaped, name = match.group(1), match.group(2)
            if escaped is not None:
                return "{" + escaped + "}"
            value = values.get(name)
            if value is None:
                return match.group(0)
            return escape(value) if escape is not None else value

        return self._pattern.sub(substitute, text)


def address_key(address: str) -> str:
    """``Ann@Example.ORG`` -> ``Ann@example.org``: the form duplicates compare in."""
    local, domain = split_mailbox(address)
    return f"{local}@{domain.lower()}"


def decode_recipients(data: bytes) -> str:
    """UTF-8 text of a recipients file, without a byte order mark; InputError (naming
    the line) when it is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputError(f"line {line}: not UTF-8 text ({exc.reason})") from None


def decode_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """The text lines of a recipients file given as byte lines (a binary file, split at
    ``\\n``), decoded as :func:`decode_recipients` decodes a whole file: UTF-8 without a
    byte order mark, InputError naming the line when not UTF-8. Lines keep their endings
    (``\\r`` ends one too).

    >>> list(decode_lines([codecs.BOM_UTF8 + b"a@x.example\\r\\n", b"b@x.example\\rc@x.example"]))
    ['a@x.example\\r\\n', 'b@x.example\\r', 'c@x.example']
    """
    for number, chunk in enumerate(chunks, start=1):
        if number == 1:
            chunk = chunk.removeprefix(codecs.BOM_UTF8)
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"line {number}: not UTF-8 text ({exc.reason})") from None
        # newline="": \n, \r\n and \r end lines, and each line keeps its ending
        yield from io.StringIO(text, newline="")


class RecipientRows:
    """The rows of a recipients file as they are read from ``lines`` (text lines with
    their endings): a :class:`Recipient` or a :class:`BadRow` each, in file order,
    duplicates included. ``columns`` and ``email_column`` are known from the first row.

    >>> rows = RecipientRows(["email,first\\n", "ann@example.org,Ann\\n", "x,X\\n"])
    >>> rows.columns, [type(row).__name__ for row in rows]
    (('email', 'first'), ['Recipient', 'BadRow'])

    Raises :class:`~asmtp.errors.InputError` for a CSV header naming a column twice
    (when made) or a line that is not UTF-8 (from :func:`decode_lines`, as it is read).
    """

    def __init__(self, lines: Iterable[str]) -> None:
        self._lines = _Lines(lines)
        self._header = _csv_header(self._lines)
        self.columns: tuple[str, ...] = () if self._header is None else self._header[1]
        self.email_column = None if self._header is None else self.columns[self._header[2]]

    @property
    def is_csv(self) -> bool:
        return self._header is not None

    def placeholders(self) -> Placeholders:
        """The placeholders this file's columns fill."""
        return Placeholders(self.columns)

    def __iter__(self) -> Iterator[Recipient | BadRow]:
        if self._header is None:
            return _plain_rows(self._lines)
        delimiter, columns, email_index = self._header
        return _csv_rows(self._lines, delimiter, columns, email_index)


def parse_recipients(data: str | bytes) -> RecipientList:
    """Read a recipients file's content: a plain list or CSV (see the module's doc).

    >>> found = parse_recipients("# list\\nann@example.org\\n\\nBee <bee@example.net>\\nnope\\n")
    >>> [(r.line, r.address, r.name) for r in found.recipients]
    [(2, 'ann@example.org', ''), (4, 'bee@example.net', 'Bee')]
    >>> [str(b) for b in found.bad_rows]
    ["line 5: 'nope' is not an address"]
    >>> found = parse_recipients("Email,first\\nann@example.org,Ann\\n")
    >>> found.email_column, dict(found.recipients[0].fields)
    ('Email', {'Email': 'ann@example.org', 'first': 'Ann'})

    Raises :class:`~asmtp.errors.InputError` only for a file that cannot be read as a
    whole (not UTF-8; a CSV header naming a column twice); bad rows are returned.
    """
    text = decode_recipients(data) if isinstance(data, bytes) else data.removeprefix("\ufeff")
    # newline="": \n, \r\n and \r end lines, and each line keeps its ending
    rows = RecipientRows(io.StringIO(text, newline=""))
    return _dedupe(rows, rows.columns, rows.email_column)


class _Lines:
    """The file's physical lines with their numbers. Blank and ``#`` lines are skipped
    only where a row would start (:meth:`row_start`), never inside a quoted CSV field."""

    def __init__(self, lines: Iterable[str]) -> None:
        self._source = enumerate(lines, start=1)
        self._peeked: tuple[int, str] | None = None
        self._at_row_start = True
        #: the number of the line the current row began on
        self.row_line = 0

    def row_start(self) -> None:
        self._at_row_start = True

    def peek_row(self) -> str | None:
        """The line the first row starts on, read again by the iteration."""
        for number, line in self._source:
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                self._peeked = (number, line)
                self.row_line = number
                return line
        return None

    def __iter__(self) -> Iterator[str]:
        if self._peeked is not None:
            source: Iterable[tuple[int, str]] = itertools.chain([self._peeked], self._source)
            self._peeked = None
        else:
            source = self._source
        for number, line in source:
            if self._at_row_start:
                stripped = line.strip()
                if not stripped or stripped.startswith("#"):
                    continue
                self._at_row_start = False
                self.row_line = number
            yield line


def _csv_header(lines: _Lines) -> tuple[str, tuple[str, ...], int] | None:
    """(delimiter, columns, index of the email column) when the first row is a CSV
    header naming an ``email`` column; None for a plain list."""
    first = lines.peek_row()
    if first is None:
        return None
    for delimiter in _DELIMITERS:
        if delimiter not in first and delimiter != ",":
            continue
        try:
            row = next(csv.reader([first], delimiter=delimiter, skipinitialspace=True), [])
        except csv.Error:
            continue
        columns = tuple(cell.strip() for cell in row)
        emails = [i for i, c in enumerate(columns) if c.lower() == "email"]
        if not emails:
            continue
        if len(emails) > 1:
            raise InputError(f"line {lines.row_line}: more than one email column")
        seen: set[str] = set()
        for column in columns:
            if column and column in seen:
                raise InputError(f"line {lines.row_line}: column {column!r} appears twice")
            seen.add(column)
        return delimiter, columns, emails[0]
    return None


def _check_address(text: str) -> tuple[str, str] | str:
    """(display name, addr-spec), or the reason the text is not one address."""
    if not text:
        return "empty email"
    try:
        found = parse_address_list(text, field="address")
    except InputError:
        return f"{text!r} is not an address"
    if len(found) != 1:
        return f"{text!r} holds {len(found)} addresses (one per row)"
    return found[0]


def _plain_rows(lines: _Lines) -> Iterator[Recipient | BadRow]:
    first = True
    for line in lines:
        text = line.strip()
        checked = _check_address(text)
        if isinstance(checked, str):
            if first and any(d in text for d in _DELIMITERS):
                checked += " (a CSV file starts with a header row naming an 'email' column)"
            yield BadRow(lines.row_line, text, checked)
        else:
            yield Recipient(lines.row_line, checked[1], checked[0])
        first = False
        lines.row_start()


def _csv_rows(
    lines: _Lines, delimiter: str, columns: tuple[str, ...], email_index: int
) -> Iterator[Recipient | BadRow]:
    rows = csv.reader(lines, delimiter=delimiter, skipinitialspace=True, strict=True)
    next(rows)  # the header
    while True:
        lines.row_start()
        try:
            row = next(rows, None)
        except csv.Error as exc:
            yield BadRow(lines.row_line, "", f"not valid CSV: {exc}")
            continue
        if row is None:
            return
        if len(row) != len(columns):
            yield BadRow(
                lines.row_line,
                row[email_index].strip() if email_index < len(row) else "",
                f"{len(row)} fields, the header has {len(columns)}",
            )
            continue
        text = row[email_index].strip()
        checked = _check_address(text)
        if isinstance(checked, str):
            yield BadRow(lines.row_line, text, checked)
        else:
            fields = MappingProxyType(dict(zip(columns, row, strict=True)))
            yield Recipient(lines.row_line, checked[1], checked[0], fields)


def _dedupe(
    rows: Iterable[Recipient | BadRow], columns: tuple[str, ...], email_column: str | None
) -> RecipientList:
    good: list[Recipient] = []
    bad: list[BadRow] = []
    duplicates: list[Duplicate] = []
    first_seen: dict[str, int] = {}
    for row in rows:
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        first = first_seen.setdefault(row.key, row.line)
        if first != row.line:
            duplicates.append(Duplicate(row.line, row.address, first))
        else:
            good.append(row)
    return RecipientList(tuple(good), tuple(bad), tuple(duplicates), columns, email_column)
