"""Helpers the training tests share: run `finetune` through the CLI and read what it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from click.testing import CliRunner

from lora_chat.cli import main


def finetune(*args) -> object:
    return CliRunner().invoke(main, ["finetune", *map(str, args)])


def log_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log_lines(out) if "loss" in r}


def out_dir(recipe: Path) -> Path:
    return Path(yaml.safe_load(recipe.read_text())["output"]["dir"])


def slowed_cli(module: str, cls: str, method: str, seconds: float) -> str:
    """A `python -c` program: lorachat's CLI with `module.cls.method` sleeping `seconds` first, so a test can
    signal or kill the run between steps."""
    return f"""
import sys, time
from {module.rsplit('.', 1)[0]} import {module.rsplit('.', 1)[1]} as target
step = target.{cls}.{method}
def slow(self, *a, **k):
    time.sleep({seconds})
    return step(self, *a, **k)
target.{cls}.{method} = slow
from lora_chat.cli import main
main(sys.argv[1:])
"""
