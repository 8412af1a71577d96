"""Continuous batching against the gather-then-run batcher serve ran before (issue 23), on the same requests.

    HF_HUB_OFFLINE=1 python bench/bench_continuous.py [--quick]

The bundled SmolLM2-135M with two quickstart adapters (one finetune step each, as bench_serve trains them) and
the base: every client picks one of the three, asks a distinct everyday English line of the chatterbot-corpus
(none of it is the adapters' training data), streamed 30% of the time, greedy, max_tokens uniform in 1..32,
and asks again as soon as it is answered (closed loop). Full: 200 clients for 60 s per phase; --quick: 48 clients
for 20 s. The clients run in a process of their own (plain http.client, so their threads do not take the
server's GIL); the server is `BackgroundServer` in this process, each scheduler at its default size (the static
batcher's 8 rows, serve's default then; the continuous scheduler's from `runtime.capacity`) unless `--max-batch`
sets the continuous one. The adapters are trained by `lorachat finetune` in a process of its own (bench_serve).

Phases, in one run: (1) `ServeOptions(scheduler="static")`: today's `serve.batcher.Batcher`; (2) the continuous
scheduler; (3) the same with /metrics scraped every second; (4) where a vLLM environment is installed
(scripts/vllm-env.sh, as the test command makes it), vLLM's CPU build on the same adapters, started as
`lorachat serve --engine vllm` starts it, under the same load. After phase 2, up to 48 distinct requests of it
again, one at a time, on the same server: a greedy reply under load must be the reply alone.

Figures: time to first token p50/p99 (streamed requests: from sending to the first chunk that carries text or a
finish reason), completion tokens per second over the phase, lost requests (sent and not answered 200),
identical replies, the scrape's cost in throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STREAMED = 0.3
MAX_TOKENS = (1, 32)
SIZES = {False: (200, 60.0), True: (48, 20.0)}  # quick -> (clients, seconds per phase)


def _row(name: str, value: float, unit: str, baseline: str, baseline_value: float | None, goal: str,
         ratio: float | None = None) -> dict:
    if ratio is None and baseline_value:
        ratio = value / baseline_value
    return {"name": name, "value": round(value, 3), "unit": unit, "baseline": baseline,
            "baseline_value": None if baseline_value is None else round(baseline_value, 3),
            "ratio": None if ratio is None else round(ratio, 2), "goal": goal}


# ---------------------------------------------------------------- the clients (their own process)


def _ask(port: int, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    """One request; what came back: status, reply, ttft (streamed), completion tokens."""
    import http.client

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream,
                       **({"stream_options": {"include_usage": True}} if stream else {})})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            response.read()
            return {"status": response.status}
        if not stream:
            reply = json.loads(response.read())
            return {"status": 200, "reply": reply["choices"][0]["message"]["content"],
                    "tokens": reply["usage"]["completion_tokens"], "latency": time.perf_counter() - start}
        text, ttft, tokens, ended = "", None, 0, False
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                ended = True
                break
            event = json.loads(data)
            if "error" in event:
                return {"status": 500}
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                if ttft is None and (choice["delta"].get("content") or choice.get("finish_reason")):
                    ttft = time.perf_counter() - start
                text += choice["delta"].get("content") or ""
        return {"status": 200 if ended else 599, "reply": text, "tokens": tokens, "ttft": ttft,
                "latency": time.perf_counter() - start}
    except OSError:
        return {"status": 0}
    finally:
        conn.close()


def _load(port: int, clients: int, seconds: float, models: list[str], lines: list[str], seed: int,
          scrape: bool) -> list[dict]:
    """`clients` closed-loop clients for `seconds`; every request with its outcome."""
    import random
    import threading
    import urllib.request

    done: list[dict] = []
    end = time.monotonic() + seconds
    lock = threading.Lock()

    def client(k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.monotonic() < end:
            spec = {"model": rng.choice(models), "prompt": rng.choice(lines),
                    "max_tokens": rng.randint(*MAX_TOKENS), "stream": rng.random() < STREAMED}
            out = _ask(port, **spec)
            with lock:
                done.append({**spec, **out, "at": time.monotonic()})

    def scraper() -> None:
        while time.monotonic() < end:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                r.read()
            time.sleep(1)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    if scrape:
        threads.append(threading.Thread(target=scraper))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def _load_in_process(port: int, clients: int, seconds: float, models: list[str], lines: list[str], seed: int,
                     scrape: bool) -> tuple[list[dict], float]:
    args = json.dumps({"port": port, "clients": clients, "seconds": seconds, "models": models, "lines": lines,
                       "seed": seed, "scrape": scrape})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--clients-json", args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout), wall


# ---------------------------------------------------------------- the server side


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _measure(port: int, clients: int, seconds: float, models: list[str], lines: list[str], scrape: bool) -> dict:
    """The load on a server listening on `port`: what was sent, lost, tokens/s and time to first token."""
    _ask(port, models[0], lines[0], 4, False)  # warm up
    done, _ = _load_in_process(port, clients, seconds, models, lines, seed=1, scrape=scrape)
    answered = [d for d in done if d["status"] == 200]
    first = min(d["at"] - d.get("latency", 0) for d in answered)
    span = max(d["at"] for d in answered) - first
    ttfts = [d["ttft"] for d in answered if d.get("ttft") is not None]
    return {"sent": len(done), "lost": len(done) - len(answered), "tokens_s": sum(d["tokens"] for d in answered) / span,
            "ttft_p50": _percentile(ttfts, 0.5), "ttft_p99": _percentile(ttfts, 0.99), "done": done}


def _phase(rt, scheduler: str, clients: int, seconds: float, models: list[str], lines: list[str],
           max_batch: int | None, scrape: bool = False) -> dict:
    from lora_chat.serve.app import BackgroundServer, ServeOptions, build_app

    app = build_app(rt, ServeOptions(scheduler=scheduler, max_batch=max_batch))
    live = BackgroundServer(app)
    try:
        found = _measure(live.port, clients, seconds, models, lines, scrape)
        if scheduler == "continuous" and not scrape:
            found["alone"] = _alone(live.port, found["done"])
    finally:
        live.stop()
    return {**found, "max_batch": app.state.batcher.max_batch}


def _vllm_phase(adapters: list[Path], clients: int, seconds: float, models: list[str], lines: list[str],
                folder: Path) -> dict | None:
    """The same load on vLLM's CPU build serving the same adapters (None where no vLLM environment is installed)."""
    from bench_serve import vllm_server

    with vllm_server(adapters, folder / "vllm.log") as port:
        return None if port is None else _measure(port, clients, seconds, models, lines, scrape=False)


def _alone(port: int, done: list[dict], most: int = 48) -> tuple[int, int]:
    """Distinct answered requests of the load asked again one at a time: (identical, compared)."""
    first: dict[tuple, str] = {}
    for d in done:
        key = (d["model"], d["prompt"], d["max_tokens"])
        if d["status"] == 200 and key not in first and len(first) < most:
            first[key] = d["reply"]
    same = sum(_ask(port, model, prompt, max_tokens, False).get("reply") == reply
               for (model, prompt, max_tokens), reply in first.items())
    return same, len(first)


def results(quick: bool, max_batch: int | None) -> list[dict]:
    from bench_serve import _quickstart_adapters, everyday_lines

    from lora_chat.runtime import AdapterSet

    clients, seconds = SIZES[quick]
    lines = sorted({t for t, lang in everyday_lines() if lang == "en"})
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _quickstart_adapters(Path(tmp), 2)
        rt = AdapterSet.open(adapters)
        models = [a.name for a in adapters] + [rt.base.model_id]
        static = _phase(rt, "static", clients, seconds, models, lines, None)
        continuous = _phase(rt, "continuous", clients, seconds, models, lines, max_batch)
        scraped = _phase(rt, "continuous", clients, seconds, models, lines, max_batch, scrape=True)
        vllm = _vllm_phase(adapters, clients, seconds, models, lines, Path(tmp))
    load = (f"{clients} clients {seconds:g} s, 3 models, 30% streamed, 1-32 tokens, "
            f"max batch {static['max_batch']} static / {continuous['max_batch']} continuous"
            f"{'' if max_batch else ' (its default)'}")
    same, compared = continuous["alone"]
    rows = [
        _row(f"continuous: TTFT p99 ({load})", continuous["ttft_p99"], "s", "static batcher",
             static["ttft_p99"], "<= 0.5"),
        _row("continuous: TTFT p50", continuous["ttft_p50"], "s", "static batcher", static["ttft_p50"], "-"),
        _row("continuous: throughput", continuous["tokens_s"], "tok/s", "static batcher", static["tokens_s"],
             ">= 1.5"),
        _row("continuous: requests lost", continuous["lost"], "requests", "static batcher", static["lost"],
             "= 0 requests", ratio=None),
        _row(f"continuous: greedy replies identical to alone ({compared} compared)", 100 * same / compared, "%",
             "-", None, ">= 100 %"),
        _row("continuous: throughput with /metrics scraped each second", scraped["tokens_s"], "tok/s",
             "continuous, not scraped", continuous["tokens_s"], ">= 0.98"),
    ]
    if vllm is None:
        print("no vLLM environment (scripts/vllm-env.sh makes one): the vLLM rows are left out", file=sys.stderr)
        return rows
    return rows + [
        _row("continuous vs vLLM: throughput", continuous["tokens_s"], "tok/s", "vLLM CPU build, same load",
             vllm["tokens_s"], ">= 1.0"),
        _row("continuous vs vLLM: TTFT p99", continuous["ttft_p99"], "s", "vLLM CPU build, same load",
             vllm["ttft_p99"], "-"),
        _row("vLLM: requests lost", vllm["lost"], "requests", "-", None, "-", ratio=None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 clients for 20 s per phase (full: 200 for 60 s).")
    parser.add_argument("--max-batch", type=int, help="the continuous scheduler's --max-batch (default: serve's)")
    parser.add_argument("--clients-json", help=argparse.SUPPRESS)  # the client process (see _load_in_process)
    args = parser.parse_args()
    if args.clients_json:
        print(json.dumps(_load(**json.loads(args.clients_json))))
        return
    for r in results(args.quick, args.max_batch):
        print(json.dumps(r))


if __name__ == "__main__":
    main()
