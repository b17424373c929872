"""Unit tests for weft.spiffe_id: the SPIFFE-ID standard's parsing rules, checked against the
``spiffe`` package as an oracle, and the segment-wise path-prefix matching."""

from __future__ import annotations

import pytest
from spiffe import SpiffeId as OracleId

from weft.spiffe_id import PathPrefix, SpiffeId, SpiffeIdError, parse_trust_domain

VALID = [
    "spiffe://example.org",
    "spiffe://example.org/workload",
    "spiffe://example.org/ns/prod/sa/web",
    "spiffe://a-b_c.d0/A.b-C_9",
    "spiffe://example.org/..a/a..",  # dots inside a segment are letters
    "spiffe://1.2.3.4/x",  # an IP-looking trust domain is a name like any other
]
INVALID = [
    ("", "empty"),
    ("example.org/workload", "must start"),
    ("http://example.org/workload", "must start"),
    ("spiffe:/example.org", "must start"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///path", "trust domain is missing"),
    ("spiffe://example.org/", "end with '/'"),
    ("spiffe://example.org/a/", "end with '/'"),
    ("spiffe://example.org//a", "empty segments"),
    ("spiffe://example.org/a//b", "empty segments"),
    ("spiffe://example.org/./a", "'.' or '..'"),
    ("spiffe://example.org/a/..", "'.' or '..'"),
    ("spiffe://example.org/a%20b", "no percent-encoding"),
    ("spiffe://example.org/a?x=1", "query or fragment"),
    ("spiffe://example.org/a#frag", "query or fragment"),
    ("spiffe://example.org:8443/a", "port"),
    ("spiffe://user@example.org/a", "userinfo"),
    ("spiffe://exa mple.org/a", "lowercase letters"),
    ("spiffe://example.org/a b", "characters are limited"),
    ("spiffe://example.org/caf\u00e9", "non-ASCII"),
    ("spiffe://example.org/a+b", "characters are limited"),
]
# The spec (and go-spiffe) refuse these; the `spiffe` package accepts and lowers them.
ORACLE_LENIENT = [
    ("spiffe://Example.org/a", "lower case"),
    ("SPIFFE://example.org/a", "lower case"),
]


@pytest.mark.parametrize("s", VALID)
def test_valid_ids_parse_and_print_back_as_written(s):
    sid = SpiffeId.parse(s)
    assert str(sid) == s
    assert str(OracleId(s)) == s  # the oracle agrees


@pytest.mark.parametrize(("s", "why"), INVALID)
def test_invalid_ids_are_refused_with_the_rule_they_break(s, why):
    with pytest.raises(SpiffeIdError, match=why.replace("(", r"\(").replace("?", r"\?")):
        SpiffeId.parse(s)
    with pytest.raises(Exception):  # noqa: B017 - the oracle's own error types
        OracleId(s)


@pytest.mark.parametrize(("s", "why"), ORACLE_LENIENT)
def test_upper_case_scheme_or_trust_domain_is_refused_where_the_oracle_lowers_it(s, why):
    with pytest.raises(SpiffeIdError, match=why):
        SpiffeId.parse(s)
    assert str(OracleId(s)) == s.lower()  # the oracle lowers scheme and trust domain


def test_the_error_is_a_value_error():
    assert issubclass(SpiffeIdError, ValueError)


def test_length_limits_follow_the_spec():
    td = "a" * 255
    assert SpiffeId.parse(f"spiffe://{td}/x").trust_domain == td
    with pytest.raises(SpiffeIdError, match="at most 255"):
        SpiffeId.parse(f"spiffe://{'a' * 256}/x")
    at_limit = "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/"))
    assert len(SpiffeId.parse(at_limit).path) > 2000
    with pytest.raises(SpiffeIdError, match="at most 2048"):
        SpiffeId.parse(at_limit + "a")


def test_parsed_ids_compare_by_trust_domain_and_case_sensitive_path():
    assert SpiffeId.parse("spiffe://example.org/api") == SpiffeId("example.org", "/api")
    assert SpiffeId.parse("spiffe://example.org/api") != SpiffeId.parse("spiffe://example.org/API")
    assert len({SpiffeId.parse("spiffe://example.org/a"), SpiffeId("example.org", "/a")}) == 1
    assert SpiffeId.parse("spiffe://example.org").segments == ()
    assert SpiffeId.parse("spiffe://example.org/ns/web").segments == ("ns", "web")


def test_trust_domains_parse_as_names_or_ids():
    assert parse_trust_domain("example.org") == "example.org"
    assert parse_trust_domain("spiffe://example.org") == "example.org"
    for bad, why in [
        ("spiffe://example.org/x", "has no path"),
        ("Example.org", "lower case"),
        ("example.org:443", "port"),
        ("", "missing"),
    ]:
        with pytest.raises(SpiffeIdError, match=why):
            parse_trust_domain(bad)


def test_a_path_prefix_matches_segment_wise_and_strictly_below():
    p = PathPrefix.parse("spiffe://example.org/ns/prod/")
    assert str(p) == "spiffe://example.org/ns/prod/"
    for yes in ("spiffe://example.org/ns/prod/web", "spiffe://example.org/ns/prod/web/v2"):
        assert p.matches(SpiffeId.parse(yes)), yes
    for no in (
        "spiffe://example.org/ns/production",
        "spiffe://example.org/ns/prod",
        "spiffe://example.org/ns",
        "spiffe://other.org/ns/prod/web",
        "spiffe://example.org/NS/prod/web",
    ):
        assert not p.matches(SpiffeId.parse(no)), no


def test_the_root_prefix_matches_every_workload_of_its_domain():
    p = PathPrefix.parse("spiffe://example.org/")
    assert p.matches(SpiffeId.parse("spiffe://example.org/x"))
    assert not p.matches(SpiffeId.parse("spiffe://example.org"))


def test_a_prefix_without_its_trailing_slash_is_refused():
    with pytest.raises(SpiffeIdError, match='ends with "/"'):
        PathPrefix.parse("spiffe://example.org/ns/prod")
    with pytest.raises(SpiffeIdError, match="empty segments"):
        PathPrefix.parse("spiffe://example.org/ns//")
