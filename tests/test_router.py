"""Routing a message to an adapter: by language among the adapters' languages, then by domain, else the base."""

from __future__ import annotations

import json

import pytest

from adapter_factory import tiny_adapters
from lora_chat.adapters import verify
from lora_chat.adapters.domain import PROFILE, DomainProfile
from lora_chat.errors import LorachatError
from lora_chat.runtime.router import RouteTarget, Router

CONSTRUCTION = ["Hur lång tid tar ett bygglov?", "Behöver jag bygglov för en altan?", "Vad kostar ett bygglov?",
                "Vem ansvarar för kontrollplanen?", "Vad är en kontrollansvarig?"]
SMALLTALK = ["Hej, hur mår du?", "Vad gör du i helgen?", "Gillar du fotboll?", "Vad heter du?", "Hejdå, vi ses!"]


def router(*targets: RouteTarget) -> Router:
    return Router(list(targets))


def test_each_message_goes_to_the_adapter_of_its_language():
    r = router(RouteTarget("faq-en", "en"), RouteTarget("faq-sv", "sv"), RouteTarget("faq-de", "de"))
    assert r.route("How long does a permit take?").adapter == "faq-en"
    assert r.route("Hur lång tid tar det?").adapter == "faq-sv"
    decision = r.route("Wie lange dauert das?")
    assert (decision.adapter, decision.language, decision.reason) == ("faq-de", "de", "the only adapter for de")
    assert decision.language_score > 0.5


def test_declared_languages_are_read_as_iso_codes():
    assert router(RouteTarget("a", "sv-SE")).route("Hur mår du idag?").adapter == "a"


def test_a_message_in_none_of_their_languages_goes_to_the_base():
    decision = router(RouteTarget("faq-en", "en"), RouteTarget("faq-sv", "sv")).route("Как много денег?")
    assert decision.adapter is None
    assert decision.reason.startswith("none of the adapters' languages (en, sv) fits")


def test_adapters_of_one_language_are_told_apart_by_their_domain():
    r = router(RouteTarget("bygg", "sv", DomainProfile.build(CONSTRUCTION)),
               RouteTarget("prat", "sv", DomainProfile.build(SMALLTALK)))
    decision = r.route("Måste jag söka bygglov för ett plank?")
    assert decision.adapter == "bygg" and decision.domain_score > 0.5
    assert decision.reason == "domain, among 2 adapters for sv"
    assert r.route("Hej! Hur mår du i dag?").adapter == "prat"


def test_adapters_of_one_language_without_domain_profiles_leave_it_to_the_base():
    decision = router(RouteTarget("a", "sv"), RouteTarget("b", "sv")).route("Hur lång tid tar ett bygglov?")
    assert decision.adapter is None and "none has a domain profile" in decision.reason


def test_routing_without_any_declared_language_is_an_error():
    with pytest.raises(LorachatError, match="no adapter declares a language"):
        router(RouteTarget("a", None)).route("Hej")


def test_an_unknown_language_code_is_left_out_with_a_note():
    r = router(RouteTarget("a", "klingon"), RouteTarget("b", "en"))
    assert [t.name for t in r.targets] == ["b"] and "klingon" in r.notes[0]


def test_the_decision_header_is_one_ascii_line():
    decision = router(RouteTarget("språk", "sv")).route("Hur mår du idag?")
    header = decision.header()
    assert header.isascii() and "\n" not in header
    assert header.startswith("adapter=spr?k; language=sv; language_score=")


def test_finetune_saves_the_domain_profile_in_the_adapter_and_its_manifest(tmp_path_factory):
    _, en, _ = tiny_adapters(tmp_path_factory)
    manifest = json.loads((en / "manifest.json").read_text())
    assert PROFILE in manifest["files"] and verify(en) == []
    profile = DomainProfile.read(en)
    assert profile.prompts > 0 and profile.counts["w:permit"] == profile.prompts


def test_a_damaged_profile_is_one_line_naming_the_file(tmp_path):
    (tmp_path / PROFILE).write_text('{"format": 1, "counts": [1, 2]}')
    with pytest.raises(LorachatError, match=f"{PROFILE}: unreadable domain profile"):
        DomainProfile.read(tmp_path)
