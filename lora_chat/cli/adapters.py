"""`lorachat adapters list|show|verify|pack|unpack|push|pull`: look at, check and move adapters."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import click

from .main import console, err_console, main, report_errors

DEFAULT_DIR = "adapters"  # where finetune's recipes put adapters, relative to the working folder


def _adapter_path(name_or_path: str) -> Path:
    """NAME (a folder under ./adapters) or a PATH to an adapter folder."""
    from ..errors import LorachatError, Where

    path = Path(name_or_path)
    if path.is_dir():
        return path
    named = Path(DEFAULT_DIR) / name_or_path
    if "/" not in name_or_path and named.is_dir():
        return named
    raise LorachatError(f"no such adapter (neither a folder nor a name under {DEFAULT_DIR}/)", Where(name_or_path))


def _size_bytes(ctx: click.Context, param: click.Parameter, value: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", value, re.IGNORECASE)
    if not match:
        raise click.BadParameter(f"{value!r}: expected a size such as 500M or 20G")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _say(line: str) -> None:
    err_console.out(line)


@main.group()
def adapters() -> None:
    """List, inspect, verify, pack/unpack and push/pull adapters."""


@adapters.command(name="list")
@click.argument("folder", default=DEFAULT_DIR, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON array of adapters, for scripts.")
@report_errors
def list_(folder: str, as_json: bool) -> None:
    """Adapters under FOLDER (default ./adapters): base, domain, language, variant, size, when, eval loss."""
    from rich.table import Table

    from ..adapters.inspect import find_adapters, summarize

    summaries = [summarize(path) for path in find_adapters(folder)]
    if as_json:
        click.echo(json.dumps([s.to_json() for s in summaries], indent=2))
        return
    table = Table(title=f"{len(summaries)} adapter(s) in {folder}")
    table.add_column("name", no_wrap=True)
    for header in ("base", "domain", "lang"):
        table.add_column(header)
    for header in ("variant", "size", "trained"):
        table.add_column(header, no_wrap=True)
    table.add_column("eval loss")
    for s in summaries:
        loss = "" if s.eval_loss is None else f"{s.eval_loss:.3f}"
        if s.base_eval_loss is not None:
            loss += f" (base {s.base_eval_loss:.3f})"
        elif s.vs_base:
            loss += f" (w/t/l {s.vs_base})"
        base = f"…/{Path(s.base).name}" if s.base and Path(s.base).is_absolute() else s.base  # a local folder
        table.add_row(s.name + ("" if s.has_manifest else " [yellow](no manifest)[/]"), base or "?",
                      s.domain or "", s.language or "", f"{s.variant} r{s.rank}", _human(s.size_bytes),
                      (s.trained or "")[:10], loss)
    console.print(table)


@adapters.command()
@click.argument("adapter")
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON object.")
@report_errors
def show(adapter: str, as_json: bool) -> None:
    """The card and manifest of ADAPTER (a name under ./adapters or a path), and which runtimes can load it."""
    from ..adapters.inspect import details

    facts = details(_adapter_path(adapter))
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    s, base = facts["summary"], facts["base"]
    console.print(f"[bold]{s['name']}[/]  {s['path']}" + ("" if s["has_manifest"] else "  [yellow](no manifest)[/]"))
    console.print(f"base       {base.get('model_id')} @ {base.get('revision')}  "
                  f"{base.get('architecture') or ''} {_shape(base)}".rstrip())
    console.print(f"adapter    {s['variant']} r={facts['lora']['r']} alpha={facts['lora']['lora_alpha']}  "
                  f"targets {_targets(facts['lora']['target_modules'])}  {_human(s['size_bytes'])}")
    console.print(f"domain     {s['domain'] or '-'}   language {s['language'] or '-'}   template "
                  f"{facts['template'] or '-'}   trained {s['trained'] or '-'}")
    for source in facts["data"]:
        console.print(f"data       {source.get('path')} ({source.get('format')}, {source.get('rows')} rows, "
                      f"licence {source.get('license') or 'unknown'}) sha256 {str(source.get('sha256'))[:16]}…")
    for section, values in facts["metrics"].items():
        if isinstance(values, dict):
            numbers = ", ".join(f"{k} {v:.4g}" for k, v in values.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool))
            console.print(f"{section:<10} {numbers}")
    if facts["versions"]:
        console.print("versions   " + ", ".join(f"{k} {v}" for k, v in facts["versions"].items()))
    for runtime in facts["runtimes"]:
        mark = "[green]yes[/]" if runtime["loads"] else "[red]no[/] "
        console.print(f"{runtime['name']:<10} {mark} {runtime['reason']}")
    console.print(f"files      {len(facts['files'])} listed in manifest.json (check: lorachat adapters verify)")
    if facts["recipe"]:
        console.print("\n[bold]recipe.yaml[/]")
        console.out(facts["recipe"].rstrip())


def _targets(modules: list[str] | str | None) -> str:
    """PEFT saves `all-linear` expanded to every module path: show the kinds and the count."""
    if not isinstance(modules, list):
        return str(modules)
    kinds = sorted({m.rsplit(".", 1)[-1] for m in modules})
    return f"{', '.join(kinds)} ({len(modules)} modules)"


def _shape(base: dict) -> str:
    keys = ("hidden_size", "num_hidden_layers", "vocab_size")
    return ", ".join(f"{k} {base[k]}" for k in keys if base.get(k) is not None)


@adapters.command()
@click.argument("adapter")
@report_errors
def verify(adapter: str) -> None:
    """Every file's sha256 against manifest.json. Exit 0 only when whole; each changed, missing or extra file named."""
    from ..adapters import read_adapter, verify as run_verify

    path = _adapter_path(adapter)
    problems = run_verify(path)
    for problem in problems:
        err_console.out(f"error: {problem}")
    if problems:
        sys.exit(1)
    console.print(f"[green]whole[/]: {len(read_adapter(path).manifest.get('files', {}))} files match manifest.json")


@adapters.command()
@click.argument("adapter")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="The archive to write (.tar.gz).")
@report_errors
def pack(adapter: str, out: str) -> None:
    """ADAPTER as one deterministic .tar.gz (same adapter, same bytes), checked against its manifest."""
    from ..adapters.archive import pack as run_pack

    path = run_pack(_adapter_path(adapter), out)
    console.print(f"packed {path} ({_human(path.stat().st_size)})")


@adapters.command()
@click.argument("archive", type=click.Path(dir_okay=False))
@click.option("--to", "to", default=DEFAULT_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder to install the adapter under.")
@click.option("--overwrite", is_flag=True, help="Replace an adapter of the same name (kept otherwise).")
@click.option("--max-size", default="20G", show_default=True, callback=_size_bytes,
              help="Refuse an archive that expands past this (decompression bombs).")
@report_errors
def unpack(archive: str, to: str, overwrite: bool, max_size: int) -> None:
    """Check ARCHIVE entry by entry and against its manifest, then install it; a refused archive installs nothing."""
    from ..adapters.archive import unpack as run_unpack

    result = run_unpack(archive, to, overwrite=overwrite, max_bytes=max_size)
    console.print(f"installed {result.path} ({result.files} files, {_human(result.bytes)}, verified)")


@adapters.command()
@click.argument("adapter")
@click.option("--repo", required=True, help="USER/NAME on the Hugging Face hub (created if missing).")
@click.option("--private", is_flag=True, help="Create the repo private.")
@click.option("--revision", help="Branch to push to (created if missing). Default: main.")
@report_errors
def push(adapter: str, repo: str, private: bool, revision: str | None) -> None:
    """Upload a whole ADAPTER with its hub model card; the token comes from HF_TOKEN or `hf auth login`."""
    from ..adapters.hub import push as run_push

    url = run_push(_adapter_path(adapter), repo, private=private, revision=revision, say=_say)
    console.print(f"pushed: {url}")


@adapters.command()
@click.argument("repo")
@click.option("--to", "to", default=DEFAULT_DIR, show_default=True, type=click.Path(file_okay=False),
              help="Folder to install the adapter under (as NAME).")
@click.option("--overwrite", is_flag=True, help="Replace an adapter of the same name (kept otherwise).")
@click.option("--allow-pickle", is_flag=True, help="Also download .bin/.pt/.pkl weights (they can run code).")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds to wait for the hub on each request.")
@report_errors
def pull(repo: str, to: str, overwrite: bool, allow_pickle: bool, timeout: float) -> None:
    """Download USER/NAME[@REVISION]: safetensors and text only, verified, installed atomically."""
    from ..adapters.hub import pull as run_pull

    result = run_pull(repo, to, overwrite=overwrite, allow_pickle=allow_pickle, timeout=timeout, say=_say)
    for warning in result.warnings:
        err_console.out(f"warning: {warning}")
    console.print(f"installed {result.path} ({result.files} files, revision {result.revision[:12]}, verified)")
