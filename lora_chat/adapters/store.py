"""The adapter directory: write it atomically, read it, check it against a base, keep its manifest true.

Layout (see ARCHITECTURE.md): PEFT's `adapter_config.json` + `adapter_model.safetensors`, the tokenizer and
the exact `chat_template.jinja`, `recipe.yaml`, `metrics.json`, `train_log.jsonl`, a `README.md` model card
and `manifest.json` (sha256 of every other file, the base's identity and shapes, versions, data hashes).
`manifest.json` is written last and an adapter is only ever published by renaming a finished folder into
place, so a folder with a manifest is whole.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import LorachatError, Where
from ..files import fsync_tree, modes_from_umask, publish_dir, sha256_file, write_text_atomic

MANIFEST = "manifest.json"
METRICS = "metrics.json"
CARD = "README.md"
RECIPE = "recipe.yaml"
TRAIN_LOG = "train_log.jsonl"
TEMPLATE = "chat_template.jinja"
FORMAT = 1


@dataclass
class AdapterInfo:
    path: Path
    name: str  # the directory name
    manifest: dict[str, Any]
    recipe_yaml: str
    base_model: str  # the base's model id as recorded at training time


# ---------------------------------------------------------------- reading


def looks_whole(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_adapter(path: str | Path) -> AdapterInfo:
    """Read an adapter directory's manifest and recipe; LorachatError (one line) when it is not one."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise LorachatError("no such adapter directory", Where(path))
    if not manifest_path.is_file():
        raise LorachatError(f"not a complete lorachat adapter: no {MANIFEST} (an unfinished or foreign run?)",
                            Where(path))
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        base_model = manifest["base"]["model_id"]
    except (ValueError, KeyError, TypeError) as err:
        raise LorachatError(f"unreadable manifest: {err}", Where(manifest_path)) from None
    recipe_path = path / RECIPE
    recipe_yaml = recipe_path.read_text(encoding="utf-8") if recipe_path.is_file() else ""
    return AdapterInfo(path, path.resolve().name, manifest, recipe_yaml, base_model)


def verify(path: str | Path) -> list[str]:
    """Problems with an adapter's files against its manifest (empty when all sha256s match)."""
    info = read_adapter(path)
    recorded = info.manifest.get("files", {})
    problems = []
    for name, digest in sorted(recorded.items()):
        file = info.path / name
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif sha256_file(file) != digest:
            problems.append(f"{file}: sha256 differs from {MANIFEST}")
    for file in payload_files(info.path):
        name = file.relative_to(info.path).as_posix()
        if name not in recorded:
            problems.append(f"{file}: not listed in {MANIFEST}")
    return problems


# ---------------------------------------------------------------- writing


def payload_files(path: Path) -> list[Path]:
    """The files a manifest lists: all but the manifest itself, dotfiles (staging leftovers) and checkpoints."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST
                  and not p.relative_to(path).parts[0].startswith((".", "checkpoints")))


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    manifest["files"] = {f.relative_to(path).as_posix(): sha256_file(f) for f in payload_files(path)}
    write_text_atomic(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def staging_dir(target: Path) -> Path:
    """A fresh temp folder beside `target` (same filesystem, so the final rename is atomic)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))  # 0700 until `finish`


def versions() -> dict[str, str]:
    found = {}
    for dist in ("lorachat", "peft", "transformers", "torch", "trl", "accelerate"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "unknown"
    return found


def finish(staging: Path, target: Path, *, tokenizer: Any, template_source: str, recipe_yaml: str,
           manifest: dict[str, Any], metrics: dict[str, Any], train_log: Path | None) -> Path:
    """Complete an adapter in `staging` (which already holds PEFT's two files) and rename it to `target`.

    `target` may exist holding only a run's checkpoints and live log: those are replaced (the run is done).
    """
    tokenizer.chat_template = template_source  # the template trained with, not the tokenizer's own
    tokenizer.save_pretrained(staging)
    write_text_atomic(staging / TEMPLATE, template_source)
    write_text_atomic(staging / RECIPE, recipe_yaml)
    write_text_atomic(staging / METRICS, json.dumps(metrics, indent=2) + "\n")
    if train_log is not None and train_log.is_file():
        shutil.copyfile(train_log, staging / TRAIN_LOG)
    write_text_atomic(staging / CARD, render_card(manifest, recipe_yaml, metrics))
    write_manifest(staging, manifest)
    install(staging, target)
    shutil.rmtree(previous_of(target), ignore_errors=True)  # what --overwrite set aside
    return target


def install(staging: Path, target: Path) -> None:
    """Publish a finished folder: fsync it, then `files.publish_dir` (the old `target` moved aside, `staging`
    renamed into place, the old one deleted only after the rename: readers never see a mix)."""
    modes_from_umask(staging)  # PEFT's safetensors file and mkdtemp's folder come out private; the rest 0644
    fsync_tree(staging)
    publish_dir(staging, target)


def previous_of(target: Path) -> Path:
    """Where `finetune --overwrite` keeps the adapter it replaces until the new one is published."""
    return target.parent / f".{target.name}.previous"


def update_metrics(path: str | Path, section: str, values: dict[str, Any]) -> None:
    """Merge `values` into `metrics.json[section]`, re-render the card's model-index, refresh the manifest.

    Merged, not replaced: `eval` may add its report to the section where training put its eval loss.
    """
    info = read_adapter(path)
    metrics_path = info.path / METRICS
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else {}
    previous = metrics.get(section)
    metrics[section] = {**previous, **values} if isinstance(previous, dict) else values
    write_text_atomic(metrics_path, json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(info.path / CARD, render_card(info.manifest, info.recipe_yaml, metrics))
    write_manifest(info.path, info.manifest)


# ---------------------------------------------------------------- data sources and the card


def source_license(location: str) -> str | None:
    """The licence of a data file shipped in an installed package (its distribution's metadata), if any."""
    try:
        where = Path(location).resolve()
    except (OSError, ValueError):
        return None
    for top, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            try:
                files = importlib.metadata.files(dist) or []
                meta = importlib.metadata.metadata(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            if any(str(where).endswith(str(f)) and f.parts[0] == top for f in files):
                return meta.get("License-Expression") or meta.get("License") or None
    return None


_BOOKKEEPING = {"steps", "epochs", "tokens", "runtime_s", "samples", "rows"}  # counts, not results


def _model_index(name: str, metrics: dict[str, Any]) -> list[dict[str, Any]]:
    results = []
    for section, values in metrics.items():
        if not isinstance(values, dict):
            continue
        numbers = [{"type": key, "name": f"{section} {key}", "value": value} for key, value in values.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _BOOKKEEPING]
        if numbers:
            results.append({"task": {"type": "text-generation"},
                            "dataset": {"name": f"{name} ({section})", "type": name}, "metrics": numbers})
    return [{"name": name, "results": results}] if results else []


def _forgetting(metrics: dict[str, Any]) -> str:
    """eval's learned-vs-forgot numbers as a sentence with their intervals (lorachat eval's forgetting check)."""
    values = metrics.get("eval")
    if not isinstance(values, dict) or "forgetting" not in values:
        return ""
    ci = values["forgetting"]["ci95"]

    def signed(key: str) -> str:
        low, high = ci[key]
        return f"{values[key]:+.3f} (95% interval {low:+.3f} to {high:+.3f})"
    verdict = ("its general loss rose beyond its interval: it forgot some of what the base did"
               if values["forgetting"]["forgot"] else "no rise in general loss beyond its interval")
    return (f"**Learned vs forgot.** Loss gain on its own eval data {signed('own_loss_gain')} nats/token, win rate "
            f"{values['own_win_rate']:.2f} against the base; loss change on general data "
            f"({values['forgetting']['general_set']}) {signed('general_loss_delta')}, greedy replies identical to "
            f"the base's on {values['general_agreement']:.0%} of general prompts: {verdict}.\n\n")


def render_card(manifest: dict[str, Any], recipe_yaml: str, metrics: dict[str, Any]) -> str:
    """The model card: hub YAML front matter, then what was trained on what, the recipe and the results."""
    base = manifest["base"]
    sources = manifest.get("inputs", {}).get("data", {}).get("sources", [])
    name = manifest.get("name", "adapter")
    tags = ["lorachat", "peft", "lora"] + [t for t in (manifest.get("domain"), manifest.get("language")) if t]
    meta: dict[str, Any] = {
        "base_model": base["model_id"],
        "base_model_relation": "adapter",
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "license": manifest.get("license") or "other",
        "tags": tags,
        "datasets": [s["dataset"] for s in sources],
    }
    if manifest.get("language"):
        meta["language"] = [manifest["language"]]
    index = _model_index(name, metrics)
    if index:
        meta["model-index"] = index
    credits = "\n".join(f"- `{s['dataset']}`" + (f", licence {s['license']}" if s.get("license") else
                                                   ", licence unknown") + f" (sha256 `{s['sha256'][:12]}…`)"
                        if s.get("sha256") else f"- `{s['dataset']}`" for s in sources)
    results = "\n".join(f"| {section} | {key} | {value:.4g} |" if isinstance(value, float) else
                        f"| {section} | {key} | {value} |"
                        for section, values in metrics.items() if isinstance(values, dict)
                        for key, value in values.items() if isinstance(value, (int, float, str)))
    combined = manifest.get("combined_from")
    made = (f"combined with `lorachat merge --method {combined['method']}` from "
            + ", ".join(f"`{p['name']}` (weight {w:g})" for p, w in zip(combined["parents"], combined["weights"]))
            + (f", density {combined['density']:g}" if combined.get("density") is not None else "")
            + " (PEFT's `add_weighted_adapter`); its recipe below is the first parent's"
            if combined else "trained with lorachat")
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n"
            f"# {name}\n\nA LoRA adapter for [{base['model_id']}](https://huggingface.co/{base['model_id']}) "
            f"({base.get('architecture')}), {made}.\n\n"
            f"Load it with `PeftModel.from_pretrained(base, \"<this folder>\")`; the tokenizer files and "
            f"`chat_template.jinja` here are the exact ones it was trained with.\n\n"
            f"## Data\n\n{credits or '- (none recorded)'}\n\n"
            f"## Results\n\n| section | metric | value |\n|---|---|---|\n{results}\n\n{_forgetting(metrics)}"
            f"## Recipe\n\n```yaml\n{recipe_yaml}```\n")
