"""Recipes: grouped keys, inheritance, overrides, env expansion, and errors that point at a line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lora_chat.errors import LorachatError, RecipeError
from lora_chat.recipe import load_recipe

MINIMAL = """\
name: demo
base:
  model: some/model
data:
  train:
    - path: train.jsonl
"""


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems(path: Path, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, list(overrides))
    return str(info.value).splitlines()


def test_minimal_recipe_gets_documented_defaults(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL)).recipe
    assert (r.template.name, r.data.train_on, r.data.too_long, r.lora.target_modules) == \
        ("auto", "assistant", "drop", "all-linear")
    assert r.training.epochs == 1.0 and r.training.max_steps is None


def test_typo_in_a_key_names_line_and_suggests_the_right_spelling(tmp_path):
    path = write(tmp_path, MINIMAL + "training:\n  batch_sise: 2\n")
    assert problems(path) == [f"{path}:8: training.batch_sise: unknown key 'batch_sise'; did you mean 'batch_size'?"]


def test_key_in_the_wrong_section_says_where_it_belongs(tmp_path):
    path = write(tmp_path, MINIMAL + "training:\n  r: 8\n")
    assert problems(path) == [f"{path}:8: training.r: unknown key 'r' here; it belongs under 'lora:'"]


def test_wrong_type_names_file_line_and_field(tmp_path):
    path = write(tmp_path, MINIMAL + "training:\n  lr: fast\n")
    [line] = problems(path)
    assert line.startswith(f"{path}:8: training.lr:") and "'fast'" in line


def test_a_key_of_several_types_gets_one_line_naming_each(tmp_path):
    """Old behaviour: `auto | true | false` reported 'maybe' once per type, the second on a key ending `.bool`."""
    path = write(tmp_path, MINIMAL + "training:\n  gradient_checkpointing: maybe\n")
    assert problems(path) == [f"{path}:8: training.gradient_checkpointing: Input should be 'auto' or 'offload' or a valid "
                              f"boolean, unable to interpret input (got 'maybe')"]


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, MINIMAL + "lora:\n  rank: 8\ntraining:\n  batch_size: 0\n")
    lines = problems(path)
    assert len(lines) == 2
    assert "lora.rank" in lines[0] and "training.batch_size" in lines[1]


def test_missing_required_section(tmp_path):
    path = write(tmp_path, "name: demo\nbase:\n  model: x\n")
    assert any("data: required key is missing" in p for p in problems(path))


def test_extends_inherits_and_overrides(tmp_path):
    write(tmp_path, MINIMAL + "training:\n  lr: 0.001\n  seed: 7\n", "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\nname: child\ntraining:\n  lr: 0.002\n")
    r = load_recipe(child).recipe
    assert (r.name, r.training.lr, r.training.seed, r.base.model) == ("child", 0.002, 7, "some/model")


def test_inherited_data_paths_resolve_against_the_parent_recipe(tmp_path):
    (tmp_path / "shared").mkdir()
    write(tmp_path / "shared", MINIMAL, "parent.yaml")
    child = write(tmp_path, "extends: shared/parent.yaml\nname: child\n")
    loaded = load_recipe(child)
    assert loaded.dir_of("data", "train", "0", "path") == tmp_path / "shared"


def test_extends_cycle_is_refused(tmp_path):
    write(tmp_path, "extends: b.yaml\n" + MINIMAL, "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(LorachatError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_set_overrides_any_key_with_yaml_typed_values(tmp_path):
    path = write(tmp_path, MINIMAL)
    r = load_recipe(path, ["training.lr=1e-4", "training.packing=true", "lora.target_modules=[q_proj, v_proj]"]).recipe
    assert (r.training.lr, r.training.packing, r.lora.target_modules) == (1e-4, True, ["q_proj", "v_proj"])


def test_set_with_a_typo_is_reported_against_the_flag(tmp_path):
    path = write(tmp_path, MINIMAL)
    [line] = problems(path, ["training.lrr=1"])
    assert line == "--set: training.lrr: unknown key 'lrr'; did you mean 'lr'?"


def test_env_variables_expand_with_defaults_and_types(tmp_path, monkeypatch):
    monkeypatch.setenv("LC_LR", "0.003")
    path = write(tmp_path, MINIMAL + "training:\n  lr: ${LC_LR}\n  seed: ${LC_SEED:-11}\n")
    r = load_recipe(path).recipe
    assert (r.training.lr, r.training.seed) == (0.003, 11)


def test_unset_env_variable_is_an_error_naming_the_line(tmp_path, monkeypatch):
    monkeypatch.delenv("LC_NOPE", raising=False)
    path = write(tmp_path, MINIMAL + "output:\n  dir: ${LC_NOPE}\n")
    assert problems(path) == [f"{path}:8: output.dir: environment variable ${{LC_NOPE}} is not set "
                              f"(use ${{LC_NOPE:-default}})"]


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "name: x\nbase: [unclosed\n")
    with pytest.raises(LorachatError, match=rf"{path}:\d+: invalid YAML"):
        load_recipe(path)


def test_resolved_recipe_round_trips(tmp_path):
    path = write(tmp_path, MINIMAL, "first.yaml")
    resolved = load_recipe(path, ["training.lr=0.01"]).to_yaml()
    again = write(tmp_path, resolved, "again.yaml")
    assert load_recipe(again).to_yaml() == resolved
    assert load_recipe(again).recipe.training.lr == 0.01


def test_shipped_recipes_validate():
    root = Path(__file__).parent.parent / "recipes"
    for path in sorted(root.glob("*.yaml")):
        assert load_recipe(path).recipe.name


def test_resolved_recipe_makes_local_paths_absolute_so_a_copy_elsewhere_still_finds_the_data(tmp_path):
    path = write(tmp_path, MINIMAL + "template:\n  file: chat.jinja\n")
    elsewhere = tmp_path / "adapter"
    elsewhere.mkdir()
    copy = write(elsewhere, load_recipe(path).to_yaml())
    loaded = load_recipe(copy)
    assert loaded.recipe.data.train[0].path == str(tmp_path / "train.jsonl")
    assert loaded.recipe.template.file == str(tmp_path / "chat.jinja")
