"""The SPIFFE parts of the config: ``[spiffe]``, ``spiffe``/``client_auth`` in
``[listeners.tls]``, ``spiffe``/``expect_ids`` in ``[destinations.<name>.tls]``,
``[[routes.authorize]]`` and ``[routes.jwt_svid]``.

Read with `weft.confread` as every section is: unknown keys refused with their key path, every
mistake of a file reported in one run, ``<file>: <key path>: <reason>``. Every SPIFFE ID and
trust domain in the file is parsed by `weft.spiffe_id` here, so a malformed one is a config
error at its key (``routes[0].authorize[0].allow_ids[1]: ...``), and what the data path compares
are parsed IDs.

What is refused rather than accepted and ignored:

* ``spiffe = true`` next to the keys it replaces: a listener's ``certificates``/``client_ca``
  (the SVID is the certificate, the bundles are the CAs), a destination's ``ca``/``cert``/
  ``key``/``verify`` (likewise). ``server_name`` stays: it is only sent (SNI), never verified,
  since an SVID's identity is its URI SAN.
* ``client_auth`` or ``expect_ids`` without ``spiffe = true``; ``spiffe = true`` on a
  destination without ``expect_ids`` (any workload of a trusted domain would do: name the ones
  that may answer).
* An ``authorize`` entry that admits no one; a ``jwt_svid`` algorithm that is ``none`` or HMAC,
  or outside the JWT-SVID standard's list.
* A path prefix without its trailing ``/`` (`weft.spiffe_id.PathPrefix`: it matches below).

That SPIFFE features have a ``[spiffe]`` table to get their identity from is checked by
`check_references` once the whole file was read; so are the route keys that read the principal
(``metrics_principal = true``, a rate limit's ``key = "principal"``), since without ``[spiffe]``
no request has one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from weft import confread as cr
from weft.jwt_svid import ALGORITHMS
from weft.schema import (
    AuthorizeRule,
    Destination,
    JwtSvidPolicy,
    Listener,
    ListenerTLS,
    Route,
    SpiffeConfig,
    UpstreamJwtSvid,
    UpstreamTLS,
)
from weft.spiffe_id import PathPrefix, SpiffeId, SpiffeIdError, parse_trust_domain

__all__ = [
    "CLIENT_AUTH_MODES",
    "check_references",
    "read_authorize",
    "read_jwt_svid",
    "read_listener_spiffe",
    "read_spiffe",
    "read_upstream_spiffe",
]

CLIENT_AUTH_MODES = ("required", "optional", "none")
_SPIFFE_KEYS = ("endpoint", "svid", "trust_domains", "first_fetch_timeout")
_AUTHORIZE_KEYS = ("allow_ids", "allow_trust_domains", "allow_path_prefixes")
_JWT_KEYS = ("audience", "algorithms")


# Seconds a booting worker waits beyond first_fetch_timeout for the identity process's reason
# (`weft.spiffe.WorkerIdentity.wait_first`).
FIRST_GRACE = 1.0


def _spiffe_id(v: Any) -> SpiffeId:
    try:
        return SpiffeId.parse(cr.string(v))
    except SpiffeIdError as e:
        raise cr.Bad(str(e)) from None


def _workload_id(v: Any) -> SpiffeId:
    sid = _spiffe_id(v)
    if not sid.path:
        raise cr.Bad(
            f"{sid} names a trust domain, not a workload (use allow_trust_domains for that)"
        )
    return sid


def _svid_selector(v: Any) -> str:
    """``[spiffe] svid``: a workload's SPIFFE ID (parsed, kept in its canonical form) or the
    hint an agent gives an SVID (Workload API ``X509SVID.hint``)."""
    s = cr.string(v)
    if s.lower().startswith("spiffe:"):
        return str(_workload_id(s))
    if not s or s != s.strip():
        raise cr.Bad(f"expected a SPIFFE ID or an SVID's hint, got {s!r}")
    return s


def _trust_domain(v: Any) -> str:
    try:
        return parse_trust_domain(cr.string(v))
    except SpiffeIdError as e:
        raise cr.Bad(str(e)) from None


def _prefix(v: Any) -> PathPrefix:
    try:
        return PathPrefix.parse(cr.string(v))
    except SpiffeIdError as e:
        raise cr.Bad(str(e)) from None


def _list(r: cr.Reader, raw: Any, path: str, conv: Callable[[Any], Any], what: str) -> list[Any]:
    """Each item of a list converted, an error at ``path[i]`` for each bad one."""
    if not isinstance(raw, list):
        r.error(path, f"expected a list of {what}")
        return []
    out = []
    for i, item in enumerate(raw):
        try:
            value = conv(item)
        except cr.Bad as e:
            r.error(f"{path}[{i}]", str(e))
            continue
        if value in out:
            r.error(f"{path}[{i}]", f"{item!r} is listed twice")
            continue
        out.append(value)
    return out


def _endpoint(v: Any) -> str:
    """A Workload API address (SPIFFE Workload Endpoint §4): ``unix:`` with an absolute path,
    or ``tcp://`` with an IP address (no host name: resolving one would be trusting DNS) and a
    port."""
    s = cr.string(v)
    if s.startswith("unix:"):
        p = s[len("unix://") :] if s.startswith("unix://") else s[len("unix:") :]
        if not p.startswith("/") or any(c in p for c in "?#"):
            raise cr.Bad(f'expected "unix:///absolute/path/to/agent.sock", got {s!r}')
        return s
    if s.startswith("tcp://"):
        rest = s[len("tcp://") :]
        try:
            host, _port = cr.parse_hostport(rest)
            ipaddress.ip_address(host)
        except ValueError:
            raise cr.Bad(
                f'expected "tcp://<IP address>:<port>" (no host name, no path), got {s!r}'
            ) from None
        return s
    raise cr.Bad(f'expected "unix:///path/to/agent.sock" or "tcp://<IP>:<port>", got {s!r}')


# -- [spiffe] -----------------------------------------------------------------------------------


def read_spiffe(r: cr.Reader, raw: Any, path: str = "spiffe") -> SpiffeConfig | None:
    t = r.table(raw, path)
    if t is None:
        return None
    d = SpiffeConfig()
    endpoint = r.take(t, "endpoint", path, _endpoint, d.endpoint)
    svid = r.take(t, "svid", path, _svid_selector, None)
    tds: tuple[str, ...] = ()
    if "trust_domains" in t:
        tds = tuple(
            _list(r, t.pop("trust_domains"), cr.join(path, "trust_domains"), _trust_domain,
                  'trust domains like "example.org"')
        )  # fmt: skip
    first = r.take(t, "first_fetch_timeout", path, cr.duration, d.first_fetch_timeout)
    r.unknown(t, path, _SPIFFE_KEYS)
    return SpiffeConfig(endpoint, svid, tds, first)


# -- [listeners.tls] and [destinations.<name>.tls] with spiffe = true ---------------------------


def read_listener_spiffe(
    r: cr.Reader,
    t: dict[str, Any],
    path: str,
    min_version: str,
    alpn: tuple[str, ...],
    client_auth: str | None,
) -> ListenerTLS | None:
    """The rest of a ``[listeners.tls]`` table that has ``spiffe = true`` (its other keys
    already taken by `weft.config_tls`)."""
    errors_before = len(r.errors)
    for key in ("certificates", "client_ca"):
        if key in t:
            t.pop(key)
            r.error(
                cr.join(path, key),
                "not used with spiffe = true (weft's SVID is the certificate and the trust "
                "domains' bundles verify clients): remove it, or spiffe",
            )
    r.unknown(t, path, ("spiffe", "client_auth", "min_version", "alpn"))
    if len(r.errors) > errors_before:
        return None
    return ListenerTLS(
        (), min_version, alpn, None, spiffe=True, client_auth=client_auth or "required"
    )


def read_upstream_spiffe(
    r: cr.Reader,
    t: dict[str, Any],
    path: str,
    raw_expect: Any,
    server_name: Callable[[Any], str | None],
    alpn: tuple[str, ...],
) -> UpstreamTLS | None:
    """The rest of a ``[destinations.<name>.tls]`` table that has ``spiffe = true``."""
    errors_before = len(r.errors)
    name = r.take(t, "server_name", path, server_name, None)
    for key in ("ca", "cert", "key", "verify"):
        if key in t:
            t.pop(key)
            r.error(
                cr.join(path, key),
                "not used with spiffe = true (weft presents its SVID and checks the "
                "upstream's against its trust domain's bundle and expect_ids)",
            )
    expect: list[SpiffeId] = []
    if raw_expect is None:
        r.error(
            path,
            'spiffe = true needs "expect_ids": the SPIFFE IDs the upstream may present, like '
            '["spiffe://example.org/api"]',
        )
    else:
        p = cr.join(path, "expect_ids")
        expect = _list(r, raw_expect, p, _workload_id, "SPIFFE IDs")
        if isinstance(raw_expect, list) and not raw_expect:
            r.error(p, "expected at least one SPIFFE ID")
    r.unknown(t, path, ("spiffe", "expect_ids", "server_name"))
    if len(r.errors) > errors_before:
        return None
    return UpstreamTLS(server_name=name, spiffe=True, expect_ids=tuple(expect), alpn=alpn)


# -- routes --------------------------------------------------------------------------------------


def read_authorize(r: cr.Reader, raw: Any, path: str) -> tuple[AuthorizeRule, ...]:
    """``[[routes.authorize]]`` (or one ``[routes.authorize]`` table)."""
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        r.error(path, "expected [[routes.authorize]] tables")
        return ()
    out = []
    for i, item in enumerate(raw):
        p = f"{path}[{i}]"
        t = r.table(item, p)
        if t is None:
            continue
        given = any(t.get(k) for k in _AUTHORIZE_KEYS)  # bad items are reported one by one
        ids = _list(r, t.pop("allow_ids", []), cr.join(p, "allow_ids"), _spiffe_id, "SPIFFE IDs")
        tds = _list(
            r,
            t.pop("allow_trust_domains", []),
            cr.join(p, "allow_trust_domains"),
            _trust_domain,
            "trust domains",
        )
        prefixes = _list(
            r,
            t.pop("allow_path_prefixes", []),
            cr.join(p, "allow_path_prefixes"),
            _prefix,
            'path prefixes like "spiffe://example.org/ns/prod/"',
        )
        r.unknown(t, p, _AUTHORIZE_KEYS)
        if not given:
            r.error(p, "admits no one: give allow_ids, allow_trust_domains or allow_path_prefixes")
        if not (ids or tds or prefixes):
            continue
        out.append(AuthorizeRule(frozenset(ids), frozenset(tds), tuple(prefixes)))
    return tuple(out)


def _algorithm(v: Any) -> str:
    s = cr.string(v)
    if s.lower() == "none" or s.upper().startswith("HS"):
        raise cr.Bad(
            f"{s!r} is never accepted: a JWT-SVID is signed with a private key (none and HMAC "
            "would let anyone with the bundle, or no one at all, mint tokens)"
        )
    if s not in ALGORITHMS:
        raise cr.Bad(f"unknown algorithm {s!r} (known: {', '.join(ALGORITHMS)})")
    return s


def _audience(v: Any) -> str:
    s = cr.string(v)
    if not s or not s.isascii() or any(c.isspace() for c in s):
        raise cr.Bad(f'expected an audience like "spiffe://example.org/api", got {s!r}')
    return s


def read_jwt_svid(r: cr.Reader, raw: Any, path: str) -> JwtSvidPolicy | None:
    t = r.table(raw, path)
    if t is None:
        return None
    if "audience" not in t:
        r.error(
            path, 'needs "audience": the aud a token must carry, like "spiffe://example.org/api"'
        )
    audience = r.take(t, "audience", path, _audience, "")
    algorithms = JwtSvidPolicy.__dataclass_fields__["algorithms"].default
    if "algorithms" in t:
        raw_algs = t.pop("algorithms")
        p = cr.join(path, "algorithms")
        algs = _list(r, raw_algs, p, _algorithm, 'algorithms like ["ES256", "RS256"]')
        if isinstance(raw_algs, list) and not raw_algs:
            r.error(p, "expected at least one algorithm")
        algorithms = tuple(algs) or algorithms
    r.unknown(t, path, _JWT_KEYS)
    if not audience:
        return None
    return JwtSvidPolicy(audience, algorithms)


_UPSTREAM_JWT_KEYS = ("audience", "header")


def read_upstream_jwt_svid(r: cr.Reader, raw: Any, path: str) -> UpstreamJwtSvid | None:
    """``[routes.upstream_jwt_svid]``: ``audience`` (one or a list) and ``header``."""
    t = r.table(raw, path)
    if t is None:
        return None
    if "audience" not in t:
        r.error(path, 'needs "audience": the upstream\'s SPIFFE ID or name its tokens carry')
        r.unknown(t, path, _UPSTREAM_JWT_KEYS)
        return None
    raw_aud = t.pop("audience")
    p = cr.join(path, "audience")
    audience = _list(r, raw_aud if isinstance(raw_aud, list) else [raw_aud], p, _audience,
                     'audiences like "spiffe://example.org/api"')  # fmt: skip
    if isinstance(raw_aud, list) and not raw_aud:
        r.error(p, "expected at least one audience")
    header = r.take(t, "header", path, _header_name, "authorization")
    r.unknown(t, path, _UPSTREAM_JWT_KEYS)
    if not audience:
        return None
    return UpstreamJwtSvid(tuple(audience), header)


def _header_name(v: Any) -> str:
    s = cr.string(v).lower()
    if not s or not all(c.isalnum() or c in "-_" for c in s):
        raise cr.Bad(f"expected a header field name like \"authorization\", got {s!r}")
    return s


# -- cross-references ---------------------------------------------------------------------------


def check_references(
    r: cr.Reader,
    spiffe: SpiffeConfig | None,
    listeners: tuple[Listener, ...],
    destinations: dict[str, Destination],
    routes: list[tuple[int, Route]],
    boot_timeout: float,
) -> None:
    """What needs ``[spiffe]`` has it; first_fetch_timeout fits in boot_timeout; with
    ``[spiffe] svid`` known, IDs of trust domains weft does not trust are named."""
    users = [
        f"listeners[{i}].tls.spiffe"
        for i, lst in enumerate(listeners)
        if lst.tls is not None and lst.tls.spiffe
    ]
    users += [
        f"destinations.{n}.tls.spiffe" for n, d in destinations.items() if d.tls and d.tls.spiffe
    ]
    users += [f"routes[{i}].authorize" for i, rt in routes if rt.authorize]
    users += [f"routes[{i}].jwt_svid" for i, rt in routes if rt.jwt_svid is not None]
    users += [
        f"routes[{i}].upstream_jwt_svid" for i, rt in routes if rt.upstream_jwt_svid is not None
    ]
    # What reads the principal, which only SPIFFE sets: without it, one label and no limit.
    readers = [f"routes[{i}].metrics_principal" for i, rt in routes if rt.metrics_principal]
    readers += [
        f"routes[{i}].rate_limit[{k}].key"
        for i, rt in routes
        for k, limit in enumerate(rt.rate_limits)
        if limit.key == "principal"
    ]
    if spiffe is None:
        for key in users:
            r.error(key, "needs a [spiffe] table: where weft gets its SVID and trust bundles")
        for key in readers:
            r.error(
                key,
                "the principal is a request's SPIFFE ID, which needs a [spiffe] table "
                "(without one no request has a principal)",
            )
        return
    if spiffe.first_fetch_timeout + FIRST_GRACE >= boot_timeout:
        r.error(
            "spiffe.first_fetch_timeout",
            f"must be at least {FIRST_GRACE:g}s below server.boot_timeout ({boot_timeout:g}s): "
            "a worker is not ready before its first SVID",
        )
    if spiffe.svid is None or not spiffe.svid.startswith("spiffe://"):
        return  # weft's own trust domain is known only once the Workload API answers
    own = SpiffeId.parse(spiffe.svid).trust_domain
    trusted = {own, *spiffe.trust_domains}

    def check(key: str, td: str) -> None:
        if td not in trusted:
            r.error(
                key,
                f"trust domain {td} is not trusted (weft's own is {own}; "
                "add it to [spiffe] trust_domains)",
            )

    for n, d in destinations.items():
        for j, sid in enumerate(d.tls.expect_ids if d.tls else ()):
            check(f"destinations.{n}.tls.expect_ids[{j}]", sid.trust_domain)
    for i, rt in routes:
        for k, rule in enumerate(rt.authorize):
            p = f"routes[{i}].authorize[{k}]"
            for sid in sorted(rule.allow_ids):
                check(f"{p}.allow_ids", sid.trust_domain)
            for td in sorted(rule.allow_trust_domains):
                check(f"{p}.allow_trust_domains", td)
            for prefix in rule.allow_path_prefixes:
                check(f"{p}.allow_path_prefixes", prefix.trust_domain)
