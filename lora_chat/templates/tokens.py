"""Template markers a base's vocabulary lacks: added as special tokens, only their embedding rows trained.

A base without a chat template (GPT-2, a base Llama or Qwen) trained with a chosen template such as
ChatML would otherwise read '<|im_start|>' as seven text pieces, and could end a reply only by writing
'<|im_end|>' piece by piece. With `template.add_special_tokens: auto` (the default):

  1. `add_template_tokens` (called by `inputs.load_inputs`, before any data is encoded, so validate,
     preview and finetune all see the same ids) finds the markers the template writes (`<|name|>`,
     `<name_with_underscores>`) that are not one token of the base's tokenizer, adds them as special
     tokens, and notes which of them ends an assistant turn;
  2. `prepare_model` (called by finetune before LoRA is attached) resizes the embeddings when the new ids
     do not fit, makes the end-of-turn token a stop token of the model's generation config, and returns
     the rows for PEFT's `LoraConfig(trainable_token_indices=...)`: only those rows of the input
     embedding are trained, and of the output layer too — a tied one (GPT-2, SmolLM2) follows the input
     rows through PEFT's tied adapter, an untied one (Llama-3-8B) gets its own;
  3. `AddedTokens.to_manifest` is written into the adapter's manifest (`tokens`), `save_generation_config`
     writes the stop token into the adapter's generation_config.json, and `apply_added_tokens` rebuilds
     the same vocabulary wherever the adapter is loaded again (eval, chat, serve, merge, export).

vLLM's LoRA loader refuses the `trainable_tokens_delta` weights such an adapter carries
(vllm-project/vllm#36501), and the base it serves lacks the added rows anyway: `vllm_refusal` says so and
points to `merge`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LorachatError, Where

MANIFEST_KEY = "tokens"
# `<|im_start|>`, `<|eot_id|>`, `<|end|>` (ChatML, Llama-3, Phi-3) and `<start_of_turn>` (Gemma).
MARKER = re.compile(r"<\|[A-Za-z0-9_.-]+\|>|<[a-z]+(?:_[a-z]+)+>")
_REPLY = "lorachat probe reply"
_PROBE = ({"role": "system", "content": "lorachat probe system"},
          {"role": "user", "content": "lorachat probe user"},
          {"role": "assistant", "content": _REPLY})


@dataclass(frozen=True)
class AddedTokens:
    """What was added to a base's vocabulary for a template, as recorded in the adapter's manifest."""

    markers: tuple[str, ...]  # in the order added
    ids: tuple[int, ...]
    end_of_turn: str | None  # the added marker that closes an assistant turn: the stop token
    vocab_size: int  # embedding rows the model needs: max(the base's rows, the tokenizer's length)
    base_vocab_size: int  # embedding rows of the base as published
    hidden_size: int
    tied: bool  # output layer shares the input embedding

    @property
    def end_of_turn_id(self) -> int | None:
        return self.ids[self.markers.index(self.end_of_turn)] if self.end_of_turn else None

    @property
    def trainable_params(self) -> int:
        """Parameters the new rows add to training: one row per marker in the input embedding, and in
        the output layer unless it is tied to it."""
        return len(self.markers) * self.hidden_size * (1 if self.tied else 2)

    def to_manifest(self) -> dict[str, Any]:
        return {"added": list(self.markers), "ids": list(self.ids), "end_of_turn": self.end_of_turn,
                "vocab_size": self.vocab_size, "base_vocab_size": self.base_vocab_size,
                "hidden_size": self.hidden_size, "tied": self.tied}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> AddedTokens | None:
        entry = manifest.get(MANIFEST_KEY)
        if not entry:
            return None
        return cls(tuple(entry["added"]), tuple(entry["ids"]), entry["end_of_turn"], entry["vocab_size"],
                   entry["base_vocab_size"], entry["hidden_size"], entry["tied"])

    def describe(self) -> str:
        """One line for validate and --dry-run: what was added and what it costs."""
        stop = f"; stop token {self.end_of_turn}" if self.end_of_turn else ""
        layers = "input embedding (the output layer is tied to it)" if self.tied else "input and output embeddings"
        return (f"added special tokens {', '.join(self.markers)} (ids {', '.join(map(str, self.ids))}){stop}; "
                f"their rows of the {layers} are trained: {self.trainable_params:,} parameters")


# ---------------------------------------------------------------- which markers, which is the stop


def _renderings(template: Any) -> list[str]:
    """The template's output for a small probe conversation, with and without system message and prompt."""
    out = []
    for messages in (_PROBE, _PROBE[1:]):  # some templates refuse a system message (Gemma)
        for prompt in (False, True):
            try:
                out.append(template.render(list(messages[:-1] if prompt else messages), prompt))
            except Exception:  # noqa: BLE001 - a template that refuses a probe shape just teaches us less
                continue
    return out


def template_markers(template: Any) -> list[str]:
    """Markers the template writes, in order of first appearance."""
    found: dict[str, None] = {}
    for text in _renderings(template):
        found.update(dict.fromkeys(MARKER.findall(text)))
    return list(found)


def missing_markers(template: Any, tokenizer: Any) -> list[str]:
    """The template's markers that the tokenizer does not read as one token."""
    return [m for m in template_markers(template) if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]


def end_of_turn_marker(template: Any) -> str | None:
    """The marker written right after an assistant reply (layout whitespace aside), if the template has one."""
    for text in _renderings(template):
        end = text.find(_REPLY)
        if end < 0 or text.find(_PROBE[2]["content"], end + 1) >= 0:
            continue
        found = MARKER.search(text, end + len(_REPLY))
        if found and not text[end + len(_REPLY):found.start()].strip():
            return found.group()
    return None


# ---------------------------------------------------------------- setup: tokenizer, then model


def add_template_tokens(loaded: Any, tokenizer: Any, template: Any, base_path: Path) -> AddedTokens | None:
    """Add the template's missing markers to `tokenizer` as special tokens (`template.add_special_tokens:
    auto`); None when nothing was missing or the recipe turned it off. Reads config.json, no weights."""
    if loaded.recipe.template.add_special_tokens is False:
        return None
    missing = missing_markers(template, tokenizer)
    if not missing:
        return None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(base_path), trust_remote_code=loaded.recipe.base.trust_remote_code)
    text = config.get_text_config()
    tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = tuple(tokenizer.convert_tokens_to_ids(missing))
    eot = end_of_turn_marker(template)
    return AddedTokens(tuple(missing), ids, eot if eot in missing else None,
                       vocab_size=max(text.vocab_size, len(tokenizer)), base_vocab_size=text.vocab_size,
                       hidden_size=text.hidden_size, tied=bool(getattr(text, "tie_word_embeddings", False)))


def prepare_model(model: Any, added: AddedTokens | None) -> dict[str, list[int]] | None:
    """Make room for the added tokens in `model` and return LoraConfig's `trainable_token_indices`.

    Call before `get_peft_model`. New rows start at the mean of the old ones (transformers' mean
    resizing), so the new tokens begin as unremarkable guesses rather than random spikes.
    """
    if added is None:
        return None
    embedding = model.get_input_embeddings()
    if embedding.num_embeddings < added.vocab_size:
        on_meta = embedding.weight.device.type == "meta"  # --dry-run: shapes only, nothing to average
        model.resize_token_embeddings(added.vocab_size, mean_resizing=not on_meta)
    _add_stop(model, added)
    names = {module: name for name, module in model.named_modules()}
    rows = {names[model.get_input_embeddings()]: list(added.ids)}
    output = model.get_output_embeddings()
    if output is not None and not added.tied:
        rows[names[output]] = list(added.ids)
    return rows


def _add_stop(model: Any, added: AddedTokens) -> None:
    """Make the end-of-turn token a stop token of the model's generation config (keeping its own)."""
    if added.end_of_turn_id is None:
        return
    current = model.generation_config.eos_token_id
    ids = current if isinstance(current, list) else [current] if current is not None else []
    if added.end_of_turn_id not in ids:
        model.generation_config.eos_token_id = [added.end_of_turn_id, *ids]


def save_generation_config(directory: Path, model: Any, added: AddedTokens | None) -> None:
    """Write the model's generation config (with the end-of-turn stop token) into the adapter directory."""
    if added is not None:
        model.generation_config.save_pretrained(str(directory))


# ---------------------------------------------------------------- loading an adapter again


def restore_tokenizer(tokenizer: Any, manifest: dict[str, Any]) -> AddedTokens | None:
    """Give `tokenizer` the tokens the adapter added, at the same ids; a no-op when it has them already
    (an adapter's own saved tokenizer). Raises LorachatError when the ids cannot match."""
    added = AddedTokens.from_manifest(manifest)
    if added is None:
        return None
    missing = [m for m in added.markers if m not in tokenizer.get_added_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    got = tuple(tokenizer.convert_tokens_to_ids(list(added.markers)))
    if got != added.ids:
        raise LorachatError(
            f"this tokenizer gives the adapter's added tokens {', '.join(added.markers)} the ids "
            f"{', '.join(map(str, got))}, but they were trained as {', '.join(map(str, added.ids))}: load the "
            f"adapter with its own tokenizer, or on the base it was trained on", Where(field="tokens"))
    return added


def apply_added_tokens(model: Any, tokenizer: Any, manifest: dict[str, Any]) -> AddedTokens | None:
    """Rebuild the vocabulary an adapter was trained with: the tokenizer's added tokens, the model's
    embedding rows and its stop token. Call on the base before `PeftModel.from_pretrained` (whose saved
    rows then fill the new ones). None, and nothing changed, for an adapter that added no tokens."""
    added = restore_tokenizer(tokenizer, manifest)
    if added is None:
        return None
    if model.get_input_embeddings().num_embeddings < added.vocab_size:
        # The adapter's saved rows replace the new ones: how they start does not matter.
        model.resize_token_embeddings(added.vocab_size, mean_resizing=False)
    _add_stop(model, added)
    return added


def trains_token_rows(adapter_dir: str | Path) -> bool:
    """Whether an adapter trains embedding rows (PEFT's `trainable_token_indices`)."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        return False
    return bool(json.loads(config.read_text(encoding="utf-8")).get("trainable_token_indices"))


def vllm_refusal(adapter_dir: str | Path) -> str | None:
    """Why vLLM cannot serve this adapter as a LoRA (for the runtime report and `serve --engine vllm`),
    or None when it can as far as its token rows go."""
    if not trains_token_rows(adapter_dir):
        return None
    return (f"{Path(adapter_dir).name} trains embedding rows for tokens it added to the base's vocabulary "
            f"(trainable token rows, PEFT's trainable_token_indices), which vLLM does not load as a LoRA; merge it into the base "
            f"(lorachat merge {adapter_dir} --out DIR) and serve the merged model")
