"""`lorachat plan a.yaml b.yaml ...`: the joint run of several recipes (train/joint/) on one card.

One base is held once; every adapter brings its own weights, gradients and optimizer states; the mixed micro-batch
holds as many rows as the largest `batch_size` of the recipes, its rows as long as the longest of any of them (the
joint loop sorts a step's rows of every adapter longest first), so activations, logits and a layer's backward are
those of one such micro-batch. The run takes as many steps as its longest member and, on one device, the sum of
the members' times: the adapters share the device, the tokens add up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from .estimate import Plan, make_plan
from .memory import GIB, Breakdown, estimate

SHARED = ("weights", "cuda_context")  # held once, whatever the number of adapters
PER_ADAPTER = ("adapter", "gradients", "optimizer")  # one copy per adapter
# every other part (activations, logits, backward, allocator) is that of the one mixed micro-batch


@dataclass
class JointPlan:
    plans: list[Plan]  # each recipe's own plan, on the same card
    breakdown: Breakdown
    rows: int
    seq_len: int

    @property
    def gpu(self):
        return self.plans[0].gpu

    @property
    def fits(self) -> bool:
        return self.breakdown.total <= self.gpu.memory_gib * GIB

    @property
    def steps(self) -> int:
        return max(p.steps for p in self.plans)

    @property
    def hours(self) -> float:
        return sum(p.card.hours for p in self.plans)

    @property
    def tokens_per_s(self) -> float:
        tokens = sum(p.card.tokens_per_s * p.card.hours for p in self.plans)
        return tokens / max(self.hours, 1e-12)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipes": [p.recipe for p in self.plans], "gpu": self.gpu.name, "gpu_memory_gib": self.gpu.memory_gib,
            "peak_memory_gib": round(self.breakdown.total / GIB, 2), "fits": self.fits,
            "breakdown": self.breakdown.gib(), "steps": self.steps, "hours": round(self.hours, 6),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "micro_batch": {"rows": self.rows, "tokens_per_row": self.seq_len},
            "adapters": [{"recipe": p.recipe, "steps": p.steps, "hours": round(p.card.hours, 6),
                          "breakdown": p.breakdown.gib(), "micro_batch": {"rows": p.setup.batch,
                                                                          "tokens_per_row": p.setup.seq_len}}
                         for p in self.plans],
        }


def make_joint_plan(recipe_paths: list[str], overrides: list[str] = (), gpu: str | None = None,
                    **options: Any) -> JointPlan:
    """The joint run on `gpu` (default: the largest of the cards each recipe's own plan picks)."""
    plans = [make_plan(path, overrides, gpu, **options) for path in recipe_paths]
    if gpu is None:
        card = max((p.gpu for p in plans), key=lambda g: g.memory_gib)
        plans = [p if p.gpu == card else make_plan(path, overrides, card.name, **options)
                 for p, path in zip(plans, recipe_paths)]
    rows, seq_len = max(p.setup.batch for p in plans), max(p.setup.seq_len for p in plans)
    mixed = [estimate(p.shape, p.setup.changed(batch=rows, seq_len=seq_len)) for p in plans]
    parts = {name: getattr(plans[0].breakdown, name) for name in SHARED}
    parts.update({name: sum(getattr(p.breakdown, name) for p in plans) for name in PER_ADAPTER})
    parts.update({f.name: max(getattr(b, f.name) for b in mixed) for f in fields(Breakdown) if f.name not in parts})
    return JointPlan(plans, Breakdown(**parts), rows, seq_len)


def print_joint_plan(plan: JointPlan, console: Any) -> None:
    from rich.table import Table

    from .estimate import _duration, breakdown_table

    console.print(f"[bold]{len(plan.plans)} adapters[/] on one base, [bold]{plan.gpu.name}[/] "
                  f"({plan.gpu.memory_gib:g} GiB); mixed micro-batch: {plan.rows} x {plan.seq_len} tokens")
    adapters = Table(title="adapters", title_justify="left")
    for col in ("recipe", "steps", "micro-batch", "adapter + optimizer GiB", "time"):
        adapters.add_column(col, justify="left" if col == "recipe" else "right")
    for p in plan.plans:
        own = (p.breakdown.adapter + p.breakdown.gradients + p.breakdown.optimizer) / GIB
        adapters.add_row(p.recipe, f"{p.steps:,}", f"{p.setup.batch} x {p.setup.seq_len}", f"{own:.3f}",
                         _duration(p.card.hours))
    console.print(adapters)
    console.print(breakdown_table(plan.breakdown, plan.fits, "peak GPU memory of the joint run"))
    alone = max(p.breakdown.total for p in plan.plans) / GIB
    console.print(f"time: {plan.steps:,} joint steps, ~{plan.tokens_per_s:,.0f} tokens/s = {_duration(plan.hours)} "
                  f"of device time, as the runs one after another; the largest of them alone peaks at {alone:.2f} GiB")


