"""The shipped quickstart recipes against the real bundled SmolLM2 tokenizer and the real FAQ data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_chat.cli import main

RECIPES = Path(__file__).parent.parent / "recipes"
pytestmark = pytest.mark.real_model


@pytest.mark.parametrize("recipe", ["quickstart.yaml", "quickstart-sv.yaml"])
def test_quickstart_recipes_validate_on_the_real_tokenizer(recipe):
    result = CliRunner().invoke(main, ["validate", str(RECIPES / recipe)])
    assert result.exit_code == 0, result.output
    assert "sharegpt" in result.output and "503" in result.output and "usable" in result.output


def test_quickstart_preview_trains_the_reply_and_im_end():
    from transformers import AutoTokenizer

    from lora_chat.models import resolve_base

    result = CliRunner().invoke(main, ["preview", str(RECIPES / "quickstart.yaml"), "--json", "--limit", "1"])
    assert result.exit_code == 0, result.output
    sample = json.loads(result.output)
    tok = AutoTokenizer.from_pretrained(resolve_base("HuggingFaceTB/SmolLM2-135M-Instruct", need_weights=False).path)
    trained = tok.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label != -100])
    assert trained.startswith("A bygglov is an official decision") and trained.endswith("<|im_end|>")
    assert "What is a bygglov" not in trained
