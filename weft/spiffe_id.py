"""SPIFFE IDs: parsing by the SPIFFE-ID standard, and the matching that allow-lists use.

A SPIFFE ID names a workload: ``spiffe://<trust domain><path>``. Everything weft decides about
identity (who may call a route, which upstream it expects, which JWT bundle checks a token)
compares *parsed* IDs, never raw strings, so that two spellings of one identity cannot be
told apart and two identities cannot pass for one. The rules are those of the SPIFFE-ID
standard (github.com/spiffe/spiffe, ``standards/SPIFFE-ID.md`` §2) as go-spiffe's
``spiffeid.FromString`` (the reference implementation) applies them:

* The scheme is exactly ``spiffe://``, lower case.
* The trust domain is non-empty, at most 255 bytes (§2.3: the host component of a URI), of
  ``[a-z0-9._-]`` only. So there is no userinfo (``@``), no port (``:``), no percent-encoding,
  and no upper case: the standard restricts the character set precisely so that an ID has one
  spelling. ``spiffe://Example.org`` is refused rather than lowered, as go-spiffe does, so a
  config value is written the way peers will present it.
* The path is empty, or ``/``-separated segments of ``[a-zA-Z0-9._-]``, none empty (no ``//``,
  no trailing ``/``: ``spiffe://example.org/`` is refused) and none ``.`` or ``..``. The path is
  case-sensitive: ``/API`` and ``/api`` are two workloads. A ``?`` or ``#`` (query, fragment)
  is outside the character set and refused with its own reason.
* The whole ID is at most 2048 bytes (§2.3: implementations must support that much and should
  not make longer ones). go-spiffe does not enforce it; weft does, because IDs come from peers
  and a bound on what is compared and logged costs nothing.

Because a valid ID has one spelling, comparing parsed IDs is comparing the (trust domain, path)
pair, and `SpiffeId` is a frozen dataclass with that equality and hash.

Differences from the Python ``spiffe`` package (0.3.2, used as an oracle in the tests): it lowers
an upper-case trust domain and accepts ``SPIFFE://`` as the scheme; weft refuses both, with the
standard's character set and go-spiffe. On everything else they agree.

Path prefixes (`PathPrefix`, ``allow_path_prefixes``) match **segment by segment** and only
IDs strictly below the prefix: ``spiffe://example.org/ns/prod/`` matches
``spiffe://example.org/ns/prod/web`` and ``.../ns/prod/web/v2``, but neither
``.../ns/production`` (``production`` is not the segment ``prod``) nor ``.../ns/prod`` itself
(list that in ``allow_ids``), nor anything of another trust domain. A prefix is therefore
written with its trailing ``/``, which says "below", and one without it is refused so the
reader never has to guess which of the two meanings was meant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_ID_BYTES",
    "MAX_TRUST_DOMAIN_BYTES",
    "PathPrefix",
    "SpiffeId",
    "SpiffeIdError",
    "parse_trust_domain",
]

SCHEME = "spiffe://"
MAX_ID_BYTES = 2048  # SPIFFE-ID.md §2.3
MAX_TRUST_DOMAIN_BYTES = 255  # SPIFFE-ID.md §2.3: RFC 3986's bound on a host

_TD_CHARS = re.compile(r"[a-z0-9._-]+\Z")
_SEGMENT_CHARS = re.compile(r"[a-zA-Z0-9._-]+\Z")


class SpiffeIdError(ValueError):
    """A string that is not a valid SPIFFE ID (or trust domain, or path prefix); the message
    says which rule it breaks."""


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A valid SPIFFE ID: `trust_domain` (``example.org``) and `path` (``/ns/web``, or ``""``).

    Build one with `SpiffeId.parse`; the constructor trusts its arguments."""

    trust_domain: str
    path: str = ""

    @classmethod
    def parse(cls, s: str) -> SpiffeId:
        """Parse `s` by the rules of the module docstring. Raises SpiffeIdError."""
        if not isinstance(s, str):
            raise SpiffeIdError(f"a SPIFFE ID is a string, got {type(s).__name__}")
        if not s:
            raise SpiffeIdError("a SPIFFE ID cannot be empty")
        if not s.isascii():
            raise SpiffeIdError(f"{s!r} is not a SPIFFE ID: it has non-ASCII characters")
        if len(s) > MAX_ID_BYTES:
            raise SpiffeIdError(
                f"a SPIFFE ID is at most {MAX_ID_BYTES} bytes, got {len(s)} ({s[:40]!r}...)"
            )
        if not s.startswith(SCHEME):
            hint = " (the scheme is lower case)" if s.lower().startswith(SCHEME) else ""
            raise SpiffeIdError(f'{s!r} is not a SPIFFE ID: it must start with "spiffe://"{hint}')
        rest = s[len(SCHEME) :]
        td, slash, path = rest.partition("/")
        try:
            _check_trust_domain(td)
        except SpiffeIdError as e:
            raise SpiffeIdError(f"{s!r} is not a SPIFFE ID: {e}") from None
        if slash:
            path = "/" + path
            try:
                _check_path(path)
            except SpiffeIdError as e:
                raise SpiffeIdError(f"{s!r} is not a SPIFFE ID: {e}") from None
        return cls(td, path)

    @property
    def segments(self) -> tuple[str, ...]:
        """The path's segments: ``("ns", "web")`` for ``/ns/web``, ``()`` for no path."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}{self.path}"


def parse_trust_domain(s: str) -> str:
    """A trust domain name, given as ``example.org`` or as the ID ``spiffe://example.org``
    (without a path). Raises SpiffeIdError."""
    if not isinstance(s, str):
        raise SpiffeIdError(f"a trust domain is a string, got {type(s).__name__}")
    if "://" in s:
        sid = SpiffeId.parse(s)
        if sid.path:
            raise SpiffeIdError(f"{s!r} is a workload's ID; a trust domain has no path")
        return sid.trust_domain
    try:
        _check_trust_domain(s)
    except SpiffeIdError as e:
        raise SpiffeIdError(f"{s!r} is not a trust domain: {e}") from None
    return s


@dataclass(frozen=True, slots=True)
class PathPrefix:
    """``spiffe://<td>/<segments...>/``: the IDs of `trust_domain` strictly below `segments`
    (see the module docstring)."""

    trust_domain: str
    segments: tuple[str, ...]

    @classmethod
    def parse(cls, s: str) -> PathPrefix:
        """Parse a prefix written with its trailing slash. Raises SpiffeIdError."""
        if not isinstance(s, str):
            raise SpiffeIdError(f"a path prefix is a string, got {type(s).__name__}")
        if not s.endswith("/"):
            raise SpiffeIdError(
                f'{s!r}: a path prefix ends with "/" (it matches the IDs below it, segment by '
                "segment); to allow exactly this ID, list it in allow_ids"
            )
        if s.endswith("//") and not s.endswith(":///"):
            raise SpiffeIdError(f"{s!r}: the path cannot contain empty segments ('//')")
        sid = SpiffeId.parse(s[:-1])
        return cls(sid.trust_domain, sid.segments)

    def matches(self, sid: SpiffeId) -> bool:
        seg = sid.segments
        n = len(self.segments)
        return sid.trust_domain == self.trust_domain and len(seg) > n and seg[:n] == self.segments

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/" + "".join(f"{s}/" for s in self.segments)


def _check_trust_domain(td: str) -> None:
    if not td:
        raise SpiffeIdError("the trust domain is missing")
    if len(td) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"a trust domain is at most {MAX_TRUST_DOMAIN_BYTES} bytes")
    if _TD_CHARS.match(td):
        return
    if "@" in td:
        raise SpiffeIdError('userinfo ("user@") is not allowed in a SPIFFE ID')
    if ":" in td:
        raise SpiffeIdError("a port is not allowed in a trust domain")
    if "?" in td or "#" in td:
        raise SpiffeIdError("a query or fragment is not allowed in a SPIFFE ID")
    if td.lower() != td and _TD_CHARS.match(td.lower()):
        raise SpiffeIdError(f"a trust domain is lower case: write {td.lower()!r}")
    raise SpiffeIdError(
        "trust domain characters are limited to lowercase letters, digits, '.', '-' and '_'"
    )


def _check_path(path: str) -> None:
    if "?" in path or "#" in path:
        raise SpiffeIdError("a query or fragment is not allowed in a SPIFFE ID")
    segments = path[1:].split("/")
    for i, seg in enumerate(segments):
        if not seg:
            if i == len(segments) - 1:
                raise SpiffeIdError("the path cannot end with '/'")
            raise SpiffeIdError("the path cannot contain empty segments ('//')")
        if seg in (".", ".."):
            raise SpiffeIdError("the path cannot contain '.' or '..' segments")
        if not _SEGMENT_CHARS.match(seg):
            raise SpiffeIdError(
                f"path segment {seg!r}: characters are limited to letters, digits, '.', '-' "
                "and '_' (no percent-encoding)"
            )
