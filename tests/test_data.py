"""Data: every format becomes the same conversation, bad rows are named, mixing and splitting hold."""

from __future__ import annotations

import json

import pytest
import yaml

from lora_chat.data import load_data
from lora_chat.errors import DataError
from lora_chat.recipe import load_recipe

from conftest import chat, write_jsonl


def recipe_for(tmp_path, sources: list[dict], **data) -> object:
    path = tmp_path / "r.yaml"
    body = {"name": "d", "base": {"model": "x"}, "data": {"train": sources, **data}}
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return load_recipe(path)


def load(tmp_path, rows, fmt="auto", split=0.0, suffix=".jsonl"):
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, rows)
    else:
        path.write_text(rows, encoding="utf-8")
    return load_data(recipe_for(tmp_path, [{"path": path.name, "format": fmt}], eval={"split": split}))


def roles(conversation):
    return [(m.role, m.content) for m in conversation.messages]


def test_sharegpt_rows_become_messages(tmp_path):
    got = load(tmp_path, [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                                             {"from": "gpt", "value": "A"}]}])
    assert got.sources[0].format == "sharegpt" and got.sources[0].detected
    assert roles(got.train[0]) == [("system", "S"), ("user", "Q"), ("assistant", "A")]


def test_alpaca_input_is_joined_to_the_instruction(tmp_path):
    got = load(tmp_path, [{"instruction": "Translate", "input": "hej", "output": "hello"}])
    assert roles(got.train[0]) == [("user", "Translate\n\nhej"), ("assistant", "hello")]


def test_prompt_completion_strings_and_message_lists(tmp_path):
    got = load(tmp_path, [{"prompt": "2+2?", "completion": "4"},
                          {"prompt": [{"role": "user", "content": "hi"}],
                           "completion": [{"role": "assistant", "content": "yo"}]}])
    assert [roles(c) for c in got.train] == [[("user", "2+2?"), ("assistant", "4")],
                                             [("user", "hi"), ("assistant", "yo")]]


def test_message_level_train_false_is_kept(tmp_path):
    row = chat("q", "a")
    row["messages"][1]["train"] = False
    row["messages"] += [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    got = load(tmp_path, [row])
    assert [m.train for m in got.train[0].messages] == [None, False, None, None]


def test_csv_json_and_yaml_sources_carry_line_numbers(tmp_path):
    got = load(tmp_path, "prompt,completion\nq1,a1\nq2,a2\n", suffix=".csv")
    assert [c.origin.line for c in got.train] == [2, 3]
    rows = json.dumps([chat("q1", "a1"), chat("q2", "a2")], indent=2)
    got = load(tmp_path, rows, suffix=".json")
    assert [c.origin.line for c in got.train] == [2, 14]
    got = load(tmp_path, "conversations:\n- - Hello\n  - Hi there\n- - Bye\n  - Goodbye\n", suffix=".yml")
    assert roles(got.train[1]) == [("user", "Bye"), ("assistant", "Goodbye")] and got.train[1].origin.line == 4


@pytest.mark.parametrize("row, message", [
    ("not json", "invalid JSON: Expecting value (column 1)"),
    ([1, 2], "a row must be a JSON object, got list"),
    ({"text": "hi"}, "messages: messages must be a non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role: unknown role 'robot' (use one of system, user, assistant)"),
    ({"messages": [{"role": "user", "content": ""}]}, "messages[0].content: content is empty"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: content must be a string, got int"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no assistant turn: nothing to train on"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "system", "content": "late"}]}, "messages[2].role: a system message may only come first"),
])
def test_bad_row_is_reported_with_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "d.jsonl"
    bad = row if isinstance(row, str) else json.dumps(row)
    path.write_text(json.dumps(chat("fine", "row")) + "\n" + bad + "\n", encoding="utf-8")
    got = load_data(recipe_for(tmp_path, [{"path": "d.jsonl"}], eval={"split": 0}))
    assert len(got.train) == 1
    assert [str(p) for p in got.problems] == [f"{path}:2: {message}"]


def test_undetectable_first_row_lists_the_keys_it_has(tmp_path):
    got = load(tmp_path, [{"text": "hi", "label": 1}])
    assert [str(p) for p in got.problems] == [
        f"{tmp_path / 'd.jsonl'}:1: cannot tell the format: no messages, conversations, instruction/output or "
        f"prompt/completion, nor DailyDialog's dialog, PersonaChat's personality or MultiWOZ's log or turns "
        f"(keys: label, text)"]


def test_missing_data_file_names_the_recipe_line(tmp_path):
    loaded = recipe_for(tmp_path, [{"path": "nope.jsonl"}])
    with pytest.raises(DataError, match=r"r\.yaml:\d+: data\.train\.0\.path: data file not found"):
        load_data(loaded)


def test_uninstalled_package_source_is_a_clear_error(tmp_path):
    loaded = recipe_for(tmp_path, [{"path": "pkg:no_such_pkg_xyz/data.jsonl"}])
    with pytest.raises(DataError, match="package 'no_such_pkg_xyz' is not installed"):
        load_data(loaded)


def test_package_source_reads_the_installed_faq(tmp_path):
    loaded = recipe_for(tmp_path, [{"path": "pkg:zaragoza_construction_faq/data/faq-en-sharegpt.jsonl"}],
                        eval={"split": 0})
    got = load_data(loaded)
    assert len(got.train) == 503 and got.sources[0].sha256


def test_offline_absent_hf_dataset_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = recipe_for(tmp_path, [{"path": "hf:nobody/no-such-dataset-xyz"}])
    with pytest.raises(DataError, match="cannot load dataset 'nobody/no-such-dataset-xyz'.*HF_HUB_OFFLINE"):
        load_data(loaded)


def test_eval_split_never_overlaps_train_even_with_duplicates(tmp_path):
    rows = [chat(f"q{i % 30}", f"a{i % 30}") for i in range(60)]  # every conversation twice
    got = load(tmp_path, rows, split=0.2)
    train = {roles(c)[0] for c in got.train}
    held = {roles(c)[0] for c in got.eval}
    assert len(held) == 6 and not train & held and len(got.train) == 48


def test_split_is_deterministic_by_seed(tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(50)]
    first = [roles(c) for c in load(tmp_path, rows, split=0.1).eval]
    again = [roles(c) for c in load(tmp_path, rows, split=0.1).eval]
    assert first == again


def test_weights_mix_sources(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [chat(f"a{i}", "x") for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [chat(f"b{i}", "y") for i in range(10)])
    got = load_data(recipe_for(tmp_path, [{"path": "a.jsonl", "weight": 2.0}, {"path": "b.jsonl", "weight": 0.5}],
                               eval={"split": 0}))
    names = [c.messages[0].content[0] for c in got.train]
    assert names.count("a") == 20 and names.count("b") == 5


def test_eval_sources_remove_the_same_rows_from_train(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [chat(f"q{i}", "a") for i in range(10)])
    write_jsonl(tmp_path / "eval.jsonl", [chat("q3", "a"), chat("new", "b")])
    got = load_data(recipe_for(tmp_path, [{"path": "train.jsonl"}], eval=[{"path": "eval.jsonl"}]))
    assert len(got.train) == 9 and len(got.eval) == 2 and got.eval_overlap_removed == 1
