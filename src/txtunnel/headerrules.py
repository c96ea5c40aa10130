# -*- test-case-name: tests.test_policy -*-
"""
Header names and values a tunnel's settings may add or remove, checked so
that no setting can split a head or smuggle a second request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["headerAdd", "headerName", "headerNames", "headerAdds"]

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
#: Headers no rule may touch: they frame the message or route it.
PROTECTED = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "trailer", "keep-alive"}
)
#: Rules one list may hold.
MAX_RULES = 64


def headerName(text: str) -> str:
    """
    A header name to add or remove, checked: an HTTP token, not one that
    frames or routes the message.
    """
    name = str(text).strip()
    if not _TOKEN.match(name):
        raise ValueError(f"{name!r} is not an HTTP header name")
    if name.lower() in PROTECTED:
        raise ValueError(f"header {name!r} frames or routes the message and cannot be changed")
    return name


def headerAdd(text: str) -> tuple[str, str]:
    """
    C{"Name: value"} to C{(name, value)}, checked.
    """
    name, sep, value = str(text).partition(":")
    if not sep:
        raise ValueError(f"{text!r} is not a header like 'X-Name: value'")
    value = value.strip()
    if any(c in value for c in "\r\n\0") or len(value) > 4096:
        raise ValueError(f"the value of header {name.strip()!r} holds a line break or is too long")
    return headerName(name), value


def _items(values: str | Iterable[str]) -> list[str]:
    items = [v for v in values.split("\n")] if isinstance(values, str) else [str(v) for v in values]
    items = [i.strip() for i in items if i.strip()]
    if len(items) > MAX_RULES:
        raise ValueError(f"at most {MAX_RULES} header rules")
    return items


def headerAdds(values: str | Iterable[str]) -> list[str]:
    """
    Header additions, one per line in a config file, each C{"Name: value"}.
    """
    return [": ".join(headerAdd(item)) for item in _items(values)]


def headerNames(values: str | Iterable[str]) -> list[str]:
    """
    Header names to remove, comma- or line-separated.
    """
    if isinstance(values, str):
        values = values.replace(",", "\n")
    return [headerName(item) for item in _items(values)]
