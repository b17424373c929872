"""The configuration's schema: the frozen dataclasses the rest of weft receives.

Every module that reads configuration imports these types from here; only `weft.config`
(the reader) knows TOML, defaults' ranges and error messages. Keeping the two apart lets the
data path, the supervisor and the adapters depend on a small module with no parsing code, and
lets the next issues add sections (health, breaker, retry, rate limits, TLS) as types first.

Rules: every class is ``frozen=True, slots=True`` (a config is shared by every task of a worker
and compared across reloads); defaults are the documented defaults, with their source in a
comment where they follow nginx, HAProxy or Envoy; durations are float seconds, sizes ints.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from weft.spiffe_id import PathPrefix, SpiffeId

STRATEGIES = ("round_robin", "weighted", "least_conn", "consistent_hash")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")


class ConfigError(Exception):
    """A configuration that cannot be used; `errors` holds one line per mistake."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


# ---------------------------------------------------------------------------------------------
# The dataclasses the rest of weft sees.


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every timeout in seconds. Defaults follow nginx where it has the same knob."""

    client_header: float = 10.0
    client_body_idle: float = 30.0
    client_keepalive: float = 60.0  # nginx keepalive_timeout is 75s; 60s is Envoy's idle default
    client_send_idle: float = 60.0  # nginx send_timeout
    upstream_connect: float = 5.0
    upstream_header: float = 60.0  # nginx proxy_read_timeout
    upstream_body_idle: float = 60.0
    # Longest stall writing a request (body) to an upstream that stopped reading; like
    # client_send_idle on the other side (nginx proxy_send_timeout is 60s).
    upstream_send_idle: float = 60.0
    request_total: float = 300.0  # 0 disables
    websocket_idle: float = 300.0
    drain: float = 30.0
    # A draining worker closes a keep-alive connection only after it stayed idle this long: a
    # client that sent nothing for 2s is not mid-send (HAProxy's close-spread-time idea).
    drain_idle: float = 2.0
    # A client must finish its TLS handshake within this (nginx's ssl_handshake_timeout is 60s;
    # 10s is the issue's: a handshake is two round trips, and a silent client holds a slot).
    tls_handshake: float = 10.0


# Timeouts a route may override: those that apply to one request, not to a connection or process.
ROUTE_TIMEOUTS = (
    "client_body_idle",
    "upstream_connect",
    "upstream_header",
    "upstream_body_idle",
    "upstream_send_idle",
    "request_total",
    "websocket_idle",
)


@dataclass(frozen=True, slots=True)
class RateTable:
    """``[limits.rate_table]``: the shared table of rate-limit keys (`weft.backpressure`)."""

    capacity: int = 65536  # keys
    on_full: str = "allow"  # "allow" | "deny": the decision when no entry can be had


@dataclass(frozen=True, slots=True)
class H2Limits:
    """``[limits.h2]``: what the HTTP/2 server announces in its SETTINGS (`weft.http.h2_server`).
    The reader (`weft.config_h2`) resolves ``max_header_list_size`` to ``[limits]``
    ``max_header_bytes`` when it is not set."""

    max_concurrent_streams: int = 128  # nginx http2_max_concurrent_streams
    max_header_list_size: int = 32 * 1024  # RFC 7541 §4.1 sizes; = Limits.max_header_bytes
    # RFC 9113's default (65535) and nginx's 64k body preread: a stream's buffered request body
    # is bounded by its window, so this times max_concurrent_streams is a connection's worst case.
    initial_window_size: int = 65535


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_line: int = 8 * 1024  # nginx large_client_header_buffers 4 8k
    max_header_bytes: int = 32 * 1024  # 4 x 8k, as nginx
    max_headers: int = 100  # Envoy's max_headers_count default
    max_body_bytes: int = 100 * 1024 * 1024
    max_connections: int = 10000
    rate_table: RateTable = field(default_factory=RateTable)
    h2: H2Limits = field(default_factory=H2Limits)


@dataclass(frozen=True, slots=True)
class TLSCertificate:
    """One ``[listeners.tls] certificates`` entry: PEM paths and the SNI names it answers
    (none: the listener's default certificate)."""

    cert: str
    key: str
    server_names: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    """``[listeners.tls]`` (`weft.config_tls`). `context` is the `ssl.SSLContext` built from the
    files when the config was loaded (the default certificate's; SNI switches to the others):
    workers inherit it by fork, so what was checked is what is served."""

    certificates: tuple[TLSCertificate, ...]
    min_version: str = "1.2"  # "1.2" | "1.3"
    alpn: tuple[str, ...] = ("h2", "http/1.1")  # advertised only if weft serves it
    client_ca: str | None = None  # set: client certificates required and verified
    context: Any = field(default=None, compare=False, repr=False)
    # spiffe = true: the certificate is weft's X.509-SVID from [spiffe] (no `certificates`, and
    # `context` stays None: it is built from the SVID once the Workload API gave one).
    spiffe: bool = False
    client_auth: str = "none"  # with spiffe: "required" | "optional" | "none" (weft.svid)


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """``[destinations.<name>.tls]``: TLS to the upstream (`weft.config_tls`); `context` is
    the client `ssl.SSLContext` built at load, as for `ListenerTLS`."""

    ca: str | None = None  # None: the system store
    server_name: str | None = None  # None: each endpoint's host
    cert: str | None = None  # client certificate (mTLS)
    key: str | None = None
    verify: bool = True
    context: Any = field(default=None, compare=False, repr=False)
    # spiffe = true: weft presents its SVID, and the upstream's SVID must verify in its own
    # trust domain and be one of expect_ids (weft.svid.verify_upstream); `context` as above.
    spiffe: bool = False
    expect_ids: tuple[SpiffeId, ...] = ()
    alpn: tuple[str, ...] = ("http/1.1",)  # what a spiffe context offers (the protocol's)


@dataclass(frozen=True, slots=True)
class Listener:
    address: str
    port: int
    backlog: int = 1024
    tls: ListenerTLS | None = None  # None: cleartext


@dataclass(frozen=True, slots=True)
class PoolConfig:
    # Connections to one endpoint (h1 and h2 alike: sockets, not streams).
    max_per_endpoint: int = 256
    max_idle_per_endpoint: int = 64
    idle_timeout: float = 60.0
    max_requests: int = 10000  # 0 = unlimited
    queue_size: int = 1024
    queue_timeout: float = 5.0
    # h2 only: streams in flight on one connection, at most; the upstream's
    # SETTINGS_MAX_CONCURRENT_STREAMS lowers it further. 100 is RFC 9113 §6.5.2's recommended
    # minimum for that setting, so a server that sends none still gets no more than that.
    max_streams_per_connection: int = 100


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int
    weight: int = 1
    # "host:port" ("[v6]:port"): made once, the data path reads it for every request.
    authority: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "authority", f"{host}:{self.port}")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """``[destinations.<name>.health]``: active probes (`weft.health`, `weft.prober`)."""

    path: str = "/healthz"
    interval: float = 5.0  # with +-10 % jitter
    timeout: float = 1.0
    healthy_threshold: int = 2  # Envoy's and HAProxy's "rise" is 2
    unhealthy_threshold: int = 3  # HAProxy's "fall" is 3
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 399),)
    degraded_latency: float = 0.0  # 0: off
    degraded_header: str = "x-weft-degraded"  # Envoy's x-envoy-degraded


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """``[destinations.<name>.outlier]``: passive ejection (`weft.outlier`). Defaults are
    Envoy's outlier_detection defaults except consecutive_gateway_errors (Envoy: 5, off)."""

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 3
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejection_percent: float = 50.0
    panic_threshold: float = 50.0  # Envoy's healthy_panic_threshold
    slow_start: float = 0.0


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """``[destinations.<name>.breaker]``: the per-endpoint circuit breaker (`weft.adaptive`).
    Defaults are resilience4j's (failureRateThreshold 50, minimumNumberOfCalls 20 is ours:
    its 100 is too many for a 10 s window of a small service)."""

    failure_rate: float = 50.0
    minimum_calls: int = 20
    window: float = 10.0
    open_for: float = 5.0
    max_open_for: float = 60.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``[routes.retry]`` (`weft.retry`, `weft.retry_middleware`)."""

    attempts: int = 3  # tries in all, the first included
    on: tuple[str, ...] = ("connect_error", "reset", "timeout", "503")
    backoff_base: float = 0.025  # Envoy's base_interval
    backoff_max: float = 0.25  # Envoy's default max_interval: 10 x base
    per_try_timeout: float = 0.0  # 0: only the route's deadline
    budget_percent: float = 20.0  # Envoy's retry budget default
    budget_min_per_second: float = 3.0
    buffer_body: int = 64 * 1024


@dataclass(frozen=True, slots=True)
class RateLimit:
    """One ``[[routes.rate_limit]]`` entry (`weft.backpressure`, `weft.rate_limit_middleware`)."""

    key: str = "client_ip"  # "client_ip" | "route" | "principal" | "header:<name>"
    algorithm: str = "token_bucket"  # "token_bucket" (GCRA) | "leaky_bucket" (nginx limit_req)
    count: int = 100  # requests ...
    per: float = 1.0  # ... per this many seconds ("100/s": 100, 1.0)
    burst: int = 50  # token bucket: extra requests admitted at once
    queue: int = 0  # leaky bucket: requests that may wait for their slot
    nodelay: bool = False  # leaky bucket: queued requests go at once, still using a slot
    status: int = 429  # or 503
    backend: str = "local"

    @property
    def interval_ns(self) -> int:
        """The emission interval: nanoseconds between two requests at the rate."""
        return max(1, round(self.per * 1e9 / self.count))


@dataclass(frozen=True, slots=True)
class RateLimitBackend:
    """``[rate_limit_backend]``: where ``backend = "redis"`` limits live (`weft.redis_limiter`)."""

    url: str = "redis://127.0.0.1:6379/0"
    timeout: float = 0.05
    on_error: str = "allow"  # "allow" | "deny" when Redis cannot decide within timeout


@dataclass(frozen=True, slots=True)
class SpiffeConfig:
    """``[spiffe]``: where weft's identity comes from (the Workload API, SPIFFE Workload
    Endpoint spec) and which trust domains it trusts (`weft.config_spiffe`)."""

    # "unix:///path" or "tcp://<ip>:<port>"; None: $SPIFFE_ENDPOINT_SOCKET at start.
    endpoint: str | None = None
    # which X.509-SVID is weft's: a SPIFFE ID (canonical form) or the agent's hint for it;
    # None: the first the agent lists (the default, Workload API spec)
    svid: str | None = None
    # Trust domains trusted besides weft's own (federation); their bundles must come from the
    # Workload API. () : weft's own trust domain only.
    trust_domains: tuple[str, ...] = ()
    # A worker is not ready before the first SVID and bundles arrived; below boot_timeout.
    first_fetch_timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class AuthorizeRule:
    """One ``[[routes.authorize]]`` entry: the principals it admits (`weft.authorize`)."""

    allow_ids: frozenset[SpiffeId] = frozenset()
    allow_trust_domains: frozenset[str] = frozenset()
    allow_path_prefixes: tuple[PathPrefix, ...] = ()  # segment-wise, strictly below


@dataclass(frozen=True, slots=True)
class JwtSvidPolicy:
    """``[routes.jwt_svid]``: requests need ``Authorization: Bearer <JWT-SVID>``
    (`weft.jwt_svid`)."""

    audience: str
    algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256")  # the example


@dataclass(frozen=True, slots=True)
class UpstreamJwtSvid:
    """``[routes.upstream_jwt_svid]``: weft's JWT-SVID for `audience`, sent upstream in
    `header` (`weft.jwt_fetch`)."""

    audience: tuple[str, ...]
    header: str = "authorization"  # as "Bearer <token>"; another header gets the bare token


@dataclass(frozen=True, slots=True)
class Destination:
    name: str
    endpoints: tuple[Endpoint, ...]
    strategy: str = "round_robin"
    host_header: str = "pass"  # "pass" | "endpoint" | literal value
    hash_key: str | None = None
    hash_balance_factor: float = 1.25
    pool: PoolConfig = field(default_factory=PoolConfig)
    health: HealthCheck | None = None  # None: no active probes
    outlier: OutlierConfig | None = None  # None: no passive ejection
    breaker: BreakerConfig | None = None  # None: no circuit breaker
    tls: UpstreamTLS | None = None  # None: cleartext to the endpoints
    # "http1.1" | "h2" (over tls, ALPN h2) | "h2c" (cleartext, prior knowledge) | "auto" (ALPN
    # over tls, HTTP/1.1 in cleartext); see weft.http.h2_client and weft.connection.
    protocol: str = "http1.1"

    @property
    def observed(self) -> bool:
        """Whether anything learns from this destination's traffic (`weft.observer`)."""
        return self.health is not None or self.outlier is not None or self.breaker is not None


@dataclass(frozen=True, slots=True)
class MiddlewareSpec:
    use: str  # "package.module:factory"
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    destination: str
    host: str | None = None  # exact, "*.suffix", or None for any
    path_prefix: str = "/"
    methods: frozenset[str] | None = None
    strip_prefix: bool = False
    rewrite_prefix: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_body_bytes: int = 100 * 1024 * 1024
    middleware: tuple[MiddlewareSpec, ...] = ()
    retry: RetryPolicy | None = None  # None: only the stale-connection retry of the forwarder
    rate_limits: tuple[RateLimit, ...] = ()  # all must admit
    authorize: tuple[AuthorizeRule, ...] = ()  # any may admit; () : no check
    jwt_svid: JwtSvidPolicy | None = None
    upstream_jwt_svid: UpstreamJwtSvid | None = None
    # weft_principal_requests_total counts this route's requests by principal (weft.metrics)
    metrics_principal: bool = False


@dataclass(frozen=True, slots=True)
class AccessLog:
    enabled: bool = True
    path: str = "-"


@dataclass(frozen=True, slots=True)
class Admin:
    """The admin listener (`weft.admin`): off unless a port is configured."""

    address: str = "127.0.0.1"
    port: int | None = None  # None: no admin listener
    token: str | None = None  # every request then needs "Authorization: Bearer <token>"

    @property
    def enabled(self) -> bool:
        return self.port is not None


@dataclass(frozen=True, slots=True)
class Metrics:
    enabled: bool = True  # workers record the request families (weft.metrics)


@dataclass(frozen=True, slots=True)
class Buffers:
    """``[buffers]``: the shared buffer pool (`weft.bufpool`), made once at start."""

    memory: int = 64 * 1024 * 1024  # bytes of buffers, all classes and all workers together


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[Listener, ...]
    destinations: dict[str, Destination]
    routes: tuple[Route, ...]
    instance: str = "default"
    workers: int = 0  # 0: one per CPU
    boot_timeout: float = 30.0  # a new worker must be READY within this (start and reload)
    heartbeat_timeout: float = 20.0  # a worker whose event loop is silent this long is killed
    via: str = "weft"
    request_id_header: str = "x-request-id"
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    access_log: AccessLog = field(default_factory=AccessLog)
    upstream_max_connections: int = 4096
    admin: Admin = field(default_factory=Admin)
    metrics: Metrics = field(default_factory=Metrics)
    rate_limit_backend: RateLimitBackend = field(default_factory=RateLimitBackend)
    buffers: Buffers = field(default_factory=Buffers)
    spiffe: SpiffeConfig | None = None  # None: no SPIFFE identity
    source: str = "<quick mode>"
    hash: str = ""
