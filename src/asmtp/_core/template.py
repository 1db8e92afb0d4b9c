"""Message templates rendered per recipient with Jinja2 (layer 1, sans-IO): the
``jinja`` extra (``pip install 'asmtp[jinja]'``).

This module owns :class:`Template`: a subject, a plain-text body and an optional HTML
body, compiled once and rendered with each recipient's values (a mapping: a CSV row's
columns, a user record). jinja2 is imported when a Template is made, never by
``import asmtp``. The rules, each for a reason:

* A sandbox (:class:`jinja2.sandbox.ImmutableSandboxedEnvironment`): a template may
  come from a file its sender does not fully control. It reads the values it is given
  but cannot reach Python's internals through them (``{{ first.__class__ }}`` is
  refused) nor change them (``{{ items.append(1) }}``: values shared by every
  recipient stay as given).
* ``StrictUndefined``: a value the template reads and the data lacks is an
  :class:`~asmtp.errors.InputError` naming it and the recipient, never an empty string
  in a sent message. :attr:`Template.variables` names what a template reads, so that
  a caller can check a whole list (a CSV header) before anything is sent.
* Autoescape in the HTML body only: a value ``<b>`` shows as text there, and goes as
  it is into the subject and the plain text.
* The rendered subject passes the header checks
  (:func:`~asmtp._core.address.check_header`): a value holding CR or LF cannot add a
  header field.
* No ``{% include %}``, ``{% extends %}`` or ``{% import %}``: nothing is read from files.

Per-recipient messages are filled into a
:class:`~asmtp._core.compiled.CompiledMessage`, compiled once per set of options that
do not change per recipient (all but ``to``, ``date`` and ``message_id``) and kept on
the Template (a few sets at most, compiled on the second sight of one), rather than
built whole with the email package each time: :meth:`Template.bind`'s messages as a
Mailer sends them, and :func:`asmtp.sendmail`'s ``per_recipient``.
"""

from __future__ import annotations

import datetime
import functools
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any, Literal, Required, TypedDict, Unpack

from ..errors import InputError
from .address import check_header, parse_address_list
from .compiled import CompiledMessage
from .message import (
    AddressInput,
    Attachment,
    HeadersInput,
    InlineInput,
    ListHeadersInput,
    Priority,
    build_message,
    envelope_of,
)
from .parts import load_attachment
from .prepared import PreparedMessage, prepare_message

if TYPE_CHECKING:
    import jinja2
    import jinja2.sandbox

__all__ = ["BoundMessage", "MessageOptions", "Rendered", "Template"]

#: the parts of a template, as its errors name them
Part = Literal["subject", "body", "html"]
#: the options given per recipient: the rest decide the compiled message
_PER_RECIPIENT = frozenset({"to", "date", "message_id"})
#: compiled messages kept per Template (least recently used dropped), and how many
#: option sets seen once are remembered (by hash) to compile on their second sight
_KEPT, _SEEN = 8, 256


class MessageOptions(TypedDict, total=False):
    """What :meth:`Template.message` passes on to
    :func:`~asmtp._core.message.build_message`: everything but the texts."""

    to: Required[AddressInput]
    from_: Required[AddressInput]
    cc: AddressInput
    headers: HeadersInput
    attachments: Iterable[Attachment]
    date: datetime.datetime | str | None
    message_id: str | None
    reply_to: AddressInput
    priority: Priority | None
    list_headers: ListHeadersInput
    inline: InlineInput
    calendar: str | bytes | None


@dataclass(frozen=True, slots=True)
class Rendered:
    """A template rendered for one recipient: ``html`` is None when the template has none."""

    subject: str
    body: str
    html: str | None


@dataclass(frozen=True)
class Template:
    """A subject, a plain-text ``body`` and an optional ``html`` body in Jinja2's syntax,
    rendered per recipient (see the module's doc for the sandbox and escaping rules).

    >>> welcome = Template(subject="Welcome, {{ first }}", body="Hi {{ first }}!",
    ...                    html="<p>Hi <b>{{ first }}</b>!</p>")
    >>> sorted(welcome.variables)
    ['first']
    >>> welcome.render({"first": "Ann <3"})
    Rendered(subject='Welcome, Ann <3', body='Hi Ann <3!', html='<p>Hi <b>Ann &lt;3</b>!</p>')
    >>> welcome.render({}, recipient="ann@example.org")
    Traceback (most recent call last):
    ...
    asmtp.errors.InputError: template subject: 'first' is undefined (recipient ann@example.org)

    With ``html``, the message is HTML with ``body`` as its plain-text alternative
    (HTML alone when ``body`` is empty). ``autoescape=False`` inserts values into the
    HTML as they are. A template that does not parse is refused when made
    (:class:`~asmtp.errors.InputError` naming the part and line); without jinja2
    installed, making one raises :class:`ModuleNotFoundError` naming the extra.
    """

    subject: str = ""
    body: str = ""
    html: str | None = None
    autoescape: bool = True
    #: the names of the values the template reads (Jinja's own globals, such as
    #: ``range``, left out): a mapping lacking one of them cannot render it
    variables: frozenset[str] = field(init=False, repr=False, compare=False)
    _compiled: tuple[tuple[Part, jinja2.Template], ...] = field(
        init=False, repr=False, compare=False
    )
    _messages: _CompiledMessages = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("subject", "body"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"template {name} must be a string: {getattr(self, name)!r}")
        if self.html is not None and not isinstance(self.html, str):
            raise InputError(f"template html must be a string or None: {self.html!r}")
        _require_jinja2()
        import jinja2
        import jinja2.meta

        compiled: list[tuple[Part, jinja2.Template]] = []
        variables: set[str] = set()
        sources: list[tuple[Part, str, bool]] = [
            ("subject", self.subject, False),
            ("body", self.body, False),
        ]
        if self.html is not None:
            sources.append(("html", self.html, bool(self.autoescape)))
        for part, source, escape in sources:
            env = _environment(escape)
            try:
                tree = env.parse(source)
            except jinja2.TemplateSyntaxError as exc:
                raise InputError(f"template {part}: line {exc.lineno}: {exc.message}") from None
            if any(True for _ in jinja2.meta.find_referenced_templates(tree)):
                raise InputError(
                    f"template {part}: {{% include %}}, {{% extends %}} and {{% import %}} "
                    "are not supported (no template is read from a file)"
                )
            variables |= jinja2.meta.find_undeclared_variables(tree) - set(env.globals)
            compiled.append((part, env.from_string(tree)))
        object.__setattr__(self, "variables", frozenset(variables))
        object.__setattr__(self, "_compiled", tuple(compiled))
        object.__setattr__(self, "_messages", _CompiledMessages())

    def render(self, data: Mapping[str, Any], *, recipient: str | None = None) -> Rendered:
        """Each part rendered with ``data``. An :class:`~asmtp.errors.InputError` names
        the part, what failed (a value ``data`` lacks, an unsafe attribute, a filter
        refusing a value) and ``recipient`` when given; so does a subject that renders
        to a line break or another control character."""
        if not isinstance(data, Mapping):
            raise InputError(f"template data must be a mapping: {type(data).__name__}")
        texts = {
            part: _render(part, compiled, data, recipient) for part, compiled in self._compiled
        }
        try:
            check_header("Subject", texts["subject"])
        except InputError as exc:
            raise InputError(exc.message + _for(recipient)) from None
        return Rendered(texts["subject"], texts["body"], texts.get("html"))

    def message(
        self, data: Mapping[str, Any], /, **options: Unpack[MessageOptions]
    ) -> EmailMessage:
        """The message for one recipient: :meth:`render` with ``data``, then
        :func:`~asmtp._core.message.build_message` with ``options`` (``to``, ``from_``
        and its other arguments but the texts). Errors name the recipient by ``to``."""
        rendered = self.render(data, recipient=_recipient_of(options["to"]))
        return self._built(rendered, options)

    def bind(self, data: Mapping[str, Any], /, **options: Unpack[MessageOptions]) -> BoundMessage:
        """:meth:`message` made when it is called: an :class:`asmtp.Job`'s message,
        rendered when the job's turn comes (a failure is that job's result, stage
        "input")::

            asmtp.Job(row["email"], welcome.bind(row, to=row["email"], from_=sender))

        A Mailer sends it without building an EmailMessage: filled into this
        template's compiled message (:meth:`BoundMessage.prepare`)."""
        return BoundMessage(self, data, options)

    def prepared(
        self, data: Mapping[str, Any], /, *, eager: bool = False, **options: Unpack[MessageOptions]
    ) -> tuple[str, PreparedMessage]:
        """The envelope sender (Sender, else From) and the bytes of :meth:`message`
        with the same arguments, as sent: filled into a compiled message when one is
        kept for these options (``eager``: compiled now, for many recipients to
        come), else built whole. The same errors as :meth:`message`."""
        to = options["to"]
        rendered = self.render(data, recipient=_recipient_of(to))
        # read once (a generator, a file's bytes): the key and the build see the same
        attachments = [load_attachment(a) for a in options.get("attachments", ())]
        loaded: MessageOptions = {**options, "attachments": attachments}
        compiled = None if options.get("inline") else self._messages.get(self, loaded, eager)
        if compiled is None:
            message = self._built(rendered, loaded)
            return _sender_of(message), prepare_message(message)
        pairs = parse_address_list(to, field="to")
        if self.html is None:
            body, alt = rendered.body, None
        else:
            body, alt = rendered.html or "", rendered.body if self.body else None
        date, message_id = options.get("date"), options.get("message_id")
        copy = compiled.fill(pairs, rendered.subject, body, alt, date=date, message_id=message_id)
        return compiled.sender, copy

    def _built(self, rendered: Rendered, options: Mapping[str, Any]) -> EmailMessage:
        """The message of ``rendered`` built whole with build_message's ``options``."""
        if rendered.html is None:
            return build_message(subject=rendered.subject, body=rendered.body, **options)
        return build_message(
            subject=rendered.subject,
            body=rendered.html,
            mailtype="html",
            alt_text=rendered.body if self.body else None,
            **options,
        )

    def _compile(self, options: Mapping[str, Any]) -> CompiledMessage:
        fixed = {k: v for k, v in options.items() if k not in _PER_RECIPIENT}
        html = self.html is not None
        return CompiledMessage(
            mailtype="html" if html else "text", alternative=html and bool(self.body), **fixed
        )


class BoundMessage:
    """A template bound to one recipient's values and options
    (:meth:`Template.bind`). Called, it is :meth:`Template.message`'s EmailMessage;
    a Mailer job takes :meth:`prepare`, the same message as sent, filled into the
    template's compiled message."""

    __slots__ = ("_data", "_options", "_template")

    def __init__(
        self, template: Template, data: Mapping[str, Any], options: MessageOptions
    ) -> None:
        self._template = template
        self._data = data
        self._options = options

    def __call__(self) -> EmailMessage:
        return self._template.message(self._data, **self._options)

    def prepare(self) -> tuple[str, PreparedMessage]:
        """The envelope sender (the message's Sender, else From) and the message as
        sent (:meth:`Template.prepared`)."""
        return self._template.prepared(self._data, **self._options)


class _CompiledMessages:
    """A Template's compiled messages by the options that decide them (the frozen
    value of every option but ``to``, ``date`` and ``message_id``): a set seen once is
    built whole and remembered by its hash, compiled when seen again, so that options
    that differ every time (an attachment per recipient) are never compiled. Shared
    by threads: a lock keeps the bookkeeping whole."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[object, CompiledMessage | None] = {}
        self._seen: dict[int, None] = {}

    def get(
        self, template: Template, options: Mapping[str, Any], eager: bool
    ) -> CompiledMessage | None:
        try:
            key = tuple((k, _frozen(v)) for k, v in options.items() if k not in _PER_RECIPIENT)
            hash(key)
        except TypeError:  # a value that cannot be compared: built whole every time
            return None
        with self._lock:
            if key in self._kept:
                compiled = self._kept.pop(key)
                self._kept[key] = compiled  # the most recently used: last
                return compiled
            if not eager and hash(key) not in self._seen:
                self._seen[hash(key)] = None
                if len(self._seen) > _SEEN:
                    del self._seen[next(iter(self._seen))]
                return None
        compiled = template._compile(options)  # outside the lock: it builds a message
        kept = compiled if compiled.compiled else None  # None: built whole every time
        with self._lock:
            self._kept[key] = kept
            if len(self._kept) > _KEPT:
                del self._kept[next(iter(self._kept))]
        return kept


_PLAIN = frozenset({str, bytes, int, float, type(None)})


def _frozen(value: Any) -> Any:
    """``value`` as a hashable value that compares equal when it builds the same
    message: mappings and sequences as tuples (in their order); TypeError for a value
    of another kind."""
    if type(value) in _PLAIN or isinstance(value, (str, bytes, int, float)):
        return value
    if isinstance(value, (list, tuple)):  # before Mapping: an ABC's check is slower
        return (tuple, tuple(_frozen(v) for v in value))
    if isinstance(value, Mapping):
        return (Mapping, tuple((_frozen(k), _frozen(v)) for k, v in value.items()))
    raise TypeError(type(value).__name__)


def _sender_of(message: EmailMessage) -> str:
    """The reverse-path the message gives: its Sender, else its From."""
    return envelope_of(message, recipients=["placeholder@example.invalid"])[0]


def _require_jinja2() -> None:
    """jinja2 imported, or the error naming the extra that installs it."""
    try:
        import jinja2.sandbox  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "asmtp.Template needs jinja2: pip install 'asmtp[jinja]'", name=exc.name
        ) from exc


@functools.cache
def _environment(autoescape: bool) -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    import jinja2
    import jinja2.sandbox

    return jinja2.sandbox.ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=autoescape,
        # a body read from a file keeps its last line break, as without templates
        keep_trailing_newline=True,
    )


@functools.cache
def _globals(environment: jinja2.Environment) -> dict[str, Any]:
    """The names every template of ``environment`` can read besides its values (its
    environment is one of two, never changed: see :func:`_environment`)."""
    return dict(environment.globals)


def _render(
    part: Part, compiled: jinja2.Template, data: Mapping[str, Any], recipient: str | None
) -> str:
    import jinja2

    try:
        # Template.render's work without merging the globals (range, cycler...) into
        # a new dict through a ChainMap each time: a third of its cost per recipient
        context = compiled.new_context({**_globals(compiled.environment), **data}, shared=True)
        return compiled.environment.concat(compiled.root_render_func(context))
    except jinja2.TemplateError as exc:  # undefined, unsafe (the sandbox), a raise
        detail = exc.message or type(exc).__name__
    except Exception as exc:  # a filter or an operation refused this recipient's values
        detail = f"{type(exc).__name__}: {exc}"
    raise InputError(f"template {part}: {detail}{_for(recipient)}")


def _for(recipient: str | None) -> str:
    return f" (recipient {recipient})" if recipient else ""


def _recipient_of(to: AddressInput) -> str | None:
    """``to`` as errors name it (an iterator is not read: build_message reads it)."""
    if to is None or isinstance(to, str):
        return to
    return ", ".join(str(a) for a in to) if isinstance(to, (list, tuple)) else None
