"""Unit tests for weft.jwt_svid: JWT-SVIDs validated with a fake clock, and every refusal a
typed reason (never an exception of another kind, whatever the token holds)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from support.spiffe_certs import NOW, TrustDomain

from weft.jwt_svid import (
    LEEWAY,
    JwtSvidError,
    bearer_token,
    parse_jwt_bundle,
    validate,
)
from weft.spiffe_id import SpiffeId

AUD = "spiffe://example.org/api"
ALGS = ("RS256", "ES256", "PS256")
T = NOW.timestamp()


@pytest.fixture(scope="module")
def org():
    td = TrustDomain("example.org")
    td.jwt_key("rsa-1", "RS256")
    td.jwt_key("ec-1", "ES256")
    return td


@pytest.fixture(scope="module")
def partner():
    td = TrustDomain("partner.example")
    td.jwt_key("p-1", "ES256")
    return td


@pytest.fixture(scope="module")
def bundles(org, partner):
    return {
        "example.org": parse_jwt_bundle(org.jwks_json()),
        "partner.example": parse_jwt_bundle(partner.jwks()),
    }


def check(token, bundles, *, now=T, audience=AUD, algorithms=ALGS):
    return validate(token, bundles, audience=audience, algorithms=algorithms, now=now)


def refused(reason, token, bundles, **kw):
    with pytest.raises(JwtSvidError) as e:
        check(token, bundles, **kw)
    assert e.value.reason == reason, e.value
    return e.value.detail


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("kid", "alg"), [("rsa-1", "RS256"), ("ec-1", "ES256"), ("rsa-1", "PS256")]
)
def test_a_valid_token_gives_the_sub_as_a_parsed_id(org, bundles, kid, alg):
    token = org.jwt(kid, alg=alg, sub="/frontend")
    assert check(token, bundles) == SpiffeId("example.org", "/frontend")


def test_aud_may_be_a_list_holding_the_route_audience(org, bundles):
    token = org.jwt("ec-1", aud=["spiffe://example.org/other", AUD])
    assert check(token, bundles).path == "/frontend"


def test_an_expired_token_is_refused_past_the_leeway_on_the_fake_clock(org, bundles):
    exp = NOW + datetime.timedelta(minutes=5)
    token = org.jwt("ec-1", exp=exp)
    assert check(token, bundles, now=exp.timestamp() + LEEWAY - 1)
    assert "ago" in refused("expired", token, bundles, now=exp.timestamp() + LEEWAY + 1)


def test_a_token_not_yet_valid_is_refused(org, bundles):
    token = org.jwt("ec-1", claims={"nbf": int(T + 600)})
    refused("not_yet_valid", token, bundles)


def test_a_token_for_another_audience_is_refused(org, bundles):
    refused("bad_audience", org.jwt("ec-1", aud="spiffe://example.org/billing"), bundles)
    refused("bad_audience", org.jwt("ec-1", aud=None), bundles)


def test_required_claims_are_required(org, bundles):
    refused("bad_sub", org.jwt("ec-1", sub=None), bundles)
    refused("bad_sub", org.jwt("ec-1", sub="https://example.org/x"), bundles)
    key = org.jwt_keys["ec-1"].key
    no_exp = jwt.encode(
        {"sub": "spiffe://example.org/x", "aud": AUD}, key, "ES256", headers={"kid": "ec-1"}
    )
    refused("expired", no_exp, bundles)


def test_alg_none_is_refused(bundles):
    header = b64(json.dumps({"alg": "none", "kid": "ec-1", "typ": "JWT"}).encode())
    claims = b64(json.dumps({"sub": "spiffe://example.org/x", "aud": AUD, "exp": T + 60}).encode())
    refused("bad_alg", f"{header}.{claims}.", bundles)
    refused("bad_alg", f"{header}.{claims}.", bundles, algorithms=(*ALGS, "none"))


def test_an_hs256_token_signed_with_the_rsa_public_key_as_secret_is_refused(org, bundles):
    # The classic key confusion: the verifier is tricked into HMAC with the public key PEM.
    pem = (
        org.jwt_keys["rsa-1"]
        .key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    claims = b64(
        json.dumps({"sub": "spiffe://example.org/admin", "aud": AUD, "exp": T + 60}).encode()
    )
    sig = b64(hmac.new(pem, f"{header}.{claims}".encode(), hashlib.sha256).digest())
    token = f"{header}.{claims}.{sig}"
    refused("bad_alg", token, bundles)
    refused("bad_alg", token, bundles, algorithms=(*ALGS, "HS256"))  # even if listed


def test_an_alg_outside_the_route_list_is_refused(org, bundles):
    refused("bad_alg", org.jwt("rsa-1", alg="RS256"), bundles, algorithms=("ES256",))


def test_an_unknown_kid_is_refused(org, bundles):
    token = TrustDomain("example.org").jwt("unpublished")  # a key the bundle does not hold
    refused("unknown_kid", token, bundles)
    refused("unknown_kid", org.jwt("ec-1", headers={"kid": ""}), bundles)


def test_a_sub_of_another_domain_is_checked_with_that_domains_bundle_only(org, partner, bundles):
    # Signed with example.org's key, claiming a partner ID: the partner bundle lacks the kid.
    token = org.jwt("ec-1", sub="spiffe://partner.example/frontend")
    assert "partner.example's JWT bundle" in refused("unknown_kid", token, bundles)
    # Signed by partner's key under a kid example.org also has: still partner's key decides.
    forged = partner.jwt("p-1", sub="spiffe://example.org/admin", headers={"kid": "ec-1"})
    refused("bad_signature", forged, bundles)
    assert check(partner.jwt("p-1", sub="/svc"), bundles) == SpiffeId("partner.example", "/svc")


def test_a_sub_of_a_domain_without_a_bundle_is_refused(bundles):
    other = TrustDomain("other.example")
    refused("untrusted_domain", other.jwt("o-1"), bundles)


def test_a_key_of_the_wrong_type_for_alg_is_a_bad_signature(org, bundles):
    token = org.jwt("ec-1")
    header, claims, sig = token.split(".")
    h = json.loads(base64.urlsafe_b64decode(header + "=="))
    h["kid"] = "rsa-1"  # an ES256 token pointed at the RSA key
    refused("bad_signature", ".".join([b64(json.dumps(h).encode()), claims, sig]), bundles)


def test_a_tampered_token_is_a_bad_signature(org, bundles):
    header, _claims, sig = org.jwt("ec-1").split(".")
    claims = b64(
        json.dumps({"sub": "spiffe://example.org/admin", "aud": AUD, "exp": T + 60}).encode()
    )
    refused("bad_signature", f"{header}.{claims}.{sig}", bundles)


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "....", "e30.e30.", "\x00\xff"])
def test_garbage_is_malformed_and_nothing_else(bundles, token):
    with pytest.raises(JwtSvidError) as e:
        check(token, bundles)
    assert e.value.reason in ("malformed", "bad_alg")


def test_a_strange_typ_is_malformed(org, bundles):
    refused("malformed", org.jwt("ec-1", headers={"typ": "at+jwt"}), bundles)


def test_bearer_tokens_are_read_from_the_authorization_value():
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer   abc") == "abc"
    for value in (None, "", "Basic dXNlcjpwdw==", "Bearer", "Bearer  "):
        with pytest.raises(JwtSvidError) as e:
            bearer_token(value)
        assert e.value.reason == "missing"


def test_a_jwks_keeps_only_jwt_svid_keys_with_a_kid(org):
    doc = org.jwks()
    doc["keys"].append({**doc["keys"][0], "use": "x509-svid", "kid": "x"})
    doc["keys"].append({k: v for k, v in doc["keys"][1].items() if k != "kid"})
    doc["keys"].append({"kty": "oct", "k": b64(b"secret"), "kid": "hmac"})
    assert set(parse_jwt_bundle(doc)) == {"rsa-1", "ec-1"}
    doc["keys"].append(doc["keys"][0])
    with pytest.raises(ValueError, match="twice"):
        parse_jwt_bundle(doc)
    with pytest.raises(ValueError):
        parse_jwt_bundle(b"{")
