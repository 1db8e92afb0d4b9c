"""asmtp: an asyncio SMTP client with concurrent fan-out.

One message to many recipients, one connection each, concurrently, one result per
recipient::

    report = await asmtp.sendmail(
        to="jack@example.org, Ann (work) <ann@example.net>",
        from_="someone@example.com",
        subject="Test Subject",
        body="<h1>This is a test mail</h1>",
        mailtype="html",
        relay=asmtp.Relay("smtp.example.com", 587, username="u", password="p"),
    )
"""

__version__ = "0.1.0"

from ._core.capabilities import Capabilities
from ._core.dkim import DKIM
from ._core.message import build_message
from ._core.prepared import PreparedMessage, prepare_message
from ._core.reply import Reply
from ._core.shaping_rules import Rule, Shaping, SiteLimits
from ._core.template import Template
from ._core.tlsrpt import ReportPolicy, TLSReportLog
from ._delivery.api import ConnectedSession, connect, send, sendmail
from ._delivery.journal_format import JournalIdentity
from ._delivery.mailer import Job, Mailer
from ._delivery.pool import Pool
from ._delivery.retry import Rate, Retry
from ._delivery.suppress import SuppressionList
from ._delivery.workers import Workers
from ._io.resolver import MXHost, MXResolver, resolve_mx
from .config import DSN, Direct, Proxy, Relay, Timeouts
from .errors import (
    AuthenticationError,
    AuthUnavailableError,
    CertificateError,
    ConnectError,
    ConnectionLostError,
    InputError,
    JournalError,
    JournalFormatError,
    JournalIdentityError,
    JournalLockedError,
    JournalRefusedError,
    JournalWriteError,
    LocalProtocolError,
    MailboxError,
    MessageRejectedError,
    NoAddressError,
    NoSuchDomainError,
    NullMXError,
    ProtocolError,
    RemoteProtocolError,
    ReplyError,
    ResolveError,
    RunningLoopError,
    SMTPError,
    SMTPTimeoutError,
    Stage,
    TemporaryResolveError,
    TLSError,
    TLSUnavailableError,
    TransportError,
)
from .results import Attempt, RecipientResult, Report

__all__ = (
    "DKIM",
    "DSN",
    "Attempt",
    "AuthUnavailableError",
    "AuthenticationError",
    "Capabilities",
    "CertificateError",
    "ConnectError",
    "ConnectedSession",
    "ConnectionLostError",
    "Direct",
    "InputError",
    "Job",
    "JournalError",
    "JournalFormatError",
    "JournalIdentity",
    "JournalIdentityError",
    "JournalLockedError",
    "JournalRefusedError",
    "JournalWriteError",
    "LocalProtocolError",
    "MXHost",
    "MXResolver",
    "MailboxError",
    "Mailer",
    "MessageRejectedError",
    "NoAddressError",
    "NoSuchDomainError",
    "NullMXError",
    "Pool",
    "PreparedMessage",
    "ProtocolError",
    "Proxy",
    "Rate",
    "RecipientResult",
    "Relay",
    "RemoteProtocolError",
    "Reply",
    "ReplyError",
    "Report",
    "ReportPolicy",
    "ResolveError",
    "Retry",
    "Rule",
    "RunningLoopError",
    "SMTPError",
    "SMTPTimeoutError",
    "Shaping",
    "SiteLimits",
    "Stage",
    "SuppressionList",
    "TLSError",
    "TLSReportLog",
    "TLSUnavailableError",
    "Template",
    "TemporaryResolveError",
    "Timeouts",
    "TransportError",
    "Workers",
    "__version__",
    "build_message",
    "connect",
    "prepare_message",
    "resolve_mx",
    "send",
    "sendmail",
)
