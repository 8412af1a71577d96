"""`lorachat merge` on the real bundled SmolLM2-135M-Instruct: the merged model equals the quickstart adapter on
its base within 1e-4 in float32; the bfloat16 figure is reported."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from adapter_factory import quickstart_adapter
from lora_chat.cli import main
from lora_chat.merge import MergeOptions, merge_into_base

pytestmark = pytest.mark.real_model


def test_smollm2_merge_equals_the_adapter_on_its_base_in_float32(tmp_path_factory, tmp_path):
    adapter = quickstart_adapter(tmp_path_factory)
    result = merge_into_base(MergeOptions(adapter, tmp_path / "merged", dtype="float32"), say=lambda _: None)
    print(f"SmolLM2 float32: max |logit diff| {result.max_abs_diff:.3g}, mean {result.mean_abs_diff:.3g} "
          f"({result.samples} eval rows, {result.tokens} tokens)")
    assert result.max_abs_diff <= 1e-4
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_smollm2_bfloat16_merge_reports_its_difference(tmp_path_factory, tmp_path):
    adapter = quickstart_adapter(tmp_path_factory)
    out = tmp_path / "merged-bf16"
    run = CliRunner().invoke(main, ["merge", str(adapter), "--out", str(out), "--dtype", "bfloat16"])
    assert run.exit_code == 0, run.output
    print(run.output)
    assert "(bfloat16): max |logit diff|" in run.output
