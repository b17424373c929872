"""The HPACK encoder of the HTTP/2 server: the static table only, and a memo of encoded fields.

`h2` encodes every header block with `hpack.Encoder`, which keeps a dynamic table: each field
is searched for in it (a linear scan), inserted, and older entries evicted, all in Python. A
proxy's responses carry fields that are new in every response (``x-request-id``, ``date`` once
a second, ``etag``), so the table churns and the search costs more than it saves: with h2load
(1 KiB bodies, ten fields a response) the encoder took 12 % of a worker's CPU.

`StaticEncoder` encodes each field on its own, as nginx (1.22) does its responses: an entry of
the static table by index (``:status: 200``), else a literal *without indexing* whose name is a
static index when it has one (RFC 7541 §6.2.2), the strings Huffman-coded (§5.2). With no
dynamic table, a field's bytes depend on the field alone, so they are memoized, once per
worker for all its connections (`FieldMemo`): a header block is the concatenation of memo hits.
The memo is bounded (`PER_NAME`, `NAMES`, `MAX_BYTES`). A name whose values outgrew its memo
once (a request id, new in every response) is *churning*: its values are neither memoized nor
Huffman-coded from then on, since neither pays for itself on a value sent once (Huffman-coding
a request id cost 3 % of a worker's CPU to save 10 bytes); nor is a value over `MAX_VALUE`.
Fields marked sensitive (`hpack.NeverIndexedHeaderTuple`) are literals *never indexed*
(§6.2.3) and never memoized.

What this gives up: the bytes a dynamic table saves on repeated fields (about 100 per response
here); loopback and LAN links do not miss them. What it gains besides CPU: the client's
SETTINGS_HEADER_TABLE_SIZE cannot make a worker hold any table of ours, whatever its size.

Table size updates (RFC 7541 §4.2, §6.3): the decoder starts at 4096 bytes. When the client
lowers SETTINGS_HEADER_TABLE_SIZE below the size last signalled, the next block starts with a
size update to the new value (strict decoders, nghttp2's, require one); a raise needs none, as
the table stays unused.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import NeverIndexedHeaderTuple
from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

__all__ = ["StaticEncoder"]

DEFAULT_TABLE_SIZE = 4096  # RFC 7541 §4.2 / RFC 9113 §6.5.2: SETTINGS_HEADER_TABLE_SIZE
# Memo bounds: values kept per name, names kept, encoded bytes kept. Past one, that memo is
# cleared (cheap, and no eviction order to keep). 64 covers the statuses and content lengths a
# site repeats; 1 MiB a worker is far above what 256 names of ordinary fields take.
PER_NAME = 64
NAMES = 256
MAX_BYTES = 1 << 20
# A longer value is sent as it is: not memoized (the memo's bytes), not Huffman-coded (its
# cost grows with the length; hpack's encoder would not index it either, past its 4096 table).
MAX_VALUE = 4096

_STATIC = HeaderTable.STATIC_TABLE_MAPPING  # name -> (first index, {value: index})
_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
# Names outside the static table, as string literals: a churning name's values are encoded
# anew each time, its name need not be (bounded by NAMES, cleared when full).
_names: dict[bytes, bytes] = {}


def _string(data: bytes, huffman: bool = True) -> bytes:
    """An HPACK string literal (§5.2), Huffman-coded when asked and that is shorter."""
    if huffman:
        coded = _huffman.encode(data)
        if len(coded) < len(data):
            head = encode_integer(len(coded), 7)
            head[0] |= 0x80
            return bytes(head) + coded
    return bytes(encode_integer(len(data), 7)) + data


def encode_field(
    name: bytes, value: bytes, never_indexed: bool = False, huffman: bool = True
) -> bytes:
    """One field's representation, without the dynamic table (see the module docstring);
    `huffman` false leaves the value's string as it is (the name's is memoized apart)."""
    static = _STATIC.get(name)
    if static is not None and not never_indexed:
        index = static[1].get(value)
        if index is not None:
            out = encode_integer(index, 7)
            out[0] |= 0x80
            return bytes(out)
    flag = 0x10 if never_indexed else 0x00
    if static is not None:
        prefix = encode_integer(static[0], 4)
        prefix[0] |= flag
        return bytes(prefix) + _string(value, huffman)
    name_string = _names.get(name)
    if name_string is None:
        if len(_names) >= NAMES:
            _names.clear()
        name_string = _names[name] = _string(name)
    return bytes([flag]) + name_string + _string(value, huffman)


class FieldMemo:
    """Encoded fields by name and value, shared by every connection of the worker (a field's
    bytes do not depend on the connection), within `PER_NAME`, `NAMES` and `MAX_BYTES`; past
    a bound that part is cleared. Names whose values do not repeat are `churning`."""

    __slots__ = ("bytes", "churning", "values")

    def __init__(self) -> None:
        self.values: dict[bytes, dict[bytes, bytes]] = {}
        self.churning: set[bytes] = set()
        self.bytes = 0  # encoded bytes held (MAX_BYTES)

    def field(self, name: bytes, value: bytes) -> bytes:
        """`name: value` encoded (see the module docstring for what is memoized)."""
        if name in self.churning or len(value) > MAX_VALUE:
            return encode_field(name, value, huffman=False)
        memo = self.values
        values = memo.get(name)
        if values is not None and len(values) >= PER_NAME:
            del memo[name]
            self.bytes -= sum(map(len, values.values()))
            if len(self.churning) >= NAMES:
                self.churning.clear()
            self.churning.add(name)
            return encode_field(name, value, huffman=False)
        if self.bytes >= MAX_BYTES or (values is None and len(memo) >= NAMES):
            memo.clear()
            self.bytes = 0
            values = None
        if values is None:
            values = memo[name] = {}
        encoded = values[value] = encode_field(name, value)
        self.bytes += len(encoded)
        return encoded


SHARED = FieldMemo()  # the worker's (each worker process has its own copy after the fork)


class StaticEncoder:
    """Stands in for `hpack.Encoder` as ``H2Connection.encoder``: h2 calls `encode` for each
    header block it sends and sets `header_table_size` from the client's SETTINGS."""

    __slots__ = ("_memo", "_signalled", "_update")

    def __init__(self, memo: FieldMemo = SHARED) -> None:
        self._memo = memo
        self._signalled = DEFAULT_TABLE_SIZE  # the table size the client's decoder assumes
        self._update: int | None = None  # a size update owed at the next block's start

    @property
    def header_table_size(self) -> int:
        return self._signalled

    @header_table_size.setter
    def header_table_size(self, size: int) -> None:
        if size < self._signalled:
            self._signalled = size
            self._update = size

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        """The header block of `headers` (bytes names, lowercase, and bytes values: h2 has
        encoded them). `huffman` is accepted for `hpack.Encoder`'s signature; strings are
        Huffman-coded when that is shorter."""
        parts: list[bytes] = []
        if self._update is not None:
            head = encode_integer(self._update, 5)
            head[0] |= 0x20
            parts.append(bytes(head))
            self._update = None
        memo = self._memo
        values = memo.values
        for field in headers:
            name, value = field[0], field[1]
            if isinstance(field, NeverIndexedHeaderTuple):
                parts.append(encode_field(name, value, never_indexed=True))
                continue
            known = values.get(name)
            encoded = known.get(value) if known is not None else None
            parts.append(encoded if encoded is not None else memo.field(name, value))
        return b"".join(parts)
