"""`lorachat eval`: the base and every adapter on the same held-out conversations, side by side.

    lorachat eval adapters/faq-en adapters/faq-sv --data other.jsonl --out eval/

Order matters and reads top to bottom in `run_eval`:
  1. read each adapter's directory and recipe, resolve the base and check every adapter was
     trained on it (from config.json alone: a mismatch fails in a second, before any weights load);
  2. gather the datasets (each `--data` file, else each adapter's own eval split, re-derived from
     its recipe by the same seeded split training used) and encode them with the training masks;
  3. load the base once and attach every adapter by name (PEFT), so switching is a pointer swap;
  4. per dataset and model: loss under the masks, then batched generation and text metrics;
  5. the optional judge, then report.json/.md/.html and a summary in each adapter's metrics.json.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..adapters import AdapterInfo, check_compatible, read_adapter, update_metrics
from ..data import Conversation
from ..data.loading import SourceReport, load_data, read_conversations
from ..encoding import encode_split
from ..errors import DataError, LorachatError, Where
from ..models import ResolvedBase, load_model, load_tokenizer, model_facts, resolve_base
from ..recipe import LoadedRecipe, Source, load_recipe
from ..templates import ChatTemplate, load_template
from .generate import Decoding, generate_batched
from .judge import Judge, JudgeResult
from .loss import sample_losses
from .metrics import score
from .report import BASE, Cell, DatasetResult, ModelInfo, build_report, write_reports


LOSS_BATCH = 8


@dataclass(frozen=True)
class EvalOptions:
    adapters: tuple[Path, ...]
    data: tuple[Path, ...] = ()
    base: str | None = None  # default: the base the first adapter was trained on
    max_samples: int | None = None
    decoding: Decoding = field(default_factory=Decoding)
    judge_url: str | None = None
    judge_model: str | None = None
    out: Path = Path("eval")
    seed: int = 0  # bootstrap resampling
    force: bool = False  # another base id/revision of the same shapes: a warning instead of an error


@dataclass
class _Adapter:
    info: AdapterInfo
    loaded: LoadedRecipe
    template: ChatTemplate | None = None
    peft_name: str = ""  # PEFT module keys cannot hold '.', so adapters are attached as a0, a1, ...


def run_eval(options: EvalOptions, say: Callable[[str], None] = print) -> dict:
    """Evaluate, write the reports into `options.out`, update each adapter's metrics; return report.json's data."""
    if bool(options.judge_url) != bool(options.judge_model):
        raise LorachatError("--judge-url and --judge-model go together", Where(field="--judge-url"))
    adapters = [_open_adapter(Path(p), i) for i, p in enumerate(options.adapters)]
    base = _resolve_and_check(options.base or adapters[0].info.base_model, adapters, options.force, say)
    if base.note:
        say(f"note: {base.note}")
    tokenizer = load_tokenizer(base)
    for adapter in adapters:
        adapter.template = _template_of(adapter, tokenizer)
    datasets, encoded = _datasets(adapters, options, say)

    model = _load_with_adapters(base, adapters)
    models = [ModelInfo(BASE)] + [
        ModelInfo(a.info.name, str(a.info.path), a.loaded.recipe.output.domain, a.loaded.recipe.output.language)
        for a in adapters]
    switch = {BASE: None, **{a.info.name: a.peft_name for a in adapters}}
    judge = Judge(options.judge_url, options.judge_model) if options.judge_url else None
    judge_failed: JudgeResult | None = None  # once failed, not asked again: an unreachable one costs a timeout
    for dataset, samples in zip(datasets, encoded):
        for info in models:
            say(f"{dataset.name}: {info.name} on {len(samples)} samples")
            with _active(model, switch[info.name]):
                losses = sample_losses(model, samples, tokenizer.pad_token_id, LOSS_BATCH)
                replies = generate_batched(model, tokenizer, dataset.prompts, options.decoding)
            dataset.cells[info.name] = Cell([n for n, _ in losses], [t for _, t in losses], replies,
                                            [score(r, ref) for r, ref in zip(replies, dataset.references)])
        if judge is not None:
            base_replies = dataset.cells[BASE].replies
            for info in models[1:]:
                cell = dataset.cells[info.name]
                if judge_failed is not None:
                    cell.judge = judge_failed
                    continue
                say(f"{dataset.name}: judging {info.name} against base")
                cell.judge = judge.compare(dataset.prompts, dataset.references, base_replies, cell.replies)
                if cell.judge.status != "ok":
                    judge_failed = JudgeResult("failed", cell.judge.reason)
                    say(f"warning: judge failed ({cell.judge.reason}); every other metric is kept")

    meta = {"lorachat": __version__, "seed": options.seed,
            "base": {"model_id": base.model_id, "revision": base.revision, "source": base.source},
            "decoding": vars(options.decoding),
            "judge": {"url": judge.url, "model": judge.model} if judge else None,
            "notes": [base.note] if base.note else []}
    report = build_report(models, datasets, options.seed, meta)
    for path in write_reports(report, Path(options.out)):
        say(f"wrote {path}")
    for adapter, row in zip(adapters, report["models"][1:]):
        update_metrics(adapter.info.path, "eval", _card_summary(row, base))
    return report


def _card_summary(row: dict, base: ResolvedBase) -> dict:
    """An adapter's row for its metrics.json: plain numbers first (the card's results table and
    model-index take top-level numbers only), intervals and the per-dataset matrix beside them."""
    flat = {"loss": row["loss"]["value"], "perplexity": row["perplexity"]["value"],
            **{k: v["value"] for k, v in row["metrics"].items()},
            f"wins_vs_base_{row['vs_base']['metric']}": row["vs_base"]["win"],
            "ties_vs_base": row["vs_base"]["tie"], "losses_vs_base": row["vs_base"]["loss"]}
    judge = row.get("judge")
    if judge and judge["status"] == "ok":
        flat["judge_win_rate"] = judge["win_rate"]["value"]
    return {"base": base.model_id, "samples": row["samples"], **flat,
            "ci95": {"loss": row["loss"]["ci95"], "perplexity": row["perplexity"]["ci95"],
                     **{k: v["ci95"] for k, v in row["metrics"].items()}},
            "judge": judge, "by_dataset": row["by_dataset"]}


# ---------------------------------------------------------------- 1. adapters and base


def _open_adapter(path: Path, index: int) -> _Adapter:
    info = read_adapter(path)
    recipe_path = Path(info.path) / "recipe.yaml"
    return _Adapter(info, load_recipe(recipe_path), peft_name=f"a{index}")


def _resolve_and_check(model: str, adapters: list[_Adapter], force: bool,
                       say: Callable[[str], None]) -> ResolvedBase:
    """The base on disk, and every adapter checked against its config.json before weights load."""
    # Config and tokenizer first: for the bundled model, exporting the weights alone takes ~20 s.
    light = resolve_base(model, need_weights=False)
    facts = model_facts(light)
    for adapter in adapters:
        for warning in check_compatible(adapter.info, facts, base=light, force=force):
            say(f"warning: {warning}")
    names = [a.info.name for a in adapters]
    clash = {n for n in names if names.count(n) > 1 or n == BASE}
    if clash:
        raise LorachatError(f"adapter names must be unique and not '{BASE}': rename the directory "
                            f"{', '.join(sorted(clash))}", Where(field="ADAPTER"))
    return resolve_base(model, need_weights=True)


def _template_of(adapter: _Adapter, tokenizer: Any) -> ChatTemplate:
    """The exact template the adapter was trained with (its chat_template.jinja), else its recipe's."""
    saved = Path(adapter.info.path) / "chat_template.jinja"
    if saved.is_file():
        return ChatTemplate(saved.read_text(encoding="utf-8"), tokenizer, f"{adapter.info.name}/{saved.name}",
                            adapter.loaded.recipe.template.system)
    return load_template(adapter.loaded, tokenizer)


# ---------------------------------------------------------------- 2. datasets


def _datasets(adapters: list[_Adapter], options: EvalOptions,
              say: Callable[[str], None]) -> tuple[list[DatasetResult], list[list]]:
    """Datasets with prompts and references, and their samples encoded under training's masks.

    `--data` files are encoded with the first adapter's template and data settings; an adapter's
    own eval split with its own.
    """
    sources: list[tuple[str, str, str | None, list[Conversation], _Adapter]] = []
    if options.data:
        used: set[str] = set()
        for path in options.data:
            name = _unique(Path(path).stem, used)
            sources.append((name, str(path), None, _read_file(Path(path)), adapters[0]))
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
                            held_out, adapter))

    results, encoded = [], []
    for name, source, home, conversations, adapter in sources:
        result, samples = _prepare(name, source, home, conversations, adapter, options.max_samples)
        for note in result.notes:
            say(f"note: {name}: {note}")
        results.append(result)
        encoded.append(samples)
    return results, encoded


def _read_file(path: Path) -> list[Conversation]:
    """Every usable conversation in a data file (any format lorachat trains on); bad rows are skipped,
    unless no row is usable, which is an error naming the first problem."""
    if not path.is_file():
        raise DataError("data file not found", Where(path, None, "--data"))
    problems: list[DataError] = []
    source = Source(path=str(path.resolve()), format="auto")
    conversations = read_conversations(source, path.parent, SourceReport(str(path), str(path), "auto", True), problems)
    if conversations:
        return conversations
    if problems and all("no assistant turn" in p.reason for p in problems):
        raise DataError("no conversation has an assistant reply: eval scores the last assistant reply of "
                        "each conversation against what the models generate", Where(path))
    if problems:
        raise DataError(f"no usable conversation ({len(problems)} rows refused); the first: {problems[0]}",
                        Where(path))
    raise DataError("no rows", Where(path))


def _prepare(name: str, source: str, home: str | None, conversations: list[Conversation], adapter: _Adapter,
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
        encoded, _ = encode_split([conversation], adapter.template, adapter.loaded, problems=problems)
        if not encoded:
            continue
        samples.append(encoded[0])
        origins.append(str(conversation.origin))
        prompts.append(adapter.template.prompt(conversation))
        references.append(next(m.content for m in reversed(conversation.messages) if m.role == "assistant"))
        kept.append(conversation)
    dropped = len(conversations) - len(kept)
    if dropped:
        max_length = adapter.loaded.recipe.data.max_length
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


# ---------------------------------------------------------------- 3. one base, many adapters


def _load_with_adapters(base: ResolvedBase, adapters: list[_Adapter]) -> Any:
    from peft import PeftModel

    first = adapters[0].loaded.recipe.base
    model = load_model(base, dtype=first.dtype, quantization=first.quantization, for_training=False)
    peft = PeftModel.from_pretrained(model, str(adapters[0].info.path), adapter_name=adapters[0].peft_name)
    for adapter in adapters[1:]:
        peft.load_adapter(str(adapter.info.path), adapter_name=adapter.peft_name)
    peft.eval()
    return peft


@contextlib.contextmanager
def _active(model: Any, peft_name: str | None) -> Iterator[None]:
    """Run the base (every adapter off) or exactly one adapter, without reloading anything."""
    if peft_name is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(peft_name)
        yield

