"""Header rules of a proxy: what is hop-by-hop, what is added on the way, what is believed.

Pure functions over header lists (lowercase byte names, as h11 produces them), so each rule is
unit-tested with plain values and the data path only calls them.

The rules (RFC 9110 §7.6.1 and §7.6.3, RFC 7239's X-Forwarded-* precursors as nginx and Envoy
use them):

* Hop-by-hop fields are removed in both directions: Connection and every field it names,
  Keep-Alive, Proxy-Connection, TE, Transfer-Encoding, Upgrade, HTTP2-Settings. Two exceptions:
  ``TE: trailers`` is sent on as ``te: trailers`` (gRPC needs it), and a WebSocket handshake
  keeps ``Upgrade: websocket`` and ``Connection: upgrade``, because the upstream must see them.
* Only WebSocket is an upgrade. Any other Upgrade (``h2c`` above all, RFC 9113 §3.1) is dropped
  like any hop-by-hop field and the request is served as plain HTTP/1.1: an upstream that
  switched to h2c would let the client speak HTTP/2 to it past weft's checks (h2csmuggler).
* Expect is answered by weft itself (it sends ``100 Continue`` when the forwarder starts reading
  the body), so it is not sent upstream: an upstream that ignores Expect can then never make a
  client wait.
* X-Forwarded-For/-Proto/-Host from the client are believed only when the client address is a
  trusted proxy. Believed: our client's address is appended to X-Forwarded-For and the other two
  kept. Not believed: all three are replaced by what weft saw.
* Via gets ``<version> <pseudonym>`` appended in both directions.
* The request id is kept when the client sent a sane one (visible ASCII, at most 200 bytes),
  generated otherwise.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence

from weft.http.messages import HeaderList

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        # Connection-specific by definition (RFC 7540 §3.2.1), even when a client forgets to
        # name it in Connection: it only ever comes with an h2c upgrade, which never passes.
        b"http2-settings",
    }
)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# h11's field grammar (h11/_abnf.py: token, field_value), applied to all names or all values
# of a message at once, joined by "\n" (which neither may contain): one regex call per message
# instead of two per field.
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_FIELD_CONTENT = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"
_NAMES = re.compile(_TOKEN + rb"(?:\n" + _TOKEN + rb")*")
_VALUES = re.compile(_FIELD_CONTENT + rb"(?:\n" + _FIELD_CONTENT + rb")*")


def fields_valid(headers: HeaderList) -> bool:
    """Whether every name and value obeys RFC 9110's field syntax (as h11 checks it).

    The data path builds h11 events with ``_parsed=True`` when this holds (h11 then skips its
    per-field regexes, a tenth of the per-request CPU at 1 KiB), and lets h11 validate, and
    refuse, everything else. Header lists are rebuilt by middleware, so they are checked for
    every message; this check is the cheap way to do it.
    """
    if not headers:
        return True
    names = b"\n".join([k for k, _ in headers])
    values = b"\n".join([v for _, v in headers])
    return _NAMES.fullmatch(names) is not None and _VALUES.fullmatch(values) is not None


def connection_tokens(headers: HeaderList) -> set[bytes]:
    """Lowercase tokens of every Connection field."""
    tokens: set[bytes] = set()
    for k, v in headers:
        if k == b"connection":
            for t in v.split(b","):
                t = t.strip().lower()
                if t:
                    tokens.add(t)
    return tokens


def strip_hop_by_hop(headers: HeaderList, *, keep_upgrade: bool = False) -> HeaderList:
    """Headers without hop-by-hop fields.

    Keeps ``te: trailers`` and, when `keep_upgrade`, the Upgrade field with ``Connection: upgrade``.
    """
    named = connection_tokens(headers) if any(k == b"connection" for k, _ in headers) else ()
    out: HeaderList = []
    wants_trailers = False
    upgrade: bytes | None = None
    for k, v in headers:
        if k in HOP_BY_HOP or k in named:
            if k == b"te" and b"trailers" in v.lower():
                wants_trailers = True
            elif k == b"upgrade":
                upgrade = v
            continue
        out.append((k, v))
    if wants_trailers:
        out.append((b"te", b"trailers"))
    if keep_upgrade and upgrade is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", upgrade))
    return out


def is_upgrade_request(headers: HeaderList) -> bool:
    """True when the client asks to switch to WebSocket: ``websocket`` (any case) is one of the
    protocols in Upgrade, and Connection names upgrade (RFC 9110 §7.8). Any other Upgrade,
    h2c included, is not a switch weft relays: such a request is plain HTTP/1.1."""
    return websocket_token(headers) is not None and b"upgrade" in connection_tokens(headers)


def websocket_token(headers: HeaderList) -> bytes | None:
    """The ``websocket`` element of the Upgrade fields, as the client spelled it, or None."""
    for k, v in headers:
        if k == b"upgrade":
            for t in v.split(b","):
                t = t.strip()
                if t.lower() == b"websocket":
                    return t
    return None


def is_trusted(client_ip: str, trusted: Sequence[Network]) -> bool:
    if not trusted or not client_ip:
        return False
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in trusted)


def client_address(headers: HeaderList, peer_ip: str, trusted: Sequence[Network]) -> str:
    """The client's address as weft believes it: the peer, or, when the peer is a trusted
    proxy, the right-most X-Forwarded-For address that is not itself a trusted proxy (nginx's
    ``real_ip_recursive on``; the left-most when all are trusted). Addresses a client could
    forge (left of the first untrusted one) are never used. Malformed entries end the walk."""
    if not trusted or not is_trusted(peer_ip, trusted):
        return peer_ip
    chain: list[str] = []
    for k, v in headers:
        if k == b"x-forwarded-for":
            chain.extend(p.strip().decode("latin-1") for p in v.split(b","))
    address = peer_ip
    for hop in reversed(chain):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break
        address = hop
        if not is_trusted(hop, trusted):
            break
    return address


def new_request_id() -> str:
    """A random version-4 UUID in text form (what tracing systems expect).

    The bits come from the OS's random source, read 4 KiB (256 ids) at a time rather than one
    system call per request (as Envoy buffers its UUID randomness). They are not from a
    seeded generator: ids go back to clients, and a Mersenne Twister's next outputs can be
    computed from 624 of its previous ones.
    """
    global _random, _random_at
    at = _random_at
    if at >= len(_random):
        _random, at = os.urandom(4096), 0
    _random_at = at + 16
    n = int.from_bytes(_random[at : at + 16], "big")
    h = "%032x" % (n & _UUID_MASK | _UUID_V4)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# RFC 9562 §5.4: version 4 in bits 48-51, variant 0b10 in bits 64-65 (counted from the left).
_UUID_MASK = ~(0xF << 76 | 0x3 << 62) & ((1 << 128) - 1)
_UUID_V4 = 0x4 << 76 | 0x2 << 62
_random = b""
_random_at = 0


def _forget_random() -> None:
    # A forked worker must not hand out the rest of its parent's buffer (its siblings would
    # repeat the same ids).
    global _random, _random_at
    _random, _random_at = b"", 0


os.register_at_fork(after_in_child=_forget_random)


def valid_request_id(value: bytes) -> bool:
    return 0 < len(value) <= 200 and all(0x21 <= c <= 0x7E for c in value)


def forward_request_headers(
    headers: HeaderList,
    *,
    client_ip: str,
    trusted: bool,
    scheme: str,
    host: bytes | None,
    upstream_host: bytes | None,
    via: bytes,
    request_id_header: bytes,
    request_id: bytes,
    upgrade: bool,
) -> HeaderList:
    """The header list to send upstream.

    Args:
      headers: the client's header fields.
      client_ip: the peer address of the client connection.
      trusted: whether that peer is a trusted proxy (its X-Forwarded-* are believed).
      scheme: "http" or "https", as weft received the request.
      host: the client's Host value (None for an HTTP/1.0 request without one).
      upstream_host: the Host value to send (from the destination's host_header policy).
      via: the Via entry to append, e.g. ``b"1.1 weft"``.
      request_id_header, request_id: the id field and its value (already chosen).
      upgrade: send ``Upgrade: websocket`` and ``Connection: upgrade`` (a WebSocket handshake,
        see `is_upgrade_request`); other protocols the client offered are not passed on.
    """
    # One pass over the fields (this runs for every request): ordinary fields are copied, the
    # few that need a decision are looked up in one set.
    named = connection_tokens(headers) if has_field(headers, b"connection") else ()
    out: HeaderList = []
    xff: list[bytes] = []
    xfp = xfh = via_value = None
    wants_trailers = False
    for k, v in headers:
        if k not in _REQUEST_SPECIAL and k not in named and k != request_id_header:
            out.append((k, v))
        elif k == b"x-forwarded-for":
            if trusted:
                xff.append(v)
        elif k == b"x-forwarded-proto":
            if trusted and xfp is None:
                xfp = v
        elif k == b"x-forwarded-host":
            if trusted and xfh is None:
                xfh = v
        elif k == b"via":
            via_value = v if via_value is None else via_value + b", " + v
        elif k == b"te":
            wants_trailers = wants_trailers or b"trailers" in v.lower()
        # else: host, expect, the request id, hop-by-hop (Upgrade among them) and
        # Connection-named fields: replaced by weft's own values below, or dropped.
    if upstream_host is not None:
        # Host goes first, as clients send it (some upstreams log the head verbatim).
        out.insert(0, (b"host", upstream_host))
    if wants_trailers:
        out.append((b"te", b"trailers"))
    if upgrade and (token := websocket_token(headers)) is not None:
        out.append((b"connection", b"upgrade"))
        out.append((b"upgrade", token))
    xff.append(client_ip.encode())
    out.append((b"x-forwarded-for", b", ".join(xff)))
    out.append((b"x-forwarded-proto", xfp if xfp is not None else scheme.encode()))
    if xfh is not None or host is not None:
        out.append((b"x-forwarded-host", xfh if xfh is not None else host))  # type: ignore[arg-type]
    out.append((b"via", via if via_value is None else via_value + b", " + via))
    out.append((request_id_header, request_id))
    return out


def has_field(headers: HeaderList, name: bytes) -> bool:
    """Whether a field called `name` (lowercase) is present. A plain loop: `any()` over a
    generator costs twice as much, and this runs several times per request."""
    for k, _ in headers:
        if k == name:
            return True
    return False


# Request fields that forward_request_headers decides about instead of copying.
_REQUEST_SPECIAL = HOP_BY_HOP | {
    b"host",
    b"expect",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
}


def forward_response_headers(
    headers: HeaderList, *, via: bytes, upgrade: bool = False
) -> HeaderList:
    """The upstream's response headers as sent to the client."""
    if not upgrade and not _names_other_fields(headers):
        # The common case, in one pass: Connection absent or only "keep-alive"/"close".
        out = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
    else:
        out = strip_hop_by_hop(headers, keep_upgrade=upgrade)
    _append_via(out, via)
    return out


def _names_other_fields(headers: HeaderList) -> bool:
    """Whether a Connection field names fields besides the hop-by-hop ones (which go anyway).

    Most upstreams send ``Connection: keep-alive`` on every response; that needs no more than
    the common pass over HOP_BY_HOP.
    """
    for k, v in headers:
        if k == b"connection" and v.lower() not in _PLAIN_CONNECTION:
            return True
    return False


_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close"})


def _append_via(out: HeaderList, via: bytes) -> None:
    # RFC 9110 §7.6.3: each recipient appends its entry, so ours goes last: onto the last Via
    # field (field lines combine in order, §5.3), or as a new field when there is none.
    for i in range(len(out) - 1, -1, -1):
        k, v = out[i]
        if k == b"via":
            out[i] = (k, v + b", " + via)
            return
    out.append((b"via", via))
