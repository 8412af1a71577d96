"""DailyDialog, PersonaChat and MultiWOZ rows become conversations, from a recipe with no hand conversion.

The Hugging Face hub is not reachable from here, so every row below is written by hand in the exact shape
the datasets are published in: the hub's `daily_dialog` (dialog, act and emotion as ClassLabel ids, every
utterance padded with spaces), PersonaChat as ParlAI/HF's `personachat_self_original.json`
({"train": [{"personality", "utterances": [{"candidates", "history"}]}], "valid": [...]}) and as
`bavard/personachat_truecased` (one row per turn), `multi_woz_v22` (turns as columns, speakers as ids) and
MultiWOZ 2.1's `data.json` (dialogue id -> {goal, log}).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_chat.cli import main
from lora_chat.data import load_data
from lora_chat.recipe import load_recipe

from conftest import write_jsonl

DAILYDIALOG = {
    "dialog": ["Say , Jim , how about going for a few beers after dinner ? ",
               " You know that is tempting but is really not good for our fitness . ",
               " What do you mean ? It will help us to relax . ",
               " Do you really think so ? I don't . "],
    "act": [3, 4, 2, 2],
    "emotion": [0, 0, 0, 0],
}


def persona_entry(candidates: int = 20) -> dict:
    history = ["hi , how are you doing ? i'm getting ready to do some cheetah chasing to stay in shape .",
               "you must be very fast . hunting is one of my favorite hobbies .",
               "i am ! for my hobby i like to do canning or some whittling ."]
    return {
        "personality": ["i like to remodel homes .", "i like to go hunting .", "i like to shoot a bow ."],
        "utterances": [
            {"candidates": [f"distractor {i} ." for i in range(candidates - 1)] +
                           ["you must be very fast . hunting is one of my favorite hobbies ."],
             "history": history[:1]},
            {"candidates": [f"distractor {i} ." for i in range(candidates - 1)] +
                           ["i also remodel homes when i am not out bow hunting ."],
             "history": history},
        ],
    }


def woz22(dialogue_id: str, services: list[str], turns: list[tuple[int, str]]) -> dict:
    return {"dialogue_id": dialogue_id, "services": services,
            "turns": {"turn_id": [str(i) for i in range(len(turns))], "speaker": [s for s, _ in turns],
                      "utterance": [u for _, u in turns], "frames": [{} for _ in turns],
                      "dialogue_acts": [{} for _ in turns]}}


HOTEL_AND_TRAIN = woz22("PMUL4398.json", ["hotel", "train"], [
    (0, "i need a cheap place to stay in the north."), (1, "I have 2 guesthouses. Shall I book one?"),
    (0, "yes, and i also need a train to cambridge on friday."), (1, "TR1234 leaves at 9:00. Book it?")])
RESTAURANT = woz22("SNG0129.json", ["restaurant"], [
    (0, "find me an italian restaurant in the centre."), (1, "Pizza Hut City Centre is cheap and central.")])


def recipe(tmp_path: Path, tiny_base: Path, data: str, **source) -> Path:
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "dialogues", "base": {"model": str(tiny_base), "dtype": "float32"},
        "data": {"train": [{"path": data, **source}], "eval": {"split": 0.0}, "max_length": 256}}), "utf-8")
    return path


def train_of(path: Path) -> list:
    return load_data(load_recipe(path)).train


def roles_and_texts(conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conversation.messages]


# ---------------------------------------------------------------- DailyDialog


def test_dailydialog_hub_row_is_detected_and_alternates_user_and_assistant(tmp_path, tiny_base):
    write_jsonl(tmp_path / "dd.jsonl", [DAILYDIALOG])
    loaded = load_data(load_recipe(recipe(tmp_path, tiny_base, "dd.jsonl")))
    assert loaded.sources[0].format == "dailydialog" and loaded.sources[0].detected
    assert roles_and_texts(loaded.train[0]) == [
        ("user", "Say , Jim , how about going for a few beers after dinner ?"),
        ("assistant", "You know that is tempting but is really not good for our fitness ."),
        ("user", "What do you mean ? It will help us to relax ."),
        ("assistant", "Do you really think so ? I don't ."),
    ]


def test_dailydialog_act_and_emotion_labels_are_kept_as_row_metadata_by_name(tmp_path, tiny_base):
    write_jsonl(tmp_path / "dd.jsonl", [{**DAILYDIALOG, "emotion": [0, 4, 6, 1]}])
    meta = train_of(recipe(tmp_path, tiny_base, "dd.jsonl"))[0].meta
    assert meta == {"act": ["directive", "commissive", "question", "question"],
                    "emotion": ["no emotion", "happiness", "surprise", "anger"]}


def test_dailydialog_odd_length_dialogue_drops_the_unanswered_last_utterance(tmp_path, tiny_base):
    row = {key: value[:3] for key, value in DAILYDIALOG.items()}
    write_jsonl(tmp_path / "dd.jsonl", [row])
    conversation = train_of(recipe(tmp_path, tiny_base, "dd.jsonl"))[0]
    assert [m.role for m in conversation.messages] == ["user", "assistant"]


def test_dailydialog_empty_utterance_is_left_out_and_the_speakers_turns_joined(tmp_path, tiny_base):
    row = {"dialog": ["Hello . ", "Hi ! ", "  ", "Are you there ? ", "Yes , sorry ."],
           "act": [1, 1, 1, 2, 1], "emotion": [0, 0, 0, 0, 0]}
    write_jsonl(tmp_path / "dd.jsonl", [row])
    conversation = train_of(recipe(tmp_path, tiny_base, "dd.jsonl"))[0]
    # The user's empty turn is gone; the assistant's two turns around it are one; the unanswered last goes.
    assert roles_and_texts(conversation) == [("user", "Hello ."), ("assistant", "Hi !\nAre you there ?")]


def test_dailydialog_roles_make_the_first_speaker_the_assistant(tmp_path, tiny_base):
    write_jsonl(tmp_path / "dd.jsonl", [DAILYDIALOG])
    conversation = train_of(recipe(tmp_path, tiny_base, "dd.jsonl", roles=["assistant", "user"]))[0]
    assert [m.role for m in conversation.messages] == ["assistant", "user", "assistant"]


def test_dailydialog_from_a_parquet_file_like_the_hubs_conversion(tmp_path, tiny_base):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([DAILYDIALOG, DAILYDIALOG]), tmp_path / "train.parquet")
    loaded = load_data(load_recipe(recipe(tmp_path, tiny_base, "train.parquet")))
    assert loaded.sources[0].format == "dailydialog" and len(loaded.train) == 2


# ---------------------------------------------------------------- PersonaChat


def test_personachat_persona_becomes_the_system_message_and_the_last_candidate_the_reply(tmp_path, tiny_base):
    (tmp_path / "personachat.json").write_text(json.dumps({"train": [persona_entry(20)], "valid": []}), "utf-8")
    loaded = load_data(load_recipe(recipe(tmp_path, tiny_base, "personachat.json")))
    assert loaded.sources[0].format == "personachat"
    messages = roles_and_texts(loaded.train[0])
    assert messages[0] == ("system", "Your persona:\ni like to remodel homes .\ni like to go hunting .\n"
                                     "i like to shoot a bow .")
    assert [r for r, _ in messages[1:]] == ["user", "assistant", "user", "assistant"]
    assert messages[-1] == ("assistant", "i also remodel homes when i am not out bow hunting .")
    assert not any("distractor" in text for _, text in messages), "the 19 distractors must never become turns"


def test_personachat_split_key_picks_the_valid_list_of_the_json(tmp_path, tiny_base):
    valid = persona_entry(2)
    valid["personality"] = ["i have two dogs ."]
    (tmp_path / "personachat.json").write_text(json.dumps({"train": [persona_entry()], "valid": [valid]}), "utf-8")
    conversation = train_of(recipe(tmp_path, tiny_base, "personachat.json", split="valid"))[0]
    assert conversation.messages[0].content == "Your persona:\ni have two dogs ."


def test_personachat_persona_wording_is_chosen_or_turned_off(tmp_path, tiny_base):
    write_jsonl(tmp_path / "pc.jsonl", [persona_entry()])
    worded = train_of(recipe(tmp_path, tiny_base, "pc.jsonl", persona="You are this person: {persona}"))[0]
    assert worded.messages[0].content.startswith("You are this person: i like to remodel homes .")
    off = train_of(recipe(tmp_path, tiny_base, "pc.jsonl", persona=False))[0]
    assert off.messages[0].role == "user"


def test_personachat_per_turn_rows_fold_into_one_dialogue_and_silence_is_dropped(tmp_path, tiny_base):
    persona = ["i love cats ."]
    rows = [
        {"personality": persona, "candidates": ["no .", "hello , do you like cats ?"],
         "history": ["__ SILENCE __"], "conv_id": 7, "utterance_idx": 0},
        {"personality": persona, "candidates": ["maybe .", "mine is called tom ."],
         "history": ["__ SILENCE __", "hello , do you like cats ?", "yes , i have one !"], "conv_id": 7,
         "utterance_idx": 1},
    ]
    write_jsonl(tmp_path / "pc.jsonl", rows)
    loaded = load_data(load_recipe(recipe(tmp_path, tiny_base, "pc.jsonl")))
    assert len(loaded.train) == 1 and loaded.sources[0].folded == 1
    assert roles_and_texts(loaded.train[0])[1:] == [
        ("assistant", "hello , do you like cats ?"), ("user", "yes , i have one !"),
        ("assistant", "mine is called tom .")]


def test_personachat_persona_wording_without_its_slot_is_refused_in_one_line(tmp_path, tiny_base):
    write_jsonl(tmp_path / "pc.jsonl", [persona_entry()])
    result = CliRunner().invoke(main, ["validate", str(recipe(tmp_path, tiny_base, "pc.jsonl", persona="Be nice."))])
    assert result.exit_code == 2
    assert "data.train.0.persona: the wording must contain {persona}" in result.output


# ---------------------------------------------------------------- MultiWOZ


def test_multiwoz22_hub_row_keeps_user_and_system_turns_in_order_with_its_domains(tmp_path, tiny_base):
    write_jsonl(tmp_path / "woz.jsonl", [HOTEL_AND_TRAIN])
    loaded = load_data(load_recipe(recipe(tmp_path, tiny_base, "woz.jsonl")))
    conversation = loaded.train[0]
    assert loaded.sources[0].format == "multiwoz"
    assert [m.role for m in conversation.messages] == ["user", "assistant"] * 2
    assert conversation.messages[1].content == "I have 2 guesthouses. Shall I book one?"
    assert conversation.meta == {"domains": ("hotel", "train"), "dialogue_id": "PMUL4398.json"}


def test_multiwoz22_release_file_with_turn_objects_and_speaker_names(tmp_path, tiny_base):
    row = {"dialogue_id": "SNG0129.json", "services": ["restaurant"], "turns": [
        {"turn_id": "0", "speaker": "USER", "utterance": "find me an italian place.", "frames": []},
        {"turn_id": "1", "speaker": "SYSTEM", "utterance": "Pizza Hut is italian.", "frames": []}]}
    (tmp_path / "dialogues_001.json").write_text(json.dumps([row], indent=2), "utf-8")
    conversation = train_of(recipe(tmp_path, tiny_base, "dialogues_001.json"))[0]
    assert roles_and_texts(conversation) == [("user", "find me an italian place."),
                                             ("assistant", "Pizza Hut is italian.")]


def test_multiwoz21_data_json_takes_domains_from_the_goal_and_the_id_from_the_key(tmp_path, tiny_base):
    def dialogue(domain: str, text: str) -> dict:
        goal = {d: {} for d in ("taxi", "police", "hospital", "hotel", "attraction", "train", "restaurant")}
        goal[domain] = {"info": {"area": "north"}}
        return {"goal": {**goal, "message": ["..."], "topic": {}},
                "log": [{"text": text, "metadata": {}}, {"text": "Sure, here you go.", "metadata": {"hotel": {}}}]}

    data = {"SNG01856.json": dialogue("hotel", "a hotel please"), "MUL0001.json": dialogue("taxi", "a taxi please")}
    (tmp_path / "data.json").write_text(json.dumps(data, indent=2), "utf-8")
    loaded = load_data(load_recipe(recipe(tmp_path, tiny_base, "data.json")))
    first, second = loaded.train
    assert first.meta == {"domains": ("hotel",), "dialogue_id": "SNG01856.json"}
    assert second.meta["domains"] == ("taxi",) and second.messages[0].content == "a taxi please"
    assert (first.origin.line, second.origin.line) == (2, 2 + json.dumps(data["SNG01856.json"], indent=2).count("\n") + 1)


def test_multiwoz_domains_keep_a_dialogue_spanning_hotel_and_train_under_either(tmp_path, tiny_base):
    write_jsonl(tmp_path / "woz.jsonl", [HOTEL_AND_TRAIN, RESTAURANT])
    hotel = load_data(load_recipe(recipe(tmp_path, tiny_base, "woz.jsonl", domains=["hotel"])))
    assert [c.meta["dialogue_id"] for c in hotel.train] == ["PMUL4398.json"]
    assert hotel.sources[0].left_out == 1
    train = train_of(recipe(tmp_path, tiny_base, "woz.jsonl", domains=["train"]))
    assert [c.meta["dialogue_id"] for c in train] == ["PMUL4398.json"]
    restaurant = train_of(recipe(tmp_path, tiny_base, "woz.jsonl", domains=["restaurant"]))
    assert [c.meta["dialogue_id"] for c in restaurant] == ["SNG0129.json"]


def test_a_domain_no_dialogue_has_is_refused_naming_the_domains_found(tmp_path, tiny_base):
    write_jsonl(tmp_path / "woz.jsonl", [HOTEL_AND_TRAIN, RESTAURANT])
    result = CliRunner().invoke(main, ["validate", str(recipe(tmp_path, tiny_base, "woz.jsonl", domains=["hotle"]))])
    assert result.exit_code == 2
    assert "data.train.0.domains: no dialogue has the domain 'hotle' (found: hotel, restaurant, train)" in result.output


def test_domains_on_rows_without_domains_is_refused(tmp_path, tiny_base):
    write_jsonl(tmp_path / "dd.jsonl", [DAILYDIALOG])
    result = CliRunner().invoke(main, ["validate", str(recipe(tmp_path, tiny_base, "dd.jsonl", domains=["hotel"]))])
    assert result.exit_code == 2
    assert "data.train.0.domains: dailydialog rows carry no domains (only multiwoz rows do)" in result.output


def test_validate_prints_conversations_per_domain_and_turns_per_speaker(tmp_path, tiny_base):
    write_jsonl(tmp_path / "woz.jsonl", [HOTEL_AND_TRAIN, RESTAURANT])
    result = CliRunner().invoke(main, ["validate", str(recipe(tmp_path, tiny_base, "woz.jsonl"))])
    assert result.exit_code == 0, result.output
    lines = [" ".join(line.replace("│", " ").split()) for line in result.output.splitlines()]
    assert "conversations by domain" in result.output and "turns by speaker" in result.output
    assert {"hotel 1", "train 1", "restaurant 1", "user 3", "assistant 3"} <= set(lines)


@pytest.mark.parametrize("row, field", [
    ({"dialog": ["hi", "hello"], "act": [1], "emotion": [0, 0]}, "act"),
    ({"dialogue_id": "x", "services": [], "turns": {"speaker": [0, 2], "utterance": ["a", "b"]}}, "turns[1].speaker"),
    ({"personality": ["p ."], "utterances": [{"history": ["hi"], "candidates": []}]}, "utterances[0].candidates"),
])
def test_a_malformed_published_row_names_its_field(tmp_path, tiny_base, row, field):
    write_jsonl(tmp_path / "bad.jsonl", [row])
    loaded = load_data(load_recipe(recipe(tmp_path, tiny_base, "bad.jsonl")))
    assert loaded.train == [] and loaded.problems[0].where.field == field
