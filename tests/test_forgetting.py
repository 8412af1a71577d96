"""Forgetting in `lorachat eval`: every adapter against the base on general data outside its domain, and
`data.replay`, which mixes general rows into training. Tiny in-process models; the bundled one in `real_model`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from adapter_factory import DISTINCT, finetune_adapter, layered, quickstart_adapter, trained_once
from conftest import chat, sample_rows, write_jsonl
from lora_chat.cli import main
from lora_chat.data import general
from lora_chat.data.sources import resolve_path
from lora_chat.recipe import load_recipe

RECIPES = Path(__file__).parent.parent / "recipes"
ROWS = "12"  # general conversations per model: enough for an interval, seconds on the tiny model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_base) -> tuple[Path, Path]:
    faq = trained_once(tmp_path_factory, "faq-en", tiny_base, sample_rows(12), key="forget-faq-en",
                       **layered(DISTINCT, {"training": {"seed": 1}}))
    hello = [chat(f"Hello {i}!", f"Hello! How can I help you today? ({i})") for i in range(12)]
    return faq, trained_once(tmp_path_factory, "hello-en", tiny_base, hello, key="forget-hello-en",
                             **layered(DISTINCT, {"training": {"seed": 2}}))


@pytest.fixture(scope="module")
def parrot(tmp_path_factory, tiny_base) -> Path:
    """An adapter drilled on one reply at a high learning rate: it learns its data and forgets the rest."""
    rows = [chat(f"Question {i}?", "Ten weeks.") for i in range(16)]
    return trained_once(tmp_path_factory, "parrot-en", tiny_base, rows, key="forget-parrot",
                        **layered(DISTINCT, {"lora": {"r": 8, "alpha": 16, "target_modules": "all-linear"},
                                             "training": {"max_steps": 30, "lr": 0.05}}))


def run_eval(*args: str):
    return CliRunner().invoke(main, ["eval", *args, "--max-new-tokens", "6", "--general-rows", ROWS],
                              catch_exceptions=False)


def test_eval_shows_learned_vs_forgot_for_every_adapter(adapters, tmp_path):
    result = run_eval(*map(str, adapters), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    forgetting = json.loads((tmp_path / "report.json").read_text())["forgetting"]
    assert [(s["name"], s["samples"]) for s in forgetting["sets"]] == [("general:en", int(ROWS))]
    assert forgetting["sets"][0]["source"] == "chatterbot-corpus english (eval part)"
    assert [a["name"] for a in forgetting["adapters"]] == ["faq-en", "hello-en"]
    for row in forgetting["adapters"]:
        assert row["own"]["datasets"] == [f"{row['name']}:eval"]
        for estimate in (row["own"]["loss_gain"], row["general"]["loss_delta"], row["general"]["agreement"]):
            low, high = estimate["ci95"]
            assert low <= estimate["value"] <= high
        assert 0 <= row["general"]["agreement"]["value"] <= 1 and 0 <= row["own"]["win_rate"] <= 1
    assert "learned (own data) vs forgot" in result.output and "general loss change" in result.output
    markdown, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert "## Learned vs forgot" in markdown and "| hello-en |" in markdown.split("## Learned vs forgot")[1]
    assert "<h2>Learned vs forgot</h2>" in page and 'alt="learned vs forgot' in page


def test_an_adapter_whose_general_loss_rose_beyond_its_interval_is_flagged(parrot, tmp_path):
    other = write_jsonl(tmp_path / "talk.jsonl", [chat(f"Tell me about the weather on day {i}.",
                                                       f"It was sunny and warm, {i} degrees.") for i in range(12)])
    result = run_eval(str(parrot), "--general", str(other), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "out" / "report.json").read_text())["forgetting"]["adapters"][0]
    assert row["general_set"] == "general:talk" and row["forgot"] is True
    assert row["own"]["loss_gain"]["value"] > 0 and row["general"]["loss_delta"]["ci95"][0] > 0
    assert "parrot-en forgot: its loss on general:talk rose by" in " ".join(result.output.split())
    assert "**Warning:** parrot-en forgot" in (tmp_path / "out" / "report.md").read_text()


def test_general_data_the_adapter_learned_is_not_flagged(parrot, tmp_path):
    own = write_jsonl(tmp_path / "own.jsonl", [chat(f"Question {i}?", "Ten weeks.") for i in range(12)])
    result = run_eval(str(parrot), "--general", str(own), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "report.json").read_text())["forgetting"]["adapters"][0]
    assert row["forgot"] is False and row["general"]["loss_delta"]["value"] < 0
    assert "forgot:" not in result.output


def test_both_numbers_reach_metrics_json_and_the_model_card(adapters, tmp_path):
    adapter = Path(shutil.copytree(adapters[0], tmp_path / "faq-en"))
    assert run_eval(str(adapter), "--out", str(tmp_path / "out")).exit_code == 0
    summary = json.loads((adapter / "metrics.json").read_text())["eval"]
    assert {"own_loss_gain", "own_win_rate", "general_loss_delta", "general_agreement"} <= set(summary)
    assert summary["forgetting"]["general_set"] == "general:en"
    assert len(summary["forgetting"]["ci95"]["general_loss_delta"]) == 2
    card = (adapter / "README.md").read_text()
    index = yaml.safe_load(card.split("---")[1])["model-index"][0]
    eval_result = next(r for r in index["results"] if "eval" in r["dataset"]["name"])
    assert {"own_loss_gain", "general_loss_delta"} <= {m["type"] for m in eval_result["metrics"]}
    assert "**Learned vs forgot.**" in card and "general data (general:en)" in card


def test_no_general_skips_the_check(adapters, tmp_path):
    result = run_eval(str(adapters[0]), "--no-general", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "forgetting" not in json.loads((tmp_path / "report.json").read_text())
    assert "vs forgot" not in result.output and "Learned vs forgot" not in (tmp_path / "report.md").read_text()


def test_a_general_file_lorachat_cannot_read_is_one_line_exit_2(adapters, tmp_path, monkeypatch):
    from lora_chat.runtime import adapter_set

    monkeypatch.setattr(adapter_set, "load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    notes = tmp_path / "notes.txt"
    notes.write_text("just some words\n")
    result = run_eval(str(adapters[0]), "--general", str(notes))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {notes}: --general: unsupported file type '.txt' "
                                                  f"(use one of .jsonl, .json, .csv, .parquet, .yml, .yaml)"]


def test_an_adapter_language_without_a_shipped_set_falls_back_to_the_bases_with_a_note(tmp_path, tiny_base):
    rows = [chat(f"Hej, hur mår du, vän {i}?", "Jag mår bra, tack.") for i in range(8)]
    adapter = finetune_adapter(tmp_path, "talk-sv", tiny_base, rows,
                               **layered(DISTINCT, {"training": {"max_steps": 1}, "output": {"language": "sv"}}))
    result = run_eval(str(adapter), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert ("note: general:en: talk-sv: no general set is shipped for language 'sv'" in result.output
            and "using the base's own language 'en'" in " ".join(result.output.split()))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["forgetting"]["adapters"][0]["general_set"] == "general:en"


# ---------------------------------------------------------------- the shipped general set


def _training_files(recipe: Path) -> list[Path]:
    loaded = load_recipe(recipe)
    out = []
    for i, source in enumerate(loaded.recipe.data.train):
        location = resolve_path(source, loaded.dir_of("data", "train", str(i), "path"))
        if isinstance(location, Path):
            out.append(location.resolve())
    return out


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_no_shipped_recipe_trains_on_the_general_set_of_any_language(recipe):
    shipped = {p.resolve() for language in general.FOLDERS for p in general.files_of(language)}
    assert not shipped & set(_training_files(recipe))


def test_the_eval_and_replay_parts_never_share_a_row_whatever_files_are_left_out():
    def keys(rows):
        return {tuple((m.role, m.content) for m in c.messages) for c in rows.conversations}

    for language in general.FOLDERS:
        held, replay = general.general_rows(language, "eval"), general.general_rows(language, "replay")
        assert len(held.conversations) >= 64 or language == "id", language
        assert not keys(held) & keys(replay), language
    some = frozenset(general.files_of("en")[:3])
    assert keys(general.general_rows("en", "eval", exclude=some)) <= keys(general.general_rows("en", "eval"))


# ---------------------------------------------------------------- data.replay


def test_replay_mixes_general_rows_into_training_and_leaves_the_eval_split_as_it_was(make_recipe):
    from lora_chat.data import load_data

    path = make_recipe(sample_rows(40), output={"language": "en"})
    plain = load_data(load_recipe(path))
    mixed = load_data(load_recipe(path, overrides=["data.replay=0.2"]))
    assert [c.origin for c in mixed.eval] == [c.origin for c in plain.eval]
    added = mixed.train[len(plain.train):]
    assert mixed.train[:len(plain.train)] == plain.train
    assert len(added) == round(0.2 / 0.8 * len(plain.train))  # 20% of the training rows, as asked
    assert all("chatterbot_corpus" in str(c.origin.file) for c in added)
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "data.replay=0.2"])
    assert result.exit_code == 0, result.output
    assert "pkg:chatterbot_corpus/data/english (data.replay)" in result.output


def test_replay_never_trains_on_a_row_eval_scores_as_general(make_recipe):
    from lora_chat.data import load_data

    path = make_recipe(sample_rows(300), output={"language": "en"})
    domain_rows = len(load_data(load_recipe(path)).train)
    replayed = load_data(load_recipe(path, overrides=["data.replay=0.5"])).train[domain_rows:]
    assert len(replayed) > 200  # most of the replay part: a chance to meet an eval row if the parts overlapped
    scored = general.general_rows("en", "eval").conversations
    assert {c.messages for c in scored}.isdisjoint({c.messages for c in replayed})


def test_replay_in_a_language_without_a_shipped_set_says_it_uses_the_bases(make_recipe):
    path = make_recipe(sample_rows(8), output={"language": "sv"})
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "data.replay=0.1"])
    assert result.exit_code == 0, result.output
    assert "note: data.replay: no general set is shipped for language 'sv'" in result.output


def test_replay_of_one_or_more_is_refused_in_one_line(make_recipe):
    path = make_recipe()
    result = CliRunner().invoke(main, ["validate", str(path), "--set", "data.replay=1"])
    assert result.exit_code == 2
    assert "data.replay" in result.output and "less than 1" in result.output


# ---------------------------------------------------------------- the interval


def test_the_paired_interval_of_a_difference_is_narrower_than_either_models():
    from lora_chat.evaluate import stats

    hard_and_easy = [float(x) for x in range(1, 41)]  # rows differ a lot, the two models little
    adapter = [x + 0.5 for x in hard_and_easy]
    delta = stats.paired_delta(adapter, hard_and_easy, [1.0] * 40, seed=3)
    alone = stats.bootstrap_ratio(adapter, [1.0] * 40, seed=3)
    assert delta.value == pytest.approx(0.5)
    assert delta.low == pytest.approx(0.5) and delta.high == pytest.approx(0.5)
    assert alone.high - alone.low > 5


@pytest.mark.real_model
def test_the_quickstart_adapter_on_the_bundled_model_reports_its_forgetting(tmp_path_factory, tmp_path):
    adapter = quickstart_adapter(tmp_path_factory)
    result = CliRunner().invoke(main, ["eval", str(adapter), "--max-samples", "8", "--max-new-tokens", "16",
                                       "--general-rows", "24", "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "report.json").read_text())["forgetting"]["adapters"][0]
    assert row["own"]["loss_gain"]["value"] > 0  # it learned its FAQ
    assert row["general"]["agreement"]["value"] < 1  # and changed the base's replies elsewhere
