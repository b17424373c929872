"""JWT-SVIDs: a bearer token checked by the JWT-SVID standard, with PyJWT doing the signature.

`validate` turns ``Authorization: Bearer <token>`` into the SPIFFE ID in its ``sub``, or a
`JwtSvidError` whose `reason` word says why not (the middleware answers each with 401 and puts
the word in the access log; nothing here raises anything else for any input). The order of the
steps is the point, because every step before the signature check reads *unverified* data and
must not let that data choose how it is verified:

1. The header, unverified: ``alg`` must be in the route's ``algorithms``, which config allows
   only from the asymmetric algorithms of the JWT-SVID standard (RS/ES/PS 256/384/512). ``none``
   and every HMAC algorithm are refused here, whatever the token says, so the classic key
   confusion (an HS256 token "signed" with a public RSA key used as the HMAC secret) never
   reaches a verifier. ``kid`` is required (go-spiffe requires it too); ``typ``, if present, is
   ``JWT`` or ``JOSE`` (JWT-SVID.md §2.3).
2. The claims, unverified, only to read ``sub``: it must be a valid SPIFFE ID, and its trust
   domain picks the JWT bundle. A token of domain B is thus checked with B's keys only: a key
   of another domain, even under the same ``kid``, can never vouch for it (the JWT side of the
   union-of-bundles hole, see `weft.svid`).
3. The key by ``kid`` in that bundle; its type must fit ``alg`` (an RSA key for RS*/PS*, the
   curve of ES256/384/512), and a JWK that names its own ``alg`` must name this one.
4. `jwt.decode` with ``algorithms=[alg]`` (one, the checked one), the route's ``audience`` and
   ``require = aud, exp, sub``: signature, then audience. Time is checked here afterwards,
   against the caller's clock (tests pass a fake one), since PyJWT reads the system clock.

Leeway: 60 s on ``exp`` and ``nbf`` (Envoy's jwt_authn ``clock_skew_seconds`` default). JWT-SVIDs
live minutes (SPIRE's default is 5), so a minute of skew between the issuer's host and weft's is
tolerated while a stolen token still dies soon.

JWT bundles (`JwtBundle`) are parsed from the Workload API's JWKS per trust domain: keys with
``use`` other than ``jwt-svid`` (an X.509 authority published in the same document) and keys
without ``kid`` are skipped; a ``kid`` twice is an error, as in go-spiffe.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from weft.spiffe_id import SpiffeId, SpiffeIdError

__all__ = [
    "ALGORITHMS",
    "LEEWAY",
    "BundleKey",
    "JwtBundle",
    "JwtSvidError",
    "bearer_token",
    "parse_jwt_bundle",
    "validate",
]

# JWT-SVID.md §3: the algorithms a JWT-SVID may be signed with. Never "none", never HS*.
ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
LEEWAY = 60.0  # seconds; see the module docstring
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}

# The reason words of JwtSvidError (a fixed list: log and metric label values).
REASONS = (
    "missing",  # no Authorization header, or not a Bearer one
    "malformed",  # not a JWS compact token, unreadable header or claims, bad typ
    "bad_alg",  # alg none, HMAC, or not in the route's algorithms
    "bad_sub",  # sub missing or not a SPIFFE ID
    "untrusted_domain",  # no JWT bundle for the sub's trust domain
    "unknown_kid",  # no kid, or not in the sub's trust domain's bundle
    "bad_signature",  # the signature does not verify (or the key does not fit alg)
    "bad_audience",  # aud missing or without the route's audience
    "expired",  # exp missing or past (beyond the leeway)
    "not_yet_valid",  # nbf in the future (beyond the leeway)
)


@dataclass(frozen=True, slots=True)
class BundleKey:
    """One key of a JWT bundle: the public key, and the ``alg`` its JWK names (if any)."""

    kid: str
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    alg: str | None = None


JwtBundle = Mapping[str, BundleKey]  # kid -> key


class JwtSvidError(Exception):
    """A token that does not authenticate: `reason` (one of REASONS) and a sentence for the
    log (never sent to the client)."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_jwt_bundle(jwks: bytes | str | Mapping[str, Any]) -> dict[str, BundleKey]:
    """A trust domain's JWT bundle from its JWKS document (module docstring: what is
    skipped). Only RSA and EC keys are kept: a symmetric (``oct``) key in a bundle would be a
    shared secret, which no JWT-SVID is verified with. Raises ValueError."""
    try:
        doc = json.loads(jwks) if isinstance(jwks, (bytes, str)) else jwks
    except ValueError as e:
        raise ValueError(f"not JSON: {e}") from None
    keys = doc.get("keys") if isinstance(doc, Mapping) else None
    if not isinstance(keys, list):
        raise ValueError('a JWKS is an object with a "keys" list')
    out: dict[str, BundleKey] = {}
    for k in keys:
        if not isinstance(k, dict) or k.get("use", "jwt-svid") != "jwt-svid":
            continue
        kid = k.get("kid")
        if not isinstance(kid, str) or not kid or k.get("kty") not in ("RSA", "EC"):
            continue
        if kid in out:
            raise ValueError(f"key id {kid!r} appears twice in the JWKS")
        try:
            key = jwt.PyJWK(k).key
        except jwt.PyJWTError as e:
            raise ValueError(f"key {kid!r}: {e}") from None
        alg = k.get("alg")
        out[kid] = BundleKey(kid, key, alg if isinstance(alg, str) else None)
    return out


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` value. Raises JwtSvidError
    ("missing") when there is none (RFC 6750 §2.1: the scheme is case-insensitive)."""
    if authorization is None:
        raise JwtSvidError("missing", "no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise JwtSvidError("missing", "the Authorization header is not a Bearer token")
    return token


def validate(
    token: str,
    bundles: Mapping[str, JwtBundle],
    *,
    audience: str,
    algorithms: Sequence[str],
    now: float,
) -> SpiffeId:
    """The SPIFFE ID a JWT-SVID vouches for, checked as the module docstring says at `now`
    (Unix seconds). Raises JwtSvidError and nothing else."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as e:
        raise JwtSvidError("malformed", f"unreadable token header: {e}") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms or alg not in ALGORITHMS:
        raise JwtSvidError(
            "bad_alg", f"alg {alg!r} is not accepted here (accepted: {', '.join(algorithms)})"
        )
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtSvidError("malformed", f'typ {typ!r}: a JWT-SVID is "JWT" or "JOSE"')
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise JwtSvidError("unknown_kid", "the token header has no kid")
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as e:
        raise JwtSvidError("malformed", f"unreadable claims: {e}") from None
    sub = claims.get("sub")
    if not isinstance(sub, str):
        raise JwtSvidError("bad_sub", "no sub claim")
    try:
        sid = SpiffeId.parse(sub)
    except SpiffeIdError as e:
        raise JwtSvidError("bad_sub", str(e)) from None
    bundle = bundles.get(sid.trust_domain)
    if bundle is None:
        raise JwtSvidError("untrusted_domain", f"no JWT bundle for trust domain {sid.trust_domain}")
    jwk = bundle.get(kid)
    if jwk is None:
        raise JwtSvidError(
            "unknown_kid", f"kid {kid!r} is not in trust domain {sid.trust_domain}'s JWT bundle"
        )
    if not _fits(jwk, alg):
        kind = type(jwk.key).__name__
        raise JwtSvidError("bad_signature", f"key {kid!r} ({kind}) cannot verify {alg}")
    try:
        verified = jwt.decode(
            token,
            jwk.key,
            algorithms=[alg],
            audience=audience,
            options={
                "require": ["aud", "exp", "sub"],
                "verify_exp": False,  # checked below, against `now`
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidAudienceError as e:
        raise JwtSvidError("bad_audience", f"{e} (this route is {audience!r})") from None
    except jwt.MissingRequiredClaimError as e:
        reason = {"aud": "bad_audience", "exp": "expired"}.get(e.claim, "malformed")
        raise JwtSvidError(reason, str(e)) from None
    except jwt.InvalidSignatureError as e:
        raise JwtSvidError("bad_signature", str(e) or "signature does not verify") from None
    except jwt.PyJWTError as e:
        raise JwtSvidError("malformed", str(e)) from None
    except Exception as e:  # a key/algorithm mismatch the checks above did not foresee
        raise JwtSvidError("bad_signature", f"{type(e).__name__}: {e}") from None
    if verified.get("sub") != sub:  # the same bytes were decoded twice; a cheap invariant
        raise JwtSvidError("malformed", "sub changed between reads")
    exp = verified.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise JwtSvidError("expired", "exp is not a number")
    if now > exp + LEEWAY:
        raise JwtSvidError("expired", f"expired {now - exp:.0f}s ago")
    nbf = verified.get("nbf")
    if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) and now < nbf - LEEWAY:
        raise JwtSvidError("not_yet_valid", f"valid only in {nbf - now:.0f}s")
    return sid


def _fits(jwk: BundleKey, alg: str) -> bool:
    """Whether the key is of the kind `alg` verifies with (and the JWK does not name
    another alg)."""
    if jwk.alg is not None and jwk.alg != alg:
        return False
    key = jwk.key
    if alg[:2] in ("RS", "PS"):
        return isinstance(key, rsa.RSAPublicKey)
    curve = _CURVES.get(alg)
    return (
        curve is not None
        and isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, curve)
    )
