"""`lorachat serve --engine vllm`: the same adapters behind vLLM's OpenAI server, for more than one process can serve.

    lorachat serve --engine vllm adapters/faq-en adapters/faq-sv --print-command
    LORACHAT_VLLM_PYTHON=~/vllm/bin/python lorachat serve --engine vllm adapters/faq-en

vLLM lives in its own virtual environment (it pins its own torch and transformers), so lorachat never
imports it: it finds that environment's python (`--vllm-python`, else `$LORACHAT_VLLM_PYTHON`, else
`<lorachat cache>/vllm-venv/bin/python`), checks every adapter is one vLLM loads, and runs
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of the CPU build looks up a
distribution named `vllm` and fails, the module works in every build).

The check mirrors what vLLM's `PEFTHelper.validate_legal` refuses (vllm/lora/peft_helper.py, 0.32), and what
its weight loader cannot map: every problem of every adapter is collected, then reported at once, one line each.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapters import AdapterInfo, check_compatible, read_adapter
from ..errors import LorachatError, Where
from ..files import user_cache_dir
from ..models import model_facts, resolve_base

PYTHON_ENV = "LORACHAT_VLLM_PYTHON"
# The ranks vLLM compiles kernels for (`MaxLoRARanks` in vllm/config/lora.py); --max-lora-rank must be one.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# init_lora_weights values that only set the starting weights, so the saved adapter is a plain LoRA.
PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
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


def vllm_problems(adapter_dir: Path) -> list[str]:
    """What stops vLLM from loading this adapter, read from PEFT's adapter_config.json (empty: it loads)."""
    try:
        config: dict[str, Any] = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return [f"unreadable adapter_config.json: {err}"]
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA (lora.variant: dora): vLLM serves plain LoRA only; "
                        "merge it into the base with `lorachat merge` and serve that")
    extra = [m for m in config.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if extra:
        problems.append(f"modules_to_save {extra}: vLLM cannot load fully trained modules; "
                        f"train without lora.modules_to_save, or merge the adapter")
    if config.get("trainable_token_indices"):
        problems.append("trainable token rows (trainable_token_indices): vLLM cannot load them; "
                        "merge the adapter into the base")
    rank = max([int(config.get("r", 0)), *(int(r) for r in (config.get("rank_pattern") or {}).values())])
    if rank > VLLM_RANKS[-1]:
        problems.append(f"rank {rank}: vLLM serves ranks up to {VLLM_RANKS[-1]}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        problems.append("LoRA bias: vLLM does not load adapter biases")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in PLAIN_INITS:
        problems.append(f"init_lora_weights={init!r} changes the base weights when loaded; vLLM cannot do that")
    for key, what in (("layer_replication", "layer replication"), ("alora_invocation_tokens", "activated LoRA"),
                      ("use_bdlora", "block-diagonal LoRA"), ("use_qalora", "QALoRA")):
        if config.get(key):
            problems.append(f"{what} ({key}): vLLM does not support it")
    return problems


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
        raise LorachatError(f"two adapters share the name {', '.join(clash)}; rename a directory", Where(field="ADAPTER"))
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
    if options.dtype:
        argv += ["--dtype", options.dtype]
    argv += list(options.extra_args)
    env = {} if os.environ.get("VLLM_CPU_KVCACHE_SPACE") else {"VLLM_CPU_KVCACHE_SPACE": CPU_KV_CACHE_GIB}
    if options.api_key:
        env["VLLM_API_KEY"] = options.api_key  # read by vLLM's server; unlike --api-key, not shown by `ps`
    return VllmLaunch(argv, env)


def run(launch: VllmLaunch) -> int:
    """Run vLLM's server in the foreground (Ctrl-C stops it); its exit code is ours."""
    import subprocess

    try:
        return subprocess.call(launch.argv, env={**os.environ, **launch.env})
    except KeyboardInterrupt:
        return 130
