"""Text metrics for one generated reply against its reference: pure functions, no model.

Every metric is per sample and in [0, 100] so they share one axis in the report; aggregates are
means over samples (see `stats.bootstrap_mean`), which keeps every number bootstrappable.
BLEU and chrF are sacrebleu's sentence-level scores (BLEU with its default exponential
smoothing, so a short reply with no 4-gram match is not flatly 0). No installed library does
ROUGE-L, so it is the LCS F-measure over normalised word tokens, written out below.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter

METRICS = ("exact_match", "token_f1", "chrf", "bleu", "rouge_l")
# Win/tie/loss against the base is decided on ROUGE-L F1: it still moves when a short reply changes a
# word or two (exact match and BLEU mostly sit at 0), and unlike chrF (beta=2, recall-weighted) it does
# not reward a base model that rambles past the answer. Seen on the quickstart: chrF gave the base 40 of
# 50 wins on replies that were four times the reference's length and wrong.
PRIMARY = "rouge_l"

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (SQuAD-style answer normalisation)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 if normalize(prediction) == normalize(reference) else 0.0


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall, counting repeated words (bag of words)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return 100.0 if pred == ref else 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of words, O(len(pred) * len(ref)) time, O(len(ref)) memory."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return 100.0 if pred == ref else 0.0
    previous = [0] * (len(ref) + 1)
    for word in pred:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 100.0 * 2 * precision * recall / (precision + recall)


def chrf(prediction: str, reference: str) -> float:
    return float(_scorers()[0].sentence_score(prediction, [reference]).score)


def bleu(prediction: str, reference: str) -> float:
    return float(_scorers()[1].sentence_score(prediction, [reference]).score)


@functools.lru_cache(maxsize=1)
def _scorers() -> tuple:
    # Built once: constructing a sacrebleu scorer costs more than scoring one sentence.
    from sacrebleu.metrics import BLEU, CHRF

    return CHRF(), BLEU(effective_order=True)


def score(prediction: str, reference: str) -> dict[str, float]:
    """All metrics of one reply, keyed as in METRICS."""
    return {
        "exact_match": exact_match(prediction, reference),
        "token_f1": token_f1(prediction, reference),
        "chrf": chrf(prediction, reference),
        "bleu": bleu(prediction, reference),
        "rouge_l": rouge_l(prediction, reference),
    }


def win_tie_loss(adapter: list[float], base: list[float]) -> dict[str, int]:
    """Per-sample comparison of two score lists (higher is better)."""
    out = {"win": 0, "tie": 0, "loss": 0}
    for a, b in zip(adapter, base, strict=True):
        out["win" if a > b + 1e-9 else "loss" if a < b - 1e-9 else "tie"] += 1
    return out
