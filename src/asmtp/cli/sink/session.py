"""The sink's side of one SMTP session, sans-IO: bytes in, replies out.

Owns every rule of the exchange as the sink plays it: which command is answered how
(RFC 5321, with enhanced status codes, RFC 2034), what EHLO offers (PIPELINING,
8BITMIME, SIZE, SMTPUTF8, ENHANCEDSTATUSCODES; CHUNKING and STARTTLS when asked),
the message content after DATA up to the end-of-data line, BDAT chunks of exactly
the octets they announce (RFC 3030), and the injected faults (a share of RCPTs
refused, 421 after N messages on a connection). It also owns the sink's settings and
its counters. It never touches a socket or a clock: :mod:`.server` feeds it what
one read brought and writes what it answers, one round trip later when asked::

    >>> session = SinkSession(SinkSettings(), Counters())
    >>> session.greeting()
    b'220 sink.asmtp.test ESMTP asmtp sink\\r\\n'
    >>> session.receive(b"HELO client.example\\r\\nMAIL FROM:<a@example.org>\\r\\n")
    b'250 sink.asmtp.test\\r\\n250 2.1.0 Ok\\r\\n'

The content is counted, not kept: a sink stores nothing of what it is sent.
"""

from __future__ import annotations

import enum
import functools
import math
from dataclasses import asdict, dataclass

__all__ = [
    "DEFAULT_HOSTNAME",
    "DEFAULT_MAX_SIZE",
    "MAX_LINE",
    "Counters",
    "End",
    "SinkSession",
    "SinkSettings",
]

#: the longest command line taken (RFC 5321 4.5.3.1.4 asks for 512 octets at least);
#: a longer one ends the session with 421
MAX_LINE = 4096
_END_OF_DATA = b"\r\n.\r\n"  # RFC 5321 4.1.1.4: the line with a single dot
#: the name in the greeting and EHLO, and the SIZE offered, unless set
DEFAULT_HOSTNAME = "sink.asmtp.test"
DEFAULT_MAX_SIZE = 100 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SinkSettings:
    """How the sink answers. Times are seconds (the command line takes milliseconds).

    ``rtt``: each batch of replies (everything one read asked for) goes out this long
    after the read, the greeting this long after the connection, emulating a network
    round trip; ``handshake_rtt``: the greeting waits one more ``rtt``, the TCP
    handshake's round trip (on a network, connect costs one before the greeting's
    own); ``slow_greeting``: the greeting waits this much longer;
    ``refuse_rcpt``: the share of RCPTs (0 to 1) answered 550, spread evenly over
    the sink's RCPTs in the order they arrive; ``close_after``: after this many
    messages on one connection, the next MAIL is answered 421 and the connection
    closed; ``max_size``: SIZE as offered (0: no limit), larger messages refused."""

    hostname: str = DEFAULT_HOSTNAME
    rtt: float = 0.0
    handshake_rtt: bool = False
    slow_greeting: float = 0.0
    refuse_rcpt: float = 0.0
    close_after: int | None = None
    pipelining: bool = True
    chunking: bool = False
    max_size: int = DEFAULT_MAX_SIZE

    @property
    def greeting_delay(self) -> float:
        """Seconds from the connection to the greeting."""
        return self.rtt * (2 if self.handshake_rtt else 1) + self.slow_greeting

    def __post_init__(self) -> None:
        for name in ("rtt", "slow_greeting"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be 0 or more seconds: {value!r}")
        if not 0 <= self.refuse_rcpt <= 1:
            raise ValueError(f"refuse_rcpt is a share from 0 to 1: {self.refuse_rcpt!r}")
        if self.close_after is not None and self.close_after < 1:
            raise ValueError(f"close_after must be at least 1: {self.close_after!r}")
        if self.max_size < 0:
            raise ValueError(f"max_size must be 0 or more octets: {self.max_size!r}")
        if not self.hostname or any(c.isspace() for c in self.hostname):
            raise ValueError(f"hostname must be one word: {self.hostname!r}")


@dataclass(slots=True)
class Counters:
    """What the sink has seen since it started. ``messages`` counts accepted messages
    (``via_bdat`` of them sent with BDAT), ``recipients`` their recipients, ``octets``
    their content; ``refused`` the RCPTs refused by ``refuse_rcpt``; ``closed_421`` the
    connections closed by ``close_after``; ``round_trips`` the batches of replies
    written (the greeting included): per message, the round trips a client needed."""

    connections: int = 0
    open: int = 0
    peak_open: int = 0
    messages: int = 0
    via_bdat: int = 0
    recipients: int = 0
    refused: int = 0
    rcpts_seen: int = 0
    closed_421: int = 0
    octets: int = 0
    round_trips: int = 0

    def snapshot(self) -> dict[str, int]:
        """The counters as a plain dict (for ``--json`` and reports)."""
        return asdict(self)


class End(enum.Enum):
    """What follows the replies written so far: the connection closes (after QUIT,
    421 or a line too long), or the TLS handshake starts (after STARTTLS's 220)."""

    CLOSE = "close"
    STARTTLS = "starttls"


class _Mode(enum.Enum):
    COMMAND = "command"
    DATA = "data"  # after 354: content up to the end-of-data line
    BDAT = "bdat"  # the octets a BDAT command announced


@functools.lru_cache(maxsize=16)
def ehlo_reply(settings: SinkSettings, starttls: bool) -> bytes:
    """The reply to EHLO: what this sink offers (STARTTLS only before TLS started)::

    250-sink.asmtp.test
    250-PIPELINING
    250-SIZE 104857600
    250-8BITMIME
    250-SMTPUTF8
    250-ENHANCEDSTATUSCODES
    250 CHUNKING
    """
    lines = [settings.hostname]
    if settings.pipelining:
        lines.append("PIPELINING")
    lines += [f"SIZE {settings.max_size}", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
    if settings.chunking:
        lines.append("CHUNKING")
    if starttls:
        lines.append("STARTTLS")
    text = "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"
    return text.encode("ascii")


_OK = b"250 2.0.0 Ok\r\n"
_MAIL_OK = b"250 2.1.0 Ok\r\n"
_RCPT_OK = b"250 2.1.5 Ok\r\n"
_GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
_BYE = b"221 2.0.0 Bye\r\n"
_NEED_HELLO = b"503 5.5.1 Send EHLO first\r\n"
_NEED_MAIL = b"503 5.5.1 Send MAIL first\r\n"
_NESTED_MAIL = b"503 5.5.1 A transaction is already open: RSET first\r\n"
_NO_RECIPIENTS = b"554 5.5.1 No valid recipients\r\n"
_DATA_AFTER_BDAT = b"503 5.5.1 DATA after BDAT in one transaction\r\n"
_TOO_BIG = b"552 5.3.4 Message too big for this sink\r\n"
_SYNTAX = b"501 5.5.4 Syntax error in parameters\r\n"
_UNKNOWN = b"500 5.5.2 Command not recognized\r\n"
_NOT_OFFERED = b"502 5.5.1 Not offered by this sink\r\n"
_TLS_ALREADY = b"503 5.5.1 TLS already started\r\n"
_TLS_READY = b"220 2.0.0 Ready to start TLS\r\n"
_LINE_TOO_LONG = b"421 4.7.0 Line too long: closing\r\n"
_VRFY = b"252 2.5.2 Cannot verify, but will accept\r\n"
_HELP = b"214 2.0.0 asmtp sink: a load-test server that keeps nothing\r\n"
_BODY_TYPES = frozenset({b"7BIT", b"8BITMIME", b"BINARYMIME"})


class SinkSession:
    """One connection's exchange. :meth:`greeting` first; then :meth:`receive` with
    each read's bytes, which returns the replies they asked for (``b""``: none yet).
    Once :attr:`end` is set, no further bytes are read: the caller closes the
    connection (or starts TLS, then calls :meth:`tls_started`)."""

    def __init__(
        self, settings: SinkSettings, counters: Counters, *, tls_available: bool = False
    ) -> None:
        self._settings = settings
        self._counters = counters
        self._tls_available = tls_available
        self._tls = False
        self._ehlo = ehlo_reply(settings, tls_available)
        self._pending = b""  # an incomplete command line from the last read
        self._mode = _Mode.COMMAND
        self._hello = False
        self._in_mail = False
        self._rcpts = 0
        self._bdat_used = False
        self._size = 0  # octets of the message's content so far
        self._tail = b""  # DATA: the last octets of content, where the end may begin
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_refusal: bytes | None = None
        #: messages accepted on this connection
        self.messages = 0
        #: set once nothing more is to be read: see :class:`End`
        self.end: End | None = None

    def greeting(self) -> bytes:
        return f"220 {self._settings.hostname} ESMTP asmtp sink\r\n".encode("ascii")

    def tls_started(self) -> None:
        """The handshake after STARTTLS is done: the session starts over (RFC 3207
        4.2: the client forgets what EHLO said and says it again)."""
        self._tls = True
        self._ehlo = ehlo_reply(self._settings, False)
        self._hello = False
        self._reset()
        self._pending = b""
        self.end = None

    # ------------------------------------------------------------------ the bytes

    def receive(self, data: bytes) -> bytes:
        """Take what one read brought; return the replies it asked for, in order."""
        if self.end is not None:
            return b""  # after QUIT, 421 or STARTTLS (RFC 3207 4.2: discard the rest)
        if self._pending:
            data = self._pending + data
            self._pending = b""
        out: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size and self.end is None:
            mode = self._mode
            if mode is _Mode.DATA:
                pos = self._content(data, pos, out)
            elif mode is _Mode.BDAT:
                pos = self._chunk(data, pos, out)
            else:
                eol = data.find(b"\n", pos)
                if eol < 0:
                    if size - pos > MAX_LINE:
                        out.append(self._close(_LINE_TOO_LONG))
                    else:
                        self._pending = data[pos:]
                    break
                line = data[pos : eol + 1]
                pos = eol + 1
                reply = self._close(_LINE_TOO_LONG) if len(line) > MAX_LINE else self._command(line)
                if reply:
                    out.append(reply)
        return b"".join(out)

    def _content(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """DATA: count content up to the end-of-data line, which may begin in an
        earlier read (its CRLF kept in ``_tail``); return where the content ended."""
        tail = self._tail
        found = (tail + data[pos : pos + 5]).find(_END_OF_DATA)
        if found >= 0:
            end = pos + found + 5 - len(tail)
        else:
            found = data.find(_END_OF_DATA, pos)
            if found < 0:
                self._size += len(data) - pos
                self._tail = (tail + data[pos:])[-4:] if len(data) - pos < 4 else data[-4:]
                return len(data)
            end = found + 5
        self._size += end - pos - 3  # the dot line is not content
        self._mode = _Mode.COMMAND
        out.append(self._accept(bdat=False))
        return end

    def _chunk(self, data: bytes, pos: int, out: list[bytes]) -> int:
        """BDAT: take exactly the octets announced, whatever they look like."""
        take = min(self._bdat_left, len(data) - pos)
        self._bdat_left -= take
        self._size += take
        if self._bdat_left == 0:
            self._mode = _Mode.COMMAND
            out.append(self._chunk_done())
        return pos + take

    # ------------------------------------------------------------------ commands

    def _command(self, line: bytes) -> bytes:
        text = line.rstrip(b"\r\n")
        verb, _, arg = text.partition(b" ")
        verb = verb.upper()
        if verb == b"MAIL":
            return self._mail(arg)
        if verb == b"RCPT":
            return self._rcpt(arg)
        if verb == b"DATA":
            return self._data()
        if verb == b"BDAT" and self._settings.chunking:
            return self._bdat(arg)
        if verb == b"EHLO" or verb == b"HELO":
            if not arg.strip():
                return _SYNTAX
            self._hello = True
            self._reset()
            if verb == b"HELO":
                return f"250 {self._settings.hostname}\r\n".encode("ascii")
            return self._ehlo
        if verb == b"RSET":
            self._reset()
            return _OK
        if verb == b"NOOP":
            return _OK
        if verb == b"QUIT":
            return self._close(_BYE)
        if verb == b"STARTTLS":
            return self._starttls(arg)
        if verb == b"VRFY":
            return _VRFY
        if verb == b"HELP":
            return _HELP
        return _NOT_OFFERED if verb in (b"BDAT", b"AUTH", b"ETRN", b"TURN") else _UNKNOWN

    def _mail(self, arg: bytes) -> bytes:
        if not self._hello:
            return _NEED_HELLO
        if self._in_mail:
            return _NESTED_MAIL
        limit = self._settings.close_after
        if limit is not None and self.messages >= limit:
            self._counters.closed_421 += 1
            text = f"421 4.7.0 Closing after {limit} messages on this connection\r\n"
            return self._close(text.encode("ascii"))
        if arg[:5].upper() != b"FROM:":
            return _SYNTAX
        path, closed, params = arg[5:].strip().partition(b">")
        if not path.startswith(b"<") or not closed:
            return _SYNTAX
        for param in params.split():
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit():
                    return _SYNTAX
                if self._settings.max_size and int(value) > self._settings.max_size:
                    return _TOO_BIG
            elif key == b"BODY":
                if value.upper() not in _BODY_TYPES:
                    return _SYNTAX
            elif key != b"SMTPUTF8":
                return b"555 5.5.4 Parameter not offered by this sink\r\n"
        self._in_mail = True
        return _MAIL_OK

    def _rcpt(self, arg: bytes) -> bytes:
        if not self._in_mail:
            return _NEED_MAIL
        if arg[:3].upper() != b"TO:" or not arg[3:].strip().startswith(b"<"):
            return _SYNTAX
        counters = self._counters
        counters.rcpts_seen += 1
        seen, share = counters.rcpts_seen, self._settings.refuse_rcpt
        # an even spread: RCPT number n is refused when floor(n * share) steps up
        if share and math.floor(seen * share) > math.floor((seen - 1) * share):
            counters.refused += 1
            address = arg[3:].strip().partition(b">")[0] + b">"
            return b"550 5.1.1 " + address + b" refused (asmtp sink --refuse-rcpt)\r\n"
        self._rcpts += 1
        return _RCPT_OK

    def _data(self) -> bytes:
        if not self._in_mail:
            return _NEED_MAIL
        if self._bdat_used:
            return _DATA_AFTER_BDAT
        if not self._rcpts:
            return _NO_RECIPIENTS  # RFC 2920 3.1: DATA with no valid recipient
        self._mode = _Mode.DATA
        self._tail = b"\r\n"  # the content may be empty: ".\r\n" at once
        self._size = 0
        return _GO_AHEAD

    def _bdat(self, arg: bytes) -> bytes:
        """``BDAT n [LAST]`` (RFC 3030 2): the n octets that follow are read whatever
        is answered, so a refused chunk never desynchronises the stream."""
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit():
            return _SYNTAX  # no size to skip: the octets that follow read as commands
        if len(words) == 2 and words[1].upper() != b"LAST":
            return _SYNTAX
        self._bdat_left = int(words[0])
        self._bdat_last = len(words) == 2
        if not self._in_mail:
            self._bdat_refusal = _NEED_MAIL
        elif not self._rcpts:
            self._bdat_refusal = _NO_RECIPIENTS
        else:
            self._bdat_refusal = None
            if not self._bdat_used:
                self._bdat_used = True
                self._size = 0
        if self._bdat_left:
            self._mode = _Mode.BDAT
            return b""
        return self._chunk_done()

    def _chunk_done(self) -> bytes:
        refusal = self._bdat_refusal
        if refusal is not None:
            self._bdat_refusal = None
            return refusal
        if self._settings.max_size and self._size > self._settings.max_size:
            self._reset()  # RFC 3030 2: the transaction failed; later chunks get 503
            return _TOO_BIG
        if self._bdat_last:
            return self._accept(bdat=True)
        return f"250 2.0.0 {self._size} octets received\r\n".encode("ascii")

    def _starttls(self, arg: bytes) -> bytes:
        if not self._tls_available:
            return _NOT_OFFERED
        if self._tls:
            return _TLS_ALREADY
        if arg.strip():
            return _SYNTAX
        self.end = End.STARTTLS
        return _TLS_READY

    # ------------------------------------------------------------------ transactions

    def _accept(self, *, bdat: bool) -> bytes:
        """The end of a message's content: accepted, or refused as too big."""
        size = self._size
        if self._settings.max_size and size > self._settings.max_size:
            self._reset()
            return _TOO_BIG
        counters = self._counters
        counters.messages += 1
        counters.via_bdat += bdat
        counters.recipients += self._rcpts
        counters.octets += size
        self.messages += 1
        self._reset()
        return f"250 2.0.0 Ok: queued, {size} octets\r\n".encode("ascii")

    def _reset(self) -> None:
        self._in_mail = False
        self._rcpts = 0
        self._bdat_used = False
        self._size = 0

    def _close(self, reply: bytes) -> bytes:
        self.end = End.CLOSE
        return reply
