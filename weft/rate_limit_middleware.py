"""``[[routes.rate_limit]]`` as built-in middleware: every limit of the route must admit.

`weft.backpressure` decides; this module finds each request's key, asks, and answers:

* **Keys**: ``client_ip`` is the client as the forwarding headers see it (the peer, or through
  a trusted proxy the right-most untrusted X-Forwarded-For address,
  `weft.http.headers.client_address`), so a client cannot choose its key by forging the
  header; ``route`` is one key for the route; ``header:<name>`` is that header's value, and the
  client's address when the header is absent (a missing header must not put every such client
  in one bucket, nor in none); ``principal`` is the request's SPIFFE ID (``ctx["principal"]``:
  the client's verified X.509-SVID, or the subject of a JWT-SVID ``[routes.jwt_svid]``
  accepted, which runs before this), in its one canonical ``spiffe://`` spelling, so two
  spellings of a workload cannot have two buckets. Each key is prefixed with the route and the
  limit's index, so two routes, or two limits of a route, never share a bucket.
* **No principal**: a ``principal`` limit does not count a request that has none, as nginx's
  ``limit_req`` skips a request whose key is empty and Envoy sends no descriptor it cannot
  build. The alternatives are worse: one shared bucket for every anonymous client lets one of
  them starve the rest, and falling back to the client address (as ``header:`` does) would
  mix two kinds of key in one limit. A route that must refuse anonymous callers says so with
  ``[[routes.authorize]]`` (403 before any limit). A request that no limit of the route
  counted goes on as if the route had none: no decision for the metrics, no fields.
* **Refused**: the limit's status (429, or 503) with ``Retry-After`` in whole seconds rounded
  up, and the ``RateLimit-Policy`` / ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-
  headers); the reason word ``rate_limited`` goes to the access log. Nothing reaches the
  upstream.
* **Admitted**: a leaky bucket's request waits for its slot first, holding no upstream
  connection (the wait is before the rest of the chain) and ending at once, as a 499, if its
  client goes away meanwhile. Then the request goes on, and the answer carries the same two
  fields, for the limit with the least remaining (the draft's rule for several policies).
* **A full table** (no entry can be had for a new key) is counted in ``request.ctx`` for the
  metrics and decided by ``[limits.rate_table] on_full``: ``allow`` lets the request through
  that limit, ``deny`` refuses it with the limit's status.

A request refused by one limit has still used a slot of the limits before it in the list
(Envoy's descriptors behave the same): put the most selective limit first.
"""

from __future__ import annotations

import trio

from weft.backpressure import (
    NS,
    SharedLimiter,
    Verdict,
    policy_field,
    private_table,
    ratelimit_field,
    retry_after_seconds,
)
from weft.builtins import BuiltinContext, Middleware, Next, register
from weft.http.errors import ClientGone, error_response
from weft.http.headers import client_address
from weft.http.messages import Request, Response
from weft.redis_limiter import RedisLimiter
from weft.schema import RateLimit, Route

__all__ = ["make_rate_limit"]

POLICY = b"ratelimit-policy"
RATELIMIT = b"ratelimit"


def make_rate_limit(
    route: Route,
    limiter: SharedLimiter,
    context: BuiltinContext,
    redis: RedisLimiter | None = None,
) -> Middleware:
    """The rate-limit middleware of `route` over `limiter` (and `redis`, for limits with
    ``backend = "redis"``)."""
    limits = route.rate_limits
    names = [f"{route.name}.{i}" for i in range(len(limits))]
    policy = policy_field(names, limits)
    prefixes = [f"{route.name}\0{i}\0".encode() for i in range(len(limits))]
    trusted = context.config.trusted_proxies
    deny_when_full = context.config.limits.rate_table.on_full == "deny"
    deny_on_error = context.config.rate_limit_backend.on_error == "deny"
    # Redis keys: weft:<route>.<index>:<key> (the index keeps two limits of a route apart).
    redis_prefixes = [f"weft:{name}:".encode() for name in names]
    plan = list(zip(limits, prefixes, names, redis_prefixes, strict=True))

    def key_of(kind: str, request: Request) -> bytes | None:
        """The request's key for a limit of `kind`; None: the limit does not count it."""
        if kind == "route":
            return b""
        if kind == "principal":
            principal = request.ctx.get("principal")
            return str(principal).encode() if principal is not None else None
        if kind.startswith("header:"):
            value = request.headers.get(kind[7:])
            if value is not None:
                return b"h\0" + value.encode("latin-1")
        return client_address(request.headers.raw, request.client[0], trusted).encode()

    # The RateLimit field of the last admitted answer, per limit: while a bucket is far from
    # empty, answer after answer gets the same bytes, which are then not formatted again.
    last_field: list[tuple[int, int, bytes]] = [(-1, -1, b"")] * len(plan)

    def field_of(i: int, name: str, v: Verdict) -> bytes:
        r, t = v.remaining, -(-v.reset_ns // NS)  # what the field shows: whole seconds
        last_r, last_t, data = last_field[i]
        if r == last_r and t == last_t:
            return data
        data = ratelimit_field(name, v)
        last_field[i] = (r, t, data)
        return data

    def refuse(
        request: Request, status: int, wait_ns: int, name: str, v: Verdict | None
    ) -> Response:
        request.ctx["error"] = "rate_limited"
        request.ctx["rate_limit"] = "rejected"
        resp = error_response(
            status,
            "rate limited",
            request.id,
            close=False,
            retry_after=retry_after_seconds(wait_ns),
        )
        resp.headers.add(POLICY, policy)
        if v is not None:
            resp.headers.add(RATELIMIT, ratelimit_field(name, v))
        return resp

    async def rate_limited(request: Request, nxt: Next) -> Response:
        ctx = request.ctx
        least: Verdict | None = None
        least_name = ""
        least_i = 0
        delay = 0
        counted = False
        for i, (limit, prefix, name, redis_prefix) in enumerate(plan):
            key = key_of(limit.key, request)
            if key is None:
                continue
            counted = True
            if limit.backend == "redis" and redis is not None:
                v = await _ask_redis(
                    request, limiter, redis, prefix + key, redis_prefix + key, limit
                )
                if v is None:
                    ctx["rate_limit_backend_error"] = True
                    if deny_on_error:
                        return refuse(request, limit.status, 1_000_000_000, name, None)
                    continue
                if isinstance(v, int):  # known over the limit: no round trip
                    return refuse(request, limit.status, v, name, None)
            else:
                v = limiter.decide(prefix + key, limit)
            if v is None:
                ctx["rate_table_full"] = True
                if deny_when_full:
                    return refuse(request, limit.status, 1_000_000_000, name, None)
                continue
            if not v.admit:
                return refuse(request, limit.status, v.retry_after_ns, name, v)
            if v.delay_ns > delay:
                delay = v.delay_ns
            if least is None or v.remaining < least.remaining:
                least, least_name, least_i = v, name, i
        if not counted:  # only principal limits, and no principal (module docstring)
            return await nxt(request)
        if delay:
            ctx["rate_limit"] = "delayed"
            await _wait(request, delay / 1e9)
        else:
            ctx["rate_limit"] = "admitted"
        response = await nxt(request)
        raw = response.headers.raw  # names and values are bytes already: no conversion
        raw.append((POLICY, policy))
        if least is not None:
            raw.append((RATELIMIT, field_of(least_i, least_name, least)))
        return response

    return rate_limited


async def _ask_redis(
    request: Request,
    limiter: SharedLimiter,
    redis: RedisLimiter,
    local_key: bytes,
    redis_key: bytes,
    limit: RateLimit,
) -> Verdict | int | None:
    """The backend's verdict; or the nanoseconds a key is still known to be over its limit
    (from the shared cache, no round trip); or None when Redis could not decide."""
    blocked_key = b"redis\0" + local_key
    left = limiter.blocked_for(blocked_key)
    if left:
        return left
    v = await redis.decide(redis_key, limit)
    if v is not None and not v.admit:
        limiter.block(blocked_key, v.retry_after_ns)
    return v


async def _wait(request: Request, seconds: float) -> None:
    """Sleep `seconds` for a leaky bucket's slot; raises ClientGone (499) if the client leaves
    meanwhile: its slot stays used, as nginx's does."""
    watch = request.client_watch
    with trio.CancelScope() as scope:
        if watch is not None:
            watch.watch_gone(scope.cancel)
        try:
            await trio.sleep(seconds)
        finally:
            if watch is not None:
                watch.unwatch_gone()
    if scope.cancelled_caught:
        raise ClientGone("client closed while its request waited for its rate-limit slot")


def _factory(route: Route, context: BuiltinContext) -> Middleware | None:
    if not route.rate_limits:
        return None
    hooks = context.hooks
    limiter = hooks.rate_limiter() if hooks is not None else SharedLimiter(private_table())
    redis = None
    if any(x.backend == "redis" for x in route.rate_limits):
        backend = context.config.rate_limit_backend
        redis = (
            hooks.redis_limiter(backend)
            if hooks is not None
            else RedisLimiter(backend.url, backend.timeout)
        )
    return make_rate_limit(route, limiter, context, redis)


# Outermost first, as ARCHITECTURE.md's request path has it: rate limits before retries.
register("rate_limit", _factory)
