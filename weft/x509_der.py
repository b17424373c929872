"""The little of X.509 DER the identity process reads without a crypto library.

The Workload API hands over certificates as concatenated DER (an SVID's chain, a bundle) and a
PKCS#8 DER key. To write them for `ssl.SSLContext.load_cert_chain` and to know when an SVID
expires, weft needs three things: cut the concatenation into certificates, read a
certificate's notAfter, and wrap DER in PEM. That is a walk over a few DER headers (X.690
§8.1: tag, definite length), done here so that weft's runtime needs no ``cryptography``.
Verifying certificates is not done here (the TLS library does it, and `weft.svid`).

Malformed input raises `DERError` with what was wrong; nothing reads past the buffer.
"""

from __future__ import annotations

import base64
import calendar
import ssl

__all__ = ["DERError", "key_pem", "not_after", "pem_certificates", "split_certificates"]

_SEQUENCE, _UTCTIME, _GENERALIZEDTIME, _VERSION = 0x30, 0x17, 0x18, 0xA0


class DERError(ValueError):
    """Not the DER expected."""


def _header(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of the value, end of the value) of the element at `pos`."""
    if pos + 2 > len(buf):
        raise DERError("truncated element")
    tag, first = buf[pos], buf[pos + 1]
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
        raise DERError("element runs past the end")
    return tag, pos, pos + length


def split_certificates(der: bytes) -> list[bytes]:
    """The certificates of a concatenation, in order. Raises DERError (also when empty)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(der):
        tag, _start, end = _header(der, pos)
        if tag != _SEQUENCE:
            raise DERError(f"not a certificate at byte {pos}")
        out.append(der[pos:end])
        pos = end
    if not out:
        raise DERError("no certificate")
    return out


def _time(tag: int, raw: bytes) -> float:
    text = raw.decode("ascii", "replace")
    if not text.endswith("Z"):
        raise DERError(f"certificate time {text!r} is not UTC")
    if tag == _UTCTIME and len(text) == 13:  # YYMMDDHHMMSSZ; RFC 5280 §4.1.2.5.1
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != _GENERALIZEDTIME or len(text) != 15:
        raise DERError(f"certificate time {text!r} has an unexpected form")
    try:
        parts = [int(text[i:j]) for i, j in ((0, 4), (4, 6), (6, 8), (8, 10), (10, 12), (12, 14))]
    except ValueError:
        raise DERError(f"certificate time {text!r} is not a time") from None
    return float(calendar.timegm((*parts, 0, 0, 0)))


def not_after(cert: bytes) -> float:
    """The certificate's notAfter as a Unix time. Raises DERError."""
    tag, start, _end = _header(cert, 0)
    if tag != _SEQUENCE:
        raise DERError("not a certificate")
    tag, pos, _tbs_end = _header(cert, start)  # tbsCertificate
    if tag != _SEQUENCE:
        raise DERError("no tbsCertificate")
    tag, _s, end = _header(cert, pos)
    if tag == _VERSION:
        pos = end
    for _field in ("serialNumber", "signature", "issuer"):
        pos = _header(cert, pos)[2]
    tag, pos, _validity_end = _header(cert, pos)
    if tag != _SEQUENCE:
        raise DERError("no validity")
    pos = _header(cert, pos)[2]  # notBefore
    tag, start, end = _header(cert, pos)
    return _time(tag, cert[start:end])


def pem_certificates(ders: list[bytes]) -> str:
    """The certificates as one PEM text, in order."""
    return "".join(ssl.DER_cert_to_PEM_cert(d) for d in ders)


def key_pem(pkcs8: bytes) -> str:
    """A PKCS#8 DER private key as PEM (``BEGIN PRIVATE KEY``)."""
    b64 = base64.encodebytes(pkcs8).decode("ascii").replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END PRIVATE KEY-----\n"
