"""Whatever a server answers, every recipient of a session gets exactly one result, and
"delivered" only after a success reply to the end of data: hypothesis scripts a server's
replies command by command (successes, refusals of every class, 452 "too many
recipients", 421 closing, a reply the command does not allow, garbage, the connection
closed), on DATA or BDAT (CHUNKING: one chunk or several), SMTP or LMTP, with AUTH or
without, and runs a whole session's steps (:meth:`Session.one_shot`) on them, counting the
results the way the fan-out does (:func:`asmtp._delivery.dispatch.run_session`: a session
that fails leaves its missing recipients to :meth:`Session.cut_short`).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from asmtp._core.prepared import PreparedMessage, prepare_message
from asmtp._core.wire import BDAT_CHUNK
from asmtp._delivery.endpoint import Endpoint
from asmtp._delivery.session import Session
from asmtp.config import Timeouts
from asmtp.errors import SMTPError
from asmtp.results import RecipientResult
from scripted import drive

SMALL = prepare_message(b"From: a@example.com\r\nSubject: hi\r\n\r\nhello\r\n")
#: over two BDAT chunks: the first goes with the envelope, the others once it is answered
LARGE = prepare_message(
    b"From: a@example.com\r\n\r\n" + (b"x" * 76 + b"\r\n") * (2 * BDAT_CHUNK // 78 + 1)
)
CLOSE = b""  # the server closes the connection instead of answering
GARBAGE = b"hello there\r\n"

CAPS = b"250-mx.example.org\r\n250-SIZE 1000000\r\n250-AUTH PLAIN LOGIN\r\n"
#: what the server answers when its script for a command has run out
NORMAL = {
    "greeting": b"220 mx.example.org ESMTP\r\n",
    "helo": b"250 mx.example.org\r\n",
    "auth": b"235 2.7.0 authenticated\r\n",
    "mail": b"250 2.1.0 ok\r\n",
    "rcpt": b"250 2.1.5 ok\r\n",
    "data": b"354 go ahead\r\n",
    "message": b"250 2.0.0 queued\r\n",
    "bdat": b"250 2.0.0 chunk ok\r\n",
    "rset": b"250 2.0.0 ok\r\n",
    "quit": b"221 2.0.0 bye\r\n",
}
#: what the server may answer instead, per command
ANSWERS = {
    "greeting": [b"421 4.3.2 busy\r\n", b"554 5.7.1 go away\r\n", GARBAGE, CLOSE],
    "ehlo": [b"421 4.3.2 bye\r\n", b"500 5.5.1 what\r\n", b"502 5.5.2 no EHLO\r\n", CLOSE],
    "helo": [b"421 4.3.2 bye\r\n", b"550 5.7.1 no\r\n", CLOSE],
    "auth": [
        b"334 VXNlcm5hbWU6\r\n",
        b"421 4.3.2 bye\r\n",
        b"454 4.7.0 try later\r\n",
        b"535 5.7.8 bad credentials\r\n",
        b"504 5.5.4 no such mechanism\r\n",
        GARBAGE,
        CLOSE,
    ],
    "mail": [
        b"421 4.3.2 bye\r\n",
        b"451 4.3.0 later\r\n",
        b"550 5.7.1 no\r\n",
        b"250-ok\r\n250 2.1.0 ok\r\n",
        GARBAGE,
        CLOSE,
    ],
    "rcpt": [
        b"251 2.1.5 forwarded\r\n",
        b"421 4.3.2 bye\r\n",
        b"450 4.2.1 busy\r\n",
        b"452 4.5.3 too many recipients\r\n",
        b"452 4.5.3 too many recipients\r\n",
        b"550 5.1.1 no such user\r\n",
        b"354 not now\r\n",
        GARBAGE,
        CLOSE,
    ],
    "data": [
        b"421 4.3.2 bye\r\n",
        b"451 4.3.0 later\r\n",
        b"503 5.5.1 no recipients\r\n",
        b"554 5.5.1 no\r\n",
        b"250 2.0.0 not a 354\r\n",
        CLOSE,
    ],
    "message": [
        b"421 4.3.2 bye\r\n",
        b"451 4.3.0 later\r\n",
        b"452 4.3.1 full\r\n",
        b"554 5.7.1 spam\r\n",
        b"221 2.0.0 not an answer to the dot\r\n",
        GARBAGE,
        CLOSE,
    ],
    "bdat": [
        b"421 4.3.2 bye\r\n",
        b"451 4.3.0 later\r\n",
        b"503 5.5.1 no valid recipients\r\n",
        b"554 5.6.0 bad chunk\r\n",
        GARBAGE,
        CLOSE,
    ],
    "rset": [b"421 4.3.2 bye\r\n", b"500 5.5.1 what\r\n", CLOSE],
    "quit": [b"421 4.3.2 bye\r\n", GARBAGE, CLOSE],
}


class Server:
    """Answers whatever the client awaits: the script's replies for that command first,
    in order, then the normal one; keeps every reply given to the end of data."""

    def __init__(self, script: dict[str, list[bytes]], *, pipelining: bool, chunking: bool) -> None:
        self.script = script
        self.ehlo = CAPS + (b"250-PIPELINING\r\n" if pipelining else b"")
        self.ehlo += (b"250-CHUNKING\r\n" if chunking else b"") + b"250 8BITMIME\r\n"
        self.to_the_dot: list[bytes] = []
        self.closed = False

    def reply(self, kind: str | None) -> bytes:
        if self.closed or kind is None:
            return CLOSE  # a client reading with nothing asked finds the end
        scripted = self.script.get(kind)
        answer = (
            scripted.pop(0) if scripted else self.ehlo if kind in ("ehlo", "lhlo") else NORMAL[kind]
        )
        if kind == "message":
            self.to_the_dot.append(answer)
        self.closed = answer == CLOSE
        return answer


def run_session(
    session: Session, rcpts: list[str], message: PreparedMessage, server: Server
) -> dict[str, RecipientResult]:
    """A whole session's steps, each reply sent back and each SMTPError met while reading
    thrown in at the step (as the drivers do); then, as the fan-out does, the recipients
    left without a result by a session that failed get theirs from ``cut_short``."""
    results: dict[str, RecipientResult] = {}
    steps = session.one_shot(
        "a@example.com", rcpts, message, results, started=0.0, clock=lambda: 0.0
    )
    try:
        drive(session, steps, server)
    except SMTPError as exc:
        missing = [r for r in rcpts if r not in results]
        for result in session.cut_short(missing, exc, 0.0):
            results[result.recipient] = result
    return results


scripts = st.fixed_dictionaries(
    {kind: st.lists(st.sampled_from(answers), max_size=3) for kind, answers in ANSWERS.items()}
)


@settings(max_examples=400, deadline=None)
@given(
    script=scripts,
    count=st.integers(min_value=1, max_value=4),
    pipelining=st.booleans(),
    chunking=st.booleans(),
    large=st.booleans(),
    lmtp=st.booleans(),
    auth=st.booleans(),
)
def test_every_recipient_gets_one_result_whatever_the_server_answers(
    script: dict[str, list[bytes]],
    count: int,
    pipelining: bool,
    chunking: bool,
    large: bool,
    lmtp: bool,
    auth: bool,
) -> None:
    if lmtp:
        script["lhlo"] = script.pop("ehlo")
    # AUTH over plaintext, allowed here: the exchange is the point, not the channel
    endpoint = Endpoint(
        host="mx.example.org",
        port=25,
        helo="client.example.com",
        tls="none",
        lmtp=lmtp,
        username="u" if auth else None,
        password="p" if auth else None,
        allow_plaintext_auth=auth,
    )
    session = Session(endpoint, Timeouts())
    rcpts = [f"user{i}@example.org" for i in range(count)]
    server = Server(script, pipelining=pipelining, chunking=chunking)
    results = run_session(session, rcpts, LARGE if large else SMALL, server)
    assert sorted(results) == rcpts
    for rcpt, result in results.items():
        assert result.recipient == rcpt
        assert result.status in ("delivered", "transient", "permanent", "unknown")
        if result.status == "delivered":
            # only a success reply to the end of data delivers (a 221 there does not)
            assert any(answer.startswith(b"250 ") for answer in server.to_the_dot), result
            assert result.stage == "message" and result.code == 250
