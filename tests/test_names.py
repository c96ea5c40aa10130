"""
Unit tests for L{txtunnel.names}: checking requested tunnel names and making
random readable ones.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txtunnel.names import RESERVED, checkName, randomName


@pytest.mark.parametrize(
    "name, expected",
    [
        ("demo", "demo"),
        ("Demo", "demo"),
        ("MY-APP-2", "my-app-2"),
        ("a", "a"),
        ("7", "7"),
        ("x" * 63, "x" * 63),
        ("a-b", "a-b"),
        ("a--b", "a--b"),
    ],
)
def test_validNamesLowerCased(name: str, expected: str) -> None:
    """
    Valid DNS labels are accepted and lower-cased.
    """
    assert checkName(name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-demo",
        "demo-",
        "x" * 64,
        "de.mo",
        "de_mo",
        "de mo",
        "démo",
        "demo\n",
        "\ndemo",
        "demo\x00",
        "demo/",
        "*",
    ],
)
def test_invalidNamesRejected(name: str) -> None:
    """
    Anything that is not a single 1-63 character LDH label is refused with a
    message that says what a valid name looks like; a trailing newline is not
    quietly accepted.
    """
    with pytest.raises(ValueError, match="is not a valid subdomain: use 1-63 letters, digits and '-'"):
        checkName(name)


@pytest.mark.parametrize("name", sorted(RESERVED - {"_txtunnel"}) + ["WWW", "Admin"])
def test_reservedNamesRejected(name: str) -> None:
    """
    Names that would look like the relay's own are reserved, in any case.
    """
    with pytest.raises(ValueError, match="is reserved on this relay"):
        checkName(name)


LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=70))
def test_checkNameAgreesWithDNSLabelRule(name: str) -> None:
    """
    For any text, C{checkName} accepts exactly the LDH labels (after
    lower-casing) that are not reserved, and returns a valid label.
    """
    lowered = name.lower()
    valid = LABEL.fullmatch(lowered) is not None and lowered not in RESERVED
    try:
        result = checkName(name)
    except ValueError:
        assert not valid
    else:
        assert valid
        assert result == lowered
        assert LABEL.fullmatch(result)


def test_randomNameShape() -> None:
    """
    Random names are adjective-noun-NNNN, valid as tunnel names, and vary.
    """
    names = {randomName() for _ in range(200)}
    for name in names:
        assert re.fullmatch(r"[a-z]+-[a-z]+-\d{4}", name), name
        assert checkName(name) == name
    assert len(names) > 150
