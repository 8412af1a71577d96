"""What a base is, from its json files alone (no torch, no weights): for manifests, compatibility checks,
and the tokens that end a reply."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ModelError, Where
from .resolve import ResolvedBase, one_line


def read_config(resolved: ResolvedBase) -> dict[str, Any]:
    """The base's config.json as a dict; one line naming the file when it is missing or not a JSON object."""
    path = resolved.path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path}: {one_line(err)}", Where(file=path)) from err
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not a JSON object", Where(file=path))
    return config


def model_facts(resolved: ResolvedBase) -> dict[str, Any]:
    """Architecture, sizes and model_type from config.json alone (no torch, no weights)."""
    config = read_config(resolved)
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


# Encoder-only families: they read text (classification, embeddings) but have no next-token head to chat with.
ENCODER_ONLY = {"albert", "bert", "camembert", "deberta", "deberta-v2", "distilbert", "electra", "ernie",
                "flaubert", "mpnet", "modernbert", "roberta", "xlm-roberta", "xlm-roberta-xl"}
_DECODER_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def refuse_encoder_only(resolved: ResolvedBase) -> None:
    """Refuse (one line, from config.json alone, before any weights load) a base that cannot generate:
    BERT, RoBERTa and their kin, unless their config makes them a decoder (`is_decoder: true`)."""
    config = read_config(resolved)
    architectures = config.get("architectures") or []
    if config.get("is_decoder") or any(a.endswith(_DECODER_HEADS) for a in architectures):
        return
    model_type = config.get("model_type")
    if model_type in ENCODER_ONLY:
        named = f" ({architectures[0]})" if architectures else ""
        raise ModelError(
            f"{resolved.model_id} is an encoder-only model (model_type {model_type}{named}): it reads text but "
            f"cannot write replies; choose a decoder base such as HuggingFaceTB/SmolLM2-135M-Instruct",
            Where(field="base.model"))


def stop_ids(tokenizer: Any, resolved: ResolvedBase) -> list[int]:
    """The token ids that end a reply: the tokenizer's eos plus the base's own generation eos ids.

    Chat models often end a turn with a token only one of the two names (Llama-3 stops on
    `<|eot_id|>`, listed in generation_config.json, while its tokenizer's eos is `<|end_of_text|>`).
    Read as transformers does: generation_config.json, else config.json.
    """
    ids = {tokenizer.eos_token_id}
    for name in ("generation_config.json", "config.json"):
        path = resolved.path / name
        if not path.is_file():
            continue
        try:
            configured = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        except ValueError as err:
            raise ModelError(f"cannot read {path}: {one_line(err)}", Where(file=path)) from err
        if configured is not None:
            ids.update(configured if isinstance(configured, list) else [configured])
            break
    return sorted(i for i in ids if i is not None)
