"""`lorachat validate` and `lorachat preview` as a user runs them: exit codes, one-line errors, JSON masks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from lora_chat.cli import main

from conftest import chat, sample_rows
from template_zoo import ZOO


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_lists_the_commands():
    result = run("--help")
    assert result.exit_code == 0 and "validate" in result.output and "preview" in result.output


def test_validate_good_recipe_exits_0_with_a_summary(make_recipe):
    result = run("validate", make_recipe())
    assert result.exit_code == 0, result.output
    for part in ("sources", "messages (detected)", "p50", "train tokens by role", "assistant", "usable"):
        assert part in result.output


def test_validate_counts_rows_dropped_as_too_long(make_recipe):
    rows = sample_rows(10) + [chat("long question " * 80, "long answer " * 80)]
    result = run("validate", make_recipe(rows, data={"max_length": 128, "eval": {"split": 0}}))
    assert result.exit_code == 0, result.output
    assert "train: 1 rows dropped: over max_length=128" in result.output


def test_validate_fails_when_every_row_is_dropped_and_says_why(make_recipe):
    rows = [chat("long question " * 80, "long answer " * 80)] * 3
    result = run("validate", make_recipe(rows, data={"max_length": 64, "eval": {"split": 0}}))
    assert result.exit_code == 2
    assert "every training row was dropped: 3 over max_length=64" in result.output
    assert "Traceback" not in result.output


def test_too_long_error_names_the_row(make_recipe, tmp_path):
    rows = sample_rows(3) + [chat("long question " * 80, "long answer " * 80)]
    result = run("validate", make_recipe(rows, data={"max_length": 128, "too_long": "error", "eval": {"split": 0}}))
    assert result.exit_code == 2
    assert f"{tmp_path / 'train.jsonl'}:4: sample has" in result.output and "too_long: error" in result.output


def test_too_long_truncate_keeps_the_row_cut_to_max_length(make_recipe):
    rows = [chat("short", "long answer " * 80)]
    path = make_recipe(rows, data={"max_length": 64, "too_long": "truncate", "eval": {"split": 0}})
    result = run("preview", path, "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output.splitlines()[0])["input_ids"]) == 64


def test_validate_bad_row_exits_2_with_one_line_naming_file_line_field(make_recipe, tmp_path):
    rows = sample_rows(3) + [{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}]
    result = run("validate", make_recipe(rows))
    assert result.exit_code == 2
    assert f"{tmp_path / 'train.jsonl'}:4: messages[1].role: unknown role 'bot'" in result.output
    assert "Traceback" not in result.output


def test_validate_unknown_recipe_key_exits_2(make_recipe):
    result = run("validate", make_recipe(training={"max_steps": 2, "learning_rate": 1e-3}))
    assert result.exit_code == 2
    assert "training.learning_rate: unknown key 'learning_rate'" in result.output


def test_validate_missing_recipe_file(tmp_path):
    result = run("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "recipe not found" in result.output


def test_template_that_refuses_a_role_names_the_sample(make_recipe, tmp_path):
    (tmp_path / "no-system.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    rows = sample_rows(3) + [chat("q", "a", system="be brief")]
    result = run("validate", make_recipe(rows, template={"file": "no-system.jinja"}, data={"eval": {"split": 0}}))
    assert result.exit_code == 2
    assert f"{tmp_path / 'train.jsonl'}:4: chat template 'no-system.jinja' refused this conversation " \
           f"(system/user/assistant): System role not supported" in result.output


def test_preview_json_is_one_object_per_sample_in_data_order(make_recipe):
    rows = [chat(f"q{i}", f"reply number {i}") for i in range(5)]
    result = run("preview", make_recipe(rows, data={"eval": {"split": 0}}), "--json", "--limit", "5")
    assert result.exit_code == 0, result.output
    samples = [json.loads(line) for line in result.output.splitlines()]
    assert len(samples) == 5
    for s in samples:
        assert set(s) == {"input_ids", "labels"} and len(s["input_ids"]) == len(s["labels"])
        assert all(label in (-100, token) for token, label in zip(s["input_ids"], s["labels"]))


def test_preview_trains_reply_and_end_of_turn_only(make_recipe, tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
                          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
                          {"role": "assistant", "content": "Goodbye."}]}]
    result = run("preview", make_recipe(rows, data={"eval": {"split": 0}}), "--json")
    s = json.loads(result.output)
    trained = tok.decode([t for t, label in zip(s["input_ids"], s["labels"]) if label != -100])
    assert trained == "Hello!<|im_end|>Goodbye.<|im_end|>"


@pytest.mark.parametrize("train_on, expected", [
    ("last_assistant", "Goodbye.<|im_end|>"),
    ("all", None),
])
def test_train_on_modes(make_recipe, tiny_base, train_on, expected):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]}]
    result = run("preview", make_recipe(rows, data={"eval": {"split": 0}, "train_on": train_on}), "--json")
    s = json.loads(result.output)
    if expected is None:
        assert s["labels"] == s["input_ids"]
    else:
        assert tok.decode([t for t, label in zip(s["input_ids"], s["labels"]) if label != -100]) == expected


def test_message_marked_train_false_is_not_trained(make_recipe, tiny_base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    rows = [{"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Bad answer", "train": False},
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good answer"}]}]
    s = json.loads(run("preview", make_recipe(rows, data={"eval": {"split": 0}}), "--json").output)
    assert tok.decode([t for t, label in zip(s["input_ids"], s["labels"]) if label != -100]) == "Good answer<|im_end|>"


def test_default_system_prompt_from_the_recipe_is_rendered(make_recipe):
    rows = [chat("Hi", "Hello")]
    result = run("preview", make_recipe(rows, template={"system": "You are a builder."}, data={"eval": {"split": 0}}))
    assert result.exit_code == 0 and "You are a builder." in result.output


def test_preview_eval_split(make_recipe):
    result = run("preview", make_recipe(sample_rows(20), data={"eval": {"split": 0.25}}), "--split", "eval",
                 "--json", "--limit", "100")
    assert result.exit_code == 0 and len(result.output.splitlines()) == 5


def test_debug_flag_shows_the_traceback(tmp_path):
    result = run("--debug", "validate", tmp_path / "nope.yaml")
    assert result.exit_code != 0 and result.exception is not None


def test_template_without_an_end_of_turn_after_the_reply_is_warned_about(make_recipe, tmp_path):
    (tmp_path / "no-stop.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{% if not loop.last %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_end|>\n<|im_start|>assistant\n{% endif %}", encoding="utf-8")
    result = run("validate", make_recipe(template={"file": "no-stop.jinja"}))
    assert result.exit_code == 0, result.output
    assert "generation may not stop where training taught it to" in " ".join(result.output.split())


def test_a_template_that_ends_replies_with_eos_gets_no_stop_warning(make_recipe):
    result = run("validate", make_recipe())
    assert result.exit_code == 0 and "may not stop" not in result.output


def test_validate_says_which_replies_a_template_rewrites_and_what_is_trained(make_recipe, tmp_path):
    """Old behaviour: Qwen3's template was refused under train_on: assistant (it drops earlier reasoning)."""
    (tmp_path / "qwen3.jinja").write_text(ZOO["qwen3"], encoding="utf-8")
    think = {"role": "assistant", "content": "<think>\nshort\n</think>\n\nTen weeks."}
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"}, think,
                          {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]}
            for i in range(4)]
    result = run("validate", make_recipe(rows, template={"file": "qwen3.jinja"}, data={"eval": {"split": 0}}))
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "chat template 'qwen3.jinja' rewrites earlier assistant turns inside the conversation " \
           "(4 turns in 4 samples;" in said
    assert "trained as the conversation renders it" in said


def test_validate_per_role_counts_add_up_when_rows_are_truncated(make_recipe):
    """Old behaviour: a truncated row kept the per-role token counts of its whole conversation."""
    from lora_chat.recipe import load_recipe
    from lora_chat.validate import validate

    rows = [chat(f"Question {i}?", "A long answer about permits. " * 30) for i in range(3)]
    v = validate(load_recipe(make_recipe(rows, data={"max_length": 48, "too_long": "truncate", "eval": {"split": 0}})))
    st = v.prepared.stats["train"]
    assert st.truncated == 3
    assert sum(n for n, _ in st.roles.values()) == st.tokens == 3 * 48
    assert sum(t for _, t in st.roles.values()) == st.trained
