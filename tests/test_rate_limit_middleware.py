"""The rate-limit built-in (`weft.rate_limit_middleware`) keyed on the principal: a bucket per
SPIFFE ID, whatever address the requests come from; a request without a principal not counted
by such a limit; and, through the real built-in chain, the JWT-SVID's subject as the key."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from support.config import MINIMAL_CONFIG
from support.config import load_text as load
from support.spiffe_certs import TrustDomain

from weft.backpressure import NS, SharedLimiter, private_table, sweep_idle_ns
from weft.builtins import BuiltinContext, builtin_chain
from weft.http.messages import BytesBody, Headers, Request, Response
from weft.jwt_svid import parse_jwt_bundle
from weft.rate_limit_middleware import make_rate_limit
from weft.schema import Config
from weft.spiffe_id import SpiffeId

FRONTEND = SpiffeId("example.org", "/frontend")
BATCH = SpiffeId("example.org", "/batch")
# One request a minute after a burst of one: two at once, then refused for this test's life.
BY_PRINCIPAL = '[[routes.rate_limit]]\nkey = "principal"\nrate = "1/m"\nburst = 1\n'


class Clock:
    def __init__(self) -> None:
        self.ns = 1000 * NS

    def __call__(self) -> int:
        return self.ns


def config(tmp_path: Path, route_text: str) -> Config:
    return load(tmp_path, MINIMAL_CONFIG + route_text + "[spiffe]\n")


def request(principal: SpiffeId | None, client: str = "192.0.2.1") -> Request:
    r = Request("GET", "/", Headers([(b"host", b"h")]), BytesBody(b""), client=(client, 4000))
    if principal is not None:
        r.ctx["principal"] = principal
    return r


async def upstream(request: Request) -> Response:
    return Response.text(200, "ok\n")


@pytest.fixture
def limited(tmp_path):
    """Route "web" with one principal-keyed limit: its middleware over a private table."""
    cfg = config(tmp_path, BY_PRINCIPAL)
    clock = Clock()
    limiter = SharedLimiter(private_table(64), clock)
    mw = make_rate_limit(cfg.routes[0], limiter, BuiltinContext(config=cfg))
    return SimpleNamespace(mw=mw, limiter=limiter, clock=clock, limits=cfg.routes[0].rate_limits)


async def statuses(mw, *requests: Request) -> list[int]:
    return [(await mw(r, upstream)).status for r in requests]


async def test_each_principal_has_its_own_bucket_whatever_its_address(limited):
    mw = limited.mw
    # 1. the frontend, from three addresses: one bucket, 1 + burst admitted, then refused
    got = await statuses(mw, *(request(FRONTEND, f"192.0.2.{i}") for i in (1, 2, 3)))
    assert got == [200, 200, 429]
    refused = request(FRONTEND, "192.0.2.9")
    resp = await mw(refused, upstream)
    assert resp.status == 429 and refused.ctx["error"] == "rate_limited"
    assert resp.headers.get("retry-after") is not None
    # 2. the batch job, from the frontend's address: a bucket of its own, still full
    admitted = request(BATCH, "192.0.2.1")
    resp = await mw(admitted, upstream)
    assert resp.status == 200 and admitted.ctx["rate_limit"] == "admitted"
    assert resp.headers.get("ratelimit") == '"web.0";r=1;t=60'
    assert await statuses(mw, request(BATCH), request(BATCH)) == [200, 429]


async def test_a_request_without_a_principal_is_not_counted_by_a_principal_limit(limited):
    mw = limited.mw
    # 1. anonymous requests all go on, as if the route had no limit: no decision, no fields
    for _ in range(5):
        anonymous = request(None)
        resp = await mw(anonymous, upstream)
        assert resp.status == 200
        assert "rate_limit" not in anonymous.ctx and "error" not in anonymous.ctx
        assert resp.headers.get("ratelimit") is None
        assert resp.headers.get("ratelimit-policy") is None
    # 2. they used no principal's bucket
    assert await statuses(mw, request(FRONTEND), request(FRONTEND)) == [200, 200]


async def test_other_limits_of_the_route_still_count_a_request_without_a_principal(tmp_path):
    cfg = config(tmp_path, '[[routes.rate_limit]]\nrate = "1/m"\nburst = 2\n' + BY_PRINCIPAL)
    limiter = SharedLimiter(private_table(64), Clock())
    mw = make_rate_limit(cfg.routes[0], limiter, BuiltinContext(config=cfg))
    # by client address: 1 + 2 admitted, then refused; the principal limit never decides
    got = await statuses(mw, *(request(None) for _ in range(4)))
    assert got == [200, 200, 200, 429]
    resp = await mw(request(None, "192.0.2.50"), upstream)
    assert resp.headers.get("ratelimit") == '"web.0";r=2;t=60'


async def test_the_key_is_the_canonical_id_and_idle_buckets_are_swept(limited):
    mw, limiter, clock = limited.mw, limited.limiter, limited.clock
    key = b"web\x000\x00spiffe://example.org/frontend"  # route, limit index, the ID's form
    parsed = SpiffeId.parse("spiffe://example.org/frontend")
    # 1. a parsed ID and a constructed one are one bucket, under the ID's spiffe:// form
    assert await statuses(mw, request(FRONTEND), request(parsed), request(parsed)) == [
        200,
        200,
        429,
    ]
    assert limiter.table.find(key) is not None
    # 2. idle past the slowest refill, the sweep evicts it and the bucket starts full again
    idle = sweep_idle_ns(limited.limits)
    clock.ns += idle + 1
    assert limiter.sweep(idle) == 1
    assert limiter.table.find(key) is None
    assert await statuses(mw, request(FRONTEND), request(FRONTEND)) == [200, 200]


# -- through the built-in chain: jwt_svid's subject is the key ----------------------------------


class FakeTrust:
    def __init__(self, td: TrustDomain) -> None:
        self._jwt = {"example.org": parse_jwt_bundle(td.jwks())}

    def x509_bundles(self) -> dict:
        return {}

    def jwt_bundles(self) -> dict:
        return self._jwt


async def test_behind_jwt_svid_the_token_subject_is_the_key_not_the_peer(tmp_path):
    import weft.handler  # noqa: F401  (registers every built-in)

    org = TrustDomain("example.org")
    org.jwt_key("k1", "ES256")
    jwt = '[routes.jwt_svid]\naudience = "spiffe://example.org/api"\nalgorithms = ["ES256"]\n'
    cfg = config(tmp_path, BY_PRINCIPAL + jwt)
    chain = builtin_chain(cfg.routes[0], BuiltinContext(config=cfg, identity=FakeTrust(org)))
    assert len(chain) == 2  # jwt_svid, then the rate limit

    async def call(sub: str) -> int:
        # one mTLS peer (the adapter made it the principal) sends tokens for two subjects
        r = request(FRONTEND)
        r.ctx["peer_id"] = FRONTEND
        r.headers.add("authorization", "Bearer " + org.jwt("k1", sub=sub))

        async def rest(req: Request) -> Response:
            return await chain[1](req, upstream)

        return (await chain[0](r, rest)).status

    assert [await call("/batch") for _ in range(3)] == [200, 200, 429]
    assert [await call("/report") for _ in range(3)] == [200, 200, 429]
