"""`lorachat merge ADAPTER --out DIR`: the adapter folded into its base, proven equal to it before it is published.

    lorachat merge adapters/faq-en --out merged/faq-en [--dtype float32|bfloat16|float16] [--base MODEL]

Order matters and reads top to bottom in `merge_into_base`:
  1. open the adapter (manifest present, every sha256 matching), refuse an existing --out without --overwrite,
     and check the adapter against the base's config.json, all before any weights load;
  2. sample inputs: a few of the adapter's own eval rows, re-derived from its recipe.yaml by the seeded split
     training used (its train rows when it held none out), encoded with its own template;
  3. load the base as the adapter saw it, in float: a LoRA adapter's base as is; a QLoRA adapter's base is
     loaded quantized exactly as in training, and after the reference logits are taken, dequantized, so the
     merge lands on the very weights the adapter was trained against and never on 4-bit ones;
  4. reference logits: the adapter on that base;
  5. `merge_and_unload`, then write safetensors, config, generation config, the tokenizer with the adapter's
     chat_template.jinja as its template, and a model card, into a temp folder beside --out;
  6. load that folder again with plain `AutoModelForCausalLM.from_pretrained` and compare its logits with the
     reference: max and mean |diff|; above the dtype's tolerance the run fails and nothing is left at --out;
  7. card with the figures, fsync, rename into place (an old --out is replaced only now).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..adapters.store import install, staging_dir
from ..data.loading import load_data
from ..encoding import encode_split
from ..errors import DataError, LorachatError, RunFailed, Where
from ..files import modes_from_umask, sha256_file, write_text_atomic
from ..models import ResolvedBase, load_model, load_tokenizer
from ..templates import ChatTemplate
from ..templates.tokens import apply_added_tokens, restore_tokenizer
from .source import Parent, open_adapter, refuse_existing, resolve_checked, written_or_nothing

DTYPES = ("float32", "bfloat16", "float16")
# Max |logit difference| allowed between the merged model and the adapter on its base. In float32 the two
# differ only by summation order ((W + s·BA)x vs Wx + s·B(Ax)): 7.5e-5 at most on SmolLM2's 30 layers, so the
# bound leaves a factor of ~10 for deeper and wider models. In 16-bit the merged weight itself is rounded to the
# dtype (one ulp of W + s·BA per weight, 2^-8 relative in bfloat16) and so is every activation on both sides:
# 1.3 at most on SmolLM2's logits of ~±30 in bfloat16, so the bounds are a few times that; a wrong merge (a
# missing module, a wrong scale) moves logits by the adapter's whole effect.
TOLERANCE = {"float32": 1e-3, "bfloat16": 4.0, "float16": 1.0}
SAMPLES = 4


@dataclass(frozen=True)
class MergeOptions:
    adapter: Path
    out: Path
    dtype: str | None = None  # default: the base's own dtype (config.json), float32 when it names none
    base: str | None = None  # default: the base the adapter was trained on
    overwrite: bool = False
    samples: int = SAMPLES
    tolerance: float | None = None  # default: TOLERANCE[dtype]
    force: bool = False  # accept a base of another identity whose shapes fit (a warning, not an error)


@dataclass(frozen=True)
class MergeResult:
    out: Path
    dtype: str
    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float
    samples: int
    tokens: int
    dequantized: str | None  # "4bit"/"8bit" when the base was dequantized from the quantization trained on


def merge_into_base(options: MergeOptions, say: Callable[[str], None] = print) -> MergeResult:
    """Merge, check and publish; RunFailed (nothing at --out) when the check fails; a full disk is a one-line error too."""
    import torch

    # 1. everything that can be refused, before any weights
    out = Path(options.out)
    refuse_existing(out, options.overwrite)
    if options.dtype is not None and options.dtype not in DTYPES:
        raise LorachatError(f"unknown dtype {options.dtype!r}: use {', '.join(DTYPES)}", Where(field="--dtype"))
    parent = open_adapter(options.adapter)
    base = resolve_checked(options.base or parent.info.base_model, [parent], say, force=options.force)
    if base.note:
        say(f"note: {base.note}")
    dtype = options.dtype or base_dtype(base)
    tolerance = options.tolerance if options.tolerance is not None else TOLERANCE[dtype]
    quantization = parent.loaded.recipe.base.quantization

    # 2. sample inputs from the adapter's own held-out rows
    tokenizer = load_tokenizer(base, trust_remote_code=parent.loaded.recipe.base.trust_remote_code)
    restore_tokenizer(tokenizer, parent.info.manifest)  # template tokens the adapter added, at the same ids
    tokenizer.chat_template = parent.template_source
    inputs, drawn_from = sample_inputs(parent, tokenizer, options.samples)

    # 3-4. the base as the adapter saw it, in float; the reference logits with the adapter on
    say(f"loading {base.model_id} in {dtype}" + (f" ({quantization} as trained, to be dequantized)"
                                                 if quantization != "none" else ""))
    model = _adapter_on_base(parent, base, dtype, quantization, tokenizer)
    reference = logits(model, inputs)

    # 5. merge and write beside --out
    say("merging")
    if quantization != "none":
        model = _on_dequantized_base(model, parent, getattr(torch, dtype))
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # training turned it off; a published model should generate fast
    staging = staging_dir(out)
    with written_or_nothing(staging, out):
        say(f"writing {out}")
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del merged, model  # only the copy on disk is checked, and only one copy should sit in memory

        # 6. the folder as anyone would load it, against the adapter on its base
        say(f"checking {len(inputs)} samples from {drawn_from}")
        from transformers import AutoModelForCausalLM

        reloaded = AutoModelForCausalLM.from_pretrained(str(staging), dtype=getattr(torch, dtype))
        reloaded.eval()
        diffs = [(a - b).abs() for a, b in zip(reference, logits(reloaded, inputs))]
        del reloaded
        result = MergeResult(out, dtype, max(d.max().item() for d in diffs),
                             (sum(d.sum().item() for d in diffs) / sum(d.numel() for d in diffs)),
                             tolerance, len(inputs), sum(len(i) for i in inputs),
                             quantization if quantization != "none" else None)
        if not result.max_abs_diff <= tolerance:  # `not <=` so that a NaN fails too
            raise RunFailed(f"the merged model differs from the adapter on its base: max |logit diff| "
                            f"{result.max_abs_diff:.3g} > tolerance {tolerance:g} ({dtype}); nothing was written",
                            Where(out))

        # 7. card, then publish
        write_text_atomic(staging / "README.md", render_card(parent, base, result, drawn_from))
        modes_from_umask(staging)
        install(staging, out)
    return result


def base_dtype(base: ResolvedBase) -> str:
    """The dtype the base's config.json records, when it is one a merge can be written in; else float32."""
    config = json.loads((base.path / "config.json").read_text(encoding="utf-8"))
    named = config.get("dtype") or config.get("torch_dtype")
    return named if named in DTYPES else "float32"


def sample_inputs(parent: Parent, tokenizer: Any, count: int) -> tuple[list[list[int]], str]:
    """Token ids of up to `count` of the adapter's eval conversations (train rows when it held none out)."""
    loaded = parent.loaded
    try:
        data = load_data(loaded)
    except DataError as err:
        raise DataError(f"{err.reason} (the merge is checked on the adapter's own held-out rows, re-derived from "
                        f"its recipe.yaml)", err.where) from None
    conversations, drawn_from = (data.eval, "its eval split") if data.eval else (data.train, "its training rows")
    template = ChatTemplate(parent.template_source, tokenizer, f"{parent.info.name}/chat_template.jinja",
                            loaded.recipe.template.system)
    encoded, _ = encode_split(conversations[:count * 4], template, loaded, problems=[])
    if not encoded:
        raise DataError("no row of the adapter's data encodes under its template to check the merge on",
                        Where(parent.path, None, "data"))
    return [e.input_ids for e in encoded[:count]], drawn_from


def logits(model: Any, inputs: list[list[int]]) -> list[Any]:
    """Float32 logits per sample, one unpadded sequence at a time (padding would be one more difference)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu() for ids in inputs]


def _adapter_on_base(parent: Parent, base: ResolvedBase, dtype: str, quantization: str, tokenizer: Any) -> Any:
    from peft import PeftModel

    model = load_model(base, dtype=dtype, quantization=quantization, for_training=False,
                       trust_remote_code=parent.loaded.recipe.base.trust_remote_code)
    # The vocabulary the adapter was trained with: added rows (filled by the adapter's saved ones) and stop token,
    # so the merged model carries them and vLLM can serve it.
    apply_added_tokens(model, tokenizer, parent.info.manifest)
    peft = PeftModel.from_pretrained(model, str(parent.path))
    peft.eval()
    return peft


def _on_dequantized_base(peft: Any, parent: Parent, torch_dtype: Any) -> Any:
    """The adapter again, on the quantized base's own weights dequantized to `torch_dtype` (bitsandbytes' exact
    inverse of what training computed with), so merging never rounds into 4-bit weights."""
    from peft import PeftModel

    base = peft.unload()
    base = base.dequantize(dtype=torch_dtype)
    again = PeftModel.from_pretrained(base, str(parent.path))
    again.eval()
    return again


def render_card(parent: Parent, base: ResolvedBase, result: MergeResult, drawn_from: str) -> str:
    """The merged model's card: hub metadata (base_model, base_model_relation: merge), provenance, the check."""
    manifest = parent.info.manifest
    sources = manifest.get("inputs", {}).get("data", {}).get("sources", [])
    meta: dict[str, Any] = {
        "base_model": base.model_id,
        "base_model_relation": "merge",
        "library_name": "transformers",
        "license": manifest.get("license") or "other",
        "tags": ["lorachat", "lora", "merge"] + [t for t in (manifest.get("domain"), manifest.get("language")) if t],
        "datasets": [s["dataset"] for s in sources],
    }
    if manifest.get("language"):
        meta["language"] = [manifest["language"]]
    weights = parent.path / "adapter_model.safetensors"
    link = base.model_id if base.source == "local" else f"[{base.model_id}](https://huggingface.co/{base.model_id})"
    quantized = (f"\n\nThe adapter was trained on a {result.dequantized} (bitsandbytes) base. It was merged into a "
                 f"dequantized copy of that base: the {result.dequantized} weights it was trained against, turned "
                 f"back into {result.dtype}, never into {result.dequantized} weights, so this model computes what "
                 f"the adapter on its quantized base computes.") if result.dequantized else ""
    return (f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---\n\n"
            f"# {parent.info.name} (merged)\n\n"
            f"The LoRA adapter `{parent.info.name}` (adapter_model.safetensors sha256 `{sha256_file(weights)}`) "
            f"merged into {link} (revision `{base.revision}`) "
            f"by lorachat, written in {result.dtype}. Load it with `AutoModelForCausalLM.from_pretrained`; the "
            f"tokenizer's chat template is the adapter's `chat_template.jinja`, the one it was trained with."
            f"{quantized}\n\n"
            f"## Check\n\nThis folder, loaded again from disk, against the adapter on its base, on "
            f"{result.samples} conversations from the adapter's {drawn_from.removeprefix('its ')} "
            f"({result.tokens} tokens):\n\n"
            f"| max abs logit diff | mean abs logit diff | tolerance ({result.dtype}) |\n|---|---|---|\n"
            f"| {result.max_abs_diff:.3g} | {result.mean_abs_diff:.3g} | {result.tolerance:g} |\n\n"
            f"## Recipe of the adapter\n\n```yaml\n{parent.info.recipe_yaml}```\n")
