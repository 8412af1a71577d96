"""Continuous batching and what an operator relies on: requests join a running batch, greedy replies stay those of
the request alone, a full queue is 429, a slow request times out, SIGTERM drains, /metrics parses, bad flags are
one line. The tiny base and adapters of `adapter_factory.tiny_adapters` (faq-en, talk-sv); the real SmolLM2 once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
from click.testing import CliRunner

from adapter_factory import quickstart_adapter
from serve_fixtures import adapters, rt  # noqa: F401 (fixtures)
from train_helpers import slowed_cli
from lora_chat.cli import main
from lora_chat.runtime import AdapterSet, Completion, Request, Sampling
from lora_chat.runtime.scheduler import QueueFull, Scheduler
from lora_chat.serve.app import BackgroundServer, ServeOptions, build_app, stopping

ROOT = Path(__file__).resolve().parent.parent


def run_alone(rt, requests: list[Request]) -> list[Completion]:
    """Each request through its own scheduler run, one at a time."""
    out = []
    for request in requests:
        out += run_together(rt, [request], gap_s=0)
    return out


def run_together(rt, requests: list[Request], gap_s: float, **limits) -> list[Completion]:
    """The requests submitted `gap_s` apart to one running scheduler; their completions in order."""
    scheduler = Scheduler(rt, **{"max_running": 4, "chunk_tokens": 32, **limits})
    scheduler.start()
    done: dict[int, Completion] = {}
    events = []
    try:
        for i, request in enumerate(requests):
            event = threading.Event()
            events.append(event)
            scheduler.submit(request, lambda d: None, lambda c, i=i, e=event: (done.__setitem__(i, c), e.set()))
            time.sleep(gap_s)
        for event in events:
            assert event.wait(120)
    finally:
        scheduler.stop()
    return [done[i] for i in range(len(requests))]


def mixed_requests(rt, n: int, max_tokens: int) -> list[Request]:
    names = ["faq-en", "talk-sv", "base"]
    requests = []
    for i in range(n):
        words = "permit " * (1 + (i * 7) % 23) + f"case {i}"  # some prompts over chunk_tokens: chunked prefill
        prompt = rt.render(names[i % 3], [{"role": "user", "content": words}])
        requests.append(Request(names[i % 3], prompt, Sampling(max_tokens=max_tokens - i % 5)))
    return requests


# ---------------------------------------------------------------- the scheduler


def test_a_request_arriving_mid_decode_gets_its_first_token_before_the_long_one_ends(rt):
    """Issue 23: a request that arrived while a batch decoded waited for the whole batch to finish."""
    scheduler = Scheduler(rt, max_running=4)
    scheduler.start()
    long_done, short_done = threading.Event(), threading.Event()
    try:
        long = scheduler.submit(Request("faq-en", [5, 6, 7], Sampling(max_tokens=300)), lambda d: None,
                                lambda c: long_done.set())
        while long.first_token is None:
            time.sleep(0.01)
        time.sleep(0.2)  # the long row is decoding now
        short = scheduler.submit(Request("talk-sv", [8, 9], Sampling(max_tokens=3)), lambda d: None,
                                 lambda c: short_done.set())
        assert short_done.wait(60)
        assert not long_done.is_set(), "the long request ended before the newcomer was answered"
        assert short.first_token < time.monotonic() and long.finished is None
        assert long_done.wait(120)
    finally:
        scheduler.stop()
    assert scheduler.batch_sizes[2] > 0  # they did share decode steps


def test_greedy_replies_under_load_equal_each_request_alone(rt):
    requests = mixed_requests(rt, 12, max_tokens=12)
    alone = run_alone(rt, requests)
    loaded = run_together(rt, mixed_requests(rt, 12, max_tokens=12), gap_s=0.03)
    assert [c.token_ids for c in loaded] == [c.token_ids for c in alone]
    assert [c.finish_reason for c in loaded] == [c.finish_reason for c in alone]


def test_beyond_max_queue_submit_is_refused_with_a_retry_hint(rt):
    scheduler = Scheduler(rt, max_running=1, max_queue=2)  # not started: nothing leaves the queue
    for _ in range(2):
        scheduler.submit(Request("base", [5]), lambda d: None, lambda c: None)
    with pytest.raises(QueueFull) as full:
        scheduler.submit(Request("base", [5]), lambda d: None, lambda c: None)
    assert full.value.retry_after >= 1 and scheduler.waiting == 2


def test_the_kv_cache_of_a_token_is_counted_from_the_models_shape():
    from transformers import AutoConfig

    from lora_chat.runtime.capacity import kv_bytes_per_token

    smollm2 = AutoConfig.from_pretrained(ROOT / "recipes" / "models" / "smollm2-135m")
    llama_8b = AutoConfig.for_model("llama", num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                    hidden_size=4096)
    assert kv_bytes_per_token(smollm2, 2) == 2 * 30 * 3 * 64 * 2  # 23,040: keys and values, 30 layers, 3 KV heads
    assert kv_bytes_per_token(llama_8b, 2) == 128 * 1024


@pytest.mark.parametrize("free_rows, rows", [(3.5, 3), (0.2, 1), (1000, 64)])
def test_serve_decodes_as_many_rows_as_half_the_free_memory_holds_at_most_64(rt, monkeypatch, free_rows, rows):
    """The free memory is the machine's: it is set here, so the test says what the size follows from."""
    import torch

    from lora_chat.runtime import capacity

    row = capacity.kv_bytes_per_token(rt.model.config, getattr(torch, rt.dtype).itemsize) * min(
        capacity.ROW_TOKENS, rt.context_length)
    monkeypatch.setattr(capacity, "free_memory", lambda device: int(free_rows * row / capacity.MEMORY_SHARE))
    assert build_app(rt, ServeOptions()).state.batcher.max_batch == rows
    assert build_app(rt, ServeOptions(max_batch=5)).state.batcher.max_batch == 5  # the operator's number wins


# ---------------------------------------------------------------- over HTTP


@pytest.fixture
def live(rt, request):
    options = getattr(request, "param", {})
    server = BackgroundServer(build_app(rt, ServeOptions(**options)))
    yield server
    server.stop()


def post(url: str, body: dict, timeout: float = 120) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def chat_body(max_tokens: int = 3, **extra) -> dict:
    return {"model": "faq-en", "messages": [{"role": "user", "content": "How long?"}], "max_tokens": max_tokens,
            **extra}


def in_threads(n: int, target) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    return threads


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


@pytest.mark.parametrize("live", [{"max_batch": 1, "max_queue": 2}], indirect=True)
def test_beyond_max_queue_a_request_is_429_with_retry_after_and_the_queued_ones_are_answered(live, rt):
    scheduler = live.app.state.batcher.scheduler
    answers = []
    with rt.lock:  # the model is busy: nothing waiting can start
        threads = in_threads(2, lambda: answers.append(post(f"{live.url}/chat/completions", chat_body())))
        wait_until(lambda: scheduler.waiting == 2)
        status, headers, body = post(f"{live.url}/chat/completions", chat_body())
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert body["error"]["code"] == "queue_full"
    for t in threads:
        t.join(60)
    assert [a[0] for a in answers] == [200, 200]


@pytest.mark.parametrize("live", [{"request_timeout": 0.5}], indirect=True)
def test_a_request_past_its_timeout_is_504_and_its_place_is_freed(live, rt):
    with rt.lock:
        status, _, body = post(f"{live.url}/chat/completions", chat_body())
    assert status == 504 and "--request-timeout of 0.5 s" in body["error"]["message"]
    wait_until(lambda: live.app.state.batcher.scheduler.idle())  # dropped, not run for nobody
    assert post(f"{live.url}/chat/completions", chat_body())[0] == 200


def test_a_client_leaving_while_queued_frees_its_place(live, rt):
    batcher = live.app.state.batcher
    cancelled = batcher.finished["cancelled"]
    body = json.dumps(chat_body(max_tokens=50, stream=True)).encode()
    with rt.lock:
        with socket.create_connection(("127.0.0.1", live.port), timeout=60) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            received = b""
            while b"data:" not in received:  # the role chunk: the request is queued
                received += sock.recv(4096)
            wait_until(lambda: batcher.scheduler.waiting == 1)
        time.sleep(0.3)  # the server notices the hang-up
    wait_until(lambda: batcher.finished["cancelled"] > cancelled)
    assert batcher.finished["length"] + batcher.finished["stop"] == 0  # it never ran


def test_a_draining_server_refuses_new_requests_with_503_and_finishes_the_running_one(rt):
    live = BackgroundServer(build_app(rt, ServeOptions(drain_timeout=30)))
    app = live.app
    answers = []
    try:
        with rt.lock:
            threads = in_threads(1, lambda: answers.append(post(f"{live.url}/chat/completions", chat_body())))
            wait_until(lambda: app.state.batcher.scheduler.waiting == 1)
            stopping(app, 30, lambda: live.server, say=lambda line: None)(signal.SIGTERM)  # what SIGTERM calls
            wait_until(lambda: app.state.draining)
            status, headers, body = post(f"{live.url}/chat/completions", chat_body())
            assert status == 503 and headers["retry-after"] and body["error"]["code"] == "shutting_down"
            with pytest.raises(urllib.error.HTTPError) as ready:
                urllib.request.urlopen(f"http://127.0.0.1:{live.port}/ready", timeout=10)
            assert ready.value.code == 503
        threads[0].join(60)
        assert answers[0][0] == 200 and answers[0][2]["choices"][0]["finish_reason"] in ("stop", "length")
        live.thread.join(30)
        assert not live.thread.is_alive(), "the server did not exit after draining"
    finally:
        live.stop()


def test_metrics_parse_as_prometheus_text_and_count_requests_tokens_and_routes(live):
    from prometheus_client.parser import text_string_to_metric_families

    client = openai.OpenAI(base_url=live.url, api_key="x", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="faq-en", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    list(client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "Hej, hur mår du?"}],
                                        max_tokens=2, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such", messages=[{"role": "user", "content": "Hi"}])
    with urllib.request.urlopen(f"http://127.0.0.1:{live.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("lorachat_requests_total", (("model", "faq-en"), ("status", "200")))] == 1
    assert samples[("lorachat_requests_total", (("model", "auto"), ("status", "200")))] == 1
    assert samples[("lorachat_requests_total", (("model", "unknown"), ("status", "404")))] == 1
    assert samples[("lorachat_completion_tokens_total", (("model", "faq-en"),))] == reply.usage.completion_tokens
    assert samples[("lorachat_prompt_tokens_total", (("model", "faq-en"),))] == reply.usage.prompt_tokens
    assert samples[("lorachat_routing_decisions_total", (("adapter", "talk-sv"),))] == 1
    assert samples[("lorachat_time_to_first_token_seconds_count", ())] == 2
    assert samples[("lorachat_batch_size_count", ())] >= 1
    assert samples[("lorachat_queue_depth", ())] == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{live.port}/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_max_tokens_beyond_the_context_is_400_naming_the_limit(live, rt):
    status, _, body = post(f"{live.url}/chat/completions", chat_body(max_tokens=rt.context_length))
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {rt.context_length} tokens" in body["error"]["message"]
    assert body["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("live", [{"max_batch": 2, "max_queue": 8}], indirect=True)
def test_streams_that_are_never_read_stay_bounded_and_others_are_served(live):
    """A client opening many streams and never reading: beyond the queue they are 429, the rest decode to the end
    without blocking the scheduler, and another client is answered."""
    body = json.dumps(chat_body(max_tokens=40, stream=True)).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    scheduler = live.app.state.batcher.scheduler
    socks, most = [], 0
    try:
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", live.port), timeout=60)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(request)
            socks.append(sock)
            most = max(most, scheduler.waiting + scheduler.running)
        status, _, reply = post(f"{live.url}/chat/completions", chat_body(max_tokens=2), timeout=120)
        most = max(most, scheduler.waiting + scheduler.running)
    finally:
        for sock in socks:
            sock.close()
    assert most <= 2 + 8
    assert status in (200, 429)  # answered, or told to retry while the queue is full: never stuck
    wait_until(lambda: scheduler.idle())
    assert post(f"{live.url}/chat/completions", chat_body(max_tokens=2))[0] == 200


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize("flag, value, message", [
    ("--max-queue", "0", "error: --max-queue: must be at least 1, not 0 (requests beyond it get 429)"),
    ("--max-queue", "-3", "error: --max-queue: must be at least 1, not -3 (requests beyond it get 429)"),
    ("--drain-timeout", "-1", "error: --drain-timeout: must be 0 seconds or more, not -1"),
])
def test_bad_admission_and_drain_flags_are_one_line_and_exit_2(adapters, flag, value, message):
    result = CliRunner().invoke(main, ["serve", str(adapters[1]), flag, value])
    assert result.exit_code == 2
    assert result.stderr.strip() == message


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(adapter: Path, port: int, *flags: str, step_s: float) -> subprocess.Popen:
    """`lorachat serve` with every decode step taking at least `step_s` more: how long a reply takes is then set
    by the test, not by how fast the machine (or the runtime) is."""
    program = slowed_cli("lora_chat.runtime.scheduler", "Scheduler", "_decode", step_s)
    process = subprocess.Popen([sys.executable, "-c", program, "serve", str(adapter), "--port", str(port),
                                *flags], env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONFAULTHANDLER": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, process.stdout.read()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5):
                return process
        except (urllib.error.URLError, ConnectionError):
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.3)


def _open_stream(port: int, max_tokens: int) -> socket.socket:
    body = json.dumps(chat_body(max_tokens=max_tokens, stream=True)).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while received.count(b"data:") < 3:  # decoding
        received += sock.recv(4096)
    return sock, received


def _events(sock: socket.socket, received: bytes) -> list[dict | str]:
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    out = []
    for line in received.decode(errors="replace").splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_sigterm_finishes_what_fits_the_drain_ends_the_rest_with_an_error_refuses_new_and_exits_0(adapters):
    """Issue 23: under SIGTERM every accepted request completes or gets a well-formed error, exit 0 within the
    drain timeout + 5 s (uvicorn alone refused new connections, told open streams nothing, and died of SIGTERM)."""
    port = _free_port()
    drain = 1  # 450 decode steps of >= 10 ms: at least 4.5 s, too long to finish inside it; 12 steps fit
    process = _start(adapters[1], port, "--drain-timeout", str(drain), step_s=0.01)
    socks = []
    try:
        short, short_seen = _open_stream(port, max_tokens=12)
        long, long_seen = _open_stream(port, max_tokens=450)
        socks += [short, long]
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, headers, body = post(f"http://127.0.0.1:{port}/v1/chat/completions", chat_body())
        short_events, long_events = _events(short, short_seen), _events(long, long_seen)
        assert process.wait(timeout=drain + 5) == 0
        assert time.monotonic() - signalled <= drain + 5
    finally:
        process.kill()
        for sock in socks:
            sock.close()
    assert status == 503 and headers["retry-after"] and body["error"]["code"] == "shutting_down"
    assert short_events[-1] == "[DONE]" and short_events[-2]["choices"][0]["finish_reason"] == "length"
    assert long_events[-1] == "[DONE]"
    assert "error" in long_events[-2], (len(long_events), long_events[-2])
    error = long_events[-2]["error"]
    assert error["code"] == "shutting_down" and f"drain timeout of {drain} s" in error["message"]


# ---------------------------------------------------------------- the real model


@pytest.mark.real_model
def test_on_smollm2_greedy_replies_under_load_equal_each_request_alone(tmp_path_factory):
    adapter = quickstart_adapter(tmp_path_factory)
    rt = AdapterSet.open([adapter])
    names = [rt.adapters[0].name, "base"]
    questions = ["What is a building permit?", "How long does a permit take?", "Who checks the control plan?",
                 "Do I need a permit for a fence?", "What is a final clearance?", "Can I build a deck myself?"]
    requests = lambda: [Request(names[i % 2], rt.render(names[i % 2], [{"role": "user", "content": q}]),
                                Sampling(max_tokens=6 + i % 4)) for i, q in enumerate(questions * 2)]
    alone = run_alone(rt, requests())
    loaded = run_together(rt, requests(), gap_s=0.05, max_running=8)
    assert [c.text for c in loaded] == [c.text for c in alone]
