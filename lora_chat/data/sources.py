"""Reading rows from where the user keeps them, each with the file and line it came from.

Local files are streamed (jsonl line by line) so a large file costs memory for its rows, not
for its text twice. `pkg:` paths point into installed packages (datasets shipped on PyPI);
`hf:` ids go through `datasets`, which works offline when the dataset is cached.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError, Where
from ..models.resolve import hub_offline
from ..recipe import Source

Row = tuple[Where, Any]

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".yml", ".yaml")


def resolve_path(source: Source, root: Path) -> Path | str:
    """A local Path for files (relative to the recipe's folder, or inside a package), or the `hf:` id."""
    path = source.path
    if path.startswith("hf:"):
        return path
    if path.startswith("pkg:"):
        package, _, inner = path[4:].partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                f"package '{package}' is not installed (pip install {package.replace('_', '-')})",
                Where(path),
            )
        return Path(next(iter(spec.submodule_search_locations))) / inner
    resolved = Path(os.path.expanduser(path))
    return resolved if resolved.is_absolute() else root / resolved


def read_rows(source: Source, root: Path) -> Iterator[Row]:
    """Yield `(where, row)` for every row of a source; raise DataError for an unreadable file.

    A row that cannot be parsed comes back as a DataError in place of the row, so the caller
    can report every bad row at once.
    """
    location = resolve_path(source, root)
    if isinstance(location, str):
        yield from _read_hf(location[3:], source)
        return
    if not location.is_file():
        raise DataError("data file not found", Where(location))
    suffix = location.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".csv": _read_csv,
               ".parquet": _read_parquet, ".yml": _read_yaml, ".yaml": _read_yaml}
    if suffix == ".json":
        yield from _read_json(location, source.split)
        return
    if suffix not in readers:
        raise DataError(f"unsupported file type '{suffix}' (use one of {', '.join(SUFFIXES)})", Where(location))
    yield from readers[suffix](location)


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                # Yielded, not raised: one bad line is reported with the others, not alone.
                row = DataError(f"invalid JSON: {err.msg} (column {err.colno})", Where(path, number))
            yield Where(path, number), row


def _read_json(path: Path, split: str = "train") -> Iterator[Row]:
    """A JSON array of rows, or an object holding them; each row's line found from offsets.

    Objects: one row (it has a format's keys), or one list of rows (`{"data": [...]}`), or several
    lists named by split (PersonaChat's `{"train": [...], "valid": [...]}`: the source's `split`
    picks one), or rows keyed by id (MultiWOZ's data.json: `{"SNG01856.json": {...}}`, the key kept
    as the row's `dialogue_id`).
    """
    from .formats import detect

    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"invalid JSON: {err.msg} (column {err.colno})", Where(path, err.lineno)) from None
    if isinstance(data, list):
        rows, lines = data, _element_lines(text, text.find("[") + 1, len(data))
    elif isinstance(data, dict):
        lists = {k: v for k, v in data.items() if isinstance(v, list)}
        try:
            detect(data, Where(path))
            is_row = True
        except DataError:
            is_row = False
        if not is_row and lists and (len(lists) == 1 or split in lists):
            key = split if split in lists else next(iter(lists))
            rows = lists[key]
            lines = _element_lines(text, _member_offsets(text)[key] + 1, len(rows))
        elif not is_row and data and all(isinstance(v, dict) for v in data.values()):
            rows = [{**v, "dialogue_id": v.get("dialogue_id", k)} for k, v in data.items()]
            offsets = _member_offsets(text)
            lines = [text.count("\n", 0, offsets[k]) + 1 for k in data]
        else:
            rows, lines = [data], [1]
    else:
        raise DataError("expected a JSON array of rows", Where(path, 1))
    for row, line in zip(rows, lines):
        yield Where(path, line), row


def _skip(text: str, pos: int, chars: str = " \t\r\n,") -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos


def _element_lines(text: str, pos: int, count: int) -> list[int | None]:
    """Line of each element of the array whose first element starts at or after `pos` (past its '['),
    found by decoding one element at a time."""
    decoder = json.JSONDecoder()
    lines, line, counted = [], text.count("\n", 0, pos) + 1, pos
    for _ in range(count):
        pos = _skip(text, pos)
        line += text.count("\n", counted, pos)
        counted = pos
        lines.append(line)
        try:
            _, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return lines + [None] * (count - len(lines))
    return lines


def _member_offsets(text: str) -> dict[str, int]:
    """Offset of each top-level object member's value, decoding one member at a time."""
    decoder = json.JSONDecoder()
    offsets: dict[str, int] = {}
    pos = _skip(text, text.find("{") + 1)
    while pos < len(text) and text[pos] == '"':
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos, " \t\r\n:")
        offsets[key] = pos
        _, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
    return offsets


def _read_csv(path: Path) -> Iterator[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        _ = reader.fieldnames  # reads the header, so line_num counts from it
        line = reader.line_num + 1
        for row in reader:
            yield Where(path, line), dict(row)
            line = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for number, row in enumerate(table.to_pylist(), 1):
        yield Where(path, number, "row"), row


def _read_yaml(path: Path) -> Iterator[Row]:
    """chatterbot-corpus style: `conversations:` lists of alternating user/assistant strings."""
    import yaml

    node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not isinstance(data.get("conversations"), list):
        raise DataError("expected a YAML mapping with a 'conversations:' list", Where(path, 1))
    conv_node = next(v for k, v in node.value if k.value == "conversations")
    for item_node, row in zip(conv_node.value, data["conversations"]):
        yield Where(path, item_node.start_mark.line + 1), {"turns": row}


def _read_hf(dataset_id: str, source: Source) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(dataset_id, source.name, split=source.split)
    except Exception as err:  # datasets raises many types; all mean "cannot have it"
        hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if hub_offline() else ""
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot load dataset '{dataset_id}' split '{source.split}'{hint}: {reason}",
                        Where(f"hf:{dataset_id}")) from None
    for number, row in enumerate(ds, 1):
        yield Where(f"hf:{dataset_id}[{source.split}]", number, "row"), row
