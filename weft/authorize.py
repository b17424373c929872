"""The ``[[routes.authorize]]`` decision: may this principal call this route? Pure: parsed
SPIFFE IDs in, a `Decision` out; the middleware (`weft.spiffe_middleware`) answers 403 with the
decision's reason word in the access log.

Rules:

* The **principal** is the JWT-SVID's ``sub`` when the route checks tokens
  (``[routes.jwt_svid]``, which runs first), otherwise the peer's X.509-SVID ID from mTLS.
  None (a cleartext or ``client_auth = "optional"`` client without a certificate, and no
  token) is refused: ``no_identity``.
* A route's entries are alternatives: one that admits is enough. Within an entry, so are its
  three lists: ``allow_ids`` (exact, parsed IDs: ``spiffe://example.org/api`` and
  ``spiffe://example.org/API`` are two workloads, and a trailing slash or an upper-case
  trust domain never parsed in the first place), ``allow_trust_domains`` (any ID of that
  domain, the domain's own ID included), ``allow_path_prefixes`` (segment-wise, strictly
  below: `weft.spiffe_id.PathPrefix`).
* Nothing else admits: an empty entry admits no one (config refuses one anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from weft.schema import AuthorizeRule
from weft.spiffe_id import SpiffeId

__all__ = ["Decision", "admits", "decide"]

# The reason words of a refusal (access log "error" values, a fixed list for metric labels).
NO_IDENTITY = "no_identity"
FORBIDDEN = "forbidden"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str | None  # None when allowed, else NO_IDENTITY or FORBIDDEN
    detail: str  # for the log, never the client


def admits(rule: AuthorizeRule, sid: SpiffeId) -> bool:
    """Whether one entry admits `sid` (any of its lists)."""
    return (
        sid in rule.allow_ids
        or sid.trust_domain in rule.allow_trust_domains
        or any(p.matches(sid) for p in rule.allow_path_prefixes)
    )


def decide(rules: Sequence[AuthorizeRule], principal: SpiffeId | None) -> Decision:
    """The decision for `principal` on a route with `rules` (an empty list admits all: the
    route has no ``authorize``)."""
    if not rules:
        return Decision(True, None, "no authorize rules")
    if principal is None:
        return Decision(False, NO_IDENTITY, "no SPIFFE identity (no client SVID, no token)")
    for i, rule in enumerate(rules):
        if admits(rule, principal):
            return Decision(True, None, f"{principal} admitted by authorize[{i}]")
    return Decision(False, FORBIDDEN, f"{principal} is not allowed on this route")
