"""`lorachat serve` as a client sees it: the real `openai` client against a live server on loopback, serving a tiny
base and two tiny adapters trained through `lorachat finetune` (faq-en: English, construction; talk-sv: Swedish)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from click.testing import CliRunner

from serve_fixtures import adapters, rt  # noqa: F401 (fixtures)
from lora_chat.cli import main
from lora_chat.serve.app import BackgroundServer


def _serve(rt, **options):
    from lora_chat.serve.app import ServeOptions, build_app

    return BackgroundServer(build_app(rt, ServeOptions(**options)))


@pytest.fixture(scope="module")
def server(rt):
    live = _serve(rt, allow_runtime_loading=True)
    yield live
    live.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def ask(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def post_raw(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_models_lists_the_base_and_each_adapter_with_its_parent(client, rt):
    models = {m.id: m for m in client.models.list().data}
    base = rt.base.model_id
    assert set(models) == {base, "faq-en", "talk-sv"}
    assert models["faq-en"].parent == base and models["talk-sv"].parent == base
    assert models[base].parent is None
    extra = models["talk-sv"].model_extra
    assert (extra["kind"], extra["language"], extra["domain"], extra["rank"]) == ("adapter", "sv", "smalltalk", 8)


def test_a_chat_answer_names_the_adapter_and_counts_real_tokens(client, rt):
    reply = client.chat.completions.create(model="faq-en", messages=ask("How long does it take?"), max_tokens=5)
    assert reply.model == "faq-en"
    assert reply.choices[0].finish_reason in ("stop", "length")
    prompt = rt.render("faq-en", ask("How long does it take?"))
    assert reply.usage.prompt_tokens == len(rt.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= reply.usage.completion_tokens <= 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_the_base_answers_to_its_model_id(client, rt):
    reply = client.chat.completions.create(model=rt.base.model_id, messages=ask("Hello"), max_tokens=3)
    assert reply.model == rt.base.model_id


def test_a_streamed_answer_is_the_plain_answer_in_pieces(client, server):
    plain = client.chat.completions.create(model="talk-sv", messages=ask("Hej!"), max_tokens=6)
    chunks = list(client.chat.completions.create(model="talk-sv", messages=ask("Hej!"), max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # On the wire: server-sent events closed by OpenAI's sentinel.
    body = json.dumps({"model": "talk-sv", "messages": ask("Hej!"), "max_tokens": 2, "stream": True}).encode()
    request = urllib.request.Request(f"{server.url}/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().splitlines() if line]
    assert events[-1] == "data: [DONE]"


def test_completions_answer_each_prompt(client):
    reply = client.completions.create(model="faq-en", prompt=["Ten weeks", "Hej"], max_tokens=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.model == "faq-en"
    assert 2 <= reply.usage.completion_tokens <= 6


def test_concurrent_requests_for_different_adapters_are_batched_and_answer_as_alone(client, server):
    """Issue 15, server side: a greedy answer does not depend on what it was batched with."""
    requests = [(model, f"{word} number {i}") for i, (model, word) in
                enumerate([("faq-en", "permit"), ("talk-sv", "hej"), (server.app.state.models.base_name, "hello"),
                           ("faq-en", "weeks and weeks"), ("talk-sv", "hur mår du"), ("faq-en", "x")])]
    alone = {r: client.chat.completions.create(model=r[0], messages=ask(r[1]), max_tokens=8) for r in requests}
    batcher = server.app.state.batcher
    before = sum(n for size, n in batcher.batch_sizes.items() if size > 1)
    together: dict = {}
    barrier = threading.Barrier(len(requests))

    def send(r):
        barrier.wait()
        together[r] = client.chat.completions.create(model=r[0], messages=ask(r[1]), max_tokens=8)

    threads = [threading.Thread(target=send, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(n for size, n in batcher.batch_sizes.items() if size > 1) > before  # they did share a batch
    for r in requests:
        assert together[r].model == alone[r].model
        assert together[r].choices[0].message.content == alone[r].choices[0].message.content, r
        assert together[r].usage.completion_tokens == alone[r].usage.completion_tokens


def test_auto_routes_by_the_message_language_and_says_why(client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=ask("Hej, hur mår du idag?"), max_tokens=2)
    assert raw.parse().model == "talk-sv"
    route = raw.headers["x-lorachat-route"]
    assert route.startswith("adapter=talk-sv; language=sv;") and "reason=" in route
    english = client.chat.completions.create(model="auto", messages=ask("How long does a building permit take?"),
                                             max_tokens=2)
    assert english.model == "faq-en"


def test_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="faq-de", messages=ask("Hallo"))
    assert err.value.body["code"] == "model_not_found" and "faq-de" in err.value.body["message"]


def test_malformed_json_is_400_in_openai_shape(server):
    status, body = post_raw(f"{server.url}/chat/completions", b'{"model": "faq-en", "messages": [')
    assert status == 400
    assert body["error"]["code"] == "invalid_json" and body["error"]["type"] == "invalid_request_error"


def test_a_body_missing_fields_is_400_naming_them(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="faq-en", messages=[])
    assert err.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="faq-en", messages=ask("hi"), n=2)
    assert "n=1" in err.value.body["message"]


def test_a_prompt_longer_than_the_context_is_400_and_the_server_goes_on(client, rt):
    too_long = "permit " * (rt.context_length + 10)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="faq-en", messages=ask(too_long), max_tokens=2)
    assert err.value.body["code"] == "context_length_exceeded"
    assert client.chat.completions.create(model="faq-en", messages=ask("hi"), max_tokens=1).choices


def test_a_client_leaving_mid_stream_frees_its_row(client, server):
    batcher = server.app.state.batcher
    cancelled = batcher.finished["cancelled"]
    body = json.dumps({"model": "faq-en", "messages": ask("Tell me everything"), "max_tokens": 400,
                       "stream": True, "temperature": 0.0}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        received = b""
        while received.count(b"data:") < 3:  # the row is decoding (role chunk, then text); then hang up
            chunk = sock.recv(4096)
            assert chunk, "the server closed the stream"
            received += chunk
    deadline = time.monotonic() + 60
    while batcher.finished["cancelled"] == cancelled:
        assert time.monotonic() < deadline, "the abandoned row kept decoding"
        time.sleep(0.05)
    assert client.chat.completions.create(model="faq-en", messages=ask("hi"), max_tokens=1).choices


def test_runtime_loading_checks_the_directory_then_serves_the_adapter(client, adapters, tmp_path):
    _, en, _ = adapters
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/load_lora_adapter", body={"lora_name": "x", "lora_path": str(tmp_path)}, cast_to=object)
    assert "manifest.json" in err.value.body["message"]
    client.post("/load_lora_adapter", body={"lora_name": "faq-en-2", "lora_path": str(en)}, cast_to=object)
    assert "faq-en-2" in {m.id for m in client.models.list().data}
    assert client.chat.completions.create(model="faq-en-2", messages=ask("hi"), max_tokens=1).model == "faq-en-2"
    client.post("/unload_lora_adapter", body={"lora_name": "faq-en-2"}, cast_to=object)
    assert "faq-en-2" not in {m.id for m in client.models.list().data}


def test_runtime_loading_is_refused_unless_allowed(rt, adapters):
    live = _serve(rt)
    try:
        status, body = post_raw(f"{live.url}/load_lora_adapter",
                                json.dumps({"lora_name": "y", "lora_path": str(adapters[1])}).encode())
    finally:
        live.stop()
    assert status == 403 and "--allow-runtime-loading" in body["error"]["message"]


def test_with_an_api_key_requests_without_it_are_401(rt):
    live = _serve(rt, api_key="sesame")
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=live.url, api_key="wrong", max_retries=0).models.list()
        assert err.value.body["code"] == "invalid_api_key"
        assert openai.OpenAI(base_url=live.url, api_key="sesame", max_retries=0).models.list().data
    finally:
        live.stop()


def test_auto_without_any_adapter_language_is_400(adapters):
    from lora_chat.runtime import AdapterSet

    live = _serve(AdapterSet.open(base=str(adapters[0])))
    try:
        with pytest.raises(openai.BadRequestError) as err:
            openai.OpenAI(base_url=live.url, api_key="x", max_retries=0).chat.completions.create(
                model="auto", messages=ask("Hej"))
    finally:
        live.stop()
    assert err.value.body["code"] == "routing_unavailable" and "output.language" in err.value.body["message"]


def test_a_port_in_use_is_one_line_and_exit_2(adapters):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", str(adapters[1]), "--port", str(port)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --port: port {port} on 127.0.0.1 is in use; pick another with --port"
