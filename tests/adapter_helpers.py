"""Adapters for runtime and eval tests, made the way users make them: `lorachat finetune` on a recipe."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from conftest import write_jsonl
from lora_chat.cli import main


def finetune_adapter(root: Path, name: str, base: Path, rows: list[dict], *, seed: int = 42,
                     template: str | None = None, **output) -> Path:
    """Train a small LoRA adapter on the tiny base with `lorachat finetune`; return its directory.

    A high learning rate over a few steps moves the LoRA weights far enough from zero that the adapter
    answers differently from the base. `template` is a chat template file the recipe trains with.
    """
    root.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(root / f"{name}.jsonl", rows)
    recipe = {
        "name": name,
        "base": {"model": str(base), "dtype": "float32"},
        "data": {"train": [{"path": str(data)}], "eval": {"split": 0.25}, "max_length": 128},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "o_proj"]},
        "training": {"max_steps": 6, "batch_size": 2, "grad_accum": 1, "lr": 0.05, "seed": seed,
                     "packing": False, "gradient_checkpointing": False},
        "output": {"dir": str(root / name), "domain": "construction", "language": "en", **output},
    }
    if template is not None:
        recipe["template"] = {"file": str(template)}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(main, ["finetune", str(path)])
    assert result.exit_code == 0, result.output
    return root / name
