"""Assistant masks on many real chat-template shapes: each reply and its end-of-turn marker, nothing else.

Every template in the zoo (tests/template_zoo.py: Llama-2/3, Mistral, Gemma, Phi-3, Qwen2.5/3, Zephyr,
Vicuna, Alpaca, Command-R, DeepSeek, OpenChat, Falcon, ...) renders multi-turn conversations with and
without a system prompt; the trained characters must be exactly the replies plus the end-of-turn text.
"""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lora_chat.data.conversation import Conversation, Message
from lora_chat.errors import DataError, Where
from lora_chat.templates import IGNORE, ChatTemplate

from template_zoo import ZOO, ZOO_SYSTEM, eot

NO_STOP_SIGNAL = {"chatml_no_final_eot"}  # the template itself never writes an end of turn after the last reply
# Text the template (not the data) writes at the start of a reply, which the model must learn to emit.
TEMPLATE_OPENS_REPLY = {"qwen3": "<think>\n\n</think>"}


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def conversation(system: str | None = None, pad: str = "") -> Conversation:
    turns = [("user", "Question one?"), ("assistant", "Answer one."),
             ("user", "Question two?"), ("assistant", "Answer two, longer.")]
    messages = [Message("system", "Be brief.")] if system else []
    messages += [Message(role, f"{pad}{text}{pad}" if role == "assistant" else text) for role, text in turns]
    return Conversation(tuple(messages), Where("zoo.jsonl", 7))


def trained_runs(template: ChatTemplate, conv: Conversation, train_on: str = "assistant") -> tuple[str, list[str]]:
    """The rendered text and the runs of characters covered by trained tokens."""
    rendered = template.render_spans(conv, train_on)
    enc = template.tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    encoded = template.encode(conv, train_on)
    assert encoded.input_ids == enc["input_ids"]
    runs, current = [], None
    for (a, b), label in zip(enc["offset_mapping"], encoded.labels):
        if label == IGNORE:
            current = None
            continue
        if current is None:
            runs.append([a, b])
            current = runs[-1]
        else:
            current[1] = b
    return rendered.text, [rendered.text[a:b] for a, b in runs]


CASES = [(name, system, pad) for name in sorted(ZOO) for system in (False, True) for pad in ("", "  ")]


@pytest.mark.parametrize("name, system, pad", CASES, ids=[f"{n}-{'sys' if s else 'nosys'}{'-padded' if p else ''}"
                                                          for n, s, p in CASES])
def test_each_reply_and_its_end_of_turn_are_trained_and_nothing_else(tokenizer, name, system, pad):
    template = ChatTemplate(ZOO[name], tokenizer, name)
    conv = conversation(system="Be brief." if system else None, pad=pad)
    if system and ZOO_SYSTEM[name] == "raises":
        with pytest.raises(DataError, match=rf"zoo.jsonl:7: chat template '{name}' refused this conversation"):
            template.encode(conv)
        return
    text, runs = trained_runs(template, conv)
    replies = ["Answer one.", "Answer two, longer."]
    assert len(runs) == 2, (text, runs)
    end_of_turn = eot(name, tokenizer.eos_token).strip()
    for run, reply in zip(runs, replies):
        before, found, after = run.partition(reply)
        assert found, (run, reply)
        if reply == replies[-1] and name in TEMPLATE_OPENS_REPLY:
            before = before.replace(TEMPLATE_OPENS_REPLY[name], "")
        assert not before.strip(), f"prompt text trained before the reply: {before!r}"
        if name not in NO_STOP_SIGNAL:
            # Phi-3 closes the whole conversation with eos after the last '<|end|>': both are trained.
            assert after.strip() in (end_of_turn, f"{end_of_turn}\n{tokenizer.eos_token}"), (run, after)
            assert after.strip() == end_of_turn or reply == replies[-1]
            if end_of_turn:  # the layout after a marker is not something the model must emit
                assert after == after.rstrip(), f"layout whitespace trained after the marker: {after!r}"
            else:  # whitespace is the only end of turn (Falcon): it is the stop signal, so it is trained
                assert after.endswith(eot(name)), f"the only end of turn was not trained: {after!r}"
        for other in ("Question one?", "Question two?", "Be brief."):
            assert other not in run


@pytest.mark.parametrize("name", sorted(ZOO))
def test_last_assistant_trains_only_the_final_reply(tokenizer, name):
    template = ChatTemplate(ZOO[name], tokenizer, name)
    _, runs = trained_runs(template, conversation(), "last_assistant")
    assert len(runs) == 1 and "Answer two, longer." in runs[0] and "Answer one." not in runs[0]


def test_qwen3_trains_each_reply_as_the_conversation_renders_it(tokenizer):
    """Old behaviour: refused under train_on: assistant, because Qwen3 (its real template, from Qwen/Qwen3-8B)
    drops the reasoning of replies before the last user message, so the earlier reply's text is not in the
    rendering. Now the earlier reply is trained without its reasoning, as history shows it, and counted."""
    template = ChatTemplate(ZOO["qwen3"], tokenizer, "qwen3")
    conv = Conversation((Message("system", "Be brief."), Message("user", "Hi"),
                         Message("assistant", "<think>\nhmm\n</think>\n\nHello"),
                         Message("user", "How are you?"), Message("assistant", "<think>\nfine?\n</think>\n\nFine."),
                         Message("user", "Bye"), Message("assistant", "<think>\nok\n</think>\n\nGoodbye")),
                        Where("data.jsonl", 12))
    text, runs = trained_runs(template, conv)
    assert "hmm" not in text and "fine?" not in text  # the template dropped them: nothing to train
    assert runs == ["Hello<|im_end|>", "Fine.<|im_end|>", "<think>\nok\n</think>\n\nGoodbye<|im_end|>"]
    assert template.render_spans(conv, "assistant").rewritten == 2
    assert template.encode(conv).rewritten == 2


def test_qwen3_earlier_reply_repeated_as_the_last_one_is_not_stretched_over_the_turns_between(tokenizer):
    """An earlier reply is looked for only before the next assistant prompt, never in a later turn."""
    template = ChatTemplate(ZOO["qwen3"], tokenizer, "qwen3")
    same = "<think>\nx\n</think>\n\nSame."
    conv = Conversation((Message("user", "Hi"), Message("assistant", same), Message("user", "Again?"),
                         Message("assistant", same)), Where("data.jsonl", 5))
    _, runs = trained_runs(template, conv)
    assert runs == ["Same.<|im_end|>", "<think>\nx\n</think>\n\nSame.<|im_end|>"]


def test_reply_text_also_in_a_moved_system_prompt_turn_is_trained_only_as_the_reply(tokenizer):
    """Mistral v0.3 moves the system prompt into the last user turn only while it is last, so the reply is
    located by its text: the last occurrence after the shared prefix, not the user's echo of it."""
    template = ChatTemplate(ZOO["mistral"], tokenizer, "mistral")
    conv = Conversation((Message("system", "Be brief."), Message("user", "Reply with OK only."),
                         Message("assistant", "OK"), Message("user", "Again, OK?"), Message("assistant", "OK")),
                        Where("data.jsonl", 6))
    _, runs = trained_runs(template, conv)
    assert [r.strip() for r in runs] == [f"OK{tokenizer.eos_token}"] * 2


# SYNTHETIC: drops earlier reasoning like Qwen3, but a newline is the only end of turn (like Falcon).
DROPS_REASONING_NEWLINE_ENDS = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% else %}"
    "{% set c = m['content'] %}{% if '</think>' in c and not loop.last %}{% set c = c.split('</think>')[-1] %}"
    "{% endif %}Assistant: {{ c }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


def test_rewritten_reply_is_taken_whole_even_when_it_ends_with_a_repeated_line(tokenizer):
    """The rewritten turn is the LONGEST tail of its last-turn form: 'Yes.\n' alone is a tail too."""
    template = ChatTemplate(DROPS_REASONING_NEWLINE_ENDS, tokenizer, "newline-ends")
    conv = Conversation((Message("user", "Sure?"), Message("assistant", "<think>r</think>Yes.\nYes."),
                         Message("user", "Really?"), Message("assistant", "No.")), Where("data.jsonl", 8))
    _, runs = trained_runs(template, conv)
    assert runs == ["Yes.\nYes.\n", "No.\n"]


def test_qwen3_replies_without_reasoning_are_not_counted_as_rewritten(tokenizer):
    template = ChatTemplate(ZOO["qwen3"], tokenizer, "qwen3")
    assert template.render_spans(conversation(), "assistant").rewritten == 0


UPPERCASES_HISTORY = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | upper }}{% else %}{{ m['content'] }}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_template_whose_history_cannot_be_matched_to_the_reply_refuses_with_the_sample_named(tokenizer):
    """A turn rewritten into something that is neither its text nor a tail of its last-turn form is refused."""
    template = ChatTemplate(UPPERCASES_HISTORY, tokenizer, "upper")
    conv = Conversation((Message("user", "Hi"), Message("assistant", "Hello there"),
                         Message("user", "Bye"), Message("assistant", "Goodbye")), Where("data.jsonl", 12))
    with pytest.raises(DataError, match=r"data.jsonl:12: chat template 'upper' renders message 1 \(assistant\) "
                                        r"differently.*train_on: last_assistant"):
        template.encode(conv)
    _, runs = trained_runs(template, conv, "last_assistant")
    assert runs == ["Goodbye<|im_end|>"]


def test_train_on_all_trains_every_token_without_locating_replies(tokenizer):
    """`all` needs no reply spans, so even a template whose replies cannot be located is fine."""
    template = ChatTemplate(UPPERCASES_HISTORY, tokenizer, "upper")
    conv = Conversation((Message("user", "Hi"), Message("assistant", "Hello there"),
                         Message("user", "Bye"), Message("assistant", "Goodbye")), Where("data.jsonl", 12))
    encoded = template.encode(conv, "all")
    assert encoded.labels == encoded.input_ids


def test_truncation_counts_per_role_tokens_of_what_is_left(tokenizer):
    """Old behaviour: a truncated sample kept the per-role counts of the whole conversation."""
    template = ChatTemplate(ZOO["chatml"], tokenizer, "chatml")
    conv = Conversation((Message("user", "Question one?"), Message("assistant", "Answer one. " * 20)),
                        Where("data.jsonl", 3))
    whole = template.encode_batch([conv], "assistant", role_stats=True)[0]
    cut = whole.truncated(len(whole.input_ids) // 2)
    assert sum(n for n, _ in cut.roles.values()) == len(cut.input_ids)
    assert sum(t for _, t in cut.roles.values()) == cut.trained
    assert cut.roles["user"] == whole.roles["user"]
    assert 0 < cut.roles["assistant"][0] < whole.roles["assistant"][0]


def test_generation_markers_are_used_when_present(tokenizer):
    template = ChatTemplate(ZOO["chatml_generation"], tokenizer, "chatml_generation")
    assert template._has_generation
    _, runs = trained_runs(template, conversation())
    assert [r.strip() for r in runs] == ["Answer one.<|im_end|>", "Answer two, longer.<|im_end|>"]


def test_default_system_prompt_is_added_only_when_missing(tokenizer):
    template = ChatTemplate(ZOO["chatml"], tokenizer, "chatml", system="Default rules.")
    assert "Default rules." in template.render_spans(conversation(), "assistant").text
    with_own = template.render_spans(conversation(system="Be brief."), "assistant").text
    assert "Default rules." not in with_own and "Be brief." in with_own


def test_prompt_for_generation_ends_with_the_generation_header(tokenizer):
    template = ChatTemplate(ZOO["chatml"], tokenizer, "chatml")
    assert template.prompt(conversation()).endswith("Question two?<|im_end|>\n<|im_start|>assistant\n")
