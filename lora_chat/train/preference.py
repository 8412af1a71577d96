"""`training.method: dpo | orpo`: preference tuning on chosen vs rejected replies with lorachat's templates and masks.

    lorachat finetune recipes/faq-dpo.yaml        # DPO from the SFT adapter named in base.adapter

A preference row (data/formats.py) is a prompt, the chosen reply and the rejected one. Both sides are rendered by
the same chat template and masked as SFT masks a last reply (templates/masks.py): the log-probability of a side is
summed over its reply tokens (and the end-of-turn marker) only, never over the prompt.

The trainer is TRL's `DPOTrainer`, subclassed where TRL 1.16 has no switch:
  - `_prepare_dataset` is the identity: the rows arrive tokenized and masked by lorachat (TRL would re-render them
    with `apply_chat_template` and take everything after the prompt's tokens as the completion, trailing layout
    whitespace included; DPOConfig has no `skip_prepare_dataset` as SFTConfig has);
  - the loss is lorachat's: the LM head applied at reply positions only, a chunk of rows at a time (loss.py), and
    the per-side sums fed to DPO's sigmoid loss or ORPO's odds-ratio loss; in training the two sides run in two
    backward passes (pair_passes.py), so a step holds one side's activations, not both. TRL's own fused head
    also computes per-token entropy, mean logits and top-1 hits for its metrics at every step.
The reference is never a second model: with `precompute_ref_log_probs` TRL scores every pair once with the
reference before the first step, and the reference is the policy's starting point: the base with the adapter
disabled for a fresh adapter (B = 0), or, with `base.adapter`, that adapter's weights (TRL's convention for a PEFT
model with a pretrained adapter: a frozen "ref" copy of the LoRA weights, dropped here as soon as the reference
log-probs are in, so only one adapter stays in memory while training). Precomputing also removes one of the
three passes of every step. ORPO needs no reference at all.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import DataError, LorachatError, Where
from ..recipe import LoadedRecipe
from ..templates import ChatTemplate, Encoded
from . import checkpointing, distributed
from .collate import Collator, to_rows
from .run import FinetuneRun, Options, Plan, _last_logged_loss, build_model, finetune as run_finetune

METHODS = ("dpo", "orpo")
# What the card and metrics.json say the reference was.
REFERENCE_BASE = "the base with the adapter disabled"
REFERENCE_START = "the starting adapter (base.adapter), frozen"


def finetune(loaded: LoadedRecipe, options: Options = Options(), console: Console | None = None) -> Plan | Path:
    """`lorachat finetune` for `training.method: dpo | orpo`; refuses what preference tuning cannot do first."""
    check(loaded)
    return run_finetune(loaded, options, console, run=PreferenceRun)


def check(loaded: LoadedRecipe) -> None:
    """Refuse, before any data or weights load, settings a preference run does not support."""
    t = loaded.recipe.training
    if t.method not in METHODS:
        raise LorachatError(f"not a preference method: {t.method}", loaded.where("training", "method"))
    if t.packing:
        # Each pair's two sides must stay two rows scored apart; TRL's DPOTrainer has no packing either.
        raise LorachatError(f"packing: true is not supported with method {t.method} (each pair is two rows "
                            f"scored apart); set training.packing: false", loaded.where("training", "packing"))
    adapter = loaded.recipe.base.adapter
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        raise LorachatError(f"{adapter}: no adapter there (no adapter_config.json)", loaded.where("base", "adapter"))


# ---------------------------------------------------------------- pairs


@dataclass
class Pairs:
    chosen: list[Encoded]
    rejected: list[Encoded]
    dropped: Counter  # reason -> pairs

    def rows(self) -> list[dict[str, list[int]]]:
        """One dataset row per pair: each side's ids and per-sample shifted targets (collate.py)."""
        out = []
        for c, r in zip(to_rows(self.chosen, False, 0), to_rows(self.rejected, False, 0)):
            out.append({"chosen_ids": c["input_ids"], "chosen_targets": c["targets"],
                        "rejected_ids": r["input_ids"], "rejected_targets": r["targets"]})
        return out


def rejected_of(conversation) -> Any:
    """The conversation with its last reply replaced by the rejected one."""
    return replace(conversation, messages=conversation.messages[:-1] + (conversation.meta["rejected"],))


def encode_pairs(conversations: list, template: ChatTemplate, max_length: int, too_long: str,
                 where: Where | None = None) -> Pairs:
    """Both sides of every preference conversation, masked to the last reply; `too_long` as for SFT, applied to
    the pair (one side over `max_length` drops or truncates the pair, or is an error)."""
    missing = next((c for c in conversations if "rejected" not in c.meta), None)
    if missing is not None:
        raise DataError("preference tuning needs preference rows (prompt, chosen, rejected); this row has no "
                        "rejected reply", missing.origin)
    chosen = template.encode_batch(conversations, "last_assistant")
    rejected = template.encode_batch([rejected_of(c) for c in conversations], "last_assistant")
    pairs = Pairs([], [], Counter())
    for c, r in zip(chosen, rejected):
        for side in (c, r):
            if isinstance(side, DataError):
                raise side
        longest = max(len(c.input_ids), len(r.input_ids))
        if longest > max_length:
            if too_long == "error":
                raise DataError(f"pair has {longest} tokens on one side, over data.max_length={max_length} "
                                f"(too_long: error)", c.origin)
            if too_long == "drop":
                pairs.dropped[f"over max_length={max_length}"] += 1
                continue
            c, r = c.truncated(max_length), r.truncated(max_length)
        if not c.trained or not r.trained:
            pairs.dropped["no trained tokens on a side"] += 1
            continue
        pairs.chosen.append(c)
        pairs.rejected.append(r)
    return pairs


@dataclass
class PairCollator:
    """Pairs -> one batch of 2B rows, chosen first (TRL's layout), padded by lorachat's collator."""

    pad_id: int

    def __call__(self, pairs: list[dict]) -> dict:
        import torch

        rows = [{"input_ids": p[f"{side}_ids"], "targets": p[f"{side}_targets"],
                 "position_ids": list(range(len(p[f"{side}_ids"])))} for side in ("chosen", "rejected") for p in pairs]
        batch = Collator(pad_id=self.pad_id)(rows)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in pairs[0]:
                batch[key] = torch.tensor([p[key] for p in pairs])
        return batch


# ---------------------------------------------------------------- the trainer


def sequence_logps(model, selector, batch: dict) -> Any:
    """(2B,) summed log-probability of each row's trained tokens; the head runs at those positions only."""
    import torch
    import torch.nn.functional as F

    from ..templates import IGNORE
    from .loss import chunked_cross_entropy

    targets = batch["shift_labels"]  # (2B, T)
    mask = targets != IGNORE  # (2B, T)
    with selector.only(mask):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    counts = mask.sum(dim=1).tolist()  # trained positions per row, in the row-major order mask selects them
    wanted = targets[mask]  # (K,)
    if selector.fused:
        hidden, selector.hidden = selector.hidden, None  # (K, H)
        nll = [chunked_cross_entropy(h, selector.head.weight, t)
               for h, t in zip(hidden.split(counts), wanted.split(counts))]
        return -torch.stack(nll)
    per_token = F.cross_entropy(logits.float(), wanted, reduction="none")  # logits: (K, V)
    return -torch.stack([x.sum() for x in per_token.split(counts)])


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable near 0 (Maechler 2012)."""
    import torch

    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _trainer_class():
    """Built on first use: importing TRL's DPOTrainer costs a second, which `validate` and `--dry-run` need not."""
    import torch
    import torch.nn.functional as F
    import pyarrow.compute
    from trl import DPOTrainer
    from trl.trainer.utils import use_adapter

    from .lora_compute import compute_lora_in_base_dtype
    from .loss import TrainedPositions
    from .host_memory import release_freed
    from .pair_passes import two_passes
    from .trainer import RunHooks

    class PreferenceTrainer(RunHooks, DPOTrainer):
        def __init__(self, *args, method: str, sft_weight: float, meter, checkpoint_root: Path,
                     keep_checkpoints: int, **kwargs):
            self._init_hooks(meter, checkpoint_root, keep_checkpoints)
            self.method, self.sft_weight = method, sft_weight
            # Before TRL's __init__: it scores the reference log-probs (compute_ref_log_probs) inside it.
            self.selector = TrainedPositions(kwargs["model"].get_output_embeddings())
            self._keep_adapter_dtypes(super().__init__, *args, **kwargs)
            peft_model = self.accelerator.unwrap_model(self.model)
            if "ref" in peft_model.peft_config:
                # TRL's frozen copy of the starting adapter has done its work once the reference log-probs are in.
                peft_model.delete_adapter("ref")
                peft_model.set_adapter("default")

        def _precompute_ref_logps(self, *args, **kwargs):
            # TRL adds its "ref" adapter after build_model made the LoRA layers compute in the base's dtype
            # (lora_compute.py); on a bf16 base its fp32 A and B would meet bf16 inputs.
            compute_lora_in_base_dtype(self.accelerator.unwrap_model(self.model), self.model.dtype)
            return super()._precompute_ref_logps(*args, **kwargs)

        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # tokenized and masked by lorachat (module docstring)

        def _row_lengths(self, dataset) -> list[int]:
            chosen = pyarrow.compute.list_value_length(dataset.data.column("chosen_ids")).to_pylist()
            rejected = pyarrow.compute.list_value_length(dataset.data.column("rejected_ids")).to_pylist()
            return [max(c, r) for c, r in zip(chosen, rejected)]

        def compute_ref_log_probs(self, model, inputs):
            peft_model = self.accelerator.unwrap_model(self.model)
            with torch.no_grad(), use_adapter(peft_model, "ref" if "ref" in peft_model.peft_config else None):
                return sequence_logps(model, self.selector, inputs).chunk(2)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            if mode == "train" and torch.is_grad_enabled():
                # One side's activations at a time (pair_passes.py): a DPO step holds what an SFT step holds.
                chosen, rejected = two_passes(
                    lambda rows: sequence_logps(model, self.selector, rows),
                    lambda c, r: self._per_pair(c, r, inputs)[0].mean(), inputs,
                    # Trainer.training_step scales the loss it backpropagates so (DPOTrainer's loss is unscaled).
                    lambda loss: self.accelerator.backward(loss / self.current_gradient_accumulation_steps),
                    lambda: self.accelerator.no_sync(model),
                    release_freed if self.args.device.type == "cpu" else lambda: None)
            else:
                chosen, rejected = sequence_logps(model, self.selector, inputs).chunk(2)  # (B,), (B,)
            per_pair, margin = self._per_pair(chosen, rejected, inputs)
            loss_sum = per_pair.sum()
            self._stop_if_not_finite(loss_sum)
            if mode == "train":
                self.meter.add(loss_sum.item(), len(per_pair), int(inputs["real_tokens"]))
            self._metrics[mode]["rewards/accuracies"].append((margin > 0).float().mean().item())
            self._metrics[mode]["rewards/margins"].append(margin.mean().item())
            loss = loss_sum / len(per_pair)
            return (loss, None) if return_outputs else loss

        def _per_pair(self, chosen, rejected, inputs):
            """(loss, margin) per pair from each side's summed log-probability of its reply."""
            trained = (inputs["shift_labels"] != -100).sum(dim=1).clamp(min=1)  # (2B,)
            mean_c, mean_r = chosen / trained[:len(chosen)], rejected / trained[len(chosen):]
            if self.method == "dpo":
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
                margin = self.beta * ((chosen - ref_chosen) - (rejected - ref_rejected))  # (B,)
                return -F.logsigmoid(margin) - self.sft_weight * mean_c, margin
            # orpo (Hong et al. 2024, eq. 6-7; as trl.experimental.orpo): NLL of the chosen reply plus beta x the
            # odds-ratio term, on per-token mean log-probs
            margin = (mean_c - _log1mexp(mean_c)) - (mean_r - _log1mexp(mean_r))  # log odds ratio
            return -mean_c - self.beta * F.logsigmoid(margin), margin

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if self.model.training:
                self._metrics["train"]["num_tokens"] = [self.meter.total_tokens]
            super().log(logs, start_time)

    return PreferenceTrainer


class PreferenceRun(FinetuneRun):
    """A `lorachat finetune` run whose trainer learns from pairs; everything else (inputs, checkpoints, resume,
    progress, the adapter and its card) is FinetuneRun's."""

    def make_model(self):
        problems = self.inputs.data.problems
        if problems:
            # SFT trains on the usable rows; a pair that cannot be read is refused, before any weights load, so
            # a preference file built by a script with a bug does not quietly shrink.
            more = f" (and {len(problems) - 1} more: lorachat validate lists them)" if len(problems) > 1 else ""
            raise DataError(problems[0].reason + more, problems[0].where)
        start = self.recipe.base.adapter
        if start:
            self._check_start(Path(start))
        model = build_model(self.inputs, meta=self.options.dry_run)
        if start and not self.options.dry_run:
            self._load_start(model, Path(start))
        return model

    def _check_start(self, folder: Path) -> None:
        from ..adapters.compat import check_compatible
        from ..models import model_facts

        where = self.loaded.where("base", "adapter")
        try:
            check_compatible(folder, model_facts(self.inputs.base), base=self.inputs.base)
        except LorachatError as err:
            raise LorachatError(f"{folder}: {err.reason}", where) from None

    def _load_start(self, model, folder: Path) -> None:
        """The starting adapter's weights into the LoRA the recipe's lora section built, which must match it."""
        import json

        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        where = self.loaded.where("base", "adapter")
        saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        built = model.peft_config["default"]
        differ = [f"{key} {saved.get(key)} != {getattr(built, key)}" for key in ("r", "lora_alpha", "use_dora",
                                                                            "use_rslora")
                  if saved.get(key, getattr(built, key)) != getattr(built, key)]
        if differ:
            raise LorachatError(f"{folder} was trained with other LoRA settings than the recipe's lora section "
                                f"({', '.join(differ)}); set lora to match it (extends: its recipe does)", where)
        weights = load_file(str(folder / "adapter_model.safetensors"))
        try:
            result = set_peft_model_state_dict(model, weights, adapter_name="default")
        except RuntimeError as err:  # a shape mismatch
            raise LorachatError(f"{folder}: {str(err).splitlines()[0]}", where) from None
        if result.unexpected_keys:
            raise LorachatError(f"{folder} adapts modules the recipe's lora.target_modules does not "
                                f"(e.g. {result.unexpected_keys[0]}); set lora to match it", where)

    def build_trainer(self):
        import datasets
        from transformers.trainer_callback import PrinterCallback, ProgressCallback
        from trl import DPOConfig

        t, data = self.recipe.training, self.recipe.data
        template = self.inputs.template
        self.pairs = {split: encode_pairs(conversations, template, data.max_length, data.too_long)
                      for split, conversations in (("train", self.inputs.data.train), ("eval", self.inputs.data.eval))}
        if not self.pairs["train"].chosen:
            reasons = "; ".join(f"{n} {why}" for why, n in self.pairs["train"].dropped.most_common())
            raise LorachatError(f"every training pair was dropped: {reasons}", self.loaded.where("data", "train"))
        train_rows, eval_rows = self.pairs["train"].rows(), self.pairs["eval"].rows()
        args = DPOConfig(
            **self.training_args(bool(eval_rows)),
            beta=t.beta,
            # The reference scored once, before the first step: one pass per step fewer, no reference in memory.
            precompute_ref_log_probs=t.method == "dpo",
            precompute_ref_batch_size=2 * t.batch_size,  # no gradients: twice the rows fit
            # DPOConfig turns bf16 autocast on by default; the base already computes in its own dtype.
            bf16=False,
            max_length=None,  # data.max_length is applied already, per pair
            remove_unused_columns=False,
            # Trainer.evaluate asks for logits unless told the loss is all; this trainer has none to give.
            prediction_loss_only=True,
            # Dropout follows the recipe (lora.dropout), as for SFT.
            disable_dropout=False)
        if t.method == "dpo" and distributed.rank() == 0:
            self.console.print(f"[dim]scoring {len(train_rows) + len(eval_rows):,} pairs with the reference "
                               f"({REFERENCE_START if self.recipe.base.adapter else REFERENCE_BASE}), once[/]")
        with _quiet_bars():
            trainer = _trainer_class()(
                model=self.model, ref_model=None, args=args,
                train_dataset=datasets.Dataset.from_list(train_rows),
                eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
                data_collator=PairCollator(self.inputs.tokenizer.pad_token_id),
                processing_class=self.inputs.tokenizer, callbacks=self.callbacks(), method=t.method,
                sft_weight=t.sft_weight,
                meter=self.meter, checkpoint_root=self.checkpoint_root, keep_checkpoints=t.keep_checkpoints)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return trainer

    def evaluate(self, result) -> dict[str, Any]:
        state, t = self.trainer.state, self.recipe.training
        pairs = self.pairs["train"]
        reference = None if t.method == "orpo" else REFERENCE_START if self.recipe.base.adapter else REFERENCE_BASE
        metrics: dict[str, Any] = {"train": {
            "method": t.method, "reference": reference, "start": self.recipe.base.adapter,
            "loss": _last_logged_loss(self.log_path), "steps": state.global_step,
            "epochs": round(state.epoch or 0.0, 4), "tokens": self.meter.total_tokens,
            "gradient_checkpointing": self.checkpointing.on,
            "runtime_s": round(result.metrics.get("train_runtime", 0.0), 2),
            "pairs": len(pairs.chosen), "pairs_dropped": sum(pairs.dropped.values()),
            "peak_memory": checkpointing.peak_memory()}}
        metrics["train"] = {k: v for k, v in metrics["train"].items() if v is not None}
        if self.pairs["eval"].chosen:
            values = self.trainer.evaluate()
            # The share of held-out pairs whose margin grew past 0: DPO's implicit reward (beta x the log-ratio to
            # the reference) of the chosen reply above the rejected one's, ORPO's log odds ratio above 0.
            metrics["eval"] = {"loss": values["eval_loss"], "reward_accuracy": values["eval_rewards/accuracies"],
                               "margin": values["eval_rewards/margins"], "pairs": len(self.pairs["eval"].chosen)}
        return metrics


@contextmanager
def _quiet_bars() -> Iterator[None]:
    """TRL's reference pass draws tqdm bars (and datasets' caching its own); lorachat prints one line instead."""
    import datasets

    before, was_enabled = os.environ.get("TQDM_DISABLE"), datasets.is_progress_bar_enabled()
    os.environ["TQDM_DISABLE"] = "1"
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before
        if was_enabled:
            datasets.enable_progress_bars()

