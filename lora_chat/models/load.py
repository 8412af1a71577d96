"""Load what resolve.py found: the tokenizer (with a pad token), the dtype the hardware runs best, the
model in that dtype, optionally 4/8-bit through bitsandbytes (imported only then)."""

from __future__ import annotations

import functools
import logging
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError, Where
from .resolve import ResolvedBase, one_line

if TYPE_CHECKING:  # only for annotations: importing torch here would make `validate` slow
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger("lora_chat.models")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def load_tokenizer(resolved: ResolvedBase, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer; give it a pad token (eos, else unk) if it has none. `padding_side` is left alone."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load the tokenizer of {resolved.model_id} from {resolved.path}: {one_line(err)}",
            Where(field="base.model"),
        ) from err
    if tok.pad_token is None:
        # Reusing an existing token avoids resizing the embeddings; padded positions
        # are masked out of attention and loss, so which token fills them is moot.
        for kind in ("eos", "unk"):
            token = getattr(tok, f"{kind}_token")
            if token is not None:
                tok.pad_token = token
                logger.info("note: the tokenizer of %s has no pad token; padding with its %s token %r",
                            resolved.model_id, kind, token)
                break
        else:
            raise ModelError(
                f"the tokenizer of {resolved.model_id} has no pad, eos or unk token to pad with",
                Where(field="base.model"),
            )
    return tok


_DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def pick_dtype(requested: str = "auto") -> torch.dtype:
    """The torch dtype for `requested`; "auto" picks the fastest one the hardware runs well.

    CUDA: bfloat16 where supported, else float16. CPU: bfloat16 where the CPU has
    native bf16 matmul (AVX512-BF16 / AMX on x86, BF16 on aarch64), else float32.
    `LORACHAT_CPU_BF16=0/1` overrides the CPU probe.
    """
    import torch

    name = requested.strip().lower()
    if name != "auto":
        if name not in _DTYPE_ALIASES:
            raise ModelError(
                f"unknown dtype {requested!r}: use auto, bfloat16, float16 or float32", Where(field="base.dtype")
            )
        return getattr(torch, _DTYPE_ALIASES[name])
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPUs with native bf16 the matmuls run 2.5-4.5x faster than fp32 (dev box with
    # AMX: 387 vs 155 GFLOP/s in one run, 1237 vs 276 at 1024x1024 in another) and
    # memory halves. Without it bf16 is emulated and slower than fp32, so stay fp32.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 matmul in hardware; `LORACHAT_CPU_BF16=0/1` overrides."""
    override = os.environ.get("LORACHAT_CPU_BF16", "").strip().lower()
    if override in _TRUE:
        return True
    if override in _FALSE:
        return False
    if override:
        raise ModelError(f"{override!r} is not 0 or 1", Where(field="LORACHAT_CPU_BF16"))
    return _probe_cpu_bf16()


@functools.lru_cache(maxsize=1)
def _probe_cpu_bf16() -> bool:
    # /proc/cpuinfo names the native instructions. torch's mkldnn check is only the
    # fallback: it also says yes on plain AVX512, where oneDNN emulates bf16 slowly.
    flags = _cpuinfo_flags()
    if flags is not None:
        if platform.machine().lower() in ("aarch64", "arm64"):
            return "bf16" in flags
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - a private torch op; if it is gone, play safe
        return False


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 says flags, arm says Features
            flags.update(value.split())
    return flags or None


def _bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401 - fail here with one clear line, not deep in transformers
    except ImportError as err:
        raise ModelError(
            f"quantization {quantization!r} needs bitsandbytes: pip install bitsandbytes",
            Where(field="base.quantization"),
        ) from err
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        # QLoRA's recipe: NF4 fits normally distributed weights best, double
        # quantization saves ~0.4 bit/param more, compute runs in the training dtype.
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(
    resolved: ResolvedBase,
    *,
    dtype: str = "auto",
    quantization: str = "none",
    trust_remote_code: bool = False,
    for_training: bool = True,
    attn_implementation: str = "auto",
) -> PreTrainedModel:
    """Load the causal LM in `pick_dtype(dtype)`, optionally 4/8-bit (bitsandbytes), with sdpa attention
    (`attn_implementation: auto`; eager where an architecture has no sdpa path) or the one asked for.

    On CUDA the weights load straight onto this process's GPU (`LOCAL_RANK`), which
    bitsandbytes needs anyway; on CPU they stay on CPU. `for_training` turns the KV
    cache off (useless in training, and at odds with gradient checkpointing); else
    the model is put in eval mode. LoRA wrapping and k-bit preparation are the
    caller's job.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = pick_dtype(dtype)
    quant = quantization.strip().lower()
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quant in ("4bit", "8bit"):
        kwargs["quantization_config"] = _bnb_config(quant, torch_dtype)
    elif quant != "none":
        raise ModelError(
            f"unknown quantization {quantization!r}: use none, 4bit or 8bit", Where(field="base.quantization")
        )
    if torch.cuda.is_available():
        # One process per GPU under accelerate/torchrun: each loads onto its own.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}

    attention = "sdpa" if attn_implementation == "auto" else attn_implementation
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(resolved.path), attn_implementation=attention, **kwargs)
        except ValueError as err:
            # Some (remote-code) architectures have no sdpa path; eager is slower but works.
            if attn_implementation != "auto" or "sdpa" not in str(err).lower():
                raise
            logger.info("note: %s does not support sdpa attention; using eager", resolved.model_id)
            model = AutoModelForCausalLM.from_pretrained(str(resolved.path), attn_implementation="eager", **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load base model {resolved.model_id} from {resolved.path}: {one_line(err)}",
            Where(field="base.model"),
        ) from err

    if quant == "4bit":
        from .bnb_cpu import keep_4bit_weights_unpacked

        keep_4bit_weights_unpacked(model)
    if for_training:
        model.config.use_cache = False
    else:
        model.eval()
    return model
