"""Can these recipes train together on one loaded base? Checked before any weights load, one line per refusal.

Recipes trained together share the base's weights, dtype, quantization and vocabulary, and one process; what each
adapter trains (data, template, rank, targets, lr, schedule, epochs, seed, eval split, output) stays its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import LorachatError
from ...recipe import LoadedRecipe

# Keys of `base:` that decide the weights every adapter trains on.
SHARED_BASE_KEYS = ("model", "revision", "dtype", "quantization", "trust_remote_code", "attn_implementation")
# Run-wide settings of `training:`: the loop, its kernels and its processes are shared.
SHARED_TRAINING_KEYS = ("distributed", "kernels")


def check_recipes(recipes: Sequence[LoadedRecipe], outputs: Sequence[Path]) -> None:
    """Refuse, from the recipes alone, what cannot share one run: the same recipe or output twice, another base,
    another run-wide setting, and what the mixed-adapter layers do not train (DoRA, whole modules, TensorBoard)."""
    from ...models import pick_dtype

    first = recipes[0]
    seen_paths: dict[Path, LoadedRecipe] = {}
    seen_outputs: dict[Path, LoadedRecipe] = {}
    for loaded, out in zip(recipes, outputs):
        path = Path(loaded.path).resolve()
        if path in seen_paths:
            raise LorachatError(f"the same recipe is given twice; each adapter of a joint run needs its own recipe",
                                loaded.where())
        seen_paths[path] = loaded
        if out.resolve() in seen_outputs:
            raise LorachatError(f"{out} is also the output.dir of {seen_outputs[out.resolve()].path}; each adapter "
                                f"needs its own", loaded.where("output", "dir"))
        seen_outputs[out.resolve()] = loaded
        base, ref = loaded.recipe.base, first.recipe.base
        for key in SHARED_BASE_KEYS:
            mine, theirs = getattr(base, key), getattr(ref, key)
            if key == "dtype":
                mine, theirs = pick_dtype(mine), pick_dtype(theirs)
            if mine != theirs:
                raise LorachatError(_differs(mine, theirs, first), loaded.where("base", key))
        for key in SHARED_TRAINING_KEYS:
            mine, theirs = getattr(loaded.recipe.training, key), getattr(first.recipe.training, key)
            if mine != theirs:
                raise LorachatError(_differs(mine, theirs, first), loaded.where("training", key))
        _check_trainable(loaded)


def _check_trainable(loaded: LoadedRecipe) -> None:
    recipe = loaded.recipe
    if recipe.training.method != "sft":
        raise LorachatError(f"{recipe.training.method} trains on preference pairs, with a reference model; a joint "
                            f"run trains supervised replies (method: sft) only", loaded.where("training", "method"))
    if recipe.lora.variant == "dora":
        raise LorachatError("DoRA's forward is not B(A(x)), which joint training routes per row; train it on its own "
                            "(one recipe per finetune)", loaded.where("lora", "variant"))
    if recipe.lora.modules_to_save:
        raise LorachatError("whole trained modules (modules_to_save) are one copy per adapter that rows cannot share; "
                            "train this recipe on its own", loaded.where("lora", "modules_to_save"))
    if recipe.training.distributed == "fsdp":
        raise LorachatError("a joint run shards the data, not the adapters: use training.distributed: ddp",
                            loaded.where("training", "distributed"))
    if recipe.training.report_to != "none":
        raise LorachatError("a joint run writes train_log.jsonl per adapter but no TensorBoard events; use "
                            "report_to: none, or train this recipe on its own", loaded.where("training", "report_to"))


def check_inputs(inputs: Sequence[Any], prepared: Sequence[Any]) -> None:
    """Refuse, from the resolved inputs and encoded data (still no weights): another base behind the same name,
    template tokens added to the vocabulary, and an eval split that some adapters have and others lack."""
    first = inputs[0]
    for item in inputs:
        loaded = item.loaded
        if (item.base.path.resolve(), item.base.revision) != (first.base.path.resolve(), first.base.revision):
            raise LorachatError(_differs(f"{item.base.model_id} at {item.base.path}",
                                         f"{first.base.model_id} at {first.base.path}", first.loaded),
                                loaded.where("base", "model"))
        if item.added_tokens is not None:
            # Every adapter would resize the one shared embedding and train its own rows of it.
            markers = ", ".join(item.added_tokens.markers)
            raise LorachatError(f"the template adds tokens to the base ({markers}); adapters trained together share "
                                f"one vocabulary: choose a template the base already has, or train this recipe "
                                f"on its own", loaded.where("template", "name"))
    with_eval = [(item, p) for item, p in zip(inputs, prepared) if p.eval]
    if with_eval and len(with_eval) < len(inputs):
        other = with_eval[0][0].loaded
        for item, p in zip(inputs, prepared):
            if not p.eval:
                raise LorachatError(f"no eval rows, while {other.path} has {len(with_eval[0][1].eval)}; give every "
                                    f"recipe an eval split (data.eval) or none", item.loaded.where("data", "eval"))


def _differs(mine: object, theirs: object, first: LoadedRecipe) -> str:
    def show(value: object) -> str:
        return str(value).removeprefix("torch.")

    return (f"{show(mine)} differs from {show(theirs)} in {first.path}: recipes trained together share one loaded "
            f"base and one run")
