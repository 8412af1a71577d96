"""`lorachat eval`: the base and every adapter on the same held-out conversations, side by side.

    lorachat eval adapters/faq-en adapters/faq-sv --data other.jsonl --out eval/
    lorachat eval adapters/faq-en --model merged/faq-en        # a merged model folder beside them

Order matters and reads top to bottom in `run_eval`:
  1. plan the runtime (`SetPlan`): read each adapter's directory and recipe, resolve the base and check
     every adapter (and every `--model` folder) against it from config.json alone: a mismatch fails in
     a second, before any weights load;
  2. gather the datasets (each `--data` file, else each adapter's own eval split, re-derived from
     its recipe by the same seeded split training used) and encode them with the training masks;
  3. load the runtime (the base once, every adapter by name);
  4. per dataset: loss under the masks and greedy (or seeded) replies, rows of every model mixed in the
     same batches; replies do not depend on the batch unless `--fast` (the report records which);
     then each `--model` folder the same way, one at a time, after the runtime is released;
  5. the general set (forgetting.py): the base and each adapter on held-out chat outside every adapter's
     domain, greedy, read and encoded in step 2 so a bad `--general` file fails before weights load;
  6. the optional judge, then report.json/.md/.html and a summary in each adapter's metrics.json.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..adapters import COMPAT_KEYS, update_metrics
from ..data import Conversation
from ..data.loading import SourceReport, load_data, read_conversations
from ..encoding import encode_split
from ..errors import DataError, LorachatError, Where
from ..models import model_facts, resolve_base
from ..progress import Progress
from ..recipe import Source
from ..runtime import BASE, AdapterSet, OpenedAdapter, SetPlan
from ..templates import ChatTemplate
from . import forgetting, preference
from .generate import Decoding, generate_replies
from .judge import Judge, JudgeResult
from .loss import sample_losses
from .metrics import score
from .report import Cell, DatasetResult, ModelInfo, build_report, write_reports

LOSS_BATCH = 8


@dataclass(frozen=True)
class EvalOptions:
    adapters: tuple[Path, ...]
    data: tuple[Path, ...] = ()
    base: str | None = None  # default: the base the first adapter was trained on
    models: tuple[Path, ...] = ()  # merged model folders, each compared as a model of its own
    max_samples: int | None = None
    decoding: Decoding = field(default_factory=Decoding)
    fast: bool = False  # stock attention kernels: a little faster, replies may depend on the batch
    judge_url: str | None = None
    judge_model: str | None = None
    out: Path = Path("eval")
    seed: int = 0  # bootstrap resampling
    force: bool = False  # another base id/revision of the same shapes: a warning instead of an error
    general: Path | None = None  # the general set for the forgetting check; None: the shipped one per language
    no_general: bool = False  # skip the forgetting check
    general_rows: int = forgetting.GENERAL_ROWS
    pairs: tuple[Path, ...] = ()  # preference files for pair accuracy; default: the preference rows of the eval data


@dataclass
class _Source:
    """What one dataset is read and encoded with: an adapter's template and data settings."""

    adapter: OpenedAdapter
    template: ChatTemplate


def run_eval(options: EvalOptions, say: Callable[[str], None] = print, console: Any = None) -> dict:
    """Evaluate, write the reports into `options.out`, update each adapter's metrics; return report.json's data.

    `console` (a rich Console) shows progress: a bar in a terminal, plain timed lines elsewhere.
    """
    if bool(options.judge_url) != bool(options.judge_model):
        raise LorachatError("--judge-url and --judge-model go together", Where(field="--judge-url"))
    if options.general is not None and options.no_general:
        raise LorachatError("--general and --no-general exclude each other", Where(field="--general"))
    plan = SetPlan.make(options.adapters, base=options.base, force=options.force)
    merged = _check_merged(options.models, plan)
    tokenizer = plan.tokenizer()
    for a in plan.adapters:
        if a.loaded is None:
            raise LorachatError("no recipe.yaml: eval encodes data with the adapter's own template and data "
                                "settings, which a lorachat adapter records there", Where(a.info.path))
    sources = {a.name: _Source(a, a.template(tokenizer)) for a in plan.adapters}
    datasets, encoded = _datasets(plan.adapters, sources, options, say)
    general, general_results, general_encoded = _general(plan.adapters, sources, options, say)
    pair_sets = preference.gather(plan.adapters, sources, options.pairs, options.data, options.max_samples, say)

    rt = plan.load(tokenizer, batch_invariant=not options.fast, say=say)
    models = [ModelInfo(BASE)] + [
        ModelInfo(r.name, str(r.path), r.domain, r.language) for r in rt.adapters] + [
        ModelInfo(path.name, str(path), kind="merged") for path in merged]
    generation = {"dtype": rt.dtype, "batch_size": options.decoding.batch_size,
                  "batch_invariant": rt.batch_invariant}
    _evaluate(rt, rt.names, datasets, encoded, options.decoding, console)
    if pair_sets:
        with _progress(console, "pair accuracy", len(rt.names) * sum(2 * len(s.chosen) for s in pair_sets)) as bar:
            preference.score(rt, rt.names, pair_sets, options.seed, done=lambda n: bar.update(n))
    greedy = Decoding(max_new_tokens=min(options.decoding.max_new_tokens, forgetting.GENERAL_NEW_TOKENS),
                      batch_size=options.decoding.batch_size)
    for g, result, samples in zip(general, general_results, general_encoded):
        _evaluate(rt, [BASE, *g.members], [result], [samples], greedy, console)
    del rt  # one model in memory at a time: the merged folders are whole models
    gc.collect()
    for path in merged:
        other = AdapterSet.open(base=str(path), dtype=plan.dtype, batch_invariant=not options.fast, say=say)
        _evaluate(other, [BASE], datasets, encoded, options.decoding, console, rename={BASE: path.name})
        del other
        gc.collect()

    judge = Judge(options.judge_url, options.judge_model) if options.judge_url else None
    if judge is not None:
        _judge(judge, models, datasets, say)
    notes = []
    if merged and general:
        notes.append("merged models (--model) are not scored on the general set: see their adapter's row")
    if options.fast:
        notes += ["--fast: generation ran with the stock attention kernels, so a greedy reply may change with "
                  "--batch-size and with the other prompts in its batch; the generation metrics depend on batching"]
    base = plan.base
    meta = {"lorachat": __version__, "seed": options.seed,
            "base": {"model_id": base.model_id, "revision": base.revision, "source": base.source},
            "decoding": vars(options.decoding), "generation": generation,
            "judge": {"url": judge.url, "model": judge.model} if judge else None,
            "notes": plan.notes + plan.warnings + ([base.note] if base.note else []) + notes}
    report = build_report(models, datasets, options.seed, meta)
    if general:
        report["forgetting"] = forgetting.summarise(general, general_results, datasets, options.seed)
    if pair_sets:
        report["pairs"] = preference.summarise(pair_sets)
    forgot = {row["name"]: forgetting.card_numbers(row) for row in report.get("forgetting", {}).get("adapters", [])}
    for path in write_reports(report, Path(options.out)):
        say(f"wrote {path}")
    for adapter, row in zip(plan.adapters, report["models"][1:]):
        update_metrics(adapter.info.path, "eval", {**_card_summary(row, base.model_id), **forgot.get(row["name"], {}),
                                                     **preference.card_numbers(report, row["name"])})
    return report


def _evaluate(rt: AdapterSet, names: list[str], datasets: list[DatasetResult], encoded: list[list],
              decoding: Decoding, console: Any, rename: dict[str, str] | None = None) -> None:
    """Loss and replies of every resident in `names` on every dataset, rows of all of them in the same
    batches; results land in each dataset's cells under the model's report name."""
    rename = rename or {}
    for dataset, samples in zip(datasets, encoded):
        rows = len(names) * len(samples)
        label = f"eval {dataset.name}" + (f" ({rename[BASE]})" if BASE in rename else "")
        with _progress(console, label, 2 * rows) as progress:
            losses = sample_losses(rt, [n for n in names for _ in samples], samples * len(names), LOSS_BATCH,
                                   done=lambda n: progress.update(n, {"stage": "loss"}))
            jobs = [(n, i, p) for n in names for i, p in enumerate(dataset.prompts)]
            replies = generate_replies(rt, jobs, decoding,
                                       done=lambda n: progress.update(rows + n, {"stage": "generate"}))
        for k, name in enumerate(names):
            part = slice(k * len(samples), (k + 1) * len(samples))
            texts = replies[part]
            dataset.cells[rename.get(name, name)] = Cell(
                [n for n, _ in losses[part]], [t for _, t in losses[part]], texts,
                [score(r, ref) for r, ref in zip(texts, dataset.references)])


class _Silent:
    """Progress when no console was given (the API, tests)."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _progress(console: Any, label: str, total: int) -> Progress | _Silent:
    return Progress(console, label, total) if console is not None else _Silent()


def _judge(judge: Judge, models: list[ModelInfo], datasets: list[DatasetResult], say: Callable[[str], None]) -> None:
    failed: JudgeResult | None = None  # once failed, not asked again: an unreachable one costs a timeout
    for dataset in datasets:
        base_replies = dataset.cells[BASE].replies
        for info in models[1:]:
            cell = dataset.cells[info.name]
            if failed is not None:
                cell.judge = failed
                continue
            say(f"{dataset.name}: judging {info.name} against base")
            cell.judge = judge.compare(dataset.prompts, dataset.references, base_replies, cell.replies)
            if cell.judge.status != "ok":
                failed = JudgeResult("failed", cell.judge.reason)
                say(f"warning: judge failed ({cell.judge.reason}); every other metric is kept")


def _card_summary(row: dict, base_id: str) -> dict:
    """An adapter's row for its metrics.json: plain numbers first (the card's results table and
    model-index take top-level numbers only), intervals and the per-dataset matrix beside them."""
    flat = {"loss": row["loss"]["value"], "perplexity": row["perplexity"]["value"],
            **{k: v["value"] for k, v in row["metrics"].items()},
            f"wins_vs_base_{row['vs_base']['metric']}": row["vs_base"]["win"],
            "ties_vs_base": row["vs_base"]["tie"], "losses_vs_base": row["vs_base"]["loss"]}
    judge = row.get("judge")
    if judge and judge["status"] == "ok":
        flat["judge_win_rate"] = judge["win_rate"]["value"]
    return {"base": base_id, "samples": row["samples"], **flat,
            "ci95": {"loss": row["loss"]["ci95"], "perplexity": row["perplexity"]["ci95"],
                     **{k: v["ci95"] for k, v in row["metrics"].items()}},
            "judge": judge, "by_dataset": row["by_dataset"]}


# ---------------------------------------------------------------- 1. merged models


def _check_merged(paths: tuple[Path, ...], plan: SetPlan) -> list[Path]:
    """Each `--model` folder must be a whole model of the base's shape and vocabulary (the samples are
    encoded once, with the base's tokenizer), and its name must not clash with another model's."""
    facts = model_facts(plan.base)
    names = [BASE, *(a.name for a in plan.adapters)]
    out = []
    for path in paths:
        path = Path(path)
        where = Where(path, None, "--model")
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise LorachatError("this is an adapter, not a merged model: pass it as an ADAPTER argument", where)
        other = model_facts(resolve_base(str(path), need_weights=True))
        diffs = [f"{key} {other.get(key)} != {facts.get(key)}" for key in COMPAT_KEYS if other.get(key) != facts.get(key)]
        if diffs:
            raise LorachatError(f"not a model of the base {plan.base.model_id}: {', '.join(diffs)}", where)
        if path.name in names:
            raise LorachatError(f"the name {path.name!r} is taken by another model in this comparison; "
                                f"rename the folder", where)
        names.append(path.name)
        out.append(path)
    return out


# ---------------------------------------------------------------- 2. datasets


def _datasets(adapters: list[OpenedAdapter], sources_by_name: dict[str, _Source], options: EvalOptions,
              say: Callable[[str], None]) -> tuple[list[DatasetResult], list[list]]:
    """Datasets with prompts and references, and their samples encoded under training's masks.

    `--data` files are encoded with the first adapter's template and data settings; an adapter's
    own eval split with its own.
    """
    sources: list[tuple[str, str, str | None, list[Conversation], _Source]] = []
    if options.data:
        used: set[str] = set()
        for path in options.data:
            name = _unique(Path(path).stem, used)
            sources.append((name, str(path), None, _read_file(Path(path), "--data"), sources_by_name[adapters[0].name]))
    else:
        for adapter in adapters:
            try:
                held_out = load_data(adapter.loaded).eval
            except DataError as err:
                # recipe.yaml keeps data paths as written, relative to the original recipe's folder.
                raise DataError(f"{err.reason} (cannot re-derive this adapter's eval split; pass --data FILE)",
                                err.where) from None
            if not held_out:
                raise DataError("this adapter's recipe holds out no eval split; pass --data FILE",
                                Where(adapter.info.path, None, "data.eval"))
            sources.append((f"{adapter.info.name}:eval", "recipe.yaml data.eval", adapter.info.name,
                            held_out, sources_by_name[adapter.name]))

    results, encoded = [], []
    for name, source, home, conversations, adapter in sources:
        result, samples = _prepare(name, source, home, conversations, adapter, options.max_samples)
        for note in result.notes:
            say(f"note: {name}: {note}")
        results.append(result)
        encoded.append(samples)
    return results, encoded


def _general(adapters: list[OpenedAdapter], sources_by_name: dict[str, _Source], options: EvalOptions,
             say: Callable[[str], None]) -> tuple[list[forgetting.GeneralSet], list[DatasetResult], list[list]]:
    """The general sets (shipped, or `--general FILE`), encoded with their first adapter's template and data
    settings, as `--data` files are; none with `--no-general`."""
    if options.no_general:
        return [], [], []
    if options.general is not None:
        path = Path(options.general)
        sets = [forgetting.file_set(path, _read_file(path, "--general"), adapters, options.general_rows)]
    else:
        sets = forgetting.default_sets(adapters, options.general_rows)
    results, encoded = [], []
    for g in sets:
        result, samples = forgetting.first(*_prepare(g.name, g.source, None, g.conversations,
                                                     sources_by_name[g.members[0]], None), options.general_rows)
        g.notes += result.notes
        for note in g.notes:
            say(f"note: {g.name}: {note}")
        results.append(result)
        encoded.append(samples)
    return sets, results, encoded


def _read_file(path: Path, option: str) -> list[Conversation]:
    """Every usable conversation in a data file (any format lorachat trains on); bad rows are skipped,
    unless no row is usable, which is an error naming the first problem."""
    if not path.is_file():
        raise DataError("data file not found", Where(path, None, option))
    problems: list[DataError] = []
    source = Source(path=str(path.resolve()), format="auto")
    try:
        conversations = read_conversations(source, path.parent, SourceReport(str(path), str(path), "auto", True),
                                           problems)
    except DataError as err:  # the whole file unreadable (its type, its shape): say which option named it
        raise DataError(err.reason, Where(path, err.where.line, option)) from None
    if conversations:
        return conversations
    if problems and all("no assistant turn" in p.reason for p in problems):
        raise DataError("no conversation has an assistant reply: eval scores the last assistant reply of "
                        "each conversation against what the models generate", Where(path))
    if problems:
        raise DataError(f"no usable conversation ({len(problems)} rows refused); the first: {problems[0]}",
                        Where(path))
    raise DataError("no rows", Where(path))


def _prepare(name: str, source: str, home: str | None, conversations: list[Conversation], adapter: _Source,
             max_samples: int | None) -> tuple[DatasetResult, list]:
    notes = []
    if max_samples is not None:
        if max_samples > len(conversations):
            notes.append(f"--max-samples {max_samples} is more than the {len(conversations)} conversations "
                         f"available: using all {len(conversations)}")
        conversations = conversations[:max_samples]
    problems: list[DataError] = []
    kept, origins, prompts, references, samples = [], [], [], [], []
    for conversation in conversations:
        # One at a time so each encoded sample stays paired with its conversation (encode_split drops rows).
        encoded, _ = encode_split([conversation], adapter.template, adapter.adapter.loaded, problems=problems)
        if not encoded:
            continue
        samples.append(encoded[0])
        origins.append(str(conversation.origin))
        prompts.append(adapter.template.prompt(conversation))
        references.append(next(m.content for m in reversed(conversation.messages) if m.role == "assistant"))
        kept.append(conversation)
    dropped = len(conversations) - len(kept)
    if dropped:
        max_length = adapter.adapter.loaded.recipe.data.max_length
        notes.append(f"{dropped} conversations left out: too long (max_length {max_length}) or no trained "
                     f"tokens under the template" + (f"; e.g. {problems[0]}" if problems else ""))
    if not kept:
        raise DataError(f"no conversation left to evaluate ({'; '.join(notes)})", Where(source, None, name))
    result = DatasetResult(name, source, home, len(conversations), origins, prompts, references, notes)
    return result, samples


def _unique(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}-{n}"
    used.add(candidate)
    return candidate
