"""`lorachat serve --engine vllm`: the same adapters behind vLLM's OpenAI server, for more than one process can serve.

    lorachat serve --engine vllm adapters/faq-en adapters/faq-sv --print-command
    LORACHAT_VLLM_PYTHON=~/vllm/bin/python lorachat serve --engine vllm adapters/faq-en

vLLM lives in its own virtual environment (it pins its own torch and transformers), so lorachat never
imports it: it finds that environment's python (`--vllm-python`, else `$LORACHAT_VLLM_PYTHON`, else
`<lorachat cache>/vllm-venv/bin/python`), checks every adapter is one vLLM loads, and runs
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of the CPU build looks up a
distribution named `vllm` and fails, the module works in every build) as a process group that stops with
lorachat (serve/supervise.py: SIGTERM drains it, a lorachat killed with SIGKILL takes it down too).

The check mirrors what vLLM's `PEFTHelper.validate_legal` refuses (vllm/lora/peft_helper.py, 0.32), and what
its weight loader cannot map: every problem of every adapter is collected, then reported at once, one line each.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters import AdapterInfo, check_compatible, read_adapter
from ..adapters.compat import VLLM_RANKS, vllm_problems
from ..errors import LorachatError, Where
from ..files import user_cache_dir
from ..models import model_facts, resolve_base
from .supervise import supervise

PYTHON_ENV = "LORACHAT_VLLM_PYTHON"
# vLLM's KV cache on CPU is sized by this (GiB); its default (4) is more than a small CPU box spares.
CPU_KV_CACHE_GIB = "1"


@dataclass
class VllmOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    base: str | None = None
    python: str | None = None
    dtype: str | None = None
    drain_timeout: float = 30.0  # on SIGTERM: how long vLLM may finish running requests (--shutdown-timeout)
    extra_args: Sequence[str] = field(default_factory=tuple)


def default_python() -> Path:
    return user_cache_dir() / "vllm-venv" / "bin" / "python"


def find_python(flag: str | None) -> Path:
    """The python of the vLLM environment; one line saying how to name it when there is none."""
    if flag:
        chosen, where = Path(flag).expanduser(), Where(field="--vllm-python")
    elif os.environ.get(PYTHON_ENV):
        chosen, where = Path(os.environ[PYTHON_ENV]).expanduser(), Where(field=PYTHON_ENV)
    else:
        chosen = default_python()
        if not chosen.is_file():
            raise LorachatError(f"no vLLM environment found: install vLLM into a virtual environment of its own "
                                f"(README: 'Serving with vLLM') and name its python with --vllm-python or "
                                f"{PYTHON_ENV} (looked for {chosen})", Where(field="--engine vllm"))
        return chosen
    if not chosen.is_file() or not os.access(chosen, os.X_OK):
        raise LorachatError(f"{chosen} is not an executable python", where)
    return chosen


def max_lora_rank(adapter_dirs: Sequence[Path]) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that fits every adapter."""
    ranks = []
    for d in adapter_dirs:
        config = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
        ranks += [int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    return next(r for r in VLLM_RANKS if r >= max(ranks))


@dataclass(frozen=True)
class VllmLaunch:
    argv: list[str]
    env: dict[str, str]  # what the command adds to the environment

    def shell(self) -> str:
        """The command as one line a user can paste."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), *map(shlex.quote, self.argv)])


def build_command(adapter_paths: Sequence[str | Path], options: VllmOptions) -> VllmLaunch:
    """Check the adapters (against their base, then against vLLM) and build vLLM's server command."""
    infos: list[AdapterInfo] = [read_adapter(p) for p in adapter_paths]
    if not infos:
        raise LorachatError("name at least one adapter to serve with vLLM", Where(field="ADAPTER"))
    names = [i.name for i in infos]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise LorachatError(f"two adapters share the name {', '.join(clash)}; rename a directory",
                            Where(field="ADAPTER"))
    model_id = options.base or infos[0].base_model
    base = resolve_base(model_id, need_weights=True)
    facts = model_facts(base)
    problems = []
    for info in infos:
        try:
            check_compatible(info, facts)
        except LorachatError as err:
            problems.append(str(err))
        problems += [f"{info.path}: vLLM cannot load it: {p}" for p in vllm_problems(info.path)]
    if problems:
        raise LorachatError("\n".join(problems))
    python = find_python(options.python)
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(base.path), "--served-model-name", model_id,
            "--host", options.host, "--port", str(options.port),
            "--enable-lora", "--max-loras", str(len(infos)),
            "--max-lora-rank", str(max_lora_rank([i.path for i in infos])),
            "--lora-modules", *(f"{i.name}={i.path.resolve()}" for i in infos)]
    # vLLM's default (0) aborts running requests on SIGTERM; a whole number of seconds makes it drain.
    argv += ["--shutdown-timeout", str(math.ceil(options.drain_timeout))]
    if options.dtype:
        argv += ["--dtype", options.dtype]
    argv += list(options.extra_args)
    env = {} if os.environ.get("VLLM_CPU_KVCACHE_SPACE") else {"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB}
    if options.api_key:
        env["VLLM_API_KEY"] = options.api_key  # read by vLLM's server; unlike --api-key, not shown by `ps`
    return VllmLaunch(argv, env)


def run(launch: VllmLaunch, drain_timeout: float, say: Callable[[str], None]) -> int:
    """Run vLLM's server in the foreground until SIGTERM/SIGINT (exit 0, vLLM and every process it started gone)
    or until it dies (its exit code, after its last lines)."""
    return supervise(launch.argv, {**os.environ, **launch.env}, drain_timeout=drain_timeout, name="vLLM", say=say)
