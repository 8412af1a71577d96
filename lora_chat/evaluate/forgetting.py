"""What each adapter learned on its own data and what it cost the base elsewhere: eval's forgetting check.

Every `lorachat eval` also scores the base and every adapter on a *general* held-out set that is not the
adapter's domain (data/general.py: chatterbot-corpus in the adapter's language, the part `data.replay` never
trains on; or `--general FILE`). Per adapter, two paired numbers against the base, as PEFT's method
benchmark and "LoRA Learns Less and Forgets Less" (Biderman et al., TMLR 2024) measure forgetting:

    learned  loss gain on its own data (base loss - adapter loss; > 0 = better) and win rate
    forgot   general loss change (adapter - base; > 0 = worse), and the share of general prompts whose
             greedy reply is identical to the base's (1.0 = the base's behaviour there untouched)

Both losses come with paired bootstrap 95% intervals; an adapter whose general loss rose beyond its interval
(lower bound > 0) is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data import Conversation
from ..data.general import general_rows, shipped_language
from ..data.sources import resolve_path
from ..errors import DataError
from ..runtime import BASE, OpenedAdapter
from .metrics import PRIMARY, win_tie_loss
from .report import Cell, DatasetResult, pool
from .stats import bootstrap_mean, paired_delta

GENERAL_ROWS = 64  # enough for an interval of about +-0.1 nats on the loss change; ~1/3 more eval time
# Greedy agreement is judged on the first tokens of each reply: a reply that turned differs there already,
# and chatterbot's references are one short line.
GENERAL_NEW_TOKENS = 32
CANDIDATES = 2  # conversations read per general row wanted: spares for the ones too long to encode


@dataclass
class GeneralSet:
    """One general held-out set and the adapters scored on it (the base is scored on every one)."""

    name: str
    source: str  # what it was read from, for the report
    language: str | None
    conversations: list[Conversation]
    members: list[str]  # adapter names
    notes: list[str] = field(default_factory=list)


def default_sets(adapters: list[OpenedAdapter], rows: int) -> list[GeneralSet]:
    """The shipped general set per language the adapters have (an adapter without one gets the base's), each
    without the files any of its adapters trained on; candidates for `rows` conversations (see `first`)."""
    groups: dict[str, list[OpenedAdapter]] = {}
    notes: dict[str, list[str]] = {}
    for adapter in adapters:
        language = _language(adapter)
        code, note = shipped_language(language)
        groups.setdefault(code, []).append(adapter)
        if note:
            notes.setdefault(code, []).append(f"{adapter.name}: {note}")
    out = []
    for code, members in groups.items():
        trained = {p: a.name for a in members for p in _training_files(a)}
        general = general_rows(code, "eval", exclude=frozenset(trained))
        found = notes.get(code, []) + [f"left out {p.parent.name}/{p.name}: {trained[p]} trains on it"
                                       for p in general.left_out]
        out.append(GeneralSet(f"general:{code}", f"{general.label} (eval part)", code,
                              general.conversations[:CANDIDATES * rows], [a.name for a in members], found))
    return out


def file_set(path: Path, conversations: list[Conversation], adapters: list[OpenedAdapter], rows: int) -> GeneralSet:
    """`--general FILE`: one set for every adapter, candidates for its first `rows` conversations."""
    return GeneralSet(f"general:{path.stem}", str(path), None, conversations[:CANDIDATES * rows],
                      [a.name for a in adapters])


def first(result: DatasetResult, samples: list, rows: int) -> tuple[DatasetResult, list]:
    """The first `rows` encoded conversations: a candidate longer than data.max_length makes room for the next,
    so every model is scored on `rows` of them where there are that many."""
    notes = []  # not _prepare's count of candidates too long: the ones past the cut were never wanted
    if len(samples) < rows:
        notes.append(f"--general-rows {rows} is more than the {len(samples)} general conversations usable "
                     f"under data.max_length: using all {len(samples)}")
    return replace(result, origins=result.origins[:rows], prompts=result.prompts[:rows],
                   references=result.references[:rows], notes=notes), samples[:rows]


def _language(adapter: OpenedAdapter) -> str | None:
    language = adapter.info.manifest.get("language")
    if language is None and adapter.loaded is not None:
        language = adapter.loaded.recipe.output.language
    return language


def _training_files(adapter: OpenedAdapter) -> list[Path]:
    """The local files an adapter's recipe trains on, resolved as training resolved them."""
    if adapter.loaded is None:
        return []
    out = []
    for i, source in enumerate(adapter.loaded.recipe.data.train):
        try:
            location = resolve_path(source, adapter.loaded.dir_of("data", "train", str(i), "path"))
        except DataError:  # a package gone since training: it cannot be one of the general files either
            continue
        if isinstance(location, Path):
            out.append(location.resolve())
    return out


# ---------------------------------------------------------------- the numbers


def summarise(general: list[GeneralSet], results: list[DatasetResult], own: list[DatasetResult],
              seed: int) -> dict:
    """report.json's `forgetting`: each general set, and per adapter what it learned and what it forgot."""
    sets = [{"name": g.name, "source": g.source, "language": g.language, "samples": len(r.prompts),
             "members": g.members, "notes": g.notes,
             "base_loss": round(sum(r.cells[BASE].nll) / max(1, sum(r.cells[BASE].tokens)), 4)}
            for g, r in zip(general, results)]
    adapters = []
    for g, result in zip(general, results):
        for name in g.members:
            adapters.append({"name": name, "general_set": g.name, **_learned(name, own, seed),
                             **_forgot(result.cells[name], result.cells[BASE], seed)})
    return {"sets": sets, "adapters": adapters}


def _learned(name: str, own: list[DatasetResult], seed: int) -> dict:
    """Gain on the adapter's own eval split, or on every dataset when none is its own (`--data`)."""
    mine = [d for d in own if d.home == name] or own
    adapter, base = pool([d.cells[name] for d in mine]), pool([d.cells[BASE] for d in mine])
    gain = paired_delta(base.nll, adapter.nll, adapter.tokens, seed)  # base - adapter: > 0 = learned
    counts = win_tie_loss([s[PRIMARY] for s in adapter.scores], [s[PRIMARY] for s in base.scores])
    win_rate = (counts["win"] + counts["tie"] / 2) / max(1, len(adapter.scores))
    return {"own": {"datasets": [d.name for d in mine], "samples": len(adapter.nll), "loss_gain": gain.as_dict(),
                    "win_rate": round(win_rate, 4), **counts}}


def _forgot(adapter: Cell, base: Cell, seed: int) -> dict:
    delta = paired_delta(adapter.nll, base.nll, adapter.tokens, seed)  # adapter - base: > 0 = worse
    same = [1.0 if a == b else 0.0 for a, b in zip(adapter.replies, base.replies, strict=True)]
    return {"general": {"samples": len(adapter.nll), "loss_delta": delta.as_dict(),
                        "agreement": bootstrap_mean(same, seed).as_dict()},
            "forgot": bool(delta.low > 0)}


def card_numbers(row: dict) -> dict:
    """An adapter's forgetting numbers for its metrics.json: plain numbers (the card's model-index takes
    those), intervals beside them."""
    own, general = row["own"], row["general"]
    return {"own_loss_gain": own["loss_gain"]["value"], "own_win_rate": own["win_rate"],
            "general_loss_delta": general["loss_delta"]["value"], "general_agreement": general["agreement"]["value"],
            "forgetting": {"general_set": row["general_set"], "forgot": row["forgot"],
                           "ci95": {"own_loss_gain": own["loss_gain"]["ci95"],
                                    "general_loss_delta": general["loss_delta"]["ci95"],
                                    "general_agreement": general["agreement"]["ci95"]}}}
