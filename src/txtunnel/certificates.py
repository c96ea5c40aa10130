# -*- test-case-name: tests.test_tlscontext,tests.test_mtls -*-
"""
Certificates as the relay and the agent use them: server certificates and
keys from files, CA bundles, the relay's own development CA, and the check
that a client certificate chains to a given CA.

Everything here is data (cryptography's objects); how TLS is set up with
them is L{txtunnel.tlscontext}.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto

__all__ = [
    "CertificateError",
    "DevelopmentCA",
    "ServerCertificate",
    "chainsTo",
    "loadCertificateAuthorities",
    "loadServerCertificate",
    "peerCertificates",
    "readCertificateAuthorities",
    "serverCertificatesFromDirectory",
]

#: The largest PEM file (certificate chain, key, CA bundle) read.
MAX_PEM_BYTES = 1024 * 1024

#: How long a made-up development certificate is valid, and how close to
#: its end it is replaced.
SELF_SIGNED_DAYS = 365
SELF_SIGNED_RENEW_DAYS = 14


class CertificateError(ValueError):
    """
    A certificate, key or CA file cannot be used; the message says which
    file and why.
    """


def _readPEM(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise CertificateError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(f"{what} {path} is larger than {MAX_PEM_BYTES} bytes")
    return data


def _certificates(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CertificateError(f"{where} holds no PEM certificate")
    return certs


@attrs.frozen
class ServerCertificate:
    """
    One certificate the relay can present: its key, its chain (leaf first)
    and the DNS names it is for.
    """

    key: Any
    chain: tuple[x509.Certificate, ...]
    names: tuple[str, ...]
    source: str


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value).lower() for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(names)


def loadServerCertificate(
    certPath: str, keyPath: str | None = None, chainPath: str | None = None, *, requireName: bool = True
) -> ServerCertificate:
    """
    Load a certificate chain (leaf first, as in C{fullchain.pem}) and its
    private key; C{keyPath} may be omitted when the key is in C{certPath}.
    C{chainPath} may hold more of the chain (intermediates).

    @raise CertificateError: naming the file and what is wrong with it.
    """
    certData = _readPEM(certPath, "certificate file")
    keyData = certData if keyPath is None else _readPEM(keyPath, "key file")
    chain = _certificates(certData, f"certificate file {certPath}")
    if chainPath is not None:
        chain += _certificates(_readPEM(chainPath, "chain file"), f"chain file {chainPath}")
    try:
        key = serialization.load_pem_private_key(keyData, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(
            f"{keyPath or certPath} holds no unencrypted PEM private key ({str(e).splitlines()[0]})"
        ) from None
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != chain[0].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CertificateError(f"the key in {keyPath or certPath} does not belong to the certificate in {certPath}")
    names = _names(chain[0])
    if not names and requireName:
        raise CertificateError(f"the certificate in {certPath} names no DNS host")
    return ServerCertificate(key, tuple(chain), names, certPath)


def serverCertificatesFromDirectory(path: str) -> list[ServerCertificate]:
    """
    Every certificate in directory C{path}: each C{*.pem} file holding a
    key and its chain, and each subdirectory holding C{fullchain.pem} and
    C{privkey.pem} (the layout of certbot's C{live/} directory).
    """
    try:
        entries = sorted(os.listdir(path))
    except OSError as e:
        raise CertificateError(f"cannot read certificate directory {path}: {e.strerror or e}") from None
    found = []
    for entry in entries:
        full = os.path.join(path, entry)
        if os.path.isdir(full):
            chain = os.path.join(full, "fullchain.pem")
            if os.path.exists(chain):
                found.append(loadServerCertificate(chain, os.path.join(full, "privkey.pem")))
        elif entry.endswith(".pem"):
            found.append(loadServerCertificate(full))
    if not found:
        raise CertificateError(
            f"certificate directory {path} has no certificates (NAME.pem files with key and chain, "
            "or NAME/fullchain.pem + NAME/privkey.pem)"
        )
    return found


def _writePrivate(path: str, data: bytes) -> None:
    temporary = path + ".new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


class DevelopmentCA:
    """
    The relay's own certificate authority for C{--https} with no
    certificate: made once in the state directory (its key mode 0600) and
    reused after restarts, so a developer trusts one file
    (C{curl --cacert}, the agent's C{--ca}).

    It signs a certificate for C{*.<domain>} and C{<domain>} at start, or,
    for a domain where a wildcard is not honoured (clients refuse
    C{*.localhost}: a wildcard needs two labels after it), one for the
    domain at start and one per name on demand.
    A name constraint limits the CA to C{<domain>}, so trusting it trusts
    nothing else.
    """

    #: How many on-demand certificates a server keeps.
    CACHE = 256

    def __init__(self, key: Any, cert: x509.Certificate, path: str, domain: str) -> None:
        self.key = key
        self.cert = cert
        #: The CA certificate file to trust.
        self.path = path
        self.domain = domain

    @classmethod
    def inDirectory(
        cls, directory: str, domain: str, now: datetime.datetime | None = None
    ) -> tuple[DevelopmentCA, bool]:
        """
        Load the CA for C{domain} from C{directory}, or make it there.

        @return: the CA and whether it was made just now.
        """
        now = now or datetime.datetime.now(datetime.timezone.utc)
        certPath = os.path.join(directory, f"dev-ca-{domain}.pem")
        keyPath = os.path.join(directory, f"dev-ca-{domain}.key")
        try:
            cert = _certificates(_readPEM(certPath, "CA file"), certPath)[0]
            key = serialization.load_pem_private_key(_readPEM(keyPath, "CA key"), password=None)
            if cert.not_valid_after_utc - now > datetime.timedelta(days=SELF_SIGNED_RENEW_DAYS):
                return cls(key, cert, certPath, domain), False
        except (CertificateError, ValueError, TypeError):
            pass
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"txtunnel development CA for {domain}")])
        permitted: list[x509.GeneralName] = [x509.DNSName(domain)]
        if domain == "localhost":
            permitted += [
                x509.IPAddress(ipaddress.ip_network("127.0.0.0/8")),
                x509.IPAddress(ipaddress.ip_network("::1/128")),
            ]
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _writePrivate(
            keyPath,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        with open(certPath + ".new", "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        os.replace(certPath + ".new", certPath)
        return cls(key, cert, certPath, domain), True

    def issue(self, *names: str, loopback: bool = False) -> ServerCertificate:
        """
        A server certificate for C{names} (the first is its subject).

        @param loopback: also name the loopback addresses (for the
            C{localhost} domain certificate only).  A tunnel's own
            certificate has DNS names only: BoringSSL (grpcio, for one)
            refuses any leaf with an IP address name under a CA with IP
            name constraints ("unsupported name constraint type").
        """
        now = datetime.datetime.now(datetime.timezone.utc)
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        if loopback and self.domain == "localhost":
            alt += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(min(now + datetime.timedelta(days=30), self.cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return ServerCertificate(key, (leaf,), tuple(names), f"{self.path} (issued for {names[0]})")

    def defaultCertificate(self) -> ServerCertificate:
        """
        The certificate for the domain and, where clients accept the
        wildcard, every name under it.
        """
        if "." not in self.domain:
            return self.issue(self.domain, loopback=True)
        return self.issue(f"*.{self.domain}", self.domain)

    def certificateFor(self, name: str) -> ServerCertificate | None:
        """
        An on-demand certificate for C{name}, when it is a host under the
        domain that a wildcard does not cover for clients.
        """
        if "." in self.domain or not name.endswith("." + self.domain):
            return None
        if not name.isascii() or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() for label in name.split(".")
        ):
            return None
        return self.issue(name)


def peerCertificates(transport: Any) -> tuple[x509.Certificate | None, list[x509.Certificate]]:
    """
    The client certificate presented on a TLS C{transport} and the other
    certificates the client sent with it; C{(None, [])} for a plain
    transport or a client that sent none.
    """
    getHandle = getattr(transport, "getHandle", None)
    connection = getHandle() if getHandle is not None else None
    if not isinstance(connection, SSL.Connection):
        return None, []
    leaf = connection.get_peer_certificate(as_cryptography=True)
    if leaf is None:
        return None, []
    chain = connection.get_peer_cert_chain(as_cryptography=True) or []
    leafDER = leaf.public_bytes(serialization.Encoding.DER)
    return leaf, [c for c in chain if c.public_bytes(serialization.Encoding.DER) != leafDER]


def loadCertificateAuthorities(data: bytes, where: str) -> list[x509.Certificate]:
    """
    The CA certificates in PEM C{data} (from C{where}, for messages).
    """
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(f"{where} is larger than {MAX_PEM_BYTES} bytes")
    return _certificates(data, where)


def readCertificateAuthorities(path: str, what: str = "CA file") -> list[x509.Certificate]:
    """
    The CA certificates in the PEM file at C{path}.
    """
    return loadCertificateAuthorities(_readPEM(path, what), f"{what} {path}")


def chainsTo(
    leaf: x509.Certificate | None, intermediates: Sequence[x509.Certificate], cas: Sequence[x509.Certificate]
) -> bool:
    """
    Whether C{leaf} (with the C{intermediates} its owner sent) is a valid
    client certificate issued, directly or through them, by one of C{cas}:
    in date, and, if it says what it is for, for TLS clients.
    """
    if leaf is None:
        return False
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and not {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE} & set(
        usages
    ):
        return False
    store = crypto.X509Store()
    for ca in cas:
        store.add_cert(crypto.X509.from_cryptography(ca))
    context = crypto.X509StoreContext(
        store,
        crypto.X509.from_cryptography(leaf),
        chain=[crypto.X509.from_cryptography(c) for c in intermediates],
    )
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True
