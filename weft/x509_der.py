"""The Workload API's DER, made into what `ssl` loads: certificates cut apart, PEM, expiry.

The Workload API hands over certificates as *concatenated* DER (an SVID's chain, a bundle) and
a PKCS#8 DER key. The identity process writes them as PEM for `ssl.SSLContext.load_cert_chain`
and needs each SVID's notAfter to withdraw it at expiry. Parsing is `cryptography`'s: every
certificate is loaded with `cryptography.x509.load_der_x509_certificate` (which refuses
anything malformed) and the key with `load_der_private_key`. The one thing `cryptography` has
no call for is cutting a concatenation into its certificates, so `split_certificates` reads the
outer SEQUENCE's tag and length (X.690 §8.1.2-8.1.3) to find where each one ends, and then has
`cryptography` load each piece; nothing of the certificate's content is read here.

Malformed input raises `DERError` (a ValueError) with what was wrong.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["DERError", "key_pem", "not_after", "pem_certificates", "split_certificates"]

_SEQUENCE = 0x30


class DERError(ValueError):
    """Not the DER expected."""


def _element_end(buf: bytes, pos: int) -> int:
    """Where the DER element starting at `pos` ends (its tag must be a SEQUENCE)."""
    if pos + 2 > len(buf):
        raise DERError(f"truncated certificate at byte {pos}")
    if buf[pos] != _SEQUENCE:
        raise DERError(f"not a certificate at byte {pos}")
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(buf):
            raise DERError("bad length")  # indefinite (BER) or over 4 GiB: not a certificate
        length = int.from_bytes(buf[pos : pos + count], "big")
        pos += count
    if pos + length > len(buf):
        raise DERError("certificate runs past the end")
    return pos + length


def split_certificates(der: bytes) -> list[bytes]:
    """The certificates of a concatenation, in order, each one loaded by `cryptography`.
    Raises DERError (also when empty)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(der):
        end = _element_end(der, pos)
        piece = der[pos:end]
        try:
            x509.load_der_x509_certificate(piece)
        except ValueError as e:
            raise DERError(f"certificate {len(out) + 1}: {e}") from None
        out.append(piece)
        pos = end
    if not out:
        raise DERError("no certificate")
    return out


def not_after(cert: bytes) -> float:
    """The certificate's notAfter as a Unix time. Raises DERError."""
    try:
        return x509.load_der_x509_certificate(cert).not_valid_after_utc.timestamp()
    except ValueError as e:
        raise DERError(str(e)) from None


def pem_certificates(ders: list[bytes]) -> str:
    """The certificates as one PEM text, in order."""
    return "".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM).decode()
        for d in ders
    )


def key_pem(pkcs8: bytes) -> str:
    """A PKCS#8 DER private key as PEM (``BEGIN PRIVATE KEY``). Raises DERError."""
    try:
        key = serialization.load_der_private_key(pkcs8, password=None)
    except (ValueError, TypeError) as e:
        raise DERError(f"private key: {e}") from None
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
