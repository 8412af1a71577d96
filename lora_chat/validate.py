"""`lorachat validate`: the recipe, every data row and the masks, checked without model weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

from .data.hygiene.show import print_hygiene
from .data.loading import first_problems
from .encoding import Prepared, SplitStats, prepare
from .errors import DataError
from .inputs import Inputs, load_inputs
from .models import stop_ids
from .recipe import LoadedRecipe
from .templates import IGNORE
from .templates.tokens import missing_markers


@dataclass
class Validation:
    inputs: Inputs
    prepared: Prepared
    problems: list[DataError]
    warnings: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems and bool(self.prepared.train)


def validate(loaded: LoadedRecipe) -> Validation:
    inputs = load_inputs(loaded, scan=True)
    problems = list(inputs.data.problems)
    prepared = prepare(inputs.loaded, inputs.data, inputs.template, role_stats=True, problems=problems)
    return Validation(inputs, prepared, problems, template_warnings(inputs, prepared))


def template_warnings(inputs: Inputs, prepared: Prepared) -> list[str]:
    """What about the template could quietly change what is trained, judged on the kept training samples."""
    notes = []
    if inputs.loaded.recipe.template.add_special_tokens is False:
        pieces = missing_markers(inputs.template, inputs.tokenizer)
        if pieces:
            notes.append(f"template.add_special_tokens is false: {', '.join(pieces)} are trained as several "
                         f"text pieces each, not as one token")
    if not prepared.train or inputs.loaded.recipe.data.train_on == "all":
        return notes
    rewritten = [s.rewritten for s in prepared.train if s.rewritten]
    if rewritten:
        notes.append(
            f"chat template '{inputs.template.name}' rewrites earlier assistant turns inside the conversation "
            f"({sum(rewritten)} turns in {len(rewritten)} samples; Qwen3-style templates drop the reasoning of "
            f"earlier replies): each is trained as the conversation renders it, the text the model reads as "
            f"history at inference, so what the template drops is not trained; to train it, give each reply its "
            f"own sample (the conversation up to that reply)")
    sample = prepared.train[0]
    trained = [i for i, label in zip(sample.input_ids, sample.labels) if label != IGNORE]
    tok = inputs.tokenizer
    stops = set(stop_ids(tok, inputs.base))
    if inputs.added_tokens is not None:  # the added end-of-turn token becomes a stop token of the adapter
        stops.add(inputs.added_tokens.end_of_turn_id)
    if trained and trained[-1] not in stops:
        last = tok.convert_ids_to_tokens(trained[-1])
        notes.append(f"the last trained token of a reply is {last!r}, not the tokenizer's eos {tok.eos_token!r} "
                     f"or a stop token of the model: generation may not stop where training taught it to")
    return notes


def print_report(v: Validation, console: Console) -> None:
    loaded, base = v.inputs.loaded, v.inputs.base
    console.print(f"[bold]{loaded.recipe.name}[/] ({loaded.path})")
    console.print(f"base: {loaded.recipe.base.model} -> {base.path} [{base.source}]")
    if base.note:
        console.print(f"[yellow]note:[/] {base.note}")
    console.print(f"template: {v.inputs.template.name}; train_on: {loaded.recipe.data.train_on}; "
                  f"max_length: {loaded.recipe.data.max_length}; too_long: {loaded.recipe.data.too_long}")
    if v.inputs.added_tokens is not None:
        console.print(f"tokens: {v.inputs.added_tokens.describe()}")

    sources = Table(title="sources", title_justify="left")
    for col in ("path", "format", "rows", "usable"):
        sources.add_column(col, justify="right" if col in ("rows", "usable") else "left")
    for s in v.inputs.data.sources:
        fmt = f"{s.format} (detected)" if s.detected else s.format
        sources.add_row(s.path, fmt, str(s.rows), str(s.usable))
    console.print(sources)
    _print_dialogue_counts(v.inputs.data.sources, console)
    if v.inputs.data.eval_overlap_removed:
        console.print(f"{v.inputs.data.eval_overlap_removed} training rows also in the eval sources were removed")

    splits = Table(title="splits (token lengths)", title_justify="left")
    for col in ("split", "rows", "kept", "dropped", "truncated", "p50", "p90", "p99", "max", "tokens", "trained"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, st in v.prepared.stats.items():
        p = st.percentiles()
        share = f"{st.trained / st.tokens:.0%}" if st.tokens else "-"
        splits.add_row(name, str(st.rows), str(st.kept), str(sum(st.dropped.values())), str(st.truncated),
                       str(p[50]), str(p[90]), str(p[99]), str(p[100]), str(st.tokens), share)
    console.print(splits)
    for name, st in v.prepared.stats.items():
        for why, n in st.dropped.most_common():
            console.print(f"  {name}: {n} rows dropped: {why}")
    _print_roles(v.prepared.stats["train"], console)
    data = loaded.recipe.data
    print_hygiene(v.inputs.data.hygiene, console, dedup=data.dedup, language_filter=data.language_filter, pii=data.pii,
                  names={s.location: s.path for s in v.inputs.data.sources})
    for w in v.warnings:
        console.print(f"[yellow]warning:[/] {w}")
    for note in v.inputs.data.notes:
        console.print(f"note: {note}")


def _print_dialogue_counts(sources: list, console: Console) -> None:
    """Conversations per domain (MultiWOZ) and turns per speaker role, over the usable rows of all sources."""
    for s in sources:
        if s.left_out:
            console.print(f"{s.path}: {s.left_out} conversations left out (none of the domains asked for)")
        if s.folded:
            console.print(f"{s.path}: {s.folded} per-turn rows folded into their dialogue's last row")
    for title, key, column, unit in (("conversations by domain", "domains", "domain", "conversations"),
                                     ("turns by speaker", "speakers", "role", "turns")):
        counts = sum((getattr(s, key) for s in sources), Counter())
        if counts:
            table = Table(title=title, title_justify="left")
            table.add_column(column)
            table.add_column(unit, justify="right")
            for name, n in sorted(counts.items()):
                table.add_row(name, str(n))
            console.print(table)


def _print_roles(st: SplitStats, console: Console) -> None:
    roles = Table(title="train tokens by role", title_justify="left")
    for col in ("role", "tokens", "trained", "trained share"):
        roles.add_column(col, justify="left" if col == "role" else "right")
    for role in ("system", "user", "assistant", "template"):
        if role in st.roles:
            n, t = st.roles[role]
            roles.add_row(role, str(n), str(t), f"{t / n:.0%}" if n else "-")
    console.print(roles)


def problems_text(v: Validation) -> str:
    return first_problems(v.problems)
