"""
Unit tests for the relay's routing tables: L{txtunnel.relay.hosts.HostTable}
(HTTP Host names) and L{txtunnel.relay.ports} (public port ranges).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txtunnel.relay.hosts import HostTable
from txtunnel.relay.ports import PortPool, parseRange

# -- HostTable.split


@pytest.mark.parametrize(
    "host, name",
    [
        (b"demo.localhost", "demo"),
        (b"demo.localhost:8080", "demo"),
        (b"DEMO.LocalHost", "demo"),
        (b"Demo.LOCALHOST:80", "demo"),
        (b"demo.localhost.", "demo"),
        (b"demo.localhost.:8080", "demo"),
        (b"demo.localhost:", "demo"),
        (b"  demo.localhost  ", "demo"),
        (b"a-b-3.localhost", "a-b-3"),
        (b"x.y.localhost", "x.y"),
    ],
)
def test_splitTunnel(host: bytes, name: str) -> None:
    """
    C{NAME.<domain>}, with any port, case or trailing dot, is a tunnel name,
    lower-cased.
    """
    assert HostTable("localhost").split(host) == ("tunnel", name)


@pytest.mark.parametrize(
    "host",
    [
        b"localhost",
        b"localhost:8080",
        b"LOCALHOST.",
        b"127.0.0.1",
        b"127.0.0.1:8080",
        b"example.com",
        b"notlocalhost",
        b"demo.localhost.example.com",
        b"[::1]",
        b"[::1]:8080",
        b"[2001:db8::1]:443",
        b"::1",
    ],
)
def test_splitApex(host: bytes) -> None:
    """
    The domain itself, IP literals (v4 and bracketed v6) and names not under
    the domain are the apex.
    """
    assert HostTable("localhost").split(host) == ("apex", None)


@pytest.mark.parametrize(
    "host",
    [
        None,
        b"",
        b"   ",
        "d\u00e9mo.localhost".encode(),
        "\u0434\u0435\u043c\u043e.localhost".encode(),
        b"\xff\xfe",
        b".localhost",
        b"a..localhost",
        b"de mo.localhost",
        b"x/y.localhost",
        b"user@demo.localhost",
        b"demo.localhost\x00",
        b"demo.localhost:abc",
        b"demo.localhost:-1",
        b"demo.localhost:123456",
        b":8080",
    ],
)
def test_splitBad(host: bytes | None) -> None:
    """
    Missing, empty, non-ASCII and malformed values (empty labels, spaces,
    slashes, control characters, a port that is not a number) are bad.
    """
    assert HostTable("localhost").split(host) == ("bad", None)


def test_splitOtherDomain() -> None:
    """
    The domain is normalised (case, trailing dot) and may have several labels.
    """
    table = HostTable("Tunnel.Example.COM.")
    assert table.domain == "tunnel.example.com"
    assert table.split(b"app.tunnel.example.com:443") == ("tunnel", "app")
    assert table.split(b"tunnel.example.com") == ("apex", None)
    assert table.split(b"app.example.com") == ("apex", None)
    assert table.split(b"app.localhost") == ("apex", None)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_splitTotal(host: bytes) -> None:
    """
    Any bytes get a classification and a tunnel name is always a non-empty
    string of host-name characters.
    """
    kind, name = HostTable("localhost").split(host)
    assert kind in ("tunnel", "apex", "bad")
    if kind == "tunnel":
        assert name and all(c.isascii() and (c.isalnum() or c in "-_.") for c in name)
        assert not name.startswith(".") and not name.endswith(".")
    else:
        assert name is None


def test_tableAddGetRemove() -> None:
    """
    Names map to targets; a name is added once; C{remove} only removes the
    target that holds it.
    """
    table = HostTable("localhost")
    first, second = object(), object()
    table.add("demo", first)
    assert table.get("demo") is first and len(table) == 1
    with pytest.raises(KeyError):
        table.add("demo", second)
    table.remove("demo", second)
    assert table.get("demo") is first
    table.remove("demo", first)
    assert table.get("demo") is None and len(table) == 0
    table.remove("demo", first)


# -- parseRange


@pytest.mark.parametrize(
    "text, expected",
    [
        ("20000-20099", (20000, 20099)),
        (" 20000-20099 ", (20000, 20099)),
        ("8080", (8080, 8080)),
        ("1-65535", (1, 65535)),
        ("5-5", (5, 5)),
    ],
)
def test_parseRange(text: str, expected: tuple[int, int]) -> None:
    """
    C{A-B} and a single port parse to an inclusive range.
    """
    assert parseRange(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1-2-3", "-5", "5-", "20000:20099", "1.5-2", "a-b"])
def test_parseRangeNotARange(text: str) -> None:
    """
    Text that is not numbers in C{A-B} form is refused with an example.
    """
    with pytest.raises(ValueError, match=r"is not a port range like 20000-20099"):
        parseRange(text)


@pytest.mark.parametrize("text", ["0-10", "0", "10-5", "65536", "1-65536", "65535-65536"])
def test_parseRangeOutOfBounds(text: str) -> None:
    """
    Ports outside 1-65535, or a reversed range, are refused saying so.
    """
    with pytest.raises(ValueError, match=r"is not a port range within 1-65535 with the low port first"):
        parseRange(text)


# -- PortPool


def test_poolContains() -> None:
    """
    Membership is the range, whether or not the port is in use.
    """
    pool = PortPool(100, 104)
    assert 100 in pool and 104 in pool
    assert 99 not in pool and 105 not in pool


def test_candidatesRotate() -> None:
    """
    Candidates start after the last port taken, wrap around, and skip ports
    in use; a port just freed is offered last.
    """
    pool = PortPool(100, 104)
    assert list(pool.candidates()) == [100, 101, 102, 103, 104]
    pool.take(100)
    assert list(pool.candidates()) == [101, 102, 103, 104]
    pool.take(101)
    pool.free(100)
    assert list(pool.candidates()) == [102, 103, 104, 100]
    pool.take(104)
    assert list(pool.candidates()) == [100, 102, 103]
    assert pool.inUse(104) and not pool.inUse(100)


def test_poolExhausted() -> None:
    """
    With every port taken there are no candidates; freeing one offers it.
    """
    pool = PortPool(7, 8)
    pool.take(7)
    pool.take(8)
    assert list(pool.candidates()) == []
    pool.free(7)
    assert list(pool.candidates()) == [7]
    pool.free(7)  # freeing twice is harmless


@settings(max_examples=200, deadline=None)
@given(
    low=st.integers(1, 100),
    size=st.integers(1, 12),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 11)), max_size=30),
)
def test_candidatesProperty(low: int, size: int, ops: list[tuple[bool, int]]) -> None:
    """
    After any sequence of takes and frees, the candidates are exactly the
    free ports, each once, in rotation order starting just after the port
    taken last.
    """
    high = low + size - 1
    pool = PortPool(low, high)
    used: set[int] = set()
    start = low
    for take, offset in ops:
        port = low + offset % size
        if take:
            pool.take(port)
            used.add(port)
            start = port + 1 if port < high else low
        else:
            pool.free(port)
            used.discard(port)
    order = [low + (start - low + i) % size for i in range(size)]
    assert list(pool.candidates()) == [p for p in order if p not in used]
    assert all(pool.inUse(p) == (p in used) for p in range(low, high + 1))
