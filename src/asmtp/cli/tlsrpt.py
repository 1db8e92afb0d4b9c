"""TLS policy on the command line: ``asmtp send``'s direct-delivery TLS options
(``--tls-policy FILE``, ``--trust-ad``, ``--sts-cache DIR``, ``--tlsrpt FILE``), and
``asmtp tlsrpt``, which turns the counts ``--tlsrpt`` gathered into RFC 8460 reports.

``--tlsrpt FILE`` adds each run's counts to FILE (a JSON file asmtp reads back, not a
report); ``asmtp tlsrpt FILE --organization NAME --contact ADDR`` prints one report per
policy domain (a JSON array), or with ``--out DIR`` writes each under RFC 8460 section
5.3's name (``sender!domain!begin!end!id.json``). Layer 6: may import any layer below.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .._core.tlsmap import parse_policy_map
from .._core.tlsrpt import TLSReportLog
from ..config import Direct
from ..errors import InputError
from .options import EXIT_OK, output

__all__ = [
    "DIRECT_TLS_FLAGS",
    "add_tls_policy_options",
    "add_tlsrpt_parser",
    "cmd_tlsrpt",
    "direct_tls_settings",
    "save_tls_report",
]

#: the flags that only direct delivery takes (``--relay`` refuses them)
DIRECT_TLS_FLAGS = ("tls_policy", "trust_ad", "sts_cache", "tlsrpt")


def add_tls_policy_options(group: Any) -> None:
    """``asmtp send``'s TLS policy options, in its direct-delivery group."""
    group.add_argument(
        "--tls-policy",
        metavar="FILE",
        help="per-domain TLS levels: lines of 'domain level' (policy, dane, sts, "
        "opportunistic or may, starttls or verify/secure, none; '.domain' for the "
        "domains under it)",
    )
    group.add_argument(
        "--trust-ad",
        action="store_true",
        default=None,
        help="the DNS servers validate DNSSEC (a local unbound): believe their AD bit "
        "and use DANE (TLSA records)",
    )
    group.add_argument(
        "--sts-cache",
        metavar="DIR",
        help="keep MTA-STS policies in DIR between runs (each run's memory keeps them anyway)",
    )
    group.add_argument(
        "--tlsrpt",
        metavar="FILE",
        help="add this run's TLS outcomes (per policy domain) to FILE, for asmtp tlsrpt",
    )


def direct_tls_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~asmtp.config.Direct` settings the options give (a command
    without some of them, as ``asmtp mx``, leaves those out)."""
    settings: dict[str, Any] = {}
    tls_policy, trust_ad, sts_cache, tlsrpt = (
        getattr(args, name, None) for name in DIRECT_TLS_FLAGS
    )
    if tls_policy is not None:
        try:
            text = Path(tls_policy).read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--tls-policy: cannot read {tls_policy!r}: {exc}") from None
        settings["tls_policy"] = parse_policy_map(text, f"--tls-policy {tls_policy}")
    if trust_ad:
        settings["trust_ad"] = True
    if sts_cache is not None:
        settings["sts_cache"] = sts_cache
    if tlsrpt is not None:
        _read_log(Path(tlsrpt), "--tlsrpt")  # a file that is not ours: refused now
        settings["tls_report"] = TLSReportLog()
    return settings


def save_tls_report(args: argparse.Namespace, relay: object) -> None:
    """Add the run's counts to ``--tlsrpt FILE`` (written whole, renamed over it)."""
    if getattr(args, "tlsrpt", None) is None or not isinstance(relay, Direct):
        return
    log = relay.tls_report
    if log is None:
        return
    path = Path(args.tlsrpt)
    total = _read_log(path, "--tlsrpt")
    total.merge(log)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(total.as_dict(), indent=1) + "\n", "utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        print(f"asmtp: error: --tlsrpt: cannot write {str(path)!r}: {exc}", file=sys.stderr)


def _read_log(path: Path, flag: str) -> TLSReportLog:
    try:
        text = path.read_text("utf-8")
    except FileNotFoundError:
        return TLSReportLog()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{flag}: cannot read {str(path)!r}: {exc}") from None
    try:
        return TLSReportLog.from_dict(json.loads(text))
    except (ValueError, AttributeError) as exc:
        raise InputError(f"{flag}: {str(path)!r} is not an asmtp TLS report log ({exc})") from None


def add_tlsrpt_parser(sub: Any) -> None:
    """Add ``asmtp tlsrpt`` to ``asmtp``'s subcommands."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "tlsrpt",
        help="write TLS-RPT (RFC 8460) reports from asmtp send --tlsrpt counts",
        description="Build one RFC 8460 aggregate report per policy domain from the "
        "counts asmtp send --tlsrpt FILE gathered.",
    )
    parser.add_argument("log", metavar="FILE", help="the file asmtp send --tlsrpt wrote")
    parser.add_argument("--organization", required=True, metavar="NAME", help="who reports")
    parser.add_argument(
        "--contact", required=True, metavar="ADDR", help="contact-info (an address or URI)"
    )
    parser.add_argument(
        "--out", metavar="DIR", help="write each report to DIR (RFC 8460 5.3 file names)"
    )
    parser.add_argument("--sender", metavar="DOMAIN", help="the sender domain in --out file names")


def cmd_tlsrpt(args: argparse.Namespace) -> int:
    """Run ``asmtp tlsrpt``: print the reports (or write them to ``--out``)."""
    log = _read_log(Path(args.log), "asmtp tlsrpt")
    reports = log.reports(args.organization, args.contact)
    if args.out is None:
        with output() as out:
            out.write(json.dumps(reports, indent=2) + "\n")
        return EXIT_OK
    directory = Path(args.out)
    sender = args.sender or args.contact.rpartition("@")[2] or "asmtp"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for report in reports:
            domain = report["policies"][0]["policy"]["policy-domain"]
            begin = int(log.start or 0)
            end = int(log.end or begin)
            name = f"{sender}!{domain}!{begin}!{end}.json"
            (directory / name).write_text(json.dumps(report, indent=2) + "\n", "utf-8")
            print(directory / name)
    except OSError as exc:
        raise InputError(f"--out: cannot write to {args.out!r}: {exc}") from None
    return EXIT_OK
