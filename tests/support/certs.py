"""Certificates for the TLS tests, made with `cryptography`: a CA and leaf certificates on disk.

A test gets a `CA` (``ca = CA(tmp_path)``), then leaf certificates signed by it for the names it
needs (``ca.leaf("site", ["localhost", "127.0.0.1"])``), each a `Pair` of PEM files. Variants
for the failure cases: an expired leaf (``expired=True``), a leaf signed by another CA (a
second `CA`), a client certificate (``client=True``: the clientAuth usage), and a pair whose key
is not the certificate's (`mismatched`). Keys are EC P-256: made in a millisecond, where RSA
2048 takes tens.

Everything is written below the directory given, never elsewhere.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key, as PEM files."""

    cert: Path
    key: Path
    der: bytes  # the certificate, DER (what a peer_certificate is compared with)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    out: list[x509.GeneralName] = []
    for n in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            out.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(out)


class CA:
    """A self-signed certificate authority whose files live in `directory`."""

    def __init__(self, directory: Path, name: str = "weft test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        slug = name.replace(" ", "-")
        self.pem = directory / f"{slug}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def leaf(
        self,
        stem: str,
        names: list[str],
        *,
        expired: bool = False,
        client: bool = False,
    ) -> Pair:
        """A leaf certificate for `names` (DNS names or IP addresses; the first is the common
        name) written as ``<stem>.pem`` and ``<stem>.key``; `expired`: its validity ended
        yesterday; `client`: for client authentication instead of a server's."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        start, end = (now - 10 * DAY, now - DAY) if expired else (now - DAY, now + 30 * DAY)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(_san(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.directory / f"{stem}.pem"
        key_path = self.directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
        return Pair(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER))


def mismatched(pair: Pair, stem: str) -> Pair:
    """`pair`'s certificate with a fresh key that is not its own (``<stem>.pem/.key``)."""
    cert_path = pair.cert.with_name(f"{stem}.pem")
    key_path = pair.cert.with_name(f"{stem}.key")
    cert_path.write_bytes(pair.cert.read_bytes())
    key_path.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    return Pair(cert_path, key_path, pair.der)


def common_name(der: bytes) -> str:
    """The subject common name of a DER certificate (what a test compares after a handshake)."""
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
