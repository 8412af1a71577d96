"""Is this adapter for this base? Answered from manifests and config.json, before any weights load."""

from __future__ import annotations

from typing import Any

from ..errors import LorachatError, Where
from .store import AdapterInfo

COMPAT_KEYS = ("architecture", "hidden_size", "num_hidden_layers", "vocab_size")


def check_compatible(info: AdapterInfo, base_facts: dict[str, Any]) -> None:
    """Refuse (one line) an adapter trained on a base of another architecture or shape."""
    trained = info.manifest.get("base", {})
    diffs = [f"{key} {trained.get(key)} != {base_facts.get(key)}" for key in COMPAT_KEYS
             if trained.get(key) != base_facts.get(key)]
    if diffs:
        raise LorachatError(f"trained on {info.base_model}, which differs from this base: {', '.join(diffs)}",
                            Where(info.path))
