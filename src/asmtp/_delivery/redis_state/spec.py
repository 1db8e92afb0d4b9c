"""A campaign's settings as the workers read them from Redis: :class:`CampaignSpec`,
written once as JSON when the campaign is first enqueued.

Owns what crosses from the sender of a campaign to its workers, and what does not:
plain settings (the relay or direct delivery with its shaping rules, timeouts,
retries, rates, the per-domain connection cap, DSN, unsubscribe and VERP templates)
go through Redis; secrets and live objects do not. A relay's password is never
written to Redis: each worker reads it from its environment
(``ASMTP_RELAY_PASSWORD``); an ``ssl_context``, a proxy, client certificate files, a
TLS policy map, a TLS report log, an MTA-STS cache, a DKIM signer or a suppression
list are refused with an :class:`~asmtp.errors.InputError` (give them to the
workers' own code instead).

Settings are frozen dataclasses: each is written as its fields (a nested one known to
:data:`_NESTED` as ``{"!": its name, ...}``, a mapping as ``{"!map": pairs}``, a tuple
as a list) and read back through its own constructor, so its checks run again in the
worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..._core.shaping_rules import Rule, Shaping, SiteLimits
from ...config import DSN, Direct, Relay, Timeouts
from ...errors import InputError
from ..journal_format import JournalIdentity
from ..retry import Rate, Retry

__all__ = ["PASSWORD_ENV", "CampaignSpec"]

#: the environment variable a worker reads its relay's password from
PASSWORD_ENV = "ASMTP_RELAY_PASSWORD"

#: settings that never go through Redis (None is all they may be)
_LOCAL_ONLY = (
    "ssl_context",
    "rng",
    "proxy",
    "client_cert",
    "client_key",
    "tls_policy",
    "tls_report",
    "sts_cache",
)
#: the settings a relay's or direct delivery's own settings may hold
_NESTED: dict[str, type[Any]] = {kind.__name__: kind for kind in (Shaping, Rule, SiteLimits)}


@dataclass(frozen=True)
class CampaignSpec:
    """What every worker of a campaign sends with (one Mailer per worker process)."""

    identity: JournalIdentity
    relay: Relay | Direct
    #: deliveries at once in each worker process
    concurrency: int = 100
    timeout: Timeouts | None = None
    retry: Retry | None = None
    rate: Rate | None = None
    rate_per_domain: Rate | None = None
    #: connections (deliveries in flight) to one domain at once, across all workers
    connections_per_domain: int | None = None
    dsn: DSN | None = None
    unsubscribe: str | None = None
    verp: str | None = None
    #: seconds a lease (of a chunk, of a connection) outlives a worker that died
    lease_ttl: float = 30.0

    def __post_init__(self) -> None:
        if self.identity.campaign is None:
            raise InputError("a campaign's identity names it (campaign=...)")
        cap = self.connections_per_domain
        if cap is not None and (type(cap) is not int or cap < 1):
            raise InputError(f"connections_per_domain must be a whole number from 1: {cap!r}")
        if not (isinstance(self.lease_ttl, int | float) and self.lease_ttl > 0):
            raise InputError(f"lease_ttl must be a number of seconds: {self.lease_ttl!r}")
        _plain("relay", self.relay)
        self.to_json()  # anything that cannot cross is refused here, not in a worker

    def to_json(self) -> str:
        relay = _fields(self.relay)
        relay.pop("password", None)  # each worker has it from its environment
        return json.dumps(
            {
                "identity": dataclasses.asdict(self.identity),
                "relay": {"kind": type(self.relay).__name__, **relay},
                "concurrency": self.concurrency,
                "timeout": _fields(self.timeout) if self.timeout else None,
                "retry": _fields(self.retry) if self.retry else None,
                "rate": _fields(self.rate) if self.rate else None,
                "rate_per_domain": _fields(self.rate_per_domain) if self.rate_per_domain else None,
                "connections_per_domain": self.connections_per_domain,
                "dsn": _fields(self.dsn) if self.dsn else None,
                "unsubscribe": self.unsubscribe,
                "verp": self.verp,
                "lease_ttl": self.lease_ttl,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes, *, source_address: str | None = None) -> CampaignSpec:
        """The spec a worker sends with; ``source_address``: this machine's sending
        address, in place of the campaign's."""
        data = json.loads(text)
        relay_fields = {k: _decoded(v) for k, v in data["relay"].items()}
        kind = relay_fields.pop("kind")
        if source_address is not None:
            relay_fields["source_address"] = source_address
        relay: Relay | Direct
        if kind == "Relay":
            if relay_fields.get("username") is not None:
                relay_fields["password"] = os.environ.get(PASSWORD_ENV)
            relay = Relay(**relay_fields)
        else:
            relay = Direct(**relay_fields)

        def made(kind: type[Any], name: str) -> Any:
            value = data.get(name)
            if value is None:
                return None
            return kind(**{k: _decoded(v) for k, v in value.items()})

        return cls(
            identity=JournalIdentity(**data["identity"]),
            relay=relay,
            concurrency=data["concurrency"],
            timeout=made(Timeouts, "timeout"),
            retry=made(Retry, "retry"),
            rate=made(Rate, "rate"),
            rate_per_domain=made(Rate, "rate_per_domain"),
            connections_per_domain=data["connections_per_domain"],
            dsn=made(DSN, "dsn"),
            unsubscribe=data["unsubscribe"],
            verp=data["verp"],
            lease_ttl=data["lease_ttl"],
        )


def _plain(what: str, value: Relay | Direct) -> None:
    for name in _LOCAL_ONLY:
        if getattr(value, name, None) is not None:
            raise InputError(
                f"{what}.{name} cannot be sent to the workers through Redis: a campaign's "
                "settings there are plain values (set it up in the workers' own code)"
            )


def _fields(value: Any) -> dict[str, Any]:
    """A frozen settings dataclass's fields as JSON values (live objects and private
    fields left out)."""
    return {
        f.name: _encoded(getattr(value, f.name), f.name)
        for f in dataclasses.fields(value)
        if f.name not in _LOCAL_ONLY and not f.name.startswith("_")
    }


def _encoded(value: Any, name: str) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, tuple | list):
        return [_encoded(item, name) for item in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {"!map": [[_encoded(k, name), _encoded(v, name)] for k, v in value.items()]}
    kind = type(value)
    if dataclasses.is_dataclass(value) and _NESTED.get(kind.__name__) is kind:
        return {"!": kind.__name__, **_fields(value)}
    raise InputError(
        f"the setting {name} ({kind.__name__}) cannot be sent to the workers through "
        "Redis: set it up in the workers' own code"
    )


def _decoded(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decoded(item) for item in value)
    if isinstance(value, dict):
        if "!map" in value:
            return {k: _decoded(v) for k, v in value["!map"]}
        fields = {k: _decoded(v) for k, v in value.items() if k != "!"}
        return _NESTED[value["!"]](**fields)
    return value
