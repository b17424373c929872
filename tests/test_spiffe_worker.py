"""A worker's side of SPIFFE (`weft.spiffe.WorkerIdentity`), against generations published by
the identity process's own writer (`weft.identity.IdentityStore`), with a fake generation word
and a fake wall clock: loading on a new generation only, contexts rebuilt on rotation, a broken
generation refused with the old SVID kept, expiry making the SVID unusable whatever was
published, the first-fetch wait, and the per-trust-domain check of a client's chain."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path

import pytest
import trio
from support.config import MINIMAL_CONFIG
from support.config import load_text as load
from support.spiffe_certs import Svid, TrustDomain

from weft import status
from weft.identity import IdentityStore
from weft.identity_process import directory_for, remove_directory
from weft.spiffe import IdentityUnavailable, WorkerIdentity, identity_settings
from weft.svid import SvidError
from weft.workload_api import EndpointError

CONFIG = (
    MINIMAL_CONFIG.replace(
        "port = 8080\n",
        'port = 8080\n[listeners.tls]\nspiffe = true\nclient_auth = "required"\n',
        1,
    )
    + '[spiffe]\nendpoint = "unix:///tmp/agent.sock"\ntrust_domains = ["partner.example"]\n'
)


class Published:
    """The identity process's writer and the generation word, as a test drives them."""

    def __init__(self, directory: Path) -> None:
        self.store = IdentityStore.create(directory)
        self.word = 0

    def publish(
        self,
        svid: Svid | None,
        bundles: dict[str, TrustDomain],
        *,
        jwks: dict[str, dict[str, object]] | None = None,
        problem: str | None = None,
        key_pem: bytes | None = None,
    ) -> int:
        manifest: dict[str, object] = {"svid": None, "bundles": {}, "jwt_bundles": None}
        files: dict[str, bytes] = {}
        if svid is not None:
            files["svid.pem"] = svid.chain_pem
            files["key.pem"] = key_pem if key_pem is not None else svid.key_pem
            manifest["svid"] = {"chain": "svid.pem", "key": "key.pem"}
        for td, domain in bundles.items():
            files[f"bundle.{td}.pem"] = domain.ca_pem
            manifest["bundles"][f"{td}"] = f"bundle.{td}.pem"  # type: ignore[index]
        if jwks is not None:
            files["jwt_bundles.json"] = json.dumps(jwks).encode()
            manifest["jwt_bundles"] = "jwt_bundles.json"
        manifest["problem"] = problem
        self.word = self.store.publish(manifest, files)
        return self.word


@pytest.fixture
def domains() -> tuple[TrustDomain, TrustDomain]:
    return TrustDomain("example.org"), TrustDomain("partner.example")


@pytest.fixture
def setup(tmp_path: Path):
    cfg = load(tmp_path, CONFIG)
    pub = Published(tmp_path / "identity")
    clock = [0.0]
    identity = WorkerIdentity(cfg, pub.store.directory, lambda: pub.word, lambda: clock[0])
    return cfg, pub, identity, clock


def test_nothing_published_is_no_identity(setup) -> None:
    cfg, _pub, identity, _clock = setup
    identity.refresh()
    assert not identity.usable
    assert identity.server_context(cfg.listeners[0].tls) is None
    assert identity.why_unusable() == "no identity published yet"
    assert identity.jwt_bundles() is None


def test_a_generation_is_loaded_once_and_builds_the_contexts(setup, domains) -> None:
    cfg, pub, identity, clock = setup
    a, b = domains
    svid = a.svid("/weft")
    clock[0] = svid.cert.not_valid_before_utc.timestamp() + 1
    pub.publish(svid, {"example.org": a, "partner.example": b})
    ctx = identity.server_context(cfg.listeners[0].tls)
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.num_tickets == 0
    assert identity.usable and str(identity.spiffe_id) == "spiffe://example.org/weft"
    assert sorted(identity.x509_bundles()) == ["example.org", "partner.example"]
    assert identity.expires == svid.cert.not_valid_after_utc.timestamp()
    # Same word: nothing is read again (the files may even be gone).
    for p in pub.store.directory.rglob("*.pem"):
        p.unlink()
    assert identity.server_context(cfg.listeners[0].tls) is ctx


def test_a_rotation_replaces_the_contexts_and_keeps_nothing_of_the_old(setup, domains) -> None:
    cfg, pub, identity, clock = setup
    a, _ = domains
    first, second = a.svid("/weft"), a.svid("/weft")
    clock[0] = first.cert.not_valid_before_utc.timestamp() + 1
    pub.publish(first, {"example.org": a})
    old = identity.server_context(cfg.listeners[0].tls)
    pub.publish(second, {"example.org": a}, jwks={"example.org": a.jwks()})
    new = identity.server_context(cfg.listeners[0].tls)
    assert new is not old and identity.svid is not None
    assert identity.svid.chain[0].serial_number == second.cert.serial_number
    assert list(identity.jwt_bundles() or {}) == ["example.org"]
    assert list(identity.x509_bundles()) == ["example.org"]


def test_a_generation_whose_key_does_not_fit_is_refused_and_the_old_svid_stays(
    setup, domains, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, pub, identity, clock = setup
    a, _ = domains
    good, other = a.svid("/weft"), a.svid("/weft")
    clock[0] = good.cert.not_valid_before_utc.timestamp() + 1
    pub.publish(good, {"example.org": a})
    ctx = identity.server_context(cfg.listeners[0].tls)
    broken = pub.publish(a.svid("/weft"), {"example.org": a}, key_pem=other.key_pem)
    assert identity.server_context(cfg.listeners[0].tls) is ctx
    assert identity.generation == broken  # not read again until the next one
    assert identity.svid is not None
    assert identity.svid.chain[0].serial_number == good.cert.serial_number
    assert f"generation {broken} refused" in caplog.text


def test_an_expired_svid_is_never_used_whatever_was_published(setup, domains) -> None:
    cfg, pub, identity, clock = setup
    a, _ = domains
    svid = a.svid("/weft")
    clock[0] = svid.cert.not_valid_before_utc.timestamp() + 1
    pub.publish(svid, {"example.org": a})
    assert identity.server_context(cfg.listeners[0].tls) is not None
    clock[0] = svid.cert.not_valid_after_utc.timestamp()
    assert not identity.usable
    assert identity.server_context(cfg.listeners[0].tls) is None
    assert "expired" in identity.why_unusable()


async def test_the_first_wait_ends_with_the_identity_process_reason(setup) -> None:
    _cfg, pub, identity, _clock = setup
    pub.publish(None, {}, problem="no X.509-SVID from unix:///tmp/agent.sock within 0.2s: gone")
    with pytest.raises(IdentityUnavailable) as e:
        await identity.wait_first(0.2)
    assert e.value.errors == [
        "spiffe: no usable X.509-SVID within first_fetch_timeout (0.2s): "
        "no X.509-SVID from unix:///tmp/agent.sock within 0.2s: gone"
    ]


async def test_a_generation_with_only_jwt_bundles_does_not_end_the_first_wait(
    setup, domains
) -> None:
    """The agent's JWT bundles may come before the SVID: the identity process publishes them
    alone, with no problem reported, and a booting worker must go on waiting."""
    _cfg, pub, identity, clock = setup
    a, _ = domains
    svid = a.svid("/weft")
    clock[0] = svid.cert.not_valid_before_utc.timestamp() + 1
    pub.publish(None, {}, jwks={"example.org": a.jwks()})

    async def later() -> None:
        await trio.sleep(0.3)
        pub.publish(svid, {"example.org": a}, jwks={"example.org": a.jwks()})

    async with trio.open_nursery() as n:
        n.start_soon(later)
        with trio.fail_after(5):
            await identity.wait_first(0.2)  # the SVID comes after the timeout, in the grace
    assert identity.usable


async def test_the_first_wait_returns_when_an_svid_comes(setup, domains) -> None:
    _cfg, pub, identity, clock = setup
    a, _ = domains
    svid = a.svid("/weft")
    clock[0] = svid.cert.not_valid_before_utc.timestamp() + 1

    async def later() -> None:
        await trio.sleep(0.1)
        pub.publish(svid, {"example.org": a})

    async with trio.open_nursery() as n:
        n.start_soon(later)
        with trio.fail_after(5):
            await identity.wait_first(5)
    assert identity.usable


def test_a_client_is_checked_in_its_own_trust_domain(setup, domains) -> None:
    _cfg, pub, identity, clock = setup
    a, b = domains
    svid = a.svid("/weft")
    clock[0] = svid.cert.not_valid_before_utc.timestamp() + 1
    pub.publish(svid, {"example.org": a, "partner.example": b})
    identity.refresh()
    front = a.svid("/frontend")
    assert str(identity.verify_client(front.chain_der)) == "spiffe://example.org/frontend"
    assert str(identity.verify_client(b.svid("/x").chain_der)) == "spiffe://partner.example/x"
    # partner.example's CA minting an ID of example.org: both roots are trusted, but only
    # example.org's may sign example.org's IDs.
    forged = b.svid(uris=["spiffe://example.org/frontend"])
    with pytest.raises(SvidError) as e:
        identity.verify_client(forged.chain_der)
    assert e.value.reason == "bad_chain"
    assert identity.verify_client([]) is None  # client_auth "optional": no certificate


def test_the_endpoint_comes_from_the_environment_when_the_file_names_none(tmp_path) -> None:
    cfg = load(tmp_path, CONFIG.replace('endpoint = "unix:///tmp/agent.sock"\n', ""))
    assert cfg.spiffe is not None
    settings = identity_settings(cfg.spiffe, {"SPIFFE_ENDPOINT_SOCKET": "tcp://127.0.0.1:8081"})
    assert (settings.endpoint.host, settings.endpoint.port) == ("127.0.0.1", 8081)
    assert settings.trust_domains == ("partner.example",)
    with pytest.raises(EndpointError, match="SPIFFE_ENDPOINT_SOCKET is empty"):
        identity_settings(cfg.spiffe, {})


def test_status_shows_what_the_identity_process_published(domains) -> None:
    instance = f"t{os.getpid()}idstatus"
    assert status.identity(instance) is None  # no [spiffe]: no section
    directory = directory_for(instance)
    try:
        pub = Published(directory)
        pub.publish(None, {}, problem="no X.509-SVID from unix:///x within 1s: gone")
        ident = status.identity(instance)
        assert ident is not None and ident["spiffe_id"] is None
        assert status._identity_line(ident) == (
            "identity NONE: no X.509-SVID from unix:///x within 1s: gone"
        )
        a, _ = domains
        manifest = json.loads((directory / "current.json").read_bytes())
        assert manifest["problem"]
        pub.store.publish(
            {"svid": {"spiffe_id": "spiffe://example.org/weft", "not_after": 0.0}, "problem": None,
             "bundles": {"example.org": "b.pem"}},
            {"b.pem": a.ca_pem},
        )  # fmt: skip
        ident = status.identity(instance)
        assert ident is not None and ident["trust_domains"] == ["example.org"]
        assert status._identity_line(ident) == (
            "identity spiffe://example.org/weft until 1970-01-01T00:00:00Z (generation 2)"
        )
    finally:
        remove_directory(directory)
