"""SPIFFE material for the Workload API tests, made with `cryptography`, in memory.

A `TrustDomain` is a CA for ``spiffe://<name>``: it issues X.509-SVIDs (`svid`: a leaf with
one URI SAN, its PKCS#8 key, and the CA as the bundle, all DER, as the agent sends them) and
has a JWKS document (`jwks`) for the JWT bundles. Keys are EC P-256 (a millisecond each).

Kept apart from the spiffe-verify branch's ``tests/support/spiffe_certs.py``, with which it
is to be merged; SPIFFE IDs stay strings here.
"""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOUR = datetime.timedelta(hours=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _b64url(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


@dataclass(frozen=True)
class Svid:
    """What the agent sends for one X.509-SVID (the fields of ``X509SVID``)."""

    spiffe_id: str
    chain: bytes  # DER, leaf first
    key: bytes  # PKCS#8 DER
    bundle: bytes  # DER of the trust domain's CA certificates
    not_after: datetime.datetime
    hint: str = ""

    def as_json(self) -> dict[str, str]:
        """For the test server's control channel."""
        b64 = base64.b64encode
        return {
            "spiffe_id": self.spiffe_id,
            "x509_svid": b64(self.chain).decode(),
            "x509_svid_key": b64(self.key).decode(),
            "bundle": b64(self.bundle).decode(),
            "hint": self.hint,
        }


class TrustDomain:
    """A CA for one trust domain."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.jwt_key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            ]
        )
        now = _now()
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - HOUR)
            .not_valid_after(now + 24 * HOUR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{name}")]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def id(self) -> str:
        return f"spiffe://{self.name}"

    @property
    def bundle(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def svid(self, path: str, *, lifetime: datetime.timedelta = HOUR, hint: str = "") -> Svid:
        """An X.509-SVID for ``spiffe://<name><path>``, valid from an hour ago for `lifetime`
        from now (negative: already expired)."""
        spiffe_id = f"{self.id}{path}"
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - HOUR)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return Svid(
            spiffe_id=spiffe_id,
            chain=leaf.public_bytes(serialization.Encoding.DER),
            key=key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            bundle=self.bundle,
            not_after=leaf.not_valid_after_utc,
            hint=hint,
        )

    def jwks(self) -> bytes:
        """The JWT bundle: a JWKS with the trust domain's JWT signing key."""
        numbers = self.jwt_key.public_key().public_numbers()
        key = {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64url(numbers.x),
            "y": _b64url(numbers.y),
            "kid": f"{self.name}-1",
            "use": "jwt-svid",
        }
        return json.dumps({"keys": [key]}).encode()
