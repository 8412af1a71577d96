"""`/metrics`: the server's Prometheus series, with `prometheus_client` (its registry, types and text format).

    lorachat_requests_total{model, status}            completion requests answered, by requested model and HTTP status
    lorachat_prompt_tokens_total{model}               tokens read, by the resident that answered
    lorachat_completion_tokens_total{model}           tokens generated
    lorachat_queue_depth / lorachat_running_requests  waiting / decoding now (read at scrape time)
    lorachat_batch_size                               rows per decode forward (histogram)
    lorachat_time_to_first_token_seconds              submit -> first generated token (histogram)
    lorachat_time_per_output_token_seconds            the decode time of a reply over its tokens after the first
    lorachat_routing_decisions_total{adapter}         who answered a request, `model: auto` or named ("base" for none)

Each app has a registry of its own, so several servers in one process (tests, benchmarks) do not share series.
A request's `model` label is its `model` field only when that names a served model or `auto`, else "unknown":
a client cannot grow the series without bound.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..runtime import Completion

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: a first token comes in tens of milliseconds on a GPU and in seconds on a loaded CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """The series of one server; `queue_depth` and `running` are read from the scheduler at each scrape."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lorachat_requests", "Completion requests answered, by requested model and HTTP "
                                "status.", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("lorachat_prompt_tokens", "Prompt tokens read, by answering model.", ["model"],
                                     registry=r)
        self.completion_tokens = Counter("lorachat_completion_tokens", "Tokens generated, by answering model.",
                                         ["model"], registry=r)
        Gauge("lorachat_queue_depth", "Requests waiting for a batch slot.", registry=r).set_function(queue_depth)
        Gauge("lorachat_running_requests", "Requests decoding now.", registry=r).set_function(running)
        self.batch_size = Histogram("lorachat_batch_size", "Rows per decode forward.", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.ttft = Histogram("lorachat_time_to_first_token_seconds", "From submit to the first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("lorachat_time_per_output_token_seconds", "Decode time per generated token "
                                   "after the first.", buckets=TOKEN_BUCKETS, registry=r)
        self.routes = Counter("lorachat_routing_decisions", "Requests by the adapter that answered them.",
                              ["adapter"], registry=r)

    def request(self, model: str, status: int) -> None:
        self.requests.labels(model=model, status=str(status)).inc()

    def routed(self, adapter: str | None) -> None:
        self.routes.labels(adapter=adapter or "base").inc()

    def finished(self, model: str, completion: Completion, submitted: float, first: float | None,
                 last: float | None) -> None:
        """One request's tokens and timings (monotonic seconds), when its Completion is known."""
        self.prompt_tokens.labels(model=model).inc(completion.prompt_tokens)
        self.completion_tokens.labels(model=model).inc(completion.completion_tokens)
        if first is None:
            return
        self.ttft.observe(first - submitted)
        if last is not None and completion.completion_tokens > 1:
            self.per_token.observe((last - first) / (completion.completion_tokens - 1))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
