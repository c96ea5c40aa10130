# -*- test-case-name: tests.test_tlscontext,tests.test_wss_link -*-
"""
TLS for the relay's public HTTPS listener and the agent's C{wss://} link.

The relay's side is L{ServerTLS}: one OpenSSL context per certificate,
chosen by the name the client sends (SNI), with a wildcard certificate for
C{*.<domain>} and any number of others; TLS 1.2 or later with AEAD ciphers
only; ALPN offered from a list given by the caller (so an HTTP/2 edge adds
C{h2} without touching this module) and read back, unchanged, from the
transport's C{negotiatedProtocol}.  A client certificate is asked for only
on connections that need one (see L{ServerTLS.wantsClientCertificate}): a
browser visiting an ordinary tunnel is never prompted.  Such certificates
are accepted at the handshake and checked later, against the CA of the
tunnel the request is for, by L{txtunnel.certificates.chainsTo} -- the handshake happens before
the relay knows which tunnel (and so which CA) a request is for.

Certificates themselves (loading, the development CA, chain checks) are
in L{txtunnel.certificates}.

The agent's side is L{linkEndpoint} with L{LinkClientTLS}: the relay's certificate and
host name are verified (pyOpenSSL + service-identity, through Twisted's
C{optionsForClientTLS}) against the system's roots or a private CA; a
failure is explained (L{LinkClientTLS.lastError}) rather than retried in
silence.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from txtunnel.certificates import (
    CertificateError,
    DevelopmentCA,
    ServerCertificate,
    loadServerCertificate,
    readCertificateAuthorities,
)

__all__ = [
    "DEFAULT_ALPN",
    "MODERN_CIPHERS",
    "LinkClientTLS",
    "ServerTLS",
    "linkClientTLS",
    "linkEndpoint",
    "serverOptions",
    "splitHTTPSEndpoint",
]

log = Logger()

#: Protocols offered by ALPN when the caller names none.
DEFAULT_ALPN: tuple[bytes, ...] = (b"http/1.1",)

#: TLS 1.2 cipher suites: forward-secret AEAD only (Mozilla's "intermediate"
#: list).  TLS 1.3 suites are all AEAD and are left to OpenSSL.
MODERN_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"
)


def serverOptions(certificate: ServerCertificate, protocols: list[bytes] | None = None) -> ssl.CertificateOptions:
    """
    Twisted's options for serving C{certificate}: TLS 1.2 or later, the
    L{MODERN_CIPHERS}, session resumption, and the ALPN C{protocols} if any.
    """
    return ssl.CertificateOptions(
        # pyOpenSSL takes cryptography's objects directly (its own are
        # deprecated); Twisted only hands them on.
        privateKey=certificate.key,
        certificate=certificate.chain[0],  # type: ignore[arg-type]
        extraCertChain=list(certificate.chain[1:]),  # type: ignore[arg-type]
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(MODERN_CIPHERS),
        acceptableProtocols=protocols,
        enableSessions=True,
    )


def _matches(pattern: str, name: str) -> bool:
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and rest == pattern[2:]
    return False


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Server-side TLS for the relay's HTTPS listener: one context per
    certificate, picked by SNI (an exact name before a wildcard; the first
    certificate when the client sends no name or one nobody matches).

    @ivar wantsClientCertificate: called with the SNI name (or C{None})
        during each handshake; when it returns true the client is asked
        (not required) to present a certificate.  Any certificate is
        accepted then: whoever needs it checks it with L{txtunnel.certificates.chainsTo}.
    """

    def __init__(
        self,
        certificates: Sequence[ServerCertificate],
        acceptableProtocols: Sequence[bytes] = DEFAULT_ALPN,
        wantsClientCertificate: Callable[[str | None], bool] | None = None,
        developmentCA: DevelopmentCA | None = None,
    ) -> None:
        if not certificates:
            raise ValueError("ServerTLS needs at least one certificate")
        self.developmentCA = developmentCA
        self._issuedContexts: dict[str, SSL.Context] = {}
        self.certificates = list(certificates)
        self.acceptableProtocols = tuple(acceptableProtocols)
        self.wantsClientCertificate = wantsClientCertificate
        self._contexts = [self._context(c) for c in self.certificates]

    def _context(self, certificate: ServerCertificate) -> SSL.Context:
        context = serverOptions(certificate).getContext()
        # Twisted already turns compression off; a client may not start a
        # renegotiation (a cheap way to make the server do expensive work).
        context.set_options(SSL.OP_NO_RENEGOTIATION)
        context.set_tlsext_servername_callback(self._serverName)
        context.set_alpn_select_callback(self._selectProtocol)
        return context

    def _selectProtocol(self, connection: SSL.Connection, offered: list[bytes]) -> Any:
        """
        The first of our protocols the client offers.  With none in common
        the handshake goes on without ALPN (rather than failing with an
        alert), and the edge speaks HTTP/1.1.
        """
        for protocol in self.acceptableProtocols:
            if protocol in offered:
                return protocol
        return SSL.NO_OVERLAPPING_PROTOCOLS

    def contextFor(self, name: str | None) -> SSL.Context:
        """
        The context whose certificate is for C{name}.
        """
        if name:
            name = name.lower().rstrip(".")
            for exact in (True, False):
                for cert, context in zip(self.certificates, self._contexts, strict=True):
                    if any(_matches(p, name) for p in cert.names if p.startswith("*.") != exact):
                        return context
                if exact and self.developmentCA is not None:
                    issued = self._issued(self.developmentCA, name)
                    if issued is not None:
                        return issued
        return self._contexts[0]

    def _issued(self, ca: DevelopmentCA, name: str) -> SSL.Context | None:
        context = self._issuedContexts.pop(name, None)
        if context is None:
            certificate = ca.certificateFor(name)
            if certificate is None:
                return None
            context = self._context(certificate)
        self._issuedContexts[name] = context
        while len(self._issuedContexts) > DevelopmentCA.CACHE:
            del self._issuedContexts[next(iter(self._issuedContexts))]
        return context

    def _serverName(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        context = self.contextFor(name)
        if context is not connection.get_context():
            connection.set_context(context)
        wants = self.wantsClientCertificate
        try:
            asked = wants is not None and wants(name)
        except Exception:
            # Undecided: ask.  Whoever needs a certificate still checks it,
            # and whoever does not ignores it.
            log.failure("deciding whether to ask {name!r} for a client certificate", name=name)
            asked = True
        if asked:
            connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _acceptAny)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._contexts[0], None)
        connection.set_app_data(tlsProtocol)
        return connection


def _acceptAny(connection: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    # The chain is checked after the handshake, against the CA the request
    # needs (see chainsTo); the handshake only collects it.
    return True


def splitHTTPSEndpoint(text: str) -> tuple[str, str | None, str | None, str | None]:
    """
    Turn an C{--https} endpoint into a plain one and the certificate files
    named in it.

    C{ssl:PORT:privateKey=KEY:certKey=CERT[:extraCertChain=CHAIN]} (the
    form Twisted's C{ssl:} endpoint takes) becomes C{tcp:PORT:...} and the
    files; the relay then terminates TLS itself with L{ServerTLS}.  Any
    other endpoint is returned unchanged, with no files.

    @return: (plain endpoint, certificate file, key file, chain file)
    """
    parts = _splitEndpoint(text)
    if not parts or parts[0].lower() != "ssl":
        return text, None, None, None
    kept = ["tcp"]
    files: dict[str, str] = {}
    for part in parts[1:]:
        key, eq, value = part.partition("=")
        if eq and key in ("privateKey", "certKey", "extraCertChain"):
            files[key] = value
        elif eq and key in ("sslmethod", "dhParameters"):
            raise ValueError(
                f"--https {text!r}: {key} is not supported; the relay always uses TLS 1.2 or later with "
                "forward-secret AEAD ciphers"
            )
        else:
            kept.append(part)
    key = files.get("privateKey", "server.pem")
    return ":".join(kept), files.get("certKey", key), key, files.get("extraCertChain")


def _splitEndpoint(text: str) -> list[str]:
    """
    Split an endpoint string on the colons that are not escaped, keeping
    the escapes (so the parts can be joined back).
    """
    parts, current, escaped = [], "", False
    for ch in text:
        if escaped:
            current += ch
            escaped = False
        elif ch == "\\":
            current += ch
            escaped = True
        elif ch == ":":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


# -- the agent's side


_VERIFY_ERRORS = {
    2: "the issuer certificate could not be found",
    9: "the certificate is not valid yet",
    10: "the certificate has expired",
    18: "the certificate is self-signed",
    19: "the chain ends in a self-signed certificate that is not trusted",
    20: "the certificate's issuer is not a trusted CA",
    21: "the certificate's issuer is not a trusted CA",
}


@implementer(IOpenSSLClientConnectionCreator)
class LinkClientTLS:
    """
    Client-side TLS for the agent's C{wss://} link.

    By default the relay's certificate must chain to the system's trusted
    roots (or to C{caCertificates}, for a private CA) and name
    C{hostname}; C{insecure} turns both checks off, for development only.

    @ivar lastError: why the last handshake's verification failed, in words,
        or C{None}.
    """

    def __init__(
        self,
        hostname: str,
        *,
        caCertificates: Sequence[x509.Certificate] = (),
        clientCertificate: ServerCertificate | None = None,
        insecure: bool = False,
    ) -> None:
        self.hostname = hostname
        self.insecure = insecure
        self.lastError: str | None = None
        # cryptography's objects go straight to pyOpenSSL (its own are
        # deprecated); Twisted only hands them on.
        clientOptions: dict[str, Any] = {}
        if clientCertificate is not None:
            clientOptions = {
                "privateKey": clientCertificate.key,
                "certificate": clientCertificate.chain[0],
                "extraCertChain": list(clientCertificate.chain[1:]),
            }
        self._insecureContext: SSL.Context | None = None
        if insecure:
            self._insecureContext = ssl.CertificateOptions(
                verify=False, raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **clientOptions
            ).getContext()
            self._inner: Any = None
        else:
            trustRoot: Any = (
                ssl.trustRootFromCertificates(
                    [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in caCertificates]
                )
                if caCertificates
                else ssl.platformTrust()
            )
            self._inner = ssl.optionsForClientTLS(
                hostname,
                trustRoot=trustRoot,
                extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2, **clientOptions},
            )

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        self.lastError = None
        if self._insecureContext is not None:
            connection = SSL.Connection(self._insecureContext, None)
            connection.set_app_data(tlsProtocol)
            connection.set_connect_state()
            if not _isAddress(self.hostname):
                connection.set_tlsext_host_name(self.hostname.encode("idna"))
            return connection
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER, self._verify)
        return connection

    def _verify(self, connection: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        """
        OpenSSL's verdict on each certificate of the chain, remembered in
        words when it fails; and, for the relay's own certificate, the
        host name check (service-identity), which Twisted's own callback
        -- replaced by this one -- would have made.
        """
        from service_identity import CertificateError as IdentityError
        from service_identity import VerificationError
        from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
        from service_identity.pyopenssl import extract_patterns

        if not ok:
            if self.lastError is None:
                why = _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}")
                which = "?"
                if cert is not None:
                    failed = cert.to_cryptography()
                    which = f"{failed.subject.rfc4514_string()}, issued by {failed.issuer.rfc4514_string()}"
                self.lastError = f"{why} ({which[:300]})"
            return False
        if depth == 0:
            identity: Any = IPAddress_ID(self.hostname) if _isAddress(self.hostname) else DNS_ID(self.hostname)
            try:
                verify_service_identity(extract_patterns(cert), [identity], [])
            except VerificationError:
                self.lastError = f"its certificate is not for {self.hostname!r}"
                return False
            except (IdentityError, ValueError) as e:
                self.lastError = f"its certificate's names cannot be checked ({e})"
                return False
        return True

    def describe(self, failure: Any) -> str:
        """
        Why a handshake failed, from the C{failure} it ended with.
        """
        from service_identity import VerificationError

        value = getattr(failure, "value", failure)
        if self.lastError is not None:
            return self.lastError
        if isinstance(value, VerificationError):
            return f"its certificate is not for {self.hostname!r}"
        if isinstance(value, SSL.Error):
            reasons = [r[2] for r in (value.args[0] if value.args and isinstance(value.args[0], list) else [])]
            return "; ".join(str(r) for r in reasons if r) or str(value)
        return str(value)


def _isAddress(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def linkClientTLS(
    relayURL: str,
    *,
    ca: str | None = None,
    insecure: bool = False,
    cert: str | None = None,
    key: str | None = None,
) -> LinkClientTLS | None:
    """
    The TLS settings of an agent's link to C{relayURL} from its options;
    C{None} for a C{ws://} relay.

    @raise CertificateError: for a file that cannot be used, or TLS options
        given for a C{ws://} relay (they would silently do nothing).
    """
    from urllib.parse import urlsplit

    parts = urlsplit(relayURL)
    if parts.scheme not in ("wss", "https"):
        given = [name for name, value in (("--ca", ca), ("--insecure", insecure), ("--cert", cert)) if value]
        if given:
            raise CertificateError(f"{', '.join(given)} apply to a wss:// relay; {relayURL} is not one")
        return None
    if insecure and ca:
        raise CertificateError("--insecure turns certificate checks off; --ca would be ignored, give only one")
    if key and not cert:
        raise CertificateError("--key needs --cert (the client certificate it belongs to)")
    cas = readCertificateAuthorities(ca) if ca else []
    client = loadServerCertificate(cert, key, requireName=False) if cert else None
    return LinkClientTLS(parts.hostname or "", caCertificates=cas, clientCertificate=client, insecure=insecure)


def linkEndpoint(reactor: Any, relayURL: str, tls: LinkClientTLS | None) -> Any:
    """
    The client endpoint of an agent's link: plain TCP for C{ws://}, TLS
    with C{tls} (by default: verified against the system's roots) for
    C{wss://}.
    """
    from urllib.parse import urlsplit

    from twisted.internet.endpoints import HostnameEndpoint, clientFromString, wrapClientTLS

    from txtunnel.wslink import relayEndpointString

    _, endpoint = relayEndpointString(relayURL)
    parts = urlsplit(relayURL)
    if parts.scheme not in ("wss", "https"):
        return clientFromString(reactor, endpoint)
    host = parts.hostname or ""
    if tls is None:
        tls = LinkClientTLS(host)
    return wrapClientTLS(tls, HostnameEndpoint(reactor, host.encode("idna"), parts.port or 443, timeout=15))
