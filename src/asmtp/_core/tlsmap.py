"""Direct delivery's TLS levels and the per-domain policy map (``Direct(tls_policy=...)``,
``asmtp send --tls-policy FILE``): which level each recipient domain gets.

Pure: the map's text format and lookups. What a level means for a session is
:mod:`asmtp._delivery.tlspolicy`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Literal

from ..errors import InputError

__all__ = ["TLS_LEVELS", "TLSLevel", "TLSPolicyMap", "level_of", "parse_policy_map"]

#: direct delivery's TLS levels (Postfix's smtp_tls_security_level in spirit):
#: "policy" honours DANE (with a trusted validating resolver), then MTA-STS, else
#: opportunistic; "dane" and "sts" honour only the one; "starttls" requires verified
#: TLS (the web PKI, the MX name) of every MX host
TLSLevel = Literal["policy", "dane", "sts", "opportunistic", "starttls", "none"]
TLS_LEVELS: tuple[TLSLevel, ...] = ("policy", "dane", "sts", "opportunistic", "starttls", "none")
#: Postfix's level names, taken in a policy file too
_POSTFIX: dict[str, TLSLevel] = {"may": "opportunistic", "verify": "starttls", "secure": "starttls"}


def level_of(word: str, where: str = "tls level") -> TLSLevel:
    """The level a word names (a level, or Postfix's ``may``, ``verify``, ``secure``).

    >>> level_of("may"), level_of("DANE")
    ('opportunistic', 'dane')
    """
    text = word.strip().lower() if isinstance(word, str) else word
    for level in TLS_LEVELS:
        if text == level:
            return level
    if isinstance(text, str) and text in _POSTFIX:
        return _POSTFIX[text]
    raise InputError(f"{where} must be one of {', '.join(TLS_LEVELS)}: {word!r}")


class TLSPolicyMap(Mapping[str, TLSLevel]):
    """Domain → level, immutable and hashable. A key ``example.org`` is that domain;
    ``.example.org`` every domain under it (not the domain itself), as in Postfix.

    >>> m = TLSPolicyMap({"Example.ORG": "dane", ".example.org": "sts"})
    >>> m.level_for("example.org"), m.level_for("lists.example.org"), m.level_for("x.test")
    ('dane', 'sts', None)
    """

    __slots__ = ("_index", "_items")

    def __init__(self, entries: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        pairs = entries.items() if isinstance(entries, Mapping) else entries
        items: dict[str, TLSLevel] = {}
        for domain, word in pairs:
            if not isinstance(domain, str) or not domain.strip(". ") or " " in domain.strip():
                raise InputError(f"tls_policy: not a domain: {domain!r}")
            key = domain.strip().lower().rstrip(".")
            items[key] = level_of(word, f"tls_policy level of {domain}")
        self._items = tuple(sorted(items.items()))
        self._index = items  # looked up per recipient domain: a dict, not the tuple

    def level_for(self, domain: str) -> TLSLevel | None:
        """The level the map gives ``domain``: its own entry, else the nearest
        ``.parent`` entry; None when the map does not name it."""
        items = self._index
        name = domain.lower().rstrip(".")
        if name in items:
            return items[name]
        while "." in name:
            name = name.partition(".")[2]
            if f".{name}" in items:
                return items[f".{name}"]
        return None

    def __getitem__(self, key: str) -> TLSLevel:
        return self._index[key]

    def __iter__(self) -> Iterator[str]:
        return (k for k, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TLSPolicyMap):
            return self._items == other._items
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"TLSPolicyMap({dict(self._items)!r})"


def parse_policy_map(text: str, source: str = "tls policy") -> TLSPolicyMap:
    """A policy file: one ``domain level`` per line; ``#`` starts a comment.

    >>> parse_policy_map("example.org  dane   # our partner\\n.bank.test secure\\n")
    TLSPolicyMap({'.bank.test': 'starttls', 'example.org': 'dane'})
    """
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.partition("#")[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise InputError(f"{source} line {number}: expected 'domain level': {line.strip()!r}")
        pairs.append((words[0], words[1]))
    return TLSPolicyMap(pairs)
