"""
Throwaway certificate authorities for the TLS tests: a CA that issues
server certificates (for host names) and client certificates, written to
files the way a user would have them.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def keyPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def certPEM(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class CA:
    """
    A certificate authority whose certificate is at C{self.path}.
    """

    def __init__(self, directory: Path, name: str, parent: CA | None = None) -> None:
        self.directory = directory
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(self.subject)
            .issuer_name(parent.subject if parent else self.subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(_now() + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(parent.key if parent else self.key, hashes.SHA256())
        )
        self.path = directory / f"{name}-ca.pem"
        self.path.write_bytes(certPEM(self.cert))

    def _issue(
        self, common: str, names: list[str], usage: x509.ObjectIdentifier, *, expired: bool = False
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        end = _now() - datetime.timedelta(minutes=1) if expired else _now() + datetime.timedelta(days=1)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)]))
            .issuer_name(self.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(minutes=5))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
        return key, builder.sign(self.key, hashes.SHA256())

    def server(self, filename: str, *names: str, keySeparate: bool = False) -> tuple[Path, Path | None]:
        """
        A server certificate for C{names}: one PEM file with key and
        certificate, or (C{keySeparate}) a certificate file and a key file.
        """
        key, cert = self._issue(names[0], list(names), ExtendedKeyUsageOID.SERVER_AUTH)
        certPath = self.directory / f"{filename}.pem"
        if keySeparate:
            keyPath = self.directory / f"{filename}.key"
            keyPath.write_bytes(keyPEM(key))
            certPath.write_bytes(certPEM(cert))
            return certPath, keyPath
        certPath.write_bytes(keyPEM(key) + certPEM(cert))
        return certPath, None

    def client(self, filename: str, common: str = "agent") -> tuple[Path, Path]:
        """
        A client certificate: (certificate file, key file).
        """
        key, cert = self._issue(common, [], ExtendedKeyUsageOID.CLIENT_AUTH)
        certPath, keyPath = self.directory / f"{filename}.crt", self.directory / f"{filename}.key"
        certPath.write_bytes(certPEM(cert))
        keyPath.write_bytes(keyPEM(key))
        return certPath, keyPath
