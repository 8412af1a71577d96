"""A real adapter, made the way users make one: `lorachat finetune` on the tiny base (one step)."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from conftest import sample_rows, write_jsonl
from lora_chat.cli import main


def finetune_adapter(root: Path, base: Path, name: str = "faq-en") -> Path:
    """Train `name` for one step on `base` under `root`, with a domain and a language; return its folder."""
    write_jsonl(root / "train.jsonl", sample_rows())
    recipe = {"name": name, "base": {"model": str(base), "dtype": "float32"},
              "data": {"train": [{"path": "train.jsonl"}], "max_length": 128},
              "training": {"max_steps": 1, "batch_size": 2, "grad_accum": 1},
              "output": {"dir": str(root / "adapters" / name), "domain": "construction", "language": "en"}}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    result = CliRunner().invoke(main, ["finetune", str(root / f"{name}.yaml")])
    assert result.exit_code == 0, result.output
    return root / "adapters" / name
