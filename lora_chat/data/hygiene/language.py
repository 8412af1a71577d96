"""Which language a text is in: py3langid, the one identifier the runtime router and `validate` share.

py3langid (the maintained fork of langid.py; its model ships in the wheel as numpy arrays, so it works offline
and loads no pickle) scores a text over the 97 languages it knows. On short everyday lines it is far better at
"which of these few languages?" than at "which language?" (docs/routing.md: 97.7% among eight languages, 93.8%
among all), so both users ask the first question: `candidate_shares` renormalises the identifier's probability
mass over a candidate set and also returns the mass the candidates hold, which says "none of these" when small.

`row_language` is the data check on top: a conversation's language among the recipe's `output.language` and
the languages most chat data comes in (`CANDIDATES`), with the router's floor for "none of these".
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# The eight languages docs/routing.md measured py3langid on (3683 chatterbot-corpus lines, 95-100% each).
CANDIDATES = ("en", "sv", "de", "fr", "es", "it", "pt", "nl")
LANGUAGE_FLOOR = 0.05  # the candidates together below this share of the mass: the text is in none of them
# A row is in another language when that language holds at least this share of the candidates' mass.
# Chosen on the tuning half of bench/bench_hygiene.py's lines (its output says which half); see docs/hygiene.md.
WRONG_LANGUAGE_SHARE = 0.2

_identifier: Any = None
_identifier_lock = threading.Lock()


def identifier() -> Any:
    """py3langid's identifier over all its languages, loaded once per process (~1.5 s; read-only after)."""
    global _identifier
    with _identifier_lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return _identifier


def language_code(language: str) -> str:
    """`en`, `en-US`, `sv_SE` -> the ISO 639-1 code py3langid uses."""
    return language.strip().lower().replace("_", "-").split("-")[0]


def known_languages() -> set[str]:
    """The ISO 639-1 codes the identifier can tell apart."""
    return set(identifier().nb_classes)


def candidate_shares(text: str, languages: Iterable[str]) -> tuple[dict[str, float], float, str]:
    """Each candidate's share of the candidates' probability mass, that mass, and the best language overall."""
    scores = dict(identifier().rank(text))
    mass = sum(scores.get(code, 0.0) for code in languages)
    shares = {code: (scores.get(code, 0.0) / mass if mass else 0.0) for code in languages}
    return shares, mass, max(scores, key=scores.get)


@dataclass(frozen=True)
class LanguageCall:
    """What `row_language` found: the language it reads, how sure (its share), and whether that is `expected`."""

    language: str
    share: float
    wrong: bool


def row_language(text: str, expected: str, share: float = WRONG_LANGUAGE_SHARE) -> LanguageCall:
    """Is `text` in `expected` (an ISO 639-1 code)? Wrong only when another language is clearly ahead.

    A short line that could be either ("Ok", "Hallo") stays with the expected language: dropping a good row
    costs less than keeping a wrong one only when the call is sure.
    """
    languages = tuple(dict.fromkeys((expected, *CANDIDATES)))
    shares, mass, top = candidate_shares(text, languages)
    if mass < LANGUAGE_FLOOR:
        return LanguageCall(top, 1.0 - mass, top != expected)
    best = max(shares, key=shares.get)
    if best != expected and shares[best] >= share:
        return LanguageCall(best, shares[best], True)
    return LanguageCall(expected, shares[expected], False)
