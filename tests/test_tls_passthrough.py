"""
TLS passthrough end to end: a relay with C{--tls}, an agent with a C{tls}
tunnel, a local HTTPS server holding the only copy of its key, and real TLS
clients (Python's C{ssl}, curl) that must see that server's certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import CertificateOptions
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python import usage
from zope.interface.verify import verifyObject

from tests.conftest import Relay, RunningAgent, closedPort, curl, inThread, originSite, startAgent, startRelay
from txtunnel.forwarders import tls as tlsModule
from txtunnel.forwarders.tls import TLSForwarder, TLSRouter, TLSRouterFactory
from txtunnel.interfaces import IForwarder, IRelay
from txtunnel.relay import tap as relayTap
from txtunnel.relay.hosts import HostTable
from txtunnel.sni import UNRECOGNIZED_NAME, alertRecord
from txtunnel.splice import StreamSide

HOST = "secure.localhost"


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def checkoutPlugins(tmp_path_factory: Any, monkeypatch: Any) -> Iterator[None]:
    """
    Use this checkout's forwarder plugin file even when an installed
    txtunnel's file of the same name comes first on C{twisted.plugins}'
    path (so ``tls`` is found before the package is reinstalled): a copy
    under another module name, found as any plugin is.
    """
    plugins = tmp_path_factory.mktemp("checkout-plugins") / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    source = (ROOT / "twisted" / "plugins" / "txtunnel_forwarders.py").read_text()
    (plugins / "txtunnel_forwarders_checkout.py").write_text(source)
    import twisted.plugins

    monkeypatch.setattr(twisted.plugins, "__path__", [*twisted.plugins.__path__, str(plugins)])
    yield
    sys.modules.pop("twisted.plugins.txtunnel_forwarders_checkout", None)


# -- certificates


class Certs:
    """
    A throwaway CA and a leaf certificate for L{HOST}, as files.
    """

    def __init__(self, directory: Path) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        caKey = ec.generate_private_key(ec.SECP256R1())
        caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "txtunnel test CA")])
        ca = (
            x509.CertificateBuilder()
            .subject_name(caName)
            .issuer_name(caName)
            .public_key(caKey.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(caKey.public_key()), critical=False)
            .sign(caKey, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
            .issuer_name(caName)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()), critical=False)
            .sign(caKey, hashes.SHA256())
        )
        self.key = key
        self.leaf = leaf
        self.caFile = directory / "ca.pem"
        self.certFile = directory / "cert.pem"
        self.keyFile = directory / "key.pem"
        self.caFile.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.certFile.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        self.keyPEM = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.keyFile.write_bytes(self.keyPEM)
        #: SHA-256 of the leaf certificate's DER: what a client must see.
        self.fingerprint = leaf.fingerprint(hashes.SHA256())

    def clientContext(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.caFile))


@pytest.fixture(scope="module")
def certs(tmp_path_factory: Any) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tlsOrigin(certs: Certs) -> Iterator[int]:
    """
    The local HTTPS service: the conftest origin site behind TLS, holding
    the key.  ALPN is named because Twisted 26's server otherwise fails
    handshakes with clients that offer ALPN (curl).
    """
    options = CertificateOptions(
        privateKey=certs.key,  # type: ignore[arg-type]
        certificate=certs.leaf,  # type: ignore[arg-type]
        acceptableProtocols=[b"http/1.1"],
    )
    port = pytest_twisted.blockon(SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(originSite()))
    yield port.getHost().port
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def tlsRelay(tmp_path: Path) -> Iterator[Relay]:
    r = pytest_twisted.blockon(
        defer.ensureDeferred(startRelay(str(tmp_path / "tls-state"), "--tls", "tcp:0:interface=127.0.0.1"))
    )
    yield r
    pytest_twisted.blockon(defer.maybeDeferred(r.service.stopService))


def agentConfig(tmp_path: Path, target: int, subdomain: str | None = HOST.split(".")[0], name: str = "web") -> str:
    path = tmp_path / f"agent-{secrets.token_hex(4)}.ini"
    lines = [f"[tunnel:{name}]", "type = tls", f"target = {target}"]
    if subdomain:
        lines.append(f"subdomain = {subdomain}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


async def startTLSAgent(
    agents: list[RunningAgent], relay: Relay, tmp_path: Path, target: int, **kw: Any
) -> RunningAgent:
    expectReady = kw.pop("expectReady", True)
    return await startAgent(agents, relay, "--config", agentConfig(tmp_path, target, **kw), expectReady=expectReady)


def tlsPort(relay: Relay) -> int:
    port = relay.relay.tlsPort
    assert port is not None
    return port


# -- blocking clients (run in a thread)


def readAll(s: Any) -> bytes:
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def fetch(port: int, ctx: ssl.SSLContext, path: str = "/", host: str = HOST) -> tuple[bytes, bytes]:
    """
    GET C{path} over TLS with SNI C{host}; return (peer certificate DER, response).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            der = s.getpeercert(binary_form=True)
            assert der is not None
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            return der, readAll(s)


def refusedHandshake(port: int, ctx: ssl.SSLContext, host: str | None) -> str:
    """
    Try a handshake that the relay must refuse; return the error text.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host):
                pass
        except (ssl.SSLError, ConnectionResetError) as e:
            return str(e)
    raise AssertionError(f"the handshake for {host!r} succeeded")


def sendGarbage(port: int, data: bytes) -> tuple[bytes, float]:
    """
    Send C{data}; return what comes back before the relay closes, and how long that took.
    """
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return b"", time.monotonic() - start
        try:
            got = readAll(s)
        except TimeoutError:
            raise AssertionError("the relay did not close the connection") from None
    return got, time.monotonic() - start


class BIOClient:
    """
    A TLS client over a plain socket through a MemoryBIO, so the test
    controls how its first flight is cut into TCP segments and TLS records.
    """

    def __init__(self, port: int, ctx: ssl.SSLContext, host: str = HOST) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=host)

    def clientHello(self) -> bytes:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        return self.outgoing.read()

    def finishHandshake(self) -> None:
        for _ in range(100):
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.flush()
                data = self.sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                self.incoming.write(data)
        self.flush()

    def flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def get(self, path: str = "/") -> bytes:
        self.tls.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        self.flush()
        chunks = []
        while True:
            try:
                chunk = self.tls.read(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            data = self.sock.recv(65536)
            if not data:
                break
            self.incoming.write(data)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def asRecords(hello: bytes, size: int) -> bytes:
    """
    Re-cut the handshake message in the single record C{hello} into
    records of C{size} bytes: a valid, if unusual, first flight.
    """
    assert hello[0] == 0x16
    version = hello[1:3]
    length = int.from_bytes(hello[3:5], "big")
    message = hello[5 : 5 + length]
    out = b""
    for i in range(0, len(message), size):
        piece = message[i : i + size]
        out += b"\x16" + version + len(piece).to_bytes(2, "big") + piece
    return out + hello[5 + length :]


# -- end to end


@pytest_twisted.ensureDeferred
async def test_page_through_passthrough_with_local_certificate(
    tlsRelay: Relay, agents: list[RunningAgent], tlsOrigin: int, certs: Certs, tmp_path: Path, monkeypatch: Any
) -> None:
    """
    A TLS client reaching C{secure.localhost} on the relay's TLS port
    verifies the local service's certificate (same fingerprint) and gets its
    page; no byte the relay or agent handles contains the plaintext, and
    the relay was never given the key.
    """
    seen: list[bytes] = []
    routerData = TLSRouter.dataReceived
    streamData = StreamSide.dataReceived

    def recordRouter(self: TLSRouter, data: bytes) -> None:
        seen.append(data)
        routerData(self, data)

    def recordStream(self: StreamSide, data: bytes) -> None:
        seen.append(data)
        streamData(self, data)

    monkeypatch.setattr(TLSRouter, "dataReceived", recordRouter)
    monkeypatch.setattr(StreamSide, "dataReceived", recordStream)

    agent = await startTLSAgent(agents, tlsRelay, tmp_path, tlsOrigin)
    port = tlsPort(tlsRelay)
    assert agent.address() == f"tls://{HOST}:{port}"
    secret = secrets.token_hex(16)
    der, response = await inThread(fetch, port, certs.clientContext(), f"/hello?{secret}")
    assert hashlib.sha256(der).digest() == certs.fingerprint
    assert response.startswith(b"HTTP/1.1 200")
    assert b"hello from origin" in response
    assert secret.encode() in response
    assert seen, "nothing passed through the tunnel's byte handlers"
    everything = b"".join(seen)
    assert secret.encode() not in everything
    assert b"hello from origin" not in everything
    assert b"secure.localhost" in everything  # only the SNI is in the clear
    keyPath = str(certs.keyFile)
    assert all(keyPath not in str(v) for v in tlsRelay.relay.settings.values())
    assert certs.keyPEM not in Path(agentConfig(tmp_path, tlsOrigin)).read_bytes()

    code, out, err = await curl(
        "--resolve", f"{HOST}:{port}:127.0.0.1", "--cacert", str(certs.caFile), f"https://{HOST}:{port}/hello"
    )
    assert code == 0, err
    assert b"hello from origin" in out
    code, out, err = await curl(
        "--resolve",
        f"{HOST}:{port}:127.0.0.1",
        "--cacert",
        str(certs.caFile),
        "-w",
        "%{certs}",
        "-o",
        "/dev/null",
        f"https://{HOST}:{port}/hello",
    )
    assert code == 0, err
    if b"BEGIN CERTIFICATE" in out:  # curl >= 7.88 prints the chain it verified
        pem = out[out.index(b"-----BEGIN CERTIFICATE-----") :]
        pem = pem[: pem.index(b"-----END CERTIFICATE-----") + 25]
        assert x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()) == certs.fingerprint


@pytest_twisted.ensureDeferred
async def test_refused_visitors_do_not_disturb_a_good_connection(
    tlsRelay: Relay, agents: list[RunningAgent], tlsOrigin: int, certs: Certs, tmp_path: Path
) -> None:
    """
    Unknown SNI, no SNI, a name outside the relay's domain and plain-text
    garbage are each closed (TLS clients get an unrecognized_name alert),
    with a log line naming the peer and reason, while a good connection
    opened before them keeps working.
    """
    await startTLSAgent(agents, tlsRelay, tmp_path, tlsOrigin)
    port = tlsPort(tlsRelay)
    ctx = certs.clientContext()
    good = BIOClient(port, ctx)
    try:
        hello = good.clientHello()
        await inThread(good.sock.sendall, hello)
        await inThread(good.finishHandshake)

        noSNI = certs.clientContext()
        noSNI.check_hostname = False
        with capturedLogs() as events:
            unknown = await inThread(refusedHandshake, port, ctx, "nobody.localhost")
            missing = await inThread(refusedHandshake, port, noSNI, None)
            outside = await inThread(refusedHandshake, port, ctx, "secure.example.com")
            got, _ = await inThread(sendGarbage, port, b"GET / HTTP/1.1\r\nHost: secure.localhost\r\n\r\n")
        assert "UNRECOGNIZED_NAME" in unknown.upper().replace(" ", "_")
        assert "UNRECOGNIZED_NAME" in missing.upper().replace(" ", "_")
        assert "UNRECOGNIZED_NAME" in outside.upper().replace(" ", "_")
        assert got == b""
        lines = [e.get("reason", "") for e in events if "TLS visitor" in e.get("log_format", "")]
        assert any("'nobody.localhost'" in line for line in lines)
        assert any("no server name" in line for line in lines)
        assert any("not TLS" in line for line in lines)
        assert all(e.get("peer") == "127.0.0.1" for e in events if "TLS visitor" in e.get("log_format", ""))

        response = await inThread(good.get, "/hello")
        assert response.startswith(b"HTTP/1.1 200") and b"hello from origin" in response
    finally:
        good.close()


@pytest_twisted.ensureDeferred
async def test_hello_in_tiny_segments_and_many_records(
    tlsRelay: Relay, agents: list[RunningAgent], tlsOrigin: int, certs: Certs, tmp_path: Path
) -> None:
    """
    A ClientHello that arrives a few bytes per TCP segment, or re-cut into
    many small TLS records, is still routed, and the local server completes
    the handshake.
    """
    await startTLSAgent(agents, tlsRelay, tmp_path, tlsOrigin)
    port = tlsPort(tlsRelay)

    def trickle(client: BIOClient, data: bytes, step: int) -> None:
        for i in range(0, len(data), step):
            client.sock.sendall(data[i : i + step])
            time.sleep(0.002)

    for step, recordSize in ((3, None), (50, 37)):
        client = BIOClient(port, certs.clientContext())
        try:
            hello = client.clientHello()
            if recordSize is not None:
                hello = asRecords(hello, recordSize)
                assert hello.count(b"\x16\x03") >= 10
            await inThread(trickle, client, hello, step)
            await inThread(client.finishHandshake)
            der = client.tls.getpeercert(binary_form=True)
            assert der is not None and hashlib.sha256(der).digest() == certs.fingerprint
            response = await inThread(client.get, "/hello")
            assert b"hello from origin" in response
        finally:
            client.close()


@pytest_twisted.ensureDeferred
async def test_oversize_and_stalled_hellos_are_cut_off(
    tmp_path: Path, agents: list[RunningAgent], tlsOrigin: int, certs: Certs, monkeypatch: Any
) -> None:
    """
    A ClientHello over the size limit is refused as soon as its header says
    so; one that never completes is cut off after the hello timeout; a good
    connection at the same time is unaffected.
    """
    monkeypatch.setattr(TLSRouterFactory, "helloTimeout", 1.0)
    relay = await startRelay(str(tmp_path / "state"), "--tls", "tcp:0:interface=127.0.0.1")
    try:
        await startTLSAgent(agents, relay, tmp_path, tlsOrigin)
        port = tlsPort(relay)
        # A handshake record claiming a 1 MiB ClientHello.
        huge = b"\x16\x03\x01\x40\x00" + b"\x01\x10\x00\x00" + os.urandom(16000)
        got, elapsed = await inThread(sendGarbage, port, huge)
        assert got in (b"", alertRecord(50)) and elapsed < 5
        # A real ClientHello cut into 1-byte records: refused after 64 of them.
        client = BIOClient(port, certs.clientContext())
        try:
            pieces = asRecords(client.clientHello(), 1)
            got, elapsed = await inThread(sendGarbage, port, pieces)
            assert got in (b"", alertRecord(50)) and elapsed < 5
        finally:
            client.close()

        stalled = socket.create_connection(("127.0.0.1", port), timeout=15)
        stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01")  # a header, then nothing
        try:
            start = time.monotonic()
            good = await inThread(fetch, port, certs.clientContext(), "/hello")
            assert b"hello from origin" in good[1]
            data = await inThread(readAll, stalled)
            elapsed = time.monotonic() - start
            assert data == b""
            assert 0.5 < elapsed < 5
        finally:
            stalled.close()
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_local_service_down_closes_visitor(
    tlsRelay: Relay, agents: list[RunningAgent], certs: Certs, tmp_path: Path
) -> None:
    """
    When the agent cannot reach the local service, the visitor's connection
    is closed at once.
    """
    await startTLSAgent(agents, tlsRelay, tmp_path, closedPort())
    start = time.monotonic()
    error = await inThread(refusedHandshake, tlsPort(tlsRelay), certs.clientContext(), HOST)
    assert time.monotonic() - start < 5
    assert error


def closingTLSServer(certs: Certs) -> tuple[int, Any]:
    """
    A local HTTPS service in a thread that answers one request with the
    head and the first bytes of a 1 MB body, then drops its TCP connection
    (no close_notify): a service that dies mid-response.

    @return: its port and the thread (joined by the caller).
    """
    import threading

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(certs.certFile), str(certs.keyFile))
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            listener.settimeout(20)
            raw, _ = listener.accept()
            with context.wrap_socket(raw, server_side=True) as s:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += s.recv(4096)
                s.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial body")
                s.shutdown(socket.SHUT_RDWR)  # a TCP FIN, no TLS close_notify

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


@pytest_twisted.ensureDeferred
async def test_local_service_closing_mid_stream_closes_visitor(
    tlsRelay: Relay, agents: list[RunningAgent], certs: Certs, tmp_path: Path
) -> None:
    """
    When the local TLS service drops its connection in the middle of a
    response, the visitor gets what was sent and then sees its own
    connection closed promptly, not a connection left open until its
    timeout.
    """
    port, server = closingTLSServer(certs)
    await startTLSAgent(agents, tlsRelay, tmp_path, port)

    def visit() -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", tlsPort(tlsRelay)), timeout=15) as raw:
            with certs.clientContext().wrap_socket(raw, server_hostname=HOST) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
                got = s.recv(65536)
                while b"partial body" not in got:
                    got += s.recv(65536)
                start = time.monotonic()
                got += readAll(s)  # returns at EOF; a socket left open times out and fails
                return got, time.monotonic() - start

    got, after = await inThread(visit)
    await inThread(server.join, 10)
    assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"partial body")
    assert after < 5, f"the visitor saw the close {after:.1f}s after the service dropped"


@pytest_twisted.ensureDeferred
async def test_names_are_claimed_and_freed(
    tlsRelay: Relay, relay: Relay, agents: list[RunningAgent], tlsOrigin: int, certs: Certs, tmp_path: Path
) -> None:
    """
    A taken name is refused to a second agent; an agent without a subdomain
    gets a random name; when the holder goes away its name is free again and
    no longer routed; a relay without --tls refuses tls tunnels.
    """
    first = await startTLSAgent(agents, tlsRelay, tmp_path, tlsOrigin)
    second = await startTLSAgent(agents, tlsRelay, tmp_path, tlsOrigin, expectReady=False)
    with pytest.raises(RuntimeError, match="in use on this relay"):
        await second.agent.ready
    anonymous = await startTLSAgent(agents, tlsRelay, tmp_path, tlsOrigin, subdomain=None)
    address = anonymous.address()
    assert address.startswith("tls://") and address.endswith(f".localhost:{tlsPort(tlsRelay)}")
    firstAddress = first.address()
    assert address != firstAddress

    await first.stop()
    for _ in range(100):
        if tlsRelay.relay.tlsHosts.get("secure") is None:
            break
        await defer.ensureDeferred(_sleep(0.05))
    error = await inThread(refusedHandshake, tlsPort(tlsRelay), certs.clientContext(), HOST)
    assert "UNRECOGNIZED_NAME" in error.upper().replace(" ", "_")
    third = await startTLSAgent(agents, tlsRelay, tmp_path, tlsOrigin)
    assert third.address() == firstAddress

    noTLS = await startTLSAgent(agents, relay, tmp_path, tlsOrigin, expectReady=False)
    with pytest.raises(RuntimeError, match="no TLS passthrough listener"):
        await noTLS.agent.ready


async def _sleep(seconds: float) -> None:
    from twisted.internet import task

    await task.deferLater(reactor, seconds, lambda: None)


# -- units


def test_tls_option() -> None:
    """
    C{--tls} is off by default, takes a plain endpoint, and refuses one
    that would terminate TLS on the relay.
    """
    options = relayTap.Options(environ={})
    options.parseOptions([])
    assert options["tls"] == ""
    options = relayTap.Options(environ={})
    options.parseOptions(["--tls", "tcp:8443:interface=127.0.0.1"])
    assert options["tls"] == "tcp:8443:interface=127.0.0.1"
    options = relayTap.Options(environ={"TXTUNNEL_RELAY_TLS": "tcp:9443"})
    options.parseOptions([])
    assert options["tls"] == "tcp:9443"
    with pytest.raises(usage.UsageError, match="would terminate TLS"):
        relayTap.Options(environ={}).parseOptions(["--tls", "ssl:443:privateKey=k.pem"])
    with pytest.raises(usage.UsageError, match="--tls"):
        relayTap.Options(environ={}).parseOptions(["--tls", "nonsense:1"])


def test_forwarder_provides_interface() -> None:
    from txtunnel.plugins import forwarders

    found = forwarders()
    assert "tls" in found
    assert verifyObject(IForwarder, found["tls"])
    assert verifyObject(IForwarder, TLSForwarder())


class FakeTunnel:
    def __init__(self) -> None:
        self.opened: list[dict[str, Any]] = []

    def openStream(self, header: dict[str, Any], protocol: Any) -> Any:
        self.opened.append(header)
        raise ConnectionError("link gone")


class FakeRelay:
    def __init__(self) -> None:
        self.reactor = Clock()
        self.domain = "localhost"
        self.tlsHosts = HostTable("localhost")
        self.tlsPort = 8443


def router(**kw: Any) -> tuple[TLSRouter, StringTransport, FakeRelay]:
    relay = FakeRelay()
    protocol = TLSRouterFactory(relay, **kw).buildProtocol(None)  # type: ignore[arg-type]
    transport = StringTransport(peerAddress=None)
    protocol.makeConnection(transport)
    return protocol, transport, relay


def clientHello(host: str | None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname=host)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


def test_router_timeout_uses_the_relay_clock() -> None:
    protocol, transport, relay = router(helloTimeout=3.0)
    protocol.dataReceived(clientHello(HOST)[:20])
    relay.reactor.advance(2.9)
    assert not transport.disconnecting
    with capturedLogs() as events:
        relay.reactor.advance(0.2)
    assert transport.disconnecting and transport.disconnected  # aborted
    assert any("no complete ClientHello within 3s" in e.get("reason", "") for e in events)
    assert not relay.reactor.getDelayedCalls()


def test_router_unknown_name_gets_alert_and_nothing_more() -> None:
    protocol, transport, relay = router()
    protocol.dataReceived(clientHello("nobody.localhost"))
    assert transport.value() == alertRecord(UNRECOGNIZED_NAME)
    assert transport.disconnecting
    protocol.dataReceived(b"more")
    assert transport.value() == alertRecord(UNRECOGNIZED_NAME)
    assert not relay.reactor.getDelayedCalls()


def test_router_link_gone_is_closed() -> None:
    protocol, transport, relay = router()
    tunnel = FakeTunnel()
    relay.tlsHosts.add("secure", tunnel)
    protocol.dataReceived(clientHello(HOST))
    assert tunnel.opened == [{"peer": "192.168.1.1", "sni": HOST}]
    assert transport.disconnecting


def test_router_half_close_before_hello() -> None:
    protocol, transport, relay = router()
    protocol.dataReceived(b"\x16\x03\x01")
    protocol.readConnectionLost()
    assert transport.disconnecting
    assert not relay.reactor.getDelayedCalls()


def test_router_size_limit() -> None:
    protocol, transport, relay = router(helloLimit=512)
    protocol.dataReceived(clientHello("a-rather-long-name-" + "x" * 40 + ".localhost") + b"")
    assert transport.disconnecting


def test_tls_url_uses_tls_port() -> None:
    relay = FakeRelay()
    assert tlsModule.tlsURL(relay, "demo") == "tls://demo.localhost:8443"  # type: ignore[arg-type]
    assert "tlsHosts" in IRelay.names() and "tlsPort" in IRelay.names()


# -- as a user runs it


@pytest.mark.contract
def test_twistd_relay_and_agent(tmp_path: Path, certs: Certs) -> None:
    """
    C{twistd tunnelrelay --tls} and C{twistd tunnelagent} with a C{tls}
    tunnel, as processes running this checkout; the relay process is given
    no certificate or key, and curl verifies the local service's.
    """
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    root = ROOT

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"hello over passthrough\n"
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    serverCtx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    serverCtx.load_cert_chain(str(certs.certFile), str(certs.keyFile))
    server.socket = serverCtx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()

    # The installed txtunnel's plugin file may predate tls; this module
    # registers the checkout's forwarder the way any third party would.
    plugins = tmp_path / "plugins" / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "txtunnel_tls_checkout.py").write_text(
        textwrap.dedent(
            """
            from txtunnel.plugins import LazyForwarder
            tls = LazyForwarder("tls", "txtunnel.forwarders.tls.TLSForwarder", "TLS passthrough (checkout)")
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TXTUNNEL_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path / "plugins"), str(root / "src")]),
        PYTHONUNBUFFERED="1",
        HOME=str(tmp_path / "home"),
        XDG_STATE_HOME=str(tmp_path / "state"),
    )
    httpPort, tlsPort_ = freePort(), freePort()
    twistd = str(Path(sys.executable).parent / "twistd")
    relayArgs = [
        twistd, "-n", "--pidfile=", "tunnelrelay",
        "--http", f"tcp:{httpPort}:interface=127.0.0.1",
        "--tls", f"tcp:{tlsPort_}:interface=127.0.0.1",
        "--state-dir", str(tmp_path / "relay-state"),
    ]  # fmt: skip
    config = tmp_path / "agent.ini"
    config.write_text(
        f"[agent]\nrelay = ws://127.0.0.1:{httpPort}\n\n"
        f"[tunnel:web]\ntype = tls\ntarget = {server.server_address[1]}\nsubdomain = secure\n"
    )
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / "relay.log", tmp_path / "agent.log"]
    try:
        with logs[0].open("wb") as out:
            procs.append(subprocess.Popen(relayArgs, env=env, stdout=out, stderr=subprocess.STDOUT))
        waitForLog(logs[0], "TLS passthrough on", procs[0])
        with logs[1].open("wb") as out:
            agentArgs = [twistd, "-n", "--pidfile=", "tunnelagent", "--config", str(config)]
            procs.append(subprocess.Popen(agentArgs, env=env, stdout=out, stderr=subprocess.STDOUT))
        line = waitForLog(logs[1], "tunnel ready:", procs[1])
        assert f"tls://secure.localhost:{tlsPort_}" in line
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "30", "--resolve", f"{HOST}:{tlsPort_}:127.0.0.1",
             "--cacert", str(certs.caFile), f"https://{HOST}:{tlsPort_}/"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"hello over passthrough\n"
        der, response = fetch(tlsPort_, certs.clientContext())
        assert hashlib.sha256(der).digest() == certs.fingerprint
        assert response.endswith(b"hello over passthrough\n")
        assert str(certs.keyFile) not in " ".join(relayArgs)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        server.shutdown()
        server.server_close()


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitForLog(path: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if text in line:
                return line
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in {path.name}:\n{path.read_text(errors='replace')}")


# -- the agent holds the certificate (--tls-cert / --tls-key)


@pytest_twisted.ensureDeferred
async def test_agent_terminates_tls_for_a_plain_local_service(
    tlsRelay: Relay, agents: list[RunningAgent], origin: int, tmp_path: Path
) -> None:
    """
    A C{tls} tunnel with C{tls-cert}/C{tls-key}: the agent ends the
    visitor's TLS session with its own certificate (from a CA made here,
    which the relay never sees) and speaks plain HTTP to a local service
    that has no TLS at all; curl, trusting only that CA, gets the page.
    A second visitor whose client does not trust the CA is refused in the
    handshake, and the agent keeps serving.
    """
    from tests.pki import CA

    ca = CA(tmp_path, "agent-ca")
    cert, key = ca.server("secure", HOST, keySeparate=True)
    assert key is not None
    config = tmp_path / "agent-terminates.ini"
    config.write_text(
        f"[tunnel:web]\ntype = tls\ntarget = {origin}\nsubdomain = secure\ntls-cert = {cert}\ntls-key = {key}\n"
    )
    await startAgent(agents, tlsRelay, "--config", str(config))
    port = tlsPort(tlsRelay)
    url = f"https://{HOST}:{port}/hello"
    code, out, err = await curl("--cacert", str(ca.path), "--resolve", f"{HOST}:{port}:127.0.0.1", url)
    assert code == 0, err
    assert out.startswith(b"hello from origin\npath=/hello\n")
    assert f"host={HOST}:{port}".encode() in out  # the request reached the plain service unchanged
    code, _, err = await curl("--resolve", f"{HOST}:{port}:127.0.0.1", url)
    assert code == 60, err  # the system's CAs do not know the agent's
    code, out, err = await curl("--cacert", str(ca.path), "--resolve", f"{HOST}:{port}:127.0.0.1", url)
    assert code == 0 and out.startswith(b"hello from origin"), err


@pytest_twisted.ensureDeferred
async def test_agent_terminating_tls_with_service_down(
    tlsRelay: Relay, agents: list[RunningAgent], tmp_path: Path
) -> None:
    """
    With C{--tls-cert} and nothing listening at the target, the visitor's
    connection is closed at once (no handshake), as for passthrough.
    """
    from tests.pki import CA

    ca = CA(tmp_path, "agent-ca")
    both, _ = ca.server("secure", HOST)
    config = tmp_path / "down.ini"
    config.write_text(f"[tunnel:web]\ntype = tls\ntarget = {closedPort()}\nsubdomain = secure\ntls-cert = {both}\n")
    await startAgent(agents, tlsRelay, "--config", str(config))
    start = time.monotonic()
    error = await inThread(refusedHandshake, tlsPort(tlsRelay), ssl.create_default_context(cafile=str(ca.path)), HOST)
    assert time.monotonic() - start < 5
    assert error


@pytest_twisted.ensureDeferred
async def test_agent_terminating_tls_uses_the_circuit_breaker(
    tlsRelay: Relay, agents: list[RunningAgent], tmp_path: Path
) -> None:
    """
    The agent-terminated path counts failures to reach the local service
    in the tunnel's circuit breaker, as passthrough does: after
    C{breaker-failures} refusals the circuit opens, and the next visitor is
    turned away without a connection attempt.
    """
    from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
    from zope.interface import provider

    from tests.pki import CA
    from txtunnel.agent.breaker import BreakerState

    ca = CA(tmp_path, "agent-ca")
    both, _ = ca.server("secure", HOST)
    config = tmp_path / "down.ini"
    config.write_text(
        f"[tunnel:web]\ntype = tls\ntarget = {closedPort()}\nsubdomain = secure\ntls-cert = {both}\n"
        "breaker-failures = 2\nbreaker-cooldown = 600\n"
    )
    running = await startAgent(agents, tlsRelay, "--config", str(config))
    [tunnel] = running.agent.tunnels
    context = ssl.create_default_context(cafile=str(ca.path))
    events: list[str] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        events.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(2):
            assert await inThread(refusedHandshake, tlsPort(tlsRelay), context, HOST)
        for _ in range(200):
            if tunnel.breaker.state is BreakerState.OPEN:
                break
            await _sleep(0.05)
        assert tunnel.breaker.state is BreakerState.OPEN
        tries = sum("cannot reach local service" in e for e in events)
        assert tries == 2
        assert await inThread(refusedHandshake, tlsPort(tlsRelay), context, HOST)
        assert sum("cannot reach local service" in e for e in events) == tries
    finally:
        globalLogPublisher.removeObserver(observe)


def test_tls_cert_option_errors(tmp_path: Path) -> None:
    """
    Bad or missing certificate files, a key without a certificate, a key
    that is not the certificate's, and C{tls-cert} on another kind of
    tunnel are usage errors that name the option (or the file, section and
    key) and the file.
    """
    from tests.pki import CA
    from txtunnel.agent.tap import Options

    ca = CA(tmp_path, "ca")
    cert, key = ca.server("one", HOST, keySeparate=True)
    other, otherKey = ca.server("two", HOST, keySeparate=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")

    def error(*args: str) -> str:
        with pytest.raises(usage.UsageError) as caught:
            Options(environ={}).parseOptions(list(args))
        return str(caught.value)

    assert "--tls-cert: " in error("--tls", "8443", "--tls-cert", str(tmp_path / "missing.pem"))
    assert "is not a file" in error("--tls", "8443", "--tls-cert", str(tmp_path / "missing.pem"))
    message = error("--tls", "8443", "--tls-cert", str(junk), "--tls-key", str(key))
    assert message.startswith("--tls-cert: ") and str(junk) in message and "no PEM certificate" in message
    message = error("--tls", "8443", "--tls-cert", str(cert))
    assert message.startswith("--tls-cert: ") and "no unencrypted PEM private key" in message
    message = error("--tls", "8443", "--tls-cert", str(cert), "--tls-key", str(otherKey))
    assert "--tls-key" in message and "does not belong to the certificate" in message
    assert error("--tls", "8443", "--tls-key", str(key)).startswith("--tls-key needs --tls-cert")
    assert "applies to --tls tunnels" in error("--tcp", "22", "--tls-cert", str(cert), "--tls-key", str(key))
    config = tmp_path / "agent.ini"
    config.write_text(f"[tunnel:db]\ntype = tcp\ntarget = 5432\ntls-cert = {cert}\n")
    assert f"{config} [tunnel:db] tls-cert: only tunnels of type = tls have one" in error("--config", str(config))
    config.write_text(f"[tunnel:web]\ntype = tls\ntarget = 8443\ntls-cert = {junk}\ntls-key = {key}\n")
    message = error("--config", str(config))
    assert message.startswith(f"{config} [tunnel:web] tls-cert: ") and "no PEM certificate" in message
    ok = Options(environ={"TXTUNNEL_TLS_CERT": str(other), "TXTUNNEL_TLS_KEY": str(otherKey)})
    ok.parseOptions(["--tls", "8443"])
    assert ok.tunnels[0]["options"]["tls-server"] is not None


@pytest.mark.contract
def test_twistd_agent_terminates_tls(tmp_path: Path) -> None:
    """
    C{twistd tunnelagent --tls PORT --tls-cert FILE --tls-key FILE} in
    front of a plain HTTP server, behind C{twistd tunnelrelay --tls}: curl
    trusting only the test's CA gets the page over HTTPS.
    """
    from tests.pki import CA
    from tests.test_contract import STOPPED_BY_SIGTERM, Proc, startAgent, startRelay

    ca = CA(tmp_path, "agent-ca")
    cert, key = ca.server("secure", HOST, keySeparate=True)
    assert key is not None
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("plain behind the agent's TLS\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TXTUNNEL_")}
    env.update(HOME=str(tmp_path / "home"), XDG_STATE_HOME=str(tmp_path / "xdg"), PYTHONUNBUFFERED="1")
    env["TXTUNNEL_RELAY_ADMIN"] = env["TXTUNNEL_ADMIN"] = env["TXTUNNEL_INSPECT"] = ""
    procs: list[Proc] = []
    try:
        webPort = freePort()
        web = Proc(
            [sys.executable, "-m", "http.server", str(webPort), "--bind", "127.0.0.1", "--directory", str(www)], env
        )
        procs.append(web)
        web.waitFor("Serving HTTP")
        tlsPublic = freePort()
        relay, port = startRelay(procs, env, tmp_path / "state", "--tls", f"tcp:{tlsPublic}:interface=127.0.0.1")
        agent = startAgent(
            procs, env, port, "--tls", str(webPort), "-s", "secure", "--tls-cert", str(cert), "--tls-key", str(key)
        )
        agent.waitFor(f"tunnel ready: tls://{HOST}:{tlsPublic} -> 127.0.0.1:{webPort}")
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "--cacert", str(ca.path),
             "--resolve", f"{HOST}:{tlsPublic}:127.0.0.1", f"https://{HOST}:{tlsPublic}/"],
            capture_output=True, timeout=30,
        )  # fmt: skip
        assert result.stdout == b"plain behind the agent's TLS\n", result.stderr
        for p in (agent, relay):
            assert p.stop() in STOPPED_BY_SIGTERM
        assert "Traceback" not in relay.output + agent.output
    finally:
        for p in procs:
            p.stop()
