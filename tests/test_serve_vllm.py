"""`lorachat serve --engine vllm`: the adapter check, the command, and (marked `vllm`) the real vLLM CPU server.

The marked test needs a vLLM environment (`$LORACHAT_VLLM_PYTHON`, or `vllm-venv` in the lorachat cache; the README
says how to make one) and is skipped with that reason otherwise. It starts vLLM's server (about 100 s on a CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from adapter_factory import tiny_adapters
from lora_chat.cli import main
from lora_chat.serve.vllm import default_python, vllm_problems

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


def _vllm_python() -> Path | None:
    named = os.environ.get("LORACHAT_VLLM_PYTHON")
    python = Path(named) if named else default_python()
    return python if python.is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def smollm_adapter(tmp_path_factory) -> Path:
    """The quickstart recipe on the bundled SmolLM2, one short step: a real adapter for the real base."""
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"
    out = tmp_path_factory.mktemp("vllm") / "faq-en"
    result = CliRunner().invoke(main, ["finetune", str(recipe), "--set", "training.max_steps=1",
                                       "--set", "training.grad_accum=1", "--set", "data.max_length=128",
                                       "--set", "data.too_long=truncate", "--set", "data.eval.split=0",
                                       "--set", f"output.dir={out}"])
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.vllm
@pytest.mark.real_model
@pytest.mark.skipif(_vllm_python() is None, reason="no vLLM environment: set LORACHAT_VLLM_PYTHON "
                                                    "(README: Serving with vLLM)")
def test_vllm_answers_as_lorachat_and_refuses_the_same_adapters(smollm_adapter, tmp_path):
    import openai

    from lora_chat.runtime import AdapterSet, Request, Sampling, generate
    from lora_chat.serve.vllm import VllmOptions, build_command

    port = _free_port()
    launch = build_command([smollm_adapter], VllmOptions(port=port, python=str(_vllm_python())))
    log = (tmp_path / "vllm.log").open("w")
    env = {**os.environ, **launch.env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    process = subprocess.Popen(launch.argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=300)
        deadline = time.monotonic() + 900
        while True:
            assert process.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM did not start in 15 minutes"
            try:
                models = {m.id: m for m in client.models.list().data}
                break
            except openai.APIConnectionError:
                time.sleep(2)
        assert models["faq-en"].parent == launch.argv[launch.argv.index("--served-model-name") + 1]

        questions = ["What is a building permit?", "How long does it take to get a permit?",
                     "Who is responsible for the control plan?"]
        theirs = [client.chat.completions.create(model="faq-en", messages=[{"role": "user", "content": q}],
                                                 max_tokens=4, temperature=0).choices[0].message.content
                  for q in questions]
        rt = AdapterSet.open([smollm_adapter])
        ours = generate(rt, [Request("faq-en", rt.render("faq-en", [{"role": "user", "content": q}]),
                                     Sampling(max_tokens=4)) for q in questions])
        for q, mine, vllm in zip(questions, ours, theirs):
            first = rt.tokenizer(mine.text, add_special_tokens=False)["input_ids"][:2]
            assert rt.tokenizer(vllm, add_special_tokens=False)["input_ids"][:2] == first, (q, mine.text, vllm)

        # The adapters lorachat refuses for vLLM are the ones vLLM refuses (loaded while it runs).
        for name, (_, loads) in VARIANTS.items():
            path = variant(smollm_adapter, tmp_path, name)
            assert (vllm_problems(path) == []) == loads
            try:
                client.post("/load_lora_adapter", body={"lora_name": name, "lora_path": str(path)}, cast_to=object)
                accepted = True
            except openai.APIStatusError:
                accepted = False
            assert accepted == loads, name
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
