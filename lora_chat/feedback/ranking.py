"""From recorded votes to figures: per model votes, human win rates with intervals, a Bradley-Terry ranking.

Where someone voted twice on the same thing (changed their mind in the page), the later vote counts: one
rating per response, one verdict per pair of responses.

- **Win rate of A against B**: over the side-by-side votes between them, (wins + ties / 2) / votes, with a
  Wilson score 95% interval (it stays inside [0, 1] and is honest at small n, where the normal one is not).
- **Bradley-Terry**: strengths p with P(A beats B) = p_A / (p_A + p_B), fitted by Hunter's MM iteration
  (Ann. Statist. 32, 2004) with a tie as half a win each way. Every pair of ranked models also gets one
  virtual tie, a weak prior that keeps an unbeaten model finite and joins models no vote connects. Shown on
  the Elo scale (1000 + 400 log10 p: 400 points are 10:1 odds), with a 95% interval from resampling the votes.
- **Too few**: a pair with fewer than MIN_PAIR votes, or a ranking from fewer than MIN_RANKING, is said so
  beside the figure; the figure is still shown, its interval says how little it knows.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from .store import Records

MIN_PAIR = 10  # side-by-side votes under which a pair's win rate is flagged "too few votes"
MIN_RANKING = 20  # votes in all under which the ranking is flagged
RESAMPLES = 1000
Z95 = 1.959964


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion (successes may be fractional: ties count half)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def latest_ratings(records: Records) -> dict[str, dict]:
    """Response id -> its last feedback record (the rating and edit it holds now)."""
    last: dict[str, dict] = {}
    for fb in records.feedback:
        merged = {**last.get(fb["response"], {}), **{k: v for k, v in fb.items() if v is not None}}
        if "rating" in fb and fb["rating"] is None:  # an explicit un-vote clears the rating
            merged.pop("rating", None)
        last[fb["response"]] = merged
    return last


def verdicts(records: Records) -> list[tuple[str, str, float]]:
    """(model a, model b, a's score: 1 win, 0.5 tie, 0 loss) per pair of responses, the last verdict each;
    votes between two replies of the same model tell nothing about models and are left out."""
    last: dict[tuple[str, str], dict] = {}
    for c in records.comparisons:
        last[tuple(sorted(c["responses"]))] = c
    out = []
    for c in last.values():
        a, b = c["models"]
        if a != b:
            out.append((a, b, {"a": 1.0, "b": 0.0, "tie": 0.5}[c["winner"]]))
    return out


def bradley_terry(games: list[tuple[str, str, float]], models: list[str], *, weights: Any = None,
                  iterations: int = 2000, tolerance: float = 1e-10) -> dict[str, float]:
    """Strengths (geometric mean 1) by MM, with one virtual tie per pair of `models` as the prior; `weights`
    (a count per game) is how the bootstrap resamples without rebuilding the list."""
    import numpy as np

    index = {m: i for i, m in enumerate(models)}
    k = len(models)
    off_diagonal = 1.0 - np.eye(k)
    wins, played = 0.5 * off_diagonal, off_diagonal.copy()  # the prior's virtual ties
    if games:
        a = np.array([index[g[0]] for g in games])
        b = np.array([index[g[1]] for g in games])
        score = np.array([g[2] for g in games])
        w = np.ones(len(games)) if weights is None else np.asarray(weights, dtype=float)
        np.add.at(wins, (a, b), w * score)
        np.add.at(wins, (b, a), w * (1.0 - score))
        np.add.at(played, (a, b), w)
        np.add.at(played, (b, a), w)
    total = wins.sum(axis=1)
    p = np.ones(k)
    for _ in range(iterations):
        new = total / (played / (p[:, None] + p[None, :])).sum(axis=1)
        new /= np.exp(np.log(new).mean())
        change = np.abs(new - p).max()
        p = new
        if change < tolerance:
            break
    return {m: float(x) for m, x in zip(models, p)}


def elo(strength: float) -> float:
    return 1000.0 + 400.0 * math.log10(strength)


def rank(records: Records, *, seed: int = 0, resamples: int = RESAMPLES) -> dict[str, Any]:
    """The report's figures: `models` (votes per model), `pairs` (win rates), `ranking`, `notes`."""
    ratings = latest_ratings(records)
    games = verdicts(records)
    per_model: dict[str, Counter] = defaultdict(Counter)
    for exchange in records.exchanges.values():
        per_model[exchange["model"]]["exchanges"] += 1
    for response, fb in ratings.items():
        model = records.exchanges[response]["model"] if response in records.exchanges else fb["model"]
        if fb.get("rating") in ("up", "down"):
            per_model[model][fb["rating"]] += 1
        if fb.get("edit"):
            per_model[model]["edits"] += 1
    for a, b, _ in games:
        per_model[a]["compared"] += 1
        per_model[b]["compared"] += 1
    models = []
    for name in sorted(per_model):
        c = per_model[name]
        rated = c["up"] + c["down"]
        models.append({"model": name, "exchanges": c["exchanges"], "up": c["up"], "down": c["down"],
                       "edits": c["edits"], "compared": c["compared"],
                       "up_rate": _estimate(c["up"], rated)})
    notes = []
    if records.skipped:
        notes.append(f"{len(records.skipped)} unreadable line(s) skipped, e.g. {records.skipped[0]}")
    return {"models": models, "pairs": _pairs(games), "ranking": _ranking(games, seed, resamples, notes),
            "votes": {"ratings": sum(1 for fb in ratings.values() if fb.get("rating")),
                      "edits": sum(1 for fb in ratings.values() if fb.get("edit")), "side_by_side": len(games)},
            "notes": notes, "skipped": [str(s) for s in records.skipped]}


def _estimate(successes: float, n: int) -> dict[str, Any]:
    if n == 0:
        return {"value": None, "ci95": [None, None], "n": 0}
    low, high = wilson(successes, n)
    return {"value": round(successes / n, 4), "ci95": [round(low, 4), round(high, 4)], "n": n}


def _pairs(games: list[tuple[str, str, float]]) -> list[dict[str, Any]]:
    tally: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for a, b, score in games:
        for me, other, mine in ((a, b, score), (b, a, 1.0 - score)):
            tally[me, other]["win" if mine == 1.0 else "loss" if mine == 0.0 else "tie"] += 1
    out = []
    for (me, other), c in sorted(tally.items()):
        n = c["win"] + c["tie"] + c["loss"]
        row = {"model": me, "other": other, "wins": c["win"], "ties": c["tie"], "losses": c["loss"],
               "win_rate": _estimate(c["win"] + c["tie"] / 2, n)}
        if n < MIN_PAIR:
            row["note"] = f"too few votes ({n} < {MIN_PAIR})"
        out.append(row)
    return out


def _ranking(games: list[tuple[str, str, float]], seed: int, resamples: int, notes: list[str]) -> list[dict]:
    models = sorted({m for a, b, _ in games for m in (a, b)})
    if len(models) < 2:
        notes.append("no ranking: no side-by-side votes between two different models yet")
        return []
    if len(games) < MIN_RANKING:
        notes.append(f"too few side-by-side votes for a firm ranking ({len(games)} < {MIN_RANKING}): "
                     "read the intervals")
    import numpy as np

    fitted = bradley_terry(games, models)
    rng = np.random.default_rng(seed)
    draws = {m: [] for m in models}
    for _ in range(resamples):
        counts = rng.multinomial(len(games), [1.0 / len(games)] * len(games))  # a resample of the votes
        for m, p in bradley_terry(games, models, weights=counts, iterations=500, tolerance=1e-8).items():
            draws[m].append(elo(p))
    rows = []
    for m in models:
        low, high = np.percentile(draws[m], [2.5, 97.5])
        rows.append({"model": m, "score": round(elo(fitted[m]), 1), "ci95": [round(float(low), 1),
                                                                             round(float(high), 1)],
                     "compared": sum(m in (a, b) for a, b, _ in games)})
    rows.sort(key=lambda r: -r["score"])
    for i, row in enumerate(rows, 1):
        row["rank"] = i
    return rows
