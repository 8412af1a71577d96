"""From a recipe's `data:` section to train and eval conversations, with a report of what happened.

Order matters: the eval split is taken from each source's distinct conversations *before*
weighting, so a repeated (weight > 1) or duplicated row can never sit on both sides.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..files import sha256_file
from ..recipe import EvalSplit, LoadedRecipe, Source
from .conversation import Conversation
from .formats import TWO_SPEAKERS, WITH_DOMAINS, detect, fold_dialogues, to_conversation
from .general import FOLDERS, PACKAGE, replay_rows
from .hygiene.scan import HygieneReport, clean, leakage
from .sources import read_rows, resolve_path

MAX_PROBLEMS_SHOWN = 20


@dataclass
class SourceReport:
    path: str
    location: str  # resolved file path or hf: id
    format: str
    detected: bool  # format came from `auto`
    rows: int = 0
    usable: int = 0
    sha256: str | None = None  # of the file, for the adapter manifest
    domains: Counter = field(default_factory=Counter)  # domain -> usable conversations that have it
    speakers: Counter = field(default_factory=Counter)  # role -> turns, over usable conversations
    domains_seen: set = field(default_factory=set)  # every domain of every row, kept or not
    left_out: int = 0  # conversations without one of the source's `domains`
    folded: int = 0  # per-turn rows folded into their dialogue's last row (PersonaChat)


@dataclass
class LoadedData:
    train: list[Conversation]
    eval: list[Conversation]
    sources: list[SourceReport] = field(default_factory=list)
    problems: list[DataError] = field(default_factory=list)
    eval_overlap_removed: int = 0  # train rows dropped because they also appear in the eval sources
    notes: list[str] = field(default_factory=list)  # worth saying, not wrong (a replay language fallback)
    hygiene: HygieneReport | None = None  # duplicates, languages, personal data: found and filtered (hygiene/)


def load_data(loaded: LoadedRecipe, scan: bool = False) -> LoadedData:
    """Read every source, lint every row, apply the hygiene filters, split off eval and mix by weight.

    Train rows stay in data order (source by source, row by row) so `preview` shows the file as
    written; the trainer shuffles by the recipe's seed. `scan`: run every hygiene check for the report
    (validate), not only those the recipe's filters need.
    """
    data, seed = loaded.recipe.data, loaded.recipe.training.seed
    reports: list[SourceReport] = []
    problems: list[DataError] = []
    per_source = []
    for i, source in enumerate(data.train):
        rows, report = _read_source(source, loaded, ("data", "train", str(i)), problems)
        reports.append(report)
        per_source.append((source, rows))

    rng = random.Random(seed)
    train: list[Conversation] = []
    held_out: list[Conversation] = []
    overlap = 0
    if isinstance(data.eval, EvalSplit):
        cleaned, _, hygiene = clean(loaded, [rows for _, rows in per_source], [], scan)
        kept_rows = []
        for (source, _), rows in zip(per_source, cleaned):
            kept, out = _split(rows, data.eval.split, rng)
            held_out += out
            kept_rows += kept
            train += _weighted(kept, source.weight, rng)
        if data.eval.max_rows is not None:
            held_out = held_out[: data.eval.max_rows]
        if scan:
            leakage(kept_rows, held_out, hygiene)
    else:
        eval_sources = []
        for i, source in enumerate(data.eval):
            rows, report = _read_source(source, loaded, ("data", "eval", str(i)), problems)
            reports.append(report)
            eval_sources.append(rows)
        cleaned, eval_sources, hygiene = clean(loaded, [rows for _, rows in per_source], eval_sources, scan)
        held_out = [c for rows in eval_sources for c in rows]
        eval_keys = {_key(c) for c in held_out}
        for (source, _), rows in zip(per_source, cleaned):
            kept = [c for c in rows if _key(c) not in eval_keys]
            overlap += len(rows) - len(kept)
            train += _weighted(kept, source.weight, rng)
    notes = []
    if data.replay:
        # After the split and the weighting, so the domain's eval split is the same with or without replay.
        replay = replay_rows(loaded.recipe.output.language, data.replay, len(train), seed)
        train += replay.conversations
        reports.append(SourceReport(f"pkg:{PACKAGE}/data/{FOLDERS[replay.language]} (data.replay)",
                                    str(replay.files[0]), "turns", False, rows=len(replay.conversations),
                                    usable=len(replay.conversations)))
        notes += [f"data.replay: {replay.note}"] if replay.note else []
    return LoadedData(train, held_out, reports, problems, overlap, notes, hygiene)


def _read_source(source: Source, loaded: LoadedRecipe, key: tuple[str, ...],
                 problems: list[DataError]) -> tuple[list[Conversation], SourceReport]:
    root = loaded.dir_of(*key, "path")
    try:
        location = resolve_path(source, root)
    except DataError as err:
        raise DataError(err.reason, loaded.where(*key, "path")) from None
    if isinstance(location, Path) and not location.is_file():
        raise DataError(f"data file not found: {location}", loaded.where(*key, "path"))
    report = SourceReport(source.path, str(location), source.format, source.format == "auto")
    if isinstance(location, Path):
        report.sha256 = sha256_file(location)
    conversations = read_conversations(source, root, report, problems)
    _check_dialogue_options(source, report, loaded, key)
    return conversations, report


def _check_dialogue_options(source: Source, report: SourceReport, loaded: LoadedRecipe, key: tuple[str, ...]) -> None:
    """`roles` and `domains` only mean something for some formats; a domain no row has is a typo."""
    if source.roles is not None and report.format not in TWO_SPEAKERS:
        raise DataError(f"roles applies to {', '.join(TWO_SPEAKERS)} rows, not {report.format}",
                        loaded.where(*key, "roles"))
    if source.domains is None:
        return
    if report.format not in WITH_DOMAINS:
        raise DataError(f"{report.format} rows carry no domains (only {', '.join(WITH_DOMAINS)} rows do)",
                        loaded.where(*key, "domains"))
    unknown = [d for d in source.domains if d.lower() not in report.domains_seen]
    if unknown:
        raise DataError(f"no dialogue has the domain {', '.join(map(repr, unknown))} "
                        f"(found: {', '.join(sorted(report.domains_seen)) or 'none'})", loaded.where(*key, "domains"))


def read_conversations(source: Source, root: Path, report: SourceReport,
                       problems: list[DataError]) -> list[Conversation]:
    """Every usable conversation of a source; rows that are not are appended to `problems`.

    Fills in `report`'s row counts and, for `format: auto`, the format found in the first row.
    """
    conversations = []
    fmt = None if source.format == "auto" else source.format
    wanted = {d.lower() for d in source.domains} if source.domains else None
    for where, row in read_rows(source, root):
        report.rows += 1
        try:
            if isinstance(row, DataError):
                raise row
            if fmt is None:
                fmt = report.format = detect(row, where)
            conversation = to_conversation(row, fmt, where, source)
        except DataError as err:
            problems.append(err)
            continue
        domains = conversation.meta.get("domains", ())
        report.domains_seen.update(domains)
        if wanted is not None and wanted.isdisjoint(domains):
            report.left_out += 1
            continue
        conversations.append(conversation)
    if fmt == "personachat":
        conversations, report.folded = fold_dialogues(conversations)
    for conversation in conversations:
        report.domains.update(conversation.meta.get("domains", ()))
        report.speakers.update(m.role for m in conversation.messages)
    report.usable = len(conversations)
    return conversations


def _key(conversation: Conversation) -> tuple:
    return tuple((m.role, m.content) for m in conversation.messages)


def _split(rows: list[Conversation], share: float, rng: random.Random) -> tuple[list, list]:
    """Hold out `share` of the distinct conversations; duplicates stay together on one side."""
    if share == 0 or len(rows) < 2:
        return rows, []
    groups: dict[tuple, list[Conversation]] = {}
    for c in rows:
        groups.setdefault(_key(c), []).append(c)
    keys = list(groups)
    rng.shuffle(keys)
    n_eval = max(1, round(share * len(keys)))
    n_eval = min(n_eval, len(keys) - 1)  # always leave something to train on
    held_keys = set(keys[:n_eval])
    held = [groups[k][0] for k in keys[:n_eval]]
    kept = [c for c in rows if _key(c) not in held_keys]
    return kept, held


def _weighted(rows: list[Conversation], weight: float, rng: random.Random) -> list[Conversation]:
    """`weight` copies of the rows: whole copies, then a seeded sample for the fraction."""
    whole, fraction = int(weight), weight - int(weight)
    out = rows * whole
    if fraction > 0:
        out += rng.sample(rows, round(fraction * len(rows)))
    return out


def first_problems(problems: list[DataError]) -> str:
    """Problems for the terminal: one line each, the first few, then a count."""
    lines = [str(p) for p in problems[:MAX_PROBLEMS_SHOWN]]
    if len(problems) > MAX_PROBLEMS_SHOWN:
        lines.append(f"... and {len(problems) - MAX_PROBLEMS_SHOWN} more rows with problems")
    return "\n".join(lines)
