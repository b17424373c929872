"""X.509-SVIDs: the SPIFFE rules for a peer's certificate, the chain check per trust domain,
and the `ssl.SSLContext` an SVID and its bundles make.

What this module owns, and why it is shaped so:

**The union-of-bundles hole.** weft may trust several trust domains at once (its own and
federated ones). OpenSSL has one CA store per context, so the handshake verifies a peer's chain
against the *union* of every trusted domain's roots. That alone is not SPIFFE's rule: a
certificate is an SVID of ``spiffe://a.example/x`` only if an authority *of a.example* signed it
(SPIFFE-ID.md §3, X509-SVID.md §5.1). With the union, the CA of partner domain B could mint a
certificate claiming ``spiffe://a.example/admin`` and OpenSSL would accept it, because B's root
is in the store. So after the handshake weft reads the chain the peer sent and verifies it
again (`verify_chain`) against **only the bundle of the trust domain named in the leaf's own
URI SAN**. The OpenSSL check stays, as the cheap first filter and for the proof of key
possession, which only the handshake gives; the second check is what decides. Chain building
and signatures are `cryptography.x509.verification`'s (never hand-rolled): the web-PKI policy
for the CAs, and for the leaf a permissive extension policy, because an SVID has no DNS name
for the web-PKI leaf policy to want; the SPIFFE leaf rules are checked here instead.

**Leaf rules** (X509-SVID.md §4, §5.2; go-spiffe's x509svid applies the same): exactly one URI
SAN, which is a valid SPIFFE ID (`weft.spiffe_id`) with a path (§2 of X509-SVID: a leaf names a
workload, not a trust domain); basic constraints with ``cA`` false (or absent); a key usage
extension with ``digitalSignature`` and neither ``keyCertSign`` nor ``cRLSign``. They are
checked before any signature work and before any HTTP is read.

**Where the chain comes from.** Python < 3.13 exposes the peer's chain only through private API
(``SSLObject._sslobj.get_unverified_chain()``, present in 3.10-3.12); `weft.http.tls` wraps
that in one place. A resumed TLS 1.3 session carries no chain at all, so every server context
that checks peers has ``num_tickets = 0``: each handshake is a full one.

**``client_auth``** (server side): ``"required"`` (CERT_REQUIRED: no SVID, no handshake),
``"optional"`` (CERT_OPTIONAL: a client without a certificate is served with no peer ID, and
`weft.authorize` then refuses it on routes that demand one; a client *with* a certificate must
pass both checks, or the connection is refused), ``"none"`` (no certificate asked for; session
tickets stay on).

**Where the key goes.** `ssl.SSLContext.load_cert_chain` reads files only. The SVID's key and
chain are written to an anonymous ``memfd`` (Linux) and loaded through ``/proc/self/fd/N``: no
name on any filesystem, gone when closed, mode 0600. Where memfd or /proc is missing, a private
directory from `tempfile.mkdtemp` (mode 0700) holds a 0600 file for the duration of the load
only. Either way nothing is left behind and no caller has to manage a directory; a file that
outlived the load would be a key on disk for no reason. Bundles need no file: they load from
memory (``cadata``).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store

from weft.spiffe_id import SpiffeId, SpiffeIdError
from weft.x509_der import split_certificates

__all__ = [
    "CLIENT_AUTH",
    "Bundles",
    "SvidError",
    "X509Svid",
    "check_expected",
    "client_context",
    "leaf_id",
    "server_context",
    "verify_chain",
    "verify_upstream",
]

Bundles = Mapping[str, Sequence[x509.Certificate]]  # trust domain -> its X.509 authorities
CLIENT_AUTH = {
    "required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
}
# SVID chains are short (SPIRE: leaf, at most a few intermediates); a bound keeps a hostile
# chain from costing more than a handful of signature checks.
MAX_CHAIN_DEPTH = 8

# The reason words of SvidError (a fixed list: log and metric label values).
REASONS = (
    "no_certificate",  # the peer sent none
    "bad_certificate",  # not parseable DER
    "bad_leaf",  # breaks a SPIFFE leaf rule
    "untrusted_domain",  # no bundle for the leaf's trust domain
    "bad_chain",  # does not chain to its own domain's bundle, or expired
    "unexpected_id",  # a valid SVID, not one of expect_ids
)


class SvidError(Exception):
    """A peer certificate that is not an acceptable SVID: `reason` (one of REASONS) and a
    sentence for the log."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# -- checks -----------------------------------------------------------------------------------


def leaf_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID of a leaf SVID, after the leaf rules of the module docstring. Raises
    SvidError("bad_leaf")."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise SvidError(
            "bad_leaf", "no subject alternative name (an SVID has one URI SAN)"
        ) from None
    except ValueError as e:  # a malformed extension
        raise SvidError("bad_leaf", f"unreadable extensions: {e}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise SvidError("bad_leaf", f"an SVID has exactly one URI SAN, this one has {len(uris)}")
    try:
        sid = SpiffeId.parse(uris[0])
    except SpiffeIdError as e:
        raise SvidError("bad_leaf", str(e)) from None
    if not sid.path:
        raise SvidError("bad_leaf", f"{sid} names a trust domain; a leaf SVID names a workload")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is not None and bc.ca:
        raise SvidError("bad_leaf", f"{sid}: a leaf SVID must not be a CA (basicConstraints cA)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise SvidError("bad_leaf", f"{sid}: no key usage (digitalSignature is required)") from None
    if not ku.digital_signature:
        raise SvidError("bad_leaf", f"{sid}: key usage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise SvidError("bad_leaf", f"{sid}: a leaf SVID must not have keyCertSign or cRLSign")
    return sid


def verify_chain(
    leaf_der: bytes,
    intermediates_der: Sequence[bytes],
    bundles: Bundles,
    now: datetime.datetime,
) -> SpiffeId:
    """The peer's SPIFFE ID, once its leaf passes the leaf rules and the chain verifies at
    `now` against the bundle of **the leaf's own trust domain only** (see the module
    docstring). Raises SvidError."""
    try:
        leaf = x509.load_der_x509_certificate(leaf_der)
        intermediates = [x509.load_der_x509_certificate(d) for d in intermediates_der]
    except ValueError as e:
        raise SvidError("bad_certificate", f"not a DER certificate: {e}") from None
    sid = leaf_id(leaf)
    roots = bundles.get(sid.trust_domain)
    if not roots:
        known = ", ".join(sorted(bundles)) or "none"
        raise SvidError(
            "untrusted_domain", f"{sid}: no bundle for trust domain {sid.trust_domain} ({known})"
        )
    verifier = (
        PolicyBuilder()
        .store(Store(list(roots)))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
        .extension_policies(
            ca_policy=ExtensionPolicy.webpki_defaults_ca(),
            ee_policy=ExtensionPolicy.permit_all(),
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except Exception as e:  # cryptography's VerificationError (its path is private)
        raise SvidError(
            "bad_chain", f"{sid}: does not chain to trust domain {sid.trust_domain}'s bundle: {e}"
        ) from None
    return sid


def check_expected(sid: SpiffeId, expect_ids: Sequence[SpiffeId]) -> None:
    """Raise SvidError("unexpected_id") unless `sid` is one of `expect_ids` (parsed IDs,
    compared as such)."""
    if sid not in expect_ids:
        allowed = ", ".join(map(str, expect_ids))
        raise SvidError("unexpected_id", f"{sid} is not one of the expected IDs ({allowed})")


def verify_upstream(
    chain_der: Sequence[bytes],
    bundles: Bundles,
    expect_ids: Sequence[SpiffeId],
    now: datetime.datetime,
) -> SpiffeId:
    """An upstream's SVID (its chain, leaf first, as the handshake gave it) checked as a
    peer's and then against the destination's ``expect_ids``. Raises SvidError."""
    if not chain_der:
        raise SvidError("no_certificate", "the upstream sent no certificate")
    sid = verify_chain(chain_der[0], chain_der[1:], bundles, now)
    check_expected(sid, expect_ids)
    return sid


def verify_peer(
    chain_der: Sequence[bytes], bundles: Bundles, now: datetime.datetime
) -> SpiffeId | None:
    """A client's SVID (leaf first), or None when it sent no certificate (only possible with
    ``client_auth = "optional"``). Raises SvidError."""
    if not chain_der:
        return None
    return verify_chain(chain_der[0], chain_der[1:], bundles, now)


# -- contexts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class X509Svid:
    """weft's own SVID: the chain (leaf first) and its private key, as the Workload API gives
    them."""

    chain: tuple[x509.Certificate, ...]
    key: CertificateIssuerPrivateKeyTypes

    @property
    def id(self) -> SpiffeId:
        return leaf_id(self.chain[0])

    @classmethod
    def from_der(cls, chain_der: Sequence[bytes] | bytes, key_der: bytes) -> X509Svid:
        """From DER: `chain_der` a list, or concatenated DER (the Workload API's
        ``x509_svid`` field); `key_der` PKCS#8. Raises ValueError."""
        if isinstance(chain_der, bytes):
            certs = [x509.load_der_x509_certificate(d) for d in split_certificates(chain_der)]
        else:
            certs = [x509.load_der_x509_certificate(d) for d in chain_der]
        if not certs:
            raise ValueError("an SVID needs at least its leaf certificate")
        key = serialization.load_der_private_key(key_der, password=None)
        return cls(tuple(certs), key)  # type: ignore[arg-type]


def _cadata(bundles: Bundles) -> bytes:
    """Every trusted authority, DER concatenated (what `load_verify_locations` takes)."""
    return b"".join(
        c.public_bytes(serialization.Encoding.DER) for certs in bundles.values() for c in certs
    )


def server_context(
    svid: X509Svid,
    bundles: Bundles,
    *,
    client_auth: str = "required",
    alpn: Sequence[str] = ("h2", "http/1.1"),
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> ssl.SSLContext:
    """A listener's context: `svid` as its certificate, clients verified by OpenSSL against
    the union of `bundles` as `client_auth` says (the per-domain check is `verify_peer`'s,
    after the handshake). Raises ssl.SSLError, ValueError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = min_version
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    load_svid(ctx, svid)
    ctx.verify_mode = CLIENT_AUTH[client_auth]
    if client_auth != "none":
        ctx.load_verify_locations(cadata=_cadata(bundles))
        # A resumed TLS 1.3 session carries no client chain to verify again.
        ctx.num_tickets = 0
    return ctx


def client_context(
    svid: X509Svid | None,
    bundles: Bundles,
    *,
    alpn: Sequence[str] = ("http/1.1",),
) -> ssl.SSLContext:
    """A destination's context: the upstream's chain verified by OpenSSL against the union
    of `bundles`, no host-name check (an SVID's identity is its URI SAN, which
    `verify_upstream` checks against ``expect_ids`` after the handshake); `svid` presented as
    the client certificate. Raises ssl.SSLError, ValueError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(list(alpn))
    ctx.load_verify_locations(cadata=_cadata(bundles))
    if svid is not None:
        load_svid(ctx, svid)
    return ctx


def load_svid(ctx: ssl.SSLContext, svid: X509Svid) -> None:
    """Load `svid`'s chain and key into `ctx` without leaving them in any file (module
    docstring). Raises ssl.SSLError (the key is not the leaf's), ValueError."""
    pem = svid.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ) + b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.chain)
    with _private_file(pem) as path:
        ctx.load_cert_chain(path)


@contextlib.contextmanager
def _private_file(data: bytes) -> Iterator[str]:
    """A path that reads as `data`, readable by this process only, gone on exit."""
    fd = -1
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fd = os.memfd_create("weft-svid", os.MFD_CLOEXEC)
    if fd >= 0:
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, data)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="weft-svid-") as d:  # mkdtemp: mode 0700
        path = os.path.join(d, "svid.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
