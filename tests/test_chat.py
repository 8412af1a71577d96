"""`lorachat chat` as a user types it: one-shot --prompt for scripts, and the REPL's commands fed through stdin."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from adapter_factory import tiny_adapters
from lora_chat.cli import main


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return tiny_adapters(tmp_path_factory)


def chat(*args, stdin: str | None = None):
    return CliRunner().invoke(main, ["chat", *map(str, args)], input=stdin)


def test_prompt_prints_only_the_reply_and_exits_0(adapters):
    from lora_chat.runtime import AdapterSet, Request, Sampling, generate

    _, en, sv = adapters
    result = chat(en, sv, "--adapter", "talk-sv", "--prompt", "Hej!", "--max-tokens", "6")
    assert result.exit_code == 0, result.stderr
    rt = AdapterSet.open([en, sv])
    [expected] = generate(rt, [Request("talk-sv", rt.render("talk-sv", [{"role": "user", "content": "Hej!"}]),
                                       Sampling(max_tokens=6))])
    assert result.stdout == expected.text + "\n"  # nothing else on stdout: loading lines go to stderr
    assert "attaching adapter talk-sv" in result.stderr


def test_the_repl_switches_lists_compares_and_routes(adapters):
    _, en, sv = adapters
    script = "\n".join(["/adapters", "/adapter talk-sv", "Hej!", "/compare", "/route on",
                        "How long does a building permit take?", "/adapter nope", "/system Be brief.",
                        "/reset", "/compare", "/quit", "never read"]) + "\n"
    result = chat(en, sv, "--max-tokens", "3", stdin=script)
    assert result.exit_code == 0, result.stderr
    err = result.stderr
    assert "* faq-en  (language en, domain construction)" in err  # the first adapter answers first
    assert "answering with talk-sv" in err
    for name in ("base", "faq-en", "talk-sv"):  # /compare: one panel per resident
        assert name in result.stdout
    assert "[faq-en: the only adapter for en]" in err  # routing said who answered and why
    assert "error: model: no model named 'nope'; loaded: base, faq-en, talk-sv" in err
    assert "conversation cleared" in err and "nothing to compare yet" in err


def test_an_unknown_adapter_is_one_line_and_exit_2(adapters):
    result = chat(adapters[1], "--adapter", "faq-de", "--prompt", "Hallo")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == "error: model: no model named 'faq-de'; loaded: base, faq-en"


def test_routing_needs_an_adapter_that_declares_its_language(adapters):
    result = chat("--base", adapters[0], "--route", "--prompt", "Hej")
    assert result.exit_code == 2
    assert "cannot route: no adapter declares a language" in result.stderr
