"""The access log's lines (`weft.accesslog`): the fields a request leaves, read back as JSON
from the file the log writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from weft.accesslog import AccessLog
from weft.http.messages import BytesBody, Headers, Request, Response
from weft.spiffe_id import SpiffeId

CLIENT = ("192.0.2.7", 41000)


def request(**ctx: Any) -> Request:
    r = Request("GET", "/x", Headers([(b"host", b"h")]), BytesBody(b""), request_id="rid")
    r.ctx.update(ctx)
    return r


def lines(tmp_path: Path, *requests: Request | None) -> list[dict[str, Any]]:
    """The records of `requests` (None: refused before its head was parsed), as written."""
    log = AccessLog(str(tmp_path / "access.log"))
    log.open()
    for r in requests:
        log.record(r, Response.text(200, "ok\n"), None, CLIENT, 0.001)
    log.close()
    return [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]


def test_the_principal_is_logged_in_its_spiffe_form_and_null_without_one(tmp_path):
    peer = SpiffeId("example.org", "/ns/prod/frontend")
    with_id, without, unparsed = lines(tmp_path, request(principal=peer), request(), None)
    assert with_id["principal"] == "spiffe://example.org/ns/prod/frontend"
    assert with_id["client"] == "192.0.2.7:41000" and with_id["request_id"] == "rid"
    # absent is null, as every optional field of the log (error, grpc_status, route)
    assert without["principal"] is None and without["error"] is None
    assert unparsed["principal"] is None and unparsed["method"] is None


def test_the_principal_is_the_one_left_in_ctx_by_the_chain(tmp_path):
    # The adapter sets the peer; jwt_svid replaces it with the token's subject: the log says
    # whichever the chain ended with, not the transport's peer.
    r = request(
        peer_id=SpiffeId("example.org", "/frontend"), principal=SpiffeId("example.org", "/batch")
    )
    (line,) = lines(tmp_path, r)
    assert line["principal"] == "spiffe://example.org/batch"
