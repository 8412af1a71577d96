"""Greedy replies that do not depend on the batch, on the real bundled SmolLM2 (issue 15).

The tiny random model hides what breaks on a real one: its matrices are too small for the matmul
kernels to change blocking with the batch. Here 32 real FAQ prompts are answered greedily (short
replies, to stay fast) alone and in batches of other sizes, in other orders and next to rows of an
adapter, and every reply must be the same token for token: through the runtime that eval uses, and
through `lorachat serve` with all of them sent at once.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_chat.cli import main

RECIPE = Path(__file__).parent.parent / "recipes" / "quickstart.yaml"
PROMPTS = 32
TOKENS = 8
pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The quickstart adapter (two steps at a high learning rate, so it answers differently) on the base."""
    from lora_chat.inputs import load_inputs
    from lora_chat.recipe import load_recipe
    from lora_chat.runtime import AdapterSet

    adapter = tmp_path_factory.mktemp("real") / "faq"
    trained = CliRunner().invoke(main, ["finetune", str(RECIPE), "--set", "training.max_steps=2",
                                        "--set", "training.lr=0.01", "--set", f"output.dir={adapter}"])
    assert trained.exit_code == 0, trained.output
    inputs = load_inputs(load_recipe(RECIPE))
    prompts = [inputs.template.prompt(c) for c in (inputs.data.eval + inputs.data.train)[:PROMPTS]]
    return AdapterSet.open([adapter]), prompts


def replies(rt, jobs: list[tuple[str, str]], batch_size: int) -> list[list[int]]:
    from lora_chat.runtime import Request, Sampling, generate

    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        out += [c.token_ids for c in generate(rt, [Request(m, p, Sampling(max_tokens=TOKENS)) for m, p in chunk])]
    return out


def test_greedy_replies_are_the_same_alone_in_any_batch_size_and_any_order(setup):
    rt, prompts = setup
    jobs = [("base", p) for p in prompts]
    alone = replies(rt, jobs, 1)
    assert replies(rt, jobs, PROMPTS) == alone
    assert replies(rt, jobs, 5) == alone
    order = list(range(PROMPTS))
    random.Random(0).shuffle(order)
    shuffled = replies(rt, [jobs[i] for i in order], 7)
    assert [shuffled[order.index(i)] for i in range(PROMPTS)] == alone


def test_rows_of_the_adapter_and_the_base_batched_together_equal_each_row_alone(setup):
    rt, prompts = setup
    jobs = [(name, p) for p in prompts[:16] for name in ("base", "faq")]
    alone = replies(rt, jobs, 1)
    assert replies(rt, jobs, len(jobs)) == alone
    assert alone[0::2] != alone[1::2], "the adapter should answer some prompt differently from the base"


def test_served_answers_to_32_concurrent_mixed_requests_equal_each_request_sent_alone(setup):
    import openai

    from lora_chat.serve.app import BackgroundServer, ServeOptions, build_app

    rt, prompts = setup
    server = BackgroundServer(build_app(rt, ServeOptions()))
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)
        jobs = [(rt.base.model_id if i % 2 else "faq", p) for i, p in enumerate(prompts)]

        def ask(job: tuple[str, str]) -> str:
            return client.completions.create(model=job[0], prompt=job[1], max_tokens=TOKENS).choices[0].text

        alone = [ask(job) for job in jobs]
        together: dict[int, str] = {}
        barrier = threading.Barrier(len(jobs))

        def send(i: int) -> None:
            barrier.wait()
            together[i] = ask(jobs[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        batched = sum(n for size, n in server.app.state.batcher.batch_sizes.items() if size > 1)
    finally:
        server.stop()
    assert batched > 0, "the concurrent requests should have shared batches"
    assert [together[i] for i in range(len(jobs))] == alone
