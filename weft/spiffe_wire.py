"""The protobuf messages of the SPIFFE Workload API that weft sends and reads, by hand.

weft's Workload API client (`weft.workload_api`) needs six messages of ``workload.proto``:
three requests it encodes and three responses it decodes. This module is a protobuf codec for
exactly those, with the field numbers of the official definition (``spiffe/spiffe
standards/workloadapi.proto``; the tests check every one against the descriptors of
``spiffe._proto.workload_pb2``, and round-trip messages both ways through it).

Why by hand, not the ``protobuf`` runtime: the runtime would be a new dependency of every weft
process (with a C extension), and its message classes come from generated code, which weft
would have to commit or build descriptors for at run time, for six messages of three field
types. What the codec must get right is small and testable: varints (at most 10 bytes),
length-delimited fields, proto3 maps (entries with key 1 and value 2, either may be absent),
the last value winning for a repeated singular field, and unknown fields skipped for every
wire type (varint, 64-bit, length-delimited, groups, 32-bit) so that a newer agent adding
fields does not break weft. Anything malformed raises `WireError`; nothing is trusted: a
length past the end of the buffer, a field number 0, a wire type 6 or 7, an unterminated
group, invalid UTF-8 in a string field all raise.

Encoders exist for every message (the requests are what the client sends; the responses let
the tests encode with this module and decode with the official classes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "JWTSVID",
    "X509SVID",
    "JWTBundlesRequest",
    "JWTBundlesResponse",
    "JWTSVIDRequest",
    "JWTSVIDResponse",
    "WireError",
    "X509SVIDRequest",
    "X509SVIDResponse",
]

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_MAX_VARINT_BYTES = 10  # a uint64 takes at most 10 groups of 7 bits
_MAX_GROUP_DEPTH = (
    32  # nested unknown groups skipped before giving up (protobuf's own limit is 100)
)


class WireError(ValueError):
    """The bytes are not a valid encoding of the expected message."""


# -- the wire format ----------------------------------------------------------------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos + i]
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos + i + 1
        shift += 7
    raise WireError("varint longer than 10 bytes")


def _skip(buf: memoryview, pos: int, wire: int, number: int, depth: int = 0) -> int:
    """The position after the value of an unknown field of type `wire`."""
    if wire == VARINT:
        return _varint(buf, pos)[1]
    if wire == I64:
        end = pos + 8
    elif wire == I32:
        end = pos + 4
    elif wire == LEN:
        n, pos = _varint(buf, pos)
        end = pos + n
    elif wire == SGROUP:
        if depth >= _MAX_GROUP_DEPTH:
            raise WireError("groups nested too deeply")
        while True:
            if pos >= len(buf):
                raise WireError(f"group {number} not terminated")
            key, pos = _varint(buf, pos)
            inner_number, inner_wire = key >> 3, key & 7
            if inner_wire == EGROUP:
                if inner_number != number:
                    raise WireError(f"group {number} ended by the end of group {inner_number}")
                return pos
            if inner_number == 0:
                raise WireError("field number 0")
            pos = _skip(buf, pos, inner_wire, inner_number, depth + 1)
    elif wire == EGROUP:
        raise WireError(f"end of group {number} without its start")
    else:
        raise WireError(f"invalid wire type {wire} (field {number})")
    if end > len(buf):
        raise WireError(f"field {number} runs past the end of the message")
    return end


def fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Each field of a message, in order: (number, wire type, value). A varint's value is an
    int, a length-delimited one a memoryview into `data`; fixed-width values and groups are
    skipped here and yielded as the int 0, since no message here uses them.

    Every field of the messages below is length-delimited; a known field number arriving with
    another wire type is skipped like an unknown field, as the protobuf runtime does."""
    buf = memoryview(data)
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == LEN:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise WireError(f"field {number} runs past the end of the message")
            yield number, wire, buf[pos : pos + n]
            pos += n
        else:
            pos = _skip(buf, pos, wire, number)
            yield number, wire, 0


def _len_fields(data: bytes | memoryview) -> Iterator[tuple[int, memoryview]]:
    """The length-delimited fields of a message (see `fields`)."""
    for number, wire, value in fields(data):
        if wire == LEN:
            assert isinstance(value, memoryview)
            yield number, value


def _str(value: memoryview, number: int, message: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{message}: field {number} is not UTF-8") from None


def _map_entry(data: memoryview, message: str) -> tuple[str, bytes]:
    key, value = "", b""
    for number, v in _len_fields(data):
        if number == 1:
            key = _str(v, 1, message)
        elif number == 2:
            value = bytes(v)
    return key, value


def _put_varint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_len(out: bytearray, number: int, data: bytes) -> None:
    _put_varint(out, (number << 3) | LEN)
    _put_varint(out, len(data))
    out += data


def _put_str(out: bytearray, number: int, text: str) -> None:
    """A proto3 singular string: absent when empty (the default is not encoded)."""
    if text:
        _put_len(out, number, text.encode("utf-8"))


def _put_bytes(out: bytearray, number: int, data: bytes) -> None:
    if data:
        _put_len(out, number, data)


def _put_map(out: bytearray, number: int, entries: dict[str, bytes]) -> None:
    for key, value in entries.items():
        entry = bytearray()
        _put_str(entry, 1, key)
        _put_bytes(entry, 2, value)
        _put_len(out, number, bytes(entry))


# -- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class X509SVIDRequest:
    """``FetchX509SVID``'s request: no fields."""

    def encode(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class JWTBundlesRequest:
    """``FetchJWTBundles``'s request: no fields."""

    def encode(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class JWTSVIDRequest:
    """``FetchJWTSVID``'s request: audience = 1 (repeated string, required), spiffe_id = 2
    (optional: empty asks for every identity the workload has)."""

    audience: tuple[str, ...]
    spiffe_id: str = ""

    def encode(self) -> bytes:
        out = bytearray()
        for aud in self.audience:
            _put_len(out, 1, aud.encode("utf-8"))  # repeated: every element, even an empty one
        _put_str(out, 2, self.spiffe_id)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> JWTSVIDRequest:
        audience: list[str] = []
        spiffe_id = ""
        for number, v in _len_fields(data):
            if number == 1:
                audience.append(_str(v, 1, "JWTSVIDRequest"))
            elif number == 2:
                spiffe_id = _str(v, 2, "JWTSVIDRequest")
        return cls(tuple(audience), spiffe_id)


# -- responses ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class X509SVID:
    """One X.509-SVID: spiffe_id = 1, x509_svid = 2 (DER certificates, leaf first),
    x509_svid_key = 3 (PKCS#8 DER), bundle = 4 (DER CA certificates of its trust domain),
    hint = 5."""

    spiffe_id: str = ""
    x509_svid: bytes = b""
    x509_svid_key: bytes = b""
    bundle: bytes = b""
    hint: str = ""

    def _encode(self) -> bytes:
        out = bytearray()
        _put_str(out, 1, self.spiffe_id)
        _put_bytes(out, 2, self.x509_svid)
        _put_bytes(out, 3, self.x509_svid_key)
        _put_bytes(out, 4, self.bundle)
        _put_str(out, 5, self.hint)
        return bytes(out)

    @classmethod
    def _decode(cls, data: memoryview) -> X509SVID:
        m = "X509SVID"
        v: dict[str, object] = {}
        for number, value in _len_fields(data):
            if number == 1:
                v["spiffe_id"] = _str(value, 1, m)
            elif number == 2:
                v["x509_svid"] = bytes(value)
            elif number == 3:
                v["x509_svid_key"] = bytes(value)
            elif number == 4:
                v["bundle"] = bytes(value)
            elif number == 5:
                v["hint"] = _str(value, 5, m)
        return cls(**v)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class X509SVIDResponse:
    """``FetchX509SVID``'s stream message: svids = 1, crl = 2 (repeated DER),
    federated_bundles = 3 (map from trust domain to DER CA certificates)."""

    svids: tuple[X509SVID, ...] = ()
    crl: tuple[bytes, ...] = ()
    federated_bundles: dict[str, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        out = bytearray()
        for svid in self.svids:
            _put_len(out, 1, svid._encode())
        for crl in self.crl:
            _put_len(out, 2, crl)
        _put_map(out, 3, self.federated_bundles)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> X509SVIDResponse:
        m = "X509SVIDResponse"
        svids: list[X509SVID] = []
        crl: list[bytes] = []
        federated: dict[str, bytes] = {}
        for number, v in _len_fields(data):
            if number == 1:
                svids.append(X509SVID._decode(v))
            elif number == 2:
                crl.append(bytes(v))
            elif number == 3:
                key, value = _map_entry(v, m)
                federated[key] = value  # a repeated key: the last one wins
        return cls(tuple(svids), tuple(crl), federated)


@dataclass(frozen=True, slots=True)
class JWTBundlesResponse:
    """``FetchJWTBundles``'s stream message: bundles = 1 (map from trust domain to a JWKS
    document, JSON bytes)."""

    bundles: dict[str, bytes] = field(default_factory=dict)

    def encode(self) -> bytes:
        out = bytearray()
        _put_map(out, 1, self.bundles)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> JWTBundlesResponse:
        bundles: dict[str, bytes] = {}
        for number, v in _len_fields(data):
            if number == 1:
                key, value = _map_entry(v, "JWTBundlesResponse")
                bundles[key] = value
        return cls(bundles)


@dataclass(frozen=True, slots=True)
class JWTSVID:
    """One JWT-SVID: spiffe_id = 1, svid = 2 (the compact JWS), hint = 3."""

    spiffe_id: str = ""
    svid: str = ""
    hint: str = ""

    def _encode(self) -> bytes:
        out = bytearray()
        _put_str(out, 1, self.spiffe_id)
        _put_str(out, 2, self.svid)
        _put_str(out, 3, self.hint)
        return bytes(out)

    @classmethod
    def _decode(cls, data: memoryview) -> JWTSVID:
        v: dict[str, str] = {}
        names = {1: "spiffe_id", 2: "svid", 3: "hint"}
        for number, value in _len_fields(data):
            if number in names:
                v[names[number]] = _str(value, number, "JWTSVID")
        return cls(**v)


@dataclass(frozen=True, slots=True)
class JWTSVIDResponse:
    """``FetchJWTSVID``'s answer: svids = 1."""

    svids: tuple[JWTSVID, ...] = ()

    def encode(self) -> bytes:
        out = bytearray()
        for svid in self.svids:
            _put_len(out, 1, svid._encode())
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> JWTSVIDResponse:
        svids = [JWTSVID._decode(v) for number, v in _len_fields(data) if number == 1]
        return cls(tuple(svids))
