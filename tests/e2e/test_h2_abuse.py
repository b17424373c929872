"""HTTP/2 abuse: each attack ends its connection with GOAWAY ENHANCE_YOUR_CALM (or the stream
with the right reset) while a well-behaved client on another connection is served throughout.

The attacker is the `h2` library client sending what h2 would send (HEADERS, RST_STREAM) or raw
frames made with hyperframe (what h2 refuses to send: floods, a CONTINUATION chain). Where the
bounds come from is in `weft.http.h2_guard`'s docstring.
"""

from __future__ import annotations

import threading
import time

import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, SettingsFrame
from support import procs
from support.config import base_config, destination, route
from support.h2client import Closed, H2Client

pytestmark = pytest.mark.e2e

CALM = ErrorCodes.ENHANCE_YOUR_CALM


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """One weft for the module; ``client_send_idle`` is short so that stalls end quickly."""
    tmp = tmp_path_factory.mktemp("h2abuse")
    up = procs.start_upstream("abuse", tmp)
    config = (base_config(procs.free_port(), timeouts={"client_send_idle": "1s"})
              + destination("app", [up.address]) + route("app"))
    try:
        proxy = procs.start_weft(tmp, config)
    except BaseException:
        up.stop()
        raise
    yield proxy, up
    try:
        errors = procs.finish([proxy])
    finally:
        up.stop()
    assert not errors, errors
    # every attack was answered by a bound, none by an exception escaping a connection
    assert "Traceback" not in proxy.stderr_text(), proxy.stderr_text()[-3000:]


class WellBehaved:
    """A client looping GETs on its own connection in a thread, for the length of a test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with H2Client(self.port, timeout=5.0) as client:
                while not self._stop.is_set():
                    r = client.request("GET", "/fixed?size=512")
                    if r.status == 200 and len(r.body) == 512:
                        self.ok += 1
                    else:
                        self.failures.append(f"status {r.status}, {len(r.body)} bytes")
                    time.sleep(0.01)
        except Exception as e:
            self.failures.append(repr(e))

    def __enter__(self) -> WellBehaved:
        self._thread.start()
        procs.wait_for(lambda: self.ok >= 3 or self.failures, 10.0, "the good client to start")
        return self

    def __exit__(self, *exc: object) -> None:
        before = self.ok
        procs.wait_for(lambda: self.ok >= before + 3 or self.failures, 10.0,
                       "the good client to be served after the attack")
        self._stop.set()
        self._thread.join(10.0)
        assert not self.failures, self.failures


def _calmed(proxy, client: H2Client, what: str) -> None:
    """The attacker's connection ended with GOAWAY ENHANCE_YOUR_CALM, and weft said why."""
    goaway = client.wait_closed(timeout=10.0)
    assert goaway is not None and goaway[0] == CALM, goaway
    procs.wait_for(lambda: what in proxy.stderr_text(), 5.0, f"{what!r} in weft's log")


def test_rapid_reset_is_bounded_and_closed_with_enhance_your_calm(proxied):
    proxy, _ = proxied
    with WellBehaved(proxy.port), H2Client(proxy.port) as attacker:
        try:
            for _ in range(40):
                for _ in range(100):
                    sid = attacker.start("GET", "/slow?delay=5")
                    attacker.conn.reset_stream(sid)
                attacker.flush()
        except (Closed, OSError):
            pass
        _calmed(proxy, attacker, "reset flood")


def _established(port: int) -> int:
    """Established TCP connections whose local port is `port` (the upstream's side)."""
    count = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


def test_a_reset_stream_cancels_its_upstream_request(proxied):
    proxy, up = proxied
    with H2Client(proxy.port) as client:
        base = up.stats()
        sids = [client.start("GET", "/slow?delay=20") for _ in range(4)]
        procs.wait_for(lambda: up.stats()["requests"] >= base["requests"] + 4, 5.0,
                       "the upstream to get the four requests")
        assert _established(up.port) >= 4
        for sid in sids:
            client.conn.reset_stream(sid, ErrorCodes.CANCEL)
        client.flush()
        # weft abandons each exchange at once: it closes the four upstream connections (the
        # upstream's threads sleep on; their sockets are left half-closed, CLOSE_WAIT)
        procs.wait_for(lambda: _established(up.port) == 0, 5.0,
                       "the upstream connections of the reset streams to close")
        # and the connection goes on serving
        assert client.request("GET", "/fixed?size=10").status == 200


def test_a_continuation_flood_is_bounded_while_it_arrives(proxied):
    proxy, _ = proxied
    with WellBehaved(proxy.port), H2Client(proxy.port) as attacker:
        head = attacker.conn.encoder.encode([(b":method", b"GET"), (b":scheme", b"http"),
                                             (b":authority", b"x"), (b":path", b"/")])
        attacker.send_raw(HeadersFrame(1, data=head).serialize())  # no END_HEADERS
        junk = b"x-junk: " + b"a" * 15000
        try:
            for _ in range(60):  # ~900 KB: h2 alone would hold it all before deciding
                attacker.send_raw(ContinuationFrame(1, data=junk).serialize())
        except OSError:
            pass
        _calmed(proxy, attacker, "header block over")


def test_a_ping_flood_is_closed(proxied):
    proxy, _ = proxied
    with WellBehaved(proxy.port), H2Client(proxy.port) as attacker:
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        try:
            attacker.send_raw(ping * 5000)
        except OSError:
            pass
        _calmed(proxy, attacker, "ping flood")


def test_a_settings_flood_is_closed(proxied):
    proxy, _ = proxied
    with WellBehaved(proxy.port), H2Client(proxy.port) as attacker:
        settings = SettingsFrame(0, settings={SettingCodes.ENABLE_PUSH: 0}).serialize()
        try:
            attacker.send_raw(settings * 500)
        except OSError:
            pass
        _calmed(proxy, attacker, "settings flood")


def test_an_empty_data_flood_is_closed(proxied):
    proxy, _ = proxied
    with WellBehaved(proxy.port), H2Client(proxy.port) as attacker:
        sid = attacker.start("POST", "/sink", end=False)
        try:
            attacker.send_raw(DataFrame(sid, data=b"").serialize() * 500)
        except OSError:
            pass
        _calmed(proxy, attacker, "empty_data flood")


def test_a_stream_whose_window_never_opens_is_reset_after_client_send_idle(proxied):
    proxy, _ = proxied
    with WellBehaved(proxy.port), H2Client(
        proxy.port, settings={SettingCodes.INITIAL_WINDOW_SIZE: 0}
    ) as stalled:
        start = time.monotonic()
        r = stalled.request("GET", "/fixed?size=1000")
        assert r.status == 200 and not r.body
        assert r.reset == ErrorCodes.CANCEL
        assert 0.8 < time.monotonic() - start < 5.0
        # the connection itself is fine: a body-less answer still comes
        assert stalled.request("HEAD", "/fixed?size=1000").status == 200


def test_a_connection_whose_window_never_opens_is_closed_with_enhance_your_calm(proxied):
    proxy, _ = proxied
    with WellBehaved(proxy.port), H2Client(proxy.port, auto_ack=False) as stalled:
        stalled.start("GET", f"/fixed?size={200_000}")
        _calmed(proxy, stalled, "connection window closed")


def test_a_client_cannot_grow_the_servers_hpack_table(proxied):
    """The client allows our encoder a 2 GiB table; weft's stays at 4096 bytes."""
    proxy, _ = proxied
    with H2Client(proxy.port, settings={SettingCodes.HEADER_TABLE_SIZE: 2**31 - 1}) as client:
        for i in range(20):
            r = client.request("GET", f"/echo?i={i}")
            assert r.status == 200
        table = client.conn.decoder.header_table
        assert table.maxsize <= 4096, table.maxsize
        assert table._current_size <= 4096


def test_an_hpack_bomb_is_closed_with_enhance_your_calm(proxied):
    """A small header block that decodes to megabytes (one 4 KB entry referenced over and
    over) ends the connection before it is decoded whole."""
    proxy, _ = proxied
    with WellBehaved(proxy.port), H2Client(proxy.port) as attacker:
        big = [(b"x-bomb", b"b" * 4000)] * 200  # 800 KB decoded, ~4 KB encoded
        try:
            attacker.start("GET", "/echo", headers=big)
        except (Closed, OSError):
            pass
        _calmed(proxy, attacker, "ENHANCE_YOUR_CALM")
