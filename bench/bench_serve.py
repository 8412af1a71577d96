"""Serving benchmarks: routing accuracy; lorachat serve against vLLM's CPU build.

    HF_HUB_OFFLINE=1 python bench/bench_serve.py [--quick]
"""

from __future__ import annotations

from pathlib import Path

# Folder of the chatterbot-corpus package -> ISO 639-1 code of the language it ships.
CHATTERBOT_LANGUAGES = {"english": "en", "swedish": "sv", "german": "de", "french": "fr", "spanish": "es",
                        "italian": "it", "portuguese": "pt", "dutch": "nl", "turkish": "tr", "russian": "ru",
                        "indonesian": "id"}
# Files that ship under a language folder in another language (read, and found to be English).
NOT_THEIR_FOLDER = {("swedish", "conversations.yml")}


def everyday_lines(min_words: int = 3, max_words: int = 8) -> list[tuple[str, str]]:
    """(text, language) for every distinct chatterbot-corpus line of `min_words`..`max_words` words."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data"
    lines: dict[str, str] = {}
    for folder, code in CHATTERBOT_LANGUAGES.items():
        for file in sorted((root / folder).glob("*.yml")):
            if (folder, file.name) in NOT_THEIR_FOLDER:
                continue
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for conversation in data.get("conversations") or []:
                for line in conversation:
                    if isinstance(line, str) and min_words <= len(line.split()) <= max_words:
                        lines.setdefault(line.strip(), code)
    return list(lines.items())
