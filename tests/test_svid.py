"""Unit tests for weft.svid: the SPIFFE leaf rules, the chain check against the leaf's own trust
domain only (the union-of-bundles hole), the contexts an SVID makes, and the peer chain as
`weft.http.tls` reads it after a real handshake (in memory: two SSL objects, no sockets)."""

from __future__ import annotations

import os
import ssl
import stat

import pytest
from support.spiffe_certs import DAY, NOW, Svid, TrustDomain

from weft import svid as sv
from weft.http.tls import TLSTransport
from weft.spiffe_id import SpiffeId


@pytest.fixture(scope="module")
def a():
    return TrustDomain("a.test")


@pytest.fixture(scope="module")
def b():
    return TrustDomain("b.test")


@pytest.fixture(scope="module")
def bundles(a, b):
    return {"a.test": [a.ca], "b.test": [b.ca]}


def verify(s, bundles, now=NOW):
    return sv.verify_chain(s.chain_der[0], s.chain_der[1:], bundles, now)


def refused(reason, s, bundles, now=NOW):
    with pytest.raises(sv.SvidError) as e:
        verify(s, bundles, now)
    assert e.value.reason == reason, e.value
    return str(e.value)


def test_a_leaf_of_a_trusted_domain_verifies_to_its_id(a, bundles):
    assert verify(a.svid("/web"), bundles) == SpiffeId("a.test", "/web")


def test_a_chain_through_an_intermediate_verifies_when_the_peer_sends_it(a, bundles):
    s = a.svid("/web", via=a.intermediate())
    assert verify(s, bundles) == SpiffeId("a.test", "/web")
    assert "does not chain" in refused("bad_chain", Svid(s.cert, s.key), bundles)


def test_a_b_signed_leaf_claiming_an_a_id_is_refused_though_both_bundles_are_trusted(a, b, bundles):
    forged = a.svid("/admin", issuer=b)  # B's CA mints spiffe://a.test/admin
    msg = refused("bad_chain", forged, bundles)
    assert "a.test's bundle" in msg
    # The same CA signing an ID of its own domain is fine: the domain decides, not the store.
    assert verify(b.svid("/admin"), bundles) == SpiffeId("b.test", "/admin")


def test_a_leaf_of_a_domain_without_a_bundle_is_refused(bundles):
    c = TrustDomain("c.test")
    assert "no bundle for trust domain c.test" in refused("untrusted_domain", c.svid(), bundles)


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"uris": ["spiffe://a.test/x", "spiffe://a.test/y"]}, "exactly one URI SAN"),
        ({"uris": []}, "no subject alternative name"),
        ({"uris": ["https://a.test/x"]}, "must start with"),
        ({"uris": ["spiffe://a.test"]}, "names a trust domain"),
        ({"uris": ["spiffe://A.test/x"]}, "lower case"),
        ({"ca": True}, "must not be a CA"),
        ({"digital_signature": False}, "lacks digitalSignature"),
    ],
)
def test_leaves_that_break_the_spiffe_rules_are_refused(a, bundles, kwargs, why):
    assert why in refused("bad_leaf", a.svid(**kwargs), bundles)


def test_an_expired_or_not_yet_valid_leaf_is_refused_at_the_given_time(a, bundles):
    expired = a.svid(not_before=NOW - 3 * DAY, not_after=NOW - DAY)
    refused("bad_chain", expired, bundles)
    assert verify(expired, bundles, now=NOW - 2 * DAY).trust_domain == "a.test"
    refused("bad_chain", a.svid(not_before=NOW + DAY, not_after=NOW + 2 * DAY), bundles)


def test_garbage_is_a_bad_certificate(bundles):
    with pytest.raises(sv.SvidError) as e:
        sv.verify_chain(b"not DER", [], bundles, NOW)
    assert e.value.reason == "bad_certificate"


def test_an_upstream_must_be_one_of_the_expected_ids(a, bundles):
    s = a.svid("/api")
    expect = [SpiffeId.parse("spiffe://a.test/api"), SpiffeId.parse("spiffe://a.test/api2")]
    assert sv.verify_upstream(s.chain_der, bundles, expect, NOW) == SpiffeId("a.test", "/api")
    with pytest.raises(sv.SvidError) as e:
        sv.verify_upstream(a.svid("/other").chain_der, bundles, expect, NOW)
    assert e.value.reason == "unexpected_id"
    with pytest.raises(sv.SvidError) as e:
        sv.verify_upstream([], bundles, expect, NOW)
    assert e.value.reason == "no_certificate"


def test_server_contexts_follow_client_auth_and_issue_no_tickets_when_they_check(a, bundles):
    s = a.svid("/weft")
    own = sv.X509Svid.from_der(s.chain_der, s.key_der)
    assert own.id == SpiffeId("a.test", "/weft")
    for mode, verify_mode in sv.CLIENT_AUTH.items():
        ctx = sv.server_context(own, bundles, client_auth=mode)
        assert ctx.verify_mode == verify_mode
        assert (ctx.num_tickets == 0) == (mode != "none")


def test_an_svid_whose_key_is_not_the_leafs_is_refused(a):
    s1, s2 = a.svid("/one"), a.svid("/two")
    with pytest.raises(ssl.SSLError):
        sv.server_context(sv.X509Svid.from_der(s1.chain_der, s2.key_der), {})


def test_the_key_file_is_private_and_gone_after_the_load_without_memfd(monkeypatch):
    monkeypatch.delattr(os, "memfd_create")
    with sv._private_file(b"secret") as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        with open(path, "rb") as f:
            assert f.read() == b"secret"
    assert not os.path.exists(os.path.dirname(path))


def test_with_memfd_the_key_has_no_name_on_any_filesystem():
    with sv._private_file(b"secret") as path:
        assert path.startswith("/proc/self/fd/")
        assert os.readlink(path).startswith("/memfd:weft-svid")


# -- a real handshake, in memory -----------------------------------------------------------


def handshake(server_ctx, client_ctx):
    """Run a TLS handshake between two SSL objects over memory BIOs; the two transports."""
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname="upstream")
    done = {"s": False, "c": False}
    for _ in range(10):
        for name, obj, out, peer_in in (("c", client, c_out, s_in), ("s", server, s_out, c_in)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            if out.pending:
                peer_in.write(out.read())
        if all(done.values()) and not s_out.pending and not c_out.pending:
            break
    assert all(done.values())
    return TLSTransport(None, server, s_in, s_out), TLSTransport(None, client, c_in, c_out)  # type: ignore[arg-type]


def own(td, path):
    s = td.svid(path)
    return sv.X509Svid.from_der(s.chain_der, s.key_der)


def test_after_a_handshake_both_sides_verify_each_others_svid(a, bundles):
    server_ctx = sv.server_context(own(a, "/weft"), bundles, client_auth="required")
    client_ctx = sv.client_context(own(a, "/frontend"), bundles)
    srv, cli = handshake(server_ctx, client_ctx)
    chain = srv.peer_chain()
    # The leaf comes first (OpenSSL's client also sends the root it found in its store).
    assert chain[0] == srv.peer_certificate
    assert sv.verify_peer(chain, bundles, NOW) == SpiffeId("a.test", "/frontend")
    up = sv.verify_upstream(cli.peer_chain(), bundles, [SpiffeId("a.test", "/weft")], NOW)
    assert up == SpiffeId("a.test", "/weft")


def test_the_union_store_lets_a_forged_svid_through_the_handshake_and_verify_peer_refuses_it(
    a, b, bundles
):
    forged = a.svid("/admin", issuer=b)
    server_ctx = sv.server_context(own(a, "/weft"), bundles, client_auth="required")
    client_ctx = sv.client_context(sv.X509Svid.from_der(forged.chain_der, forged.key_der), bundles)
    srv, _ = handshake(server_ctx, client_ctx)  # OpenSSL accepts: B's root is in its store
    with pytest.raises(sv.SvidError) as e:
        sv.verify_peer(srv.peer_chain(), bundles, NOW)
    assert e.value.reason == "bad_chain"


def test_optional_client_auth_serves_a_client_without_a_certificate_with_no_peer_id(a, bundles):
    server_ctx = sv.server_context(own(a, "/weft"), bundles, client_auth="optional")
    srv, _ = handshake(server_ctx, sv.client_context(None, bundles))
    assert srv.peer_chain() == []
    assert sv.verify_peer(srv.peer_chain(), bundles, NOW) is None
