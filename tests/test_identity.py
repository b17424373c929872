"""The identity process's loop and its published directory, against the real test agent.

First the pieces: the DER helpers against `cryptography`, the store's permissions and
generations. Then `run_identity` end to end (agent subprocess -> client -> files -> bump):
the first SVID published and loadable by `ssl`, bundles kept per ``trust_domains``, rotation
as a new generation, expiry without rotation withdrawing the SVID, and no agent reported
after ``first_fetch_timeout``.
"""

from __future__ import annotations

import json
import os
import ssl
import stat
from functools import partial
from pathlib import Path

import pytest
import trio
from cryptography import x509
from support.wapi_certs import TrustDomain
from support.workload_api_server import WorkloadAPIServer

from weft.identity import IdentitySettings, IdentityStore, read_current, run_identity
from weft.workload_api import WorkloadAPIClient, parse_endpoint
from weft.x509_der import DERError, key_pem, not_after, pem_certificates, split_certificates

WAIT = 15.0


@pytest.fixture(scope="module")
def domains() -> tuple[TrustDomain, TrustDomain]:
    return TrustDomain("example.org"), TrustDomain("other.org")


# -- DER helpers ---------------------------------------------------------------------------------


def test_der_helpers_agree_with_cryptography(domains, tmp_path: Path) -> None:
    example, _ = domains
    svid = example.svid("/web")
    chain = split_certificates(svid.chain + example.bundle)
    assert chain == [svid.chain, example.bundle]
    leaf = x509.load_der_x509_certificate(svid.chain)
    assert not_after(svid.chain) == leaf.not_valid_after_utc.timestamp()
    # The PEM files load into an SSLContext: the key is the leaf's.
    (tmp_path / "c.pem").write_text(pem_certificates(chain))
    (tmp_path / "k.pem").write_text(key_pem(svid.key))
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")


@pytest.mark.parametrize(
    "data", [b"", b"\x02\x01\x00", b"\x30\x05ab", b"\x30\x80\x00\x00", b"\x30"]
)
def test_der_helpers_refuse_what_is_not_a_certificate(data: bytes) -> None:
    with pytest.raises(DERError):
        split_certificates(data)
    with pytest.raises(DERError):
        not_after(data)


# -- the store -----------------------------------------------------------------------------------


def test_the_store_is_private_and_keeps_two_generations(tmp_path: Path) -> None:
    store = IdentityStore.create(tmp_path / "spiffe")
    assert stat.S_IMODE((tmp_path / "spiffe").stat().st_mode) == 0o700
    for i in range(4):
        gen = store.publish({"svid": None}, {"jwt_bundles.json": json.dumps({"n": i}).encode()})
        assert gen == i + 1
    names = sorted(p.name for p in (tmp_path / "spiffe").iterdir())
    assert names == ["current.json", "g3", "g4"]
    for p in (tmp_path / "spiffe").rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600)
    got = read_current(tmp_path / "spiffe")
    assert got is not None and got.generation == 4 and got.chain is None
    # A second store (a respawned identity process) numbers on from the directory.
    assert IdentityStore.create(tmp_path / "spiffe").publish({}, {}) == 5


def test_the_store_refuses_a_directory_others_can_read(tmp_path: Path) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(PermissionError, match="private key"):
        IdentityStore.create(open_dir)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(PermissionError):
        IdentityStore.create(tmp_path / "link")
    assert read_current(tmp_path / "elsewhere") is None


# -- run_identity against the agent ---------------------------------------------------------------


class Bumps:
    def __init__(self) -> None:
        self.generations: list[int] = []

    def __call__(self, generation: int) -> None:
        self.generations.append(generation)

    async def wait(self, n: int) -> None:
        with trio.fail_after(WAIT):
            while len(self.generations) < n:  # noqa: ASYNC110 - a plain callable, no event
                await trio.sleep(0.01)


def _settings(agent: WorkloadAPIServer, **kw: object) -> IdentitySettings:
    return IdentitySettings(parse_endpoint(agent.uri), **kw)  # type: ignore[arg-type]


async def test_the_svid_and_bundles_are_published_and_rotated(
    agent, domains, tmp_path: Path
) -> None:
    example, other = domains
    fed = {other.id: _b64(other.bundle), "../../etc": _b64(other.bundle)}
    jwks = {example.id: example.jwks().decode(), "other.org": other.jwks().decode()}
    # 1. The agent has two SVIDs (weft wants the one hinted "external"), a federated bundle
    # and a hostile bundle key; JWT bundles for both trust domains.
    first = [example.svid("/internal", hint="internal"), example.svid("/web", hint="external")]
    await agent.command("x509", svids=[s.as_json() for s in first], federated=fed)
    await agent.command("jwt", bundles=jwks)
    store = IdentityStore.create(tmp_path / "spiffe")
    bumps = Bumps()
    settings = _settings(agent, svid="external", trust_domains=("example.org", "other.org"))
    async with trio.open_nursery() as nursery:
        await nursery.start(run_identity, settings, store, bumps)
        await bumps.wait(2)  # the X.509 update and the JWT bundles, in either order
        got = read_current(store.directory)
        assert got is not None and got.generation == bumps.generations[-1]
        # 2. The chosen SVID, loadable as it is; the bundles of the two trust domains only.
        assert got.manifest["svid"]["spiffe_id"] == "spiffe://example.org/web"
        assert got.manifest["svid"]["not_after"] == not_after(first[1].chain)
        assert got.chain is not None and got.key is not None
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(got.chain, got.key)
        assert got.chain.read_text() == pem_certificates([first[1].chain])
        assert sorted(got.bundles) == ["example.org", "other.org"]
        assert got.bundles["other.org"].read_text() == pem_certificates([other.bundle])
        assert sorted(got.jwt_bundles) == ["example.org", "other.org"]
        assert got.manifest["problem"] is None and got.manifest["x509_watch"]["connected"]
        # 3. Rotation: a new generation with the new certificate; the previous one stays
        # readable for a worker that was in the middle of it.
        rotated = example.svid("/web", hint="external")
        await agent.command("x509", svids=[rotated.as_json()], federated=fed)
        await bumps.wait(3)
        new = read_current(store.directory)
        assert new is not None and new.generation == got.generation + 1
        assert new.chain is not None and new.chain.read_text() == pem_certificates([rotated.chain])
        assert got.chain.exists()
        nursery.cancel_scope.cancel()
    assert bumps.generations == sorted(bumps.generations)
    assert not any(p.name.startswith("bundle..") for p in store.directory.rglob("*"))


async def test_bundles_outside_trust_domains_are_ignored(agent, domains, tmp_path: Path) -> None:
    example, other = domains
    await agent.command(
        "x509", svids=[example.svid("/web").as_json()], federated={other.id: _b64(other.bundle)}
    )
    store = IdentityStore.create(tmp_path / "spiffe")
    bumps = Bumps()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_identity, _settings(agent), store, bumps)
        await bumps.wait(1)
        nursery.cancel_scope.cancel()
    got = read_current(store.directory)
    assert got is not None and sorted(got.bundles) == ["example.org"]  # its own, by default


async def test_an_expired_svid_is_withdrawn(agent, domains, tmp_path: Path) -> None:
    import datetime

    example, _ = domains
    short = example.svid("/web", lifetime=datetime.timedelta(seconds=2))
    await agent.command("x509", svids=[short.as_json()])
    store = IdentityStore.create(tmp_path / "spiffe")
    bumps = Bumps()
    async with trio.open_nursery() as nursery:
        await nursery.start(run_identity, _settings(agent), store, bumps)
        await bumps.wait(1)
        got = read_current(store.directory)
        assert got is not None and got.chain is not None
        # 1. No rotation comes: at its notAfter the SVID is withdrawn, and the reason said.
        await bumps.wait(2)
        expired = read_current(store.directory)
        assert expired is not None and expired.manifest["svid"] is None and expired.chain is None
        assert "expired" in expired.manifest["problem"]
        assert sorted(expired.bundles) == ["example.org"]  # the bundle still verifies peers
        # 2. A rotation brings it back.
        await agent.command("x509", svids=[example.svid("/web").as_json()])
        await bumps.wait(3)
        back = read_current(store.directory)
        assert back is not None and back.chain is not None and back.manifest["problem"] is None
        nursery.cancel_scope.cancel()


async def test_no_agent_is_reported_after_the_first_fetch_timeout(agent, tmp_path: Path) -> None:
    await agent.command("stop")
    store = IdentityStore.create(tmp_path / "spiffe")
    bumps = Bumps()
    settings = _settings(agent, first_fetch_timeout=0.3)
    client = WorkloadAPIClient(settings.endpoint, backoff_base=0.05, backoff_cap=0.1)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(run_identity, settings, store, bumps, client=client))
        await bumps.wait(1)
        nursery.cancel_scope.cancel()
    got = read_current(store.directory)
    assert got is not None and got.manifest["svid"] is None
    problem = got.manifest["problem"]
    assert "no X.509-SVID from unix://" in problem and "within 0.3s" in problem
    assert "No such file or directory" in problem


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()
