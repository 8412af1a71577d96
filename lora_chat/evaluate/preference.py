"""Held-out pair accuracy: how often a model gives the chosen reply a higher likelihood than the rejected one.

    lorachat eval adapters/faq-dpo adapters/faq-en --pairs data/pairs/faq-eval.jsonl
    lorachat eval adapters/faq-dpo adapters/faq-en        # automatic when the eval data is preference rows

Each pair's two sides are encoded as preference training encodes them (train/preference.py: the same template,
the loss on the reply alone) and scored by the masked loss eval already computes (loss.py), rows of every model
sharing batches. A pair counts 1 when the chosen reply's summed log-probability is higher, 1/2 on a tie, 0 otherwise;
the 95% interval is a seeded bootstrap over pairs (stats.py). Summed, not per-token, log-probabilities: that is
what DPO moves, and a short wrong reply then does not win by being short only if the model has learnt so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.loading import SourceReport, load_data, read_conversations
from ..errors import DataError, Where
from ..recipe import Source
from ..train.preference import encode_pairs
from .loss import sample_losses
from .stats import bootstrap_mean

LOSS_BATCH = 8


@dataclass
class PairSet:
    name: str
    source: str
    chosen: list  # Encoded, one per pair
    rejected: list
    notes: list[str] = field(default_factory=list)
    models: dict[str, dict] = field(default_factory=dict)  # model name -> accuracy estimate, pairs, margin


def gather(adapters: list, sources_by_name: dict, pairs: tuple[Path, ...], data: tuple[Path, ...],
           max_samples: int | None, say: Callable[[str], None] = print) -> list[PairSet]:
    """The pair sets to score, encoded before any weights load: each `--pairs` file; without one, the preference
    rows among the `--data` files or each adapter's own eval split (none: no pair set, and nothing is said)."""
    first = sources_by_name[adapters[0].name]
    candidates: list[tuple[str, str, list, Any]] = []
    if pairs:
        for path in pairs:
            conversations = _read(Path(path), "--pairs")
            if not any("rejected" in c.meta for c in conversations):
                raise DataError("no preference rows (prompt, chosen, rejected) in this file", Where(path, None, "--pairs"))
            candidates.append((Path(path).stem, str(path), conversations, first))
    elif data:
        candidates = [(Path(path).stem, str(path), _read(Path(path), "--data"), first) for path in data]
    else:
        candidates = [(f"{a.info.name}:eval", "recipe.yaml data.eval", load_data(a.loaded).eval,
                       sources_by_name[a.name]) for a in adapters]
    sets = []
    for name, source, conversations, adapter in candidates:
        conversations = [c for c in conversations if "rejected" in c.meta][:max_samples]
        if not conversations:
            continue
        recipe = adapter.adapter.loaded.recipe
        encoded = encode_pairs(conversations, adapter.template, recipe.data.max_length, "drop")
        notes = [f"{n} pairs left out: {why}" for why, n in encoded.dropped.items()]
        for note in notes:
            say(f"note: {name} (pairs): {note}")
        if encoded.chosen:
            sets.append(PairSet(name, source, encoded.chosen, encoded.rejected, notes))
    return sets


def _read(path: Path, option: str) -> list:
    if not path.is_file():
        raise DataError("data file not found", Where(path, None, option))
    report = SourceReport(str(path), str(path), "auto", True)
    problems: list[DataError] = []
    conversations = read_conversations(Source(path=str(path.resolve())), path.parent, report, problems)
    if not conversations and problems:
        raise DataError(f"no usable row ({len(problems)} refused); the first: {problems[0]}", Where(path, None, option))
    return conversations


def score(rt, names: list[str], sets: list[PairSet], seed: int, done: Callable[[int], None] = lambda n: None) -> None:
    """Pair accuracy of every resident in `names` on every set, into `PairSet.models`."""
    finished = 0
    for s in sets:
        samples = s.chosen + s.rejected
        losses = sample_losses(rt, [n for n in names for _ in samples], samples * len(names), LOSS_BATCH,
                               lambda k: done(finished + k))
        finished += len(losses)
        n = len(s.chosen)
        for k, name in enumerate(names):
            nll = [loss for loss, _ in losses[k * 2 * n:(k + 1) * 2 * n]]
            chosen, rejected = nll[:n], nll[n:]
            wins = [1.0 if c < r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)]
            s.models[name] = {"accuracy": bootstrap_mean(wins, seed).as_dict(), "pairs": n,
                              # mean log-probability margin of chosen over rejected (nats per pair)
                              "margin": round(sum(r - c for c, r in zip(chosen, rejected)) / n, 4)}


def summarise(sets: list[PairSet]) -> list[dict]:
    return [{"name": s.name, "source": s.source, "pairs": len(s.chosen), "notes": s.notes, "models": s.models}
            for s in sets]


def card_numbers(report: dict, name: str) -> dict:
    """An adapter's pair accuracy per set for its metrics.json (the first set as a plain number, for the card)."""
    found = [(s["name"], s["models"][name]) for s in report.get("pairs", []) if name in s["models"]]
    if not found:
        return {}
    return {"pair_accuracy": found[0][1]["accuracy"]["value"],
            "pairs": {set_name: {"accuracy": m["accuracy"], "pairs": m["pairs"]} for set_name, m in found}}


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Rows of the report's "Pair accuracy" section: one per set and model."""
    header = ["pairs", "model", "pair accuracy [95% CI]", "margin (nats)", "n"]
    rows = []
    for s in report.get("pairs", []):
        for model, m in s["models"].items():
            a = m["accuracy"]
            rows.append([s["name"], model, f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]",
                         f"{m['margin']:+.2f}", str(m["pairs"])])
    return header, rows
