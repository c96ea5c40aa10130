# -*- test-case-name: tests.test_names -*-
"""
Tunnel names: checking the ones people ask for, making readable ones.
"""

from __future__ import annotations

import re
import secrets

__all__ = ["checkName", "randomName"]

_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")

#: Names a tunnel may not take: they would look like the relay's own.
RESERVED = frozenset({"www", "relay", "api", "admin", "_txtunnel"})

_ADJECTIVES = (
    "amber autumn bold brave bright calm clever cosmic crisp dapper eager fancy gentle "
    "glad golden happy jolly keen kind lively lucky mellow merry mighty noble plucky "
    "proud quick quiet rapid rosy shiny silent silver sleek smart snowy sunny swift "
    "tidy vivid warm wise witty young zesty"
).split()
_NOUNS = (
    "badger beacon bison comet cedar crane delta ember falcon fern finch fox gecko "
    "harbor heron island jaguar kestrel koala lagoon lark lynx maple meadow moose "
    "nebula otter owl panda pebble pine quartz raven river robin salmon sparrow "
    "spruce tiger trout tulip walrus willow wolf yak zebra"
).split()


def checkName(name: str) -> str:
    """
    Return C{name} lower-cased if it can be a tunnel's DNS label.

    @raise ValueError: naming what is wrong with it.
    """
    lowered = name.lower()
    if not _LABEL.fullmatch(lowered):  # not match: "$" would accept a trailing newline
        raise ValueError(
            f"{name!r} is not a valid subdomain: use 1-63 letters, digits and '-', not starting or ending with '-'"
        )
    if lowered in RESERVED:
        raise ValueError(f"{name!r} is reserved on this relay")
    return lowered


def randomName() -> str:
    """
    A readable random name such as C{'brave-otter-4821'}.
    """
    return f"{secrets.choice(_ADJECTIVES)}-{secrets.choice(_NOUNS)}-{secrets.randbelow(10000):04d}"
