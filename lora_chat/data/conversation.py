"""The one shape every data format is turned into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import Where

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str  # one of ROLES
    content: str
    train: bool | None = None  # False: never trained even under train_on=assistant; None: follow train_on


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    origin: Where  # file and line the row came from, for every later error
    # What a dataset says about the row besides the turns: MultiWOZ's `domains` (a tuple, used by
    # `data.train[].domains`), DailyDialog's per-utterance `act`/`emotion` labels, a dialogue id.
    meta: dict[str, Any] = field(default_factory=dict)

    def as_dicts(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]
