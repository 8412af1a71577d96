"""`lorachat export ADAPTER --format gguf --out FILE.gguf`: a LoRA adapter as a llama.cpp GGUF LoRA file.

llama.cpp (and so Ollama's `ADAPTER` line and llama-cpp-python's `lora_path`) loads it on top of a GGUF of the
same base. The layout is llama.cpp's own (its convert_lora_to_gguf.py and src/llama-adapter.cpp are the
reference), written here with the `gguf` library:

- metadata: `general.architecture` (llama.cpp's name for the base's architecture; it must match the model's),
  `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` (float32);
- per adapted Linear, the base tensor's GGUF name plus `.lora_a` / `.lora_b`, e.g. `blk.3.attn_q.weight.lora_a`.
  PEFT's A is (r, in) and B is (out, r) in PyTorch order; GGUF stores dimensions reversed, so llama.cpp reads
  ne = [in, r] and [r, out], which is what it multiplies with (`b @ (a @ x)`), and no transpose is needed;
- llama-family models: llama.cpp's GGUF keeps the q_proj and k_proj weights with their rows (output features)
  regrouped for its rotary layout (convert_hf_to_gguf's `LlamaModel.permute`), so B of those two gets the same
  regrouping of its rows, or the adapter would add to the wrong features;
- llama.cpp scales every pair by alpha / r (r read from the tensor). Where PEFT scales otherwise (rsLoRA's
  alpha / sqrt(r), per-module `alpha_pattern` / `rank_pattern`), the ratio is folded into B.

DoRA, `modules_to_save`, trained biases and embedding LoRAs have no place in such a file: one-line errors.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LorachatError, Where
from ..files import current_umask, fsync_dir
from ..models import ResolvedBase
from .source import Parent, open_adapter, refuse_existing, resolve_checked, written_or_nothing

# HF architecture -> (llama.cpp architecture, whether its GGUF regroups q/k rows for rope). The llama family
# is checked end to end (tests/test_export_gguf.py, llama-cpp-python on the bundled SmolLM2 GGUF); Qwen2/3 use
# the same names and no regrouping in llama.cpp's converter.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
FORMATS = ("gguf",)


@dataclass(frozen=True)
class ExportOptions:
    adapter: Path
    out: Path
    format: str = "gguf"
    base: str | None = None  # default: the base the adapter was trained on (only its config.json is read)
    overwrite: bool = False
    force: bool = False  # accept a base of another identity whose shapes fit (a warning, not an error)


@dataclass(frozen=True)
class ExportResult:
    out: Path
    architecture: str
    tensors: int  # lora_a + lora_b
    alpha: float
    base: ResolvedBase


def export_gguf(options: ExportOptions, say: Callable[[str], None] = print) -> ExportResult:
    """Write the GGUF LoRA file atomically (temp file beside --out, fsync, rename)."""
    import gguf
    from safetensors.torch import load_file

    if options.format not in FORMATS:
        raise LorachatError(f"unknown format {options.format!r}: use {', '.join(FORMATS)}", Where(field="--format"))
    out = Path(options.out)
    refuse_existing(out, options.overwrite)
    parent = open_adapter(options.adapter)
    _refuse_unsupported(parent)
    base = resolve_checked(options.base or parent.info.base_model, [parent], say, force=options.force,
                           need_weights=False)
    config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    arch_name = (config.get("architectures") or ["?"])[0]
    if arch_name not in ARCHITECTURES:
        raise LorachatError(f"cannot export for {arch_name}: lorachat writes GGUF LoRA files for "
                            f"{', '.join(ARCHITECTURES)}", Where(parent.path))
    arch, regroup = ARCHITECTURES[arch_name]
    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])

    lora = parent.peft_config
    alpha = float(lora["lora_alpha"])
    tensors = load_file(str(parent.path / "adapter_model.safetensors"))
    pairs = _pairs(tensors, parent)
    say(f"converting {len(pairs)} LoRA pairs for llama.cpp's {arch}")
    rows: list[tuple[str, Any]] = []
    for module, (a, b) in sorted(pairs.items()):
        gguf_name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if gguf_name is None:
            raise LorachatError(f"llama.cpp has no tensor for the adapted module {module}", Where(parent.path))
        rank = a.shape[0]
        b = b.float() * (_peft_scale(lora, module, rank) / (alpha / rank))  # llama.cpp scales by alpha / rank
        if regroup and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config["num_attention_heads"] if module.endswith("q_proj") else \
                config.get("num_key_value_heads") or config["num_attention_heads"]
            b = _regroup_rows(b, heads)
        rows.append((f"{gguf_name}.lora_a", a.float().contiguous().numpy()))
        rows.append((f"{gguf_name}.lora_b", b.contiguous().numpy()))

    staging = _temp_beside(out)
    with written_or_nothing(staging, out):
        writer = gguf.GGUFWriter(str(staging), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_name(parent.info.name)
        for name, array in rows:
            writer.add_tensor(name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(staging, "rb") as f:
            os.fsync(f.fileno())
        os.replace(staging, out)
        fsync_dir(out.parent)
    return ExportResult(out, arch, len(rows), alpha, base)


def modelfile_lines(result: ExportResult) -> list[str]:
    """The Ollama Modelfile lines that put this adapter on a GGUF of its base."""
    from ..models import BUNDLED_MODEL_ID
    from ..models.bundled import gguf_file

    found = gguf_file() if result.base.model_id == BUNDLED_MODEL_ID else None
    base_gguf = str(found[0]) if found else f"/path/to/{result.base.model_id.rstrip('/').split('/')[-1]}.gguf"
    return [f"FROM {base_gguf}", f"ADAPTER {result.out.resolve()}"]


def _refuse_unsupported(parent: Parent) -> None:
    lora = parent.peft_config
    reasons = []
    if lora.get("peft_type", "LORA") != "LORA":
        reasons.append(f"a {lora.get('peft_type')} adapter, not LoRA")
    if lora.get("use_dora"):
        reasons.append("DoRA (llama.cpp has no magnitude vectors; merge it into the base with `lorachat merge` "
                       "and convert that model instead)")
    if lora.get("modules_to_save"):
        reasons.append(f"modules_to_save {lora['modules_to_save']} (whole trained modules have no place in a "
                       f"LoRA file; merge it into the base instead)")
    if lora.get("bias", "none") != "none" or lora.get("lora_bias"):
        reasons.append("trained biases (llama.cpp's LoRA files hold only the A and B matrices)")
    if lora.get("trainable_token_indices"):
        reasons.append("template tokens it added to the base's vocabulary (a LoRA file cannot grow the base GGUF's "
                       "vocabulary; merge it into the base with `lorachat merge` and convert that model instead)")
    if reasons:
        raise LorachatError(f"llama.cpp cannot load this adapter: {'; '.join(reasons)}", Where(parent.path))


def _pairs(tensors: dict[str, Any], parent: Parent) -> dict[str, tuple[Any, Any]]:
    """PEFT's `base_model.model.<module>.lora_A.weight` / `lora_B.weight` as {module: (A, B)}."""
    found: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise LorachatError(f"llama.cpp cannot load this adapter: {key} is not a LoRA A/B matrix of a Linear "
                                f"layer", Where(parent.path))
        found.setdefault(module, {})[kind[0]] = tensor
    incomplete = [m for m, ab in found.items() if set(ab) != {"A", "B"}]
    if incomplete:
        raise LorachatError(f"adapter_model.safetensors lacks A or B for {incomplete[0]}", Where(parent.path))
    return {module: (ab["A"], ab["B"]) for module, ab in found.items()}


def _peft_scale(lora: dict[str, Any], module: str, rank: int) -> float:
    """The scale PEFT applies to B @ A for this module (lora/layer.py: alpha / r, or alpha / sqrt(r) for rsLoRA)."""
    from peft.utils.other import get_pattern_key

    patterns = lora.get("alpha_pattern") or {}
    alpha = patterns.get(get_pattern_key(patterns.keys(), module), lora["lora_alpha"])
    return alpha / math.sqrt(rank) if lora.get("use_rslora") else alpha / rank


def _regroup_rows(b: Any, heads: int) -> Any:
    """Regroup output rows from HF's rotary layout (per head: first halves, then second halves) to llama.cpp's
    interleaved one, as convert_hf_to_gguf does to the q/k weights themselves."""
    out, rank = b.shape  # (out, r)
    return b.reshape(heads, 2, out // heads // 2, rank).swapaxes(1, 2).reshape(out, rank)


def _temp_beside(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.tmp-")
    os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would make the exported file private
    os.close(fd)
    return Path(tmp)
