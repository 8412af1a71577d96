"""Preference tuning (`training.method: dpo | orpo`) and held-out pair accuracy in `lorachat eval`, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from rich.console import Console

from conftest import write_jsonl
from lora_chat.cli import main
from lora_chat.data.loading import load_data
from lora_chat.recipe import load_recipe
from train_helpers import finetune, losses, out_dir

PAIR_TRAINING = {"method": "dpo", "max_steps": 4, "batch_size": 2, "grad_accum": 1, "lr": 5e-3, "log_every": 1,
                 "warmup_ratio": 0.0, "gradient_checkpointing": False}


def pair_rows(n: int = 12) -> list[dict]:
    return [{"prompt": f"Question {i}: how long does a building permit take?",
             "chosen": f"Answer {i}: the statutory processing time is ten weeks.",
             "rejected": f"No idea, maybe {i} years."} for i in range(n)]


@pytest.fixture
def dpo_recipe(make_recipe):
    def make(rows=None, name="dpo-run", **sections):
        sections = {"training": PAIR_TRAINING, "data": {"eval": {"split": 0.25}}, **sections}
        return make_recipe(rows if rows is not None else pair_rows(), name=name, **sections)
    return make


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- the format


SHAPES = {
    "explicit prompt (TRL)": {"prompt": "How long?", "chosen": "Ten weeks.", "rejected": "Ages."},
    "prompt turns (lorachat feedback export)": {"messages": [user("How long?")], "chosen": "Ten weeks.",
                                                "rejected": "Ages."},
    "implicit prompt (TRL)": {"chosen": [user("How long?"), assistant("Ten weeks.")],
                              "rejected": [user("How long?"), assistant("Ages.")]},
    "Anthropic HH": {"chosen": "\n\nHuman: How long?\n\nAssistant: Ten weeks.",
                     "rejected": "\n\nHuman: How long?\n\nAssistant: Ages."},
    "UltraFeedback binarized": {"prompt": "How long?", "prompt_id": "ab12", "score_chosen": 8.0,
                                "score_rejected": 3.0, "chosen": [user("How long?"), assistant("Ten weeks.")],
                                "rejected": [user("How long?"), assistant("Ages.")],
                                "messages": [user("How long?"), assistant("Ten weeks.")]},
}


@pytest.mark.parametrize("shape", SHAPES)
def test_published_preference_shapes_are_detected(make_recipe, shape):
    loaded = load_recipe(make_recipe([SHAPES[shape]] * 2))
    data = load_data(loaded)
    assert data.sources[0].format == "preference" and not data.problems
    pair = data.train[0]
    assert [(m.role, m.content) for m in pair.messages] == [("user", "How long?"), ("assistant", "Ten weeks.")]
    assert pair.meta["rejected"].content == "Ages."


def test_earlier_assistant_turns_of_a_prompt_are_context_only(make_recipe):
    row = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How long?\n\nAssistant: Ten weeks.",
           "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: How long?\n\nAssistant: Ages."}
    pair = load_data(load_recipe(make_recipe([row] * 2))).train[0]
    assert [m.train for m in pair.messages] == [None, False, None, None]


BAD_ROWS = {
    "same reply": ({"prompt": "How long?", "chosen": "Ten weeks.", "rejected": " Ten weeks. "},
                   "rejected: chosen and rejected are the same reply: the pair teaches nothing"),
    "empty side": ({"prompt": "How long?", "chosen": "Ten weeks.", "rejected": "  "}, "rejected: the reply is empty"),
    "empty message side": ({"prompt": "How long?", "chosen": [assistant("")], "rejected": "Ages."},
                           "chosen[0].content: the reply is empty"),
    "prompts differ": ({"chosen": [user("How long?"), assistant("Ten weeks.")],
                        "rejected": [user("How short?"), assistant("Ages.")]},
                       "rejected: chosen and rejected have different prompts (they differ at turn 0)"),
    "side repeats another prompt": ({"prompt": "How long?", "chosen": [user("How short?"), assistant("Ten weeks.")],
                                     "rejected": "Ages."}, "chosen: chosen repeats a prompt that differs from prompt"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_pair_is_one_line_naming_file_line_and_field(dpo_recipe, case):
    row, message = BAD_ROWS[case]
    recipe = dpo_recipe(pair_rows(3) + [row] + pair_rows(3))
    result = finetune(recipe)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"error: {recipe.parent / 'train.jsonl'}:4: {message}"
    assert not out_dir(recipe).exists()  # refused before any weights loaded: nothing written


def test_dpo_with_packing_is_refused_before_anything_loads(dpo_recipe):
    recipe = dpo_recipe(training={**PAIR_TRAINING, "packing": True})
    result = finetune(recipe)
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith(f"error: {recipe}:") and "training.packing: packing: true is not supported with " \
                                                     "method dpo" in line and len(line.splitlines()) == 1


def test_dpo_needs_preference_rows(dpo_recipe):
    rows = [{"messages": [user(f"Q{i}"), assistant(f"A{i}")]} for i in range(6)]
    result = finetune(dpo_recipe(rows))
    assert result.exit_code == 2
    assert "preference tuning needs preference rows (prompt, chosen, rejected)" in result.output


# ---------------------------------------------------------------- training


def _sums_of_trained_logprobs(model, row: dict, side: str) -> float:
    """The reply's summed log-probability, computed here with plain torch from the dataset row."""
    ids = torch.tensor([row[f"{side}_ids"]])
    targets = torch.tensor(row[f"{side}_targets"])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)
    keep = targets != -100
    return float(logp[keep].gather(1, targets[keep][:, None]).sum())


def _run(recipe: Path):
    from lora_chat.train import Options
    from lora_chat.train.preference import PreferenceRun, check

    loaded = load_recipe(recipe)
    check(loaded)
    run = PreferenceRun(loaded, Options(), Console(quiet=True))
    assert run.run() == out_dir(recipe)
    return run


def test_dpo_finetune_writes_a_normal_adapter_whose_card_says_dpo(dpo_recipe):
    recipe = dpo_recipe()
    result = finetune(recipe)
    assert result.exit_code == 0, result.output
    out = out_dir(recipe)
    from lora_chat.adapters import verify

    assert verify(out) == []
    card = (out / "README.md").read_text()
    assert "| train | method | dpo |" in card and "| train | reference | the base with the adapter disabled |" in card
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["pairs"] == 9 and metrics["eval"]["pairs"] == 3
    assert 0 <= metrics["eval"]["reward_accuracy"] <= 1
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert losses(out)[4] < losses(out)[1]  # the DPO loss starts at log 2 and falls
    assert not (out / "ref").exists()  # only the trained adapter is published


def test_the_reference_is_the_base_with_the_adapter_disabled_not_a_copy(dpo_recipe, tiny_base):
    from transformers import AutoModelForCausalLM

    run = _run(dpo_recipe())
    trainer = run.trainer
    assert trainer.ref_model is None  # no second model
    assert list(trainer.model.peft_config) == ["default"]  # TRL's frozen "ref" adapter is gone after its pass
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    row = trainer.train_dataset[0]
    for side in ("chosen", "rejected"):
        assert row[f"ref_{side}_logps"] == pytest.approx(_sums_of_trained_logprobs(base, row, side), abs=1e-4)


def test_orpo_trains_without_any_reference(dpo_recipe):
    run = _run(dpo_recipe(training={**PAIR_TRAINING, "method": "orpo"}))
    assert "ref_chosen_logps" not in run.trainer.train_dataset.column_names
    metrics = json.loads((run.target / "metrics.json").read_text())
    assert metrics["train"]["method"] == "orpo" and "reference" not in metrics["train"]


def test_an_interrupted_dpo_run_resumes_to_the_same_losses(dpo_recipe, monkeypatch):
    training = {**PAIR_TRAINING, "save_every": 2}
    whole = dpo_recipe(name="whole", training=training)
    assert finetune(whole).exit_code == 0

    cut = dpo_recipe(name="cut", training=training)
    from lora_chat.train import preference

    real = preference.sequence_logps

    def crash_after_checkpoint_2(model, selector, batch):
        if (out_dir(cut) / "checkpoints" / "checkpoint-2").is_dir():
            raise KeyboardInterrupt  # as a kill would: the run stops mid-step
        return real(model, selector, batch)

    monkeypatch.setattr(preference, "sequence_logps", crash_after_checkpoint_2)
    assert finetune(cut).exit_code != 0
    assert not (out_dir(cut) / "manifest.json").exists()
    monkeypatch.setattr(preference, "sequence_logps", real)
    result = finetune(cut, "--resume")
    assert result.exit_code == 0, result.output
    expected, got = losses(out_dir(whole)), losses(out_dir(cut))
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step


class _FirstBatch(Exception):
    """Raised from a run's fit once the test has what it came for: no need to train."""


def _grads_of_a_training_step(recipe: Path, monkeypatch, step) -> dict[str, torch.Tensor]:
    """`step(trainer, batch)` on the run's first training batch with the LoRA's B drawn at random (as after some
    training), then each LoRA weight's gradient."""
    from lora_chat.train.preference import PreferenceRun

    grads = {}

    def fit(self):
        batch = self.trainer._prepare_inputs(next(iter(self.trainer.get_train_dataloader())))
        self.trainer.model.train()
        self.trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets before each step
        with torch.no_grad():  # B = 0 at init would make every LoRA input (and its dropout) invisible
            for name, p in self.trainer.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
        step(self.trainer, batch)
        grads.update({n: p.grad.clone() for n, p in self.trainer.model.named_parameters() if p.requires_grad})
        raise _FirstBatch

    monkeypatch.setattr(PreferenceRun, "fit", fit)
    with pytest.raises(_FirstBatch):
        _run(recipe)
    return grads


def _pairs_with_longer(side: str) -> list[dict]:
    """pair_rows with the longer reply on `side`: "rejected" makes the step's two passes run in the other order."""
    rows = pair_rows()
    return rows if side == "chosen" else [{**row, "chosen": row["rejected"], "rejected": row["chosen"]} for row in rows]


@pytest.mark.parametrize("longer", ["chosen", "rejected"])
@pytest.mark.parametrize("method,sft_weight", [("dpo", 0.0), ("orpo", 0.0), ("dpo", 1.0)])
def test_a_step_in_two_passes_has_the_gradient_of_the_pair_loss_in_one(dpo_recipe, monkeypatch, method, sft_weight,
                                                                         longer):
    from lora_chat.train.preference import sequence_logps

    def one_pass(trainer, batch):  # both sides in one forward and one backward: the coupled loss as written
        chosen, rejected = sequence_logps(trainer.model, trainer.selector, batch).chunk(2)
        trainer._per_pair(chosen, rejected, batch)[0].mean().backward()

    training = {**PAIR_TRAINING, "method": method, "sft_weight": sft_weight, "batch_size": 3}
    base, rows = {"dtype": "float32"}, _pairs_with_longer(longer)
    split = _grads_of_a_training_step(dpo_recipe(rows, name="split", training=training, base=base), monkeypatch,
                                      lambda trainer, batch: trainer.training_step(trainer.model, batch))
    whole = _grads_of_a_training_step(dpo_recipe(rows, name="whole", training=training, base=base), monkeypatch,
                                      one_pass)
    assert split.keys() == whole.keys() and split
    assert any(g.abs().max() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-4, atol=1e-6, msg=name)


def test_sft_weight_adds_the_chosen_replys_mean_nll_to_each_pairs_dpo_loss(dpo_recipe, monkeypatch):
    from lora_chat.train.preference import sequence_logps

    losses_by_weight = {}

    def pair_losses(trainer, batch):
        with torch.no_grad():
            chosen, rejected = sequence_logps(trainer.model, trainer.selector, batch).chunk(2)
            for weight in (0.0, 0.5):
                trainer.sft_weight = weight
                losses_by_weight[weight] = trainer._per_pair(chosen, rejected, batch)[0]
        tokens = (batch["shift_labels"][:len(chosen)] != -100).sum(dim=1)
        losses_by_weight["nll"] = -chosen / tokens
        trainer.training_step(trainer.model, batch)

    training = {**PAIR_TRAINING, "sft_weight": 0.5, "batch_size": 3}
    _grads_of_a_training_step(dpo_recipe(training=training, base={"dtype": "float32"}), monkeypatch, pair_losses)
    torch.testing.assert_close(losses_by_weight[0.5] - losses_by_weight[0.0], 0.5 * losses_by_weight["nll"])
    assert (losses_by_weight["nll"] > 0).all()


@pytest.mark.parametrize("method", ["orpo", "sft"])
def test_sft_weight_outside_dpo_is_refused_naming_the_key(dpo_recipe, method):
    recipe = dpo_recipe(training={**PAIR_TRAINING, "method": method, "sft_weight": 0.5})
    result = finetune(recipe)
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.startswith(f"error: {recipe}:") and "training.sft_weight: " in line and len(line.splitlines()) == 1
    assert f"sft_weight is for method dpo, not {method}" in line


@pytest.mark.parametrize("longer", ["chosen", "rejected"])
def test_the_side_scored_twice_draws_the_same_dropout_in_its_gradient_pass(dpo_recipe, monkeypatch, longer):
    from lora_chat.train import preference

    real, scored, widths = preference.sequence_logps, [], []

    def scoring(model, selector, batch):
        widths.append(batch["input_ids"].shape[1])
        scored.append(real(model, selector, batch))
        return scored[-1]

    monkeypatch.setattr(preference, "sequence_logps", scoring)
    rows = _pairs_with_longer(longer)
    recipe = dpo_recipe(rows, training={**PAIR_TRAINING, "batch_size": 3}, base={"dtype": "float32"},
                        lora={"dropout": 0.5})
    _grads_of_a_training_step(recipe, monkeypatch, lambda trainer, batch: trainer.training_step(trainer.model, batch))
    value, first, second = scored[-3:]  # the step's three passes: the narrower side twice, the wider between
    assert torch.equal(value, second.detach())
    assert not torch.equal(first.detach(), second.detach())
    assert widths[-2] > widths[-1]  # the wider side's gradient pass first: the other fits in the blocks it freed


def test_dpo_from_an_sft_adapter_starts_from_it_and_uses_it_as_reference(dpo_recipe):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = dpo_recipe(name="sft", training={**PAIR_TRAINING, "method": "sft", "lr": 5e-2,
                                                             "max_steps": 2})  # SFT on the chosen replies
    assert finetune(sft).exit_code == 0
    parent = out_dir(sft)
    run = _run(dpo_recipe(name="dpo-from-sft", base={"model": str(load_recipe(sft).recipe.base.model),
                                                     "dtype": "float32", "adapter": str(parent)}))
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(
        load_recipe(sft).recipe.base.model, dtype=torch.float32), parent)
    row = run.trainer.train_dataset[0]
    assert row["ref_chosen_logps"] == pytest.approx(_sums_of_trained_logprobs(sft_model, row, "chosen"), abs=1e-4)
    card = (run.target / "README.md").read_text()
    assert "| train | reference | the starting adapter (base.adapter), frozen |" in card
    assert f"| train | start | {parent} |" in card


def test_a_start_adapter_with_other_lora_settings_is_refused(dpo_recipe, make_recipe):
    sft = dpo_recipe(name="sft-r4", training={**PAIR_TRAINING, "method": "sft", "max_steps": 1},
                     lora={"r": 4, "alpha": 8})
    assert finetune(sft).exit_code == 0
    recipe = dpo_recipe(name="dpo-r16", base={"model": str(load_recipe(sft).recipe.base.model), "dtype": "float32",
                                              "adapter": str(out_dir(sft))})
    result = finetune(recipe)
    assert result.exit_code == 2
    assert "base.adapter" in result.output and "other LoRA settings than the recipe's lora section (r 4 != 16" \
        in result.output


# ---------------------------------------------------------------- eval


def test_eval_shows_pair_accuracy_beside_the_usual_metrics(dpo_recipe, tmp_path):
    recipe = dpo_recipe(training={**PAIR_TRAINING, "lr": 2e-2})
    assert finetune(recipe).exit_code == 0
    pairs = write_jsonl(tmp_path / "held-out.jsonl", pair_rows(16)[12:])
    result = CliRunner().invoke(main, ["eval", str(out_dir(recipe)), "--pairs", str(pairs), "--no-general",
                                       "--max-new-tokens", "2", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    (held_out,) = report["pairs"]
    assert held_out["name"] == "held-out" and held_out["pairs"] == 4
    assert set(held_out["models"]) == {"base", "dpo-run"}
    for model in held_out["models"].values():
        low, high = model["accuracy"]["ci95"]
        assert low <= model["accuracy"]["value"] <= high
    # DPO on these pairs moves the held-out margin (same prompts, other numbers) towards the chosen reply.
    assert held_out["models"]["dpo-run"]["margin"] > held_out["models"]["base"]["margin"]
    assert "## Pair accuracy" in (tmp_path / "eval" / "report.md").read_text()
    assert "pair accuracy" in result.output
    metrics = json.loads((out_dir(recipe) / "metrics.json").read_text())
    assert metrics["eval"]["pair_accuracy"] == held_out["models"]["dpo-run"]["accuracy"]["value"]


def test_eval_without_preference_data_has_no_pair_section(adapter, tmp_path):
    result = CliRunner().invoke(main, ["eval", str(adapter), "--no-general", "--max-new-tokens", "2",
                                       "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert "pairs" not in json.loads((tmp_path / "eval" / "report.json").read_text())


def test_pii_mask_masks_the_rejected_reply_too(make_recipe):
    """The rejected reply is trained against: personal data in it is found and masked like the chosen one's."""
    rows = [{"prompt": f"Who do I call, case {i}?", "chosen": "The building committee.",
             "rejected": "Mail anna.lindqvist@telia.com or ring 070-123 45 67."} for i in range(4)]
    recipe = make_recipe(rows, data={"pii": "mask", "eval": {"split": 0}})
    pair = load_data(load_recipe(recipe)).train[0]
    assert pair.meta["rejected"].content == "Mail <EMAIL> or ring <PHONE>."
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert "personal data EMAIL in 4 rows" in result.output
