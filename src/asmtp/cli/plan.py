"""The send plan: ``asmtp send``'s options checked and turned into typed settings before
anything goes on the net. Owns the message parts every message of a send shares
(:class:`MessageParts`), the destination (``--relay`` or direct delivery), the
:class:`asmtp.Mailer` settings (:class:`MailerSettings`, one field per keyword of the
Mailer's, so mypy checks the call), the checks of ``--journal`` and the run it names,
and :class:`SendPlan`, what a run delivers (the plain ``--to`` plan is made here by
:func:`listed_plan`; a recipients file's by :mod:`asmtp.cli.bulk`).

Every refusal is an :class:`~asmtp.errors.InputError` naming the flag (exit 2, nothing
sent). Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

from .._core.address import check_header, check_mailbox, parse_address_list
from .._core.message import AddressInput, Attachment, build_message
from .._core.prepared import PreparedMessage
from .._core.recipients import address_key
from .._core.tlsmap import level_of
from .._delivery.direct import plan_jobs
from .._delivery.journal_format import JournalIdentity, template_digest
from .._delivery.mailer import Job, Mailer
from .._delivery.retry import Rate, Retry
from .._delivery.suppress import SuppressionList
from .._io.resolver import MXResolver
from ..config import DSN, Direct, Relay, TLSMode
from ..errors import InputError
from .options import DNS_TIMEOUT, password_from_env, proxy_from_args
from .shaping import DEFAULT as DEFAULT_SHAPING
from .shaping import load_shaping_file
from .tlsrpt import DIRECT_TLS_FLAGS, direct_tls_settings

__all__ = [
    "MX_PORT",
    "PER_DOMAIN",
    "RETRIES",
    "MailerSettings",
    "MessageParts",
    "SendPlan",
    "is_bulk",
    "listed_plan",
    "mailer_settings",
    "message_parts",
]

# defaults of the direct-delivery options; None in the parser tells "not given"
MX_PORT, PER_DOMAIN = 25, 10
#: retries of a transient failure after the first try, in bulk sending
RETRIES = 2

#: options that make a bulk run (None in the parser: not given): retries by default,
#: a "key" in each JSON line. Without them a send tries each recipient once, as
#: :func:`asmtp.sendmail` does.
_BULK_OPTIONS = (
    "recipients",
    "journal",
    "resume",
    "rate",
    "rate_per_domain",
    "retries",
    "unsubscribe_url",
    "dsn",
    "verp",
    "skip_invalid",
    "suppress",
)


def is_bulk(args: argparse.Namespace) -> bool:
    # --broker (a queued campaign) is a bulk run too; `asmtp demo` has no such option
    return getattr(args, "broker", None) is not None or any(
        getattr(args, name) is not None for name in _BULK_OPTIONS
    )


# ----------------------------------------------------------------------- the message


@dataclass(frozen=True)
class MessageParts:
    """What every message of a send shares, read from the options and files; a
    personalised copy is :func:`dataclasses.replace` of it with its own texts."""

    subject: str
    body: str
    mailtype: str
    alt_text: str | None
    headers: list[tuple[str, str]] | None
    attachments: Sequence[Attachment]
    #: {column} values go into an HTML body HTML-escaped (--no-html-escape: as they are)
    html_escape: bool = True

    def build(self, *, to: AddressInput, from_: str, cc: AddressInput = None) -> EmailMessage:
        return build_message(
            to=to,
            from_=from_,
            cc=cc,
            subject=self.subject,
            body=self.body,
            mailtype=self.mailtype,
            alt_text=self.alt_text,
            headers=self.headers,
            attachments=self.attachments,
        )


def message_parts(args: argparse.Namespace) -> MessageParts:
    """Check the message options and read their files (no I/O on the net)."""
    if args.alt_text_file is not None and not args.html:
        raise InputError("--alt-text-file goes with --html")
    if not args.html_escape and not args.html:
        raise InputError("--no-html-escape goes with --html")
    body = args.body if args.body is not None else read_text(args.body_file, "--body-file")
    alt = read_text(args.alt_text_file, "--alt-text-file") if args.alt_text_file else None
    headers = []
    for item in args.header:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise InputError(f"--header must be 'Name: value': {item!r}")
        headers.append((name.strip(), value.strip()))
    return MessageParts(
        subject=args.subject,
        body=body,
        mailtype="html" if args.html else "text",
        alt_text=alt,
        headers=headers or None,
        attachments=list(args.attach),
        html_escape=args.html_escape,
    )


def read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{flag}: cannot read {str(path)!r}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{flag}: {str(path)!r} is not UTF-8 text: {exc.reason}") from exc


# ----------------------------------------------------------------------- the destination


def destination(args: argparse.Namespace) -> Relay | Direct:
    """A :class:`Relay` for ``--relay``, else a :class:`Direct`."""
    direct_flags = {
        "--dns-server": args.dns_server,
        "--mx-port": args.mx_port,
        "--per-domain": args.per_domain,
        "--batch-per-domain": args.batch_per_domain,
        "--shaping": getattr(args, "shaping", None),
        "--dns-timeout": args.dns_timeout,
        **{f"--{name.replace('_', '-')}": getattr(args, name, None) for name in DIRECT_TLS_FLAGS},
    }
    if args.relay is not None:
        given = [flag for flag, value in direct_flags.items() if value is not None]
        if given:
            raise InputError(f"{', '.join(given)}: only for direct delivery (without --relay)")
        return _relay(args)
    auth = [
        flag
        for flag, value in (
            ("--user", args.user),
            ("--password-env", args.password_env),
            ("--allow-plaintext-auth", args.allow_plaintext_auth or None),
        )
        if value is not None
    ]
    if auth:
        raise InputError(
            f"{', '.join(auth)}: only with --relay (direct delivery to MX hosts "
            "does not authenticate)"
        )
    relay_only = [
        flag
        for flag, value in (
            ("--lmtp", args.lmtp or None),
            ("--client-cert", args.client_cert),
            ("--client-key", args.client_key),
        )
        if value is not None
    ]
    if relay_only:
        raise InputError(f"{', '.join(relay_only)}: only with --relay")
    if args.tls == "implicit":
        raise InputError(
            "--tls implicit is for a relay's port 465; direct delivery takes "
            "policy (the default), dane, sts, opportunistic, starttls or none"
        )
    dns_timeout = args.dns_timeout if args.dns_timeout is not None else DNS_TIMEOUT
    # Check the DNS servers now (and that the system has some), not mid-send.
    MXResolver(args.dns_server, timeout=dns_timeout)
    return Direct(
        dns_servers=args.dns_server,
        dns_timeout=dns_timeout,
        port=args.mx_port if args.mx_port is not None else MX_PORT,
        tls=level_of(args.tls or "policy", "--tls"),
        helo=args.helo,
        per_domain=args.per_domain if args.per_domain is not None else PER_DOMAIN,
        batch_per_domain=bool(args.batch_per_domain),
        proxy=proxy_from_args(args),
        chunking=not args.no_chunking,
        shaping=load_shaping_file(getattr(args, "shaping", None) or DEFAULT_SHAPING),
        **direct_tls_settings(args),
    )


def _relay(args: argparse.Namespace) -> Relay:
    host, port, path = args.relay
    if port is None and path is None:
        if args.lmtp:
            raise InputError(
                "--lmtp: LMTP over TCP has no standard port: --relay HOST:PORT (24 is "
                "common), or --relay unix:/PATH"
            )
        port = 465 if args.tls == "implicit" else 587
    password = password_from_env(args.user, args.password_env)
    return Relay(
        host,
        port or 0,
        username=args.user,
        password=password,
        tls=cast(TLSMode | None, args.tls),
        allow_plaintext_auth=args.allow_plaintext_auth,
        helo=args.helo,
        proxy=proxy_from_args(args),
        chunking=not args.no_chunking,
        lmtp=args.lmtp,
        path=path,
        client_cert=args.client_cert,
        client_key=args.client_key,
    )


# ----------------------------------------------------------------------- the Mailer


@dataclass(frozen=True)
class MailerSettings:
    """The :class:`asmtp.Mailer` a send runs, checked: one field per Mailer keyword
    the command sets (the others keep the Mailer's defaults)."""

    relay: Relay | Direct
    concurrency: int
    timeout: float
    retry: Retry | None = None
    rate: Rate | None = None
    rate_per_domain: Rate | None = None
    journal: str | None = None
    resume: bool = False
    identity: JournalIdentity | None = None
    campaign: str | None = None
    ignore_identity: bool = False
    dsn: DSN | None = None
    requiretls: bool = False
    unsubscribe: str | None = None
    verp: str | None = None
    debug: bool = False
    suppress: SuppressionList | None = None

    def mailer(self) -> Mailer:
        return Mailer(
            relay=self.relay,
            concurrency=self.concurrency,
            timeout=self.timeout,
            retry=self.retry,
            rate=self.rate,
            rate_per_domain=self.rate_per_domain,
            journal=self.journal,
            resume=self.resume,
            identity=self.identity,
            campaign=self.campaign,
            ignore_identity=self.ignore_identity,
            dsn=self.dsn,
            requiretls=self.requiretls,
            unsubscribe=self.unsubscribe,
            verp=self.verp,
            debug=self.debug,
            suppress=self.suppress,
        )


def mailer_settings(args: argparse.Namespace) -> MailerSettings:
    """The :class:`asmtp.Mailer` settings for the options, checked."""
    if args.journal is not None:
        _check_journal(Path(args.journal), resume=bool(args.resume))
    elif args.campaign is not None and getattr(args, "broker", None) is None:
        raise InputError("--campaign names the run in --journal: give --journal FILE")
    if args.ignore_identity and not args.resume:
        raise InputError("--ignore-identity goes with --resume")
    # a plain --to send tries once, as asmtp.sendmail does; a bulk run retries
    default_retries = RETRIES if is_bulk(args) else 0
    retries = args.retries if args.retries is not None else default_retries
    unsubscribe = args.unsubscribe_url
    if unsubscribe is not None:
        url = _try_template("--unsubscribe-url", unsubscribe)
        if not url.lower().startswith("https://"):
            raise InputError(f"--unsubscribe-url must be an https:// URL (RFC 8058): {url!r}")
        check_header("List-Unsubscribe", url)
    if args.verp is not None:
        if "{token}" not in args.verp:
            raise InputError("--verp must hold {token}, e.g. bounces+{token}@example.com")
        check_mailbox(_try_template("--verp", args.verp), field="--verp")
    return MailerSettings(
        relay=destination(args),
        concurrency=args.concurrency,
        timeout=args.timeout,
        retry=Retry(attempts=retries + 1) if retries else None,
        rate=args.rate,
        rate_per_domain=args.rate_per_domain,
        journal=args.journal,
        resume=bool(args.resume),
        identity=_journal_identity(args) if args.journal is not None else None,
        campaign=args.campaign,
        ignore_identity=bool(args.ignore_identity),
        dsn=DSN() if args.dsn else None,
        requiretls=bool(getattr(args, "requiretls", False)),
        unsubscribe=unsubscribe,
        verp=args.verp,
        debug=args.debug,
        # read once, before anything is sent: a file that is no list is refused (exit 2)
        suppress=SuppressionList(args.suppress) if args.suppress is not None else None,
    )


def _try_template(flag: str, template: str) -> str:
    """The template filled for a sample recipient (as the Mailer will fill it)."""
    try:
        return template.format(recipient="someone@example.org", token="someone=example.org")
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"{flag}: {template!r} may hold only {{recipient}} and {{token}} in braces ({exc})"
        ) from None


# ----------------------------------------------------------------------- the journal


def _check_journal(path: Path, *, resume: bool) -> None:
    """A journal of an earlier run is continued with --resume, never sent over again.
    Checked without creating the file: a run refused for bad input leaves none behind.
    The Mailer checks the rest when it opens (and locks) the journal: that it is an
    asmtp journal, not in use, and of this run."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InputError(f"--journal: cannot use {str(path)!r}: {exc.strerror}") from exc
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"--journal: {str(path)!r} is a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            # a device or a pipe: never opened (reading /dev/zero would not end)
            raise InputError(f"--journal: {str(path)!r} is not a regular file")
        if st.st_size > 0 and not resume:
            raise InputError(
                f"--journal: {str(path)!r} holds an earlier run; pass --resume to continue "
                "it (recipients done are skipped), or give a new file"
            )
        writable = os.access(path, os.W_OK)
    else:
        folder = path.parent
        if not folder.is_dir():
            raise InputError(f"--journal: no folder {str(folder)!r}")
        writable = os.access(folder, os.W_OK)
    if not writable:
        raise InputError(f"--journal: cannot write {str(path)!r} (permission denied)")


def _journal_identity(args: argparse.Namespace) -> JournalIdentity:
    """The run --journal belongs to: the sender and a digest of the message's template
    (subject, body and alternative text with {placeholders} unfilled, type, headers,
    attachments' names and content), read from the options. --campaign is added by
    the Mailer (and then is what a resume compares)."""
    [(_, sender)] = parse_address_list(args.from_, field="--from")
    body = args.body if args.body is not None else read_text(args.body_file, "--body-file")
    alt = read_text(args.alt_text_file, "--alt-text-file") if args.alt_text_file else ""
    attachments = [Path(a) for a in args.attach]
    digest = template_digest(
        args.subject,
        body,
        alt,
        "html" if args.html else "text",
        f"escape={getattr(args, 'html_escape', True)}",
        # only when given: a journal of a {column} run keeps its identity
        *(["template=jinja"] if getattr(args, "template", None) == "jinja" else []),
        f"{len(args.header)} headers",
        *args.header,
        f"{len(attachments)} attachments",
        *[piece for a in attachments for piece in (a.name, a)],
    )
    return JournalIdentity(sender=sender, message=digest)


# ----------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class SendPlan:
    """A checked send (plain or bulk): the jobs (made lazily, in file order), how many,
    the file line of each job's key (for the JSON "line"), and the Mailer's settings."""

    jobs: Callable[[], Iterator[Job]]
    total: int
    #: the file line of a job's key, if it has one
    lines: Callable[[Any], int | None]
    duplicates: int
    settings: MailerSettings
    #: why a bad row (by its key) is refused, with --skip-invalid
    refusals: Callable[[Any], str | None] = lambda key: None
    #: the summary table's title (None: none, as in ``asmtp demo`` under its prompt)
    title: str | None = "asmtp send"

    @property
    def domain_batches(self) -> Direct | None:
        """``--batch-per-domain``: the direct delivery whose domains' recipients share
        sessions (see :class:`asmtp.cli.run.DomainBatches`); else None."""
        relay = self.settings.relay
        return relay if isinstance(relay, Direct) and relay.batch_per_domain else None


def listed_plan(
    rcpts: Sequence[str],
    prepared: PreparedMessage,
    sender: str,
    settings: MailerSettings,
    *,
    keyed: bool,
    title: str | None = "asmtp send",
) -> SendPlan:
    """One prepared message to every recipient in ``rcpts``; ``keyed``: each result
    carries its key (the address as compared for duplicates) as in a bulk run."""
    relay = settings.relay
    if isinstance(relay, Direct):
        # the domains take turns (as asmtp.send orders them), so that one busy domain
        # at the head of the list does not hold every session at its per-domain cap
        turns = plan_jobs(rcpts, replace(relay, batch_per_domain=False))
        rcpts = [rcpts[i] for [i] in turns]

    def listed() -> Iterator[Job]:
        for rcpt in rcpts:
            yield Job(rcpt, prepared, sender=sender, key=address_key(rcpt) if keyed else None)

    return SendPlan(listed, len(rcpts), lambda key: None, 0, settings, title=title)
