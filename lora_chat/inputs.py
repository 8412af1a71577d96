"""Recipe -> base tokenizer -> template -> data: the inputs every command starts from, no weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .data import LoadedData, load_data
from .errors import LorachatError
from .models import ResolvedBase, load_tokenizer, resolve_base
from .recipe import LoadedRecipe
from .templates import ChatTemplate, load_template


@dataclass
class Inputs:
    loaded: LoadedRecipe
    base: ResolvedBase
    tokenizer: Any
    template: ChatTemplate
    data: LoadedData


def load_inputs(loaded: LoadedRecipe, need_weights: bool = False) -> Inputs:
    """Everything a command needs before it touches model weights, in dependency order, for a recipe the
    command loaded (and so validated) once at its edge."""
    base_cfg = loaded.recipe.base
    try:
        base = resolve_base(base_cfg.model, base_cfg.revision, need_weights=need_weights)
    except LorachatError as err:
        raise type(err)(err.reason, loaded.where("base", "model")) from None
    tokenizer = load_tokenizer(base, trust_remote_code=base_cfg.trust_remote_code)
    template = load_template(loaded, tokenizer)
    data = load_data(loaded)
    return Inputs(loaded, base, tokenizer, template, data)
