"""`lorachat finetune`: recipe -> data -> base + LoRA -> TRL's SFTTrainer -> adapter directory.

    lorachat finetune recipes/quickstart.yaml                 # train, write adapters/construction-faq-en
    lorachat finetune recipes/quickstart.yaml --dry-run       # resolve everything, print the plan, write nothing
    lorachat finetune recipes/quickstart.yaml --resume        # continue from the newest complete checkpoint
    lorachat finetune recipes/quickstart.yaml --processes 2   # the same run as 2 DDP processes
    accelerate launch --num_processes 2 -m lora_chat.cli finetune recipes/quickstart.yaml   # or torchrun

`FinetuneRun.run` reads top to bottom: inputs -> preflight -> rows -> model -> trainer -> fit -> evaluate -> save.
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
from ..recipe import LoadedRecipe
from ..templates import tokens
from . import checkpoints, checkpointing, distributed
from .lora_compute import compute_lora_in_base_dtype
from .callbacks import Interrupted, ShowProgress, Signals, StepLog, StepMeter, StopOnSignal, truncate_log
from .collate import Collator, as_dataset, to_rows

OPTIMIZERS = {"adamw": "adamw_torch", "adamw_8bit": "adamw_bnb_8bit", "sgd": "sgd", "adafactor": "adafactor"}
TENSORBOARD = "tensorboard"  # event files, under output.dir


@dataclass
class Options:
    resume: bool = False
    overwrite: bool = False
    dry_run: bool = False
    processes: int = 1
    overrides: tuple[str, ...] = ()  # the --set values, handed on to worker processes with the recipe path


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
    checkpointing: checkpointing.Checkpointing
    output: Path


def finetune(loaded: LoadedRecipe, options: Options = Options(), console: Console | None = None,
             run: type[FinetuneRun] | None = None) -> Plan | Path:
    """Train the recipe's adapter; return its directory (or the plan, with `dry_run`). Raises LorachatError.

    `run` is the run to make (train/preference.py's for `training.method: dpo | orpo`)."""
    console = console or Console()
    if run is None and loaded.recipe.training.method != "sft":
        raise LorachatError("this is a preference run: start it with lora_chat.train.preference.finetune "
                            "(as `lorachat finetune` does)", loaded.where("training", "method"))
    check_optimizer(loaded)
    if options.processes > 1 and not distributed.in_worker() and not options.dry_run:
        # Refuse a clobber here, once, before N processes load the model; rank 0 sets an old adapter aside
        # only once its inputs have loaded, like a single process would.
        preflight(loaded, output_dir(loaded), options, set_aside=False)
        distributed.launch(options.processes, worker_args(loaded, options))
        return output_dir(loaded)
    return (run or FinetuneRun)(loaded, options, console).run()


def worker_args(loaded: LoadedRecipe, options: Options) -> list[str]:
    """`lorachat finetune` arguments that make each worker process run this same run."""
    args = [str(loaded.path)]
    for override in options.overrides:
        args += ["--set", override]
    return args + (["--resume"] if options.resume else []) + (["--overwrite"] if options.overwrite else [])


def check_optimizer(loaded: LoadedRecipe) -> None:
    """Refuse, before any weights load, an optimizer or kernel (liger, flash-attention) this machine cannot run."""
    import torch

    from ..errors import RecipeError
    from ..recipe import cuda_only_problems

    problems = cuda_only_problems(loaded, torch.cuda.is_available())
    if problems:
        raise RecipeError(problems)

    if loaded.recipe.training.optimizer == "adamw_8bit" and not torch.cuda.is_available():
        raise LorachatError("adamw_8bit: bitsandbytes' 8-bit optimizers need a CUDA GPU; on CPU use adamw "
                            "or adafactor (factored second moments: the least optimizer memory)",
                            loaded.where("training", "optimizer"))


class FinetuneRun:
    """One `lorachat finetune` run: what it reads, builds and writes, set up in dependency order."""

    def __init__(self, loaded: LoadedRecipe, options: Options, console: Console):
        self.loaded, self.recipe, self.options, self.console = loaded, loaded.recipe, options, console
        self.target = output_dir(loaded)
        self.checkpoint_root = self.target / checkpoints.CHECKPOINTS
        self.log_path = self.target / "train_log.jsonl"
        self.meter, self.signals = StepMeter(), Signals()
        self.processes = max(options.processes, distributed.world_size())

    def run(self) -> Plan | Path:
        from transformers import set_seed

        from ..encoding import prepare
        from ..inputs import load_inputs

        # ---- setup: inputs before weights, so bad recipes and data fail in seconds; preflight after them,
        # so a typo in the data does not set aside the adapter --overwrite would replace
        self.inputs = load_inputs(self.loaded, need_weights=not self.options.dry_run)
        cleaned = self.inputs.data.hygiene.summary()  # what data.dedup / language_filter / pii took out or masked
        if cleaned and distributed.rank() == 0:
            self.console.print(cleaned)
        self.resume_from = preflight(self.loaded, self.target, self.options)
        self.prepared = prepare(self.loaded, self.inputs.data, self.inputs.template)
        packing, max_length = self.recipe.training.packing, self.recipe.data.max_length
        self.train_rows = to_rows(self.prepared.train, packing, max_length)
        self.eval_rows = to_rows(self.prepared.eval, packing, max_length)
        from ..models import pick_dtype

        self.checkpointing = checkpointing.decide(self.loaded, self.prepared.stats["train"], self.inputs.base,
                                                  pick_dtype(self.recipe.base.dtype))
        set_seed(self.recipe.training.seed)  # LoRA's A matrices are drawn from the global RNG: same seed, same init
        self.model = self.make_model()
        plan = self.plan()
        if self.options.dry_run:
            print_plan(plan, self.console)
            return plan
        self.trainer = self.build_trainer()
        self.is_main = self.trainer.is_world_process_zero()
        self.prepare_output()

        # ---- fit, evaluate (unless the last step just did), save
        result = self.fit()
        metrics = self.evaluate(result)
        self.save(metrics)
        return self.target

    def plan(self) -> Plan:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        steps, epochs = _steps(self.recipe, len(self.train_rows), self.processes)
        stats, t, base = self.prepared.stats["train"], self.recipe.training, self.inputs.base
        return Plan(base=f"{base.model_id} ({base.source}, {base.revision})",
                    dtype=str(self.model.dtype).removeprefix("torch."), quantization=self.recipe.base.quantization,
                    trainable_params=trainable, total_params=total, train_samples=len(self.prepared.train),
                    train_rows=len(self.train_rows), tokens=stats.tokens, trained_tokens=stats.trained,
                    eval_samples=len(self.prepared.eval), steps=steps, epochs=epochs,
                    effective_batch=t.batch_size * t.grad_accum * self.processes, processes=self.processes,
                    checkpointing=self.checkpointing, output=self.target)

    def make_model(self):
        return build_model(self.inputs, meta=self.options.dry_run)

    def build_trainer(self):
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        from .trainer import LorachatTrainer, sft_config

        t = self.recipe.training
        has_eval = bool(self.eval_rows)
        args = sft_config(**self.training_args(has_eval))
        attn = getattr(self.model.config, "_attn_implementation", "") or ""
        collator = Collator(pad_id=self.inputs.tokenizer.pad_token_id, flatten=attn.startswith("flash"))
        trainer = LorachatTrainer(
            model=self.model, args=args, train_dataset=as_dataset(self.train_rows),
            eval_dataset=as_dataset(self.eval_rows) if has_eval else None, data_collator=collator,
            processing_class=self.inputs.tokenizer, callbacks=self.callbacks(), meter=self.meter,
            checkpoint_root=self.checkpoint_root, keep_checkpoints=t.keep_checkpoints)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer

    def training_args(self, has_eval: bool) -> dict[str, Any]:
        """The recipe's `training:` section as TrainingArguments fields, for any of lorachat's TRL trainers."""
        import torch

        t = self.recipe.training
        fsdp = t.distributed == "fsdp" and distributed.world_size() > 1
        return dict(
            # use_cpu is what makes accelerate treat N CPU processes as one DDP job (gloo) instead of N lone runs.
            use_cpu=not torch.cuda.is_available(),
            output_dir=str(self.checkpoint_root),
            per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
            gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr,
            num_train_epochs=t.epochs or 1.0, max_steps=t.max_steps or -1,
            lr_scheduler_type=t.scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm, optim=OPTIMIZERS[t.optimizer], seed=t.seed, data_seed=t.seed,
            logging_steps=t.log_every, report_to=self.report_to(),
            # Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) patched in by the Trainer; CUDA only (check_optimizer).
            # lorachat passes no labels, so its own trained-positions loss stays in charge of the head.
            use_liger_kernel=t.kernels == "liger",
            save_strategy="steps" if t.save_every else "no", save_steps=t.save_every or 500,
            eval_strategy="steps" if (t.eval_every and has_eval) else "no", eval_steps=t.eval_every,
            activation_checkpointing=self.checkpointing.on,
            activation_checkpointing_kwargs={"use_reentrant": False},
            # TRL's offloading: saved tensors (with checkpointing, each layer's input) to pinned host memory.
            activation_offloading=self.checkpointing.offload,
            disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
            ddp_find_unused_parameters=False, save_only_model=False,
            # FSDP2 (fully_shard), which runs on CPU with gloo; FSDP1 is deprecated in transformers. Each layer in
            # the model's _no_split_modules becomes its own shard unit.
            fsdp=fsdp, fsdp_config={"version": 2} if fsdp else None)

    def callbacks(self) -> list:
        """The step log, the signal stop and (on rank 0) the progress display."""
        log_every = self.recipe.training.log_every
        callbacks = [StepLog(self.meter, self.log_path, log_every), StopOnSignal(self.signals)]
        if distributed.rank() == 0:
            callbacks.append(ShowProgress(self.meter, self.console, log_every))
        return callbacks

    def report_to(self) -> list[str]:
        if self.recipe.training.report_to != "tensorboard":
            return []
        try:
            import tensorboard  # noqa: F401 - fail with one line here, not deep in transformers
        except ImportError:
            raise LorachatError("needs the tensorboard package: pip install tensorboard",
                                self.loaded.where("training", "report_to")) from None
        # Read by transformers' TensorBoardCallback when the Trainer builds it, i.e. for this run only.
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.target / TENSORBOARD)
        return ["tensorboard"]

    def prepare_output(self) -> None:
        """The checkpoint folder without a killed run's leftovers, and a log that starts where training does."""
        if self.is_main:
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            checkpoints.sweep(self.checkpoint_root)
            if self.resume_from is not None:
                truncate_log(self.log_path, _step_of(self.resume_from))
            elif self.log_path.exists():
                self.log_path.unlink()
            if self.inputs.base.note:
                self.console.print(f"[dim]{self.inputs.base.note}[/]")
            self.console.print(f"[dim]gradient checkpointing {self.checkpointing}[/]")
        self.trainer.accelerator.wait_for_everyone()

    def fit(self):
        self.signals.install()
        try:
            result = self.trainer.train(resume_from_checkpoint=str(self.resume_from) if self.resume_from else None)
        finally:
            self.signals.restore()
            for cb in self.trainer.callback_handler.callbacks:
                if isinstance(cb, ShowProgress):
                    cb.close()
        if self.signals.received is not None:
            newest = checkpoints.newest(self.checkpoint_root)
            raise Interrupted(f"interrupted at step {self.trainer.state.global_step}; checkpoint saved to {newest}; "
                              f"continue with --resume", self.signals.received)
        return result

    def evaluate(self, result) -> dict[str, Any]:
        state = self.trainer.state
        metrics: dict[str, Any] = {"train": {
            "loss": _last_logged_loss(self.log_path), "steps": state.global_step,
            "epochs": round(state.epoch or 0.0, 4), "tokens": self.meter.total_tokens,
            "gradient_checkpointing": self.checkpointing.on,
            "runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
            "samples": len(self.prepared.train), "rows": len(self.train_rows),
            "peak_memory": checkpointing.peak_memory()}}
        if self.eval_rows:
            logged = [h for h in state.log_history if "eval_loss" in h and h.get("step") == state.global_step]
            values = logged[-1] if logged else self.trainer.evaluate()
            metrics["eval"] = {"loss": values["eval_loss"], "perplexity": values["eval_perplexity"],
                               "tokens": values["eval_tokens"], "samples": len(self.prepared.eval)}
        return metrics

    def save(self, metrics: dict[str, Any]) -> None:
        """The adapter is built beside the target and renamed into place."""
        trainer = self.trainer
        # Under FSDP each rank holds only a shard of every weight: gathering them is a collective all ranks join,
        # and only rank 0 receives the full tensors.
        state_dict = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
        if self.is_main:
            _save_adapter(self.inputs, trainer.accelerator.unwrap_model(trainer.model), self.target, metrics,
                          state_dict)
            self.console.print(f"[green]adapter written to {self.target}[/]")
        trainer.accelerator.wait_for_everyone()


# ---------------------------------------------------------------- setup helpers


def output_dir(loaded: LoadedRecipe) -> Path:
    recipe = loaded.recipe
    return Path(recipe.output.dir) if recipe.output.dir else Path("adapters") / recipe.name


def preflight(loaded: LoadedRecipe, target: Path, options: Options, set_aside: bool = True) -> Path | None:
    """Refuse to clobber an adapter or mix runs; return the checkpoint to resume from.

    With --overwrite (and `set_aside`) the old adapter is set aside, by the main process only. Every worker runs
    it (a worker started by torchrun has no launcher); the `--processes N` launcher runs it first to refuse early.
    """
    checkpoint_root = target / checkpoints.CHECKPOINTS
    where = loaded.where("output", "dir")
    if options.resume:
        newest = checkpoints.newest(checkpoint_root)
        if newest is None:
            raise LorachatError(f"--resume: no complete checkpoint under {checkpoint_root}", where)
        return newest
    if looks_whole(target) and not options.overwrite:
        raise LorachatError(f"{target} already holds an adapter; use --overwrite to replace it", where)
    if checkpoints.complete(checkpoint_root) and not options.overwrite:
        raise LorachatError(f"{target} holds checkpoints of an unfinished run; use --resume to continue it "
                            f"or --overwrite to start over", where)
    if options.overwrite and set_aside and target.exists() and not options.dry_run and distributed.rank() == 0:
        # Set aside, not deleted: the old adapter stays on disk (as .NAME.previous) until the new one is
        # published, so a run that fails or is killed has not cost the user what they had.
        previous = adapters.previous_of(target)
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(target, previous)
    return None


def _step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def build_model(inputs, meta: bool) -> Any:
    """The base (real weights, or shapes only on the meta device for --dry-run) with LoRA attached, its matmuls in
    the base's compute dtype (train/lora_compute.py)."""
    import torch
    from peft import get_peft_model

    from ..models import load_model, pick_dtype

    base_cfg, lora = inputs.loaded.recipe.base, inputs.loaded.recipe.lora
    if meta:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(inputs.base.path), trust_remote_code=base_cfg.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(base_cfg.dtype),
                                                     trust_remote_code=base_cfg.trust_remote_code)
    else:
        model = load_model(inputs.base, dtype=base_cfg.dtype, quantization=base_cfg.quantization,
                           trust_remote_code=base_cfg.trust_remote_code, attn_implementation=base_cfg.attn_implementation)
        # A quantized base does not go through peft's prepare_model_for_kbit_training: it casts every unquantized
        # weight to fp32 (an 8B Llama's embeddings and LM head: 1B weights, 2 GiB more than bf16). That upcast is from
        # fp16 QLoRA, where fp16 norms and logits overflow; here RMSNorm computes in fp32 internally (transformers),
        # the loss takes its softmax in fp32 (train/loss.py), and frozen weights get no updates to round away.
        # get_peft_model freezes the base; the Trainer turns checkpointing on (and with it the input-grad hook).
    # Template markers the base lacked (templates/tokens.py): resize, and train only their embedding rows.
    token_rows = tokens.prepare_model(model, inputs.added_tokens)
    try:
        model = get_peft_model(model, lora_config(lora, token_rows))
    except ValueError as err:  # e.g. a target module name the model does not have
        raise LorachatError(str(err).splitlines()[0], inputs.loaded.where("lora", "target_modules")) from None
    compute_lora_in_base_dtype(model, pick_dtype(base_cfg.dtype))
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):  # SFTTrainer refuses it, deep in its __init__
        raise LorachatError("LoRA on the LM head is not supported by TRL's SFTTrainer; train it whole with "
                            "lora.modules_to_save: [lm_head] instead", inputs.loaded.where("lora", "target_modules"))
    return model


def lora_config(lora, token_rows=None):
    """PEFT's LoraConfig for a recipe's `lora:` section (joint runs add one per adapter to the same base)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
        target_modules=lora.target_modules, modules_to_save=lora.modules_to_save or None,
        use_dora=lora.variant == "dora", use_rslora=lora.variant == "rslora", trainable_token_indices=token_rows)


def _steps(recipe, rows: int, processes: int) -> tuple[int, float]:
    """Optimizer steps and epochs, as Trainer counts them (a partial accumulation at epoch end is a step)."""
    t = recipe.training
    batches = math.ceil(rows / (t.batch_size * processes))
    per_epoch = max(math.ceil(batches / t.grad_accum), 1)
    if t.max_steps:
        return t.max_steps, round(t.max_steps / per_epoch, 3)
    return math.ceil(t.epochs * per_epoch), t.epochs


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
            ("checkpointing", str(plan.checkpointing)),
            ("output", str(plan.output))]
    for key, value in rows:
        table.add_row(f"[bold]{key}[/]", value)
    console.print(table)


def _last_logged_loss(path: Path) -> float | None:
    import json

    if not path.is_file():
        return None
    losses = [json.loads(line).get("loss") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    losses = [x for x in losses if x is not None]
    return losses[-1] if losses else None


# ---------------------------------------------------------------- save


def save_weights(model, directory: Path, adapter_name: str = "default", **kwargs: Any) -> None:
    """PEFT's adapter files for `adapter_name` directly in `directory` (PEFT puts any adapter but "default" one
    folder down, under its name; a joint run's adapters must look like one trained alone)."""
    model.save_pretrained(directory, selected_adapters=[adapter_name], **kwargs)
    if adapter_name != "default":
        nested = directory / adapter_name
        for item in nested.iterdir():
            os.replace(item, directory / item.name)
        nested.rmdir()


def _save_adapter(inputs, model, target: Path, metrics: dict[str, Any], state_dict: dict | None,
                  adapter_name: str = "default") -> None:
    import errno

    from ..adapters.domain import write_profile
    from ..models import model_facts

    staging = adapters.staging_dir(target)
    try:
        # With added tokens the vocabulary differs from the base's, and PEFT's "auto" would then save the whole
        # embedding matrices: the trained rows are already in the adapter (trainable_token_indices).
        save_weights(model, staging, adapter_name, state_dict=state_dict,
                     save_embedding_layers="auto" if inputs.added_tokens is None else False)
        tokens.save_generation_config(staging, model, inputs.added_tokens)
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
        tokens.MANIFEST_KEY: inputs.added_tokens.to_manifest() if inputs.added_tokens else None,
    }
