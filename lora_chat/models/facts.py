"""What a base is, from its config.json alone (no torch, no weights): for manifests and compatibility checks."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ModelError, Where
from .resolve import ResolvedBase, one_line


def model_facts(resolved: ResolvedBase) -> dict[str, Any]:
    """Architecture, sizes and model_type from config.json alone (no torch, no weights)."""
    path = resolved.path / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path}: {one_line(err)}", Where(file=path)) from err
    # Multimodal configs keep the language model's sizes under text_config.
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def get(key: str) -> Any:
        return config.get(key, text.get(key))

    architectures = config.get("architectures") or []
    return {
        "architecture": architectures[0] if architectures else None,
        "hidden_size": get("hidden_size"),
        "num_hidden_layers": get("num_hidden_layers"),
        "vocab_size": get("vocab_size"),
        "model_type": config.get("model_type"),
    }


def stop_token_ids(resolved: ResolvedBase, tokenizer: Any) -> set[int]:
    """The tokenizer's eos plus the base's generation_config.json eos ids: chat models often end a turn with
    a token (`<|im_end|>`, Llama-3's `<|eot_id|>`) that only one of the two names."""
    ids = {tokenizer.eos_token_id}
    path = resolved.path / "generation_config.json"
    if path.is_file():
        try:
            configured = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot read {path}: {one_line(err)}", Where(file=path)) from err
        ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}
