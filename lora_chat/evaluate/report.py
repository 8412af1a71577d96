"""What an eval run found, summarised with confidence intervals and written as JSON, Markdown and HTML.

`build_report` turns raw per-sample results into the `report.json` shape:
    models:   one row per model (`base` first), pooled over every dataset, plus `by_dataset`
              (the adapter x dataset matrix: transfer and forgetting read as deltas against base)
    datasets: what each dataset was, how many samples were used and why
    samples:  every prompt with its reference and each model's reply, loss and scores
All models are resampled with the same seed, so their intervals are paired over the same samples.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..files import write_text_atomic
from .judge import JudgeResult
from .metrics import METRICS, PRIMARY, win_tie_loss
from .preference import table as pairs_table
from .stats import bootstrap_mean, bootstrap_ratio

BASE = "base"
SHOWN_SAMPLES = 3  # side by side in report.md / report.html; report.json has them all


@dataclass
class Cell:
    """One model on one dataset, per sample."""

    nll: list[float]  # summed NLL over trained tokens
    tokens: list[int]  # trained tokens
    replies: list[str]
    scores: list[dict[str, float]]
    judge: JudgeResult | None = None  # adapters only, when a judge was asked


@dataclass
class DatasetResult:
    name: str
    source: str
    home: str | None  # the adapter whose own eval split this is; None for --data files
    available: int  # usable conversations in the source
    origins: list[str]
    prompts: list[str]
    references: list[str]
    notes: list[str] = field(default_factory=list)
    cells: dict[str, Cell] = field(default_factory=dict)  # model name -> results


@dataclass
class ModelInfo:
    name: str
    path: str | None = None  # adapter directory or merged model folder; None for the base
    domain: str | None = None
    language: str | None = None
    kind: str = "adapter"  # or "merged": a whole model folder (`eval --model`)


def build_report(models: list[ModelInfo], datasets: list[DatasetResult], seed: int, meta: dict) -> dict:
    rows = []
    for model in models:
        row: dict[str, Any] = {"name": model.name}
        if model.path:
            row.update(kind=model.kind, path=model.path, domain=model.domain, language=model.language)
        cells = [(d, d.cells[model.name]) for d in datasets]
        row.update(_summary(pool([c for _, c in cells]), pool([d.cells[BASE] for d in datasets]), model, seed))
        row["by_dataset"] = {d.name: _summary(c, d.cells[BASE], model, seed) for d, c in cells}
        rows.append(row)
    return {**meta, "models": rows, "datasets": [_dataset_row(d) for d in datasets],
            "samples": [s for d in datasets for s in _samples(d, models)]}


def pool(cells: list[Cell]) -> Cell:
    judges = [c.judge for c in cells if c.judge is not None]
    judge = None
    if judges:
        failed = [j for j in judges if j.status != "ok"]
        judge = failed[0] if failed else JudgeResult("ok", None, [v for j in judges for v in j.verdicts])
    return Cell([x for c in cells for x in c.nll], [x for c in cells for x in c.tokens],
                [x for c in cells for x in c.replies], [x for c in cells for x in c.scores], judge)


def _summary(cell: Cell, base: Cell, model: ModelInfo, seed: int) -> dict:
    loss = bootstrap_ratio(cell.nll, cell.tokens, seed)
    out: dict[str, Any] = {
        "samples": len(cell.nll),
        "loss": loss.as_dict(),
        "perplexity": loss.map(_safe_exp).as_dict(),
        "metrics": {m: bootstrap_mean([s[m] for s in cell.scores], seed).as_dict() for m in METRICS},
    }
    if model.name != BASE:
        base_loss = sum(base.nll) / max(1, sum(base.tokens))
        out["delta_loss"] = round(loss.value - base_loss, 4)  # > 0: worse than the base (forgetting)
        out["vs_base"] = {"metric": PRIMARY, **win_tie_loss([s[PRIMARY] for s in cell.scores],
                                                            [s[PRIMARY] for s in base.scores])}
        if cell.judge is not None:
            out["judge"] = cell.judge.summary(seed)
    return out


def _safe_exp(x: float) -> float:
    return math.exp(min(x, 700.0))  # float overflow beyond ~709; a loss that high means "no idea" anyway


def _dataset_row(d: DatasetResult) -> dict:
    return {"name": d.name, "source": d.source, "home": d.home, "samples": len(d.prompts),
            "available": d.available, "notes": d.notes}


def _samples(d: DatasetResult, models: list[ModelInfo]) -> list[dict]:
    out = []
    for i, (origin, prompt, reference) in enumerate(zip(d.origins, d.prompts, d.references)):
        sample = {"dataset": d.name, "index": i, "origin": origin, "prompt": prompt, "reference": reference,
                  "replies": {m.name: d.cells[m.name].replies[i] for m in models},
                  "loss": {m.name: round(d.cells[m.name].nll[i] / max(1, d.cells[m.name].tokens[i]), 4)
                           for m in models},
                  "scores": {m.name: {k: round(v, 2) for k, v in d.cells[m.name].scores[i].items()}
                             for m in models}}
        judged = {m.name: d.cells[m.name].judge.verdicts[i] for m in models
                  if d.cells[m.name].judge is not None and d.cells[m.name].judge.verdicts}
        if judged:
            sample["judge"] = judged
        out.append(sample)
    return out


# ---------------------------------------------------------------- writing


def write_reports(report: dict, out: Path) -> list[Path]:
    """report.json, report.md and report.html in `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"report.json": json.dumps(report, indent=2, ensure_ascii=False) + "\n",
             "report.md": to_markdown(report), "report.html": to_html(report)}
    for name, text in files.items():
        write_text_atomic(out / name, text)
    return [out / name for name in files]


def _fmt(estimate: dict, digits: int = 2) -> str:
    value, (low, high) = estimate["value"], estimate["ci95"]
    if value is None:
        return "n/a"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _judge_text(row: dict) -> str:
    judge = row.get("judge")
    if judge is None:
        return ""
    if judge["status"] != "ok":
        return "failed"
    return _fmt(judge["win_rate"], 2)


def summary_table(report: dict, intervals: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table (pooled over datasets); shared by Markdown, HTML and the CLI.

    Without `intervals` (a terminal) only the loss keeps its interval, so the table fits 80 columns.
    """
    fmt = _fmt if intervals else _value
    header = ["model", "loss", "ppl" if not intervals else "perplexity", *METRICS, "win/tie/loss", "judge"]
    rows = []
    for m in report["models"]:
        vs = m.get("vs_base")
        rows.append([m["name"], _fmt(m["loss"], 3), fmt(m["perplexity"], 1),
                     *(fmt(m["metrics"][k], 1) for k in METRICS),
                     f"{vs['win']}/{vs['tie']}/{vs['loss']}" if vs else "", _judge_text(m)])
    return header, rows


def _value(estimate: dict, digits: int) -> str:
    return "n/a" if estimate["value"] is None else f"{estimate['value']:.{digits}f}"


def matrix_table(report: dict) -> tuple[list[str], list[list[str]]]:
    """Loss per model x dataset; adapters also show the change against the base (+ = worse)."""
    names = [d["name"] for d in report["datasets"]]
    rows = []
    for m in report["models"]:
        cells = []
        for name in names:
            cell = m["by_dataset"][name]
            text = f"{cell['loss']['value']:.3f}"
            if "delta_loss" in cell:
                text += f" ({cell['delta_loss']:+.3f})"
            cells.append(text)
        rows.append([m["name"], *cells])
    return ["loss (delta vs base)", *names], rows


FORGETTING_TEXT = ("Learned: loss gain on each adapter's own data (base loss - adapter loss, nats per token; + = "
                   "better) and win rate against the base (ties count half). Forgot: loss change on general "
                   "data outside every adapter's domain (adapter - base; + = worse) and the share of general "
                   "prompts whose greedy reply is the base's, word for word. Paired bootstrap 95% intervals.")


def _signed(estimate: dict, digits: int) -> str:
    value, (low, high) = estimate["value"], estimate["ci95"]
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def forgetting_table(report: dict, intervals: bool = True) -> tuple[list[str], list[list[str]]]:
    """Learned vs forgot, one row per adapter; without `intervals` (a terminal) the agreement loses its
    interval and the losses show two decimals, so the table fits 80 columns."""
    digits = 3 if intervals else 2
    header = ["model", "own loss gain", "win rate", "general set", "general loss change", "agreement", "flag"]
    rows = []
    for a in report["forgetting"]["adapters"]:
        own, general = a["own"], a["general"]
        agreement = _fmt(general["agreement"], 2) if intervals else _value(general["agreement"], 2)
        rows.append([a["name"], _signed(own["loss_gain"], digits), f"{own['win_rate']:.2f}", a["general_set"],
                     _signed(general["loss_delta"], digits), agreement, "FORGOT" if a["forgot"] else ""])
    if not intervals:
        rows = [r[:3] + r[4:] for r in rows]
        header = header[:3] + header[4:]
    return header, rows


def forgetting_flags(report: dict) -> list[str]:
    """One line per adapter whose general loss rose beyond its 95% interval."""
    lines = []
    for a in report.get("forgetting", {}).get("adapters", []):
        if a["forgot"]:
            low, high = a["general"]["loss_delta"]["ci95"]
            lines.append(f"{a['name']} forgot: its loss on {a['general_set']} rose by "
                         f"{a['general']['loss_delta']['value']:+.3f} nats/token (95% interval [{low:+.3f}, "
                         f"{high:+.3f}], all above 0); mixing general rows into training (data.replay: 0.1) "
                         f"or a lower lr or rank forgets less")
    return lines


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


def _notes(report: dict) -> list[str]:
    notes = list(report.get("notes", []))
    for d in report["datasets"]:
        notes += [f"{d['name']}: {n}" for n in d["notes"]]
    for m in report["models"]:
        judge = m.get("judge")
        if judge and judge["status"] != "ok":
            notes.append(f"judge failed for {m['name']}: {judge['reason']}")
    for g in report.get("forgetting", {}).get("sets", []):
        notes += [f"{g['name']}: {n}" for n in g["notes"]]
    return notes


def generation_line(report: dict) -> str:
    """How the replies were generated, and whether they depend on the batch they ran in."""
    g = report.get("generation") or {}
    if not g:
        return ""
    invariant = ("batch-invariant: a greedy reply does not depend on the batch size or the other prompts"
                 if g["batch_invariant"] else
                 "NOT batch-invariant (--fast): greedy replies, and so the generation metrics, depend on batching")
    return f"Generation: {g['dtype']}, batch size {g['batch_size']}, {invariant}."


PAIRS_TEXT = ("The share of held-out preference pairs where the model gives the chosen reply a higher likelihood "
              "than the rejected one (a tie counts half), with a bootstrap 95% interval over pairs; margin: the mean "
              "log-probability of chosen minus rejected.")


def to_markdown(report: dict) -> str:
    parts = [f"# Eval: {', '.join(m['name'] for m in report['models'][1:])} vs base",
             f"Base `{report['base']['model_id']}`; {sum(d['samples'] for d in report['datasets'])} samples; "
             f"values are means with bootstrap 95% intervals; metrics 0-100; win/tie/loss on {PRIMARY} "
             f"per sample against the base. {generation_line(report)}",
             _md_table(*summary_table(report)),
             "## Per dataset", _md_table(*matrix_table(report))]
    if "pairs" in report:
        parts += ["## Pair accuracy", PAIRS_TEXT, _md_table(*pairs_table(report))]
    if "forgetting" in report:
        parts += ["## Learned vs forgot", FORGETTING_TEXT + " " + _general_sources(report),
                  _md_table(*forgetting_table(report)), *(f"**Warning:** {line}" for line in forgetting_flags(report))]
    notes = _notes(report)
    if notes:
        parts += ["## Notes", "\n".join(f"- {n}" for n in notes)]
    parts.append("## Samples")
    for s in report["samples"][:SHOWN_SAMPLES]:
        rows = [[name, reply, f"{s['loss'][name]:.3f}", f"{s['scores'][name][PRIMARY]:.1f}"]
                for name, reply in s["replies"].items()]
        parts += [f"**{s['dataset']} #{s['index']}** ({s['origin']})",
                  "```\n" + s["prompt"].replace("```", "'''") + "\n```",
                  f"Reference: {s['reference']}",
                  _md_table(["model", "reply", "loss", PRIMARY], [[c.replace("\n", " ") for c in r] for r in rows])]
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- HTML


HTML_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
              "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
              "pre{background:#f6f6f6;padding:8px;white-space:pre-wrap}img{max-width:100%}")


def html_table(header: list[str], rows: list[list[str]]) -> str:
    """A table of text cells, escaped (shared with the feedback report)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def html_page(title: str, body: str) -> str:
    """A self-contained page around `body` (already HTML), in the eval report's style."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head><body>{body}</body></html>\n")


def to_html(report: dict) -> str:
    """One self-contained page: tables, plots as base64 PNG, side-by-side samples."""
    samples = []
    for s in report["samples"][:SHOWN_SAMPLES]:
        rows = [[name, reply, f"{s['loss'][name]:.3f}", f"{s['scores'][name][PRIMARY]:.1f}"]
                for name, reply in s["replies"].items()]
        samples.append(f"<h3>{html.escape(s['dataset'])} #{s['index']}</h3><pre>{html.escape(s['prompt'])}</pre>"
                       f"<p><b>Reference:</b> {html.escape(s['reference'])}</p>"
                       + html_table(["model", "reply", "loss", PRIMARY], rows))
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in _notes(report))
    plots = "".join(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">' for alt, png in _plots(report))
    return html_page("lorachat eval",
                     f"<h1>Eval against base {html.escape(report['base']['model_id'])}</h1>"
                     f"<p>Means with bootstrap 95% intervals; metrics 0-100; win/tie/loss on {PRIMARY} per sample. "
                     f"{html.escape(generation_line(report))}</p>"
                     + html_table(*summary_table(report)) + "<h2>Per dataset</h2>"
                     + html_table(*matrix_table(report))
                     + (f"<h2>Pair accuracy</h2><p>{html.escape(PAIRS_TEXT)}</p>" + html_table(*pairs_table(report))
                        if "pairs" in report else "")
                     + (f"<h2>Learned vs forgot</h2><p>{html.escape(FORGETTING_TEXT + ' ' + _general_sources(report))}"
                        f"</p>" + html_table(*forgetting_table(report))
                        + "".join(f"<p><b>Warning:</b> {html.escape(line)}</p>" for line in forgetting_flags(report))
                        if "forgetting" in report else "")
                     + (f"<h2>Notes</h2><ul>{notes}</ul>" if notes else "")
                     + f"<h2>Plots</h2>{plots}<h2>Samples</h2>{''.join(samples)}")


def _plots(report: dict) -> list[tuple[str, str]]:
    """(alt text, base64 PNG): metric bars with 95% intervals, and per-sample loss of base vs each adapter."""
    import matplotlib

    matplotlib.use("Agg")  # no display; also safe in threads and on servers
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, (ax_ppl, ax_metrics) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [1, 3]})
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        offset = (i - (len(models) - 1) / 2) * width  # grouped bars centred on each tick
        _bars(ax_ppl, [0], [m["perplexity"]], offset, width, m["name"])
        _bars(ax_metrics, range(len(METRICS)), [m["metrics"][k] for k in METRICS], offset, width, m["name"])
    ax_ppl.set_xticks([0], ["perplexity (lower is better)"])
    ax_metrics.set_xticks(range(len(METRICS)), METRICS)
    ax_metrics.set_ylim(0, 100)
    ax_metrics.legend(fontsize="small")
    fig.tight_layout()
    out = [("metrics with 95% intervals", _png(fig, plt))]

    adapters = models[1:]
    fig, axes = plt.subplots(1, len(adapters), figsize=(4.5 * len(adapters), 4.2), squeeze=False)
    for ax, m in zip(axes[0], adapters):
        for d in report["datasets"]:
            points = [(s["loss"][BASE], s["loss"][m["name"]]) for s in report["samples"] if s["dataset"] == d["name"]]
            ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, alpha=0.7, label=d["name"])
        low, high = ax.get_xlim()
        ax.plot([low, high], [low, high], color="grey", linewidth=1)  # below the line: adapter better
        ax.set(xlabel="base loss per sample", ylabel=f"{m['name']} loss", title=m["name"])
        ax.legend(fontsize="small")
    fig.tight_layout()
    out.append(("per-sample loss, base vs adapter", _png(fig, plt)))
    if report.get("forgetting", {}).get("adapters"):
        out.append(("learned vs forgot: gain on own data against loss change on general data",
                    _forgetting_plot(report["forgetting"]["adapters"], plt)))
    return out


def _general_sources(report: dict) -> str:
    return "General data: " + "; ".join(f"{g['name']} = {g['source']}, {g['samples']} conversations"
                                        for g in report["forgetting"]["sets"]) + "."


def _forgetting_plot(adapters: list[dict], plt: Any) -> str:
    """One point per adapter with both 95% intervals, the base at the origin: right is learned, up is forgot."""
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ax.axhline(0, color="grey", linewidth=1)
    ax.axvline(0, color="grey", linewidth=1)
    ax.scatter([0], [0], marker="s", color="black", zorder=3)
    ax.annotate("base", (0, 0), textcoords="offset points", xytext=(6, -12))
    for a in adapters:
        gain, delta = a["own"]["loss_gain"], a["general"]["loss_delta"]
        if gain["value"] is None or delta["value"] is None:
            continue
        x, y = gain["value"], delta["value"]
        xerr = [[max(0.0, x - gain["ci95"][0])], [max(0.0, gain["ci95"][1] - x)]]
        yerr = [[max(0.0, y - delta["ci95"][0])], [max(0.0, delta["ci95"][1] - y)]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3, color="tab:red" if a["forgot"] else "tab:blue")
        ax.annotate(a["name"], (x, y), textcoords="offset points", xytext=(6, 6))
    ax.set(xlabel="learned: loss gain on own data (nats/token, + = better)",
           ylabel="forgot: loss change on general data (+ = worse)", title="learned vs forgot (red: forgot)")
    fig.tight_layout()
    return _png(fig, plt)


def _bars(ax: Any, xs: Any, estimates: list[dict], offset: float, width: float, label: str) -> None:
    values = [e["value"] or 0.0 for e in estimates]
    # A bound of 0 is a bound (an interval [0, 12] on exact match), only None means "no interval".
    errors = [[max(0.0, v - (v if e["ci95"][0] is None else e["ci95"][0])) for v, e in zip(values, estimates)],
              [max(0.0, (v if e["ci95"][1] is None else e["ci95"][1]) - v) for v, e in zip(values, estimates)]]
    ax.bar([x + offset for x in xs], values, width, yerr=errors, capsize=3, label=label)


def _png(fig: Any, plt: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
