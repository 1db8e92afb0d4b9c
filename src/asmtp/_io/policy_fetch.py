"""Fetching a domain's MTA-STS policy file over HTTPS (RFC 8461 section 3.3), with
httpx (the ``sts`` extra, imported on first use).

The fetch is bounded every way a hostile or broken server could stretch it: the
certificate is verified for ``mta-sts.<domain>``, redirects are refused (section 3.3
forbids following them), only a 200 with ``text/plain`` counts, the body is read up
to :data:`~asmtp._core.mtasts.POLICY_MAX_BYTES` and the whole fetch (connect, TLS,
headers, body) gets one deadline. The addresses of ``mta-sts.<domain>`` come from
asmtp's own resolver (the caller's), so the fetch asks the same DNS servers as the
delivery does; the TLS name checked is the policy host's, never the address.

Never raises for the network or the server: the outcome is a :class:`PolicyFetch`
carrying the text or the reason and RFC 8460's result type for the TLS report.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .._core.mtasts import POLICY_MAX_BYTES, policy_host
from ..config.checks import installed
from ..errors import InputError

__all__ = ["STS_EXTRA", "PolicyFetch", "fetch_policy", "httpx_installed", "require_httpx"]

STS_EXTRA = "pip install 'asmtp[sts]'"
_PATH = "/.well-known/mta-sts.txt"


def httpx_installed() -> bool:
    """Whether httpx (the ``sts`` extra) is there, without importing it."""
    return installed("httpx")


def require_httpx(what: str) -> None:
    """An :class:`~asmtp.errors.InputError` naming the extra when httpx is missing."""
    if not httpx_installed():
        raise InputError(f"{what} fetches MTA-STS policies with httpx: {STS_EXTRA}")


@dataclass(frozen=True, slots=True)
class PolicyFetch:
    """The outcome of one fetch: the policy file's ``text``, or ``failure`` (why) and
    ``result_type`` (RFC 8460 section 4.3: ``sts-webpki-invalid`` for a certificate
    that does not verify, ``sts-policy-fetch-error`` for anything else)."""

    text: str | None = None
    failure: str = ""
    result_type: str = ""


async def fetch_policy(
    domain: str,
    addresses: Sequence[str],
    *,
    ssl_context: ssl.SSLContext,
    timeout: float,
    port: int = 443,
    max_bytes: int = POLICY_MAX_BYTES,
) -> PolicyFetch:
    """GET ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` from each of
    ``addresses`` in turn until one answers; ``timeout`` bounds the whole fetch.
    ``port`` is for tests (a policy server on a loopback port)."""
    host = policy_host(domain)
    if not addresses:
        return _failed(f"{host} has no address")
    if not httpx_installed():
        return _failed(f"httpx is not installed ({STS_EXTRA})")
    import httpx

    last = _failed(f"{host}: no address answered")
    with anyio.move_on_after(timeout) as scope:
        async with httpx.AsyncClient(
            verify=ssl_context, follow_redirects=False, trust_env=False, timeout=timeout
        ) as client:
            for address in addresses:
                last = await _get(client, host, address, port, max_bytes)
                if last.text is not None or last.result_type == "sts-webpki-invalid":
                    break
    if scope.cancelled_caught:
        return _failed(f"{host}: no policy within {timeout:g} s")
    return last


async def _get(client: Any, host: str, address: str, port: int, max_bytes: int) -> PolicyFetch:
    import httpx

    literal = f"[{address}]" if ":" in address else address
    url = f"https://{literal}:{port}{_PATH}"
    headers = {"Host": host if port == 443 else f"{host}:{port}", "Accept": "text/plain"}
    shown = f"https://{host}{'' if port == 443 else f':{port}'}{_PATH}"
    try:
        async with client.stream(
            "GET", url, headers=headers, extensions={"sni_hostname": host}
        ) as response:
            if response.is_redirect:
                where = response.headers.get("location", "?")[:100]
                return _failed(f"{shown} redirects to {where!r} (refused, RFC 8461 3.3)")
            if response.status_code != 200:
                return _failed(f"{shown} answered HTTP {response.status_code}")
            kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "text/plain":
                return _failed(f"{shown} is {kind or 'untyped'}, not text/plain")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                return _failed(f"{shown} is {declared} octets (at most {max_bytes})")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > max_bytes:
                    return _failed(f"{shown} is over {max_bytes} octets")
    except httpx.HTTPError as exc:
        if _certificate_problem(exc):
            return PolicyFetch(
                failure=f"{shown}: certificate not valid for {host} ({_cause(exc)})",
                result_type="sts-webpki-invalid",
            )
        return _failed(f"{shown}: {_cause(exc)}")
    try:
        return PolicyFetch(text=body.decode("utf-8"))
    except UnicodeDecodeError:
        return _failed(f"{shown} is not UTF-8 text")


def _certificate_problem(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _cause(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]


def _failed(why: str) -> PolicyFetch:
    return PolicyFetch(failure=why, result_type="sts-policy-fetch-error")
