"""Unit tests for weft.config_tls: ``[listeners.tls]`` and ``[destinations.<name>.tls]``.

Each refusal names the file, the key path and the reason; the files are read (and the key
checked against its certificate) when the config is loaded, so a broken pair never reaches a
worker.
"""

from __future__ import annotations

import logging
import ssl

import pytest
from support.certs import CA, mismatched
from support.config import MINIMAL_CONFIG, config_errors, load_text, toml_value

LISTENER = MINIMAL_CONFIG.replace('port = 8080\n', 'port = 8080\n\n[listeners.tls]\n', 1)


@pytest.fixture
def ca(tmp_path):
    return CA(tmp_path / "pki")


def listener_tls(body: str) -> str:
    """The minimal config with `body` as its listener's [listeners.tls] table."""
    return LISTENER.replace("[listeners.tls]\n", "[listeners.tls]\n" + body + "\n", 1)


def certs_line(*entries: dict[str, object]) -> str:
    return f"certificates = {toml_value(list(entries))}"


def entry(pair, names: list[str] | None = None) -> dict[str, object]:
    out: dict[str, object] = {"cert": str(pair.cert), "key": str(pair.key)}
    if names is not None:
        out["server_names"] = names
    return out


def test_a_listener_with_a_default_and_a_named_certificate_loads(ca, tmp_path):
    site, api = ca.leaf("site", ["localhost"]), ca.leaf("api", ["api.example.com"])
    cfg = load_text(tmp_path, listener_tls(
        certs_line(entry(site), entry(api, ["API.example.com", "*.api.example.com"]))
        + '\nmin_version = "1.3"\nalpn = ["h2", "http/1.1"]\nclient_ca = ""'))
    tls = cfg.listeners[0].tls
    assert tls is not None and isinstance(tls.context, ssl.SSLContext)
    assert tls.certificates[1].server_names == ("api.example.com", "*.api.example.com")
    assert tls.min_version == "1.3" and tls.client_ca is None
    assert tls.context.minimum_version is ssl.TLSVersion.TLSv1_3
    assert tls.context.sni_callback is not None  # the switch to the named certificate


def test_timeouts_tls_handshake_defaults_to_10s_and_is_read_as_a_duration(tmp_path):
    assert load_text(tmp_path, MINIMAL_CONFIG).timeouts.tls_handshake == 10.0
    cfg = load_text(tmp_path, MINIMAL_CONFIG + '\n[timeouts]\ntls_handshake = "1500ms"\n')
    assert cfg.timeouts.tls_handshake == 1.5


def test_tls_handshake_cannot_be_set_per_route(tmp_path):
    errors = config_errors(tmp_path, MINIMAL_CONFIG + '\n[routes.timeouts]\ntls_handshake = "1s"\n')
    assert any("routes[0].timeouts.tls_handshake: cannot be set per route" in e for e in errors)


def test_a_missing_certificate_file_names_its_key_path(ca, tmp_path):
    site = ca.leaf("site", ["localhost"])
    errors = config_errors(tmp_path, listener_tls(certs_line(
        {"cert": str(tmp_path / "nope.pem"), "key": str(site.key)})))
    assert len(errors) == 1, errors
    assert "weft.toml: listeners[0].tls.certificates[0].cert: cannot read" in errors[0]
    assert "nope.pem: No such file or directory" in errors[0]


def test_a_key_that_is_not_the_certificates_is_refused_at_the_key(ca, tmp_path):
    bad = mismatched(ca.leaf("site", ["localhost"]), "bad")
    errors = config_errors(tmp_path, listener_tls(certs_line(entry(bad))))
    assert errors == [
        f"{tmp_path / 'weft.toml'}: listeners[0].tls.certificates[0].key: {bad.key} does not "
        f"match the certificate in {bad.cert}"
    ]


def test_a_file_without_a_certificate_is_refused_at_the_cert(ca, tmp_path):
    site = ca.leaf("site", ["localhost"])
    errors = config_errors(tmp_path, listener_tls(certs_line(
        {"cert": str(site.key), "key": str(site.key)})))
    assert errors == [f"{tmp_path / 'weft.toml'}: listeners[0].tls.certificates[0].cert: "
                      f"{site.key} holds no PEM certificate"]


def test_exactly_one_default_certificate_is_required(ca, tmp_path):
    a, b = ca.leaf("a", ["a.example"]), ca.leaf("b", ["b.example"])
    none = config_errors(tmp_path, listener_tls(certs_line(entry(a, ["a.example"]),
                                                           entry(b, ["b.example"]))))
    assert len(none) == 1 and "listeners[0].tls.certificates: one certificate must have no " \
        "server_names" in none[0], none
    two = config_errors(tmp_path, listener_tls(certs_line(entry(a), entry(b))))
    assert len(two) == 1 and "listeners[0].tls.certificates[1]: a second certificate without " \
        "server_names" in two[0], two


def test_a_server_name_listed_twice_is_refused(ca, tmp_path):
    a, b, c = (ca.leaf(n, [f"{n}.example"]) for n in "abc")
    errors = config_errors(tmp_path, listener_tls(certs_line(
        entry(a), entry(b, ["x.example"]), entry(c, ["X.example."]))))
    assert len(errors) == 1 and "listeners[0].tls.certificates[2].server_names: " \
        '"x.example" is already' in errors[0], errors


@pytest.mark.parametrize(("body", "expected"), [
    ('min_version = "1.1"', 'listeners[0].tls.min_version: expected "1.2" or "1.3"'),
    ('alpn = ["spdy/3"]', "listeners[0].tls.alpn: weft does not serve ALPN protocol 'spdy/3'"),
    ('alpn = []', "listeners[0].tls.alpn: expected a non-empty list"),
    ('ciphers = "HIGH"', "listeners[0].tls.ciphers: unknown key"),
    ('client_ca = "/nonexistent/ca.pem"', "listeners[0].tls.client_ca: cannot read"),
])
def test_bad_listener_values_name_their_key(ca, tmp_path, body, expected):
    site = ca.leaf("site", ["localhost"])
    errors = config_errors(tmp_path, listener_tls(certs_line(entry(site)) + "\n" + body))
    assert len(errors) == 1 and expected in errors[0], errors


def test_alpn_h2_is_accepted_but_advertised_only_once_served(ca, tmp_path):
    site = ca.leaf("site", ["localhost"])
    cfg = load_text(tmp_path, listener_tls(certs_line(entry(site)) + '\nalpn = ["h2"]'))
    assert cfg.listeners[0].tls is not None and cfg.listeners[0].tls.alpn == ("h2",)


@pytest.mark.parametrize(("body", "expected"), [
    ("", 'listeners[0].tls: needs "certificates"'),
    ('certificates = [{ cert = "a.pem" }]', 'listeners[0].tls.certificates[0]: needs "key"'),
    ('certificates = [{ cert = "a.pem", key = "a.key", server_names = ["bad name"] }]',
     "listeners[0].tls.certificates[0].server_names[0]: expected a host name"),
    ('certificates = [{ cert = "a.pem", key = "a.key", pem = "x" }]',
     "listeners[0].tls.certificates[0].pem: unknown key"),
])
def test_malformed_certificate_lists_are_refused(tmp_path, body, expected):
    errors = config_errors(tmp_path, listener_tls(body))
    assert any(expected in e for e in errors), errors


# -- [destinations.<name>.tls] ---------------------------------------------------------------


def upstream_tls(body: str) -> str:
    return MINIMAL_CONFIG + "\n[destinations.web.tls]\n" + body + "\n"


def test_upstream_tls_defaults_verify_against_the_system_store(tmp_path):
    cfg = load_text(tmp_path, upstream_tls('ca = ""\nserver_name = ""'))
    tls = cfg.destinations["web"].tls
    assert tls is not None and tls.verify and tls.ca is None and tls.server_name is None
    assert tls.context.verify_mode is ssl.CERT_REQUIRED and tls.context.check_hostname


def test_upstream_tls_with_ca_and_client_certificate_loads(ca, tmp_path):
    client = ca.leaf("client", ["weft"], client=True)
    cfg = load_text(tmp_path, upstream_tls(
        f'ca = "{ca.pem}"\nserver_name = "api.internal"\ncert = "{client.cert}"\n'
        f'key = "{client.key}"'))
    tls = cfg.destinations["web"].tls
    assert tls is not None and tls.server_name == "api.internal" and tls.cert == str(client.cert)


def test_upstream_verify_false_loads_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="weft.config"):
        cfg = load_text(tmp_path, upstream_tls("verify = false"))
    tls = cfg.destinations["web"].tls
    assert tls is not None and tls.context.verify_mode is ssl.CERT_NONE
    assert "destinations.web.tls.verify = false" in caplog.text


@pytest.mark.parametrize(("body", "expected"), [
    ('cert = "/x.pem"', 'destinations.web.tls.cert: needs "key" too'),
    ('ca = "/nonexistent.pem"', "destinations.web.tls.ca: cannot read /nonexistent.pem"),
    ("verify = 1", "destinations.web.tls.verify: expected true or false"),
    ('server_name = "*.example.com"', "destinations.web.tls.server_name: a name to send"),
    ('sni = "x"', "destinations.web.tls.sni: unknown key"),
])
def test_bad_upstream_tls_values_name_their_key(tmp_path, body, expected):
    errors = config_errors(tmp_path, upstream_tls(body))
    assert len(errors) == 1 and expected in errors[0], errors


def test_upstream_client_key_mismatch_is_refused(ca, tmp_path):
    bad = mismatched(ca.leaf("client", ["weft"], client=True), "bad")
    errors = config_errors(tmp_path, upstream_tls(f'cert = "{bad.cert}"\nkey = "{bad.key}"'))
    assert len(errors) == 1 and "destinations.web.tls.key:" in errors[0] \
        and "does not match the certificate" in errors[0], errors
