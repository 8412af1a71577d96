"""The README's main job in miniature, on the real bundled SmolLM2: fine-tune, then evaluate against the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_chat.cli import main

RECIPE = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
pytestmark = pytest.mark.real_model


def test_finetuned_quickstart_adapter_is_evaluated_against_the_base(tmp_path):
    adapter = tmp_path / "construction-faq-en"
    trained = CliRunner().invoke(main, ["finetune", str(RECIPE), "--set", "training.max_steps=2",
                                        "--set", f"output.dir={adapter}", "--set", "data.eval.max_rows=4"])
    assert trained.exit_code == 0, trained.output
    report_dir = tmp_path / "report"
    evaluated = CliRunner().invoke(main, ["eval", str(adapter), "--max-samples", "3", "--max-new-tokens", "12",
                                          "--out", str(report_dir)])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads((report_dir / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "construction-faq-en"]
    losses = [m["loss"]["value"] for m in report["models"]]
    assert all(0 < loss < 20 for loss in losses) and losses[0] != losses[1]
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    assert "construction-faq-en" in html and "<img" in html  # the side-by-side table and its plots, inline
    assert "eval" in json.loads((adapter / "metrics.json").read_text())
