"""The sans-IO core, driven by scripted bytes: what the client writes for each step and
what it makes of each reply. No sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asmtp._core import reply as reply_module
from asmtp._core.capabilities import Capabilities
from asmtp._core.protocol import ClientProtocol, State
from asmtp._core.reply import NEED_DATA, Reply, ReplyParser, take_known_lines
from asmtp.errors import ConnectionLostError, LocalProtocolError, RemoteProtocolError

EHLO_REPLY = (
    b"250-mx.example.org Hello client.example.com\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10240000\r\n"
    b"250-STARTTLS\r\n"
    b"250-AUTH PLAIN LOGIN\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250 SMTPUTF8\r\n"
)


def reply(proto: ClientProtocol, data: bytes) -> Reply:
    proto.receive_data(data)
    r = proto.next_reply()
    assert isinstance(r, Reply)
    return r


def codes_read(proto: ClientProtocol) -> list[int]:
    """The codes of every whole reply buffered, read one after the other."""
    codes = []
    while (r := proto.next_reply()) is not NEED_DATA:
        assert isinstance(r, Reply)
        codes.append(r.code)
    return codes


def greeted(ehlo: bytes = EHLO_REPLY) -> ClientProtocol:
    proto = ClientProtocol()
    assert reply(proto, b"220 mx.example.org ESMTP ready\r\n").code == 220
    assert proto.ehlo("client.example.com") == b"EHLO client.example.com\r\n"
    assert reply(proto, ehlo).code == 250
    assert proto.state is State.READY
    return proto


# -- replies --------------------------------------------------------------------


def test_multiline_reply_split_across_reads() -> None:
    p = ReplyParser()
    for chunk in (b"250-mx.exa", b"mple.org\r\n250-PIPE", b"LINING\r", b"\n250 SIZE 1000\r\n"):
        assert p.next_reply() is NEED_DATA
        p.feed(chunk)
    r = p.next_reply()
    assert r == Reply(250, ("mx.example.org", "PIPELINING", "SIZE 1000"))
    assert p.next_reply() is NEED_DATA


def test_two_replies_in_one_read_come_out_one_at_a_time() -> None:
    p = ReplyParser()
    p.feed(b"250 2.1.0 Ok\r\n550 5.1.1 <x@example.org>: no such user\r\n")
    first, second = p.next_reply(), p.next_reply()
    assert isinstance(first, Reply) and isinstance(second, Reply)
    assert (first.code, first.enhanced_status) == (250, "2.1.0")
    assert (second.code, second.enhanced_status) == (550, "5.1.1")
    assert second.message == "<x@example.org>: no such user"


def test_enhanced_status_must_agree_with_the_code() -> None:
    assert Reply(250, ("5.1.1 odd",)).enhanced_status is None
    assert Reply(451, ("4.7.1 greylisted",)).enhanced_status == "4.7.1"
    assert Reply(220, ("mx.example.org",)).enhanced_status is None


def test_bare_code_line_is_a_whole_reply() -> None:
    p = ReplyParser()
    p.feed(b"250\r\n")
    assert p.next_reply() == Reply(250, ("",))


@pytest.mark.parametrize(
    "data",
    [
        b"hello world\r\n",
        b"25\r\n",
        b"2500 too long a code\r\n",
        b"250_wrong separator\r\n",
        b"999 out of range\r\n",
        b"150 preliminary is not SMTP\r\n",
    ],
)
def test_malformed_replies_are_remote_protocol_errors(data: bytes) -> None:
    p = ReplyParser()
    p.feed(data)
    with pytest.raises(RemoteProtocolError):
        p.next_reply()


def test_multiline_codes_must_agree() -> None:
    p = ReplyParser()
    p.feed(b"250-first\r\n550 second\r\n")
    with pytest.raises(RemoteProtocolError, match="disagree"):
        p.next_reply()


def test_oversized_line_is_refused_without_waiting_for_its_end() -> None:
    p = ReplyParser(max_line=1000)
    p.feed(b"250-" + b"x" * 2000)
    with pytest.raises(RemoteProtocolError, match="longer than 1000"):
        p.next_reply()


def test_too_many_lines_is_refused() -> None:
    p = ReplyParser(max_lines=10)
    p.feed(b"250-x\r\n" * 11)
    with pytest.raises(RemoteProtocolError, match="10 lines"):
        p.next_reply()


def test_a_multiline_reply_fed_one_byte_at_a_time() -> None:
    p = ReplyParser()
    data = EHLO_REPLY + b"250 2.1.0 Ok\r\n"
    replies = []
    for i in range(len(data)):
        p.feed(data[i : i + 1])
        while (r := p.next_reply()) is not NEED_DATA:
            replies.append(r)
    whole = ReplyParser()
    whole.feed(data)
    assert replies == [whole.next_reply(), whole.next_reply()]
    assert [r.code for r in replies] == [250, 250] and len(replies[0].lines) > 3


def test_a_complete_continuation_line_too_long_is_refused() -> None:
    p = ReplyParser(max_line=100)
    p.feed(b"250-mx\r\n250-" + b"x" * 200 + b"\r\n250 OK\r\n")
    with pytest.raises(RemoteProtocolError, match="longer than 100"):
        p.next_reply()


def test_lines_up_to_the_limit_and_bare_lf_endings_are_accepted() -> None:
    p = ReplyParser(max_line=100)
    longest = b"250-" + b"y" * 96  # 100 octets before the newline
    p.feed(longest + b"\n250-SIZE 10\n250 OK\n")
    r = p.next_reply()
    assert isinstance(r, Reply)
    assert r.lines == ("y" * 96, "SIZE 10", "OK")


def test_capabilities_from_a_real_ehlo_reply() -> None:
    p = ReplyParser()
    p.feed(EHLO_REPLY + b"")
    r = p.next_reply()
    assert isinstance(r, Reply)
    caps = Capabilities.from_ehlo(r)
    assert caps.pipelining and caps.starttls and caps.eight_bit_mime and caps.smtputf8
    assert caps.size == 10240000
    assert caps.auth == ("PLAIN", "LOGIN")
    assert not caps.dsn


def test_capabilities_merge_old_auth_equals_form() -> None:
    caps = Capabilities.from_ehlo(Reply(250, ("mx", "AUTH=LOGIN", "AUTH PLAIN LOGIN", "SIZE")))
    assert caps.auth == ("LOGIN", "PLAIN")
    assert caps.size is None  # SIZE without a number: no fixed limit


# -- the session --------------------------------------------------------------------


def test_greeting_ehlo_and_one_pipelined_transaction() -> None:
    proto = greeted()
    out = proto.mail("a@example.com", ["SIZE=100"])
    out += proto.rcpt("b@example.org") + proto.rcpt("c@example.org") + proto.data()
    assert out == (
        b"MAIL FROM:<a@example.com> SIZE=100\r\n"
        b"RCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n"
    )
    proto.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n")
    proto.receive_data(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    assert codes_read(proto) == [250, 250, 550, 354]
    assert proto.state is State.DATA
    assert proto.message(b"Subject: hi\r\n\r\n..dot\r\n.\r\n").endswith(b"\r\n.\r\n")
    assert reply(proto, b"250 2.0.0 Ok: queued as 1234\r\n").code == 250
    assert proto.state is State.READY
    assert proto.quit() == b"QUIT\r\n"
    assert reply(proto, b"221 2.0.0 Bye\r\n").code == 221
    assert proto.state is State.CLOSED


def test_envelope_is_mail_rcpts_and_data_in_one_piece() -> None:
    lines: list[str] = []
    one_by_one = greeted()
    out = one_by_one.mail("a@example.com", ["SIZE=100"])
    out += one_by_one.rcpt("b@example.org", ["NOTIFY=NEVER"]) + one_by_one.rcpt("c@example.org")
    out += one_by_one.data()
    at_once = greeted()
    at_once.trace = lines.append
    assert (
        at_once.envelope(
            "a@example.com",
            ["b@example.org", "c@example.org"],
            ["SIZE=100"],
            [["NOTIFY=NEVER"], []],
        )
        == out
    )
    assert lines == [
        "> MAIL FROM:<a@example.com> SIZE=100",
        "> RCPT TO:<b@example.org> NOTIFY=NEVER",
        "> RCPT TO:<c@example.org>",
        "> DATA",
    ]
    # the same replies take both to the same place
    for proto in (one_by_one, at_once):
        proto.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
        assert codes_read(proto) == [250, 250, 550, 354]
        assert proto.state is State.DATA


@pytest.mark.parametrize(
    ("sender", "recipients", "rcpt_params", "named"),
    [
        ("a@example.com\r\nRSET", ["b@example.org"], None, "MAIL"),
        ("a@example.com", ["b@example.org", "c\0@example.org"], None, "RCPT"),
        ("a@example.com", ["b@example.org"], [["NOTIFY=NEVER\nQUIT"]], "RCPT"),
        # a lone CR or LF (the group's own line breaks are CR LF pairs: counted apart)
        ("a\n@example.com", ["b@example.org"], None, "MAIL"),
        ("a@example.com", ["b@example.org", "c\r@example.org"], None, "RCPT"),
        ("a@example.com", ["b@example.org\r", "\nc@example.org"], None, "RCPT"),
    ],
)
def test_envelope_refuses_cr_lf_nul_and_sends_nothing(
    sender: str, recipients: list[str], rcpt_params: list[list[str]] | None, named: str
) -> None:
    proto = greeted()
    with pytest.raises(LocalProtocolError, match=f"{named} argument holds"):
        proto.envelope(sender, recipients, (), rcpt_params)
    assert proto.awaiting is None  # nothing was counted as sent: a clean transaction may follow
    assert proto.envelope("a@example.com", ["b@example.org"]).startswith(b"MAIL FROM:")


@pytest.mark.parametrize("param", ["BODY=8BITMIME\r", "SIZE=1\nRSET", "RET=HDRS\0"])
def test_envelope_refuses_a_mail_parameter_with_cr_lf_nul(param: str) -> None:
    proto = greeted()
    with pytest.raises(LocalProtocolError, match="MAIL argument holds"):
        proto.envelope("a@example.com", ["b@example.org"], [param])
    assert proto.awaiting is None


@pytest.mark.parametrize("name", ["client.example.com\r\nQUIT", "client\n", "cli\0ent"])
def test_ehlo_refuses_a_name_with_cr_lf_nul(name: str) -> None:
    proto = ClientProtocol()
    assert reply(proto, b"220 mx.example.org ESMTP ready\r\n").code == 220
    with pytest.raises(LocalProtocolError, match="EHLO argument holds"):
        proto.ehlo(name)
    assert proto.ehlo("client.example.com") == b"EHLO client.example.com\r\n"


def test_envelope_keeps_the_rules_of_its_commands() -> None:
    with pytest.raises(LocalProtocolError, match="without PIPELINING"):
        greeted(b"250-mx.example.org\r\n250 SIZE 1000\r\n").envelope("a@x.org", ["b@x.org"])
    proto = greeted()
    with pytest.raises(LocalProtocolError, match="DATA without MAIL and RCPT"):
        proto.envelope("a@example.com", [])
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        proto.envelope("a@example.com", ["jöran@example.org"])
    assert proto.awaiting is None
    proto.envelope("a@example.com", ["jöran@example.org"], ["SMTPUTF8"], smtputf8=True)
    with pytest.raises(LocalProtocolError, match="cannot send MAIL while awaiting"):
        proto.envelope("a@example.com", ["b@example.org"])  # DATA ended the group


def test_a_reply_of_many_lines_known_whole_still_meets_each_parsers_limits() -> None:
    # A parser with the default limits parses (and remembers) an EHLO reply; a stricter
    # parser fed the same octets still refuses them.
    for _ in range(2):
        first = ReplyParser()
        first.feed(EHLO_REPLY)
        assert first.next_reply().lines[-1] == "SMTPUTF8"  # type: ignore[union-attr]
    few_lines = ReplyParser(max_lines=3)
    few_lines.feed(EHLO_REPLY)
    with pytest.raises(RemoteProtocolError, match="3 lines"):
        few_lines.next_reply()
    short_lines = ReplyParser(max_line=30)
    short_lines.feed(EHLO_REPLY)
    with pytest.raises(RemoteProtocolError, match="longer than 30"):
        short_lines.next_reply()
    # and a known reply followed by more is taken one reply at a time
    more = ReplyParser()
    more.feed(EHLO_REPLY + b"250 2.1.0 Ok\r\n")
    assert [more.next_reply(), more.next_reply(), more.next_reply()][1:] == [
        Reply(250, ("2.1.0 Ok",)),
        NEED_DATA,
    ]


def test_no_pipelining_means_one_command_at_a_time() -> None:
    proto = greeted(b"250-mx.example.org\r\n250 SIZE 1000\r\n")
    proto.mail("a@example.com")
    with pytest.raises(LocalProtocolError, match="awaiting the mail reply"):
        proto.rcpt("b@example.org")


def test_commands_out_of_order_are_local_protocol_errors() -> None:
    proto = ClientProtocol()
    with pytest.raises(LocalProtocolError, match="state greeting"):
        proto.ehlo("client.example.com")
    proto = greeted()
    with pytest.raises(LocalProtocolError, match="RCPT without MAIL"):
        proto.rcpt("b@example.org")
    with pytest.raises(LocalProtocolError, match="DATA without"):
        proto.data()
    with pytest.raises(LocalProtocolError, match="message content"):
        proto.message(b"x\r\n.\r\n")


def test_ehlo_refused_then_helo() -> None:
    proto = ClientProtocol()
    reply(proto, b"220 old.example.org SMTP\r\n")
    proto.ehlo("client.example.com")
    assert reply(proto, b"502 5.5.2 command not recognized\r\n").code == 502
    assert proto.state is State.CONNECTED
    assert proto.helo("client.example.com") == b"HELO client.example.com\r\n"
    assert reply(proto, b"250 old.example.org\r\n").code == 250
    assert proto.state is State.READY
    assert not proto.capabilities.esmtp and not proto.capabilities.pipelining


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data", "message"])
def test_421_at_any_step_closes_the_session(stage: str) -> None:
    proto = ClientProtocol()
    if stage == "greeting":
        r = reply(proto, b"421 4.3.2 shutting down\r\n")
        assert r.code == 421 and proto.state is State.CLOSED
        return
    reply(proto, b"220 mx ESMTP\r\n")
    proto.ehlo("c.example")
    if stage == "ehlo":
        assert reply(proto, b"421 4.3.2 bye\r\n").code == 421
        assert proto.state is State.CLOSED
        return
    reply(proto, b"250-mx\r\n250 PIPELINING\r\n")
    proto.mail("a@example.com")
    answers = {"mail": b"421 4.3.2 bye\r\n"}
    if stage in ("rcpt", "data", "message"):
        proto.rcpt("b@example.org")
        answers = {"mail": b"250 ok\r\n", "rcpt": b"421 4.3.2 bye\r\n"}
    if stage in ("data", "message"):
        proto.data()
        answers = {"mail": b"250 ok\r\n", "rcpt": b"250 ok\r\n", "data": b"421 4.3.2 bye\r\n"}
    if stage == "message":
        answers["data"] = b"354 go\r\n"
    for data in answers.values():
        reply(proto, data)
    if stage == "message":
        proto.message(b"x\r\n.\r\n")
        assert reply(proto, b"421 4.3.2 bye\r\n").code == 421
    assert proto.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        proto.mail("a@example.com")


@pytest.mark.parametrize(
    ("stage", "code"),
    [("mail", 451), ("mail", 550), ("rcpt", 450), ("rcpt", 550), ("data", 451), ("data", 554)],
)
def test_4xx_and_5xx_in_a_transaction_leave_the_session_usable(stage: str, code: int) -> None:
    proto = greeted(b"250-mx\r\n250 PIPELINING\r\n")
    proto.mail("a@example.com")
    proto.rcpt("b@example.org")
    proto.data()
    script = {"mail": b"250 ok\r\n", "rcpt": b"250 ok\r\n", "data": b"354 go\r\n"}
    script[stage] = f"{code} {code // 100}.0.0 not now\r\n".encode()
    if stage == "mail":  # a refused MAIL makes the pipelined RCPT and DATA out of sequence
        script["rcpt"] = script["data"] = b"503 5.5.1 need MAIL first\r\n"
    got = [reply(proto, data) for data in script.values()]
    assert [r.code for r in got] == [int(d[:3]) for d in script.values()]
    if stage == "rcpt":
        assert proto.state is State.DATA  # the 354 still came: an empty message follows
        proto.message(b"\r\n.\r\n")
        reply(proto, b"554 no valid recipients\r\n")
    assert proto.state is State.READY
    proto.rset()
    assert reply(proto, b"250 ok\r\n").code == 250
    assert proto.mail("a@example.com") == b"MAIL FROM:<a@example.com>\r\n"


def test_final_reply_to_the_message() -> None:
    proto = greeted(b"250-mx\r\n250 PIPELINING\r\n")
    for data in (proto.mail("a@x.example"), proto.rcpt("b@y.example"), proto.data()):
        assert data.endswith(b"\r\n")
    for answer in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        reply(proto, answer)
    proto.message(b"body\r\n.\r\n")
    r = reply(proto, b"552 5.3.4 message too big\r\n")
    assert (r.code, r.enhanced_status) == (552, "5.3.4")
    assert proto.state is State.READY


def seen(known: bool, *lines: bytes) -> None:
    """Make each of ``lines`` a reply seen before (``known``) or never seen: a read of
    replies all seen before is taken in one go (take_known_lines), any other line by
    line; both must come to the same."""
    reply_module.KNOWN.clear()
    parser = ReplyParser()
    for line in lines if known else ():
        parser.feed(line)
        assert isinstance(parser.next_reply(), Reply)


GROUP = (b"250 2.1.0 Ok\r\n", b"250 2.1.5 Ok\r\n", b"550 5.1.1 no\r\n", b"354 go\r\n")


@pytest.mark.parametrize("known", [True, False])
def test_a_pipelined_groups_replies_read_at_once(known: bool) -> None:
    seen(known, *GROUP)
    proto = greeted()
    proto.envelope("a@example.com", ["b@example.org", "c@example.org"])
    proto.receive_data(b"".join(GROUP))
    first = proto.next_reply()
    assert isinstance(first, Reply) and first.code == 250
    assert not proto.inbox if known else proto.inbox  # taken at once only when all known
    assert proto.state is State.MAIL and proto.awaiting == "rcpt"
    assert codes_read(proto) == [250, 550, 354]
    assert proto.state is State.DATA


def test_only_whole_known_one_line_replies_are_taken_at_once() -> None:
    seen(True, *GROUP, b"250-mx\r\n250 SIZE 10\r\n")
    assert take_known_lines(bytearray(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")) is not None
    for read in (
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go",  # the last one not whole yet
        b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 never seen\r\n",  # one not seen before
        b"250-mx\r\n250 SIZE 10\r\n",  # a reply of several lines (the parser's)
        b"250 2.1.0 Ok\r\r\n",  # a lone CR: splitlines() breaks there, nothing matches
        b"250 2.1.0 Ok\r\n\r\n",  # an empty line after it
    ):
        buf = bytearray(read)
        assert take_known_lines(buf) is None and buf == read  # nothing taken
    buf = bytearray(b"250 2.1.0 Ok\r\n")
    assert take_known_lines(buf, max_line=10) is None  # this parser's limit is lower


@pytest.mark.parametrize("known", [True, False])
def test_a_reply_after_354_in_the_same_read_ends_the_session(known: bool) -> None:
    seen(known, *GROUP, b"250 2.0.0 queued\r\n")
    proto = greeted()
    proto.envelope("a@example.com", ["b@example.org", "c@example.org"])
    proto.receive_data(b"".join(GROUP) + b"250 2.0.0 queued\r\n")
    assert [proto.next_reply() for _ in range(3)]
    with pytest.raises(RemoteProtocolError, match="more after 354") as caught:
        proto.next_reply()
    assert caught.value.stage == "data" and proto.state is State.CLOSED


@pytest.mark.parametrize("known", [True, False])
def test_starttls_discards_what_came_before_the_handshake(known: bool) -> None:
    seen(known, b"220 2.0.0 go ahead\r\n", b"250 forged\r\n")
    proto = greeted()
    assert proto.starttls() == b"STARTTLS\r\n"
    # A man in the middle appends a forged reply after the 220 (RFC 3207 4.2).
    assert reply(proto, b"220 2.0.0 go ahead\r\n250 forged\r\n").code == 220
    assert proto.state is State.TLS_HANDSHAKE
    with pytest.raises(LocalProtocolError):
        proto.mail("a@example.com")
    proto.tls_started()
    assert proto.tls and proto.state is State.CONNECTED
    assert not proto.capabilities.starttls  # forgotten until EHLO again
    assert proto.next_reply() is NEED_DATA  # the forged reply is gone
    proto.ehlo("client.example.com")
    assert reply(proto, b"250-mx\r\n250 AUTH PLAIN\r\n").code == 250
    with pytest.raises(LocalProtocolError, match="already encrypted"):
        proto.starttls()


def test_auth_exchange_is_masked_in_the_transcript() -> None:
    lines: list[str] = []
    proto = ClientProtocol(trace=lines.append)
    reply(proto, b"220 mx ESMTP\r\n")
    proto.ehlo("c.example")
    reply(proto, b"250-mx\r\n250 AUTH LOGIN\r\n")
    assert proto.auth("LOGIN") == b"AUTH LOGIN\r\n"
    assert reply(proto, b"334 VXNlcm5hbWU6\r\n").code == 334
    assert proto.auth_response("dXNlcg==") == b"dXNlcg==\r\n"
    reply(proto, b"334 UGFzc3dvcmQ6\r\n")
    proto.auth_response("c2VjcmV0")
    assert reply(proto, b"235 2.7.0 ok\r\n").code == 235
    assert proto.authenticated and proto.state is State.READY
    transcript = "\n".join(lines)
    assert "dXNlcg==" not in transcript and "c2VjcmV0" not in transcript
    assert "> ****" in transcript and "> AUTH LOGIN" in transcript


def test_auth_initial_response_is_masked() -> None:
    lines: list[str] = []
    proto = ClientProtocol(trace=lines.append)
    reply(proto, b"220 mx\r\n")
    proto.ehlo("c.example")
    reply(proto, b"250-mx\r\n250 AUTH PLAIN\r\n")
    assert proto.auth("PLAIN", "AHVzZXIAc2VjcmV0") == b"AUTH PLAIN AHVzZXIAc2VjcmV0\r\n"
    r = reply(proto, b"535 5.7.8 authentication failed\r\n")
    assert r.code == 535 and not proto.authenticated
    assert not any("AHVzZXIAc2VjcmV0" in line for line in lines)


def test_message_content_shown_only_as_its_size() -> None:
    lines: list[str] = []
    proto = ClientProtocol(trace=lines.append)
    reply(proto, b"220 mx\r\n")
    proto.ehlo("c.example")
    reply(proto, b"250 mx\r\n")
    proto.mail("a@example.com")
    reply(proto, b"250 ok\r\n")
    proto.rcpt("b@example.org")
    reply(proto, b"250 ok\r\n")
    proto.data()
    reply(proto, b"354 go\r\n")
    proto.message(b"Subject: secret plans\r\n\r\nthe body\r\n.\r\n")
    assert not any("secret plans" in line for line in lines)
    assert "> [message: 35 octets]" in lines


@pytest.mark.parametrize("bad", ["a@example.com\r\nRCPT TO:<x@evil.example>", "a\0@x", "a\n@x"])
def test_cr_lf_nul_never_reach_the_wire(bad: str) -> None:
    proto = greeted()
    with pytest.raises(LocalProtocolError):
        proto.mail(bad)
    with pytest.raises(LocalProtocolError):
        proto.ehlo(bad)


def test_non_ascii_address_needs_smtputf8_transaction() -> None:
    proto = greeted()
    with pytest.raises(LocalProtocolError, match="SMTPUTF8"):
        proto.mail("jöran@example.com")
    assert proto.mail("jöran@example.com", ["SMTPUTF8"], smtputf8=True) == (
        "MAIL FROM:<jöran@example.com> SMTPUTF8\r\n".encode()
    )


def test_unexpected_reply_is_a_remote_protocol_error() -> None:
    proto = greeted()
    proto.receive_data(b"250 nobody asked\r\n")
    with pytest.raises(RemoteProtocolError, match="nothing asked"):
        proto.next_reply()


def test_end_of_stream_while_awaiting_a_reply() -> None:
    proto = greeted()
    proto.noop()
    proto.receive_data(b"250 partial")
    proto.receive_data(b"")
    with pytest.raises(ConnectionLostError) as info:
        proto.next_reply()
    assert info.value.stage == "noop"
    assert proto.state is State.CLOSED


def test_garbage_while_awaiting_a_reply_names_the_stage() -> None:
    proto = greeted()
    proto.mail("a@example.com")
    proto.receive_data(b"this is not smtp\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        proto.next_reply()
    assert info.value.stage == "mail"


def test_refused_greeting_allows_only_quit() -> None:
    proto = ClientProtocol()
    assert reply(proto, b"554 5.3.2 no service for you\r\n").code == 554
    assert proto.state is State.REFUSED
    with pytest.raises(LocalProtocolError):
        proto.ehlo("c.example")
    assert proto.quit() == b"QUIT\r\n"


def test_quit_rides_with_the_last_message_when_pipelining() -> None:
    proto = greeted(b"250-mx\r\n250 PIPELINING\r\n")
    proto.mail("a@example.com")
    proto.rcpt("b@example.org")
    proto.data()
    for answer in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        reply(proto, answer)
    # The content and QUIT as two pieces, written without a reply awaited in between.
    assert proto.message(b"hi\r\n.\r\n", then_quit=True) == (b"hi\r\n.\r\n", b"QUIT\r\n")
    proto.receive_data(b"250 2.0.0 queued\r\n221 2.0.0 bye\r\n")
    assert [proto.next_reply(), proto.next_reply()] == [
        Reply(250, ("2.0.0 queued",)),
        Reply(221, ("2.0.0 bye",)),
    ]
    assert proto.state is State.CLOSED


def test_quit_after_the_message_needs_pipelining() -> None:
    proto = greeted(b"250 mx\r\n")
    proto.mail("a@example.com")
    reply(proto, b"250 ok\r\n")
    proto.rcpt("b@example.org")
    reply(proto, b"250 ok\r\n")
    proto.data()
    reply(proto, b"354 go\r\n")
    with pytest.raises(LocalProtocolError, match="PIPELINING"):
        proto.message(b"hi\r\n.\r\n", then_quit=True)


# A read of replies taken at once (all seen before) or line by line (some never seen) must
# come to the same: the same replies in the same order, the same error at the same point.
PIECES = [
    b"250 2.1.0 Ok\r\n",
    b"250 2.1.5 Ok\r\n",
    b"550 5.1.1 no such user\r\n",
    b"354 go ahead\r\n",
    b"250 2.0.0 queued\r\n",
    b"221 2.0.0 Bye\r\n",
    b"421 4.3.2 closing\r\n",
    b"250 bare LF\n",
    b"250-a continuation\r\n",
    b"250 lone\rCR\r\n",
    b"garbage\r\n",
    b"999 out of range\r\n",
    b"\r\n",
    b"25",
]


def outcomes(read: bytes, known: bool) -> tuple[list[str], State]:
    seen(known, *(p for p in PIECES if p.endswith(b"\n") and p[3:4] == b" " and p[:1] != b"9"))
    proto = greeted()
    proto.envelope("a@example.com", ["b@example.org", "c@example.org"])
    proto.receive_data(read)
    got: list[str] = []
    for _ in range(10):
        try:
            r = proto.next_reply()
        except (RemoteProtocolError, ConnectionLostError) as exc:
            got.append(f"{type(exc).__name__}: {exc}")
            break
        if r is NEED_DATA:
            break
        assert isinstance(r, Reply)
        got.append(f"{r.code} {r.lines}")
    return got, proto.state


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES), min_size=1, max_size=6))
def test_a_read_taken_at_once_or_line_by_line_comes_to_the_same(pieces: list[bytes]) -> None:
    read = b"".join(pieces)
    assert outcomes(read, known=True) == outcomes(read, known=False)
