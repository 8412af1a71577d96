"""What the chat, serve and router tests share: two tiny adapters trained through `lorachat finetune` (one per
language and domain, each with its domain profile)."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from conftest import build_tiny_base, chat, write_jsonl
from lora_chat.cli import main

EN_ROWS = [chat(f"How long does a building permit take, case {i}?", "The processing time is ten weeks.")
           for i in range(8)]
SV_ROWS = [chat(f"Hej, hur mår du idag, vän {i}?", "Jag mår bra, tack så mycket.") for i in range(8)]


def train_adapter(root: Path, base: Path, name: str, rows: list, language: str | None, domain: str | None,
                  steps: int = 1, lr: float = 1e-3) -> Path:
    """A tiny adapter written by `lorachat finetune` (by default one step: most tests need its files, not its skill)."""
    out = root / "adapters" / name
    if (out / "manifest.json").is_file():
        return out
    data = write_jsonl(root / f"{name}.jsonl", rows)
    output = {"dir": str(out), **({"language": language} if language else {}), **({"domain": domain} if domain else {})}
    recipe = {"name": name, "base": {"model": str(base), "dtype": "float32"},
              "data": {"train": [{"path": str(data)}], "max_length": 128},
              "lora": {"r": 8, "alpha": 16},
              "training": {"max_steps": steps, "batch_size": 2, "grad_accum": 1, "lr": lr, "log_every": 1},
              "output": output}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(main, ["finetune", str(path)])
    assert result.exit_code == 0, result.output
    return out


def tiny_adapters(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, faq-en, talk-sv), built once per test session (the folder is reused across test modules)."""
    root = tmp_path_factory.getbasetemp() / "serve-adapters"
    root.mkdir(exist_ok=True)
    base = root / "base"
    if not (base / "config.json").is_file():
        build_tiny_base(base)
    return (base, train_adapter(root, base, "faq-en", EN_ROWS, "en", "construction"),
            train_adapter(root, base, "talk-sv", SV_ROWS, "sv", "smalltalk"))
