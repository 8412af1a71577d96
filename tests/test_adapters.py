"""The adapter directory API that `eval` and `adapters` build on: read, compatibility, metrics, verify."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_chat.adapters import check_compatible, read_adapter, update_metrics, verify
from lora_chat.cli import main
from lora_chat.errors import LorachatError
from lora_chat.models import model_facts, resolve_base


def facts(**changes) -> dict:
    return {"architecture": "LlamaForCausalLM", "hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 400,
            **changes}


def test_read_adapter_gives_name_manifest_recipe_and_base(adapter, tiny_base):
    info = read_adapter(adapter)
    assert (info.name, info.base_model) == ("faq-en", str(tiny_base))
    assert "name: faq-en" in info.recipe_yaml
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


# ---------------------------------------------------------------- compatibility before weights


def base_variant(tiny_base: Path, folder: Path, *, weights: bool = False, **config_changes) -> Path:
    """A copy of the tiny base with config.json changed (and, unless `weights`, no weights at all:
    the checks below must never need them)."""
    folder.mkdir(parents=True)
    for file in tiny_base.iterdir():
        if weights or not file.name.endswith(".safetensors"):
            shutil.copy(file, folder / file.name)
    config = json.loads((tiny_base / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


def check(adapter, base_dir: Path, **options) -> list[str]:
    base = resolve_base(str(base_dir), need_weights=False)
    return check_compatible(adapter, model_facts(base), base=base, **options)


def test_adapter_passes_on_the_base_it_was_trained_on(adapter, tiny_base):
    assert check(read_adapter(adapter), tiny_base) == []


def test_adapter_for_a_base_of_another_hidden_size_fails_in_eval_before_any_weights(adapter, tiny_base, tmp_path):
    wider = base_variant(tiny_base, tmp_path / "wider", hidden_size=48)  # no weights in this folder
    result = CliRunner().invoke(main, ["eval", str(adapter), "--base", str(wider)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not fit this base: hidden_size 32 != 48" in lines[0], result.stderr


def test_lora_shapes_are_checked_even_when_the_recorded_sizes_agree(adapter, tiny_base, tmp_path):
    """Same hidden size, layers and vocabulary, but a wider MLP: only the tensor shapes tell."""
    wider_mlp = base_variant(tiny_base, tmp_path / "wider-mlp", intermediate_size=80)
    with pytest.raises(LorachatError) as err:
        check(read_adapter(adapter), wider_mlp)
    assert "mlp.down_proj.lora_A: in_features 64 != base 80" in str(err.value)
    assert "mlp.up_proj.lora_B: out_features 64 != base 80" in str(err.value)


def test_another_base_id_with_the_same_shapes_needs_force(adapter, tiny_base, tmp_path):
    moved = base_variant(tiny_base, tmp_path / "moved-base")
    with pytest.raises(LorachatError) as err:
        check(read_adapter(adapter), moved)
    assert "trained on another base: model_id" in str(err.value) and "pass --force" in str(err.value)
    (warning,) = check(read_adapter(adapter), moved, force=True)
    assert "loading anyway (--force)" in warning


def test_eval_force_loads_an_adapter_onto_a_moved_base_with_a_warning(adapter, tiny_base, tmp_path):
    moved = base_variant(tiny_base, tmp_path / "moved-base", weights=True)
    args = ["eval", str(adapter), "--base", str(moved), "--max-samples", "1", "--max-new-tokens", "2",
            "--out", str(tmp_path / "report")]
    refused = CliRunner().invoke(main, args)
    assert refused.exit_code == 2 and "pass --force" in refused.stderr
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "warning:" in forced.stderr and "loading anyway (--force)" in forced.stderr


def test_plain_peft_adapter_is_checked_on_its_config_and_tensor_shapes(adapter, tiny_base, tmp_path):
    (adapter / "manifest.json").unlink()  # as PEFT alone writes it
    assert check(adapter, tiny_base) == []
    wider = base_variant(tiny_base, tmp_path / "wider", hidden_size=48)
    with pytest.raises(LorachatError) as err:
        check(adapter, wider)
    message = str(err.value)
    assert "\n" not in message and "mlp.gate_proj.lora_A: in_features 32 != base 48" in message
    assert "(and " in message  # every tensor is checked; the line names the first few


def test_plain_peft_adapter_needs_the_base_config_to_be_checked(adapter, tiny_base):
    (adapter / "manifest.json").unlink()
    with pytest.raises(LorachatError, match="checked on its tensor shapes, which needs the base's config.json"):
        check_compatible(adapter, facts())
