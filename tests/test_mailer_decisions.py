"""The Mailer's decisions, taken without sockets: what a resumed run does with each job
(:mod:`asmtp._delivery.resume`), what each recipient's copy and envelope look like
(:mod:`asmtp._delivery.personalise`), and when a pooled send is tried again on a new
session (:func:`asmtp._delivery.pool.worth_a_fresh_session`). Real values in, the
decision out; the Mailer's own tests (test_mailer.py) drive the same rules over SMTP.
"""

from __future__ import annotations

import re
from email.message import EmailMessage

import pytest

from asmtp._core.dkim import DKIM
from asmtp._core.message import build_message
from asmtp._core.prepared import PreparedMessage, prepare_message
from asmtp._delivery.journal_format import JournalEntry, JournalIdentity, message_digest
from asmtp._delivery.personalise import (
    Personaliser,
    check_personalisation,
    check_template,
    envelope_sender,
    has_field,
    unsubscribe_headers,
    verp_sender,
    verp_token,
)
from asmtp._delivery.pool import worth_a_fresh_session
from asmtp._delivery.resume import identity_of, resume_action, unknown_from_earlier_run
from asmtp.errors import InputError
from asmtp.results import RecipientResult, Status

# -- resume: what the journal's last line about a key means for its job -------------

DOT = JournalEntry("dot", None)


def result_line(status: str, host: str | None = None) -> JournalEntry:
    return JournalEntry("result", status, host)


def test_a_recipient_the_journal_does_not_know_is_sent() -> None:
    assert resume_action(None, retry_unknown=False) == "send"


@pytest.mark.parametrize("status", ["delivered", "permanent"])
def test_a_recipient_done_in_an_earlier_run_is_skipped(status: str) -> None:
    assert resume_action(result_line(status), retry_unknown=False) == "skip"
    assert resume_action(result_line(status), retry_unknown=True) == "skip"


def test_a_recipient_whose_dot_was_recorded_is_reported_unknown_not_sent() -> None:
    assert resume_action(DOT, retry_unknown=False) == "unknown"


def test_a_recipient_recorded_unknown_stays_unknown() -> None:
    assert resume_action(result_line("unknown", "mx.example.org"), retry_unknown=False) == (
        "unknown"
    )


def test_retry_unknown_sends_a_recipient_whose_dot_was_recorded_again() -> None:
    assert resume_action(DOT, retry_unknown=True) == "send"
    assert resume_action(result_line("unknown"), retry_unknown=True) == "send"


def test_a_recipient_that_failed_transiently_is_sent_again() -> None:
    assert resume_action(result_line("transient"), retry_unknown=False) == "send"


def test_the_unknown_result_names_the_host_and_the_job() -> None:
    result = unknown_from_earlier_run(
        "ann@example.org", result_line("unknown", "mx.example.org"), key=("row", 7)
    )
    assert (result.recipient, result.status, result.stage) == (
        "ann@example.org",
        "unknown",
        "message",
    )
    assert result.host == "mx.example.org"
    assert result.key == ("row", 7)
    assert result.message.startswith("the end-of-data dot was sent in an earlier run")


def test_after_a_bare_dot_line_the_host_is_not_known() -> None:
    assert unknown_from_earlier_run("ann@example.org", DOT, key=None).host is None


# -- resume: which run a job says the journal belongs to -----------------------------


def newsletter(to: str, message_id: str) -> EmailMessage:
    return build_message(
        to=to,
        from_="News <news@example.com>",
        subject="Spring sale",
        body="Everything must go.\n",
        message_id=message_id,
    )


def test_a_jobs_identity_is_its_messages_sender_and_digest() -> None:
    message = newsletter("ann@example.org", "<1@example.com>")
    identity = identity_of(message, None)
    assert identity.sender == "news@example.com"
    assert identity.message == message_digest(prepare_message(message).data, prepared=True)
    assert identity.campaign is None


def test_copies_for_other_recipients_are_the_same_run() -> None:
    ann = identity_of(newsletter("ann@example.org", "<1@example.com>"), None)
    bob = identity_of(newsletter("bob@example.org", "<2@example.com>"), None)
    assert ann == bob
    assert not ann.differences(bob)


def test_the_jobs_own_sender_names_the_run() -> None:
    identity = identity_of(newsletter("ann@example.org", "<1@example.com>"), "bounces@example.com")
    assert identity.sender == "bounces@example.com"


def test_a_rendered_message_is_rendered_for_its_identity() -> None:
    identity = identity_of(lambda: newsletter("ann@example.org", "<1@example.com>"), None)
    assert identity == identity_of(newsletter("bob@example.org", "<3@example.com>"), None)


def test_ready_bytes_and_prepared_messages_have_the_same_digest() -> None:
    raw = b"From: news@example.com\r\nSubject: hi\r\n\r\nHello\r\n"
    from_bytes = identity_of(raw, "news@example.com")
    from_prepared = identity_of(prepare_message(raw), "news@example.com")
    assert from_bytes == from_prepared == JournalIdentity("news@example.com", message_digest(raw))


def test_a_message_that_cannot_render_leaves_its_digest_unknown() -> None:
    def broken() -> bytes:
        raise ValueError("no such column: name")

    assert identity_of(broken, "news@example.com") == JournalIdentity("news@example.com", None)


# -- personalisation: the templates -------------------------------------------------


def test_a_template_may_use_its_fields() -> None:
    check_template(
        "unsubscribe", "https://example.com/u?r={recipient}&t={token}", {"recipient", "token"}
    )


def test_a_template_with_another_field_is_refused() -> None:
    with pytest.raises(InputError, match=r"may only use \{recipient\}, \{token\}"):
        check_template("unsubscribe", "https://example.com/u/{name}", {"recipient", "token"})


def test_a_template_that_does_not_parse_is_refused() -> None:
    with pytest.raises(InputError, match="expected '}' before end of string"):
        check_template("verp", "bounces+{token@example.com", {"token"})


def test_a_verp_template_without_the_token_is_refused() -> None:
    with pytest.raises(InputError, match=r"verp must contain \{token\}"):
        check_personalisation(None, "bounces@example.com")


def test_a_verp_template_naming_the_recipient_is_refused() -> None:
    with pytest.raises(InputError, match=r"verp template .* may only use \{token\}"):
        check_personalisation(None, "bounces+{recipient}@example.com")


def test_no_templates_need_no_checks() -> None:
    check_personalisation(None, None)
    check_personalisation("mailto:unsubscribe@example.com?subject={token}", "b+{token}@example.com")


# -- personalisation: VERP and one-click unsubscribe --------------------------------


def test_a_verp_token_is_the_recipient_as_local_equals_domain() -> None:
    assert verp_token("ann@example.org") == "ann=example.org"
    assert verp_token('"a@b"@example.org') == '"a@b"=example.org'


def test_a_verp_sender_encodes_the_recipient() -> None:
    sender = verp_sender("bounces+{token}@example.com", "ann@example.org")
    assert sender == "bounces+ann=example.org@example.com"


def test_a_verp_sender_that_is_no_mailbox_is_refused() -> None:
    with pytest.raises(InputError, match="verp"):
        verp_sender("bounces {token}@example.com", "ann@example.org")


def test_unsubscribe_headers_quote_the_recipient_for_a_url() -> None:
    headers = unsubscribe_headers(
        "https://example.com/u?r={recipient}&t={token}", "ann+news@example.org"
    )
    assert headers == [
        (
            "List-Unsubscribe",
            "<https://example.com/u?r=ann%2Bnews@example.org&t=ann%2Bnews=example.org>",
        ),
        ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ]


def test_the_envelope_sender_is_the_sender_header_else_from() -> None:
    message = newsletter("ann@example.org", "<1@example.com>")
    assert envelope_sender(message) == "news@example.com"
    message["Sender"] = "list-owner@example.com"
    assert envelope_sender(message) == "list-owner@example.com"


# -- personalisation: each recipient's copy -----------------------------------------

MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)\r$", re.MULTILINE | re.IGNORECASE)


def message_ids(prepared: PreparedMessage) -> list[bytes]:
    return MESSAGE_ID.findall(prepared.data)


def plain() -> Personaliser:
    return Personaliser(unsubscribe=None, verp=None, dkim=None)


def test_jobs_that_share_a_message_share_one_serialization() -> None:
    message = newsletter("list@example.org", "<given@example.com>")
    personalise = plain()
    ann = personalise.prepare("ann@example.org", message, None)
    bob = personalise.prepare("bob@example.org", message, None)
    assert ann[:2] == ("news@example.com", "ann@example.org")
    assert bob[:2] == ("news@example.com", "bob@example.org")
    assert ann[2] is bob[2]
    assert message_ids(ann[2]) == [b"<given@example.com>"]


def test_a_prepared_message_is_sent_as_it_is() -> None:
    prepared = prepare_message(b"From: news@example.com\r\n\r\nHi\r\n")
    assert plain().prepare("ann@example.org", prepared, "news@example.com")[2] is prepared


def test_the_recipient_and_sender_are_checked() -> None:
    message = newsletter("list@example.org", "<given@example.com>")
    with pytest.raises(InputError, match="recipient"):
        plain().prepare("ann@@example.org", message, None)
    with pytest.raises(InputError, match="sender"):
        plain().prepare("ann@example.org", message, "news@@example.com")


def test_the_null_sender_is_allowed() -> None:
    message = newsletter("list@example.org", "<given@example.com>")
    assert plain().prepare("ann@example.org", message, "")[0] == ""


def test_bytes_without_the_jobs_sender_are_refused() -> None:
    with pytest.raises(InputError, match="needs the job's sender"):
        plain().prepare("ann@example.org", b"From: news@example.com\r\n\r\nHi\r\n", None)


def test_a_verp_copy_is_sent_from_an_address_naming_its_recipient() -> None:
    message = newsletter("list@example.org", "<given@example.com>")
    personalise = Personaliser(unsubscribe=None, verp="bounces+{token}@example.com", dkim=None)
    sender, recipient, _ = personalise.prepare("ann@example.org", message, None)
    assert (sender, recipient) == ("bounces+ann=example.org@example.com", "ann@example.org")


def test_each_personalised_copy_gets_its_own_message_id_on_the_messages_domain() -> None:
    message = newsletter("list@example.org", "<given@example.net>")
    personalise = Personaliser(unsubscribe=None, verp="b+{token}@example.com", dkim=None)
    ann = personalise.prepare("ann@example.org", message, None)[2]
    bob = personalise.prepare("bob@example.org", message, None)[2]
    [ann_id], [bob_id] = message_ids(ann), message_ids(bob)
    assert ann_id != bob_id
    assert ann_id.endswith(b"@example.net>") and bob_id.endswith(b"@example.net>")
    assert message["Message-ID"] == "<given@example.net>"  # the caller's message unchanged


def test_a_copy_of_a_message_without_an_id_gets_one_on_the_senders_domain() -> None:
    raw = b"From: news@example.com\r\nSubject: hi\r\n\r\nHello\r\n"
    personalise = Personaliser(unsubscribe=None, verp="b+{token}@example.com", dkim=None)
    [msgid] = message_ids(personalise.prepare("ann@example.org", raw, "news@example.com")[2])
    assert msgid.endswith(b"@example.com>")


def test_a_message_rendered_per_job_keeps_its_own_message_id() -> None:
    personalise = Personaliser(unsubscribe=None, verp="b+{token}@example.com", dkim=None)
    _, _, prepared = personalise.prepare(
        "ann@example.org", lambda: newsletter("ann@example.org", "<mine.1@example.com>"), None
    )
    assert message_ids(prepared) == [b"<mine.1@example.com>"]


def test_an_unsubscribe_copy_carries_its_recipients_one_click_link() -> None:
    message = newsletter("list@example.org", "<given@example.com>")
    personalise = Personaliser(unsubscribe="https://example.com/u/{token}", verp=None, dkim=None)
    sender, _, prepared = personalise.prepare("ann@example.org", message, None)
    assert sender == "news@example.com"  # no VERP: the message's own
    head = prepared.data.split(b"\r\n\r\n", 1)[0]
    assert b"List-Unsubscribe: <https://example.com/u/ann=example.org>\r\n" in head
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in head
    assert len(message_ids(prepared)) == 1


def test_a_shared_message_is_signed_once_for_all_its_recipients() -> None:
    signer, _ = DKIM.generate("example.com", "sel", "ed25519")
    message = newsletter("list@example.org", "<given@example.com>")
    personalise = Personaliser(unsubscribe=None, verp=None, dkim=signer)
    ann = personalise.prepare("ann@example.org", message, None)[2]
    bob = personalise.prepare("bob@example.org", message, None)[2]
    assert ann is bob
    assert ann.data.startswith(b"DKIM-Signature: ")


def test_each_personalised_copy_is_signed_over_its_own_headers() -> None:
    signer, _ = DKIM.generate("example.com", "sel", "ed25519")
    message = newsletter("list@example.org", "<given@example.com>")
    personalise = Personaliser(
        unsubscribe="https://example.com/u/{token}", verp="b+{token}@example.com", dkim=signer
    )
    ann = personalise.prepare("ann@example.org", message, None)[2]
    bob = personalise.prepare("bob@example.org", message, None)[2]
    assert ann.data.startswith(b"DKIM-Signature: ") and bob.data.startswith(b"DKIM-Signature: ")
    ann_signature = ann.data.split(b"\r\nMessage-ID:", 1)[0]
    bob_signature = bob.data.split(b"\r\nMessage-ID:", 1)[0]
    assert ann_signature != bob_signature


# -- the pooled attempt: when a send is tried again on a new session ----------------


def outcome(status: Status) -> RecipientResult:
    return RecipientResult("ann@example.org", status, code=None, stage="mail")


def test_a_reused_session_closed_by_the_server_is_replaced_once() -> None:
    dropped = outcome("transient")
    assert worth_a_fresh_session(dropped, still_open=False, reused=True, fresh=False)
    assert not worth_a_fresh_session(dropped, still_open=False, reused=True, fresh=True)


def test_a_new_session_that_fails_is_not_replaced() -> None:
    assert not worth_a_fresh_session(
        outcome("transient"), still_open=False, reused=False, fresh=False
    )


def test_a_transient_refusal_on_an_open_session_is_the_result() -> None:
    refused = RecipientResult("ann@example.org", "transient", code=451, stage="rcpt")
    assert not worth_a_fresh_session(refused, still_open=True, reused=True, fresh=False)


@pytest.mark.parametrize("status", ["delivered", "permanent", "unknown"])
def test_only_a_transient_failure_is_tried_again(status: Status) -> None:
    # an unknown one may have arrived: never sent twice
    assert not worth_a_fresh_session(outcome(status), still_open=False, reused=True, fresh=False)


def test_a_message_with_its_own_list_unsubscribe_is_refused_by_an_unsubscribe_mailer() -> None:
    """Mailer(unsubscribe=...) adds List-Unsubscribe per recipient; a message that has
    one already (build_message(list_headers=...)) would carry two: refused, not sent."""
    message = build_message(
        to="ann@example.org",
        from_="news@example.com",
        subject="s",
        body="b",
        list_headers={"List-Unsubscribe": "https://example.com/u"},
    )
    personaliser = Personaliser(unsubscribe="https://example.com/u/{token}", verp=None, dkim=None)
    with pytest.raises(InputError, match="List-Unsubscribe field of its own"):
        personaliser.prepare("ann@example.org", message, None)
    plain = Personaliser(unsubscribe=None, verp=None, dkim=None)
    _, _, prepared = plain.prepare("ann@example.org", message, None)
    assert has_field(prepared, b"list-unsubscribe")
    assert not has_field(prepared, b"list-unsubscribe-post")
