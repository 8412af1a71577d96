"""`lorachat finetune A.yaml B.yaml ...`: every recipe's adapter trained in one process on one loaded base.

    lorachat finetune recipes/quickstart.yaml recipes/quickstart-sv.yaml recipes/smalltalk-en.yaml recipes/smalltalk-sv.yaml
    lorachat finetune a.yaml b.yaml --resume            # every adapter from its own newest checkpoint
    lorachat finetune a.yaml b.yaml --processes 2       # the same joint run as 2 DDP processes

`JointRun.run` reads top to bottom like run.FinetuneRun: recipes checked together -> inputs and rows of each ->
refusals (all before any weights and before anything is written) -> the base once, one LoRA adapter per recipe
-> members (optimizer, schedule, resume) -> fit (loop.py) -> each adapter published by run.py's own save.
docs/joint-training.md has the design and its figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from ...recipe import LoadedRecipe
from .. import checkpointing, distributed
from ..collate import Collator, to_rows
from ..lora_compute import compute_lora_in_base_dtype
from ..run import FinetuneRun, Options, _save_adapter, build_model, check_optimizer, lora_config, output_dir, preflight
from .compat import check_inputs, check_recipes
from .members import Member

FIRST = "default"  # the first recipe's adapter keeps PEFT's default name, as in a single run


def adapter_name(index: int) -> str:
    return FIRST if index == 0 else f"joint_{index}"


def finetune_joint(recipes: Sequence[LoadedRecipe], options: Options = Options(),
                   console: Console | None = None) -> list[Path]:
    """Train every recipe's adapter together; return their directories. Raises LorachatError (nothing written)
    before any weights load when the recipes cannot share a base or one of them is unusable."""
    console = console or Console()
    for loaded in recipes:
        check_optimizer(loaded)
    check_recipes(recipes, [output_dir(r) for r in recipes])
    run = JointRun(list(recipes), options, console)
    if options.processes > 1 and not distributed.in_worker() and not options.dry_run:
        run.setup(need_weights=False)  # every refusal here, once, before N processes load the base
        distributed.launch(options.processes, worker_args(recipes, options))
        return run.targets
    return run.run()


def worker_args(recipes: Sequence[LoadedRecipe], options: Options) -> list[str]:
    args = [str(r.path) for r in recipes]
    for override in options.overrides:
        args += ["--set", override]
    return args + (["--resume"] if options.resume else []) + (["--overwrite"] if options.overwrite else [])


class JointRun:
    def __init__(self, recipes: list[LoadedRecipe], options: Options, console: Console):
        self.recipes, self.options, self.console = recipes, options, console
        self.targets = [output_dir(r) for r in recipes]
        self.processes = max(options.processes, distributed.world_size())

    def setup(self, need_weights: bool) -> None:
        """Inputs, rows and every refusal, for all recipes, before anything is written."""
        from ...encoding import prepare
        from ...inputs import load_inputs

        self.inputs = [load_inputs(r, need_weights=need_weights and i == 0) for i, r in enumerate(self.recipes)]
        self.prepared = [prepare(i.loaded, i.data, i.template) for i in self.inputs]
        check_inputs(self.inputs, self.prepared)
        # --resume with a member lacking a checkpoint, or an adapter in the way: refused for all before any is set
        # aside (preflight's --overwrite rename waits for the second pass).
        self.resume_from = [preflight(r, t, self.options, set_aside=False) for r, t in zip(self.recipes, self.targets)]

    def run(self) -> list[Path]:
        import torch
        from transformers import set_seed

        from ...models import pick_dtype

        self.setup(need_weights=not self.options.dry_run)
        if self.options.dry_run:
            for loaded in self.recipes:  # each adapter's plan as its own run prints it; nothing is written
                FinetuneRun(loaded, self.options, self.console).run()
            return self.targets
        for loaded, target in zip(self.recipes, self.targets):
            preflight(loaded, target, self.options)  # now set an old adapter aside, with --overwrite
        members = self.members()
        dtype = pick_dtype(self.recipes[0].recipe.base.dtype)
        for m in members:
            m.checkpointing = checkpointing.decide(m.loaded, m.prepared.stats["train"], m.inputs.base, dtype)
        on = any(m.checkpointing.on for m in members)

        # ---- the base once, then one adapter per recipe, each drawn from its own seed as a single run draws it
        set_seed(self.recipes[0].recipe.training.seed)
        model = build_model(self.inputs[0], meta=False)
        for m in members[1:]:
            set_seed(m.recipe.training.seed)
            model.add_adapter(m.name, lora_config(m.recipe.lora))
        compute_lora_in_base_dtype(model, dtype)  # the added adapters too, as build_model did the first
        from .layer import use_mixed_forward

        use_mixed_forward(model, [m.name for m in members])
        if on:  # what the Trainer's activation_checkpointing does for a single run
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        device = self.device()
        if self.recipes[0].recipe.base.quantization == "none":
            model.to(device)
        is_main = distributed.rank() == 0
        for m in members:
            m.build_optimizer(model, is_main)
            if m.resume_from is not None:
                m.load_checkpoint(model)
        if is_main:
            for m in members:
                m.prepare_output()
            base = self.inputs[0].base
            if base.note:
                self.console.print(f"[dim]{base.note}[/]")
            self.console.print(f"[dim]{len(members)} adapters on one {base.model_id}; gradient checkpointing "
                               f"{'on' if on else 'off'} ({'; '.join(f'{m.label}: {m.checkpointing}' for m in members)})[/]")

        # ---- fit, then publish each adapter exactly as a single run does
        from .loop import JointTrainer, failures

        attn = getattr(model.config, "_attn_implementation", "") or ""
        collator = Collator(pad_id=self.inputs[0].tokenizer.pad_token_id, flatten=attn.startswith("flash"))
        trainer = JointTrainer(model, members, collator, device, self.console)
        runtime = trainer.fit()
        if is_main:
            for m in members:
                if m.failed is None:
                    _save_adapter(m.inputs, model, m.target, m.metrics(runtime), None, m.name)
                    self.console.print(f"[green]adapter written to {m.target}[/]")
        if distributed.world_size() > 1:
            torch.distributed.barrier()
        failed = failures(members)
        if failed is not None:
            raise failed
        return self.targets

    def members(self) -> list[Member]:
        members = []
        for index, (inputs, prepared, resume) in enumerate(zip(self.inputs, self.prepared, self.resume_from)):
            t, data = inputs.loaded.recipe.training, inputs.loaded.recipe.data
            members.append(Member(adapter_name(index), inputs, prepared,
                                  to_rows(prepared.train, t.packing, data.max_length),
                                  to_rows(prepared.eval, t.packing, data.max_length), resume, self.processes))
        return members

    def device(self):
        """The process's device; under a launcher this also joins the process group (gloo on CPU, NCCL on GPUs)."""
        import torch
        from accelerate import PartialState

        return PartialState(cpu=not torch.cuda.is_available()).device
