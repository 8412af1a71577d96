"""The recording folder: append-only JSONL that several server processes share and a kill -9 cannot corrupt.

Each server process writes its own files, `record-<server>-<NNNN>.jsonl` (created with O_EXCL, so no two
writers ever share one), and starts the next file when one passes `rotate_bytes`. Every record is one line,
written with a single `os.write` of the whole line on an O_APPEND descriptor: a process killed at any moment
leaves whole lines and at most one line cut short at the end of its file, the one in flight. No fsync per
line: a killed process loses nothing the kernel already holds (only a power cut can), and an fsync per
exchange would cost more than the rest of recording together.

The reader keeps every file as it is, skips a line it cannot read (a truncated last line, or anything that is
not one of the records below), and counts it with its file and line, so a report says what it left out.

Records, one JSON object a line, told apart by `kind`:
    exchange    id (the completion id the API returned), server, time, model (who answered), adapter (the
                resident actually used, null for the base), base, messages, reply, finish_reason, sampling,
                route (the router's decision for `model: auto`, else null), usage
    feedback    id, server, time, response (an exchange id), model, and what was given: rating ("up" | "down",
                or null taking an earlier rating back) and/or edit (what the reply should have said)
    comparison  id, server, time, responses [a, b], models [a's, b's], winner ("a" | "b" | "tie")
"""

from __future__ import annotations

import errno
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorachatError, Where

PREFIX = "record-"
GLOB = f"{PREFIX}*.jsonl"
ROTATE_BYTES = 64 << 20  # a file a text editor still opens, a few hundred thousand exchanges
KINDS = {"exchange": ("id", "model", "messages", "reply"), "feedback": ("id", "response", "model"),
         "comparison": ("id", "responses", "models", "winner")}


def _not_writable(folder: Path, why: str) -> LorachatError:
    return LorachatError(f"{folder}: the recording folder is not writable ({why})", Where(field="--record"))


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and make sure this process may add files to it (before a server loads weights)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _not_writable(folder, err.strerror) from None
    if not Path(folder).is_dir():
        raise _not_writable(folder, "it is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _not_writable(folder, "permission denied")


class RecordWriter:
    """Appends records to this process's files in `folder`; safe to call from several threads."""

    def __init__(self, folder: Path, server: str, *, rotate_bytes: int = ROTATE_BYTES):
        self.folder, self.server, self.rotate_bytes = Path(folder), server, rotate_bytes
        self._lock = threading.Lock()
        self._seq = 0
        self._fd = -1
        self._size = 0
        self.path: Path | None = None
        check_writable(self.folder)
        try:
            self._open_next()
        except OSError as err:
            raise _not_writable(self.folder, err.strerror) from None

    def _open_next(self) -> None:
        while True:
            self._seq += 1
            path = self.folder / f"{PREFIX}{self.server}-{self._seq:04d}.jsonl"
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:  # left by an earlier process with the same id: never append to another's file
                continue
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._size, self.path = fd, 0, path
            return

    def append(self, record: dict) -> None:
        """One record as one line, in one write (OSError when the disk refuses it)."""
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            if self._size and self._size + len(line) > self.rotate_bytes:
                self._open_next()
            written = os.write(self._fd, line)
            self._size += written
            if written != len(line):  # a full disk: the reader will skip the torn line; the caller hears now
                raise OSError(errno.ENOSPC, f"only {written} of {len(line)} bytes written to {self.path}")

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


@dataclass(frozen=True)
class Skipped:
    file: Path
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass
class Records:
    """Everything readable in a recording folder, and what was not."""

    exchanges: dict[str, dict] = field(default_factory=dict)  # response id -> exchange
    feedback: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    files: int = 0


def prompt_key(messages: list[dict]) -> str:
    """The identity of a prompt: its turns' roles and texts, in order (what "the same prompt" means)."""
    return json.dumps([[m.get("role"), m.get("content")] for m in messages], ensure_ascii=False)


def record_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise LorachatError(f"{folder}: no such recording folder (start a server with --record {folder})")
    return sorted(folder.glob(GLOB))


def iter_lines(folder: Path, needle: str | None = None) -> Iterator[dict | Skipped]:
    """Each record (a dict) or each unreadable line (`Skipped`), file by file in name order. With `needle`, only
    lines holding that text are parsed (a server looking up one response id skips the rest cheaply)."""
    key = needle.encode("utf-8") if needle else None
    for path in record_files(folder):
        data = path.read_bytes()
        lines = data.split(b"\n")
        tail = lines.pop()  # after the last newline: empty, or a line a killed writer left unfinished
        for number, raw in enumerate(lines, 1):
            if key is not None and key not in raw:
                continue
            yield _parse(path, number, raw)
        if tail and (key is None or key in tail):
            yield Skipped(path, len(lines) + 1, "truncated last line (its writer stopped mid-line); skipped")


def _parse(path: Path, number: int, raw: bytes) -> dict | Skipped:
    try:
        record = json.loads(raw)
    except ValueError:
        return Skipped(path, number, "not a JSON line; skipped")
    if not isinstance(record, dict) or record.get("kind") not in KINDS:
        return Skipped(path, number, f"not a record (kind must be one of {', '.join(KINDS)}); skipped")
    missing = [k for k in KINDS[record["kind"]] if k not in record]
    if missing:
        return Skipped(path, number, f"{record['kind']} record without {', '.join(missing)}; skipped")
    return record


def read_records(folder: Path) -> Records:
    """The folder's records by kind; a folder without record files is an error (nothing to report)."""
    out = Records(files=len(record_files(folder)))
    if not out.files:
        raise LorachatError(f"{folder}: no record files ({GLOB}); record with lorachat serve ... --record {folder}")
    for item in iter_lines(folder):
        if isinstance(item, Skipped):
            out.skipped.append(item)
        elif item["kind"] == "exchange":
            out.exchanges[item["id"]] = item
        elif item["kind"] == "feedback":
            out.feedback.append(item)
        else:
            out.comparisons.append(item)
    return out
