"""What an adapter is, in a few facts: for `lorachat adapters list` (one row each) and `show` (everything).

Read from files alone (manifest, PEFT's config, metrics, the safetensors header): no torch, no weights.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import LorachatError, Where
from ..files import read_json_object
from .compat import PEFT_CONFIG, PEFT_WEIGHTS, vllm_problems
from .store import MANIFEST, METRICS, looks_whole, read_adapter


@dataclass(frozen=True)
class Runtime:
    name: str
    loads: bool
    reason: str  # why not, or how


@dataclass(frozen=True)
class Summary:
    """One adapter in the facts `list` shows and `--json` prints."""

    name: str
    path: str
    base: str | None
    base_revision: str | None
    domain: str | None
    language: str | None
    variant: str  # lora | dora | rslora (PEFT's config, not the recipe: it is what loads)
    rank: int | None
    size_bytes: int
    trained: str | None  # the manifest's creation time, UTC
    eval_loss: float | None
    base_eval_loss: float | None
    vs_base: str | None  # "wins/ties/losses on METRIC" where `lorachat eval` recorded a comparison
    has_manifest: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def variant_of(config: dict[str, Any]) -> str:
    return "dora" if config.get("use_dora") else "rslora" if config.get("use_rslora") else "lora"


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _eval_summary(metrics: dict[str, Any]) -> tuple[float | None, float | None, str | None]:
    """The adapter's held-out loss, the base's where recorded, and eval's win/tie/loss count against the base."""
    section = metrics.get("eval") if isinstance(metrics.get("eval"), dict) else {}
    wins = next((key for key in section if key.startswith("wins_vs_base_")), None)
    vs_base = (f"{section[wins]}/{section.get('ties_vs_base', 0)}/{section.get('losses_vs_base', 0)} "
               f"on {wins.removeprefix('wins_vs_base_')}") if wins else None
    return _number(section.get("loss")), _number(section.get("base_loss")), vs_base


def summarize(path: str | Path) -> Summary:
    """The facts of one adapter folder (a lorachat adapter, or a plain PEFT one without a manifest)."""
    path = Path(path)
    config = read_json_object(path / PEFT_CONFIG)
    if looks_whole(path):
        info = read_adapter(path)
        manifest = info.manifest
        base = manifest.get("base", {})
        base_id, revision = base.get("model_id"), base.get("revision")
    elif config:
        manifest, base_id, revision = {}, config.get("base_model_name_or_path"), config.get("revision")
    else:
        raise LorachatError(f"not an adapter: neither {MANIFEST} nor {PEFT_CONFIG}", Where(path))
    loss, base_loss, vs_base = _eval_summary(read_json_object(path / METRICS))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return Summary(path.resolve().name, str(path), base_id, revision, manifest.get("domain"), manifest.get("language"),
                   variant_of(config), config.get("r"), size, manifest.get("created"), loss, base_loss,
                   vs_base, bool(manifest))


def find_adapters(root: str | Path) -> list[Path]:
    """Adapter folders directly under `root` (hidden staging folders skipped), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise LorachatError("no such folder", Where(root))
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and ((p / MANIFEST).is_file() or (p / PEFT_CONFIG).is_file()))


def runtimes(path: str | Path) -> list[Runtime]:
    """Which runtimes can load this adapter as it is, and why not where one cannot.

    PEFT loads anything it wrote. vLLM's LoRA support refuses what `compat.vllm_problems` names (DoRA,
    modules_to_save, trainable token rows, ...). `lorachat export` (llama.cpp's GGUF LoRA) converts plain LoRA deltas only.
    """
    path = Path(path)
    config = read_json_object(path / PEFT_CONFIG)
    problems = []
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} is not LoRA")
    if config.get("use_dora"):
        problems.append("DoRA (magnitude vectors)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}")
    safetensors = (path / PEFT_WEIGHTS).is_file()
    peft = Runtime("PEFT", safetensors, "PeftModel.from_pretrained(base, folder)" if safetensors
                   else f"no {PEFT_WEIGHTS}")
    refused = vllm_problems(path)
    vllm = Runtime("vLLM", safetensors and not refused,
                   "; ".join(refused) if refused else "--enable-lora --lora-modules name=folder")
    llama = Runtime("llama.cpp", safetensors and not problems,
                    "; ".join(problems) if problems else "via `lorachat export` (GGUF LoRA)")
    return [peft, vllm, llama]


def details(path: str | Path) -> dict[str, Any]:
    """Everything `show` prints: summary, base, template, data sources, recipe, metrics, files, runtimes."""
    path = Path(path)
    summary = summarize(path)
    manifest = read_adapter(path).manifest if summary.has_manifest else {}
    config = read_json_object(path / PEFT_CONFIG)
    return {
        "summary": summary.to_json(),
        "base": manifest.get("base") or {"model_id": summary.base, "revision": summary.base_revision},
        "template": manifest.get("template"),
        "lora": {key: config.get(key) for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora",
                                                    "use_rslora", "modules_to_save")},
        "data": manifest.get("inputs", {}).get("data", {}).get("sources", []),
        "versions": manifest.get("versions", {}),
        "origin": manifest.get("origin"),
        "metrics": read_json_object(path / METRICS),
        "files": manifest.get("files", {}),
        "recipe": (path / "recipe.yaml").read_text(encoding="utf-8") if (path / "recipe.yaml").is_file() else None,
        "runtimes": [asdict(r) for r in runtimes(path)],
    }
