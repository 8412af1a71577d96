"""`lorachat chat`: a REPL on one base and its adapters, or one answer with --prompt."""

from __future__ import annotations

import sys

import click

from .main import err_console, main, report_errors


@main.command()
@click.argument("adapters", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--base", help="Base model (hub id or folder). Default: the one the first adapter was trained on.")
@click.option("--prompt", help="Answer this one message, print only the reply, exit.")
@click.option("--adapter", "adapter", metavar="NAME",
              help="Who answers first: an adapter's name or 'base'. Default: the first adapter.")
@click.option("--route", is_flag=True, help="Start with routing on: each message picks its adapter by language "
                                             "and domain.")
@click.option("--system", help="System prompt.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(min=1), help="Longest reply.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 = greedy (the same question, the same answer).")
@click.option("--seed", type=int, help="Seed for sampling (temperature > 0).")
@click.option("--force", is_flag=True,
              help="Load adapters trained on another id or revision of a base with the same shapes (a warning).")
@report_errors
def chat(adapters, base, prompt, adapter, route, system, max_tokens, temperature, seed, force) -> None:
    """Chat with the base and ADAPTERs, loaded once; /help inside lists the commands."""
    from ..chat import ChatSession, repl
    from ..errors import LorachatError, Where
    from ..runtime import BASE, AdapterSet, Sampling

    if not adapters and not base:
        raise LorachatError("name at least one adapter directory (or --base to chat with a model alone)",
                            Where(field="ADAPTER"))
    rt = AdapterSet.open(adapters, base=base, force=force, say=err_console.out)
    names = [r.name for r in rt.adapters]
    model = adapter or (names[0] if names else BASE)
    rt.get(model)  # an unknown --adapter is one line naming what is loaded
    session = ChatSession(rt, model, Sampling(max_tokens=max_tokens, temperature=temperature, seed=seed),
                          system=system, note=err_console.out)
    if route:
        session.set_routing("on")
    if prompt is not None:
        session.ask(prompt)
        return
    err_console.out(f"chatting with {model} ({', '.join(rt.names)} loaded); /help for commands, Ctrl-D to leave")
    repl(session, _reader())


def _reader():
    """Lines from a terminal (with history and editing via readline) or from piped stdin."""
    if not sys.stdin.isatty():
        def read() -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line

        return read
    import readline  # noqa: F401 - importing it gives input() line editing

    from ..files import user_cache_dir

    history = user_cache_dir() / "chat_history"
    try:
        readline.read_history_file(history)
    except OSError:
        pass
    readline.set_history_length(1000)

    def read() -> str:
        try:
            return input("you> ")
        finally:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(history)
            except OSError:
                pass

    return read
