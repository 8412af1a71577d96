"""`lorachat merge A B [C...] --method ties --weights .6,.4 --out DIR`: several adapters combined into one, by PEFT.

    lorachat merge adapters/faq-en adapters/faq-sv --method cat --weights 0.5,0.5 --out adapters/faq-both

The combination itself is PEFT's `add_weighted_adapter`; this module makes it safe and leaves a full lorachat
adapter behind:
  1. every option and every adapter is checked before any weights load, each problem one line: the method,
     the weight count, the density; a manifest and matching sha256s; one base, one chat template, LoRA only
     (no DoRA, no modules_to_save), equal ranks where the method needs them;
  2. the base is loaded once in float32 (the combination reads only the LoRA matrices; a QLoRA adapter's
     matrices combine like any other), each adapter attached by name, and PEFT adds the combination;
  3. the result is published like a trained adapter (adapters.store.finish): PEFT's files, the tokenizer and
     the shared template, a recipe.yaml (the first adapter's, with the new name and rank, so `eval` re-derives
     its held-out rows from it), a card naming the parents and the method, and the manifest with sha256s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from ..adapters import FORMAT, finish, staging_dir, versions
from ..adapters.compat import COMPAT_KEYS
from ..errors import LorachatError, Where
from ..models import load_model, load_tokenizer
from .source import Parent, open_adapter, refuse_existing, resolve_checked, written_or_nothing

METHODS = ("linear", "cat", "svd", "ties", "dare_ties", "dare_linear", "magnitude_prune")
# PEFT refuses adapters of unequal rank for these (it adds the matrices element-wise).
EQUAL_RANKS = frozenset({"linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"})
# The methods that prune each task vector to a share of its entries first.
USES_DENSITY = frozenset({"ties", "dare_ties", "dare_linear", "magnitude_prune"})
DEFAULT_DENSITY = 0.5
NEW = "default"  # PEFT saves the adapter named "default" at the folder's top level, the others in subfolders


@dataclass(frozen=True)
class CombineOptions:
    adapters: tuple[Path, ...]
    out: Path
    method: str
    weights: tuple[float, ...] | None = None  # default: 1/N each (the mean of the adapters' updates)
    density: float | None = None  # default: DEFAULT_DENSITY for the methods that use one
    base: str | None = None  # default: the base the adapters were trained on
    overwrite: bool = False
    seed: int = 0  # DARE prunes at random
    force: bool = False  # accept adapters of bases of another identity whose shapes fit (warnings, not errors)


def check_options(options: CombineOptions) -> tuple[tuple[float, ...], float | None]:
    """The weights and density to use; a one-line error for an unknown method, a weight count that does not
    match the adapters, or a density outside (0, 1] or given to a method that has none."""
    count = len(options.adapters)
    if count < 2:
        raise LorachatError("combining needs at least two adapters", Where(field="ADAPTERS"))
    if options.method not in METHODS:
        raise LorachatError(f"unknown method {options.method!r}: use one of {', '.join(METHODS)}",
                            Where(field="--method"))
    weights = options.weights if options.weights is not None else (1.0 / count,) * count
    if len(weights) != count:
        raise LorachatError(f"{len(weights)} weights for {count} adapters: give one weight per adapter, in order",
                            Where(field="--weights"))
    if not all(math.isfinite(w) for w in weights):
        raise LorachatError(f"weights must be finite numbers, got {', '.join(map(str, weights))}",
                            Where(field="--weights"))
    density = options.density
    if options.method in USES_DENSITY:
        density = DEFAULT_DENSITY if density is None else density
        if not 0 < density <= 1:
            raise LorachatError(f"density {density:g} is outside (0, 1]: it is the share of each adapter's update "
                                f"kept, e.g. 0.5", Where(field="--density"))
    elif density is not None:
        raise LorachatError(f"--density applies to {', '.join(sorted(USES_DENSITY))}, not to {options.method}",
                            Where(field="--density"))
    return weights, density


def check_parents(parents: list[Parent], method: str, say: Callable[[str], None] = print,
                  force: bool = False) -> None:
    """One base, one template, plain LoRA, and equal ranks where `method` needs them (one line each). How the
    parents relate is checked before what each one is, so the first line names the most basic mismatch. With
    `force`, bases that differ only in identity (model id, same shapes) are a warning."""
    first = parents[0]
    base = first.info.manifest.get("base", {})
    for other in parents[1:]:
        theirs = other.info.manifest.get("base", {})
        differs = [key for key in ("model_id", *COMPAT_KEYS) if theirs.get(key) != base.get(key)]
        if differs:
            key = differs[0]
            message = (f"trained on another base than {first.info.name}: {key} {theirs.get(key)} != "
                       f"{base.get(key)}")
            if not (force and differs == ["model_id"]):
                hint = " (the shapes fit: pass --force to combine anyway)" if differs == ["model_id"] else ""
                raise LorachatError(f"{message}; only adapters of one base combine{hint}", Where(other.path))
            say(f"warning: {other.path}: {message}; combining anyway (--force)")
        if other.template_source != first.template_source:
            raise LorachatError(f"its chat_template.jinja differs from {first.info.name}'s: a combined adapter "
                                f"has one template, so only adapters trained with the same one combine",
                                Where(other.path))
    for parent in parents:
        config = parent.peft_config
        if config.get("trainable_token_indices"):
            raise LorachatError("this adapter trains rows of template tokens it added to the base's vocabulary, "
                                "which PEFT's add_weighted_adapter does not combine; merge it into the base with "
                                "`lorachat merge` instead", Where(parent.path))
        if config.get("peft_type", "LORA") != "LORA":
            raise LorachatError(f"a {config.get('peft_type')} adapter: only LoRA adapters combine", Where(parent.path))
        if config.get("use_dora"):
            raise LorachatError("a DoRA adapter: PEFT's add_weighted_adapter combines the LoRA matrices but not "
                                "DoRA's magnitude vectors, so the result would be wrong", Where(parent.path))
        if config.get("modules_to_save"):
            raise LorachatError(f"trains whole modules too (modules_to_save: {config['modules_to_save']}), which "
                                f"do not combine", Where(parent.path))
    if method in EQUAL_RANKS:
        ranks = {p.info.name: _rank(p.peft_config) for p in parents}
        if len(set(ranks.values())) > 1:
            listed = ", ".join(f"{name} r={r}" for name, r in ranks.items())
            raise LorachatError(f"{method} needs adapters of equal rank ({listed}); use cat or svd, which combine "
                                f"any ranks", Where(field="--method"))


def _rank(config: dict[str, Any]) -> int:
    return max([config["r"], *(config.get("rank_pattern") or {}).values()])


def combine(options: CombineOptions, say: Callable[[str], None] = print) -> Path:
    """Combine, publish the adapter directory at `options.out`, return its path."""
    import torch
    from peft import PeftModel

    # 1. every refusal before any weights
    weights, density = check_options(options)
    out = Path(options.out)
    refuse_existing(out, options.overwrite)
    parents = [open_adapter(path) for path in options.adapters]
    check_parents(parents, options.method, say, options.force)
    base = resolve_checked(options.base or parents[0].info.base_model, parents, say, force=options.force)
    if base.note:
        say(f"note: {base.note}")

    # 2. PEFT's combination, on a float base
    say(f"loading {base.model_id} and {len(parents)} adapters")
    model = load_model(base, dtype="float32", quantization="none", for_training=False,
                       trust_remote_code=parents[0].loaded.recipe.base.trust_remote_code)
    names = [f"a{i}" for i in range(len(parents))]  # PEFT module keys cannot hold '.', directory names can
    peft = PeftModel.from_pretrained(model, str(parents[0].path), adapter_name=names[0])
    for name, parent in zip(names[1:], parents[1:]):
        peft.load_adapter(str(parent.path), adapter_name=name)
    say(f"combining with {options.method}")
    torch.manual_seed(options.seed)
    peft.add_weighted_adapter(names, list(weights), NEW, combination_type=options.method, density=density)
    config = peft.peft_config[NEW]
    if config.use_rslora:
        # PEFT folds each parent's scaling into the new matrices and sets lora_alpha = r for a scaling of 1,
        # but copies use_rslora, under which the scaling is alpha / sqrt(r): alpha = sqrt(r) makes it 1 again.
        config.lora_alpha = math.sqrt(config.r)
    peft.set_adapter(NEW)
    for name in names:
        peft.delete_adapter(name)

    # 3. a full lorachat adapter directory
    staging = staging_dir(out)
    with written_or_nothing(staging, out):
        say(f"writing {out}")
        peft.save_pretrained(staging)
        tokenizer = load_tokenizer(base, trust_remote_code=parents[0].loaded.recipe.base.trust_remote_code)
        finish(staging, out, tokenizer=tokenizer, template_source=parents[0].template_source,
               recipe_yaml=_recipe_yaml(parents[0], out, config), manifest=_manifest(parents, options, weights,
                                                                                     density, out),
               metrics={}, train_log=None)
    return out


def _recipe_yaml(first: Parent, out: Path, config: Any) -> str:
    """The first adapter's recipe, renamed and with the combined rank: base, template and data stay its own, so
    `eval` re-derives the same held-out rows from it."""
    recipe = yaml.safe_load(first.info.recipe_yaml)
    recipe["name"] = out.name
    recipe["lora"].update(r=config.r, alpha=float(config.lora_alpha))
    recipe["output"]["dir"] = str(out.resolve())
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)


def _manifest(parents: list[Parent], options: CombineOptions, weights: tuple[float, ...], density: float | None,
              out: Path) -> dict[str, Any]:
    manifests = [p.info.manifest for p in parents]
    first = manifests[0]

    def shared(key: str) -> Any:  # a label all parents agree on, else none
        values = {m.get(key) for m in manifests}
        return values.pop() if len(values) == 1 else None

    sources, seen = [], set()
    for manifest in manifests:
        for source in manifest.get("inputs", {}).get("data", {}).get("sources", []):
            key = source.get("sha256") or source.get("path")
            if key not in seen:
                seen.add(key)
                sources.append(source)
    return {
        "format": FORMAT, "name": out.name, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": first["base"], "inputs": {"data": {"sources": sources}},
        "seed": options.seed, "domain": shared("domain"), "language": shared("language"),
        "license": shared("license"), "template": first.get("template"), "versions": versions(),
        "combined_from": {
            "method": options.method, "weights": list(weights), "density": density, "seed": options.seed,
            "parents": [{"name": p.info.name, "path": str(p.path),
                         "adapter_sha256": p.info.manifest.get("files", {}).get("adapter_model.safetensors")}
                        for p in parents],
        },
    }
