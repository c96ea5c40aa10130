"""
The ClientHello parser (L{txtunnel.sni}): real ClientHellos from OpenSSL
(Python's C{ssl}), curl and C{openssl s_client}; built ones with every
field varied; arbitrary splits into TCP reads and TLS records; and garbage,
which must only ever raise L{ClientHelloError}.
"""

from __future__ import annotations

import functools
import shutil
import socket
import ssl
import subprocess
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from txtunnel.sni import (
    DEFAULT_LIMIT,
    MAX_RECORDS,
    NEED_MORE,
    ClientHelloError,
    ClientHelloParser,
    alertRecord,
    serverName,
)

# -- real ClientHellos


def pythonHello(
    host: str | None,
    maximum: ssl.TLSVersion | None = None,
    alpn: list[str] | None = None,
) -> bytes:
    """
    The first flight of a Python (OpenSSL) TLS client for C{host}.
    """
    return _pythonHello(host, maximum, tuple(alpn or ()))


@functools.lru_cache(maxsize=64)
def _pythonHello(host: str | None, maximum: ssl.TLSVersion | None, alpn: tuple[str, ...]) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    outgoing = ssl.MemoryBIO()
    tls = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=host)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def capturedHello(command: list[str], port: int, listener: socket.socket) -> bytes:
    """
    Run a TLS client C{command} against C{listener} and return what it sent
    before we hang up (a listener that never answers).
    """
    received: list[bytes] = []

    def accept() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            parser = ClientHelloParser()
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                received.append(data)
                try:
                    if parser.feed(data) is not NEED_MORE:
                        return
                except ClientHelloError:
                    return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    subprocess.run(command, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    thread.join(10)
    return b"".join(received)


@pytest.fixture(scope="module")
def listener() -> Any:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    s.settimeout(20)
    yield s
    s.close()


REAL_NAMES = ["secure.localhost", "a.b.c.example.org", "x" * 63 + "." + "y" * 63 + ".localhost"]


@pytest.mark.parametrize("host", REAL_NAMES)
@pytest.mark.parametrize("maximum", [None, ssl.TLSVersion.TLSv1_2])
def test_python_client_hellos(host: str, maximum: ssl.TLSVersion | None) -> None:
    hello = pythonHello(host, maximum, alpn=["h2", "http/1.1"])
    assert serverName(hello) == host


def test_python_client_without_sni() -> None:
    assert serverName(pythonHello(None)) is None


def test_python_client_idna_name() -> None:
    assert serverName(pythonHello("bücher.localhost")) == "xn--bcher-kva.localhost"


def test_upper_case_and_trailing_dot_are_normalised() -> None:
    assert serverName(buildHello(b"Secure.LocalHost.")) == "secure.localhost"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_client_hello(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    hello = capturedHello(
        ["curl", "-sS", "--max-time", "3", "--resolve", f"curl.localhost:{port}:127.0.0.1",
         f"https://curl.localhost:{port}/"],
        port,
        listener,
    )  # fmt: skip
    assert serverName(hello) == "curl.localhost"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_hello(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    command = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "openssl.localhost"]
    hello = capturedHello(command, port, listener)
    assert serverName(hello) == "openssl.localhost"
    noSNI = capturedHello(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-noservername"], port, listener)
    assert serverName(noSNI) is None


# -- building ClientHellos


def vector(data: bytes, size: int) -> bytes:
    return len(data).to_bytes(size, "big") + data


def extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + vector(data, 2)


def sniExtension(*names: tuple[int, bytes]) -> bytes:
    entries = b"".join(bytes([kind]) + vector(name, 2) for kind, name in names)
    return extension(0, vector(entries, 2))


def buildHello(
    host: bytes | None,
    *,
    sessionID: bytes = b"\x07" * 32,
    suites: bytes = b"\x13\x01\x13\x02\xc0\x2f",
    before: list[bytes] | None = None,
    after: list[bytes] | None = None,
    sni: bytes | None = None,
    version: bytes = b"\x03\x01",
) -> bytes:
    """
    A ClientHello record; C{sni} replaces the server_name extension whole.
    """
    extensions = list(before or [])
    if sni is not None:
        extensions.append(sni)
    elif host is not None:
        extensions.append(sniExtension((0, host)))
    extensions += after or []
    body = (
        b"\x03\x03"
        + b"\x42" * 32
        + vector(sessionID, 1)
        + vector(suites, 2)
        + vector(b"\x00", 1)
        + vector(b"".join(extensions), 2)
    )
    message = b"\x01" + vector(body, 3)
    return b"\x16" + version + vector(message, 2)


def recut(hello: bytes, sizes: list[int]) -> bytes:
    """
    Re-cut a one-record ClientHello into records of C{sizes} (cycled).
    """
    version = hello[1:3]
    message = hello[5:]
    out, i, n = b"", 0, 0
    while i < len(message):
        size = sizes[n % len(sizes)]
        piece = message[i : i + size]
        out += b"\x16" + version + vector(piece, 2)
        i += size
        n += 1
    return out


LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
NAMES = st.lists(LABEL, min_size=1, max_size=5).map(".".join).filter(lambda n: len(n) <= 253)
OTHER_EXTENSIONS = st.lists(
    st.tuples(st.integers(1, 0xFFFF), st.binary(max_size=300)), max_size=6, unique_by=lambda t: t[0]
).map(lambda pairs: [extension(kind, data) for kind, data in pairs])


def splitAt(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


@given(
    name=NAMES,
    extras=OTHER_EXTENSIONS,
    sessionID=st.binary(max_size=32),
    suites=st.lists(st.binary(min_size=2, max_size=2), min_size=1, max_size=40).map(b"".join),
    place=st.integers(0, 6),
)
def test_built_hellos(name: str, extras: list[bytes], sessionID: bytes, suites: bytes, place: int) -> None:
    """
    The name is found wherever the server_name extension is among others,
    whatever the session id and cipher suites.
    """
    extras = [e for e in extras if e[:2] != b"\x00\x00"]
    hello = buildHello(name.encode(), sessionID=sessionID, suites=suites, before=extras[:place], after=extras[place:])
    assume(len(hello) - 5 <= DEFAULT_LIMIT)
    assert serverName(hello) == name


@given(
    hello=st.sampled_from([pythonHello("secure.localhost"), pythonHello("demo.localhost", ssl.TLSVersion.TLSv1_2)]),
    cuts=st.lists(st.integers(0, 4000), max_size=40),
)
def test_any_split_into_reads(hello: bytes, cuts: list[int]) -> None:
    """
    Fed in arbitrary pieces, the parser says "need more" until the last
    byte, then names the server, and has kept every byte.
    """
    parser = ClientHelloParser()
    pieces = splitAt(hello, cuts)
    for piece in pieces[:-1]:
        assert parser.feed(piece) is NEED_MORE
    assert parser.feed(pieces[-1]) in ("secure.localhost", "demo.localhost")
    assert parser.buffered == hello


@given(
    sizes=st.lists(st.integers(1, 2000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(0, 4000), max_size=10),
    trailing=st.binary(max_size=100),
)
def test_any_split_into_records(sizes: list[int], cuts: list[int], trailing: bytes) -> None:
    """
    A ClientHello over several TLS records (as the TLS spec allows), read
    in arbitrary pieces, with whatever the client sends after it.
    """
    hello = pythonHello("secure.localhost")
    records = recut(hello, sizes)
    assume(records.count(b"\x16\x03\x01") <= MAX_RECORDS)
    data = records + trailing
    parser = ClientHelloParser()
    result: Any = NEED_MORE
    for piece in splitAt(data, cuts):
        result = parser.feed(piece)
        if result is not NEED_MORE:
            break
    assert result == "secure.localhost"
    assert data.startswith(parser.buffered) and len(parser.buffered) >= len(records)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 3000), max_size=8))
def test_garbage_raises_only_our_error(data: bytes, cuts: list[int]) -> None:
    parser = ClientHelloParser()
    try:
        for piece in splitAt(data, cuts):
            result = parser.feed(piece)
            assert result is NEED_MORE or result is None or isinstance(result, str)
    except ClientHelloError as e:
        assert e.reason


@given(
    body=st.binary(max_size=3000),
    version=st.sampled_from([b"\x03\x01", b"\x03\x03", b"\x03\x00"]),
    length=st.integers(0, 0xFFFF),
    handshakeLength=st.integers(0, 0xFFFFFF),
)
def test_garbage_behind_a_valid_header_raises_only_our_error(
    body: bytes, version: bytes, length: int, handshakeLength: int
) -> None:
    data = b"\x16" + version + length.to_bytes(2, "big") + b"\x01" + handshakeLength.to_bytes(3, "big") + body
    try:
        result = serverName(data)
        assert result is NEED_MORE or result is None or isinstance(result, str)
    except ClientHelloError as e:
        assert e.isTLS


@given(
    flips=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 700),
)
def test_mutated_real_hellos_raise_only_our_error(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(pythonHello("secure.localhost"))
    for where, value in flips:
        data[where % len(data)] = value
    try:
        serverName(bytes(data[: max(cut, 1)]))
        serverName(bytes(data))
    except ClientHelloError:
        pass


#: Bytes after which a parser fed one byte at a time must have decided.
BOUND = DEFAULT_LIMIT + 5 * MAX_RECORDS + (1 << 14) + 5


@settings(max_examples=30, deadline=None)
@given(
    seed=st.binary(min_size=1, max_size=64),
    recordLength=st.integers(1, 1 << 14),
    handshakeLength=st.integers(0, DEFAULT_LIMIT - 4),
)
def test_memory_is_bounded(seed: bytes, recordLength: int, handshakeLength: int) -> None:
    """
    However the bytes are made up, the parser decides (a name, None or an
    error) before it has been fed L{BOUND} bytes.
    """
    first = b"\x16\x03\x01" + recordLength.to_bytes(2, "big") + b"\x01" + handshakeLength.to_bytes(3, "big")
    filler = (seed * (BOUND // len(seed) + 1))[:BOUND]
    stream = first + filler
    parser = ClientHelloParser()
    fed = 0
    step = 997
    try:
        while fed < len(stream):
            if parser.feed(stream[fed : fed + step]) is not NEED_MORE:
                break
            fed += step
        else:
            raise AssertionError("undecided after all bytes")
    except ClientHelloError:
        pass
    assert fed <= BOUND


# -- errors, one by one


@pytest.mark.parametrize(
    ("data", "message", "isTLS"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not TLS", False),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "not TLS", False),
        (b"\x80\x2e\x01\x00\x02\x00\x15" + b"\x00" * 40, "SSL 2.0", True),
        (b"\x16\x02\x00\x00\x10", "record version", False),
        (b"\x16\x03\x01\x00\x00", "empty TLS handshake record", True),
        (b"\x16\x03\x01\x48\x00", "over the 16384-byte maximum", True),
        (b"\x16\x03\x01\x00\x40\x02\x00\x00\x3c", "not a ClientHello", True),
        (b"\x16\x03\x01\x40\x00\x01\x01\x00\x00", "over the 16384-byte limit", True),
    ],
)
def test_refusals(data: bytes, message: str, isTLS: bool) -> None:
    with pytest.raises(ClientHelloError, match=message) as info:
        serverName(data)
    assert info.value.isTLS is isTLS


def test_record_of_another_type_mid_hello() -> None:
    hello = recut(pythonHello("secure.localhost"), [100])
    broken = hello[:105] + b"\x15\x03\x03\x00\x02\x02\x28"
    with pytest.raises(ClientHelloError, match="record of type 21 in the middle"):
        serverName(broken)


def test_too_many_records() -> None:
    with pytest.raises(ClientHelloError, match="more than 64 TLS records"):
        serverName(recut(pythonHello("secure.localhost"), [1]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sni": sniExtension((0, b"a.localhost"), (0, b"b.localhost"))}, "two names of type 0"),
        ({"sni": sniExtension((0, b""))}, "server name of 0 characters"),
        ({"sni": sniExtension((0, "bü.localhost".encode()))}, "not ASCII"),
        ({"sni": sniExtension((0, b"a..localhost"))}, "not a DNS name"),
        ({"sni": sniExtension((0, b"a b.localhost"))}, "not a DNS name"),
        ({"sni": sniExtension((0, b"-a.localhost"))}, "not a DNS name"),
        ({"sni": sniExtension((0, b"x" * 64 + b".localhost"))}, "not a DNS name"),
        ({"sni": sniExtension((0, b"a." * 127 + b"bc"))}, "server name of 256 characters"),
        ({"sni": extension(0, b"\x00\x05\x00\x00")}, "truncated"),
        ({"sni": extension(0, vector(b"", 2) + b"x")}, "stray bytes after the server name list"),
        ({"after": [extension(16, b"\x00\x02h2"), extension(16, b"")]}, "repeats extension 16"),
        ({"sessionID": b"x" * 33}, "session id longer than 32"),
        ({"suites": b""}, "cipher suite list is empty"),
        ({"suites": b"\x13"}, "odd length"),
    ],
)
def test_malformed_hellos(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ClientHelloError, match=message):
        serverName(buildHello(b"secure.localhost", **kwargs))


def test_other_name_types_are_skipped_and_empty_list_is_no_name() -> None:
    assert serverName(buildHello(None, sni=sniExtension((1, b"opaque"), (0, b"ok.localhost")))) == "ok.localhost"
    assert serverName(buildHello(None, sni=sniExtension())) is None
    assert serverName(buildHello(None)) is None


def test_hello_without_extensions() -> None:
    body = b"\x03\x00" + b"\x42" * 32 + b"\x00" + vector(b"\x00\x2f", 2) + b"\x01\x00"
    message = b"\x01" + vector(body, 3)
    assert serverName(b"\x16\x03\x00" + vector(message, 2)) is None
    with pytest.raises(ClientHelloError, match="stray bytes"):
        bad = body + vector(b"", 2) + b"zz"
        serverName(b"\x16\x03\x01" + vector(b"\x01" + vector(bad, 3), 2))


def test_errors_are_sticky_and_results_final() -> None:
    parser = ClientHelloParser()
    with pytest.raises(ClientHelloError):
        parser.feed(b"GET /")
    with pytest.raises(ClientHelloError):
        parser.feed(pythonHello("secure.localhost"))
    parser = ClientHelloParser()
    assert parser.feed(pythonHello("one.localhost")) == "one.localhost"
    assert parser.feed(b"anything") == "one.localhost"


def test_smaller_limit() -> None:
    hello = pythonHello("secure.localhost")
    with pytest.raises(ClientHelloError, match="over the 100-byte limit"):
        ClientHelloParser(limit=100).feed(hello)


def test_alert_record() -> None:
    assert alertRecord(112) == b"\x15\x03\x03\x00\x02\x02\x70"


def test_tiny_reads_are_cheap() -> None:
    """
    A hello trickled one byte at a time costs linear time, not a reparse
    per byte.
    """
    hello = recut(pythonHello("secure.localhost"), [200])
    data = hello + b"\x00" * 0
    start = time.perf_counter()
    for _ in range(20):
        parser = ClientHelloParser()
        for i in range(len(data)):
            result = parser.feed(data[i : i + 1])
    assert result == "secure.localhost"
    assert time.perf_counter() - start < 5
