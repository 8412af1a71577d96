"""Adapters as users get them, made with `lorachat finetune` on a recipe written here.

`finetune_adapter` trains one (any recipe section overridable); `trained_once` does so once per session and key, under
the session's base temp folder, so every module that asks shares it (a finetune is the slow part of most adapter
tests); `quickstart_adapter` trains the quickstart recipe on the bundled SmolLM2 once per session for `real_model`
tests; tests that damage one work on `copy_of` it. The named settings below are the few recipes the modules train
with, layered over `finetune_adapter`'s defaults with `layered`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from click.testing import CliRunner

from conftest import build_tiny_base, chat, sample_rows, write_jsonl
from lora_chat.cli import main

# Two steps at a high learning rate, so B moves well away from zero: the merge, combine and export checks compare
# outputs with and without the adapter. The held-out quarter gives the adapter eval metrics.
MOVED = {"data": {"eval": {"split": 0.25}}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
         "training": {"max_steps": 2, "batch_size": 4, "lr": 2e-2, "warmup_ratio": 0.0, "seed": 7}}

# Six steps at lr 0.05 on the attention projections: the runtime and eval tests need an adapter that answers
# differently from the base (and from another adapter trained on other rows).
DISTINCT = {"data": {"eval": {"split": 0.25}},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]},
            "training": {"max_steps": 6, "lr": 0.05, "seed": 42, "packing": False, "gradient_checkpointing": False},
            "output": {"domain": "construction", "language": "en"}}

# What chat, serve and router serve: rank 8, one step logged (most tests need the files, not the skill).
SERVED = {"lora": {"r": 8, "alpha": 16}, "training": {"lr": 1e-3, "log_every": 1}}

EN_ROWS = [chat(f"How long does a building permit take, case {i}?", "The processing time is ten weeks.")
           for i in range(8)]
SV_ROWS = [chat(f"Hej, hur mår du idag, vän {i}?", "Jag mår bra, tack så mycket.") for i in range(8)]


def layered(*layers: dict) -> dict:
    """Recipe sections merged section by section, later layers winning: layered(MOVED, {"lora": {"r": 8}})."""
    sections: dict = {}
    for layer in layers:
        for section, values in layer.items():
            sections[section] = {**sections.get(section, {}), **values}
    return sections


def finetune_adapter(root: Path, name: str, base_model: Path, rows: list[dict] | None = None, **sections: dict) -> Path:
    """Write `name`.yaml and its data under `root`, train it with `lorachat finetune`, return its folder.

    The defaults are the smallest recipe that trains: one step of batch 2, the recipe's default LoRA, no eval split,
    `sample_rows()` unless `rows` is given, written to data.train's first path (relative paths under `root`).
    Each keyword is a recipe section merged over them, e.g. lora={"r": 8}, template={"file": ...}.
    """
    recipe = {"name": name, **layered({
        "base": {"model": str(base_model), "dtype": "float32"},
        "data": {"train": [{"path": str(root / f"{name}.jsonl")}], "max_length": 128},
        "training": {"max_steps": 1, "batch_size": 2, "grad_accum": 1},
        "output": {"dir": str(root / "adapters" / name)},
    }, sections)}
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl(root / recipe["data"]["train"][0]["path"], sample_rows() if rows is None else rows)
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(main, ["finetune", str(path)])
    assert result.exit_code == 0, result.output
    return Path(recipe["output"]["dir"])


def trained_once(tmp_path_factory, name: str, base_model: Path, rows: list[dict] | None = None, *,
                 key: str | None = None, **sections: dict) -> Path:
    """`finetune_adapter` once per session for each `key` (the name unless given): one key, one recipe."""
    root = tmp_path_factory.getbasetemp() / "trained" / (key or name)
    adapter = root / "adapters" / name
    if not (adapter / "manifest.json").is_file():
        finetune_adapter(root, name, base_model, rows, **sections)
    return adapter


def faq_moved(tmp_path_factory, base_model: Path) -> Path:
    """faq, MOVED, once per session: the adapter the merge, combine and export modules share."""
    return trained_once(tmp_path_factory, "faq", base_model, **MOVED)


def faq_moved_4bit(tmp_path_factory, base_model: Path) -> Path:
    """faq-qlora, MOVED on the 4-bit base, once per session (merge and combine)."""
    return trained_once(tmp_path_factory, "faq-qlora", base_model, **layered(MOVED, {"base": {"quantization": "4bit"}}))


def tiny_adapters(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, faq-en, talk-sv) for chat, serve and router: one per language and domain, each with its domain
    profile, on a tiny base of their own, built once per session."""
    base = tmp_path_factory.getbasetemp() / "trained" / "serve-base"
    if not (base / "config.json").is_file():
        build_tiny_base(base)
    return (base,
            trained_once(tmp_path_factory, "faq-en", base, EN_ROWS, key="serve-faq-en",
                    **layered(SERVED, {"output": {"language": "en", "domain": "construction"}})),
            trained_once(tmp_path_factory, "talk-sv", base, SV_ROWS, key="serve-talk-sv",
                    **layered(SERVED, {"output": {"language": "sv", "domain": "smalltalk"}})))


QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
# The quickstart on the real bundled SmolLM2, cut to a few short unpacked steps at a high learning rate: seconds
# of training, yet enough to change greedy replies, which is what the merge and export checks need.
QUICK = ["training.max_steps=4", "training.grad_accum=1", "training.batch_size=2", "training.packing=false",
         "training.gradient_checkpointing=false", "training.warmup_ratio=0", "training.lr=3e-3",
         "data.max_length=256", "data.eval.max_rows=8"]


def quickstart_adapter(tmp_path_factory) -> Path:
    """The quickstart recipe, QUICK, on the bundled SmolLM2-135M-Instruct, once per session."""
    out = tmp_path_factory.getbasetemp() / "trained" / "quickstart" / "construction-faq-en"
    if not (out / "manifest.json").is_file():
        args = ["finetune", str(QUICKSTART), "--set", f"output.dir={out}"]
        for setting in QUICK:
            args += ["--set", setting]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
    return out


def copy_of(adapter: Path, dest: Path) -> Path:
    """A private copy to damage (the trained ones are shared by the session)."""
    return Path(shutil.copytree(adapter, dest))
