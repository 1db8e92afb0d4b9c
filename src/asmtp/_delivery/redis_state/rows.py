"""Results as the campaign's stream carries them: one JSON array of rows per journal
write, a row per result (:func:`result_row`, :func:`result_from_row`).

Owns that encoding. A row is a list, not an object: the names of the nine fields
every result has are not repeated in each, and a batch is encoded once, by the C
encoder, when its journal write goes out (no per-result JSON text). The fields a
delivery through a relay leaves at their defaults (earlier tries, retries, direct
delivery's site and TLS policy) follow in an object only when one is set.

>>> result_row(RecipientResult("a@x.test", "delivered", 250, "2.0.0", "ok", key="k1"))
['a@x.test', 'delivered', 250, '2.0.0', 'ok', 'message', None, 'none', 0.0, 'k1']
"""

from __future__ import annotations

from typing import Any

from ...results import Attempt, RecipientResult

__all__ = ["result_from_row", "result_row"]


def result_row(result: RecipientResult) -> list[Any]:
    """``result`` as a row (JSON values only; elapsed to the microsecond)."""
    row: list[Any] = [
        result.recipient,
        result.status,
        result.code,
        result.enhanced_status,
        result.message,
        result.stage,
        result.host,
        result.tls,
        round(result.elapsed, 6),
        result.key,
    ]
    if (
        result.tried
        or result.attempts != 1
        or result.site is not None
        or result.tls_policy is not None
    ):
        more: dict[str, Any] = {}
        if result.tried:
            more["tried"] = [[a.host, a.address, a.stage, a.code, a.message] for a in result.tried]
        if result.attempts != 1:
            more["attempts"] = result.attempts
        if result.site is not None:
            more["site"] = result.site
        if result.tls_policy is not None:
            more["tls_policy"] = result.tls_policy
        row.append(more)
    return row


def result_from_row(row: list[Any]) -> RecipientResult:
    """The result a row was made from (:func:`result_row`)."""
    recipient, status, code, enhanced, message, stage, host, tls, elapsed, key = row[:10]
    if len(row) == 10:
        return RecipientResult(
            recipient, status, code, enhanced, message, stage, host, tls, elapsed, key=key
        )
    more = row[10]
    return RecipientResult(
        recipient,
        status,
        code,
        enhanced,
        message,
        stage,
        host,
        tls,
        elapsed,
        key=key,
        tried=tuple(Attempt(*attempt) for attempt in more.get("tried", ())),
        attempts=more.get("attempts", 1),
        tls_policy=more.get("tls_policy"),
        site=more.get("site"),
    )
