"""Unit tests for weft.authorize: the allow-list decision over parsed SPIFFE IDs."""

from __future__ import annotations

from weft.authorize import FORBIDDEN, NO_IDENTITY, admits, decide
from weft.schema import AuthorizeRule
from weft.spiffe_id import PathPrefix, SpiffeId

P = SpiffeId.parse
RULE = AuthorizeRule(
    allow_ids=frozenset({P("spiffe://example.org/frontend")}),
    allow_trust_domains=frozenset({"partner.example"}),
    allow_path_prefixes=(PathPrefix.parse("spiffe://example.org/ns/prod/"),),
)


def test_each_list_admits_on_its_own():
    for sid in (
        "spiffe://example.org/frontend",
        "spiffe://partner.example/anything/at/all",
        "spiffe://partner.example",
        "spiffe://example.org/ns/prod/web",
    ):
        assert admits(RULE, P(sid)), sid


def test_ids_are_compared_parsed_and_case_sensitive_in_the_path():
    for sid in (
        "spiffe://example.org/Frontend",
        "spiffe://example.org/frontend/x",
        "spiffe://example.org/ns/production",
        "spiffe://example.org/ns/prod",
        "spiffe://partner.example.evil/x",
        "spiffe://sub.partner.example/x",
    ):
        assert not admits(RULE, P(sid)), sid


def test_a_route_without_rules_admits_everyone_even_without_identity():
    assert decide((), None).allowed


def test_no_identity_is_refused_with_its_own_reason():
    d = decide((RULE,), None)
    assert not d.allowed and d.reason == NO_IDENTITY


def test_a_principal_outside_every_entry_is_forbidden_and_any_entry_may_admit():
    other = AuthorizeRule(allow_ids=frozenset({P("spiffe://example.org/batch")}))
    d = decide((RULE, other), P("spiffe://example.org/cron"))
    assert not d.allowed and d.reason == FORBIDDEN
    assert "spiffe://example.org/cron" in d.detail
    d = decide((RULE, other), P("spiffe://example.org/batch"))
    assert d.allowed and "authorize[1]" in d.detail
