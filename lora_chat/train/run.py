"""`lorachat finetune`: recipe -> data -> base + LoRA -> Trainer -> adapter directory.

    lorachat finetune recipes/quickstart.yaml                 # train, write adapters/construction-faq-en
    lorachat finetune recipes/quickstart.yaml --dry-run       # resolve everything, print the plan, write nothing
    lorachat finetune recipes/quickstart.yaml --resume        # continue from the newest complete checkpoint
    lorachat finetune recipes/quickstart.yaml --processes 2   # the same run as 2 DDP processes

`finetune` reads top to bottom: setup (inputs, output folder, data, model, trainer) -> fit -> evaluate -> save.
Settings worth a reason:
  - the base runs in `pick_dtype(base.dtype)` (bf16 on CPUs with native bf16: 2.5x fp32 matmul), while PEFT
    keeps LoRA weights in fp32 (autocast_adapter_dtype) so small updates are not rounded away;
  - loss is summed over trained tokens and divided by the step's trained-token count across micro-batches
    and processes, so gradient accumulation and DDP give the same update as one big batch;
  - the LM head runs only where a target exists (loss.py).
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from .. import adapters
from ..adapters import looks_whole
from ..errors import LorachatError, RunFailed, Where
from . import checkpoints
from .callbacks import (Interrupted, JsonlLog, MeterCallback, ProgressBar, Signals, StepMeter, StopOnSignal,
                        truncate_log)
from .collate import Collator, RowDataset, to_rows

PREFLIGHT_DONE = "LORACHAT_PREFLIGHT_DONE"  # set by the launcher: workers must not re-check or delete
OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "sgd": "sgd", "adafactor": "adafactor"}


@dataclass
class Options:
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    processes: int = 1


@dataclass
class Plan:
    base: str
    dtype: str
    quantization: str
    trainable_params: int
    total_params: int
    train_samples: int
    train_rows: int  # after packing
    tokens: int
    trained_tokens: int
    eval_samples: int
    steps: int
    epochs: float
    effective_batch: int
    processes: int
    output: Path


def finetune(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (), options: Options = Options(),
             console: Console | None = None) -> Plan | Path:
    """Train the recipe's adapter; return its directory (or the plan, with `dry_run`). Raises LorachatError."""
    from . import distributed

    console = console or Console()
    if options.processes > 1 and not distributed.in_worker() and not options.dry_run:
        _preflight_only(recipe_path, overrides, options)
        return distributed.launch(recipe_path, overrides, options)

    # ---- setup: inputs before weights, so bad recipes and data fail in seconds
    from ..encoding import prepare
    from ..inputs import load_inputs

    inputs = load_inputs(recipe_path, overrides, need_weights=not options.dry_run)
    recipe = inputs.loaded.recipe
    target = output_dir(inputs.loaded)
    checkpoint_root = target / checkpoints.CHECKPOINTS
    resume_from = preflight(inputs.loaded, target, options)
    prepared = prepare(inputs.loaded, inputs.data, inputs.template)
    train_rows = to_rows(prepared.train, recipe.training.packing, recipe.data.max_length)
    eval_rows = to_rows(prepared.eval, recipe.training.packing, recipe.data.max_length)
    from transformers import set_seed

    set_seed(recipe.training.seed)  # LoRA's A matrices are drawn from the global RNG: same seed, same init
    model = _build_model(inputs, meta=options.dry_run)
    plan = _plan(inputs, model, prepared, train_rows, target,
                 processes=max(options.processes, int(os.environ.get("WORLD_SIZE", "1"))))
    if options.dry_run:
        print_plan(plan, console)
        return plan

    meter, signals = StepMeter(), Signals()
    trainer = _build_trainer(inputs, model, train_rows, eval_rows, target, meter, signals, console)
    is_main = trainer.is_world_process_zero()
    if is_main:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        checkpoints.sweep(checkpoint_root)
        if resume_from is not None:
            truncate_log(target / "train_log.jsonl", _step_of(resume_from))
        elif (target / "train_log.jsonl").exists():
            (target / "train_log.jsonl").unlink()
        if inputs.base.note:
            console.print(f"[dim]{inputs.base.note}[/]")
    trainer.accelerator.wait_for_everyone()

    # ---- fit
    signals.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        signals.restore()
        for cb in trainer.callback_handler.callbacks:
            if isinstance(cb, ProgressBar):
                cb.close()
    if signals.received is not None:
        newest = checkpoints.newest(checkpoint_root)
        raise Interrupted(f"interrupted at step {trainer.state.global_step}; checkpoint saved to {newest}; "
                          f"continue with --resume", signals.received)

    # ---- evaluate (unless the last step just did)
    metrics: dict[str, Any] = {"train": {
        "loss": _last_logged_loss(target / "train_log.jsonl"), "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4), "tokens": meter.total_tokens,
        "runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
        "samples": len(prepared.train), "rows": len(train_rows)}}
    if eval_rows:
        logged = [h for h in trainer.state.log_history if "eval_loss" in h and h.get("step") == trainer.state.global_step]
        values = logged[-1] if logged else trainer.evaluate()
        metrics["eval"] = {"loss": values["eval_loss"], "perplexity": values["eval_perplexity"],
                           "tokens": values["eval_tokens"], "samples": len(prepared.eval)}

    # ---- save: the adapter is built beside the target and renamed into place
    # Under FSDP each rank holds only a shard of every weight: gathering them is a collective all ranks join,
    # and only rank 0 receives the full tensors.
    state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if is_main:
        _save_adapter(inputs, trainer, target, metrics, state_dict)
        console.print(f"[green]adapter written to {target}[/]")
    trainer.accelerator.wait_for_everyone()
    return target


# ---------------------------------------------------------------- setup helpers

TENSORBOARD = "tensorboard"  # event files, under output.dir


def output_dir(loaded) -> Path:
    recipe = loaded.recipe
    return Path(recipe.output.dir) if recipe.output.dir else Path("adapters") / recipe.name


def preflight(loaded, target: Path, options: Options) -> Path | None:
    """Refuse to clobber an adapter or mix runs; return the checkpoint to resume from. May delete with --overwrite."""
    checkpoint_root = target / checkpoints.CHECKPOINTS
    where = loaded.where("output", "dir")
    if options.resume:
        newest = checkpoints.newest(checkpoint_root)
        if newest is None:
            raise LorachatError(f"--resume: no complete checkpoint under {checkpoint_root}", where)
        return newest
    if os.environ.get(PREFLIGHT_DONE):
        return None
    if looks_whole(target) and not options.overwrite:
        raise LorachatError(f"{target} already holds an adapter; use --overwrite to replace it", where)
    if checkpoints.complete(checkpoint_root) and not options.overwrite:
        raise LorachatError(f"{target} holds checkpoints of an unfinished run; use --resume to continue it "
                            f"or --overwrite to start over", where)
    if options.overwrite and target.exists() and not options.dry_run:
        # Set aside, not deleted: the old adapter stays on disk (as .NAME.previous) until the new one is
        # published, so a run that fails or is killed has not cost the user what they had.
        previous = adapters.previous_of(target)
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(target, previous)
    return None


def _preflight_only(recipe_path, overrides, options: Options) -> None:
    from ..recipe import load_recipe

    loaded = load_recipe(recipe_path, list(overrides))
    preflight(loaded, output_dir(loaded), options)


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _build_model(inputs, meta: bool) -> Any:
    """The base (real weights, or shapes only on the meta device for --dry-run) with LoRA attached."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..models import load_model, pick_dtype

    base_cfg, lora = inputs.loaded.recipe.base, inputs.loaded.recipe.lora
    training = inputs.loaded.recipe.training
    if meta:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(inputs.base.path), trust_remote_code=base_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(base_cfg.dtype),
                                                     trust_remote_code=base_cfg.trust_remote_code)
    else:
        model = load_model(inputs.base, dtype=base_cfg.dtype, quantization=base_cfg.quantization,
                           trust_remote_code=base_cfg.trust_remote_code)
        if base_cfg.quantization != "none":
            from peft import prepare_model_for_kbit_training

            # Casts norms to fp32 and enables input grads so LoRA on frozen quantized layers trains stably.
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=training.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
            for module in model.modules():
                # bitsandbytes repacks 4-bit weights in place for its CPU inference kernel the first time a layer
                # runs in eval mode without grad (our eval passes), which breaks training steps after it.
                if hasattr(module, "support_avx512bf16_for_cpu"):
                    module.support_avx512bf16_for_cpu = False
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
        target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
        use_dora=lora.variant == "dora", use_rslora=lora.variant == "rslora")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module name the model does not have
        raise LorachatError(str(err).splitlines()[0], inputs.loaded.where("lora", "target_modules")) from None


def _steps(recipe, rows: int, processes: int) -> tuple[int, float]:
    """Optimizer steps and epochs, as Trainer counts them (a partial accumulation at epoch end is a step)."""
    t = recipe.training
    batches = math.ceil(rows / (t.batch_size * processes))
    per_epoch = max(math.ceil(batches / t.grad_accum), 1)
    if t.max_steps:
        return t.max_steps, round(t.max_steps / per_epoch, 3)
    return math.ceil(t.epochs * per_epoch), t.epochs


def _plan(inputs, model, prepared, train_rows, target: Path, processes: int) -> Plan:
    recipe = inputs.loaded.recipe
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    steps, epochs = _steps(recipe, len(train_rows), processes)
    stats = prepared.stats["train"]
    return Plan(base=f"{inputs.base.model_id} ({inputs.base.source}, {inputs.base.revision})",
                dtype=str(model.dtype).removeprefix("torch."), quantization=recipe.base.quantization,
                trainable_params=trainable, total_params=total, train_samples=len(prepared.train),
                train_rows=len(train_rows), tokens=stats.tokens, trained_tokens=stats.trained,
                eval_samples=len(prepared.eval), steps=steps, epochs=epochs,
                effective_batch=recipe.training.batch_size * recipe.training.grad_accum * processes,
                processes=processes, output=target)


def print_plan(plan: Plan, console: Console) -> None:
    from rich.table import Table

    table = Table(show_header=False, box=None)
    rows = [("base", plan.base), ("dtype", plan.dtype), ("quantization", plan.quantization),
            ("parameters", f"{plan.trainable_params:,} trainable of {plan.total_params:,} "
                           f"({100 * plan.trainable_params / max(plan.total_params, 1):.2f}%)"),
            ("train", f"{plan.train_samples:,} samples in {plan.train_rows:,} rows, {plan.tokens:,} tokens "
                      f"({plan.trained_tokens:,} trained)"),
            ("eval", f"{plan.eval_samples:,} samples"),
            ("steps", f"{plan.steps:,} ({plan.epochs:g} epochs, {plan.effective_batch} rows per step, "
                      f"{plan.processes} process{'es' if plan.processes > 1 else ''})"),
            ("output", str(plan.output))]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)


def _build_trainer(inputs, model, train_rows, eval_rows, target, meter, signals, console):
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .trainer import LorachatTrainer

    t = inputs.loaded.recipe.training
    report_to = []
    if t.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401 - fail with one line here, not deep in transformers
        except ImportError:
            raise LorachatError("needs the tensorboard package: pip install tensorboard",
                                inputs.loaded.where("training", "report_to")) from None
        # Read by transformers' TensorBoardCallback when the Trainer builds it, i.e. for this run only.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(target / TENSORBOARD)
        report_to = ["tensorboard"]
    fsdp = t.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1
    has_eval = bool(eval_rows)
    args = TrainingArguments(
        # use_cpu is what makes accelerate treat N CPU processes as one DDP job (gloo) instead of N lone runs.
        use_cpu=not torch.cuda.is_available(),
        output_dir=str(target / checkpoints.CHECKPOINTS),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
        num_train_epochs=t.epochs or 1.0, max_steps=t.max_steps or -1,
        lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=OPTIMIZERS[t.optimizer], seed=t.seed, data_seed=t.seed,
        logging_steps=t.log_every, report_to=report_to,
        save_strategy="steps" if t.save_every else "no", save_steps=t.save_every or 500,
        eval_strategy="steps" if (t.eval_every and has_eval) else "no", eval_steps=t.eval_every,
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=False,  # the base already computes in its own dtype; autocast would only add casts
        disable_tqdm=True, remove_unused_columns=False, label_names=["shift_labels"],
        dataloader_num_workers=0, dataloader_pin_memory=False, ddp_find_unused_parameters=False, save_only_model=False,
        # FSDP2 (fully_shard), which runs on CPU with gloo; FSDP1 is deprecated in transformers. Each layer in the
        # model's _no_split_modules becomes its own shard unit.
        fsdp=fsdp, fsdp_config={"version": 2} if fsdp else None)
    attn = getattr(model.config, "_attn_implementation", "") or ""
    collator = Collator(pad_id=inputs.tokenizer.pad_token_id, flatten=attn.startswith("flash"))
    is_main = int(os.environ.get("RANK", "0")) == 0
    trainer = LorachatTrainer(
        model=model, args=args, train_dataset=RowDataset(train_rows),
        eval_dataset=RowDataset(eval_rows) if has_eval else None, data_collator=collator,
        callbacks=[MeterCallback(meter), JsonlLog(meter, target / "train_log.jsonl", t.log_every),
                   *([ProgressBar(meter, console)] if is_main else []), StopOnSignal(signals)],
        meter=meter, checkpoint_root=target / checkpoints.CHECKPOINTS, keep_checkpoints=t.keep_checkpoints)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _last_logged_loss(path: Path) -> float | None:
    import json

    if not path.is_file():
        return None
    losses = [json.loads(line).get("loss") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None


# ---------------------------------------------------------------- save


def _save_adapter(inputs, trainer, target: Path, metrics: dict[str, Any], state_dict: dict | None) -> None:
    import errno

    from ..adapters.domain import write_profile
    from ..models import model_facts

    recipe = inputs.loaded.recipe
    staging = adapters.staging_dir(target)
    try:
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(staging, state_dict=state_dict)
        if (target / TENSORBOARD).is_dir():  # the run's event files belong with the adapter they describe
            shutil.copytree(target / TENSORBOARD, staging / TENSORBOARD)
        # What its users' prompts look like, for routing (runtime.router); the manifest lists it like any file.
        write_profile(staging, inputs.data.train)
        adapters.finish(staging, target, tokenizer=inputs.tokenizer, template_source=inputs.template.source,
                        recipe_yaml=inputs.loaded.to_yaml(), manifest=_manifest(inputs, model_facts(inputs.base)),
                        metrics=metrics, train_log=target / "train_log.jsonl")
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        reason = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise RunFailed(f"cannot write the adapter: {reason}; checkpoints under {target / 'checkpoints'} are kept",
                        Where(target)) from err


def _base_license(path: Path) -> str | None:
    """An adapter is a derivative of its base: reuse the licence from the base's model card, if it has one."""
    import yaml

    card = path / "README.md"
    if not card.is_file():
        return None
    head, sep, rest = card.read_text(encoding="utf-8", errors="replace").partition("\n---")
    if not head.startswith("---") or not sep:
        return None
    try:
        meta = yaml.safe_load(head[3:])
    except yaml.YAMLError:
        return None
    return meta.get("license") if isinstance(meta, dict) else None


def _manifest(inputs, facts: dict[str, Any]) -> dict[str, Any]:
    from datetime import datetime, timezone


    recipe = inputs.loaded.recipe
    sources = []
    for report in inputs.data.sources:
        dataset = report.path.removeprefix("hf:").removeprefix("pkg:").split("/")[0] \
            if report.path.startswith(("hf:", "pkg:")) else Path(report.path).name
        sources.append({"path": report.path, "dataset": dataset, "format": report.format, "rows": report.rows,
                        "sha256": report.sha256, "license": adapters.source_license(report.location)})
    return {
        "format": adapters.FORMAT, "name": recipe.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base": {"model_id": inputs.base.model_id, "revision": inputs.base.revision, "source": inputs.base.source,
                 **facts},
        "inputs": {"data": {"sources": sources}},
        "seed": recipe.training.seed, "domain": recipe.output.domain, "language": recipe.output.language,
        "license": _base_license(inputs.base.path),
        "template": inputs.template.name, "versions": adapters.versions(),
    }
