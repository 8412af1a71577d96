"""What `serve --record DIR` costs: server throughput under 200 concurrent clients, with and without recording.

    HF_HUB_OFFLINE=1 python bench/bench_record.py [--quick]

The bundled SmolLM2-135M-Instruct (base only) is served twice from one loaded runtime, in this process on
loopback: one app recording into a temp folder, one not. 200 clients at once each send chat requests
(30% streamed, greedy, `max_tokens` drawn from 1-8 in quick mode or 1-32 in full, prompts from a fixed list, all
seeded); a round is every client's requests answered. Rounds alternate without / with / with / without (ABBA,
so a drift of the shared machine falls on both sides), and each side's throughput is its completion tokens over
its rounds' wall time. Goal: recording keeps >= 0.95 of the throughput.

A second row times `Recording.exchange` itself (one record built, serialised and appended) on a typical
exchange, against the server's wall time per reply under the same load: the share of a reply's time that
recording takes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CLIENTS = 200
QUESTIONS = ["What is a building permit?", "How long does a permit take?", "Who checks the control plan?",
             "What does a building inspector do?", "Do I need a permit for a fence?", "What is a final clearance?",
             "How much does a permit cost?", "Can I build a deck myself?"]


def _ask(port: int, model: str, i: int, max_tokens: int, stream: bool) -> int:
    """One chat request; its completion tokens (from `usage`, streamed or not)."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        text = response.read().decode()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {text[:200]}")
    if not stream:
        return json.loads(text)["usage"]["completion_tokens"]
    usage = [json.loads(e[5:]) for e in text.split("\n\n") if e.startswith("data: {") and '"usage":{' in e]
    return usage[-1]["usage"]["completion_tokens"]


def _round(port: int, model: str, requests: list[tuple[int, int, bool]]) -> tuple[int, float]:
    """(completion tokens, wall seconds) for `requests` sent by CLIENTS clients at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        tokens = sum(pool.map(lambda r: _ask(port, model, *r), requests))
    return tokens, time.perf_counter() - start


def _exchange_cost(recording, model: str, repeats: int = 2000) -> float:
    """Seconds per `Recording.exchange` on a typical exchange (a question, a 32-token reply)."""
    from lora_chat.runtime import Completion
    from lora_chat.runtime.router import Decision
    from lora_chat.serve.protocol import ChatCompletionRequest
    from lora_chat.serve.serving import Target

    request = ChatCompletionRequest(model=model, max_tokens=32,
                                    messages=[{"role": "user", "content": QUESTIONS[0]}])
    target = Target("base", model, Decision(None, "named in the request"))
    done = Completion("A building permit is a decision from the municipality that you may build. " * 2, "length",
                      12, 32, [])
    start = time.perf_counter()
    for i in range(repeats):
        recording.exchange(f"chatcmpl-bench-{i}", target, request, done)
    return (time.perf_counter() - start) / repeats


def results(quick: bool) -> list[dict]:
    from lora_chat.models import BUNDLED_MODEL_ID
    from lora_chat.runtime import AdapterSet
    from lora_chat.serve.app import BackgroundServer, ServeOptions, build_app

    rounds, per_client, longest = (2, 1, 8) if quick else (4, 2, 32)  # rounds per side, requests per client
    rt = AdapterSet.open([], base=BUNDLED_MODEL_ID)
    model = rt.base.model_id
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as folder:
        plain = BackgroundServer(build_app(rt, ServeOptions()))
        recorded = BackgroundServer(build_app(rt, ServeOptions(record=Path(folder))))
        try:
            servers = {False: plain, True: recorded}
            for live in servers.values():  # warm both the same way
                _round(live.port, model, [(i, 4, i % 3 == 0) for i in range(16)])
            totals = {False: [0, 0.0], True: [0, 0.0]}
            replies = 0
            for side in [False, True, True, False] * (rounds // 2):
                requests = [(rng.randrange(1000), rng.randint(1, longest), rng.random() < 0.3)
                            for _ in range(CLIENTS * per_client)]
                tokens, seconds = _round(servers[side].port, model, requests)
                totals[side][0] += tokens
                totals[side][1] += seconds
                replies += len(requests) if side else 0
            per_reply = totals[True][1] / replies
            cost = _exchange_cost(recorded.app.state.recording, model)
        finally:
            plain.stop()
            recorded.stop()
    without, with_record = (totals[s][0] / totals[s][1] for s in (False, True))
    return [
        {"name": f"record_throughput: {CLIENTS} clients, 30% streamed, 1-{longest} tokens, SmolLM2 (ABBA x{rounds // 2})",
         "value": round(with_record, 1), "unit": "tok/s", "baseline": "the same server without --record",
         "baseline_value": round(without, 1), "ratio": round(with_record / without, 3), "goal": ">= 0.95"},
        {"name": "record_cost_per_reply: Recording.exchange vs wall time per reply under that load",
         "value": round(cost * 1e6, 1), "unit": "us", "baseline": "wall time per reply (recorded side)",
         "baseline_value": round(per_reply * 1e6, 1), "ratio": round(cost / per_reply, 4), "goal": "<= 0.05"},
    ]


def main() -> None:
    from run import table  # bench/run.py's table, as `run.py --only record` prints it

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1-8 token replies, one request per client, 2x2 rounds.")
    print(table(results(parser.parse_args().quick)))


if __name__ == "__main__":
    main()
