"""The server's HPACK encoder (`weft.http.h2_hpack`), judged by the `hpack` library's decoder:
every block decodes to the fields given, leaves the decoder's dynamic table empty, and starts
with a table size update exactly when the client lowered its table size."""

from __future__ import annotations

from hpack import Decoder, NeverIndexedHeaderTuple

from weft.http import h2_hpack
from weft.http.h2_hpack import FieldMemo, StaticEncoder, encode_field

RESPONSE = [
    (b":status", b"200"),  # static, name and value
    (b"content-length", b"1024"),  # static name
    (b"x-request-id", b"d91a0713-8756-4984-9ba2-5af508a04fd6"),  # new name
    (b"via", b"1.1 weft"),
]


def test_blocks_decode_to_the_fields_and_leave_the_decoders_table_empty():
    enc, dec = StaticEncoder(FieldMemo()), Decoder()
    for i in range(3):
        fields = [*RESPONSE, (b"x-n", b"%d" % i)]
        assert dec.decode(enc.encode(fields), raw=True) == fields
    assert len(dec.header_table.dynamic_entries) == 0


def test_a_static_entry_is_one_byte_and_a_repeated_field_is_memoized():
    assert encode_field(b":status", b"200") == b"\x88"  # index 8 (RFC 7541 Appendix A)
    enc = StaticEncoder(FieldMemo())
    first = enc.encode(RESPONSE)
    assert enc.encode(RESPONSE) == first
    assert enc._memo.values[b"via"][b"1.1 weft"] == encode_field(b"via", b"1.1 weft")


def test_sensitive_fields_are_never_indexed_literals_and_not_memoized():
    enc, dec = StaticEncoder(FieldMemo()), Decoder()
    field = NeverIndexedHeaderTuple(b"set-cookie", b"secret=1")
    block = enc.encode([field])
    assert block[0] & 0xF0 == 0x10  # literal never indexed (RFC 7541 §6.2.3)
    decoded = dec.decode(block, raw=True)
    assert decoded == [(b"set-cookie", b"secret=1")]
    assert isinstance(decoded[0], NeverIndexedHeaderTuple)
    assert b"set-cookie" not in enc._memo.values


def test_a_lowered_table_size_is_signalled_once_and_a_raised_one_never():
    enc, dec = StaticEncoder(FieldMemo()), Decoder()
    enc.header_table_size = 2**31 - 1  # the client allows more: nothing to say
    assert enc.encode(RESPONSE)[0] == 0x88
    enc.header_table_size = 100
    enc.header_table_size = 0  # two changes before a block: the smallest is signalled
    block = enc.encode(RESPONSE)
    assert block[0] == 0x20  # dynamic table size update to 0 (§6.3)
    dec.max_allowed_table_size = 0  # what the client's SETTINGS said
    assert dec.decode(block, raw=True) == RESPONSE
    assert dec.header_table.maxsize == 0
    assert enc.encode(RESPONSE)[0] == 0x88


def test_the_memo_is_bounded_per_name_and_in_names(monkeypatch):
    monkeypatch.setattr(h2_hpack, "PER_NAME", 4)
    monkeypatch.setattr(h2_hpack, "NAMES", 3)
    enc, dec = StaticEncoder(FieldMemo()), Decoder()
    for i in range(10):
        fields = [(b"x-id", b"%d" % i), (b"x-%d" % (i % 5), b"v")]
        assert dec.decode(enc.encode(fields), raw=True) == fields
        assert len(enc._memo.values) <= 3 and len(enc._memo.churning) <= 3
        assert all(len(values) <= 4 for values in enc._memo.values.values())


def test_a_name_whose_values_never_repeat_is_neither_memoized_nor_huffman_coded(monkeypatch):
    monkeypatch.setattr(h2_hpack, "PER_NAME", 4)
    enc, dec = StaticEncoder(FieldMemo()), Decoder()
    for i in range(6):
        rid = b"d91a0713-8756-4984-9ba2-%012d" % i
        fields = [(b":status", b"200"), (b"x-request-id", rid)]
        block = enc.encode(fields)
        assert dec.decode(block, raw=True) == fields
    assert b"x-request-id" not in enc._memo.values and b"x-request-id" in enc._memo.churning
    assert rid in block  # a plain string literal (§5.2, H bit clear)
    assert enc._memo.values[b":status"]  # the others are still memoized


def test_the_memo_is_shared_by_connections_and_bounded_in_bytes(monkeypatch):
    monkeypatch.setattr(h2_hpack, "MAX_BYTES", 100)
    memo = FieldMemo()
    a, b, dec = StaticEncoder(memo), StaticEncoder(memo), Decoder()
    a.encode([(b"x-a", b"v" * 30)])
    assert b"x-a" in memo.values  # what one connection encoded, the next one finds
    for i in range(20):
        fields = [(b"x-%d" % i, b"w" * 30)]
        assert dec.decode(b.encode(fields), raw=True) == fields
        assert memo.bytes <= 100 + 40


def test_a_value_over_max_value_is_sent_plain_and_not_memoized():
    memo = FieldMemo()
    value = b"a" * (h2_hpack.MAX_VALUE + 1)
    block = StaticEncoder(memo).encode([(b"content-security-policy", value)])
    assert Decoder().decode(block, raw=True) == [(b"content-security-policy", value)]
    assert value in block and b"content-security-policy" not in memo.values
