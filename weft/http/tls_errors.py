"""What a failed TLS handshake is called: the reason words of
``weft_tls_handshake_failures_total`` (`HANDSHAKE_REASONS`, from OpenSSL's error names), the
client side's `HandshakeFailed`, and the upstream side's 502 (`UpstreamTLSError`, whose public
sentence names the verification error without addresses).

Kept apart from `weft.http.tls` (the transport) so that the metrics and the config check can
name the reasons without importing the transport, and so the mapping from OpenSSL's words,
which grows as clients find new ways to fail, is one table in one place.
"""

from __future__ import annotations

import ssl

from weft.http.errors import UpstreamError

# The reason words a failed handshake is counted under (a fixed list: metric label values).
HANDSHAKE_REASONS = (
    "timeout",  # nothing, or not enough, within timeouts.tls_handshake
    "eof",  # the client closed or reset the connection mid-handshake
    "http_request",  # plain HTTP sent to a TLS port
    "protocol_version",  # no TLS version in common (min_version), or not TLS at all
    "no_shared_cipher",  # no cipher suite, group or signature algorithm in common
    "no_alpn",  # the client insisted on an ALPN protocol weft does not serve
    "unknown_ca",  # the client does not trust weft's certificate
    "bad_certificate",  # a client certificate missing, or refused (mTLS)
    # SPIFFE listeners (weft.spiffe): weft has no usable SVID, or the client's SVID was refused
    # after the handshake (weft.svid's reasons: the leaf rules, no bundle of its trust domain,
    # a chain that does not verify in its own trust domain's bundle)
    "no_identity",
    "svid_no_certificate",
    "svid_bad_certificate",
    "svid_bad_leaf",
    "svid_untrusted_domain",
    "svid_bad_chain",
    "other",
)
_REASON_OF = {
    "HTTP_REQUEST": "http_request",
    "HTTPS_PROXY_REQUEST": "http_request",
    "WRONG_VERSION_NUMBER": "protocol_version",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "NO_PROTOCOLS_AVAILABLE": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "UNKNOWN_PROTOCOL": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "no_shared_cipher",
    "NO_APPLICATION_PROTOCOL": "no_alpn",
    "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "no_alpn",
    "TLSV1_ALERT_UNKNOWN_CA": "unknown_ca",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "unknown_ca",
    "SSLV3_ALERT_BAD_CERTIFICATE": "unknown_ca",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "bad_certificate",
    "CERTIFICATE_VERIFY_FAILED": "bad_certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "bad_certificate",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}


class HandshakeFailed(Exception):
    """A TLS handshake did not complete: `reason` (one of HANDSHAKE_REASONS) and OpenSSL's
    words in `detail`. The transport is closed already."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def failure_reason(exc: BaseException) -> str:
    """The HANDSHAKE_REASONS word for an exception a handshake ended with."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "bad_certificate"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError, EOFError)):
        return "eof"
    if isinstance(exc, ssl.SSLError):
        return _REASON_OF.get(exc.reason or "", "other")
    return "other"


class UpstreamTLSError(UpstreamError):
    """TLS with an upstream failed (its certificate refused, or the handshake). `public` is
    the client's sentence: what went wrong, without addresses."""

    reason = "upstream_tls"

    def __init__(self, detail: str, public: str) -> None:
        super().__init__(detail)
        self.public = public


def refused(e: OSError | EOFError, server_name: str) -> UpstreamTLSError:
    """The 502 for a TLS handshake with an upstream that failed, or for a TLS alert that ended
    the first read (TLS 1.3 refuses a client certificate only after the client's Finished,
    so weft learns of it when it reads the answer)."""
    if isinstance(e, ssl.SSLError):
        words = (e.reason or str(e)).lower().replace("_", " ")
    else:
        words = "connection closed"
    return UpstreamTLSError(
        f"TLS with {server_name} failed: {e}",
        f"the TLS handshake with the upstream failed: {words}",
    )
