"""Data hygiene as a user meets it: `lorachat validate` shows duplicates, leakage, wrong-language rows and personal
data with their rows; `data.dedup`, `data.language_filter` and `data.pii` drop or mask them in what trains."""

from __future__ import annotations

import hashlib
import json

from click.testing import CliRunner

from lora_chat.cli import main

from conftest import chat, write_jsonl
from train_helpers import finetune

SWEDISH = "pkg:chatterbot_corpus/data/swedish"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def distinct_rows() -> list[dict]:
    """Rows no two of which are alike: different topics, different words."""
    topics = ["roofing felt on a flat roof", "heat pumps for older villas", "drainage around a cellar wall",
              "oak parquet in a kitchen", "balcony railings on a terrace", "solar panels facing east",
              "insulating an attic floor", "replacing wooden windows", "tiling a wet room", "fences along a road"]
    return [chat(f"Tell me about {t}?", f"{t.capitalize()} is a job where planning decides most of the cost.")
            for t in topics]


def row_line(output: str, needle: str) -> str:
    return next(line for line in output.splitlines() if needle in line)


def test_validate_shows_exact_and_near_duplicates_with_their_rows(make_recipe):
    rows = distinct_rows()
    rows.append(chat("TELL me about   roofing felt on a flat roof?",
                     "Roofing felt on a flat roof is a job where planning decides most of the cost."))  # line 11
    rows.append(chat("Tell me about heat pumps for older villas",
                     "is Heat pumps for older villas a job where planning decides most of the cost. "
                     "Ask for a quote first."))  # line 12: punctuation, a swap, a sentence added
    result = run("validate", make_recipe(rows, data={"eval": {"split": 0}}))
    assert result.exit_code == 0, result.output
    assert row_line(result.output, "exact duplicates, within a source").split("│")[2].strip() == "1"
    assert row_line(result.output, "near duplicates, within a source").split("│")[2].strip() == "1"
    assert "train.jsonl:11" in row_line(result.output, "train.jsonl:1 ")
    assert "train.jsonl:2 " in row_line(result.output, "train.jsonl:12")


def test_dedup_drops_duplicates_before_the_split_and_finetune_says_how_many(make_recipe):
    rows = distinct_rows() + [distinct_rows()[0], distinct_rows()[1]]
    rows.append(chat("Tell me about drainage around a cellar wall?",
                     "Drainage around a cellar wall is a job where planning decides most of the cost, we find."))
    recipe = make_recipe(rows, data={"dedup": "near", "eval": {"split": 0}})
    result = finetune(recipe, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "data hygiene (13 conversations): dropped 2 exact duplicates; dropped 1 near duplicates" in result.output
    validated = run("validate", recipe)
    assert row_line(validated.output, "train ").split("│")[2].strip() == "10"  # rows left to train on


def test_dedup_exact_keeps_near_duplicates(make_recipe):
    rows = distinct_rows() + [distinct_rows()[0]]
    rows.append(chat("Tell me about drainage around a cellar wall?",
                     "Drainage around a cellar wall is a job where planning decides most of the cost, we find."))
    result = finetune(make_recipe(rows, data={"dedup": "exact", "eval": {"split": 0}}), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dropped 1 exact duplicates" in result.output and "near duplicates" not in result.output


def test_an_eval_row_that_copies_a_training_row_is_shown_as_leakage(make_recipe, tmp_path):
    eval_rows = [chat("Tell me about oak parquet in a kitchen!",
                      "Oak parquet in a kitchen is a job where planning decides most of the cost. Really.")]
    write_jsonl(tmp_path / "eval.jsonl", eval_rows)
    recipe = make_recipe(distinct_rows(), data={"eval": [{"path": "eval.jsonl"}]})
    result = run("validate", recipe)
    assert result.exit_code == 0, result.output
    assert row_line(result.output, "near duplicates, train/eval").split("│")[2].strip() == "1"
    leak = row_line(result.output, "eval.jsonl:1")
    assert "train.jsonl:4" in leak
    dropped = finetune(make_recipe(distinct_rows(), data={"eval": [{"path": "eval.jsonl"}], "dedup": "near"}),
                       "--dry-run")
    assert "dropped 1 near duplicates" in dropped.output


def test_the_english_conversations_in_chatterbots_swedish_folder_are_found(make_recipe):
    sources = [{"path": f"{SWEDISH}/{name}.yml"} for name in ("greetings", "ai", "food", "sports", "conversations")]
    recipe = make_recipe(data={"train": sources, "eval": {"split": 0}}, output={"language": "sv"})
    result = run("validate", recipe)
    assert result.exit_code == 0, result.output
    assert row_line(result.output, "not in sv").split("│")[2].strip() == "14"
    assert "not in sv (en 14)" in result.output
    examples = [line for line in result.output.splitlines() if f"{SWEDISH}/" in line and " en " in line]
    assert examples and all("conversations.yml" in line for line in examples)

    filtered = finetune(make_recipe(data={"train": sources, "eval": {"split": 0}, "language_filter": True},
                                    output={"language": "sv"}), "--dry-run")
    assert filtered.exit_code == 0, filtered.output
    assert "dropped 14 not in sv" in filtered.output


def test_language_filter_without_a_language_is_one_line_exit_2(make_recipe):
    recipe = make_recipe(data={"language_filter": True})
    result = run("validate", recipe)
    assert result.exit_code == 2
    assert result.output.count("error:") == 1
    assert f"{recipe}:" in result.output and "data.language_filter: needs output.language" in result.output


PERSONAL = [
    ("EMAIL", "Mejla mig på anna.lindqvist@telia.com så svarar jag."),
    ("PHONE", "Ring 070-123 45 67 efter lunch."),
    ("PERSONNUMMER", "Mitt personnummer är 811228-9874."),
    ("CARD", "Kortet 4111 1111 1111 1111 gick inte igenom."),
    ("IBAN", "Betala till SE45 5000 0000 0583 9825 7466."),
    ("IP", "Servern svarar på 192.168.10.20 men inte på 2001:db8::7."),
    ("SECRET", "Our key is sk-proj-4fGh7Jk9Lm2Np5Qr8St1Uv3Wx6Yz0Ab."),
]
PRICES = ["Ett bygglov kostar ofta 12 500 kr och tar 4-6 veckor.", "Huset byggdes år 1987 för SEK 1 250 000.",
          "Öppet kl. 08:30-17:00, ca 25 000-40 000 kr per kvadratmeter, 20 % moms."]


def test_personal_data_is_counted_per_kind_with_row_numbers_and_prices_are_not(make_recipe, tmp_path):
    rows = [chat("Hej, en fråga.", text) for _, text in PERSONAL] + [chat("Vad kostar det?", t) for t in PRICES]
    result = run("validate", make_recipe(rows, data={"eval": {"split": 0}}))
    assert result.exit_code == 0, result.output
    for line, (kind, _) in enumerate(PERSONAL, 1):
        assert row_line(result.output, f"personal data: {kind} ").split("│")[2].strip() == "1"  # rows, not matches
        assert f"personal data {kind} in 1 rows: train.jsonl:{line}" in result.output
    for line in range(len(PERSONAL) + 1, len(rows) + 1):
        assert f"train.jsonl:{line}" not in result.output


def test_pii_mask_trains_placeholders_and_leaves_the_file_alone(make_recipe, tmp_path):
    rows = [chat("Hej, en fråga.", text) for _, text in PERSONAL]
    recipe = make_recipe(rows, data={"pii": "mask", "eval": {"split": 0}})
    before = hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest()
    result = run("preview", recipe, "--limit", "7")
    assert result.exit_code == 0, result.output
    for placeholder in ("<EMAIL>", "<PHONE>", "<PERSONNUMMER>", "<CARD>", "<IBAN>", "<IP>", "<SECRET>"):
        assert placeholder in result.output
    assert "anna.lindqvist@telia.com" not in result.output and "811228-9874" not in result.output
    assert hashlib.sha256((tmp_path / "train.jsonl").read_bytes()).hexdigest() == before
    trained = finetune(recipe, "--dry-run")
    assert "masked 1 <CARD>, 1 <EMAIL>, 1 <IBAN>, 2 <IP>, 1 <PERSONNUMMER>, 1 <PHONE>, 1 <SECRET>" in trained.output


def test_pii_drop_leaves_those_conversations_out(make_recipe):
    rows = [chat("Hej, en fråga.", text) for _, text in PERSONAL] + [chat("Vad kostar det?", t) for t in PRICES]
    result = finetune(make_recipe(rows, data={"pii": "drop", "eval": {"split": 0}}), "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"dropped {len(PERSONAL)} with personal data" in result.output


def test_a_near_threshold_outside_0_1_is_one_line_exit_2(make_recipe):
    for bad in (0, 1.5):
        recipe = make_recipe(data={"near_threshold": bad})
        result = run("validate", recipe)
        assert result.exit_code == 2, result.output
        assert result.output.count("error:") == 1 and "Traceback" not in result.output
        line = next(n for n, text in enumerate(recipe.read_text().splitlines(), 1) if "near_threshold" in text)
        assert f"{recipe}:{line}: data.near_threshold:" in result.output


def faq_texts() -> list[str]:
    from importlib.resources import files

    lines = (files("zaragoza_construction_faq") / "data/faq-en-sharegpt.jsonl").read_text(encoding="utf-8")
    return [" ".join(turn["value"] for turn in json.loads(line)["conversations"]) for line in lines.splitlines()]


def test_related_but_distinct_faq_answers_are_not_taken_for_near_duplicates():
    """The MinHash estimate alone paired three FAQ answers on shared topics (exact Jaccard 0.15-0.60): a pair near
    the rule is decided on the rows' exact features, and the similarity shown is the exact one."""
    from lora_chat.data.hygiene.duplicates import NearIndex, words

    texts = faq_texts()
    index = NearIndex(0.8, seed=42)
    for text in texts:
        index.add(text)
    assert index.pairs() == []
    edited = texts[10] + " Ask the municipality first."
    index.add(edited)
    (pair,) = index.pairs()
    a, b = words(texts[10]), words(edited)
    assert (pair.earlier, pair.later) == (10, len(texts))
    assert pair.similarity == len(a & b) / len(a | b) and pair.contained == 1.0


def test_a_mail_address_at_a_reserved_example_domain_is_not_personal_data():
    from lora_chat.data.hygiene.pii import find_pii

    assert find_pii("pattern matches user@example.com and test@mail.example") == []
    assert [m.kind for m in find_pii("skriv till anna.berg@telia.com")] == ["EMAIL"]


def test_a_bare_yaml_off_for_dedup_means_off(make_recipe):
    recipe = make_recipe()
    recipe.write_text(recipe.read_text().replace("data:\n", "data:\n  dedup: off\n", 1))
    result = run("validate", recipe)
    assert result.exit_code == 0, result.output
