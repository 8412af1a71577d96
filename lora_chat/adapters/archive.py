"""Move an adapter as one file: `pack` it deterministically, `unpack` it only when every check passes.

`pack` writes `NAME/` and the files its manifest lists (plus `manifest.json`), sorted, with fixed mtimes, owners
and modes, in a gzip stream whose header carries no name or time: the same adapter gives the same bytes on any
machine. Each file is hashed while it is archived and compared with the manifest, so a tampered adapter is
refused without a second read.

`unpack` trusts nothing in the archive. The standard library's `tarfile.data_filter` is the first line of defence
(paths leaving the target, links pointing out, devices, unsafe modes), and on top of it every entry must be a
plain file or folder under one top folder, no absolute name, no link of any kind, no pickle weights; bytes are
counted as they are decompressed so a bomb stops at the limit whatever its headers say. Everything lands in a
temporary folder beside the target; the manifest is the second line: each file must be listed and match its
sha256, and every listed file must be there. Only then is the folder renamed into place, so a refused archive
installs nothing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import LorachatError, Where
from ..files import current_umask, fsync_dir, human_size
from .store import MANIFEST, install, payload_files, read_adapter, staging_dir, verify

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # torch.load / pickle: loading runs code
DEFAULT_MAX_BYTES = 20 << 30  # 20 GiB unpacked: far above any LoRA adapter, far below a full disk
_MTIME = 946684800  # 2000-01-01T00:00:00Z: any fixed time; 0 upsets some tools
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Unpacked:
    path: Path
    files: int
    bytes: int


def is_pickle(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


# ---------------------------------------------------------------- pack


class _HashingReader(io.RawIOBase):
    """Hands tarfile a file's bytes while hashing them, so packing reads each file once."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        return data


def pack(adapter: str | Path, out: str | Path, *, level: int = 1) -> Path:
    """Write `adapter` (a folder with a manifest) to `out` as a deterministic .tar.gz; refuse one that is not whole.

    gzip level 1: trained weights are close to random bytes, so higher levels cost several times the time for
    well under 1% of size (measured in bench/bench_share.py).
    """
    info = read_adapter(adapter)
    out = Path(out)
    recorded = info.manifest.get("files", {})
    missing = [name for name in recorded if not (info.path / name).is_file()]
    if missing:
        raise LorachatError(f"not whole: {', '.join(sorted(missing))} missing (see `lorachat adapters verify`)",
                            Where(info.path))
    extra = [f.relative_to(info.path).as_posix() for f in payload_files(info.path)
             if f.relative_to(info.path).as_posix() not in recorded]
    if extra:
        raise LorachatError(f"not whole: {', '.join(extra)} not listed in {MANIFEST}", Where(info.path))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    try:
        with os.fdopen(fd, "wb") as raw:
            # filename="" and a fixed mtime: gzip's header would otherwise hold the temp name and the clock.
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=_MTIME) as gz, \
                    tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                folders = {info.name}
                tar.addfile(_entry(info.name, tarfile.DIRTYPE, 0o755))
                for name in sorted([*recorded, MANIFEST]):
                    # Parent folders first (manifests list files, not folders), each once.
                    for parent in reversed(PurePosixPath(info.name, name).parents[:-1]):
                        if parent.as_posix() not in folders:
                            folders.add(parent.as_posix())
                            tar.addfile(_entry(parent.as_posix(), tarfile.DIRTYPE, 0o755))
                    _add_file(tar, info.path / name, f"{info.name}/{name}", recorded.get(name))
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _entry(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type, entry.mode, entry.size, entry.mtime = kind, mode, size, _MTIME
    entry.uid = entry.gid = 0
    entry.uname = entry.gname = ""
    return entry


def _add_file(tar: tarfile.TarFile, path: Path, arcname: str, digest: str | None) -> None:
    with path.open("rb") as f:
        reader = _HashingReader(f)
        tar.addfile(_entry(arcname, tarfile.REGTYPE, 0o644, os.fstat(f.fileno()).st_size), reader)
    if digest is not None and reader.digest.hexdigest() != digest:
        raise LorachatError(f"sha256 differs from {MANIFEST}: the adapter changed since it was written "
                            f"(see `lorachat adapters verify`)", Where(path))


# ---------------------------------------------------------------- unpack


class _CountingReader(io.RawIOBase):
    """The decompressed stream, refusing to go past `limit` bytes: headers can lie, the count cannot."""

    def __init__(self, stream: BinaryIO, limit: int, archive: Path):
        self.stream, self.limit, self.archive, self.count = stream, limit, archive, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        self.count += len(data)
        if self.count > self.limit:
            raise LorachatError(f"expands past {human_size(self.limit)}: refused as a possible decompression bomb "
                                f"(raise --max-size if it is genuine)", Where(self.archive))
        buffer[:len(data)] = data
        return len(data)


def _entry_filter(archive: Path, top: list[str]) -> Callable[[tarfile.TarInfo, str], tarfile.TarInfo]:
    def check(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
        def refuse(reason: str) -> LorachatError:
            return LorachatError(f"refused: entry {member.name!r}: {reason}; nothing was installed", Where(archive))

        if member.name.startswith(("/", "\\")) or (len(member.name) > 1 and member.name[1] == ":"):
            raise refuse("absolute path")
        try:  # first line of defence: the standard library's data filter
            safe = tarfile.data_filter(member, dest)
        except tarfile.FilterError as err:
            raise refuse(f"{type(err).__name__}: {err}") from None
        if safe.issym() or safe.islnk():
            raise refuse("links are not allowed in an adapter archive")
        if not (safe.isfile() or safe.isdir()) or safe.issparse():
            raise refuse("only plain files and folders are allowed")
        parts = PurePosixPath(safe.name).parts
        if ".." in parts:
            raise refuse("path traversal")
        if not top:
            top.append(parts[0])
        elif parts[0] != top[0]:
            raise refuse(f"outside the archive's one top folder {top[0]!r}")
        if safe.isfile() and is_pickle(safe.name):
            raise refuse("pickle weights can run code when loaded; only safetensors are accepted")
        return safe

    return check


def unpack(archive: str | Path, to: str | Path, *, overwrite: bool = False,
           max_bytes: int = DEFAULT_MAX_BYTES) -> Unpacked:
    """Check and install an adapter archive under `to`; LorachatError (one line) and nothing installed on refusal."""
    archive, to = Path(archive), Path(to)
    if not archive.is_file():
        raise LorachatError("no such archive", Where(archive))
    to.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(to / "unpack")
    top: list[str] = []
    try:
        with archive.open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz:
            counted = io.BufferedReader(_CountingReader(gz, max_bytes, archive), _BLOCK)
            try:  # "r|": a stream, read once, in order; nothing is sought from a header's claims
                with tarfile.open(fileobj=counted, mode="r|") as tar:
                    tar.extractall(staging, filter=_entry_filter(archive, top))
            except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError, ValueError) as err:
                reason = "truncated" if isinstance(err, EOFError) or "truncated" in str(err).lower() else str(err)
                raise LorachatError(f"not a readable adapter archive ({reason}); nothing was installed",
                                    Where(archive)) from None
        if not top:
            raise LorachatError("empty archive; nothing was installed", Where(archive))
        unpacked = staging / top[0]
        target = to / top[0]
        if target.exists() and not overwrite:
            raise LorachatError(f"{target} exists: kept as it is (pass --overwrite to replace it)", Where(archive))
        check_against_manifest(unpacked, Where(archive))
        sizes = [p.stat().st_size for p in unpacked.rglob("*") if p.is_file()]
        install(unpacked, target)
        return Unpacked(target, len(sizes), sum(sizes))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_against_manifest(folder: Path, where: Where) -> None:
    """The second line of defence: every file listed in the manifest, present and with its sha256, and no other.

    Stricter than `verify`, which skips dotfiles and checkpoints a local run may leave: what arrives from
    elsewhere may hold nothing the manifest does not name.
    """
    if not (folder / MANIFEST).is_file():
        raise LorachatError(f"no {MANIFEST} in the adapter: nothing was installed", where)
    info = read_adapter(folder)
    recorded = info.manifest.get("files", {})
    unlisted = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                      if p.is_file() and p.name != MANIFEST and p.relative_to(folder).as_posix() not in recorded)
    problems = [f"{name}: not listed in {MANIFEST}" for name in unlisted]
    problems += [problem.removeprefix(f"{folder}/") for problem in verify(folder)
                 if "not listed in" not in problem]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LorachatError(f"refused: {'; '.join(problems[:3])}{more}; nothing was installed", where)
