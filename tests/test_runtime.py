"""The runtime: one base, adapters by name, mixed-adapter batches streamed, on the tiny model.

Adapters are trained here with `lorachat finetune`, as users make them.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from adapter_factory import DISTINCT, finetune_adapter, layered
from conftest import chat, sample_rows
from lora_chat.errors import LorachatError
from lora_chat.runtime import BASE, AdapterSet, Request, Sampling, generate, stream

QUESTIONS = ["Hi", "How long does a building permit take in the municipality?", "Vad är bygglov?",
             "What is a building permit?", "Hello! How can I help you today?"]

# A template of its own (plain "Q:/A:" turns) so the test can tell the adapter's stored template from the base's.
PLAIN = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
         "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-adapters")
    plain = root / "plain.jinja"
    plain.write_text(PLAIN, encoding="utf-8")
    hello = [chat(f"Hello {i}!", f"Hello! How can I help you today? ({i})") for i in range(12)]
    return {"faq": finetune_adapter(root, "faq-en", tiny_base, sample_rows(12), **DISTINCT),
            "hello": finetune_adapter(root, "hello-en", tiny_base, hello,
                                      **layered(DISTINCT, {"training": {"seed": 7}, "template": {"file": str(plain)}}))}


@pytest.fixture(scope="module")
def rt(trained) -> AdapterSet:
    """Shared by the tests that only read it (none loads or unloads)."""
    return AdapterSet.open([trained["faq"], trained["hello"]])


def ask(rt: AdapterSet, name: str, question: str, **sampling) -> Request:
    return Request(name, rt.render(name, [{"role": "user", "content": question}]),
                   Sampling(**{"max_tokens": 8, **sampling}))


def test_each_adapter_is_resident_by_name_with_its_own_template(rt):
    assert rt.names == [BASE, "faq-en", "hello-en"]
    messages = [{"role": "user", "content": "Hi"}]
    assert rt.render("hello-en", messages) == "user: Hi<|im_end|>\nassistant:"  # its chat_template.jinja
    assert rt.render("faq-en", messages) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert rt.get("faq-en").language == "en" and rt.get("faq-en").domain == "construction"


def test_a_conversation_without_an_assistant_turn_renders_with_the_generation_prompt(rt):
    prompt = rt.render(BASE, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>assistant\n")


def test_rows_of_different_adapters_in_one_batch_answer_as_each_would_alone(rt):
    requests = [ask(rt, name, q) for q in QUESTIONS for name in rt.names]
    together = generate(rt, requests)
    alone = [generate(rt, [r])[0] for r in requests]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    # ...and the adapters really are in play: the three models do not all answer alike.
    per_model = {name: [c.token_ids for r, c in zip(requests, together) if r.model == name] for name in rt.names}
    assert per_model["faq-en"] != per_model[BASE] and per_model["hello-en"] != per_model[BASE]


def test_streamed_deltas_add_up_to_the_reply_and_end_with_a_finish_reason(rt):
    requests = [ask(rt, "faq-en", "Hi", max_tokens=6), ask(rt, BASE, "What is a building permit?", max_tokens=3)]
    finished = generate(rt, requests)
    texts, reasons, counts = ["", ""], [None, None], [0, 0]
    for delta in stream(rt, requests):
        assert reasons[delta.row] is None, "no delta after a row's last"
        texts[delta.row] += delta.text
        reasons[delta.row] = delta.finish_reason
        counts[delta.row] = delta.completion_tokens
    assert texts == [c.text for c in finished]
    assert reasons == ["length", "length"] and counts == [c.completion_tokens for c in finished] == [6, 3]


def test_a_stop_string_ends_the_reply_before_it(rt):
    [free] = generate(rt, [ask(rt, "faq-en", "Hi", max_tokens=12)])
    stop = free.text[3:5]
    assert stop.strip(), f"reply too short to cut: {free.text!r}"
    [cut] = generate(rt, [ask(rt, "faq-en", "Hi", max_tokens=12, stop=(stop,))])
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]


def test_the_stop_token_ends_a_reply_with_finish_reason_stop(rt):
    # The tiny base's eos is <|im_end|>; forbid nothing, just look for a row that emits it within 40 tokens.
    requests = [ask(rt, name, q, max_tokens=40) for q in QUESTIONS for name in rt.names]
    done = generate(rt, requests)
    stops = [c for c in done if c.finish_reason == "stop"]
    for c in stops:
        assert c.token_ids[-1] in rt.get(BASE).stop_ids and "<|im_end|>" not in c.text
    assert all(c.finish_reason == "length" and c.completion_tokens == 40 for c in done if c not in stops)


def test_seeded_sampling_repeats_itself_and_does_not_depend_on_the_batch(rt):
    one = ask(rt, "hello-en", "Hi", max_tokens=10, temperature=1.0, seed=5)
    other = ask(rt, "faq-en", "What is a building permit?", max_tokens=10, temperature=1.0, seed=6)
    alone = generate(rt, [one])[0].token_ids
    assert generate(rt, [other, one])[1].token_ids == alone
    assert generate(rt, [ask(rt, "hello-en", "Hi", max_tokens=10, temperature=1.0, seed=9)])[0].token_ids != alone


def test_concurrent_callers_each_get_their_own_adapter(rt):
    """Two threads asking different adapters at once get what each gets alone (nothing global flips)."""
    requests = {name: ask(rt, name, "What is a building permit?", max_tokens=10) for name in ("faq-en", "hello-en")}
    expected = {name: generate(rt, [r])[0].token_ids for name, r in requests.items()}
    got: dict[str, list] = {name: [] for name in requests}

    def worker(name: str) -> None:
        for _ in range(3):
            got[name].append(generate(rt, [requests[name]])[0].token_ids)

    threads = [threading.Thread(target=worker, args=(name,)) for name in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {name: [ids] * 3 for name, ids in expected.items()}


def test_adapters_load_and_unload_while_running(trained):
    rt = AdapterSet.open([trained["faq"]])
    before = generate(rt, [ask(rt, "faq-en", "Hi")])[0].token_ids
    rt.load(trained["hello"], name="greeter")
    assert rt.names == [BASE, "faq-en", "greeter"]
    rt.unload("faq-en")
    assert rt.names == [BASE, "greeter"]
    with pytest.raises(LorachatError, match="no model named 'faq-en'"):
        generate(rt, [ask(rt, "greeter", "Hi"), Request("faq-en", "Hi")])
    rt.load(trained["faq"])
    assert generate(rt, [ask(rt, "faq-en", "Hi")])[0].token_ids == before


def test_an_adapter_for_another_base_is_refused_before_any_weights_load(trained, tmp_path, monkeypatch):
    from lora_chat.runtime import adapter_set

    other = shutil.copytree(trained["faq"], tmp_path / "other")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["base"]["hidden_size"] = 4096
    (other / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(adapter_set, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    with pytest.raises(LorachatError, match="hidden_size 4096 != 32"):
        AdapterSet.open([other])


def test_a_prompt_longer_than_the_context_is_refused(rt):
    with pytest.raises(LorachatError, match="the prompt is 600 tokens; the model's context is 512"):
        generate(rt, [Request(BASE, [5] * 600)])


def test_a_qlora_adapter_on_its_4bit_base_answers_as_alone_in_any_batch(tmp_path_factory, tiny_base):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from adapter_factory import faq_moved_4bit

    qlora = AdapterSet.open([faq_moved_4bit(tmp_path_factory, tiny_base)])
    four_bit = [m for m in qlora.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert four_bit and all("forward" in vars(m) for m in four_bit), "every 4-bit layer runs on fixed tiles"
    requests = [ask(qlora, name, q) for q in QUESTIONS for name in (BASE, "faq-qlora")]
    alone = [generate(qlora, [r])[0].token_ids for r in requests]
    assert [c.token_ids for c in generate(qlora, requests)] == alone
