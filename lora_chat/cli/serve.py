"""`lorachat serve`: an OpenAI-compatible server for one base and many adapters (or vLLM's, with --engine vllm)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from .main import err_console, main, report_errors


@main.command()
@click.argument("adapters", nargs=-1, type=click.Path(exists=True, file_okay=False))
@click.option("--base", help="Base model (hub id or folder). Default: the one the first adapter was trained on.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback exposes the models to your network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--api-key", envvar="LORACHAT_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 "
              "(or set LORACHAT_API_KEY).")
@click.option("--max-batch", type=click.IntRange(min=1), metavar="N",
              help="Most requests decoding together (any mix of adapters). Default: as many as half the free "
                   "memory holds at 4,096 tokens each, at most 64.")
@click.option("--max-queue", default=256, show_default=True, type=int,
              help="Most requests waiting for a batch slot; beyond it a request gets 429 with Retry-After. Waiting "
                   "requests hold only their prompt: the KV cache memory is bounded by --max-batch.")
@click.option("--request-timeout", default=600.0, show_default=True, type=float, metavar="SECONDS",
              help="Longest a request may take, queueing included; then 504 (an error event on a stream).")
@click.option("--drain-timeout", default=30.0, show_default=True, type=float, metavar="SECONDS",
              help="On SIGTERM/SIGINT: how long running requests get to finish (new ones get 503), then open "
                   "streams end with an error event and the server exits 0. With --engine vllm: vLLM's "
                   "--shutdown-timeout; its processes are killed 15 s after it.")
@click.option("--allow-runtime-loading", is_flag=True,
              help="Enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter.")
@click.option("--engine", type=click.Choice(["lorachat", "vllm"]), default="lorachat", show_default=True,
              help="Who serves: lorachat's runtime in this process, or vLLM's OpenAI server on the same adapters.")
@click.option("--vllm-python", metavar="PATH", help="Python of the environment vLLM is installed in "
              "(default: $LORACHAT_VLLM_PYTHON, else the lorachat cache's vllm-venv).")
@click.option("--print-command", is_flag=True, help="With --engine vllm: print vLLM's command instead of running it.")
@click.option("--force", is_flag=True,
              help="Load adapters trained on another id or revision of a base with the same shapes (a warning).")
@click.option("--record", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Store every chat exchange and the feedback given on it in DIR (append-only JSONL, shareable "
                   "by several servers); the page then shows that it records. Off by default.")
@report_errors
def serve(adapters, base, host, port, api_key, max_batch, max_queue, request_timeout, drain_timeout,
          allow_runtime_loading, engine, vllm_python,
          print_command, force, record) -> None:
    """Serve the base and ADAPTERs over the OpenAI API: the request's `model` names an adapter, the base, or auto."""
    from ..errors import LorachatError, Where
    from ..serve.app import check_limits

    check_limits(max_queue, request_timeout, drain_timeout)
    if engine == "vllm" and record is not None:
        raise LorachatError("--record is lorachat's engine's: vLLM's server does not record", Where(field="--record"))
    if engine == "vllm":
        from ..serve.vllm import VllmOptions, build_command, run

        launch = build_command(adapters, VllmOptions(host=host, port=port, api_key=api_key, base=base,
                                                     python=vllm_python, drain_timeout=drain_timeout))
        if print_command:
            click.echo(launch.shell())
            return
        err_console.out(f"starting vLLM (about 100 s on a CPU): {launch.shell()}")
        sys.exit(run(launch, drain_timeout, say=err_console.out))
    if print_command:
        raise LorachatError("--print-command prints vLLM's command: add --engine vllm", Where(field="--print-command"))
    if record is not None:
        from ..feedback.store import check_writable

        check_writable(record)  # before the weights load: a folder we cannot write to fails in a second
        err_console.out(f"recording every exchange and its feedback in {record}")
    if not adapters and not base:
        raise LorachatError("name at least one adapter directory (or --base to serve a model alone)",
                            Where(field="ADAPTER"))
    from ..serve.app import ServeOptions
    from ..serve.app import serve as run_server

    # Routing decisions and request failures, one line each, on stderr beside uvicorn's own.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("lora_chat.route", "lora_chat.serve"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    options = ServeOptions(host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                           request_timeout=request_timeout, drain_timeout=drain_timeout,
                           allow_runtime_loading=allow_runtime_loading, record=record)
    run_server(adapters, options, base=base, force=force, say=err_console.out)
    # Drained and stopped: the lifespan closed every file. The interpreter's own teardown then spends seconds
    # garbage-collecting the model's objects (5 s measured on 2 busy cores), past what a process manager
    # allows after SIGTERM (the drain timeout + 5 s), so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
