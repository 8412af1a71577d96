"""The adapter directory API that `eval` and `adapters` build on: read, compatibility, metrics, verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_chat.adapters import check_compatible, read_adapter, update_metrics, verify
from lora_chat.cli import main
from lora_chat.errors import LorachatError


@pytest.fixture
def adapter(make_recipe) -> Path:
    recipe = make_recipe(training={"max_steps": 1, "batch_size": 2, "grad_accum": 1})
    result = CliRunner().invoke(main, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    return recipe.parent / "adapters" / "test-run"


def facts(**changes) -> dict:
    return {"architecture": "LlamaForCausalLM", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 400,
            **changes}


def test_read_adapter_gives_name_manifest_recipe_and_base(adapter, tiny_base):
    info = read_adapter(adapter)
    assert (info.name, info.base_model) == ("test-run", str(tiny_base))
    assert "name: test-run" in info.recipe_yaml
    assert info.manifest["seed"] == 42


def test_folder_without_manifest_is_not_an_adapter(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(LorachatError, match="no manifest.json"):
        read_adapter(tmp_path)


def test_compatible_base_passes(adapter):
    check_compatible(read_adapter(adapter), facts(model_type="llama"))


def test_other_base_is_refused_in_one_line(adapter):
    with pytest.raises(LorachatError) as err:
        check_compatible(read_adapter(adapter), facts(hidden_size=576, num_hidden_layers=30))
    message = str(err.value)
    assert "\n" not in message and "hidden_size 32 != 576" in message and "num_hidden_layers 2 != 30" in message


def test_update_metrics_adds_section_card_index_and_refreshes_manifest(adapter):
    update_metrics(adapter, "eval_report", {"chrf": 41.5, "loss": 1.25})
    metrics = json.loads((adapter / "metrics.json").read_text())
    assert metrics["eval_report"] == {"chrf": 41.5, "loss": 1.25} and "train" in metrics
    assert "eval_report chrf" in (adapter / "README.md").read_text()
    assert verify(adapter) == []


def test_verify_reports_a_changed_file(adapter):
    (adapter / "recipe.yaml").write_text("tampered\n")
    problems = verify(adapter)
    assert len(problems) == 1 and "recipe.yaml: sha256 differs" in problems[0]
