"""Which resident answers a message: routing by language, then by domain (`model: auto`, `/route on`).

    router = Router.from_residents(rt.adapters)
    decision = router.route("Hur lång tid tar ett bygglov?")
    decision.adapter          # "faq-sv", or None for the base
    decision.header()         # "adapter=faq-sv; language=sv; language_score=0.998; domain_score=0.91; reason=..."

Language. py3langid (a maintained fork of langid.py; its model ships in the wheel as numpy arrays, so it
works offline and loads no pickle) scores the message over the 97 languages it knows. Short everyday
messages are where detectors fail: on 3-8 word chatterbot-corpus lines it picked the right language
93.8% of the time among all languages and 97.7% among eight (docs/routing.md compares four libraries).
The identifier lives in `data/hygiene/language.py`: `validate` checks each data row's language with the same one.
So the router asks only "which of the adapters' languages is this?": the candidates' share of the
identifier's probability mass, renormalised, is the language score. Two guards fall back to the base:
  - `language_floor`: when the candidates together hold less than this share of the mass the message is
    in none of their languages (Japanese to an en/sv set);
  - `min_language_score`: the best candidate must hold this much of the renormalised mass.
With 0.05 and 0.3, on that measurement (eight adapter languages), 95-100% of each language's lines reached its
adapter and 98.7% of Turkish, Russian and Indonesian lines went to the base; 0.5 would have cost English and
Dutch 3-4 points for one more point of "none of these" (docs/routing.md has the sweep).
Domain. When several adapters share the winning language, their domain profiles (built at finetune time
from their training prompts, `adapters.domain`) decide: a multinomial naive Bayes over the profiles in
play, with the log-likelihood averaged per feature of the message before the softmax, so a long message
is not more certain than a short one for its length alone. Adapters without a profile (trained before
profiles existed) still route by language when they are alone in theirs; among several, only profiled
ones compete, and none profiled means the base answers.

Every decision is logged on the `lora_chat.route` logger and carried whole in `Decision`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..adapters.domain import DomainProfile, features
from ..data.hygiene.language import LANGUAGE_FLOOR, candidate_shares, known_languages, language_code
from ..errors import LorachatError, Where

log = logging.getLogger("lora_chat.route")

MIN_LANGUAGE_SCORE = 0.3
SMOOTHING = 1.0  # Laplace smoothing of the counts: 94%/99% right (sv/en) on the domain measurement, 0.1 gave 93%/94%

@dataclass(frozen=True)
class RouteTarget:
    """An adapter the router may pick: its name, declared language, domain profile (None: trained before)."""

    name: str
    language: str | None
    profile: DomainProfile | None = None


@dataclass(frozen=True)
class Decision:
    """Who answers and why. `adapter` None means the base."""

    adapter: str | None
    reason: str
    language: str | None = None
    language_score: float | None = None
    domain_score: float | None = None

    def header(self) -> str:
        """One line for the `x-lorachat-route` response header (ASCII: names and codes are echoed as given)."""
        def fmt(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        text = (f"adapter={self.adapter or 'base'}; language={self.language or '-'}; "
                f"language_score={fmt(self.language_score)}; domain_score={fmt(self.domain_score)}; "
                f"reason={self.reason}")
        return text.encode("ascii", "replace").decode("ascii")


class Router:
    """Routes a message to one of `targets` (or the base); see the module docstring for the rules."""

    def __init__(self, targets: Sequence[RouteTarget], *, language_floor: float = LANGUAGE_FLOOR,
                 min_language_score: float = MIN_LANGUAGE_SCORE):
        known = known_languages()
        self.notes: list[str] = []
        self.targets: list[RouteTarget] = []
        for t in targets:
            if t.language is None:
                continue
            code = language_code(t.language)
            if code not in known:
                self.notes.append(f"{t.name}: language {t.language!r} is not one the language identifier knows "
                                  f"(ISO 639-1 codes such as en, sv, de); it is left out of routing")
                continue
            self.targets.append(RouteTarget(t.name, code, t.profile))
        self.languages = sorted({t.language for t in self.targets})
        self.language_floor = language_floor
        self.min_language_score = min_language_score

    @classmethod
    def from_residents(cls, residents: Iterable[Any], **kwargs: Any) -> Router:
        """From `runtime.AdapterSet.adapters` (each with `name`, `language`, `path`)."""
        return cls([RouteTarget(r.name, r.language, DomainProfile.read(r.path) if r.path else None)
                    for r in residents], **kwargs)

    def route(self, text: str) -> Decision:
        """Decide who answers `text` (the user's last message); raises when no adapter declares a language."""
        if not self.targets:
            raise LorachatError("cannot route: no adapter declares a language (output.language in its recipe); "
                                "name an adapter instead", Where(field="model"))
        decision = self._decide(text)
        log.info("route: %s", decision.header())
        return decision

    def _decide(self, text: str) -> Decision:
        shares, mass, top = candidate_shares(text, self.languages)
        if mass < self.language_floor:
            return Decision(None, f"none of the adapters' languages ({', '.join(self.languages)}) fits: "
                                  f"their share {mass:.3f} < floor {self.language_floor}; looks like {top}",
                            language=top)
        language = max(self.languages, key=shares.__getitem__)
        score = shares[language]
        if score < self.min_language_score:
            return Decision(None, f"unsure of the language: {language} at {score:.3f} < {self.min_language_score}",
                            language, score)
        same = [t for t in self.targets if t.language == language]
        if len(same) == 1:
            return Decision(same[0].name, f"the only adapter for {language}", language, score)
        profiled = [t for t in same if t.profile is not None]
        if not profiled:
            return Decision(None, f"{len(same)} adapters for {language} and none has a domain profile to choose "
                                  f"between them", language, score)
        if len(profiled) == 1:
            return Decision(profiled[0].name, f"the only adapter for {language} with a domain profile",
                            language, score)
        posteriors = domain_scores(text, [t.profile for t in profiled])
        best = max(range(len(profiled)), key=posteriors.__getitem__)
        return Decision(profiled[best].name, f"domain, among {len(profiled)} adapters for {language}",
                        language, score, posteriors[best])


def domain_scores(text: str, profiles: Sequence[DomainProfile]) -> list[float]:
    """Naive Bayes posteriors of `profiles` for `text`, log-likelihoods averaged per feature (uniform prior)."""
    query = features(text)
    n = sum(query.values())
    if n == 0:
        return [1.0 / len(profiles)] * len(profiles)
    vocabulary = set(query).union(*(p.counts for p in profiles))
    per_feature = []
    for p in profiles:
        denominator = p.total + SMOOTHING * len(vocabulary)
        loglik = sum(k * math.log((p.counts.get(f, 0) + SMOOTHING) / denominator) for f, k in query.items())
        per_feature.append(loglik / n)
    top = max(per_feature)
    weights = [math.exp(s - top) for s in per_feature]
    return [w / sum(weights) for w in weights]
