"""What every merge and export starts from: adapters that are whole and untampered, checked against one base
before any weights load, and an output path that may be written."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import TEMPLATE, AdapterInfo, check_compatible, read_adapter, verify
from ..errors import LorachatError, Where
from ..models import ResolvedBase, model_facts, resolve_base
from ..recipe import LoadedRecipe, load_recipe


@dataclass
class Parent:
    """One adapter directory, read and verified."""

    info: AdapterInfo
    loaded: LoadedRecipe
    template_source: str  # chat_template.jinja: the exact template it was trained with
    peft_config: dict[str, Any]  # adapter_config.json

    @property
    def path(self) -> Path:
        return self.info.path


def open_adapter(path: str | Path) -> Parent:
    """Read an adapter directory and check every file against its manifest (one-line error when not whole)."""
    info = read_adapter(path)  # no manifest: "not a complete lorachat adapter"
    problems = verify(info.path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise LorachatError(f"does not match its manifest: {problems[0]}{more}; refusing to use a tampered or "
                            f"damaged adapter", Where(info.path))
    template = info.path / TEMPLATE
    if not template.is_file():
        raise LorachatError(f"no {TEMPLATE}: the adapter does not record the template it was trained with",
                            Where(info.path))
    config_path = info.path / "adapter_config.json"
    try:
        peft_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LorachatError(f"unreadable PEFT config: {err}", Where(config_path)) from None
    return Parent(info, load_recipe(info.path / "recipe.yaml"), template.read_text(encoding="utf-8"), peft_config)


def resolve_checked(model: str, parents: list[Parent], say: Callable[[str], None], *, force: bool = False,
                    need_weights: bool = True) -> ResolvedBase:
    """The base on disk, every adapter checked against its config.json and tensor shapes first (no weights read
    until that passes); `force` lets a base of other identity but fitting shapes through, with a warning."""
    config_only = resolve_base(model, need_weights=False)
    facts = model_facts(config_only)
    for parent in parents:
        for warning in check_compatible(parent.info, facts, base=config_only, force=force):
            say(f"warning: {warning}")
    return resolve_base(model, need_weights=True) if need_weights else config_only


def refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise LorachatError(f"{out} already exists; use --overwrite to replace it (the old one stays until the "
                            f"new one is whole)", Where(field="--out"))


@contextlib.contextmanager
def written_or_nothing(staging: Path, out: Path) -> Iterator[None]:
    """Remove `staging` unless the block published it; a full disk or other OSError becomes one line. Exit 2, as
    for bad input: nothing was trained or lost, and the user's fix is the output place (free space, another --out)."""
    try:
        yield
    except OSError as err:
        reason = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise LorachatError(f"cannot write: {reason}; nothing was written", Where(out)) from err
    finally:
        if staging.exists():
            if staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                staging.unlink(missing_ok=True)
