"""``asmtp mx``: where mail for a domain would go. Owns the command's options, resolving
each domain's mail exchangers as direct delivery would (one resolver, one cache), and
saying what sending there would do, as text or JSON Lines.

Needs no extra: plain text, no rich. Exit status: 0 every domain resolved, 1 any did not,
2 bad usage. Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .._core.sanitize import printable
from .._delivery.sites import site_name
from .._delivery.tlspolicy import TLSPolicies, describe_policy
from .._io.resolver import MXHost, MXResolver
from ..config import Direct
from ..errors import ResolveError
from .options import (
    DNS_TIMEOUT,
    EXIT_FAILED,
    EXIT_OK,
    add_dns_server,
    add_dns_timeout,
    mail_domain,
    output,
    port,
    run_loop,
)
from .tlsrpt import direct_tls_settings

__all__ = ["add_mx_parser", "cmd_mx"]

#: what sending to a domain would do, by ``ResolveError.kind``
_MX_VERDICTS = {
    "null_mx": "accepts no mail (null MX): sending fails at once, permanently",
    "nxdomain": "no such domain: sending fails at once, permanently",
    "no_address": "no mail exchanger has an address: sending fails permanently",
    "temporary": "DNS failed for now: sending fails transiently (try again later)",
}


def add_mx_parser(sub: Any) -> None:
    """Add ``asmtp mx`` and its options to ``asmtp``'s subcommands."""
    mx: argparse.ArgumentParser = sub.add_parser(
        "mx",
        help="show where mail for domains would go",
        description="Resolve each domain's mail exchangers as direct delivery would, "
        "and say what would happen to mail sent there.",
    )
    mx.add_argument(
        "domains", nargs="+", type=mail_domain, metavar="DOMAIN", help="a domain (or an address)"
    )
    add_dns_server(mx)
    add_dns_timeout(mx, default=DNS_TIMEOUT)
    mx.add_argument(
        "--json",
        action="store_true",
        help="JSON Lines, one per domain, with the TLS policy each MX host would be held to",
    )
    mx.add_argument("--tls-policy", metavar="FILE", help="per-domain TLS levels (as asmtp send)")
    mx.add_argument(
        "--trust-ad", action="store_true", default=None, help="believe the AD bit: show DANE"
    )
    mx.add_argument("--sts-port", type=port, default=443, help=argparse.SUPPRESS)  # tests


@dataclass(frozen=True)
class _MXOutcome:
    domain: str
    hosts: list[MXHost]
    error: ResolveError | None

    @property
    def status(self) -> str:
        return "ok" if self.error is None else self.error.kind

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "domain": self.domain,
            "status": self.status,
            "hosts": [
                {"host": h.name, "preference": h.preference, "addresses": list(h.addresses)}
                for h in self.hosts
            ],
        }
        if self.error is not None:
            out["message"] = self.error.message
        else:  # domains on the same MX hosts share one site (its limits and state)
            out["site"] = site_name(self.hosts)
        return out


def cmd_mx(args: argparse.Namespace) -> int:
    """Run ``asmtp mx`` from parsed options; return the exit status."""
    # one resolver for every domain: one cache, shared queries in flight
    resolver = MXResolver(args.dns_server, timeout=args.dns_timeout)
    # each DOMAIN was checked by the parser (mail_domain): an address gives its domain
    outcomes = run_loop(_resolve_all(resolver, args.domains))
    policies = run_loop(_policies(args, outcomes)) if args.json else {}
    with output() as out:
        for outcome in outcomes:
            if args.json:
                line = outcome.as_dict()
                if outcome.domain in policies:
                    line["tls_policy"] = policies[outcome.domain]
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            else:
                out.write(_mx_text(outcome))
    return EXIT_OK if all(o.error is None for o in outcomes) else EXIT_FAILED


async def _resolve_all(resolver: MXResolver, domains: Sequence[str]) -> list[_MXOutcome]:
    async def one(domain: str) -> _MXOutcome:
        try:
            return _MXOutcome(domain, await resolver.resolve(domain), None)
        except ResolveError as exc:
            return _MXOutcome(domain, [], exc)

    return list(await asyncio.gather(*(one(d) for d in domains)))


async def _policies(
    args: argparse.Namespace, outcomes: Sequence[_MXOutcome]
) -> dict[str, dict[str, object]]:
    """Each resolved domain's TLS policy, as direct delivery would find it."""
    settings = Direct(
        dns_servers=args.dns_server,
        dns_timeout=args.dns_timeout,
        sts_port=args.sts_port,
        **direct_tls_settings(args),
    )
    resolver = MXResolver(args.dns_server, timeout=args.dns_timeout, trust_ad=settings.trust_ad)
    policies = TLSPolicies(settings, resolver)
    found = {}
    for outcome in outcomes:
        if outcome.error is None:
            hosts = [h.name for h in outcome.hosts]
            found[outcome.domain] = await describe_policy(policies, outcome.domain, hosts)
    return found


def _mx_text(outcome: _MXOutcome) -> str:
    # names and messages from DNS are shown through printable(): a terminal's, not JSON
    domain = printable(outcome.domain)
    if outcome.error is not None:
        verdict = _MX_VERDICTS.get(outcome.error.kind, "cannot be resolved")
        return f"{domain}: {verdict}\n  {printable(outcome.error.message)}\n"
    lines = [f"{domain}: mail goes to, in this order:"]
    names = [printable(h.name) for h in outcome.hosts]
    width = max(len(name) for name in names)
    for n, (name, host) in enumerate(zip(names, outcome.hosts, strict=True), 1):
        lines.append(
            f"  {n}. {name:<{width}}  preference {host.preference:<5} {', '.join(host.addresses)}"
        )
    # the site's name is these hosts' names: said, not repeated (--json carries it)
    lines.append("  one site with every domain on these hosts: --shaping limits them together")
    return "\n".join(lines) + "\n"
