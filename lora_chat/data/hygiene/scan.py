"""What is wrong in a recipe's rows before training, and the filters that act on it (`data.dedup`,
`data.language_filter`, `data.pii`).

`clean` runs on every source's conversations before the eval split (so a dropped duplicate can never sit on
both sides of it) and `leakage` after it. With `scan` (validate) every check runs and reports; without it
(finetune, eval, plan) only the checks a filter needs run, so a recipe with the defaults pays nothing.

Order, and why: duplicates first (the first copy of a conversation is kept, in data order, so the result does
not depend on anything but the rows and the seed of the MinHash permutations), then the language, then personal
data; a row dropped for one reason is not counted again under the next. Masking rewrites the conversations in
memory, what trains and what is evaluated, never the user's files.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from ...errors import DataError, Where
from ...recipe import LoadedRecipe
from ..conversation import Conversation
from .duplicates import NearIndex, NearPair, exact_key
from .language import known_languages, language_code, row_language
from .pii import find_pii, mask_pii, placeholder

EXAMPLES = 5  # rows kept per finding for the report; counts are always whole
SNIPPET = 80  # characters of a row shown as its example

WITHIN, ACROSS, LEAKAGE = "within a source", "across sources", "train/eval"


@dataclass(frozen=True)
class Finding:
    """One row something was found in: where it is, a snippet, the row it copies (duplicates), a detail."""

    where: Where
    text: str
    other: Where | None = None
    detail: str = ""


@dataclass
class Tally:
    """How many rows a finding has, with the first few as examples."""

    count: int = 0
    examples: list[Finding] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        self.count += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(finding)


@dataclass
class HygieneReport:
    """Everything the checks found (`scanned`: all of them ran) and what the filters did."""

    scanned: bool
    rows: int = 0
    exact: dict[str, Tally] = field(default_factory=dict)  # scope (WITHIN, ACROSS, LEAKAGE) -> rows
    near: dict[str, Tally] = field(default_factory=dict)
    language: str | None = None  # what rows were checked against (output.language); None: not checked
    wrong_language: Tally = field(default_factory=Tally)
    languages_found: Counter = field(default_factory=Counter)  # language -> rows, of the wrong ones
    pii: dict[str, Tally] = field(default_factory=dict)  # kind -> rows holding it
    pii_rows: dict[str, list[Where]] = field(default_factory=dict)  # kind -> every row holding it
    dropped: Counter = field(default_factory=Counter)  # reason -> rows left out
    masked: Counter = field(default_factory=Counter)  # kind -> findings masked
    # Pairs (earlier, later, kind, near pair) of conversations both kept, as they train: `leakage` reads them after
    # the split instead of comparing every row again.
    pairs: list[tuple[Conversation, Conversation, str, NearPair | None]] = field(default_factory=list, repr=False)

    def summary(self) -> str | None:
        """One line of what the filters changed, for finetune (None when they changed nothing)."""
        parts = [f"dropped {n} {reason}" for reason, n in self.dropped.items()]
        if self.masked:
            parts.append("masked " + ", ".join(f"{n} {placeholder(kind)}" for kind, n in sorted(self.masked.items())))
        return f"data hygiene ({self.rows} conversations): {'; '.join(parts)}" if parts else None


def row_text(conversation: Conversation) -> str:
    """The text duplicates are judged on: every message, role and content."""
    return "\n".join(f"{m.role}: {m.content}" for m in conversation.messages)


def spoken_text(conversation: Conversation) -> str:
    """What the user and the assistant say (the language check; a system prompt is often in another language)."""
    return "\n".join(m.content for m in conversation.messages if m.role != "system")


def _snippet(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= SNIPPET else line[:SNIPPET - 1] + "…"


@dataclass(frozen=True)
class _Row:
    group: int  # index into the groups passed to clean
    split: str  # "train" or "eval"
    conversation: Conversation


def clean(loaded: LoadedRecipe, train: list[list[Conversation]], eval_sources: list[list[Conversation]],
          scan: bool = False) -> tuple[list[list[Conversation]], list[list[Conversation]], HygieneReport]:
    """Each source's conversations after the recipe's filters, train and eval sources alike, and the report.

    Eval sources come first in data order, so a training row that copies an eval row is the one dropped
    (and reported as leakage).
    """
    data = loaded.recipe.data
    language = _checked_language(loaded, scan)
    report = HygieneReport(scanned=scan, language=language)
    groups = [("eval", rows) for rows in eval_sources] + [("train", rows) for rows in train]
    flat = [_Row(g, split, c) for g, (split, rows) in enumerate(groups) for c in rows]
    report.rows = len(flat)
    keep = [True] * len(flat)

    pairs = _duplicates(flat, loaded, near=scan or data.dedup == "near") if scan or data.dedup != "off" else []
    if pairs:
        for earlier, later, kind, pair in pairs:
            a, b = flat[earlier], flat[later]
            scope = LEAKAGE if a.split != b.split else WITHIN if a.group == b.group else ACROSS
            # A leak is shown from the eval row's side (eval sources come first, so that is the earlier one).
            shown, copied = (a, b) if scope == LEAKAGE else (b, a)
            _tally(report, kind, scope, shown.conversation, copied.conversation, pair)
            if keep[later] and (data.dedup == "near" or (data.dedup == "exact" and kind == "exact")):
                keep[later] = False
                report.dropped[f"{kind} duplicates"] += 1

    if language is not None:
        for i, row in enumerate(flat):
            if not (scan or keep[i]):
                continue
            text = spoken_text(row.conversation)
            call = row_language(text, language)
            if call.wrong:
                report.wrong_language.add(Finding(row.conversation.origin, _snippet(text),
                                                  detail=f"{call.language} {call.share:.2f}"))
                report.languages_found[call.language] += 1
                if keep[i] and data.language_filter:
                    keep[i] = False
                    report.dropped["not in " + language] += 1

    rows = [r.conversation for r in flat]
    if scan or data.pii != "report":
        for i, row in enumerate(flat):
            if not (scan or keep[i]):
                continue
            kinds = _pii_kinds(row.conversation)
            for kind in kinds:
                report.pii.setdefault(kind, Tally()).add(Finding(row.conversation.origin,
                                                                 _snippet(row_text(row.conversation))))
                report.pii_rows.setdefault(kind, []).append(row.conversation.origin)
            if not kinds or not keep[i]:
                continue
            if data.pii == "drop":
                keep[i] = False
                report.dropped["with personal data"] += 1
            elif data.pii == "mask":
                rows[i] = _masked(row.conversation, report.masked)

    if scan:
        report.pairs = [(rows[e], rows[lt], kind, pair) for e, lt, kind, pair in pairs if keep[e] and keep[lt]]
    out: list[list[Conversation]] = [[] for _ in groups]
    for row, conversation, kept in zip(flat, rows, keep):
        if kept:
            out[row.group].append(conversation)
    return out[len(eval_sources):], out[:len(eval_sources)], report


def leakage(train: list[Conversation], held_out: list[Conversation], report: HygieneReport) -> None:
    """Held-out rows that copy a training row, into `report`: the pairs `clean` found (each row with its
    earliest copy) that the split put on both sides."""
    held = {id(c) for c in held_out}
    trained = {id(c) for c in train}
    for a, b, kind, pair in report.pairs:
        if id(a) in held and id(b) in trained:
            _tally(report, kind, LEAKAGE, a, b, pair)
        elif id(b) in held and id(a) in trained:
            _tally(report, kind, LEAKAGE, b, a, pair)


def _tally(report: HygieneReport, kind: str, scope: str, row: Conversation, other: Conversation,
           pair: NearPair | None) -> None:
    tally = (report.exact if kind == "exact" else report.near).setdefault(scope, Tally())
    tally.count += 1
    if len(tally.examples) < EXAMPLES:  # the text only for the rows shown
        detail = "" if pair is None else f"{pair.similarity:.2f}" + (
            f", holds {pair.contained:.0%}" if pair.contained > pair.similarity else "")
        tally.examples.append(Finding(row.origin, _snippet(row_text(row)), other.origin, detail))


def _duplicates(flat: list[_Row], loaded: LoadedRecipe, near: bool) -> list[tuple[int, int, str, NearPair | None]]:
    """(earlier, later, "exact" | "near", the near pair) for every row that copies an earlier one, in row order."""
    first: dict[bytes, int] = {}
    found: list[tuple[int, int, str, NearPair | None]] = []
    unique: list[int] = []
    index = NearIndex(loaded.recipe.data.near_threshold, seed=loaded.recipe.training.seed) if near else None
    for i, row in enumerate(flat):
        key = exact_key(row_text(row.conversation))
        if key in first:
            found.append((first[key], i, "exact", None))
        else:
            first[key] = i
            unique.append(i)
        if index is not None:
            index.add(spoken_text(row.conversation))
    if index is not None:
        found += [(p.earlier, p.later, "near", p) for p in index.pairs(allowed=unique)]
    return sorted(found, key=lambda f: f[1])


def _checked_language(loaded: LoadedRecipe, scan: bool) -> str | None:
    """The language rows are checked against: output.language when set and a check wants it."""
    declared = loaded.recipe.output.language
    if not loaded.recipe.data.language_filter:
        return language_code(declared) if scan and declared and language_code(declared) in known_languages() \
            else None
    if not declared:
        raise DataError("needs output.language, the language rows are kept in (e.g. language: sv)",
                        loaded.where("data", "language_filter"))
    code = language_code(declared)
    if code not in known_languages():
        raise DataError(f"language {declared!r} is not one the language identifier knows (ISO 639-1 codes such "
                        f"as en, sv, de), so data.language_filter cannot check rows against it",
                        loaded.where("output", "language"))
    return code


def _texts(conversation: Conversation) -> list:
    """Every message a row trains on or is scored by: its turns and, in a preference row, the rejected reply."""
    rejected = conversation.meta.get("rejected")
    return [*conversation.messages, *([rejected] if rejected is not None else [])]


def _pii_kinds(conversation: Conversation) -> list[str]:
    # One pass over the whole conversation: the finders' cheap tests then run once a row, not once a message.
    return sorted({m.kind for m in find_pii("\n\n".join(m.content for m in _texts(conversation)))})


def _masked(conversation: Conversation, counts: Counter) -> Conversation:
    def masked(message):
        text, found = mask_pii(message.content)
        counts.update(found)
        return replace(message, content=text) if found else message

    meta = conversation.meta
    if meta.get("rejected") is not None:  # the rejected reply is trained against: mask it as well
        meta = {**meta, "rejected": masked(meta["rejected"])}
    return replace(conversation, messages=tuple(masked(m) for m in conversation.messages), meta=meta)
