"""The jwt_svid and authorize built-ins (`weft.spiffe_middleware`) with a fake trust source and
a fake wall clock: 401 with WWW-Authenticate for a missing or invalid token, 403 for a valid
principal outside the allow-list, the reason word for the access log, never a 500."""

from __future__ import annotations

from types import SimpleNamespace

import h11
import pytest
from support.spiffe_certs import NOW, TrustDomain

from weft.builtins import BUILTINS
from weft.http.h1_request import make_request
from weft.http.h2_request import build_request
from weft.http.messages import BytesBody, Headers, Request, Response
from weft.jwt_svid import parse_jwt_bundle
from weft.schema import AuthorizeRule, JwtSvidPolicy, Limits
from weft.spiffe_id import SpiffeId
from weft.spiffe_middleware import make_authorize, make_jwt_svid

AUD = "spiffe://example.org/api"
POLICY = JwtSvidPolicy(AUD, ("ES256",))
RULES = (AuthorizeRule(allow_ids=frozenset({SpiffeId("example.org", "/frontend")})),)


class FakeTrust:
    def __init__(self, jwt_bundles):
        self._jwt = jwt_bundles

    def x509_bundles(self):
        return {}

    def jwt_bundles(self):
        if isinstance(self._jwt, Exception):
            raise self._jwt
        return self._jwt


@pytest.fixture(scope="module")
def org():
    td = TrustDomain("example.org")
    td.jwt_key("k1", "ES256")
    return td


@pytest.fixture
def source(org):
    return FakeTrust({"example.org": parse_jwt_bundle(org.jwks())})


def request(authorization: str | None = None, peer_id: SpiffeId | None = None) -> Request:
    headers = [(b"host", b"h")]
    if authorization is not None:
        headers.append((b"authorization", authorization.encode()))
    r = Request("GET", "/x", Headers(headers), BytesBody(b""), request_id="rid")
    if peer_id is not None:
        r.ctx["peer_id"] = peer_id
    return r


async def upstream(request: Request) -> Response:
    return Response.text(200, f"hello {request.ctx.get('principal')}")


def chain(*mws):
    async def run(req):
        async def call(i, r):
            if i == len(mws):
                return await upstream(r)
            return await mws[i](r, lambda r2: call(i + 1, r2))

        return await call(0, req)

    return run


async def test_a_valid_token_sets_the_principal_and_goes_on(org, source):
    mw = make_jwt_svid(POLICY, source, wall_clock=lambda: NOW.timestamp())
    req = request("Bearer " + org.jwt("k1"))
    resp = await chain(mw)(req)
    assert resp.status == 200
    assert req.ctx["principal"] == SpiffeId("example.org", "/frontend")


async def test_a_missing_token_is_401_with_a_bare_bearer_challenge(source):
    req = request()
    resp = await chain(make_jwt_svid(POLICY, source))(req)
    assert resp.status == 401
    assert resp.headers.get("www-authenticate") == "Bearer"
    assert req.ctx["error"] == "jwt_missing"


async def test_an_invalid_token_is_401_invalid_token_with_the_reason_in_the_log(org, source):
    late = NOW.timestamp() + 3600
    req = request("Bearer " + org.jwt("k1"))
    resp = await chain(make_jwt_svid(POLICY, source, wall_clock=lambda: late))(req)
    assert resp.status == 401
    assert resp.headers.get("www-authenticate") == 'Bearer error="invalid_token"'
    assert req.ctx["error"] == "jwt_expired"
    assert "principal" not in req.ctx


@pytest.mark.parametrize("junk", ["Bearer \x00", "Bearer a.b.c", "Bearer " + "e" * 5000, "Token x"])
async def test_junk_is_never_a_500(source, junk):
    resp = await chain(make_jwt_svid(POLICY, source))(request(junk))
    assert resp.status == 401


async def test_no_bundles_yet_is_503_not_a_500():
    for src in (None, FakeTrust(RuntimeError("not fetched"))):
        req = request("Bearer x")
        resp = await chain(make_jwt_svid(POLICY, src))(req)
        assert resp.status == 503 and req.ctx["error"] == "identity_unavailable"


async def test_a_valid_token_outside_the_allow_list_is_403(org, source):
    clock = lambda: NOW.timestamp()  # noqa: E731
    mws = (make_jwt_svid(POLICY, source, clock), make_authorize(RULES))
    req = request("Bearer " + org.jwt("k1", sub="/batch"))
    resp = await chain(*mws)(req)
    assert resp.status == 403 and req.ctx["error"] == "forbidden"
    req = request("Bearer " + org.jwt("k1", sub="/frontend"))
    assert (await chain(*mws)(req)).status == 200


async def test_authorize_uses_the_peer_id_without_a_token_and_refuses_no_identity():
    mw = make_authorize(RULES)
    req = request(peer_id=SpiffeId("example.org", "/frontend"))
    assert (await chain(mw)(req)).status == 200
    assert req.ctx["principal"] == SpiffeId("example.org", "/frontend")
    req = request()
    resp = await chain(mw)(req)
    assert resp.status == 403 and req.ctx["error"] == "no_identity"


def test_the_builtins_run_jwt_svid_then_authorize_before_rate_limits_and_retries():
    import weft.handler  # noqa: F401  (imports every built-in)

    names = [n for n, _ in BUILTINS]
    assert names.index("jwt_svid") < names.index("authorize") < names.index("rate_limit")
    assert names.index("rate_limit") < names.index("retry")


# -- where the principal comes from: the adapters copy the verified peer ------------------------


def server(peer_id: SpiffeId | None) -> SimpleNamespace:
    """What make_request and build_request read of their server."""
    return SimpleNamespace(
        limits=Limits(),
        rid_header=b"x-request-id",
        client=("127.0.0.1", 5000),
        transport=SimpleNamespace(tls=True, peer_id=peer_id),
        state=SimpleNamespace(draining=False),
        _send_interim=None,
    )


def h1_request(peer_id: SpiffeId | None, authorization: bytes | None = None) -> Request:
    conn = h11.Connection(h11.SERVER)
    head = b"GET /x HTTP/1.1\r\nHost: h\r\n"
    if authorization is not None:
        head += b"Authorization: " + authorization + b"\r\n"
    conn.receive_data(head + b"\r\n")
    ev = conn.next_event()
    assert isinstance(ev, h11.Request)
    return make_request(server(peer_id), conn, ev, b"GET", b"/x", b"HTTP/1.1", 0.0)  # type: ignore[arg-type]


def h2_request(peer_id: SpiffeId | None) -> Request:
    head = [(b":method", b"GET"), (b":path", b"/x"), (b":scheme", b"https"), (b":authority", b"h")]
    stream = SimpleNamespace(
        head=head, ended=True, trailers=None, chunks=[], body=None, expect_continue=False
    )
    return build_request(server(peer_id), stream)  # type: ignore[arg-type]


async def test_the_adapters_make_the_verified_peer_the_principal(org, source):
    peer = SpiffeId("example.org", "/frontend")
    # 1. h1 and h2 alike: the peer's ID is both peer_id and the principal
    for req in (h1_request(peer), h2_request(peer)):
        assert req.ctx["peer_id"] is peer and req.ctx["principal"] is peer
    # 2. a plain or unauthenticated client: neither key, so nothing keys on a missing identity
    for req in (h1_request(None), h2_request(None)):
        assert "peer_id" not in req.ctx and "principal" not in req.ctx
    # 3. a route with [routes.jwt_svid]: the token's subject replaces the peer as the principal
    token = org.jwt("k1", sub="/batch").encode()
    req = h1_request(peer, b"Bearer " + token)
    mw = make_jwt_svid(POLICY, source, wall_clock=lambda: NOW.timestamp())
    assert (await chain(mw)(req)).status == 200
    assert req.ctx["principal"] == SpiffeId("example.org", "/batch")
    assert req.ctx["peer_id"] is peer
