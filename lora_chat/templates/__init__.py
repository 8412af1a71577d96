"""Chat templates: where one comes from (tokenizer, built-in, file) and the masks it implies.

`load_template` picks the template source; `masks.ChatTemplate` renders with it and finds
which tokens carry loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LorachatError
from ..recipe import LoadedRecipe
from .masks import IGNORE, ChatTemplate, Encoded, TrainOn, mask_labels

BUILTIN_DIR = Path(__file__).parent / "builtin"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jinja"))


def load_template(loaded: LoadedRecipe, tokenizer: Any) -> ChatTemplate:
    """The recipe's template: `file:` wins, then a built-in name, then the tokenizer's own (`auto`)."""
    cfg = loaded.recipe.template
    if cfg.file:
        path = loaded.dir_of("template", "file") / cfg.file
        if not path.is_file():
            raise LorachatError(f"template file not found: {path}", loaded.where("template", "file"))
        return ChatTemplate(path.read_text(encoding="utf-8"), tokenizer, path.name, cfg.system)
    if cfg.name == "auto":
        source = getattr(tokenizer, "chat_template", None)
        if isinstance(source, dict):  # some tokenizers carry several named templates
            source = source.get("default")
        if not source:
            raise LorachatError(
                f"the tokenizer of '{loaded.recipe.base.model}' has no chat template; "
                f"set template.name to one of {', '.join(builtin_names())} or template.file",
                loaded.where("template", "name"))
        return ChatTemplate(source, tokenizer, "auto", cfg.system)
    path = BUILTIN_DIR / f"{cfg.name}.jinja"
    if not path.is_file():
        import difflib

        close = difflib.get_close_matches(cfg.name, builtin_names(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise LorachatError(f"unknown template '{cfg.name}' (built-ins: auto, {', '.join(builtin_names())}){hint}",
                            loaded.where("template", "name"))
    return ChatTemplate(path.read_text(encoding="utf-8"), tokenizer, cfg.name, cfg.system)


__all__ = ["IGNORE", "ChatTemplate", "Encoded", "TrainOn", "builtin_names", "load_template", "mask_labels"]
