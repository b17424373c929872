"""SPIFFE material for tests, made with `cryptography` and PyJWT, all in memory.

One `TrustDomain` per SPIFFE trust domain: its CA (a self-signed root whose URI SAN is the trust
domain's ID, as SPIRE makes them), X.509-SVIDs signed by it (`svid`), and JWT signing keys with
their ``kid`` published as a JWKS (`jwks`) and tokens signed by them (`jwt`). The unit tests of
`weft.svid` and `weft.jwt_svid` use it, and a fake Workload API server can serve the same
objects (``td.ca_der``, ``svid.chain_der``, ``svid.key_der``, ``td.jwks_json()``); the test
agent of tests/support/workload_api_server.py takes them as `agent_svid` and `agent_bundle`
shape them. A client or upstream outside weft loads an SVID from files (`Svid.write`).

Variants for the refusals the SPIFFE rules demand are keyword arguments of `svid`: more than
one URI SAN (``uris=[...]``), a CA bit on a leaf (``ca=True``), no digitalSignature
(``digital_signature=False``), a validity window (``not_before``/``not_after``), and signing by
another domain's CA (``issuer=other_td``), which is the "union of bundles" attack. Keys are EC
P-256 (a millisecond each), RSA 2048 only where a test needs RS256/PS256 (made once per domain).
"""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)
# "Now" for the tests, fixed at import: certificates are valid around it, tokens expire after
# it. It is the real time (to the second) so that OpenSSL, which checks validity against the
# real clock in a handshake, agrees with the fake clocks given to weft's own checks.
NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def der_of(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class Svid:
    """An X.509-SVID: the leaf first, then the intermediates; its private key."""

    cert: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def chain_der(self) -> list[bytes]:
        return [self.der] + [c.public_bytes(serialization.Encoding.DER) for c in self.intermediates]

    @property
    def key_der(self) -> bytes:
        return der_of(self.key)

    @property
    def chain_pem(self) -> bytes:
        certs = (self.cert, *self.intermediates)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def spiffe_id(self) -> str:
        """The first URI SAN (an SVID has exactly one; the bad variants may have more)."""
        san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return san.value.get_values_for_type(x509.UniformResourceIdentifier)[0]

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """The chain and the key as ``<stem>.pem`` and ``<stem>.key`` (0600) in `directory`,
        for `ssl.SSLContext.load_cert_chain`, curl or an upstream."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert.write_bytes(self.chain_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


@dataclass
class JwtKey:
    kid: str
    alg: str
    key: PrivateKey


@dataclass
class TrustDomain:
    """A trust domain's CA and JWT signing keys (see the module docstring)."""

    name: str
    ca_key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    jwt_keys: dict[str, JwtKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ca = _ca_cert(self.name, self.ca_key)

    @property
    def id(self) -> str:
        return f"spiffe://{self.name}"

    @property
    def ca_der(self) -> bytes:
        return self.ca.public_bytes(serialization.Encoding.DER)

    @property
    def ca_pem(self) -> bytes:
        return self.ca.public_bytes(serialization.Encoding.PEM)

    def intermediate(
        self, name: str = "intermediate"
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """An intermediate CA signed by the root (for chains longer than one)."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _ca_cert(self.name, key, issuer=(self.ca, self.ca_key), cn=name)
        return cert, key

    def svid(
        self,
        path: str = "/workload",
        *,
        uris: list[str] | None = None,
        ca: bool = False,
        digital_signature: bool = True,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
        issuer: TrustDomain | None = None,
        via: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    ) -> Svid:
        """An X.509-SVID for ``spiffe://<name><path>`` (or `uris`), signed by this domain's
        CA, `issuer`'s CA, or the intermediate `via` (which is then part of the chain)."""
        key = ec.generate_private_key(ec.SECP256R1())
        names = uris if uris is not None else [self.id + path]
        if via is not None:
            signer_cert, signer_key = via
        else:
            signer = issuer if issuer is not None else self
            signer_cert, signer_key = signer.ca, signer.ca_key
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
            .issuer_name(signer_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or NOW - DAY)
            .not_valid_after(not_after or NOW + DAY)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=digital_signature,
                    content_commitment=False,
                    key_encipherment=not digital_signature,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in names]),
                critical=False,
            )
        cert = builder.sign(signer_key, hashes.SHA256())
        return Svid(cert, key, (signer_cert,) if via is not None else ())

    # -- JWT ---------------------------------------------------------------------------------

    def jwt_key(self, kid: str, alg: str = "ES256") -> JwtKey:
        """A signing key published under `kid` (made once per kid)."""
        if kid not in self.jwt_keys:
            if alg.startswith(("RS", "PS")):
                key: PrivateKey = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            else:
                key = ec.generate_private_key(ec.SECP256R1())
            self.jwt_keys[kid] = JwtKey(kid, alg, key)
        return self.jwt_keys[kid]

    def jwks(self) -> dict[str, Any]:
        """The JWT bundle: a JWKS with ``use = "jwt-svid"`` keys, as the Workload API gives."""
        keys = []
        for k in self.jwt_keys.values():
            algo = jwt.get_algorithm_by_name(k.alg)
            jwk = json.loads(algo.to_jwk(k.key.public_key()))
            jwk["kid"] = k.kid
            jwk["use"] = "jwt-svid"
            keys.append(jwk)
        return {"keys": keys}

    def jwks_json(self) -> bytes:
        return json.dumps(self.jwks()).encode()

    def jwt(
        self,
        kid: str,
        *,
        sub: str | None = "/frontend",
        aud: str | list[str] | None = "spiffe://example.org/api",
        exp: datetime.datetime | None = None,
        alg: str | None = None,
        headers: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A JWT-SVID signed by key `kid`; `sub` is a path in this domain or a whole ID
        (None: no sub claim), `aud` likewise (None: none)."""
        k = self.jwt_key(kid, alg or "ES256")
        # Five minutes from now, not from NOW (the import): a full suite outlasts that.
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        payload: dict[str, Any] = {"exp": exp or later}
        if sub is not None:
            payload["sub"] = sub if "://" in sub else self.id + sub
        if aud is not None:
            payload["aud"] = aud
        payload.update(claims or {})
        return jwt.encode(
            payload,
            k.key,
            algorithm=alg or k.alg,
            headers={"kid": kid, "typ": "JWT", **(headers or {})},
        )


def _ca_cert(
    td: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    cn: str = "root",
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, td),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - 365 * DAY)
        .not_valid_after(NOW + 365 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{td}")]),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def agent_bundle(td: TrustDomain) -> str:
    """A trust domain's X.509 bundle as the test agent's ``x509`` command takes it (a
    ``federated`` value): base64 of the DER."""
    return base64.b64encode(td.ca_der).decode()


def agent_svid(td: TrustDomain, svid: Svid, hint: str = "") -> dict[str, str]:
    """`svid` as the test agent's ``x509`` command takes it (`wapi_certs.Svid.as_json`'s
    form): the chain DER concatenated, the PKCS#8 key, and `td`'s bundle, each base64."""
    b64 = base64.b64encode
    return {
        "spiffe_id": svid.spiffe_id,
        "x509_svid": b64(b"".join(svid.chain_der)).decode(),
        "x509_svid_key": b64(svid.key_der).decode(),
        "bundle": agent_bundle(td),
        "hint": hint,
    }
