"""An adapter's domain profile: what its users' prompts look like, kept in the adapter directory for routing.

Built at finetune time from the user turns of the adapter's training conversations (the eval split is left
out, so it can measure the router) and written as `domain_profile.json` beside PEFT's files, so the
manifest lists and hashes it like every other file. Plain JSON, never pickle: feature counts of a
multinomial naive Bayes model over lower-cased word unigrams and character 4-grams (4-grams catch the
shared stems of inflected and compound words, `bygglov` / `bygglovet`, that whole words miss).

One adapter's profile knows nothing of the others; the router compares the profiles of the adapters in
play when it must choose between adapters of one language (`runtime.router`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LorachatError, Where
from ..files import write_text_atomic

PROFILE = "domain_profile.json"
PROFILE_FORMAT = 1
MAX_FEATURES = 4000  # the most frequent features kept: ~100 KB of JSON, and the tail is mostly one-offs
_WORD = re.compile(r"\w+")


def features(text: str) -> Counter[str]:
    """Word unigrams (`w:`) and character 4-grams of each space-padded word (`c:`), lower-cased."""
    found: Counter[str] = Counter()
    for word in _WORD.findall(text.lower()):
        found[f"w:{word}"] += 1
        padded = f" {word} "
        for i in range(len(padded) - 3):
            found[f"c:{padded[i:i + 4]}"] += 1
    return found


@dataclass(frozen=True)
class DomainProfile:
    """Feature counts over an adapter's training prompts; `total` counts all features, kept or not."""

    prompts: int
    total: int
    counts: dict[str, int]

    @classmethod
    def build(cls, prompts: Iterable[str]) -> DomainProfile:
        counts: Counter[str] = Counter()
        n = 0
        for prompt in prompts:
            counts.update(features(prompt))
            n += 1
        # Sorted by count, then name, so the same prompts always write the same file (its sha256 is in the manifest).
        kept = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_FEATURES]
        return cls(prompts=n, total=sum(counts.values()), counts=dict(kept))

    def to_json(self) -> str:
        return json.dumps({"format": PROFILE_FORMAT, "method": "multinomial naive Bayes counts: word unigrams "
                           "and character 4-grams of the user turns of the training conversations",
                           "prompts": self.prompts, "total": self.total, "counts": self.counts},
                          ensure_ascii=False, indent=0) + "\n"

    @classmethod
    def read(cls, adapter_dir: str | Path) -> DomainProfile | None:
        """The profile saved in an adapter directory; None for adapters trained before profiles existed."""
        path = Path(adapter_dir) / PROFILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != PROFILE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this lorachat reads {PROFILE_FORMAT}")
            counts = {str(k): int(v) for k, v in data["counts"].items()}
            return cls(prompts=int(data["prompts"]), total=int(data["total"]), counts=counts)
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LorachatError(f"unreadable domain profile: {err}", Where(path)) from None


def write_profile(adapter_dir: Path, conversations: Iterable) -> Path:
    """Build the profile from the user turns of `conversations` (data.Conversation) and save it in `adapter_dir`."""
    prompts = (m.content for c in conversations for m in c.messages if m.role == "user")
    path = Path(adapter_dir) / PROFILE
    write_text_atomic(path, DomainProfile.build(prompts).to_json())
    return path
