"""The one exception tree of asmtp.

Every error asmtp raises derives from :class:`SMTPError`. Each carries ``permanent``
(will retrying ever help?) and, where known, ``stage`` (the step of the SMTP exchange
it ended at), so the dispatcher can turn any failure into a recipient result without
special cases. Raw ``OSError``, ``ssl.SSLError`` or anyio exceptions never reach callers:
the drivers translate them into the classes below in one place
(:mod:`asmtp._io.exceptions`).

Also the vocabulary every layer shares: :data:`Stage`, the names of the steps of the
exchange, and :data:`STAGE_TEXT`, how each is named in messages.
"""

from __future__ import annotations

from typing import Literal

#: Where an SMTP exchange is, or where it ended: in the order a send goes through them.
#: "input" (the caller's input was refused, before any connection), "dns" (the MX
#: lookup of direct delivery), "connect" (TCP, and implicit TLS), then one stage per
#: command whose reply is awaited ("greeting" is the server's opening, "bdat" a chunk of
#: content that is not the last (RFC 3030 CHUNKING), "message" the content and its
#: end-of-data dot, or its last chunk). :data:`STAGE_TEXT` names each in messages.
Stage = Literal[
    "input",
    "dns",
    "connect",
    "greeting",
    "ehlo",
    "helo",
    "lhlo",
    "starttls",
    "auth",
    "mail",
    "rcpt",
    "data",
    "bdat",
    "message",
    "rset",
    "noop",
    "quit",
]

__all__ = [
    "AuthUnavailableError",
    "AuthenticationError",
    "CertificateError",
    "ConnectError",
    "ConnectionLostError",
    "InputError",
    "JournalError",
    "JournalFormatError",
    "JournalIdentityError",
    "JournalLockedError",
    "JournalRefusedError",
    "JournalWriteError",
    "LocalProtocolError",
    "MailboxError",
    "MessageRejectedError",
    "NoAddressError",
    "NoSuchDomainError",
    "NullMXError",
    "ProtocolError",
    "RemoteProtocolError",
    "ReplyError",
    "ResolveError",
    "RunningLoopError",
    "SMTPError",
    "SMTPTimeoutError",
    "Stage",
    "TLSError",
    "TLSUnavailableError",
    "TemporaryResolveError",
    "TransportError",
]


class SMTPError(Exception):
    """Root of every asmtp error.

    ``permanent`` says whether the same attempt could succeed later (False: a network
    or configuration problem, a 4xx reply) or never will (True: a 5xx reply, a message
    the server cannot take). ``stage`` names where the exchange ended ("connect",
    "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "message", ...).
    """

    permanent: bool = False

    def __init__(self, message: str, *, stage: Stage | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.stage: Stage | None = stage


class InputError(SMTPError, ValueError):
    """Bad input from the caller (an address or header with CR/LF/NUL, an address that
    does not parse, a bad option). Raised before any connection is made."""

    permanent = True


class RunningLoopError(SMTPError, RuntimeError):
    """A blocking call of :mod:`asmtp.sync` (or the Django backend) was made from a
    thread running an event loop: it would stall every task of that loop. Await the
    async API there instead (``await asmtp.send(...)``, ``asmtp.Mailer``)."""

    permanent = True


class JournalError(SMTPError):
    """The delivery journal could not be opened or written. Nothing more is sent for
    a recipient whose journal line could not be made durable (transient)."""


class JournalRefusedError(JournalError, InputError):
    """The journal cannot be used for this run, found when opening it (``Mailer``'s
    ``async with``), before any connection: nothing was sent or written to it."""


class JournalLockedError(JournalRefusedError):
    """Another run (another process, or another Mailer in this one) has the journal
    open: one writer at a time. The message names the holder's pid when known."""


class JournalIdentityError(JournalRefusedError):
    """The journal belongs to another run: its sender, message or campaign differs
    (``differences`` says which, in words), or it predates journal headers. An
    explicit override (``ignore_identity=True``, ``--ignore-identity``) continues it."""

    def __init__(self, message: str, *, differences: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.differences = differences


class JournalFormatError(JournalRefusedError):
    """The file is not an asmtp journal (or not a regular file, or holds a damaged
    line, or is of a newer format): asmtp neither resumes from it nor writes to it."""


class JournalWriteError(JournalError):
    """The journal could not be written (disk full, I/O error, read-only, file too
    large): the run stops sending; a recipient whose pre-dot line failed was not sent
    (transient). ``errno`` is the operating system's error number."""

    def __init__(
        self, message: str, *, errno: int | None = None, stage: Stage | None = None
    ) -> None:
        super().__init__(message, stage=stage)
        self.errno = errno


class ProtocolError(SMTPError):
    """The SMTP exchange went outside the protocol."""


class LocalProtocolError(ProtocolError):
    """asmtp's own state machine was asked to do something the protocol forbids now
    (a bug in the caller of the sans-IO core, not the server's fault)."""

    permanent = True


class RemoteProtocolError(ProtocolError):
    """The server sent something that is not SMTP: a malformed or oversized reply,
    a reply nobody asked for, data before the TLS handshake."""


class TransportError(SMTPError):
    """The connection failed: could not connect, was closed, or timed out."""


class ConnectError(TransportError):
    """The TCP connection could not be made (refused, unreachable, name unknown)."""


class ConnectionLostError(TransportError):
    """The server closed the connection (or it broke) in the middle of the exchange."""


class SMTPTimeoutError(TransportError, TimeoutError):
    """A network step (a command and its whole reply, or connect plus greeting) took
    longer than the timeout."""


class TLSError(TransportError):
    """The TLS handshake failed."""


class CertificateError(TLSError):
    """The server's certificate could not be verified for the host name."""


class TLSUnavailableError(TLSError):
    """TLS was required but the server does not offer STARTTLS."""


class ReplyError(SMTPError):
    """The server answered with an error reply (4xx or 5xx).

    >>> err = ReplyError(550, "no such user", enhanced_status="5.1.1", stage="rcpt")
    >>> err.permanent, str(err)
    (True, 'RCPT TO refused: 550 5.1.1 no such user')
    """

    def __init__(
        self,
        code: int,
        text: str,
        *,
        enhanced_status: str | None = None,
        stage: Stage | None = None,
    ) -> None:
        self.code = code
        self.text = text
        self.enhanced_status = enhanced_status
        what = "server" if stage is None else STAGE_TEXT.get(stage, "server")
        status = f" {enhanced_status}" if enhanced_status else ""
        super().__init__(f"{what} refused: {code}{status} {text}".rstrip(), stage=stage)
        self.permanent = code >= 500


class AuthenticationError(ReplyError):
    """AUTH was rejected (535 and kin). Transient: the credentials can be fixed and the
    recipients tried again, as Postfix defers rather than bounces on an AUTH failure."""

    def __init__(
        self,
        code: int,
        text: str,
        *,
        enhanced_status: str | None = None,
        stage: Stage | None = "auth",
    ) -> None:
        super().__init__(code, text, enhanced_status=enhanced_status, stage=stage)
        self.permanent = False


class AuthUnavailableError(SMTPError):
    """AUTH cannot be done: no mechanism in common, or the connection is not encrypted
    and ``allow_plaintext_auth`` was not given. Transient: a configuration problem."""


class MessageRejectedError(SMTPError):
    """This server can never take this message as it is: it exceeds the server's SIZE,
    or needs 8BITMIME or SMTPUTF8 and the server does not offer them."""

    permanent = True


class MailboxError(SMTPError):
    """A mailbox could not be read over IMAP or POP3 (:mod:`asmtp.bounces`): the server
    refused the login, has no such mailbox or folder, or answered a command with an
    error. The message names the mailbox by its URL, never with the password."""


class ResolveError(SMTPError):
    """The recipient domain's mail exchangers could not be found.

    ``permanent`` is True when the domain takes no mail (NXDOMAIN, null MX, no
    address) and False for a temporary DNS failure (timeout, SERVFAIL).
    """

    def __init__(
        self,
        message: str,
        *,
        domain: str,
        permanent: bool,
        enhanced_status: str | None = None,
    ) -> None:
        super().__init__(message, stage="dns")
        self.domain = domain
        self.permanent = permanent
        self.enhanced_status = enhanced_status

    #: how ``asmtp mx --json`` names this outcome
    kind: str = "temporary"


class NoSuchDomainError(ResolveError):
    """NXDOMAIN: the recipient domain does not exist (permanent, 5.1.2)."""

    kind = "nxdomain"


class NullMXError(ResolveError):
    """The domain publishes a null MX (``0 .``, RFC 7505): it takes no mail
    (permanent, 5.1.10)."""

    kind = "null_mx"


class NoAddressError(ResolveError):
    """None of the domain's mail exchangers has an address (permanent, 5.1.2)."""

    kind = "no_address"


class TemporaryResolveError(ResolveError):
    """DNS did not answer in time or answered SERVFAIL (transient, 4.4.3)."""

    kind = "temporary"


#: How each stage is named in messages ("RCPT TO refused: ..."): every :data:`Stage`,
#: in its order.
STAGE_TEXT: dict[Stage, str] = {
    "input": "input",
    "dns": "DNS",
    "connect": "connect",
    "greeting": "greeting",
    "ehlo": "EHLO",
    "helo": "HELO",
    "lhlo": "LHLO",
    "starttls": "STARTTLS",
    "auth": "AUTH",
    "mail": "MAIL FROM",
    "rcpt": "RCPT TO",
    "data": "DATA",
    "bdat": "BDAT",
    "message": "message",
    "rset": "RSET",
    "noop": "NOOP",
    "quit": "QUIT",
}


def deadline_passed(stage: Stage, during: str = "", *, domain: str = "") -> SMTPError:
    """The error for a recipient whose deadline (``Mailer(recipient_deadline=...)``)
    passed at ``stage``, ``during`` saying what was under way if the stage does not.
    Transient, as any timeout: :func:`asmtp.results.result_from_error` makes it
    "unknown" when the end-of-data dot had been sent. At "dns" it is a temporary DNS
    failure of ``domain`` (4.4.3, as a DNS timeout is), elsewhere a timeout.

    >>> deadline_passed("mail")
    SMTPTimeoutError("the recipient's deadline passed")
    >>> deadline_passed("dns", "during the MX lookup", domain="example.org").message
    "example.org: the recipient's deadline passed during the MX lookup"
    """
    text = f"the recipient's deadline passed {during}".rstrip()
    if stage == "dns":
        return TemporaryResolveError(
            f"{domain}: {text}", domain=domain, permanent=False, enhanced_status="4.4.3"
        )
    return SMTPTimeoutError(text, stage=stage)
