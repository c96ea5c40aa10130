"""
The relay's HTTPS certificates and TLS settings (txtunnel.certificates,
txtunnel.tlscontext):
SNI choice, TLS versions and ciphers, ALPN, the self-signed development
certificate, and the --https options -- in memory and through a real relay
with curl.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from OpenSSL import SSL
from twisted.internet import defer
from twisted.python import usage

from tests.conftest import RunningAgent, curl, inThread, startAgent, startRelay
from tests.pki import CA
from txtunnel.certificates import (
    CertificateError,
    DevelopmentCA,
    loadServerCertificate,
    serverCertificatesFromDirectory,
)
from txtunnel.relay import tap as relayTap
from txtunnel.tlscontext import ServerTLS, splitHTTPSEndpoint


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA(tmp_path, "relay")


def _pump(client: SSL.Connection, server: SSL.Connection) -> None:
    """
    Run a handshake between two memory-BIO connections; raise what either
    side raises.
    """
    for _ in range(20):
        done = 0
        for conn in (client, server):
            try:
                conn.do_handshake()
                done += 1
            except SSL.WantReadError:
                pass
        for a, b in ((client, server), (server, client)):
            try:
                b.bio_write(a.bio_read(65536))
            except SSL.WantReadError:
                pass
        if done == 2:
            return
    raise AssertionError("handshake did not finish")


def _client(
    name: str | None, *, maxVersion: int | None = None, ciphers: bytes | None = None, alpn: list[bytes] | None = None
) -> SSL.Connection:
    context = SSL.Context(SSL.TLS_METHOD)
    if maxVersion is not None:
        context.set_min_proto_version(0)
        context.set_max_proto_version(maxVersion)
    if ciphers is not None:
        context.set_cipher_list(ciphers)
    if alpn is not None:
        context.set_alpn_protos(alpn)
    conn = SSL.Connection(context, None)
    if name:
        conn.set_tlsext_host_name(name.encode())
    conn.set_connect_state()
    return conn


def _server(tls: ServerTLS) -> SSL.Connection:
    conn = tls.serverConnectionForTLS(None)
    conn.set_accept_state()
    return conn


def _servedNames(client: SSL.Connection) -> list[str]:
    cert = client.get_peer_certificate(as_cryptography=True)
    assert cert is not None
    return list(
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    )


def test_sni_picks_exact_then_wildcard_then_default(ca: CA) -> None:
    """
    A specific certificate wins over the wildcard for its own name; other
    names under the domain get the wildcard; no SNI, or an unknown name,
    gets the first certificate.
    """
    wild, _ = ca.server("wild", "*.example.test", "example.test")
    special, _ = ca.server("special", "special.example.test")
    other, _ = ca.server("other", "other.test")
    tls = ServerTLS([loadServerCertificate(str(p)) for p in (wild, special, other)])
    for name, expected in [
        ("a.example.test", "*.example.test"),
        ("special.example.test", "special.example.test"),
        ("example.test", "*.example.test"),
        ("other.test", "other.test"),
        ("x.other.test", "*.example.test"),
        ("deep.a.example.test", "*.example.test"),
        (None, "*.example.test"),
    ]:
        client = _client(name)
        _pump(client, _server(tls))
        assert _servedNames(client)[0] == expected, name


def test_hostile_server_names(tmp_path: Path) -> None:
    """
    Odd, long or many server names get the default certificate (or, under
    a development CA, one on-demand certificate each, with the cache
    bounded); a failing client-certificate decision asks for one.
    """
    ca, _ = DevelopmentCA.inDirectory(str(tmp_path), "localhost")
    asked: list[str | None] = []

    def wants(name: str | None) -> bool:
        asked.append(name)
        raise RuntimeError("broken policy")

    tls = ServerTLS([ca.defaultCertificate()], wantsClientCertificate=wants, developmentCA=ca)
    for name in ("x" * 250, "a..localhost", "-.localhost", "UPPER.LOCALHOST."):
        client = _client(name)
        server = _server(tls)
        _pump(client, server)
        served = _servedNames(client)
        assert served == (["upper.localhost"] if name.startswith("UPPER") else ["localhost"]), name
        assert server.get_verify_mode() & SSL.VERIFY_PEER
    for i in range(DevelopmentCA.CACHE + 5):
        tls.contextFor(f"n{i}.localhost")
    assert len(tls._issuedContexts) == DevelopmentCA.CACHE


def test_old_tls_and_weak_ciphers_refused(ca: CA) -> None:
    """
    TLS 1.1 and 1.0, and TLS 1.2 without forward-secret AEAD ciphers, are
    refused by the relay; TLS 1.2 with a modern cipher and TLS 1.3 pass.
    """
    path, _ = ca.server("wild", "*.example.test")
    tls = ServerTLS([loadServerCertificate(str(path))])
    for version in (SSL.TLS1_VERSION, SSL.TLS1_1_VERSION):
        client = _client("a.example.test", maxVersion=version, ciphers=b"ALL:@SECLEVEL=0")
        server = _server(tls)
        with pytest.raises(SSL.Error):
            _pump(client, server)
    for weak in (b"AES128-SHA", b"ECDHE-ECDSA-AES128-SHA", b"AES128-GCM-SHA256"):
        with pytest.raises(SSL.Error):
            _pump(_client("a.example.test", maxVersion=SSL.TLS1_2_VERSION, ciphers=weak), _server(tls))
    client = _client("a.example.test", maxVersion=SSL.TLS1_2_VERSION, ciphers=b"ECDHE-ECDSA-AES128-GCM-SHA256")
    _pump(client, _server(tls))
    assert client.get_protocol_version_name() == "TLSv1.2"
    client = _client("a.example.test")
    _pump(client, _server(tls))
    assert client.get_protocol_version_name() == "TLSv1.3"


def test_alpn_from_the_constructor_list(ca: CA) -> None:
    """
    ALPN offers what the constructor was given (default http/1.1 only), so
    another protocol can be added without touching the module.
    """
    path, _ = ca.server("wild", "*.example.test")
    cert = loadServerCertificate(str(path))
    client = _client("a.example.test", alpn=[b"h2", b"http/1.1"])
    _pump(client, _server(ServerTLS([cert])))
    assert client.get_alpn_proto_negotiated() == b"http/1.1"
    client = _client("a.example.test", alpn=[b"h2", b"http/1.1"])
    _pump(client, _server(ServerTLS([cert], acceptableProtocols=[b"h2", b"http/1.1"])))
    assert client.get_alpn_proto_negotiated() == b"h2"
    # A client with no protocol in common still connects, without ALPN.
    client = _client("a.example.test", alpn=[b"spdy/3"])
    _pump(client, _server(ServerTLS([cert])))
    assert client.get_alpn_proto_negotiated() == b""
    # And on a certificate picked by SNI too.
    other, _ = ca.server("other", "other.test")
    client = _client("other.test", alpn=[b"h2", b"http/1.1"])
    _pump(client, _server(ServerTLS([cert, loadServerCertificate(str(other))], acceptableProtocols=[b"h2"])))
    assert client.get_alpn_proto_negotiated() == b"h2"


def test_bad_certificate_files(ca: CA, tmp_path: Path) -> None:
    """
    Each kind of unusable file is refused with a message naming it.
    """
    good, key = ca.server("sep", "a.example.test", keySeparate=True)
    other, otherKey = ca.server("other", "b.example.test", keySeparate=True)
    assert key is not None and otherKey is not None
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    big = tmp_path / "big.pem"
    big.write_bytes(b"x" * (1024 * 1024 + 1))
    cases = [
        ((str(good), str(otherKey)), "does not belong"),
        ((str(good), None), "no unencrypted PEM private key"),
        ((str(garbage), str(key)), "no PEM certificate"),
        ((str(tmp_path / "missing.pem"), None), "cannot read"),
        ((str(big), None), "larger than"),
    ]
    for args, message in cases:
        with pytest.raises(CertificateError, match=message) as e:
            loadServerCertificate(*args)
        assert args[0] in str(e.value) or (args[1] or "") in str(e.value)
    assert loadServerCertificate(str(good), str(key)).names == ("a.example.test",)


def test_certificate_directory(ca: CA, tmp_path: Path) -> None:
    """
    A directory of NAME.pem files and certbot-style NAME/ subdirectories.
    """
    certs = tmp_path / "certs"
    (certs / "live.test").mkdir(parents=True)
    path, _ = ca.server("one", "one.test")
    (certs / "one.pem").write_bytes(path.read_bytes())
    chain, key = ca.server("live", "live.test", keySeparate=True)
    assert key is not None
    (certs / "live.test" / "fullchain.pem").write_bytes(chain.read_bytes())
    (certs / "live.test" / "privkey.pem").write_bytes(key.read_bytes())
    (certs / "README").write_text("ignored")
    names = sorted(c.names[0] for c in serverCertificatesFromDirectory(str(certs)))
    assert names == ["live.test", "one.test"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(CertificateError, match="has no certificates"):
        serverCertificatesFromDirectory(str(tmp_path / "empty"))


def test_development_ca_made_once_and_renewed(tmp_path: Path) -> None:
    """
    The development CA is made once (key mode 0600), reused, and made
    again when it is close to expiring; what it issues chains to it and is
    limited to its domain.
    """
    from cryptography.exceptions import InvalidSignature

    directory = str(tmp_path / "tls")
    ca, made = DevelopmentCA.inDirectory(directory, "example.test")
    assert made
    assert os.stat(os.path.join(directory, "dev-ca-example.test.key")).st_mode & 0o777 == 0o600
    assert set(ca.defaultCertificate().names) == {"*.example.test", "example.test"}
    again, made = DevelopmentCA.inDirectory(directory, "example.test")
    assert not made and again.cert == ca.cert
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=360)
    _, made = DevelopmentCA.inDirectory(directory, "example.test", now=later)
    assert made
    # On-demand certificates only where a wildcard does not work, and only
    # for host names under the domain.
    assert ca.certificateFor("a.example.test") is None
    local, _ = DevelopmentCA.inDirectory(directory, "localhost")
    issued = local.certificateFor("demo.localhost")
    assert issued is not None and issued.names == ("demo.localhost",)
    issued.chain[0].verify_directly_issued_by(local.cert)
    with pytest.raises((ValueError, InvalidSignature)):
        issued.chain[0].verify_directly_issued_by(ca.cert)
    for bad in ("localhost.evil.test", "a..localhost", "a_b.localhost", "x" * 64 + ".localhost", "é.localhost"):
        assert local.certificateFor(bad) is None


def test_split_https_endpoint() -> None:
    assert splitHTTPSEndpoint("tcp:443") == ("tcp:443", None, None, None)
    assert splitHTTPSEndpoint(r"ssl:443:interface=\:\:1:privateKey=k.pem:certKey=c.pem") == (
        r"tcp:443:interface=\:\:1",
        "c.pem",
        "k.pem",
        None,
    )
    assert splitHTTPSEndpoint("ssl:443:privateKey=both.pem:extraCertChain=chain.pem") == (
        "tcp:443",
        "both.pem",
        "both.pem",
        "chain.pem",
    )
    with pytest.raises(ValueError, match="sslmethod is not supported"):
        splitHTTPSEndpoint("ssl:443:privateKey=k.pem:sslmethod=TLSv1_METHOD")


def test_https_options(ca: CA, tmp_path: Path) -> None:
    """
    Certificates are read while the options are parsed, so a bad one is a
    usage error naming the file; the ssl: form still works.
    """
    cert, key = ca.server("sep", "*.localhost", keySeparate=True)
    both, _ = ca.server("both", "special.localhost")
    options = relayTap.Options(environ={})
    options.parseOptions(["--https", "tcp:0", "--https-cert", str(cert), "--https-key", str(key)])
    assert [c.names for c in options["https-certificates"]] == [("*.localhost",)]
    assert options["https-endpoint"] == "tcp:0"
    options = relayTap.Options(environ={"TXTUNNEL_RELAY_HTTPS_CERT": f"{both}"})
    options.parseOptions(["--https", f"ssl:0:privateKey={key}:certKey={cert}"])
    assert [c.names for c in options["https-certificates"]] == [("*.localhost",), ("special.localhost",)]
    assert options["https-endpoint"] == "tcp:0"
    for args, message in [
        (["--https", "tcp:0", "--https-cert", str(cert)], "no unencrypted PEM private key"),
        (
            ["--https", "tcp:0", "--https-cert", str(cert), "--https-cert", str(both), "--https-key", str(key)],
            "one key per",
        ),
        (["--https-cert", str(both)], "need --https"),
        (["--https", "tcp:0", "--https-cert", str(tmp_path / "nope.pem")], "is not a file"),
        (["--https", "tcp:0", "--https-cert-dir", str(tmp_path / "nope")], "does not exist"),
    ]:
        with pytest.raises(usage.UsageError, match=message):
            relayTap.Options(environ={}).parseOptions(args)


# -- through a real relay


@pytest_twisted.ensureDeferred
async def test_sni_certificates_through_relay(tmp_path: Path, agents: list[RunningAgent], origin: int) -> None:
    """
    curl reaches a tunnel through the relay's HTTPS listener; a tunnel
    with a certificate of its own is served with that one (from another
    CA, so the wildcard's CA does not verify it), every other with the
    wildcard.
    """
    wildCA, otherCA = CA(tmp_path, "wild"), CA(tmp_path, "other")
    wild, _ = wildCA.server("wild", "*.tunnels.test", "tunnels.test")
    special, _ = otherCA.server("special", "special.tunnels.test")
    relay = await startRelay(
        str(tmp_path / "state"),
        "--domain",
        "tunnels.test",
        "--https",
        "tcp:0:interface=127.0.0.1",
        "--https-cert",
        str(wild),
        "--https-cert",
        str(special),
    )
    try:
        await startAgent(agents, relay, "--http", str(origin), "--subdomain", "plain")
        await startAgent(agents, relay, "--http", str(origin), "--subdomain", "special")
        port = relay.relay.httpsPort
        for name, caFile, ok in [
            ("plain", wildCA.path, True),
            ("special", otherCA.path, True),
            ("special", wildCA.path, False),
            ("plain", otherCA.path, False),
        ]:
            code, out, err = await curl(
                "--cacert",
                str(caFile),
                "--resolve",
                f"{name}.tunnels.test:{port}:127.0.0.1",
                f"https://{name}.tunnels.test:{port}/hello",
            )
            assert (code == 0) == ok, (name, caFile, err)
            if ok:
                assert b"hello from origin" in out and b"x-forwarded-proto=https" in out
        # ALPN on the live listener: the relay's list, read per handshake.
        import socket
        import ssl

        def alpn(offered: list[str]) -> str | None:
            context = ssl.create_default_context(cafile=str(wildCA.path))
            context.set_alpn_protocols(offered)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname="plain.tunnels.test") as tls:
                    return tls.selected_alpn_protocol()

        assert await inThread(alpn, ["h2", "http/1.1"]) == relay.relay.alpnProtocols[0].decode()
        assert await inThread(alpn, ["http/1.1"]) == "http/1.1"
        assert relay.relay.serverTLS is not None
        relay.relay.serverTLS.acceptableProtocols = (b"http/1.1",)
        assert await inThread(alpn, ["h2", "http/1.1"]) == "http/1.1"
        relay.relay.serverTLS.acceptableProtocols = (b"h2", b"http/1.1")
        assert await inThread(alpn, ["h2", "http/1.1"]) == "h2"
        # TLS 1.1 is refused by the relay, not just by curl.
        code, out, err = await curl(
            "--cacert",
            str(wildCA.path),
            "--tls-max",
            "1.1",
            "--ciphers",
            "DEFAULT:@SECLEVEL=0",
            "--resolve",
            f"plain.tunnels.test:{port}:127.0.0.1",
            f"https://plain.tunnels.test:{port}/hello",
        )
        assert code != 0
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_ssl_endpoint_on_http_listener(tmp_path: Path, agents: list[RunningAgent], origin: int) -> None:
    """
    An ssl: endpoint given to --http (not a documented use, but one that
    worked) still serves curl, which offers ALPN.
    """
    ca = CA(tmp_path, "http")
    both, _ = ca.server("both", "*.tunnels.test")
    relay = await startRelay(
        str(tmp_path / "state"), "--domain", "tunnels.test", "--http", f"ssl:0:interface=127.0.0.1:privateKey={both}"
    )
    try:
        await startAgent(
            agents, relay, "--relay", f"wss://127.0.0.1:{relay.port}", "--insecure", "--http", str(origin), "-s", "a"
        )
        code, out, err = await curl(
            "--cacert", str(ca.path), "--resolve", f"a.tunnels.test:{relay.port}:127.0.0.1",
            f"https://a.tunnels.test:{relay.port}/hello",
        )  # fmt: skip
        assert code == 0 and b"hello from origin" in out, err
    finally:
        await defer.maybeDeferred(relay.service.stopService)


@pytest_twisted.ensureDeferred
async def test_development_certificates(tmp_path: Path, agents: list[RunningAgent], origin: int) -> None:
    """
    --https with no certificate makes a development CA in the state
    directory, says so, serves certificates from it (one per name for
    *.localhost, which no client takes as a wildcard), and reuses it after
    a restart.
    """
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    state = str(tmp_path / "state")
    path = os.path.join(state, "tls", "dev-ca-localhost.pem")
    try:
        relay = await startRelay(state, "--https", "tcp:0:interface=127.0.0.1")
        try:
            await startAgent(agents, relay, "--http", str(origin), "--subdomain", "dev")
            port = relay.relay.httpsPort
            code, out, err = await curl(
                "--cacert", path, "--resolve", f"dev.localhost:{port}:127.0.0.1", f"https://dev.localhost:{port}/hello"
            )
            assert code == 0, err
            assert b"hello from origin" in out
            code, out, err = await curl(
                "--resolve", f"dev.localhost:{port}:127.0.0.1", f"https://dev.localhost:{port}/"
            )
            assert code == 60, err
        finally:
            await defer.maybeDeferred(relay.service.stopService)
        first = Path(path).read_bytes()
        relay = await startRelay(state, "--https", "tcp:0:interface=127.0.0.1")
        await defer.maybeDeferred(relay.service.stopService)
        assert Path(path).read_bytes() == first
    finally:
        globalLogPublisher.removeObserver(events.append)
    said = [e for e in events if "development CA" in e.get("log_format", "")]
    assert [e["how"] for e in said] == ["a new", "the existing"]
    assert all(e["path"] == path for e in said)
