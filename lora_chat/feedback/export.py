"""Recorded feedback as training data: SFT rows and preference pairs, in the formats a recipe reads.

SFT rows (`format: messages`): the prompt's turns, then
    - the edit, where someone wrote what the reply should have said, or
    - the reply itself, where its (last) rating is up and nobody edited it.
Preference pairs (`format: preference`: the prompt's turns as `messages`, `chosen`, `rejected`), the same prompt
on both sides by construction:
    - side by side: the winner's reply chosen, the loser's rejected (a tie makes no pair);
    - an edit: the edit chosen, the reply it corrects rejected;
    - ratings: on the same prompt, every up-voted reply chosen against every down-voted one.
Every text goes through the personal-data detector `validate` uses (`data.hygiene.pii.mask_pii`) before it
is written; rows equal after masking are written once; a pair whose sides are equal or empty is left out.
Each is counted. Both files are written atomically: a failed export leaves no half file.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorachatError, Where
from ..files import write_text_atomic
from .ranking import latest_ratings
from .store import Records, prompt_key, read_records


@dataclass
class Exported:
    """What an export wrote and what it left out, by reason."""

    sft: list[dict] = field(default_factory=list)
    pairs: list[dict] = field(default_factory=list)
    sources: Counter = field(default_factory=Counter)  # "sft: edited", "pairs: side by side", ...
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    masked: Counter = field(default_factory=Counter)  # kind of personal data -> occurrences masked

    def lines(self) -> list[str]:
        out = [f"{key}: {n}" for key, n in sorted(self.sources.items())]
        out += [f"left out, {reason}: {n}" for reason, n in sorted(self.dropped.items())]
        masked = ", ".join(f"{kind} {n}" for kind, n in sorted(self.masked.items()))
        out.append(f"personal data masked: {masked or 'none found'}")
        out.append(f"written: {len(self.sft)} SFT rows, {len(self.pairs)} preference pairs")
        return out


class _Builder:
    def __init__(self) -> None:
        from ..data.hygiene.pii import mask_pii  # the detector `validate` uses

        self._mask_pii = mask_pii
        self.out = Exported()
        self._seen: set[str] = set()
        self._masked: dict[str, str] = {}

    def mask(self, text: str) -> str:
        """The text with personal data masked; each distinct text is counted once, however many rows hold it."""
        if text not in self._masked:
            self._masked[text], found = self._mask_pii(text)
            self.out.masked.update(found)
        return self._masked[text]

    def _keep(self, kind: str, row: dict) -> bool:
        key = kind + json.dumps(row, sort_keys=True, ensure_ascii=False)
        if key in self._seen:
            self.out.dropped[f"{kind} duplicates"] += 1
            return False
        self._seen.add(key)
        return True

    def prompt(self, exchange: dict) -> list[dict]:
        return [{"role": m["role"], "content": self.mask(m["content"])} for m in exchange["messages"]]

    def sft(self, exchange: dict, reply: str, source: str) -> None:
        if not reply.strip():
            self.out.dropped["SFT rows with an empty reply"] += 1
            return
        row = {"messages": [*self.prompt(exchange), {"role": "assistant", "content": self.mask(reply)}]}
        if self._keep("SFT", row):
            self.out.sft.append(row)
            self.out.sources[f"SFT rows from {source}"] += 1

    def pair(self, exchange: dict, chosen: str, rejected: str, source: str) -> None:
        chosen, rejected = self.mask(chosen), self.mask(rejected)
        if not chosen.strip() or not rejected.strip():
            self.out.dropped["pairs with an empty side"] += 1
            return
        if chosen.strip() == rejected.strip():  # as the `preference` reader compares them
            self.out.dropped["pairs whose sides are equal"] += 1
            return
        if exchange["messages"][-1]["role"] != "user":
            self.out.dropped["pairs whose prompt does not end with a user turn"] += 1
            return
        row = {"messages": self.prompt(exchange), "chosen": chosen, "rejected": rejected}
        if self._keep("pair", row):
            self.out.pairs.append(row)
            self.out.sources[f"pairs from {source}"] += 1


def build(records: Records) -> Exported:
    """The rows an export writes, from everything readable in the folder."""
    b = _Builder()
    ratings = latest_ratings(records)
    known = {rid: fb for rid, fb in ratings.items() if rid in records.exchanges}
    if len(known) < len(ratings):
        b.out.dropped["feedback on an exchange not in the folder"] += len(ratings) - len(known)
    by_prompt: dict[str, dict[str, list[dict]]] = {}
    for rid, fb in known.items():
        exchange = records.exchanges[rid]
        if fb.get("edit"):
            b.sft(exchange, fb["edit"], "edits")
            b.pair(exchange, fb["edit"], exchange["reply"], "edits")
        elif fb.get("rating") == "up":
            b.sft(exchange, exchange["reply"], "up-voted replies")
        if fb.get("rating") in ("up", "down"):
            side = by_prompt.setdefault(prompt_key(exchange["messages"]), {"up": [], "down": []})
            side[fb["rating"]].append(exchange)
    for sides in by_prompt.values():
        for good in sides["up"]:
            for bad in sides["down"]:
                b.pair(good, good["reply"], bad["reply"], "up vs down votes on one prompt")
    last: dict[tuple[str, ...], dict] = {}
    for c in records.comparisons:
        last[tuple(sorted(c["responses"]))] = c  # a changed mind: the later verdict
    for c in last.values():
        a, w = (records.exchanges.get(r) for r in c["responses"])
        if a is None or w is None:
            b.out.dropped["side-by-side votes on an exchange not in the folder"] += 1
        elif c["winner"] == "tie":
            b.out.dropped["side-by-side ties (no preference)"] += 1
        elif prompt_key(a["messages"]) != prompt_key(w["messages"]):
            b.out.dropped["side-by-side votes on different prompts"] += 1
        else:
            chosen, rejected = (a, w) if c["winner"] == "a" else (w, a)
            b.pair(chosen, chosen["reply"], rejected["reply"], "side-by-side votes")
    if records.skipped:
        b.out.dropped["unreadable record lines"] += len(records.skipped)
    return b.out


def export(folder: Path, *, sft: Path | None, pairs: Path | None) -> Exported:
    """Build the rows and write the files asked for (JSONL, one row a line)."""
    if sft is None and pairs is None:
        raise LorachatError("name at least one output: --sft OUT.jsonl and/or --pairs OUT.jsonl",
                            Where(field="--sft"))
    for option, path in (("--sft", sft), ("--pairs", pairs)):
        if path is not None and not Path(path).parent.is_dir():
            raise LorachatError(f"{path}: its folder {Path(path).parent} does not exist", Where(field=option))
    out = build(read_records(folder))
    for path, rows in ((sft, out.sft), (pairs, out.pairs)):
        if path is not None:
            write_text_atomic(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out

