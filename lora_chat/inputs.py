"""Recipe -> base tokenizer -> template -> data: the inputs every command starts from, no weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import LoadedData, load_data
from .errors import LorachatError
from .models import ResolvedBase, load_tokenizer, refuse_encoder_only, resolve_base
from .recipe import LoadedRecipe
from .templates import ChatTemplate, load_template
from .templates.tokens import AddedTokens, add_template_tokens


@dataclass
class Inputs:
    loaded: LoadedRecipe
    base: ResolvedBase
    tokenizer: Any
    template: ChatTemplate
    data: LoadedData
    added_tokens: AddedTokens | None = None  # template markers added to the tokenizer (templates/tokens.py)


def load_inputs(loaded: LoadedRecipe, need_weights: bool = False, scan: bool = False) -> Inputs:
    """Everything a command needs before it touches model weights, in dependency order, for a recipe the
    command loaded (and so validated) once at its edge. `scan`: every data hygiene check (validate's report)."""
    base_cfg = loaded.recipe.base
    try:
        # config.json first: an encoder-only base is refused before its weights are fetched or exported.
        base = resolve_base(base_cfg.model, base_cfg.revision, need_weights=False)
        refuse_encoder_only(base)
        if need_weights:
            base = resolve_base(base_cfg.model, base_cfg.revision, need_weights=True)
    except LorachatError as err:
        raise type(err)(err.reason, loaded.where("base", "model")) from None
    tokenizer = load_tokenizer(base, trust_remote_code=base_cfg.trust_remote_code)
    template = load_template(loaded, tokenizer)
    # Before any row is encoded: the markers must be single tokens in everything that follows.
    added = add_template_tokens(loaded, tokenizer, template, base.path)
    data = load_data(loaded, scan=scan)
    return Inputs(loaded, base, tokenizer, template, data, added)
