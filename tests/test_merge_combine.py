"""`lorachat merge A B --method ... --weights ... --out DIR`: adapters combined by PEFT into one full lorachat
adapter, and every bad combination refused in one line before any weights load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from adapter_factory import MOVED, copy_of, faq_moved, faq_moved_4bit, finetune_adapter, layered, trained_once
from lora_chat.adapters import verify
from lora_chat.cli import main


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("combine")


@pytest.fixture
def base(tiny_base) -> Path:
    return tiny_base


@pytest.fixture
def en(tmp_path_factory, tiny_base) -> Path:
    return faq_moved(tmp_path_factory, tiny_base)


@pytest.fixture
def sv(tmp_path_factory, tiny_base) -> Path:
    """Another rank-4 adapter of the same base and template: trained on the 4-bit base, which combines alike."""
    return faq_moved_4bit(tmp_path_factory, tiny_base)


@pytest.fixture
def rank8(tmp_path_factory, tiny_base) -> Path:
    return trained_once(tmp_path_factory, "faq-r8", tiny_base, **layered(MOVED, {"lora": {"r": 8, "alpha": 16}}))


def merge(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["merge", *map(str, args)])
    return result.exit_code, result.output


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Each adapted module's update, scale * B @ A, as PEFT applies it."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[key.replace(".lora_A.weight", "")] = config["lora_alpha"] / config["r"] * (b @ a)
    return out


def test_cat_adds_the_weighted_updates_exactly_into_a_full_lorachat_adapter(root, en, sv, rank8):
    out = root / "both"
    code, output = merge(en, rank8, "--method", "cat", "--weights", "0.6,0.4", "--out", out)
    assert code == 0, output
    combined, first, second = deltas(out), deltas(en), deltas(rank8)
    assert combined.keys() == first.keys()
    for module, update in combined.items():
        torch.testing.assert_close(update, 0.6 * first[module] + 0.4 * second[module], atol=1e-6, rtol=1e-5)
    assert verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["combined_from"]["method"] == "cat"
    assert [p["name"] for p in manifest["combined_from"]["parents"]] == ["faq", "faq-r8"]
    assert "combined with `lorachat merge --method cat` from `faq` (weight 0.6), `faq-r8` (weight 0.4)" in \
        (out / "README.md").read_text()
    assert (out / "chat_template.jinja").read_text() == (en / "chat_template.jinja").read_text()
    assert yaml.safe_load((out / "recipe.yaml").read_text())["lora"]["r"] == 12


def test_combined_adapter_is_evaluated_by_lorachat_eval(root, en, sv):
    out = root / "for-eval"
    code, output = merge(en, sv, "--method", "linear", "--weights", "0.5,0.5", "--out", out)
    assert code == 0, output
    result = CliRunner().invoke(main, ["eval", str(out), "--max-samples", "2", "--max-new-tokens", "4",
                                       "--out", str(root / "report")])
    assert result.exit_code == 0, result.output
    report = json.loads((root / "report" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["base", "for-eval"]


@pytest.mark.parametrize("method", ["svd", "ties", "dare_ties", "dare_linear", "magnitude_prune"])
def test_every_method_gives_an_adapter_peft_loads(root, base, en, sv, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = root / f"by-{method}"
    code, output = merge(en, sv, "--method", method, "--weights", "0.7,0.3", "--out", out)
    assert code == 0, output
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert verify(out) == []


def other_template(root: Path, base: Path) -> Path:
    return finetune_adapter(root, "faq-zephyr", base, **layered(MOVED, {"template": {"name": "zephyr"}}))


def other_base(root: Path, base: Path) -> Path:
    """The same model at another path counts as another base: lorachat cannot tell two folders' weights apart
    from config.json alone, and a fine-tune of the same shapes would pass any shape check."""
    return finetune_adapter(root, "faq-other-base", Path(shutil.copytree(base, root / "another-base")), **MOVED)


def no_manifest(root: Path, adapter: Path) -> Path:
    broken = copy_of(adapter, root / "no-manifest")
    (broken / "manifest.json").unlink()
    return broken


@pytest.mark.parametrize("args, message", [
    (["--method", "best"], "--method: unknown method 'best': use one of linear, cat, svd, ties, dare_ties, "
                           "dare_linear, magnitude_prune"),
    (["--method", "ties", "--weights", "0.5,0.3,0.2"], "--weights: 3 weights for 2 adapters: give one weight per "
                                                        "adapter, in order"),
    (["--method", "ties", "--weights", "a,b"], "--weights: 'a,b' is not a comma-separated list of numbers, e.g. "
                                                "0.6,0.4"),
    (["--method", "ties", "--density", "0"], "--density: density 0 is outside (0, 1]: it is the share of each "
                                             "adapter's update kept, e.g. 0.5"),
    (["--method", "dare_linear", "--density", "1.5"], "--density: density 1.5 is outside (0, 1]"),
    (["--method", "cat", "--density", "0.5"], "--density: --density applies to dare_linear, dare_ties, "
                                              "magnitude_prune, ties, not to cat"),
    ([], "--method: combining adapters needs --method"),
    (["--method", "cat", "--dtype", "float32"], "--dtype: --dtype applies to merging one adapter into its base"),
])
def test_bad_options_are_one_line_before_any_work(root, en, sv, args, message):
    out = root / "never"
    code, output = merge(en, sv, "--out", out, *args)
    assert code == 2
    assert len(output.strip().splitlines()) == 1 and output.startswith(f"error: {message}")
    assert not out.exists()


@pytest.mark.parametrize("second, method, message", [
    (lambda root, base, rank8: rank8, "ties", "--method: ties needs adapters of equal rank (faq r=4, faq-r8 r=8); "
                                              "use cat or svd, which combine any ranks"),
    (lambda root, base, rank8: other_template(root, base), "cat",
     "its chat_template.jinja differs from faq's: a combined adapter has one template"),
    (lambda root, base, rank8: other_base(root, base), "cat", "trained on another base than faq: model_id"),
    (lambda root, base, rank8: no_manifest(root, rank8), "cat", "not a complete lorachat adapter: no manifest.json"),
])
def test_adapters_that_do_not_combine_are_refused_in_one_line(root, base, en, rank8, second, method, message):
    other = second(root, base, rank8)
    out = root / "never"
    code, output = merge(en, other, "--method", method, "--out", out)
    assert code == 2
    assert len(output.strip().splitlines()) == 1 and message in output, output
    assert not out.exists()


def test_tampered_adapter_is_refused(root, en, sv):
    tampered = copy_of(sv, root / "tampered")
    config = tampered / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora_alpha": 8', '"lora_alpha": 80'))
    code, output = merge(en, tampered, "--method", "cat", "--out", root / "never")
    assert code == 2
    assert f"error: {tampered}: does not match its manifest: {config}: sha256 differs" in output
