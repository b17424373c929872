"""The TLS sections of the config: ``[listeners.tls]`` and ``[destinations.<name>.tls]``.

This module reads both sections (with `weft.confread`, as every section reader does: unknown
keys refused with their key path, every mistake reported in one run) and builds the
`ssl.SSLContext` each one needs, **at load time**. Building is the check: a certificate file
that is missing or holds no certificate, or a key that does not match its certificate, is a
config error naming the key path (``listeners[0].tls.certificates[1].key: does not match the
certificate ...``). So `weft check` finds it, and a `weft reload` whose new files are broken is
refused before any worker starts, while the old generation keeps serving with the contexts
it was started with.

Why the contexts live in the config and are not rebuilt by each worker: the supervisor loads
the config and then forks the workers, which inherit the built contexts in their memory (an
`ssl.SSLContext` is never pickled: nothing is sent between processes). What was checked is
therefore exactly what is served; a worker that re-read the files after the fork could meet a
file replaced in between. A reload loads the config again, which re-reads every certificate
and key, and only the new generation's workers get the new contexts; connections already open
on the old workers keep the certificate they were handshaken with. A side effect that helps:
the workers of a generation share the session-ticket keys of their context, so a client's
ticket from one worker resumes on another.

Server side, one context per certificate. The certificate without ``server_names`` is the
default: the one clients without SNI, or with a name nobody lists, get. Exactly one default is
required. The default context's ``sni_callback`` switches the connection to the context whose
``server_names`` holds the requested name (exact, or ``*.suffix`` for one label). ALPN
advertises the listener's ``alpn`` list filtered through what weft serves
(`weft.http.protocols.SERVED_ALPN`: ``h2`` and ``http/1.1``).

Client side (origination), one context per destination: verification on unless ``verify =
false`` (logged as a warning at every load), against ``ca`` or the system store; ``cert`` and
``key`` for mTLS to the upstream. The name sent as SNI and verified is chosen per connection
(`weft.http.tls.connect`): ``server_name``, or the endpoint's host.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from weft import confread as cr
from weft.config_spiffe import CLIENT_AUTH_MODES, read_listener_spiffe, read_upstream_spiffe
from weft.http.protocols import SERVED_ALPN
from weft.schema import ListenerTLS, TLSCertificate, UpstreamTLS

log = logging.getLogger("weft.config")

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_LISTENER_KEYS = ("certificates", "min_version", "alpn", "client_ca", "spiffe", "client_auth")
_CERT_KEYS = ("cert", "key", "server_names")
_UPSTREAM_KEYS = ("ca", "server_name", "cert", "key", "verify", "spiffe", "expect_ids")


def _nonempty_path(v: Any) -> str:
    s = cr.string(v)
    if not s:
        raise cr.Bad("expected a file path, got an empty string")
    return s


def _optional_path(v: Any) -> str | None:
    """A path, or None for "" (the issue's example writes unset paths as empty strings)."""
    s = cr.string(v)
    return s or None


def _server_name(v: Any) -> str:
    s = cr.string(v).lower().rstrip(".")
    host = s[2:] if s.startswith("*.") else s
    if not cr.HOSTNAME.match(host) or "*" in host:
        raise cr.Bad(f'expected a host name or "*.suffix", got {v!r}')
    return s


def _alpn(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not v:
        raise cr.Bad('expected a non-empty list like ["h2", "http/1.1"]')
    known_alpn = sorted(SERVED_ALPN)
    out: list[str] = []
    for p in v:
        s = cr.string(p)
        if s not in known_alpn:
            known = ", ".join(f'"{k}"' for k in known_alpn)
            raise cr.Bad(f"weft does not serve ALPN protocol {s!r} (it serves {known})")
        if s in out:
            raise cr.Bad(f"{s!r} is listed twice")
        out.append(s)
    return tuple(out)


def _readable(r: cr.Reader, path: str, file: str) -> bool:
    """Whether `file` can be read; if not, an error at `path` saying why."""
    try:
        with open(file, "rb") as f:
            f.read(1)
    except OSError as e:
        r.error(path, f"cannot read {file}: {e.strerror or e}")
        return False
    return True


def _load_pair(r: cr.Reader, ctx: ssl.SSLContext, cert: str, key: str, path: str) -> bool:
    """Load a certificate chain and its key into `ctx`; an error at the right key path if
    a file is unreadable, holds no certificate, or the key is not the certificate's."""
    ok = _readable(r, cr.join(path, "cert"), cert)
    ok = _readable(r, cr.join(path, "key"), key) and ok
    if not ok:
        return False
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert)
    except ssl.SSLError:
        r.error(cr.join(path, "cert"), f"{cert} holds no PEM certificate")
        return False
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            r.error(cr.join(path, "key"), f"{key} does not match the certificate in {cert}")
        else:
            why = e.reason or e
            r.error(cr.join(path, "key"), f"{key} holds no usable PEM private key ({why})")
        return False
    return True


def _load_ca(r: cr.Reader, ctx: ssl.SSLContext, ca: str, path: str) -> bool:
    if not _readable(r, path, ca):
        return False
    try:
        ctx.load_verify_locations(cafile=ca)
    except ssl.SSLError:
        r.error(path, f"{ca} holds no PEM certificate")
        return False
    return True


# -- [listeners.tls] -------------------------------------------------------------------------


def read_listener_tls(r: cr.Reader, raw: Any, path: str) -> ListenerTLS | None:
    """``[listeners.tls]`` at `path`, with its context built; None (errors recorded) when
    it cannot be used."""
    t = r.table(raw, path)
    if t is None:
        return None
    errors_before = len(r.errors)
    min_version = r.take(t, "min_version", path, lambda v: cr.one_of(v, tuple(VERSIONS)), "1.2")
    alpn = r.take(t, "alpn", path, _alpn, ListenerTLS.__dataclass_fields__["alpn"].default)
    # spiffe = true: weft's X.509-SVID is the certificate (weft.config_spiffe reads the rest).
    spiffe = r.take(t, "spiffe", path, cr.boolean, False)
    client_auth = r.take(t, "client_auth", path, lambda v: cr.one_of(v, CLIENT_AUTH_MODES), None)
    if spiffe:
        return read_listener_spiffe(r, t, path, min_version, alpn, client_auth)
    if client_auth is not None:
        r.error(
            cr.join(path, "client_auth"),
            "only used with spiffe = true (with client_ca, client certificates are required)",
        )
    client_ca = r.take(t, "client_ca", path, _optional_path, None)
    certs: list[TLSCertificate] = []
    if "certificates" not in t:
        r.error(path, 'needs "certificates" (a list of { cert = ..., key = ... })')
    else:
        raw_certs = t.pop("certificates")
        if not isinstance(raw_certs, list) or not raw_certs:
            r.error(cr.join(path, "certificates"), "expected a non-empty list of tables")
        else:
            for i, item in enumerate(raw_certs):
                c = _read_certificate(r, item, f"{path}.certificates[{i}]")
                if c is not None:
                    certs.append(c)
    r.unknown(t, path, _LISTENER_KEYS)
    _check_names(r, certs, f"{path}.certificates")
    if len(r.errors) > errors_before:
        return None
    tls = ListenerTLS(tuple(certs), min_version, alpn, client_ca)
    context = _server_contexts(r, tls, path)
    if context is None:
        return None
    return ListenerTLS(tuple(certs), min_version, alpn, client_ca, context)


def _read_certificate(r: cr.Reader, raw: Any, path: str) -> TLSCertificate | None:
    t = r.table(raw, path)
    if t is None:
        return None
    missing = [k for k in ("cert", "key") if k not in t]
    if missing:
        r.error(path, "needs " + " and ".join(f'"{k}"' for k in missing))
    cert = r.take(t, "cert", path, _nonempty_path, "")
    key = r.take(t, "key", path, _nonempty_path, "")
    names: tuple[str, ...] = ()
    if "server_names" in t:
        raw_names = t.pop("server_names")
        if not isinstance(raw_names, list) or not raw_names:
            r.error(
                cr.join(path, "server_names"),
                "expected a non-empty list of host names (leave it out for the default)",
            )
        else:
            out = []
            for j, n in enumerate(raw_names):
                try:
                    out.append(_server_name(n))
                except cr.Bad as e:
                    r.error(f"{path}.server_names[{j}]", str(e))
            names = tuple(out)
    r.unknown(t, path, _CERT_KEYS)
    if missing or not cert or not key:
        return None
    return TLSCertificate(cert, key, names)


def _check_names(r: cr.Reader, certs: list[TLSCertificate], path: str) -> None:
    defaults = [i for i, c in enumerate(certs) if not c.server_names]
    if certs and not defaults:
        r.error(
            path,
            "one certificate must have no server_names: the default, for clients that send "
            "no SNI or a name no certificate lists",
        )
    for i in defaults[1:]:
        r.error(
            f"{path}[{i}]",
            f"a second certificate without server_names ({path}[{defaults[0]}] is the "
            "default already): give it server_names",
        )
    seen: dict[str, int] = {}
    for i, c in enumerate(certs):
        for name in c.server_names:
            if name in seen and seen[name] != i:
                r.error(f"{path}[{i}].server_names", f'"{name}" is already {path}[{seen[name]}]\'s')
            seen[name] = i


def _server_contexts(r: cr.Reader, tls: ListenerTLS, path: str) -> ssl.SSLContext | None:
    """One context per certificate; the default's, with the SNI switch to the others."""
    alpn = [p for p in tls.alpn if p in SERVED_ALPN]
    by_name: dict[str, ssl.SSLContext] = {}
    default: ssl.SSLContext | None = None
    ok = True
    for i, c in enumerate(tls.certificates):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = VERSIONS[tls.min_version]
        # Renegotiation is a DoS lever and breaks the transport's write accounting.
        ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
        if alpn:
            ctx.set_alpn_protocols(alpn)
        ok = _load_pair(r, ctx, c.cert, c.key, f"{path}.certificates[{i}]") and ok
        if tls.client_ca is not None:
            ok = _load_ca(r, ctx, tls.client_ca, cr.join(path, "client_ca")) and ok
            ctx.verify_mode = ssl.CERT_REQUIRED
            # A resumed TLS 1.3 session carries no client chain (ARCHITECTURE.md, pitfalls):
            # with client certificates every handshake is a full one.
            ctx.num_tickets = 0
        if c.server_names:
            for name in c.server_names:
                by_name[name] = ctx
        else:
            default = ctx
    if not ok or default is None:
        return None
    if by_name:
        default.sni_callback = _sni_switch(by_name)
    return default


def _sni_switch(by_name: dict[str, ssl.SSLContext]) -> Any:
    """The default context's SNI callback: switch to the context that lists the name."""

    def switch(conn: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if not name:
            return None
        name = name.lower().rstrip(".")
        ctx = by_name.get(name)
        if ctx is None:
            _, dot, parent = name.partition(".")
            ctx = by_name.get("*." + parent) if dot else None
        if ctx is not None:
            conn.context = ctx
        return None  # an unknown name gets the default certificate, as nginx's default_server

    return switch


# -- [destinations.<name>.tls] ------------------------------------------------------------------


def _upstream_server_name(v: Any) -> str | None:
    name = _server_name(v) if v else None
    if name is not None and name.startswith("*."):
        raise cr.Bad("a name to send has no wildcard")
    return name


def read_upstream_tls(
    r: cr.Reader, raw: Any, path: str, alpn: tuple[str, ...] = ("http/1.1",)
) -> UpstreamTLS | None:
    """``[destinations.<name>.tls]`` at `path`, with its client context built, offering `alpn`
    (the destination's ``protocol`` decides: ``h2`` offers h2 only, ``auto`` h2 then
    http/1.1); None (errors recorded) when it cannot be used."""
    t = r.table(raw, path)
    if t is None:
        return None
    errors_before = len(r.errors)
    spiffe = r.take(t, "spiffe", path, cr.boolean, False)
    raw_expect = t.pop("expect_ids", None)
    if spiffe:
        return read_upstream_spiffe(r, t, path, raw_expect, _upstream_server_name, alpn)
    if raw_expect is not None:
        r.error(cr.join(path, "expect_ids"), "only used with spiffe = true")
    ca = r.take(t, "ca", path, _optional_path, None)
    server_name = r.take(t, "server_name", path, lambda v: _server_name(v) if v else None, None)
    if server_name is not None and server_name.startswith("*."):
        r.error(cr.join(path, "server_name"), "a name to send and verify has no wildcard")
    cert = r.take(t, "cert", path, _optional_path, None)
    key = r.take(t, "key", path, _optional_path, None)
    verify = r.take(t, "verify", path, cr.boolean, True)
    r.unknown(t, path, _UPSTREAM_KEYS)
    if (cert is None) != (key is None):
        given, other = ("cert", "key") if cert is not None else ("key", "cert")
        r.error(cr.join(path, given), f'needs "{other}" too (a client certificate and its key)')
    if len(r.errors) > errors_before:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(list(alpn))
    ok = True
    if ca is not None:
        ok = _load_ca(r, ctx, ca, cr.join(path, "ca"))
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert is not None and key is not None:
        ok = _load_pair(r, ctx, cert, key, path) and ok
    if not ok:
        return None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning(
            "%s: %s.verify = false: the upstream's certificate is not checked, so anyone on "
            "the path can pose as it",
            r.source,
            path,
        )
    return UpstreamTLS(ca, server_name, cert, key, verify, ctx)
