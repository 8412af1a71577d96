"""Ground floor: file helpers every layer shares (hashing, lenient JSON reads, atomic writes, the umask, the
cache folder)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks so large weights don't sit in memory."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable or not an object: for the optional files an
    adapter may carry (metrics, PEFT's config), shown where they exist and skipped where they do not."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temp file, fsync and rename, so a reader never sees half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; the file should read like any other
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def modes_from_umask(root: Path) -> None:
    """Give every file under `root` mode 0666 and every folder 0777, less the umask, as a plain `open` would.

    Some writers create files private (safetensors writes 0600 through a temp file, mkstemp/mkdtemp make
    0600/0700): a folder that mixes them cannot be shared or copied into a container for another user.
    """
    mask = current_umask()
    for path in [root, *Path(root).rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def user_cache_dir() -> Path:
    """The lorachat cache: `$LORACHAT_CACHE`, else `$XDG_CACHE_HOME/lorachat`, else `~/.cache/lorachat`."""
    if os.environ.get("LORACHAT_CACHE"):
        return Path(os.environ["LORACHAT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lorachat"
    return Path.home() / ".cache" / "lorachat"


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        fsync_file(file)
    for folder in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(folder)
    fsync_dir(path)


def publish_dir(staging: Path, target: Path) -> Path:
    """Rename a finished folder to `target`, replacing what is there only now that the new one is whole.

    The old `target` is first renamed aside (one rename each way, so a reader sees the old folder or the
    new one, never a mix), then removed. `staging` must lie beside `target` (same filesystem).
    """
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / "run")
    os.rename(staging, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def human_size(n: float) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
