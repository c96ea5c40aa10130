# -*- test-case-name: tests.test_sni -*-
"""
Read the server name (SNI) from the first bytes of a TLS connection, without
terminating TLS: a sans-IO parser of the client's first flight.

The relay's TLS passthrough listener feeds each piece a visitor sends to a
L{ClientHelloParser}; once the ClientHello is complete the parser says which
host name the client asked for (or that it asked for none), and every byte
it saw is forwarded untouched to the tunnel of that name.

Why not a library: pyOpenSSL and the C{ssl} module only expose SNI from
inside a server handshake (C{set_tlsext_servername_callback}), that is, by
terminating TLS, which passthrough must not do; neither reads a ClientHello
that is still arriving.  The format is small and fixed (RFC 8446 section
4.1.2, RFC 6066 section 3), and this parser is fuzzed with Hypothesis and
checked against real ClientHellos from OpenSSL and curl in
C{tests/test_sni.py}.
"""

from __future__ import annotations

import enum
import re
from typing import Literal

__all__ = [
    "DECODE_ERROR",
    "DEFAULT_LIMIT",
    "NEED_MORE",
    "ClientHelloError",
    "ClientHelloParser",
    "INTERNAL_ERROR",
    "UNRECOGNIZED_NAME",
    "alertRecord",
    "serverName",
]

#: The largest ClientHello handshake message accepted, in bytes.  Real ones
#: are 200-2,000 bytes (with a post-quantum key share, up to about 1,900);
#: TLS itself allows 16 MiB, which a relay must not buffer for a stranger.
DEFAULT_LIMIT = 16 * 1024

#: The most TLS records a ClientHello may be split across.
MAX_RECORDS = 64

_HANDSHAKE = 0x16
_ALERT = 0x15
_CLIENT_HELLO = 0x01
_SERVER_NAME = 0x0000
_HOST_NAME = 0x00
_MAX_FRAGMENT = 1 << 14

#: TLS alert descriptions the relay may send before routing.
UNRECOGNIZED_NAME = 112
INTERNAL_ERROR = 80
DECODE_ERROR = 50

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class _Need(enum.Enum):
    MORE = "need more bytes"


#: What L{ClientHelloParser.feed} returns until the ClientHello is complete.
NEED_MORE: Literal[_Need.MORE] = _Need.MORE


class ClientHelloError(ValueError):
    """
    The bytes are not the start of a TLS connection we can route: not TLS at
    all, a malformed or oversized ClientHello, or an invalid server name.

    @ivar isTLS: whether the bytes looked like TLS (so a TLS alert is a
        sensible answer) rather than some other protocol.
    """

    def __init__(self, reason: str, isTLS: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.isTLS = isTLS


def alertRecord(description: int, version: bytes = b"\x03\x03") -> bytes:
    """
    A plaintext fatal TLS alert record, as a server may send before its
    ServerHello (e.g. L{UNRECOGNIZED_NAME}).
    """
    return bytes([_ALERT]) + version + b"\x00\x02\x02" + bytes([description])


class ClientHelloParser:
    """
    Collects a visitor's first bytes until its ClientHello is complete.

    Feed it bytes as they arrive; it keeps them all in L{buffered} (to be
    forwarded once routed) and cheaply answers L{NEED_MORE} until a whole
    ClientHello handshake message has arrived, possibly across several TLS
    records.  Memory is bounded by C{limit} plus one read.

    @ivar buffered: every byte fed so far.
    @ivar limit: the largest ClientHello handshake message accepted.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._pieces: list[bytes] = []
        self._size = 0
        #: Bytes needed before parsing can make progress.
        self._needed = 5
        #: Offset of the next record header not yet read.
        self._offset = 0
        #: Handshake bytes reassembled from the records read so far.
        self._handshake = bytearray()
        self._records = 0
        self._result: str | None | _Need = NEED_MORE
        self._error: ClientHelloError | None = None

    def feed(self, data: bytes) -> str | None | Literal[_Need.MORE]:
        """
        Add C{data}, the next bytes from the client.

        @return: L{NEED_MORE} until the ClientHello is complete; then the
            server name asked for (lower case, no trailing dot), or C{None}
            when the client sent no SNI.  Once decided, the answer stays.
        @raise ClientHelloError: when the bytes cannot be a ClientHello we
            accept (raised again by every later call).
        """
        if self._error is not None:
            raise self._error
        if data:
            self._pieces.append(bytes(data))
            self._size += len(data)
        if self._result is not NEED_MORE:
            return self._result
        if self._size < self._needed:
            return NEED_MORE
        try:
            self._result = self._advance()
        except ClientHelloError as e:
            self._error = e
            raise
        return self._result

    @property
    def buffered(self) -> bytes:
        if len(self._pieces) != 1:
            self._pieces = [b"".join(self._pieces)]
        return self._pieces[0]

    def _advance(self) -> str | None | _Need:
        data = self.buffered
        while True:
            if len(self._handshake) >= 4:
                length = int.from_bytes(self._handshake[1:4], "big")
                if len(self._handshake) >= 4 + length:
                    return parseClientHello(bytes(self._handshake[: 4 + length]))
            start = self._offset
            if len(data) < start + 5:
                self._needed = start + 5
                return NEED_MORE
            header = data[start : start + 5]
            self._checkRecordHeader(header)
            length = int.from_bytes(header[3:5], "big")
            if len(data) < start + 5 + length:
                if self._records == 0:
                    # Judge the handshake header before the first record is whole.
                    self._handshake = bytearray(data[start + 5 : start + 9])
                    self._checkHandshakeHeader()
                    self._handshake.clear()
                self._needed = start + 5 + length
                return NEED_MORE
            self._records += 1
            if self._records > MAX_RECORDS:
                raise ClientHelloError(f"ClientHello split across more than {MAX_RECORDS} TLS records")
            self._handshake += data[start + 5 : start + 5 + length]
            self._offset = start + 5 + length
            self._checkHandshakeHeader()

    def _checkRecordHeader(self, header: bytes) -> None:
        first = self._records == 0
        kind = header[0]
        if kind != _HANDSHAKE:
            if first and kind & 0x80 and len(header) >= 3 and header[2] == _CLIENT_HELLO:
                raise ClientHelloError("SSL 2.0-style ClientHello: it cannot carry a server name")
            if first:
                raise ClientHelloError(f"not TLS: first byte is 0x{kind:02x}, not a handshake record", isTLS=False)
            raise ClientHelloError(f"TLS record of type {kind} in the middle of the ClientHello")
        if header[1] != 3 or header[2] > 4:
            version = f"0x{header[1]:02x}{header[2]:02x}"
            if first:
                raise ClientHelloError(f"not TLS: record version {version}", isTLS=False)
            raise ClientHelloError(f"TLS record version {version} in the middle of the ClientHello")
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            raise ClientHelloError("empty TLS handshake record")
        if length > _MAX_FRAGMENT:
            raise ClientHelloError(f"TLS record of {length} bytes is over the {_MAX_FRAGMENT}-byte maximum")

    def _checkHandshakeHeader(self) -> None:
        handshake = self._handshake
        if handshake and handshake[0] != _CLIENT_HELLO:
            raise ClientHelloError(f"first handshake message is of type {handshake[0]}, not a ClientHello")
        if len(handshake) >= 4:
            length = int.from_bytes(handshake[1:4], "big")
            if 4 + length > self.limit:
                raise ClientHelloError(f"ClientHello of {4 + length} bytes is over the {self.limit}-byte limit")


def serverName(data: bytes, limit: int = DEFAULT_LIMIT) -> str | None | Literal[_Need.MORE]:
    """
    The server name in the ClientHello at the start of C{data}: a one-shot
    L{ClientHelloParser}.
    """
    return ClientHelloParser(limit).feed(data)


class _Reader:
    """
    Bounds-checked reads from a ClientHello body.
    """

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field: str) -> bytes:
        if n > self.remaining():
            raise ClientHelloError(f"truncated {self.what}: {field} needs {n} bytes, {self.remaining()} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self, size: int, field: str) -> int:
        return int.from_bytes(self.take(size, field), "big")

    def vector(self, lengthSize: int, field: str) -> bytes:
        return self.take(self.integer(lengthSize, field + " length"), field)


def parseClientHello(message: bytes) -> str | None:
    """
    The server name in one complete ClientHello handshake message (with its
    4-byte header).

    @raise ClientHelloError: if it is malformed.
    """
    body = _Reader(message[4:], "ClientHello")
    version = body.integer(2, "client version")
    if version >> 8 != 3:
        raise ClientHelloError(f"ClientHello with version 0x{version:04x}")
    body.take(32, "random")
    if len(body.vector(1, "session id")) > 32:
        raise ClientHelloError("ClientHello session id longer than 32 bytes")
    suites = body.vector(2, "cipher suites")
    if not suites or len(suites) % 2:
        raise ClientHelloError("ClientHello cipher suite list is empty or of odd length")
    if not body.vector(1, "compression methods"):
        raise ClientHelloError("ClientHello compression method list is empty")
    if body.remaining() == 0:
        return None  # no extensions at all (SSL 3.0 style)
    extensions = _Reader(body.vector(2, "extensions"), "ClientHello extensions")
    if body.remaining():
        raise ClientHelloError(f"{body.remaining()} stray bytes after the ClientHello extensions")
    seen: set[int] = set()
    name: str | None = None
    while extensions.remaining():
        kind = extensions.integer(2, "extension type")
        data = extensions.vector(2, f"extension {kind}")
        if kind in seen:
            raise ClientHelloError(f"ClientHello repeats extension {kind}")
        seen.add(kind)
        if kind == _SERVER_NAME:
            name = _parseServerName(data)
    return name


def _parseServerName(data: bytes) -> str | None:
    outer = _Reader(data, "server_name extension")
    names = _Reader(outer.vector(2, "server name list"), "server name list")
    if outer.remaining():
        raise ClientHelloError("stray bytes after the server name list")
    found: str | None = None
    types: set[int] = set()
    while names.remaining():
        kind = names.integer(1, "name type")
        value = names.vector(2, "server name")
        if kind in types:
            raise ClientHelloError(f"server name list has two names of type {kind}")
        types.add(kind)
        if kind == _HOST_NAME:
            found = checkHostName(value)
    return found


def checkHostName(value: bytes) -> str:
    """
    C{value} from SNI as a lower-case DNS name.

    @raise ClientHelloError: if it is not one (empty, not ASCII, bad
        characters, too long).
    """
    try:
        text = value.decode("ascii").lower()
    except UnicodeDecodeError:
        raise ClientHelloError("server name is not ASCII") from None
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > 253:
        raise ClientHelloError(f"server name of {len(text)} characters")
    if not all(_LABEL.fullmatch(label) for label in text.split(".")):
        raise ClientHelloError(f"server name {text[:80]!r} is not a DNS name")
    return text
