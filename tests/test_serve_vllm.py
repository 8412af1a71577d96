"""`lorachat serve --engine vllm`: the adapter check, the command, and (marked `vllm`) the real vLLM CPU server.

The marked tests run `lorachat serve --engine vllm` on vLLM's CPU build (`$LORACHAT_VLLM_PYTHON`, else the
environment scripts/vllm-env.sh makes once per machine and reuses), started once for all of them (about 100 s on a
CPU); without an environment they fail saying why, never skip.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter_factory import quickstart_adapter, tiny_adapters
from lora_chat.cli import main
from lora_chat.serve.vllm import vllm_problems
from process_groups import members, wait_until

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = {  # adapter_config.json edits -> does vLLM load it?
    "plain": ({}, True),
    "dora": ({"use_dora": True}, False),
    "saves-head": ({"modules_to_save": ["lm_head"]}, False),
    "token-rows": ({"trainable_token_indices": [1, 2]}, False),
    "rank-1024": ({"r": 1024}, False),
}


def variant(src: Path, root: Path, name: str) -> Path:
    out = root / name
    shutil.copytree(src, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(VARIANTS[name][0])
    (out / "adapter_config.json").write_text(json.dumps(config))
    if name == "token-rows":  # and the tensor PEFT saves for trainable token rows, which vLLM's loader meets
        from safetensors.torch import load_file, save_file

        weights = load_file(out / "adapter_model.safetensors")
        hidden = next(w for k, w in weights.items() if "lora_A" in k).shape[1]
        weights["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = \
            next(iter(weights.values())).new_zeros((2, hidden))
        save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return tiny_adapters(tmp_path_factory)


def test_the_check_refuses_what_vllm_cannot_load_and_says_why(adapters, tmp_path):
    for name, (_, loads) in VARIANTS.items():
        problems = vllm_problems(variant(adapters[1], tmp_path, name))
        assert (problems == []) == loads, (name, problems)
    assert "DoRA" in vllm_problems(tmp_path / "dora")[0]
    assert "modules_to_save ['lm_head']" in vllm_problems(tmp_path / "saves-head")[0]


def test_print_command_shows_vllms_server_on_the_same_adapters(adapters):
    _, en, sv = adapters
    result = CliRunner().invoke(main, ["serve", "--engine", "vllm", str(en), str(sv), "--port", "8123",
                                       "--vllm-python", sys.executable, "--print-command"])
    assert result.exit_code == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith(f"VLLM_CPU_KVCACHE_SPACE=1 {sys.executable} -m vllm.entrypoints.openai.api_server ")
    assert f"--lora-modules faq-en={en.resolve()} talk-sv={sv.resolve()}" in line
    assert "--enable-lora --max-loras 2 --max-lora-rank 8" in line and "--port 8123" in line


def test_an_adapter_vllm_cannot_load_is_refused_before_starting(adapters, tmp_path):
    dora = variant(adapters[1], tmp_path, "dora")
    result = CliRunner().invoke(main, ["serve", "--engine", "vllm", str(dora), "--vllm-python", sys.executable,
                                       "--print-command"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (f"error: {dora}: vLLM cannot load it: DoRA (lora.variant: dora): vLLM serves "
                                     f"plain LoRA only; merge it into the base with `lorachat merge` and serve that")


def test_no_vllm_environment_is_one_line_saying_how_to_name_one(adapters, tmp_path, monkeypatch):
    monkeypatch.delenv("LORACHAT_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("LORACHAT_CACHE", str(tmp_path))
    result = CliRunner().invoke(main, ["serve", "--engine", "vllm", str(adapters[1]), "--print-command"])
    assert result.exit_code == 2
    assert "no vLLM environment found" in result.stderr and "--vllm-python" in result.stderr


# ---------------------------------------------------------------- the real vLLM server


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM CPU environment's python: the one named, else the one scripts/vllm-env.sh makes (or made before).

    Never a skip: a vLLM path nobody runs breaks unseen. Leave these tests out on purpose with -m 'not vllm'."""
    failed = os.environ.get("LORACHAT_VLLM_ENV_FAILED")  # scripts/test.sh tried and saved what went wrong
    if failed:
        pytest.fail(f"scripts/vllm-env.sh could not make the vLLM CPU environment; its last lines:\n"
                    + "\n".join(Path(failed).read_text(errors="replace").splitlines()[-15:]), pytrace=False)
    if os.environ.get("LORACHAT_VLLM_PYTHON"):
        named = Path(os.environ["LORACHAT_VLLM_PYTHON"])
        if not named.is_file():
            pytest.fail(f"LORACHAT_VLLM_PYTHON names {named}, which does not exist", pytrace=False)
        return named
    made = subprocess.run(["bash", str(ROOT / "scripts" / "vllm-env.sh")], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.fail(f"scripts/vllm-env.sh could not make the vLLM CPU environment:\n{made.stderr[-3000:]}",
                    pytrace=False)
    return Path(made.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm_adapter(tmp_path_factory) -> Path:
    """The quickstart adapter (a few steps on the bundled SmolLM2, enough to change greedy replies)."""
    return quickstart_adapter(tmp_path_factory)


@dataclass
class Serving:
    """`lorachat serve --engine vllm` running (as an operator starts it)."""
    process: subprocess.Popen
    args: list[str]
    log: Path
    client: object
    pgid: int | None = None  # vLLM's process group: its API server's pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def vllm_pid(self) -> int:
        """The API server: lorachat's one child."""
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def vllm_argv(self) -> list[str]:
        return Path(f"/proc/{self.vllm_pid()}/cmdline").read_bytes().decode().split("\0")[:-1]

    def stop_now(self) -> None:
        """Whatever a failed test left must not outlive the session: lorachat killed, vLLM's group a minute on."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.pgid is not None and members(self.pgid, zombies=False):
            with contextlib.suppress(AssertionError):
                wait_until(lambda: members(self.pgid, zombies=False) == [], 60, "")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)


def start_serving(adapter: Path, vllm_python: Path, log: Path) -> Serving:
    """`lorachat serve --engine vllm ADAPTER` as a process, returned once vLLM answers on its port."""
    import openai

    port = _free_port()
    args = ["serve", "--engine", "vllm", str(adapter), "--port", str(port), "--vllm-python", str(vllm_python)]
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lora_chat.cli", *args], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                  "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    serving = Serving(process, args, log, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                                        max_retries=0, timeout=300))
    deadline = time.monotonic() + 900
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            serving.stop_now()
            pytest.fail(f"vLLM did not start in 15 minutes or exited: {serving.output()[-3000:]}")
        try:
            serving.client.models.list()
            serving.pgid = serving.vllm_pid()
            return serving
        except openai.APIConnectionError:
            time.sleep(2)


@pytest.fixture(scope="module")
def served(vllm_python, smollm_adapter, tmp_path_factory):
    serving = start_serving(smollm_adapter, vllm_python, tmp_path_factory.mktemp("vllm-log") / "serve.log")
    yield serving
    serving.stop_now()  # if a test failed before the SIGTERM one


@pytest.mark.vllm
@pytest.mark.real_model
def test_vllm_serves_the_adapter_with_lorachats_greedy_first_tokens(served, smollm_adapter):
    from lora_chat.runtime import AdapterSet, Request, Sampling, generate

    name = smollm_adapter.name  # construction-faq-en
    models = {m.id: m for m in served.client.models.list().data}
    argv = served.vllm_argv()
    assert models[name].parent == argv[argv.index("--served-model-name") + 1]
    questions = ["What is a building permit?", "How long does it take to get a permit?",
                 "Who is responsible for the control plan?"]
    theirs = [served.client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}],
                                                    max_tokens=4, temperature=0).choices[0].message.content
              for q in questions]
    rt = AdapterSet.open([smollm_adapter])
    ours = generate(rt, [Request(name, rt.render(name, [{"role": "user", "content": q}]), Sampling(max_tokens=4))
                         for q in questions])
    for q, mine, vllm in zip(questions, ours, theirs):
        first = rt.tokenizer(mine.text, add_special_tokens=False)["input_ids"][:2]
        assert rt.tokenizer(vllm, add_special_tokens=False)["input_ids"][:2] == first, (q, mine.text, vllm)


@pytest.mark.vllm
@pytest.mark.real_model
def test_the_adapters_lorachat_refuses_for_vllm_are_the_ones_vllm_refuses(served, smollm_adapter, tmp_path):
    import openai

    for name, (_, loads) in VARIANTS.items():  # loaded into the running server
        path = variant(smollm_adapter, tmp_path, name)
        assert (vllm_problems(path) == []) == loads
        try:
            served.client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(path)},
                               cast_to=object)
            accepted = True
        except openai.APIStatusError:
            accepted = False
        assert accepted == loads, name


@pytest.mark.vllm
@pytest.mark.real_model
def test_the_printed_command_is_the_one_running(served):
    printed = CliRunner().invoke(main, [*served.args, "--print-command"])
    assert printed.exit_code == 0, printed.output
    words = shlex.split(printed.stdout)
    env = list(itertools.takewhile(lambda w: "=" in w and not w.startswith("/"), words))
    assert served.vllm_argv() == words[len(env):]
    environ = Path(f"/proc/{served.vllm_pid()}/environ").read_bytes().split(b"\0")
    assert all(e.encode() in environ for e in env)  # VLLM_CPU_KVCACHE_SPACE=1, unless set already


@pytest.mark.vllm
@pytest.mark.real_model
def test_sigterm_stops_vllm_and_its_engine(served):
    """lorachat used to exit on SIGTERM and leave vLLM's API server and engine running, port and memory held."""
    pgid = served.pgid
    assert len(members(pgid)) >= 2, members(pgid)  # the API server and its engine core
    started = time.monotonic()
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30 + 15 + 30) == 0, served.output()[-3000:]
    took = time.monotonic() - started
    assert members(pgid) == [], served.output()[-3000:]
    assert "mode=drain timeout=30s" in served.output()  # vLLM was asked to drain, not to abort
    assert "vLLM stopped" in served.output() and "killing its processes" not in served.output(), took


@pytest.mark.vllm
@pytest.mark.real_model
def test_killing_lorachat_with_sigkill_takes_vllm_down(vllm_python, smollm_adapter, tmp_path):
    import openai

    serving = start_serving(smollm_adapter, vllm_python, tmp_path / "serve.log")
    try:
        assert len(members(serving.pgid)) >= 2, members(serving.pgid)
        serving.process.kill()  # no code of lorachat's runs: the parent-death signal asks vLLM to stop
        serving.process.wait()
        # Reaping the last of them is init's job once lorachat is gone: a zombie holds no port and no memory.
        wait_until(lambda: members(serving.pgid, zombies=False) == [], 60,
                   lambda: f"left running: {members(serving.pgid)}\n{serving.output()[-3000:]}")
        with pytest.raises(openai.APIConnectionError):  # and its port is free again
            serving.client.models.list()
    finally:
        serving.stop_now()
