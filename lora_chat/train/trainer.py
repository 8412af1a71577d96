"""`transformers.Trainer` with lorachat's loss, token-weighted eval and atomic checkpoints."""

from __future__ import annotations

import errno
import math
import shutil
from pathlib import Path

import torch
from transformers import Trainer

from ..errors import LorachatError, RunFailed
from . import checkpoints
from .callbacks import StepMeter, _all_sum
from .loss import TrainedPositions, token_loss_sum


class NonFiniteLoss(RunFailed):
    """The loss became NaN or inf: the run stops, the last good checkpoint stays."""


class LorachatTrainer(Trainer):
    def __init__(self, *args, meter: StepMeter, checkpoint_root: Path, keep_checkpoints: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.meter = meter
        self.checkpoint_root = checkpoint_root
        self.keep_checkpoints = keep_checkpoints
        self._staging: Path | None = None
        self.selector = TrainedPositions(self.model.get_output_embeddings())
        # compute_loss divides by the batch's trained-token count itself (num_items_in_batch), so the
        # Trainer must not divide again by gradient_accumulation_steps.
        self.loss_is_scaled_for_ga = True

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        # accelerate turns on FSDP only for GPU-like backends: on CPU (MULTI_CPU, gloo) it drops the plugin and
        # quietly runs DDP. FSDP2's fully_shard itself works on CPU with gloo, so finish the switch as
        # AcceleratorState does on GPUs: both state singletons hold distributed_type, the accelerator the plugin.
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss_sum, trained = token_loss_sum(model, self.selector, inputs)
        if not torch.isfinite(loss_sum):
            where = self.checkpoint_root / (checkpoints.newest(self.checkpoint_root) or Path("(none yet)")).name
            raise NonFiniteLoss(f"loss became {loss_sum.item()} at step {self.state.global_step + 1}; "
                                f"stopped, last good checkpoint: {where} (try a lower training.lr)")
        self.meter.add(loss_sum.item(), trained, int(inputs["real_tokens"]))
        denominator = num_items_in_batch if num_items_in_batch is not None else max(trained, 1)
        loss = loss_sum / denominator
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens, while DDP averages the gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, None) if return_outputs else loss

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
