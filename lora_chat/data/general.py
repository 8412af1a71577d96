"""The general set: everyday chat in one language, from an installed package, that no lorachat recipe trains on.

`lorachat eval` scores the base and every adapter on its *eval part* to measure what an adapter cost the base
(forgetting); a recipe's `data.replay` mixes rows of its *replay part* into training. The two parts never share
a row: each conversation goes to one part by a hash of its first user line, so the split depends on no seed,
no file order and no choice of files, and a question asked in two files lands on one side.

The source is chatterbot-corpus (BSD-3-Clause; read from the installed package, nothing copied here): short
conversations on many topics, one folder per language. A language is shipped when its folder holds at least
`MIN_ROWS` conversations in that language (py3langid agrees on >= 95% of each shipped folder's rows); none of
its files may appear in recipes/*.yaml (tests/test_forgetting.py checks). Swedish is not shipped: its folder
holds 43 conversations, smalltalk-sv trains on four of its five files and the fifth is in English.
"""

from __future__ import annotations

import hashlib
import importlib.util
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import DataError, Where
from ..recipe import Source
from .conversation import Conversation
from .formats import detect, to_conversation
from .sources import read_rows

PACKAGE = "chatterbot_corpus"
# ISO 639-1 -> chatterbot-corpus folder, for the folders with >= MIN_ROWS conversations in their language.
FOLDERS = {"en": "english", "es": "spanish", "fa": "persian", "id": "indonesian", "it": "italian",
           "ja": "japanese", "ko": "korean", "nl": "dutch", "pt": "portuguese", "uk": "ukrainian", "zh": "chinese"}
# Specialist domains rather than general chat: English tech_support alone is half of that folder.
# recipes/smalltalk-en.yaml trains on four English topics, so they are not general data for anyone.
LEFT_OUT = {"english/coding.yml", "english/tech_support.yml", "english/greetings.yml", "english/ai.yml",
            "english/food.yml", "english/sports.yml"}
MIN_ROWS = 160
# The language a base is taken to speak when an adapter names none, or one with no shipped set: the bases
# lorachat's recipes use (SmolLM2, Llama 3.1, Qwen2.5) are English-first.
BASE_LANGUAGE = "en"
# Share of a folder's distinct conversations in the eval part: enough for 128 eval rows where the folder has
# them (0.25 of the 791 English ones gives 198), never more than half, so replay keeps the larger part.
EVAL_SHARE, EVAL_ROWS = 0.25, 128

Part = Literal["eval", "replay"]


@dataclass(frozen=True)
class GeneralRows:
    language: str  # the language of the rows (after any fallback)
    conversations: list[Conversation]
    files: list[Path]  # the package files read
    note: str | None = None  # why the language differs from the one asked for
    left_out: list[Path] = field(default_factory=list)  # files of the folder passed in `exclude`

    @property
    def label(self) -> str:
        return f"{PACKAGE.replace('_', '-')} {FOLDERS[self.language]}"


def shipped_language(language: str | None) -> tuple[str, str | None]:
    """The general set's language for an adapter of `language`, and a note when it falls back to the base's."""
    code = re.split(r"[-_]", language)[0].lower() if language else None
    if code in FOLDERS:
        return code, None
    if code is None:
        return BASE_LANGUAGE, None
    return BASE_LANGUAGE, (f"no general set is shipped for language '{language}' (chatterbot-corpus has fewer "
                           f"than {MIN_ROWS} conversations in it that no lorachat recipe trains on); using the "
                           f"base's own language '{BASE_LANGUAGE}'")


def files_of(language: str) -> list[Path]:
    """The package files of a shipped language's general set, in name order."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{PACKAGE}' is not installed (pip install chatterbot-corpus); it holds the "
                        f"general set (or pass --general FILE / --no-general)", Where(f"pkg:{PACKAGE}"))
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / FOLDERS[language]
    return [p for p in sorted(folder.glob("*.yml")) if f"{folder.name}/{p.name}" not in LEFT_OUT]


def general_rows(language: str | None, part: Part, exclude: frozenset[Path] = frozenset()) -> GeneralRows:
    """One part of the general set for `language` (falling back to the base's), without the `exclude` files.

    Eval-part rows come in hash order, a fixed shuffle: the first N are the same N on every run.
    """
    code, note = shipped_language(language)
    files = files_of(code)
    every: set[str] = set()  # keys of the whole folder: they set the share
    by_key: dict[str, Conversation] = {}
    for path in files:
        for conversation in _read(path):
            every.add(_key(conversation))
            if path not in exclude:
                by_key.setdefault(_key(conversation), conversation)
    # Set by the whole folder, so leaving files out never moves a row to the other part.
    share = min(0.5, max(EVAL_SHARE, EVAL_ROWS / max(1, len(every))))
    wanted = [k for k in sorted(by_key, key=_rank) if (_rank(k) < share) == (part == "eval")]
    return GeneralRows(code, [by_key[k] for k in wanted], [p for p in files if p not in exclude], note,
                       [p for p in files if p in exclude])


def replay_rows(language: str | None, share: float, train_rows: int, seed: int) -> GeneralRows:
    """`share` of the resulting training rows, drawn (seeded) from the replay part: n = share / (1 - share) x
    the domain rows, capped at the part's size."""
    pool = general_rows(language, "replay")
    wanted = round(share / (1 - share) * train_rows)
    rng = random.Random(f"replay-{seed}")  # its own stream: the eval split and weighting draws stay as they were
    picked = rng.sample(pool.conversations, min(wanted, len(pool.conversations)))
    return GeneralRows(pool.language, picked, pool.files, pool.note)


def _read(path: Path) -> list[Conversation]:
    source = Source(path=str(path))
    out, fmt = [], None
    for where, row in read_rows(source, path.parent):
        if isinstance(row, DataError):
            continue
        try:
            fmt = fmt or detect(row, where)
            out.append(to_conversation(row, fmt, where, source))
        except DataError:  # a malformed row of the package (a few Ukrainian ones): not general chat to score
            continue
    return out


def _key(conversation: Conversation) -> str:
    first = next((m.content for m in conversation.messages if m.role == "user"), "")
    return " ".join(re.sub(r"[^\w\s]", " ", first.casefold()).split())


def _rank(key: str) -> float:
    """A fixed position in [0, 1) for a conversation: its part, and its place in the eval order."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2 ** 64
