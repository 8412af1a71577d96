"""Bootstrap 95% confidence intervals over samples, seeded so a report is reproducible.

Resampling whole samples (not tokens) matches what varies between held-out sets: a long
conversation's tokens are not independent draws.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000  # percentile CIs settle to about +-0.1 of a point at this many (Efron & Tibshirani, ch. 13)


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float | list[float]]:
        return {"value": _round(self.value), "ci95": [_round(self.low), _round(self.high)]}

    def map(self, fn: Callable[[float], float]) -> Estimate:
        """The same estimate through a monotone function (loss -> perplexity)."""
        return Estimate(fn(self.value), fn(self.low), fn(self.high))


def bootstrap_mean(values: list[float], seed: int) -> Estimate:
    """Mean of per-sample values with a percentile bootstrap 95% CI."""
    return bootstrap_ratio(values, [1.0] * len(values), seed)


def bootstrap_ratio(numerators: list[float], denominators: list[float], seed: int) -> Estimate:
    """sum(num) / sum(den) with a CI from resampling samples: token-weighted loss is nll sum / token sum."""
    return paired_delta(numerators, [0.0] * len(numerators), denominators, seed)


def paired_delta(numerators: list[float], reference: list[float], denominators: list[float], seed: int) -> Estimate:
    """sum(num) / sum(den) - sum(ref) / sum(den), both ratios over the same resampled samples.

    Pairing is what makes a small change visible: two models scored on the same rows vary together with the
    rows (a hard row is hard for both), so the interval of the difference is far narrower than either's.
    """
    num = np.asarray(numerators, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if len(num) == 0:
        return Estimate(math.nan, math.nan, math.nan)
    value = float(num.sum() / den.sum())
    idx = np.random.default_rng(seed).integers(0, len(num), size=(RESAMPLES, len(num)))  # (B, N)
    resampled = num[idx].sum(axis=1) / den[idx].sum(axis=1)  # (B,)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return Estimate(value, float(low), float(high))


def _round(x: float) -> float | None:
    # JSON has no NaN; an empty estimate is null.
    return None if math.isnan(x) else round(x, 4)
