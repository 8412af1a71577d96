"""Adapters as users get them, made with `lorachat finetune` on the tiny base (or, for `real_model` tests, the
bundled SmolLM2): `finetune_adapter` trains one step with a domain and a language; `train_adapter` a few steps at
a high learning rate with any recipe section overridden, and `trained` / `quickstart_adapter` do so once per
session, shared by the merge, combine and export test modules (a finetune is the slow part of them all); tests
that damage one work on `copy_of` it.
"""

from __future__ import annotations

import shutil
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


def train_adapter(root: Path, name: str, base_model: Path, **sections) -> Path:
    """Train `name` on `base_model` (2 steps at a high learning rate, so B moves well away from zero); keyword
    sections override the recipe's, e.g. lora={"r": 8}."""
    data = write_jsonl(root / f"{name}.jsonl", sample_rows(24))
    recipe = {
        "name": name,
        "base": {"model": str(base_model), "dtype": "float32"},
        "data": {"train": [{"path": data.name}], "max_length": 128, "eval": {"split": 0.25}},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"max_steps": 2, "batch_size": 4, "grad_accum": 1, "lr": 2e-2, "warmup_ratio": 0.0,
                     "seed": 7},
        "output": {"dir": str(root / "adapters" / name)},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values}
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    result = CliRunner().invoke(main, ["finetune", str(path)])
    assert result.exit_code == 0, result.output
    return root / "adapters" / name


QUICKSTART = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
# The quickstart on the real bundled SmolLM2, cut to a few short unpacked steps at a high learning rate: seconds
# of training, yet enough to change greedy replies, which is what the merge and export checks need.
QUICK = ["training.max_steps=4", "training.grad_accum=1", "training.batch_size=2", "training.packing=false",
         "training.gradient_checkpointing=false", "training.warmup_ratio=0", "training.lr=3e-3",
         "data.max_length=256", "data.eval.max_rows=8"]

_TRAINED: dict[str, Path] = {}


def quickstart_adapter(tmp_path_factory) -> Path:
    """The quickstart recipe, QUICK, on the bundled SmolLM2-135M-Instruct, once per session."""
    if "quickstart" not in _TRAINED:
        out = tmp_path_factory.mktemp("quickstart") / "construction-faq-en"
        args = ["finetune", str(QUICKSTART), "--set", f"output.dir={out}"]
        for setting in QUICK:
            args += ["--set", setting]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        _TRAINED["quickstart"] = out
    return _TRAINED["quickstart"]


def trained(tmp_path_factory, name: str, base_model: Path, **sections) -> Path:
    """`train_adapter` once per session and name."""
    if name not in _TRAINED:
        _TRAINED[name] = train_adapter(tmp_path_factory.mktemp(name), name, base_model, **sections)
    return _TRAINED[name]


def copy_of(adapter: Path, dest: Path) -> Path:
    """A private copy to damage (the trained ones are shared by the module)."""
    return Path(shutil.copytree(adapter, dest))
