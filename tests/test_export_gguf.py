"""`lorachat export ADAPTER --format gguf`: llama.cpp's GGUF LoRA layout, checked tensor by tensor on the tiny
Llama (llama.cpp itself loads it on the bundled SmolLM2 in test_export_real.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from adapter_factory import MOVED, faq_moved, layered, trained_once
from lora_chat.cli import main

PEFT = "base_model.model.model.layers.{}.{}.lora_{}.weight"
MODULES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down"}


@pytest.fixture
def adapter(tmp_path_factory, tiny_base) -> Path:
    return faq_moved(tmp_path_factory, tiny_base)


def export(adapter: Path, out: Path, *more: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["export", str(adapter), "--format", "gguf", "--out", str(out), *more])
    return result.exit_code, result.output


def read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    # GGUFReader gives each tensor in PyTorch order (reversed ne), which is what PEFT's matrices compare to.
    return fields, {t.name: np.array(t.data).reshape(tuple(reversed(t.shape.tolist()))) for t in reader.tensors}


def llama_cpp_rows(out_features: int, heads: int) -> list[int]:
    """Where llama.cpp's rope layout reads each HF output row from: HF keeps, per head, the first halves of the
    rotary pairs then the second halves; llama.cpp interleaves them (pair i = rows 2i, 2i+1)."""
    dim = out_features // heads
    order = []
    for h in range(heads):
        for i in range(dim // 2):
            order += [h * dim + i, h * dim + dim // 2 + i]
    return order


def test_gguf_file_has_llama_cpps_adapter_layout(adapter, tiny_base, tmp_path):
    out = tmp_path / "faq.gguf"
    code, output = export(adapter, out)
    assert code == 0, output
    fields, tensors = read(out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 8.0
    assert set(tensors) == {f"blk.{n}.{name}.weight.lora_{ab}" for n in (0, 1) for name in MODULES.values()
                            for ab in "ab"}

    config = json.loads((tiny_base / "config.json").read_text())
    peft = load_file(adapter / "adapter_model.safetensors")
    for module, name in MODULES.items():
        a, b = peft[PEFT.format(1, module, "A")].numpy(), peft[PEFT.format(1, module, "B")].numpy()
        got_a, got_b = tensors[f"blk.1.{name}.weight.lora_a"], tensors[f"blk.1.{name}.weight.lora_b"]
        np.testing.assert_array_equal(got_a, a)  # (r, in): GGUF ne [in, r], as llama.cpp's lora_a
        if module == "self_attn.q_proj":
            b = b[llama_cpp_rows(b.shape[0], config["num_attention_heads"])]
        elif module == "self_attn.k_proj":
            b = b[llama_cpp_rows(b.shape[0], config["num_key_value_heads"])]
        np.testing.assert_array_equal(got_b, b)  # (out, r): GGUF ne [r, out], as llama.cpp's lora_b


def test_export_prints_the_ollama_modelfile_lines(adapter, tmp_path):
    out = tmp_path / "faq.gguf"
    code, output = export(adapter, out)
    assert code == 0, output
    assert f"ADAPTER {out.resolve()}" in output.splitlines()
    assert any(line.startswith("FROM ") for line in output.splitlines())


def test_rslora_scale_is_folded_into_b(tmp_path_factory, tiny_base, tmp_path):
    """llama.cpp scales by alpha / r; PEFT scales rsLoRA by alpha / sqrt(r), so B carries sqrt(r) more."""
    rslora = trained_once(tmp_path_factory, "faq-rslora", tiny_base, **layered(MOVED, {"lora": {"variant": "rslora"}}))
    out = tmp_path / "rslora.gguf"
    code, output = export(rslora, out)
    assert code == 0, output
    _, tensors = read(out)
    b = load_file(rslora / "adapter_model.safetensors")[PEFT.format(0, "self_attn.v_proj", "B")].numpy()
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"], b * math.sqrt(4), rtol=1e-6)


def test_dora_adapter_is_refused_in_one_line(tmp_path_factory, tiny_base, tmp_path):
    dora = trained_once(tmp_path_factory, "faq-dora", tiny_base, **layered(MOVED, {"lora": {"variant": "dora"}}))
    out = tmp_path / "dora.gguf"
    code, output = export(dora, out)
    assert code == 2
    assert output.strip().splitlines() == [
        f"error: {dora}: llama.cpp cannot load this adapter: DoRA (llama.cpp has no magnitude vectors; merge it "
        f"into the base with `lorachat merge` and convert that model instead)"]
    assert not out.exists()


def test_existing_file_is_refused_without_overwrite(adapter, tmp_path):
    out = tmp_path / "taken.gguf"
    out.write_text("mine")
    code, output = export(adapter, out)
    assert code == 2 and "already exists; use --overwrite" in output and out.read_text() == "mine"
    code, output = export(adapter, out, "--overwrite")
    assert code == 0, output
    assert read(out)[0]["general.type"] == "adapter"
    assert [p.name for p in tmp_path.iterdir()] == ["taken.gguf"]
