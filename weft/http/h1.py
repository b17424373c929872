"""HTTP/1.1 helpers shared by the server side (`h1_server`) and the client side (`h1_client`).

Both sides let h11 do the framing; what they share is how weft talks to h11 cheaply: one
immutable end-of-message event, the header list taken from h11's own storage, and the check
that lets a request line skip h11's per-field validation.
"""

from __future__ import annotations

import re

import h11

READ_SIZE = 64 * 1024  # one receive; matches the pool buffer size class of 64 KiB

METHOD = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# What a request target may contain: RFC 3986 characters, no fragment (RFC 9112 §3.2).
TARGET_BAD = re.compile(rb"[^\x21-\x7e]|#")

# h11 events are immutable: the end of a message without trailers is made once (making one
# runs h11's header normalisation over an empty list, twice per proxied request otherwise).
END = h11.EndOfMessage()


def end_of_message(trailers: list[tuple[bytes, bytes]]) -> h11.EndOfMessage:
    return h11.EndOfMessage(headers=trailers) if trailers else END


def fields(headers: h11._headers.Headers) -> list[tuple[bytes, bytes]]:
    """(lowercase name, value) pairs of an h11 event's headers.

    Iterating h11's Headers goes through `collections.abc.Sequence.__iter__` (an indexing loop
    in Python, 1-2 % of the per-request CPU); its item list gives the same pairs directly.
    h11 is pinned, so its layout is known.
    """
    return [(name, value) for _, name, value in headers._full_items]


def valid_request_line(method: bytes, target: bytes) -> bool:
    """Whether a method and target can be written as a request line unchecked."""
    return (
        METHOD.fullmatch(method) is not None
        and bool(target)
        and TARGET_BAD.search(target) is None
    )
