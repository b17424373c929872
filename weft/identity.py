"""The identity process's work: one Workload API connection per host, published to the workers.

Operators want one Workload API stream per host, not one per worker, so one process (forked by
the supervisor like the admin process, and respawned like it) runs the watches of
`weft.workload_api` and publishes what they deliver; workers only read it. This module is that
process's main loop (`run_identity`) and the published format (`IdentityStore` writes,
`read_current` reads), with the generation counter passed in as a callable (`bump`), so that
it runs and is tested without the supervisor.

**The published directory** (on tmpfs, e.g. ``/dev/shm/weft.<instance>.spiffe/``, mode 0700,
files 0600: it holds a private key) holds one subdirectory per generation and a manifest::

    current.json            {"generation": 7, "dir": "g7", "svid": {...}, "bundles": {...}, ...}
    g7/svid.pem             the selected X.509-SVID's chain, leaf first
    g7/key.pem              its PKCS#8 key
    g7/bundle.<td>.pem      the X.509 bundle of each trust domain kept
    g7/jwt_bundles.json     {"<td>": <JWKS>} for the trust domains kept

A generation's files are written first, then ``current.json`` is replaced (``rename``, atomic),
then `bump` is called with the generation: a worker that sees a new number reads the manifest
and then the files of the generation it names, so it never mixes one SVID's chain with another
one's key. Only the current and the previous generations are kept: a reader that finds its
generation gone reads the manifest again (`read_current` does, a bounded number of times).

**What is published** on every change (an update equal to the last one is not a change:
agents resend their whole state, and each publication makes every worker rebuild its TLS
contexts): a new X.509 update (the SVID chosen by ``svid``, else
the first, spec §5.2.1; bundles of weft's own trust domain and of those in
``trust_domains`` only), new JWT
bundles, and the two events workers must act on without an update: no SVID after
``first_fetch_timeout`` (``problem`` says why: the last error of the watch, e.g. "cannot
connect to unix:///run/spire/agent.sock: No such file or directory"), and the SVID's expiry
with no rotation (the SVID is withdrawn: a worker never serves an expired certificate; it is
not READY until a new one comes). A failed watch (PERMISSION_DENIED, agent gone) withdraws
nothing by itself (see `weft.workload_api` on why): the SVID stays until it expires.

Trust-domain names and SPIFFE IDs are strings here; the checks of their syntax are the
spiffe-verify branch's (`weft.spiffe_id`), to be used here once merged. A trust domain used in
a file name must match `_TD_NAME` (the SPIFFE ID spec's characters), so a hostile bundle key
cannot name a path outside the directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from weft.spiffe_wire import JWTBundlesResponse, WireError, X509SVIDResponse
from weft.workload_api import Endpoint, WorkloadAPIClient
from weft.x509_der import DERError, key_pem, not_after, pem_certificates, split_certificates

__all__ = [
    "IdentitySettings",
    "IdentityStore",
    "Published",
    "read_current",
    "run_identity",
    "select_svid",
    "trust_domain_of",
]

log = logging.getLogger("weft.identity")

MANIFEST = "current.json"
_TD_NAME = re.compile(r"^[a-z0-9._-]{1,255}$")  # SPIFFE-ID spec §2.1: trust domain characters
READ_ATTEMPTS = 5  # manifest re-reads when a generation vanished under the reader


@dataclass(frozen=True)
class IdentitySettings:
    """The ``[spiffe]`` settings the identity process uses."""

    endpoint: Endpoint
    svid: str = ""  # a SPIFFE ID or a hint; "" is the first SVID
    trust_domains: tuple[str, ...] = ()  # besides the selected SVID's own trust domain
    first_fetch_timeout: float = 10.0


def iso_time(t: float) -> str:
    """A Unix time as the logs write it (UTC, ISO 8601)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def trust_domain_of(spiffe_id_or_td: str) -> str:
    """``spiffe://example.org/web`` or ``spiffe://example.org`` or ``example.org`` ->
    ``example.org`` (bundle map keys come in either form)."""
    rest = spiffe_id_or_td.removeprefix("spiffe://")
    return rest.split("/", 1)[0].lower()


def select_svid(resp: X509SVIDResponse, selector: str) -> int | None:
    """The index of the SVID to use: the first whose SPIFFE ID or hint is `selector` (the first
    of equal hints, spec §5.2.1), or the first SVID when `selector` is empty."""
    if not selector:
        return 0 if resp.svids else None
    for i, s in enumerate(resp.svids):
        if selector in (s.spiffe_id, s.hint):
            return i
    return None


# -- writing ------------------------------------------------------------------------------------


class IdentityStore:
    """The published directory, as its one writer (the identity process) keeps it."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.generation = 0

    @classmethod
    def create(cls, directory: Path) -> IdentityStore:
        """Make `directory` (mode 0700), or take it over if it is ours already: a directory,
        not a symlink, owned by this user, closed to group and others. Anything else raises
        PermissionError naming the path (it would hold the private key). Old generations left
        by a previous process are removed; the numbering goes on from theirs."""
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            st = directory.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise PermissionError(
                    f"{directory}: exists and is not a private directory of this user "
                    "(it will hold the SVID's private key)"
                ) from None
        store = cls(directory)
        for p in directory.iterdir():
            if p.is_dir() and p.name.startswith("g") and p.name[1:].isdigit():
                store.generation = max(store.generation, int(p.name[1:]))
        return store

    def publish(self, manifest: dict[str, Any], files: dict[str, bytes]) -> int:
        """Write `files` as a new generation, then the manifest naming it; the generation.
        Raises OSError (a full tmpfs): the previous generation stays current."""
        self.generation += 1
        name = f"g{self.generation}"
        gen_dir = self.directory / name
        gen_dir.mkdir(mode=0o700)
        for filename, data in files.items():
            _write_private(gen_dir / filename, data)
        manifest = {**manifest, "generation": self.generation, "dir": name}
        tmp = self.directory / f".{MANIFEST}.{self.generation}"
        _write_private(tmp, json.dumps(manifest, indent=1, sort_keys=True).encode())
        os.replace(tmp, self.directory / MANIFEST)
        for p in self.directory.iterdir():
            if p.name.startswith("g") and p.name[1:].isdigit():
                if int(p.name[1:]) < self.generation - 1:
                    shutil.rmtree(p, ignore_errors=True)
        return self.generation


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


# -- reading (workers, status) ------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    """One generation as a reader sees it. `chain` and `key` are the paths to give
    `ssl.SSLContext.load_cert_chain` (None without a usable SVID)."""

    generation: int
    manifest: dict[str, Any]
    chain: Path | None
    key: Path | None
    bundles: dict[str, Path] = field(default_factory=dict)  # trust domain -> PEM file
    jwt_bundles: dict[str, Any] = field(default_factory=dict)  # trust domain -> JWKS


def read_current(directory: Path) -> Published | None:
    """The current generation, or None before the first one. A generation removed while it
    was being read (two newer ones were published meanwhile) is retried from the manifest.
    Raises OSError or ValueError for a directory that is not one `IdentityStore` wrote."""
    for _ in range(READ_ATTEMPTS):
        try:
            manifest = json.loads((directory / MANIFEST).read_bytes())
        except FileNotFoundError:
            return None
        gen_dir = directory / manifest["dir"]
        try:
            jwt = manifest.get("jwt_bundles")
            jwt_bundles = json.loads((gen_dir / jwt).read_bytes()) if jwt else {}
            svid = manifest.get("svid")
            chain = key = None
            if svid is not None:
                chain, key = gen_dir / svid["chain"], gen_dir / svid["key"]
                if not (chain.exists() and key.exists()):
                    continue
            bundles = {td: gen_dir / f for td, f in manifest.get("bundles", {}).items()}
        except FileNotFoundError:
            continue
        return Published(manifest["generation"], manifest, chain, key, bundles, jwt_bundles)
    raise OSError(f"{directory}: the identity changed {READ_ATTEMPTS} times while read")


# -- the main loop ------------------------------------------------------------------------------


class _Identity:
    """What the process holds between updates, and how it turns it into a publication."""

    def __init__(
        self,
        settings: IdentitySettings,
        store: IdentityStore,
        client: WorkloadAPIClient,
        bump: Callable[[int], None],
        clock: Callable[[], float],
    ) -> None:
        self.settings, self.store, self.client = settings, store, client
        self.bump, self.clock = bump, clock
        self.x509: X509SVIDResponse | None = None
        self.jwt: JWTBundlesResponse | None = None
        self.expires: float | None = None  # the selected SVID's leaf notAfter
        self.problem: str | None = None
        self.changed = trio.Event()  # the expiry watcher's wake-up

    def kept(self, td: str, own: str | None) -> bool:
        """weft's own trust domain, and those of ``trust_domains``; any other bundle the
        agent sends is ignored."""
        return (td == own or td in self.settings.trust_domains) and bool(_TD_NAME.match(td))

    def publish(self) -> None:
        manifest: dict[str, Any] = {
            "endpoint": self.settings.endpoint.uri,
            "svid": None,
            "bundles": {},
            "jwt_bundles": None,
            "updated": self.clock(),
            "x509_watch": self.client.x509_state.as_dict(),
            "jwt_watch": self.client.jwt_state.as_dict(),
        }
        files: dict[str, bytes] = {}
        own: str | None = None
        x = self.x509
        index = select_svid(x, self.settings.svid) if x is not None else None
        if x is not None and index is None:
            self.problem = f"no SVID matches svid = {self.settings.svid!r}"
        if x is not None and index is not None and self.expires is not None:
            s = x.svids[index]
            own = trust_domain_of(s.spiffe_id)
            if self.expires > self.clock():
                chain = split_certificates(s.x509_svid)
                files["svid.pem"] = pem_certificates(chain).encode()
                files["key.pem"] = key_pem(s.x509_svid_key).encode()
                manifest["svid"] = {
                    "spiffe_id": s.spiffe_id,
                    "hint": s.hint,
                    "not_after": self.expires,
                    "chain": "svid.pem",
                    "key": "key.pem",
                }
            bundles = {own: s.bundle}
            for key, der in x.federated_bundles.items():
                bundles.setdefault(trust_domain_of(key), der)
            for td, der in sorted(bundles.items()):
                if self.kept(td, own):
                    name = f"bundle.{td}.pem"
                    files[name] = pem_certificates(split_certificates(der)).encode()
                    manifest["bundles"][td] = name
        if self.jwt is not None:
            jwks = {
                trust_domain_of(k): json.loads(v)
                for k, v in self.jwt.bundles.items()
                if self.kept(trust_domain_of(k), own)
            }
            files["jwt_bundles.json"] = json.dumps(jwks, sort_keys=True).encode()
            manifest["jwt_bundles"] = "jwt_bundles.json"
        manifest["problem"] = self.problem
        generation = self.store.publish(manifest, files)
        self.bump(generation)

    def on_x509(self, resp: X509SVIDResponse) -> None:
        if resp == self.x509:
            return  # the agent sent the same state again: no rebuild in the workers
        index = select_svid(resp, self.settings.svid)
        expires: float | None = None
        try:
            if index is not None:
                leaf = split_certificates(resp.svids[index].x509_svid)[0]
                expires = not_after(leaf)
                key_pem(resp.svids[index].x509_svid_key)  # a key that does not load: discarded
            for s in resp.svids:
                split_certificates(s.bundle)
        except (DERError, ValueError) as e:
            log.error("spiffe: discarded an X.509 update with unreadable DER: %s", e)
            return
        self.x509 = resp
        self.expires = expires
        self.problem = None
        self.publish()
        self.changed.set()
        self.changed = trio.Event()

    def on_jwt(self, resp: JWTBundlesResponse) -> None:
        if resp == self.jwt:
            return
        try:
            for v in resp.bundles.values():
                json.loads(v)
        except ValueError as e:
            log.error("spiffe: discarded JWT bundles that are not JSON: %s", e)
            return
        self.jwt = resp
        self.publish()

    def on_error(self, watch: str, error: Exception) -> None:
        level = logging.DEBUG if isinstance(error, WireError) else logging.WARNING
        uri = self.settings.endpoint.uri
        log.log(level, "spiffe: Workload API at %s, %s watch: %s", uri, watch, error)

    async def first_fetch(self) -> None:
        """Report, once, an SVID that did not come within ``first_fetch_timeout``."""
        await trio.sleep(self.settings.first_fetch_timeout)
        if self.x509 is None:
            why = self.client.x509_state.last_error or "the agent sent nothing"
            self.problem = (
                f"no X.509-SVID from {self.settings.endpoint.uri} within "
                f"{self.settings.first_fetch_timeout:g}s: {why}"
            )
            log.error("spiffe: %s (workers are not ready)", self.problem)
            self.publish()

    async def expiry(self) -> None:
        """Withdraw the SVID when it expires without a rotation."""
        while True:
            changed = self.changed
            left = math.inf if self.expires is None else self.expires - self.clock()
            if left <= 0 and self.x509 is not None:
                self.problem = (
                    f"the X.509-SVID expired at {iso_time(self.expires)} and the agent "
                    f"sent no new one (last error: {self.client.x509_state.last_error})"
                )
                log.error("spiffe: %s; workers are not ready", self.problem)
                self.publish()  # without the SVID: `publish` never writes an expired one
                left = math.inf  # until the next update
            with trio.move_on_after(left):
                await changed.wait()


async def run_identity(
    settings: IdentitySettings,
    store: IdentityStore,
    bump: Callable[[int], None],
    *,
    client: WorkloadAPIClient | None = None,
    clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watch the Workload API and publish every change into `store`, calling `bump` with each
    new generation, until cancelled. Raises `weft.workload_api.WatchStopped` when a watch hits
    a stop condition (the process then exits and the supervisor's backoff respawns it)."""
    client = client or WorkloadAPIClient(settings.endpoint)
    identity = _Identity(settings, store, client, bump, clock)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.watch_x509, identity.on_x509, partial(identity.on_error, "X.509"))
        nursery.start_soon(
            client.watch_jwt_bundles, identity.on_jwt, partial(identity.on_error, "JWT bundle")
        )
        nursery.start_soon(identity.first_fetch)
        nursery.start_soon(identity.expiry)
        task_status.started()
