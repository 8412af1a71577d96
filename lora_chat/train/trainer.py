"""TRL's `SFTTrainer` with lorachat's rows, loss, token-weighted eval, NaN stop and atomic checkpoints.

SFTTrainer is fed rows lorachat already encoded, masked and packed, with lorachat's collator, so what its defaults
would spend time on is off:
  - its dataset preparation (tokenising, truncating, packing: done already), by `sft_config`'s
    `skip_prepare_dataset`; it bought a one-call pipeline from raw text to tokens;
  - its loss, a fused LM head that also computes per-token entropy and top-1 accuracy and gathers both across
    processes at every micro-batch for the `entropy`/`mean_token_accuracy` metrics. TRL 1.16 has no switch for
    those metrics (SFTTrainer.compute_loss always computes them), so `compute_loss` is lorachat's own: the LM
    head at trained positions only (loss.py). They bought a view of the model's confidence while training;
    eval loss and `lorachat eval` give that at far lower cost;
  - bf16 autocast (SFTConfig's default), which bought mixed precision over fp32 weights; the base already runs
    in its own dtype.
Its random sampler gives way to sampler.py's: the same rows in each optimizer step, sorted by length.
"""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path
from typing import Any

import pyarrow.compute
import torch
from trl import SFTConfig, SFTTrainer

from ..errors import LorachatError, RunFailed
from . import checkpoints
from .callbacks import StepMeter, _all_sum
from ..templates import IGNORE
from .loss import TrainedPositions, token_loss_sum
from .sampler import StepSortedSampler


class NonFiniteLoss(RunFailed):
    """The loss became NaN or inf: the run stops, the last good checkpoint stays."""


def sft_config(**training_args: Any) -> SFTConfig:
    """TRL's config for rows lorachat prepared itself; `training_args` are plain TrainingArguments fields."""
    return SFTConfig(
        **training_args,
        # SFTTrainer would tokenise, truncate and pack the dataset again: it arrives encoded, masked and packed.
        dataset_kwargs={"skip_prepare_dataset": True},
        packing=False, padding_free=False,  # packing and padding-free rows are lorachat's collator's job
        # SFTConfig turns bf16 autocast on by default; the base already computes in its own dtype
        # (models.pick_dtype), so autocast would only add casts.
        bf16=False,
        # SFTConfig's max_length truncates in dataset preparation, which is off; data.max_length already applied.
        max_length=None,
        remove_unused_columns=False, label_names=["shift_labels"])


class RunHooks:
    """What every lorachat trainer (SFT here, preference in preference.py) adds to its TRL parent: fp32 adapter
    weights, the step-sorted sampler, a NaN stop on every rank, atomic checkpoints, no TRL model card.

    Mixed in before the TRL trainer (`class X(RunHooks, SFTTrainer)`), so its `super()` calls reach TRL's Trainer.
    """

    def _init_hooks(self, meter: StepMeter, checkpoint_root: Path, keep_checkpoints: int) -> None:
        self.meter = meter
        self.checkpoint_root = checkpoint_root
        self.keep_checkpoints = keep_checkpoints
        self._staging: Path | None = None
        self._sampler: StepSortedSampler | None = None  # set when the train dataloader is built

    def _keep_adapter_dtypes(self, init, *args, **kwargs) -> None:
        """Run the TRL trainer's `init`, then undo its cast of a quantized model's LoRA weights to bf16 (the QLoRA
        paper's choice): lorachat keeps them in fp32 as PEFT made them, so small updates are not rounded away."""
        adapter_dtypes = {name: p.dtype for name, p in kwargs["model"].named_parameters() if p.requires_grad}
        init(*args, **kwargs)
        for name, p in self.model.named_parameters():
            if name in adapter_dtypes and p.dtype != adapter_dtypes[name]:
                p.data = p.data.to(adapter_dtypes[name])

    def _row_lengths(self, dataset) -> list[int]:
        # Row lengths from the Arrow column itself: `dataset["input_ids"]` would turn every token id into a
        # Python int first (seconds and gigabytes on a large dataset) only to take lengths.
        return pyarrow.compute.list_value_length(dataset.data.column("input_ids")).to_pylist()

    def _get_train_sampler(self, train_dataset=None) -> StepSortedSampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        args = self.args
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
        seed = args.data_seed if args.data_seed is not None else args.seed
        self._sampler = StepSortedSampler(self._row_lengths(dataset), rows_per_step, seed)
        return self._sampler

    def _run_epoch(self, *args, **kwargs):
        # The Trainer's own set_epoch reaches a sampler at most two wrappers deep. A resumed run's
        # skip_first_batches puts ours three deep (SkipBatchSampler > BatchSamplerShard > BatchSampler) when
        # there are several processes, and the resumed epoch would replay epoch 0's order.
        if self._sampler is not None:
            self._sampler.set_epoch(kwargs["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def create_model_card(self, *args, **kwargs) -> None:
        """SFTTrainer writes a README.md into the checkpoint folder at every save; the adapter gets lorachat's own
        card (adapters.render_card) when it is published."""

    def _stop_if_not_finite(self, loss_sum: torch.Tensor) -> None:
        """Raise NonFiniteLoss on every process when any process's loss is NaN or inf.

        A rank that raised alone would leave the others waiting in the gradient all-reduce until the process
        group's timeout; so every rank shares its verdict (one scalar all-reduce per micro-batch) and all stop.
        """
        world = self.accelerator.num_processes
        verdict = [0.0] * world  # per rank: 0 finite, 1 nan, 2 inf
        if not torch.isfinite(loss_sum):
            verdict[self.accelerator.process_index] = 1.0 if torch.isnan(loss_sum) else 2.0
        verdict = _all_sum(verdict)
        bad = [rank for rank, v in enumerate(verdict) if v]
        if not bad:
            return
        value = "nan" if verdict[bad[0]] == 1.0 else "inf"
        on = f" on process {bad[0]} of {world}" if world > 1 else ""
        where = self.checkpoint_root / (checkpoints.newest(self.checkpoint_root) or Path("(none yet)")).name
        raise NonFiniteLoss(f"loss became {value} at step {self.state.global_step + 1}{on}; "
                            f"stopped, last good checkpoint: {where} (try a lower training.lr)")

    # ------------------------------------------------------------ atomic checkpoints

    def _get_output_dir(self, trial) -> str:
        # The parent writes `<output_dir>/checkpoint-N`; point it at a staging folder instead.
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        root = self.checkpoint_root
        self._staging = checkpoints.staging_dir(root, step)
        written = self._staging / f"checkpoint-{step}"
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # every rank's RNG state is in before we publish
            if self.is_world_process_zero():
                checkpoints.publish(written, root / f"checkpoint-{step}")
                shutil.rmtree(self._staging, ignore_errors=True)
                checkpoints.rotate(root, self.keep_checkpoints)
        except OSError as err:
            shutil.rmtree(self._staging, ignore_errors=True)
            reason = "disk full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
            previous = checkpoints.newest(root)
            kept = f"; {previous.name} is intact" if previous else ""
            raise RunFailed(f"{root}: cannot save checkpoint-{step}: {reason}{kept}") from err
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()


class LorachatTrainer(RunHooks, SFTTrainer):
    # compute_loss divides by the step's trained-token count itself (num_items_in_batch), so the Trainer must not
    # divide again by gradient_accumulation_steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, meter: StepMeter, checkpoint_root: Path, keep_checkpoints: int, **kwargs):
        self._init_hooks(meter, checkpoint_root, keep_checkpoints)
        self._keep_adapter_dtypes(super().__init__, *args, **kwargs)
        self.selector = TrainedPositions(self.model.get_output_embeddings())

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # Guarded by the behaviour rather than a version range: no upstream issue tracks it (searched
        # huggingface/accelerate, Nov 2026), so no release is known to fix it, and a version bound that passed the
        # fix would silently turn `training.distributed: fsdp` on CPU back into DDP.
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            self._enable_fsdp_on_cpu()

    def _enable_fsdp_on_cpu(self) -> None:
        """accelerate (checked up to 1.15) turns FSDP on only for GPU-like backends: `AcceleratorState.__init__`
        sets `DistributedType.FSDP` for MULTI_GPU/NPU/XPU/... only, so on CPU (MULTI_CPU, gloo) it drops the plugin
        and quietly runs DDP. FSDP2's fully_shard itself works on CPU with gloo, so finish the switch as
        AcceleratorState does on GPUs: both state singletons hold distributed_type, the accelerator the plugin."""
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        PartialState().distributed_type = self.accelerator.state.distributed_type = DistributedType.FSDP
        self.accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.is_fsdp_enabled = True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # accelerate's FSDP saver writes the weights and the optimizer state in its own files, which neither the
        # DDP/single-process loader nor the FSDP loader reads from the other's checkpoints.
        sharded = (Path(resume_from_checkpoint) / "pytorch_model_fsdp.bin").is_file()
        if sharded != self.is_fsdp_enabled:
            how = ("an fsdp run; resume it with training.distributed: fsdp and --processes 2 or more" if sharded
                   else "a ddp or single-process run; resume it with training.distributed: ddp")
            raise LorachatError(f"{resume_from_checkpoint} was written by {how}")
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The step's trained-token count, all processes: what compute_loss divides by.

        transformers counts it only for batches with a "labels" key, and lorachat's carry "shift_labels": so every
        micro-batch used to be divided by its own count and the step's gradient was the sum of grad_accum means
        (grad_accum times one big batch's, clipped harder) instead of the mean over the step's tokens."""
        if not batch_samples:
            return None
        count = sum((batch["shift_labels"] != IGNORE).sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_sum, trained = token_loss_sum(model, self.selector, inputs)
        self._stop_if_not_finite(loss_sum)
        self.meter.add(loss_sum.item(), trained, int(inputs["real_tokens"]))
        denominator = num_items_in_batch if num_items_in_batch is not None else max(trained, 1)
        loss = loss_sum / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens, while DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training:
            # TRL's own token counter gathers across processes at every micro-batch; the meter already has it.
            self._metrics["train"]["num_tokens"] = [self.meter.total_tokens]
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted eval loss (Trainer's own averages per-batch means)."""
        loader = self.get_eval_dataloader(eval_dataset)
        model = self.model_wrapped if self.model_wrapped is not None else self.model
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                batch = self._prepare_inputs(batch)
                loss_sum, trained = token_loss_sum(model, self.selector, batch)
                total, count = total + loss_sum.item(), count + trained
        model.train(was_training)
        total, count = _all_sum([total, float(count)])
        loss = total / max(count, 1)
        metrics = {f"{metric_key_prefix}_loss": loss,
                   f"{metric_key_prefix}_perplexity": math.exp(min(loss, 50.0)),
                   f"{metric_key_prefix}_tokens": int(count)}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
