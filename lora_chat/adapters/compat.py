"""Is this adapter for this base? Answered from manifests, config.json and safetensors headers, before any weights load.

Two kinds of difference, treated differently:

- **shape or architecture** (hidden size, layer count, vocabulary, a target module the base does not have, a LoRA
  tensor whose shape does not fit its module): the adapter cannot load, or would load into nonsense. Always an
  error (exit 2).
- **identity** (the base's model id or revision differs from the one the adapter was trained on, while every shape
  fits): a fine-tune of the same architecture, another snapshot, a moved folder. An error unless `force=True`,
  which turns it into a warning the caller shows.

An adapter from another tool (plain PEFT, no `manifest.json`) is checked on its `adapter_config.json` and on the
tensor shapes in the header of `adapter_model.safetensors` (8 bytes of length + JSON; no weights are read).

Callers (every command that loads an adapter) make one call before loading weights::

    base = resolve_base(model, need_weights=False)
    for warning in check_compatible(info_or_path, model_facts(base), base=base, force=force):
        say(f"warning: {warning}")
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

from ..errors import LorachatError, Where
from ..templates.tokens import vllm_refusal
from .store import AdapterInfo, looks_whole, read_adapter

COMPAT_KEYS = ("architecture", "hidden_size", "num_hidden_layers", "vocab_size")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_MAX_HEADER = 100 << 20  # safetensors' own limit for the JSON header
_SHOWN = 3  # problems named in the one-line error before "and N more"

# PEFT's state-dict keys: "base_model.model.<module path>.<kind>[.weight]", adapter name already stripped.
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector|token_adapter\.trainable_tokens_delta)(?:\.weight)?$")


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header alone (no weights read, no torch)."""
    try:
        with Path(path).open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > _MAX_HEADER:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        return {name: list(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        raise LorachatError(f"not a readable safetensors file: {err}", Where(path)) from None


def check_compatible(info: AdapterInfo | str | Path, base_facts: dict[str, Any], *, base: Any = None,
                     force: bool = False) -> list[str]:
    """Refuse (one line, exit 2) an adapter that does not fit this base; return warnings for what `force` let pass.

    `info`: a read lorachat adapter, or a folder (a plain PEFT adapter without a manifest is accepted).
    `base_facts`: `models.model_facts(base)`; may carry `model_id`/`revision` when no `base` is given.
    `base`: the `ResolvedBase` in use. With it the base's identity is compared and every LoRA tensor's shape is
    checked against the module it adapts, built on the meta device from config.json (no weights).
    """
    if not isinstance(info, AdapterInfo):
        folder = Path(info)
        info = read_adapter(folder) if looks_whole(folder) else None
    else:
        folder = info.path
    config = _peft_config(folder)
    problems = _fact_differences(info, base_facts) if info is not None else []
    if base is not None:
        problems += _shape_problems(folder, config, Path(base.path))
    elif info is None or not any(info.manifest.get("base", {}).get(key) for key in COMPAT_KEYS):
        raise LorachatError("no recorded architecture (a plain PEFT adapter): it is checked on its tensor shapes, "
                            "which needs the base's config.json", Where(folder))
    if problems:
        raise LorachatError(f"does not fit this base: {_first(problems)}", Where(folder))

    trained = _trained_identity(info, config)
    current = {"model_id": getattr(base, "model_id", base_facts.get("model_id")),
               "revision": getattr(base, "revision", base_facts.get("revision"))}
    differences = [f"{key} {trained[key]} != {current[key]}" for key in ("model_id", "revision")
                   if trained.get(key) and current.get(key) and trained[key] != current[key]]
    if not differences:
        return []
    message = f"trained on another base: {', '.join(differences)}"
    if not force:
        raise LorachatError(f"{message} (the shapes fit: pass --force to load it anyway)", Where(folder))
    return [f"{folder}: {message}; loading anyway (--force)"]


def _first(problems: list[str]) -> str:
    more = len(problems) - _SHOWN
    return "; ".join(problems[:_SHOWN]) + (f" (and {more} more)" if more > 0 else "")


def _peft_config(folder: Path) -> dict[str, Any]:
    path = folder / PEFT_CONFIG
    if not path.is_file():
        raise LorachatError(f"no {PEFT_CONFIG}: not a PEFT adapter", Where(folder))
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LorachatError(f"unreadable: {err}", Where(path)) from None
    if not isinstance(config, dict):
        raise LorachatError("not a JSON object", Where(path))
    return config


def _fact_differences(info: AdapterInfo, facts: dict[str, Any]) -> list[str]:
    """The manifest's recorded architecture and sizes against the base's; keys a manifest lacks are skipped
    (a manifest written on pull for a foreign adapter records only what its config says)."""
    trained = info.manifest.get("base", {})
    return [f"{key} {trained[key]} != {facts.get(key)}" for key in COMPAT_KEYS
            if trained.get(key) is not None and trained[key] != facts.get(key)]


def _trained_identity(info: AdapterInfo | None, config: dict[str, Any]) -> dict[str, Any]:
    if info is not None:
        recorded = info.manifest.get("base", {})
        return {"model_id": recorded.get("model_id"), "revision": recorded.get("revision")}
    return {"model_id": config.get("base_model_name_or_path"), "revision": config.get("revision")}


def base_parameter_shapes(config_dir: Path) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape of the base, built from config.json on the meta device: no weights, no memory.

    The model class is transformers' own for the architecture, so this holds for any base it knows, not only
    Llama-like ones; remote code is never run.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise LorachatError(f"cannot build this base from its config.json: {err}", Where(config_dir)) from None
    return {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}


def _shape_problems(folder: Path, config: dict[str, Any], base_dir: Path) -> list[str]:
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        raise LorachatError(f"no {PEFT_WEIGHTS} (only safetensors weights are loaded)", Where(folder))
    shapes = safetensors_shapes(weights)
    params = base_parameter_shapes(base_dir)
    transposed = bool(config.get("fan_in_fan_out"))  # GPT-2's Conv1D stores weights as (in, out)
    problems = []
    for key, shape in sorted(shapes.items()):
        match = _LORA_KEY.match(key)
        module, kind = (match["module"], match["kind"]) if match else (key.removeprefix("base_model.model."), None)
        if kind is None:  # modules_to_save: a full copy of the base's tensor
            module = re.sub(r"\.modules_to_save(\.[^.]+)?(?=\.)", "", module)
            expected = params.get(module)
            if expected is None:
                problems.append(f"{key}: the base has no {module}")
            elif tuple(shape) != expected:
                problems.append(f"{module} {list(expected)} != {shape}")
            continue
        weight = params.get(f"{module}.weight")
        if weight is None:
            problems.append(f"{module}: no such module in this base")
            continue
        problem = _lora_shape_problem(kind, shape, weight, transposed)
        if problem:
            problems.append(f"{module}.{kind}: {problem}")
    return problems


def _lora_shape_problem(kind: str, shape: list[int], weight: tuple[int, ...], transposed: bool) -> str | None:
    """The one dimension of an adapter tensor that must equal a dimension of the base's weight, compared."""
    if kind in ("lora_embedding_A", "lora_embedding_B"):
        rows, dim = weight[0], weight[-1]  # Embedding: (num_embeddings, embedding_dim)
        got, want, what = ((shape[-1], rows, "vocabulary") if kind == "lora_embedding_A"
                           else (shape[0], dim, "embedding width"))
    elif kind == "token_adapter.trainable_tokens_delta":
        got, want, what = shape[-1], weight[-1], "embedding width"
    else:
        # Linear (out, in), conv (out, in, k...); Conv1D transposed. lora_A is (r, in...), lora_B (out, r...).
        out_features, in_features = (weight[1], weight[0]) if transposed else (weight[0], weight[1])
        got, want, what = {"lora_A": (shape[1], in_features, "in_features"),
                           "lora_B": (shape[0], out_features, "out_features"),
                           "lora_magnitude_vector": (shape[0], out_features, "out_features")}[kind]
    return None if got == want else f"{what} {got} != base {want}"


# The ranks vLLM compiles kernels for (`MaxLoRARanks` in vllm/config/lora.py); --max-lora-rank must be one.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# init_lora_weights values that only set the starting weights, so the saved adapter is a plain LoRA.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")


def vllm_problems(adapter_dir: Path) -> list[str]:
    """What stops vLLM from loading this adapter, read from PEFT's adapter_config.json (empty: it loads).

    Mirrors what vLLM's `PEFTHelper.validate_legal` refuses (vllm/lora/peft_helper.py, 0.32) and what its weight
    loader cannot map; `serve --engine vllm` and `adapters show` both ask it."""
    try:
        config: dict[str, Any] = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"unreadable adapter_config.json: {err}"]
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (lora.variant: dora): vLLM serves plain LoRA only; "
                        "merge it into the base with `lorachat merge` and serve that")
    extra = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if extra:
        problems.append(f"modules_to_save {extra}: vLLM cannot load fully trained modules; "
                        f"train without lora.modules_to_save, or merge the adapter")
    refusal = vllm_refusal(adapter_dir)
    if refusal:
        problems.append(refusal)
    rank = max([int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    if rank > VLLM_RANKS[-1]:
        problems.append(f"rank {rank}: vLLM serves ranks up to {VLLM_RANKS[-1]}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("LoRA bias: vLLM does not load adapter biases")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights when loaded; vLLM cannot do that")
    for key, what in (("layer_replication", "layer replication"), ("alora_invocation_tokens", "activated LoRA"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            problems.append(f"{what} ({key}): vLLM does not support it")
    return problems
