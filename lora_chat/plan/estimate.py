"""`lorachat plan`: memory, fit and time of a recipe's run on a GPU, from the recipe, config.json and the data.

No weights are read. Token lengths come from the tokenizer where the base's folder has one (exactly as
`validate` measures them); otherwise from characters at a stated characters-per-token ratio, with packed rows
taken as `max_length` long. The plan says which.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import LorachatError, Where
from ..models import ResolvedBase, resolve_base
from ..models.facts import read_config
from ..recipe import LoadedRecipe, load_recipe
from . import host
from .gpus import GPUS, Gpu, find_gpu
from .memory import (AUTO_CHECKPOINTING_SHARE, GIB, HOST_OFFLOAD_SHARE, LINEARS, Breakdown, Setup, Shape,
                     auto_checkpointing, estimate, host_offload_bytes)
from .throughput import default_utilisation, tokens_per_second

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# A padded batch rounds its length up to this multiple (train/collate.py's Collator.multiple_of).
PAD_MULTIPLE = 8
# `--max-length` answers to this granularity, up to this many tokens.
LENGTH_STEP = 64
LONGEST_SEARCHED = 1 << 20


@dataclass(frozen=True)
class DataLengths:
    samples: int
    tokens: int
    trained: int
    longest: int
    source: str  # how the lengths were obtained, shown to the user

    @classmethod
    def measured(cls, stats: Any) -> DataLengths:
        """From the train split's encoding stats (encoding.SplitStats), as `validate` counts them."""
        return cls(stats.kept, stats.tokens, stats.trained, max(stats.lengths, default=0),
                   "measured with the base's tokenizer and chat template")

    @property
    def mean(self) -> float:
        return self.tokens / max(self.samples, 1)


@dataclass(frozen=True)
class Card:
    gpu: Gpu
    fits: bool
    tokens_per_s: float
    hours: float
    checkpointing: bool
    offload: bool = False
    max_length: int | None = None  # with --max-length: the longest row that fits this card (0: none does)


@dataclass(frozen=True)
class Suggestion:
    change: str  # the --set overrides that make it
    why: str
    breakdown: Breakdown
    fits: bool
    hours: float


@dataclass
class Plan:
    recipe: str
    base: str
    shape: Shape
    setup: Setup
    data: DataLengths
    steps: int
    breakdown: Breakdown
    gpu: Gpu
    utilisation: float
    cards: list[Card]
    checkpointing_auto: bool  # the recipe left gradient checkpointing to `auto`, decided per card
    host_bytes: int = 0  # free host memory offloaded checkpoints may use (this machine's, or --host-ram)
    suggestions: list[Suggestion] = field(default_factory=list)

    @property
    def card(self) -> Card:
        return next(c for c in self.cards if c.gpu == self.gpu)

    def to_json(self) -> dict[str, Any]:
        card = self.card
        return {
            "recipe": self.recipe, "base": self.base, "gpu": self.gpu.name, "gpu_memory_gib": self.gpu.memory_gib,
            "peak_memory_gib": round(self.breakdown.total / GIB, 2),
            "reserved_gib": round((self.breakdown.total - self.breakdown.cuda_context) / GIB, 2), "fits": card.fits,
            "host_offload_gib": round(host_offload_bytes(self.shape, self.setup) / GIB, 2),
            "breakdown": self.breakdown.gib(), "tokens_per_s": round(card.tokens_per_s, 1),
            "hours": round(card.hours, 6), "steps": self.steps, "utilisation": self.utilisation,
            "tokens": self.data.tokens, "trained_tokens": self.data.trained, "lengths_from": self.data.source,
            "micro_batch": {"rows": self.setup.batch, "tokens_per_row": self.setup.seq_len},
            "gradient_checkpointing": {"setting": "auto" if self.checkpointing_auto else _mode(self.setup),
                                       "on": self.setup.checkpointing, "offload": self.setup.offload},
            "suggestions": [{"change": s.change, "why": s.why, "peak_memory_gib": round(s.breakdown.total / GIB, 2),
                             "fits": s.fits, "hours": round(s.hours, 6)} for s in self.suggestions],
            "gpus": [{"name": c.gpu.name, "memory_gib": c.gpu.memory_gib, "fits": c.fits,
                      "tokens_per_s": round(c.tokens_per_s, 1), "hours": round(c.hours, 6),
                      "gradient_checkpointing": c.checkpointing, "offload": c.offload,
                      **({"max_length": c.max_length} if c.max_length is not None else {})} for c in self.cards],
        }


def _mode(setup: Setup) -> str | bool:
    return "offload" if setup.offload else setup.checkpointing


def make_plan(recipe_path: str | Path, overrides: list[str] = (), gpu: str | None = None,
              chars_per_token: float = 4.0, utilisation: float | None = None, max_length: bool = False,
              host_ram_gib: float | None = None) -> Plan:
    """The plan for `recipe_path` on `gpu` (default: the smallest card it fits, else the largest).

    `max_length` also finds, for each card, the longest row that fits; `host_ram_gib` is the free host memory
    offloaded checkpoints may use (default: what this machine has available now)."""
    loaded = load_recipe(recipe_path, list(overrides))
    recipe = loaded.recipe
    chosen = find_gpu(gpu) if gpu else None
    try:
        base = resolve_base(recipe.base.model, recipe.base.revision, need_weights=False)
    except LorachatError as err:
        raise type(err)(err.reason, loaded.where("base", "model")) from None
    shape = Shape.from_config(read_config(base), Where(base.path / "config.json"))
    lengths = _lengths(loaded, base, chars_per_token)
    recipe_setup = setup_of(loaded, lengths)
    auto = recipe.training.gradient_checkpointing == "auto"
    host_bytes = int(host_ram_gib * GIB) if host_ram_gib is not None else host.available_bytes()

    def setup_on(card: Gpu, setup: Setup = recipe_setup) -> Setup:  # `auto` decides per card as finetune would
        return auto_checkpointing(shape, setup, card.memory_gib * GIB, host_bytes) if auto else setup

    steps = optimizer_steps(loaded, lengths)
    util = utilisation or default_utilisation(recipe_setup)
    cards = [_card(g, shape, setup_on(g), lengths, steps, loaded, util) for g in GPUS]
    if max_length:
        cards = [replace(c, max_length=longest_fitting(shape, recipe_setup, c.gpu, setup_on, host_bytes))
                 for c in cards]
    if chosen is None:
        chosen = next((c.gpu for c in sorted(cards, key=lambda c: c.gpu.memory_gib) if c.fits), GPUS[-1])
    setup = setup_on(chosen)
    plan = Plan(recipe=str(loaded.path), base=f"{base.model_id} ({base.source})", shape=shape, setup=setup,
                data=lengths, steps=steps, breakdown=estimate(shape, setup), gpu=chosen, utilisation=util,
                cards=cards, checkpointing_auto=auto, host_bytes=host_bytes)
    if not plan.card.fits:
        plan.suggestions = suggestions(loaded, shape, setup, lengths, chosen, util, host_bytes)
    return plan


def _fits(shape: Shape, setup: Setup, gpu: Gpu, host_bytes: int) -> bool:
    return (estimate(shape, setup).total <= gpu.memory_gib * GIB
            and host_offload_bytes(shape, setup) <= HOST_OFFLOAD_SHARE * host_bytes)


def longest_fitting(shape: Shape, setup: Setup, gpu: Gpu, setup_on, host_bytes: int) -> int:
    """The longest row (a multiple of LENGTH_STEP tokens) whose micro-batch fits `gpu`, each length with the
    checkpointing `setup_on` picks for it; 0 when not even LENGTH_STEP tokens fit.

    A longer row is a longer sample: attention spans it whole (unpacked) or its packed samples as before."""
    def at(length: int) -> Setup:
        span = min(setup.attention_span, length) if setup.packing else 0
        return setup_on(gpu, setup.changed(seq_len=length, attention_span=span))

    low, high = 0, LONGEST_SEARCHED // LENGTH_STEP  # in steps; memory grows with length, so bisect
    while low < high:
        mid = (low + high + 1) // 2
        if _fits(shape, at(mid * LENGTH_STEP), gpu, host_bytes):
            low = mid
        else:
            high = mid - 1
    return low * LENGTH_STEP


def _lengths(loaded: LoadedRecipe, base: ResolvedBase, chars_per_token: float) -> DataLengths:
    if any((base.path / name).is_file() for name in TOKENIZER_FILES):
        from ..encoding import prepare
        from ..inputs import load_inputs

        inputs = load_inputs(loaded)
        return DataLengths.measured(prepare(inputs.loaded, inputs.data, inputs.template).stats["train"])
    return _lengths_from_chars(loaded, chars_per_token)


def _lengths_from_chars(loaded: LoadedRecipe, chars_per_token: float) -> DataLengths:
    """No tokenizer: characters / ratio, plus a few template tokens per message; `too_long` applied."""
    from ..data import load_data

    data, max_length = loaded.recipe.data, loaded.recipe.data.max_length
    train_on = data.train_on
    samples = tokens = trained = longest = 0
    for conversation in load_data(loaded).train:
        messages = conversation.messages
        n = sum(len(m.content) for m in messages) / chars_per_token + 4 * len(messages)  # ~4 role/turn tokens
        assistants = [m for m in messages if m.role == "assistant" and m.train is not False]
        if train_on == "last_assistant":
            assistants = assistants[-1:]
        t = n if train_on == "all" else sum(len(m.content) / chars_per_token + 1 for m in assistants)
        if n > max_length:
            if data.too_long != "truncate":
                continue
            t, n = t * max_length / n, max_length
        samples, tokens, trained, longest = samples + 1, tokens + n, trained + t, max(longest, math.ceil(n))
    source = f"estimated at {chars_per_token:g} characters per token (no tokenizer next to config.json)"
    return DataLengths(samples, round(tokens), round(trained), longest, source)


def setup_of(loaded: LoadedRecipe, lengths: DataLengths) -> Setup:
    recipe = loaded.recipe
    t, lora = recipe.training, recipe.lora
    if t.packing:
        seq_len = min(recipe.data.max_length, max(lengths.tokens, 1))  # a packed row is full but the last
    else:
        seq_len = -(-max(lengths.longest, 1) // PAD_MULTIPLE) * PAD_MULTIPLE
    targets = LINEARS if lora.target_modules == "all-linear" else tuple(m for m in LINEARS if m in lora.target_modules)
    dtype = recipe.base.dtype
    return Setup(
        compute_bytes=4 if dtype == "float32" else 2, quantization=recipe.base.quantization, rank=lora.r,
        targets=targets, variant=lora.variant, dropout=lora.dropout, optimizer=t.optimizer, batch=t.batch_size,
        # `auto` is decided against a device's memory (memory.auto_checkpointing); until then, on.
        seq_len=seq_len, trained_share=lengths.trained / max(lengths.tokens, 1),
        checkpointing=t.gradient_checkpointing is not False, offload=t.gradient_checkpointing == "offload",
        packing=t.packing, attention="sdpa" if recipe.base.attn_implementation == "auto" else recipe.base.attn_implementation,
        kernels=t.kernels, attention_span=max(1, round(lengths.mean)) if t.packing else 0)


def optimizer_steps(loaded: LoadedRecipe, lengths: DataLengths) -> int:
    """As the Trainer counts them: micro-batches per epoch / accumulation (a partial one is a step), x epochs.

    Packed rows are counted as tokens / max_length (best-fit packing fills rows nearly full).
    """
    recipe = loaded.recipe
    t = recipe.training
    if t.max_steps:
        return t.max_steps
    rows = math.ceil(lengths.tokens / recipe.data.max_length) if t.packing else lengths.samples
    per_epoch = max(math.ceil(math.ceil(rows / t.batch_size) / t.grad_accum), 1)
    return math.ceil((t.epochs or 1.0) * per_epoch)


def _run_tokens(loaded: LoadedRecipe, lengths: DataLengths, steps: int) -> float:
    """Tokens the run trains on: the data times epochs, or with max_steps, steps x rows per step x row length."""
    t = loaded.recipe.training
    if not t.max_steps:
        return lengths.tokens * (t.epochs or 1.0)
    per_row = min(loaded.recipe.data.max_length, lengths.tokens) if t.packing else lengths.mean
    return steps * t.batch_size * t.grad_accum * per_row


def _card(gpu: Gpu, shape: Shape, setup: Setup, lengths: DataLengths, steps: int, loaded: LoadedRecipe,
          util: float) -> Card:
    tps = tokens_per_second(shape, setup, gpu.bf16_tflops, util)
    fits = estimate(shape, setup).total <= gpu.memory_gib * GIB
    return Card(gpu, fits, tps, _run_tokens(loaded, lengths, steps) / tps / 3600, setup.checkpointing, setup.offload)


def suggestions(loaded: LoadedRecipe, shape: Shape, setup: Setup, lengths: DataLengths, gpu: Gpu,
                util: float, host_bytes: int) -> list[Suggestion]:
    """Single changes that make the run fit, cheapest first (in run time, then in what they change);
    when none fits alone, the cheapest changes added one after another until it does."""
    t = loaded.recipe.training
    candidates: list[tuple[str, str, Setup]] = []  # (change, why, setup)
    if not setup.checkpointing:
        candidates.append(("training.gradient_checkpointing=true",
                           "keeps one layer's activations instead of all; ~1.3x the compute",
                           setup.changed(checkpointing=True)))
    if not setup.offload:
        candidates.append(("training.gradient_checkpointing=offload",
                           "checkpoints in pinned host memory; ~1.3x the compute, host-to-GPU copies",
                           setup.changed(checkpointing=True, offload=True)))
    if setup.optimizer == "adamw":
        candidates.append(("training.optimizer=adamw_8bit", "Adam states in 8 bits (bitsandbytes)",
                           setup.changed(optimizer="adamw_8bit")))
    batch, accum = setup.batch, t.grad_accum
    while batch > 1:
        batch, accum = batch // 2, accum * 2
        candidates.append((f"training.batch_size={batch} training.grad_accum={accum}",
                           "same rows per optimizer step in smaller micro-batches", setup.changed(batch=batch)))
    length = setup.seq_len
    while length > 256:
        length //= 2
        candidates.append((f"data.max_length={length}", "longer samples are dropped or truncated (too_long)",
                           setup.changed(seq_len=length, attention_span=min(setup.attention_span, length))))
    if setup.quantization != "4bit":
        candidates.append(("base.quantization=4bit", "QLoRA: nf4 base weights with double quantization",
                           setup.changed(quantization="4bit")))
    rank = setup.rank
    while rank > 4:
        rank //= 2
        candidates.append((f"lora.r={rank}", "fewer adapter weights; may learn less", setup.changed(rank=rank)))

    def evaluate(change: str, why: str, candidate: Setup) -> Suggestion:
        bd = estimate(shape, candidate)
        c_util = util if candidate.quantization == setup.quantization else default_utilisation(candidate)
        tps = tokens_per_second(shape, candidate, gpu.bf16_tflops, c_util)
        hours = _run_tokens(loaded, lengths, optimizer_steps(loaded, lengths)) / tps / 3600
        return Suggestion(change, why, bd, _fits(shape, candidate, gpu, host_bytes), hours)

    fitting: dict[str, Suggestion] = {}
    for change, why, candidate in candidates:
        key = change.split("=")[0]  # the smallest step of each kind that fits is enough
        if key not in fitting:
            s = evaluate(change, why, candidate)
            if s.fits:
                fitting[key] = s
    if fitting:
        return sorted(fitting.values(), key=lambda s: (s.hours, s.breakdown.total))
    # Nothing fits alone: combine, strongest memory saver last, until it fits.
    combined, changes = setup, []
    order = [("training.gradient_checkpointing=offload", dict(checkpointing=True, offload=True)),
             ("training.optimizer=adamw_8bit", dict(optimizer="adamw_8bit") if setup.optimizer == "adamw" else {}),
             ("training.batch_size=1 training.grad_accum=" + str(t.grad_accum * setup.batch), dict(batch=1)),
             ("base.quantization=4bit", dict(quantization="4bit")),
             ("data.max_length=512", dict(seq_len=min(512, setup.seq_len)))]
    for change, values in order:
        if not values or all(getattr(combined, k) == v for k, v in values.items()):
            continue
        combined, changes = combined.changed(**values), changes + [change]
        s = evaluate(" ".join(changes), "together", combined)
        if s.fits:
            return [s]
    return []


def breakdown_table(breakdown: Breakdown, fits: bool, title: str) -> Any:
    """The memory parts in GiB and their total, with whether it fits (a rich Table)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for part, gib in breakdown.gib().items():
        table.add_row(part.replace("_", " "), f"{gib:.2f}")
    verdict = "[green]fits[/]" if fits else "[red]does not fit[/]"
    table.add_row(f"[bold]total[/] ({verdict})", f"[bold]{breakdown.total / GIB:.2f}[/]")
    return table


def print_plan(plan: Plan, console: Any) -> None:
    from rich.table import Table

    s, d, card = plan.setup, plan.data, plan.card
    console.print(f"[bold]{Path(plan.recipe).name}[/] on [bold]{plan.gpu.name}[/] ({plan.gpu.memory_gib:g} GiB, "
                  f"{plan.gpu.bf16_tflops:g} bf16 TFLOP/s); base {plan.base}")
    console.print(f"data: {d.samples:,} samples, {d.tokens:,} tokens ({d.trained:,} trained), longest {d.longest:,}: "
                  f"{d.source}")
    checkpointing = ("gradient checkpointing offloaded to host memory" if s.offload else
                     "gradient checkpointing" if s.checkpointing else "no gradient checkpointing")
    if plan.checkpointing_auto:
        share = f"{AUTO_CHECKPOINTING_SHARE['cuda']:.0%}"
        checkpointing += (f" (auto: only this fits in {share} of the card)" if s.offload else
                          f" (auto: the run without it needs more than {share} of the card)" if s.checkpointing
                          else f" (auto: fits in {share} of the card without it)")
    console.print(f"micro-batch: {s.batch} x {s.seq_len} tokens, {'packed, ' if s.packing else ''}"
                  f"{checkpointing}, {s.quantization} base, r={s.rank} "
                  f"{s.variant} on {len(s.targets)} linears, {s.optimizer}, attention {s.attention}, kernels {s.kernels}")
    table = breakdown_table(plan.breakdown, card.fits, "peak GPU memory")
    if plan.breakdown.cuda_context:  # what torch.cuda.max_memory_reserved reports, as trainers publish it
        table.add_row("reserved by PyTorch (total - context)",
                      f"{(plan.breakdown.total - plan.breakdown.cuda_context) / GIB:.2f}")
    console.print(table)
    offloaded = host_offload_bytes(plan.shape, s)
    if offloaded:
        console.print(f"host: {offloaded / GIB:.2f} GiB of pinned memory for the offloaded checkpoints "
                      f"({plan.host_bytes / GIB:.1f} GiB available, at most {HOST_OFFLOAD_SHARE:.0%} pinned)")
    console.print(f"time: {plan.steps:,} optimizer steps, ~{card.tokens_per_s:,.0f} tokens/s at "
                  f"{plan.utilisation:.0%} of peak = {_duration(card.hours)}")
    if plan.suggestions:
        fixes = Table(title=f"changes that make it fit on {plan.gpu.name}", title_justify="left")
        for col in ("--set", "why", "GiB", "time"):
            fixes.add_column(col, justify="right" if col in ("GiB", "time") else "left")
        for sug in plan.suggestions:
            fixes.add_row(sug.change, sug.why, f"{sug.breakdown.total / GIB:.2f}", _duration(sug.hours))
        console.print(fixes)
    elif not card.fits:
        console.print("[red]no change lorachat knows makes it fit this card; try a larger one[/]")
    lengths = any(c.max_length is not None for c in plan.cards)
    cards = Table(title="other cards", title_justify="left")
    for col in ("GPU", "GiB", "fits", "checkpointing", "tokens/s", "time") + (("longest row",) if lengths else ()):
        cards.add_column(col, justify="left" if col == "GPU" else "right")
    for c in plan.cards:
        mode = "offload" if c.offload else "on" if c.checkpointing else "off"
        longest = (f"{c.max_length:,}" if c.max_length else "none fits",) if lengths else ()
        cards.add_row(c.gpu.name, f"{c.gpu.memory_gib:g}", "yes" if c.fits else "no", mode,
                      f"{c.tokens_per_s:,.0f}", _duration(c.hours), *longest)
    console.print(cards)
    if lengths:
        console.print(f"longest row: tokens per row at {s.batch} row(s) per micro-batch, the checkpointing that fits "
                      f"each length{' (auto)' if plan.checkpointing_auto else ''}, offloaded checkpoints within "
                      f"{HOST_OFFLOAD_SHARE:.0%} of {plan.host_bytes / GIB:.1f} GiB of host memory")


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.1f} h"
