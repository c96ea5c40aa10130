# -*- test-case-name: tests.test_mtls -*-
"""
Client certificates (mutual TLS) on the relay's HTTPS listener.

Two uses, one mechanism:

* a relay started with C{--agent-ca FILE} lets an agent's link in only if
  the agent presented a certificate from that CA (L{agentAllowed}, asked
  when the agent says hello);
* a tunnel whose bind request carries C{client-ca} (the agent's
  C{--client-ca FILE}, as PEM) lets a visitor's request through only if the
  visitor presented a certificate from that CA (L{ClientCertificateGate}, a
  visitor gate).

TLS handshakes happen before the relay knows the request's C{Host} (or
whether it is an agent's link), so the listener asks for an optional client
certificate on the connections that may need one -- chosen by SNI in
L{txtunnel.relay.service.Relay.wantsClientCertificate} -- accepts whatever
is presented, and these checks verify the chain afterwards against the CA
that applies.  A request whose certificate was not asked for, or not
given, or does not chain to the CA, is refused: the check fails closed.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from twisted.logger import Logger
from zope.interface import implementer

from txtunnel.certificates import CertificateError, chainsTo, loadCertificateAuthorities, peerCertificates
from txtunnel.errors import BindError
from txtunnel.gates import VisitorRequest
from txtunnel.http1 import Answer
from txtunnel.interfaces import IVisitorGate

__all__ = ["BIND_KEY", "MAX_CA_BYTES", "ClientCertificateGate", "agentAllowed", "requiredCAs"]

#: The bind request field that carries a tunnel's visitor CA (PEM text).
BIND_KEY = "client-ca"

#: The largest CA bundle a bind request may carry.
MAX_CA_BYTES = 64 * 1024

log = Logger()


def _parse(pem: Any) -> list[x509.Certificate]:
    if not isinstance(pem, str) or not pem.strip():
        raise BindError(f"{BIND_KEY} must be PEM text of CA certificates")
    data = pem.encode("utf-8", "replace")
    if len(data) > MAX_CA_BYTES:
        raise BindError(f"{BIND_KEY} is larger than {MAX_CA_BYTES} bytes")
    try:
        cas = loadCertificateAuthorities(data, BIND_KEY)
    except CertificateError as e:
        raise BindError(str(e)) from None
    for ca in cas:
        try:
            constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise BindError(f"{BIND_KEY} holds a certificate that is not a CA ({ca.subject.rfc4514_string()})")
    return cas


_parsed: weakref.WeakKeyDictionary[Any, list[x509.Certificate]] = weakref.WeakKeyDictionary()


def requiredCAs(tunnel: Any) -> list[x509.Certificate] | None:
    """
    The CAs a visitor's certificate must chain to for C{tunnel}, or C{None}
    when its bind asked for no client certificate.
    """
    request = getattr(tunnel, "request", None)
    if not isinstance(request, dict) or BIND_KEY not in request:
        return None
    try:
        cas = _parsed.get(tunnel)
    except TypeError:  # a tunnel object that cannot be weakly referenced
        return _parse(request[BIND_KEY])
    if cas is None:
        cas = _parsed[tunnel] = _parse(request[BIND_KEY])
    return cas


def agentAllowed(transport: Any, cas: Sequence[x509.Certificate]) -> bool:
    """
    Whether the agent on C{transport} presented a certificate from C{cas}.
    """
    leaf, chain = peerCertificates(transport)
    return chainsTo(leaf, chain, cas)


@implementer(IVisitorGate)
class ClientCertificateGate:
    """
    Refuses (403) a request to a tunnel that requires a client certificate
    unless the visitor presented one from the tunnel's CA.
    """

    def validate(self, bindRequest: dict[str, Any]) -> None:
        if BIND_KEY not in bindRequest:
            return
        if bindRequest.get("type") != "http":
            raise BindError(f"{BIND_KEY} applies to http tunnels only (the relay's HTTPS listener checks it)")
        _parse(bindRequest[BIND_KEY])

    def check(self, request: VisitorRequest) -> Answer | None:
        cas = requiredCAs(request.tunnel)
        if cas is None:
            return None
        if request.scheme != "https":
            return Answer(403, "this tunnel requires a client certificate: use https://")
        leaf, chain = peerCertificates(request.transport)
        if leaf is None:
            return Answer(403, "this tunnel requires a client certificate from its CA; none was presented")
        if not chainsTo(leaf, chain, cas):
            log.info(
                "client certificate {subject} from {client} refused for tunnel {name}",
                subject=leaf.subject.rfc4514_string()[:200],
                client=request.clientIP,
                name=request.name,
            )
            return Answer(403, "the client certificate presented is not from this tunnel's CA")
        return None
