# -*- test-case-name: tests.test_sharing -*-
"""
Allow-lists of a shared tunnel: who may open it once logged in.

An entry is an email address (C{alice@example.com}) or a domain written
C{@company.com}; both compare case-insensitively, and a domain entry
matches only addresses whose domain is exactly that one (not
C{evil-company.com}, not C{sub.company.com}).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MAX_ENTRIES", "allowed", "checkEntry", "isEmail", "parseAllow"]

#: Entries one tunnel's list may hold.
MAX_ENTRIES = 1000

_LOCAL = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}"
_DOMAIN = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}|localhost"
_EMAIL = re.compile(rf"{_LOCAL}@(?:{_DOMAIN})")
_AT_DOMAIN = re.compile(rf"@(?:{_DOMAIN})")


def isEmail(text: object) -> bool:
    """
    Whether C{text} is an email address of the plain kind allow-lists name
    (what a provider vouches for is checked with this before it is used,
    so it can always go in a header).
    """
    return isinstance(text, str) and len(text) <= 254 and _EMAIL.fullmatch(text) is not None


def checkEntry(text: str) -> str:
    """
    One entry, lower-cased.

    @raise ValueError: naming the entry, if it is neither an email address
        nor C{@domain}.
    """
    entry = str(text).strip().lower()
    if len(entry) > 254 or not (_EMAIL.fullmatch(entry) or _AT_DOMAIN.fullmatch(entry)):
        raise ValueError(f"{text!r} is not an email address (alice@example.com) or a domain (@example.com)")
    return entry


def parseAllow(text: str | Iterable[str]) -> list[str]:
    """
    A comma-separated list (or a list) of entries, checked, without
    duplicates, in order.
    """
    items = str(text).split(",") if isinstance(text, str) else list(text)
    entries: list[str] = []
    for item in items:
        if isinstance(item, str) and not item.strip():
            continue
        if not isinstance(item, str):
            raise ValueError(f"{item!r} is not an email address or a domain")
        entry = checkEntry(item)
        if entry not in entries:
            entries.append(entry)
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"an allow-list holds at most {MAX_ENTRIES} entries")
    return entries


def allowed(entries: Iterable[str], emails: Iterable[str]) -> bool:
    """
    Whether any of C{emails} (verified addresses of one identity) is
    allowed by C{entries}.
    """
    wanted = set(entries)
    for email in emails:
        email = email.lower()
        if email in wanted or "@" + email.rpartition("@")[2] in wanted:
            return True
    return False
