"""What the server does, without HTTP: pick the model, render and check the prompt, batch it, shape the answer.

`ServingModels` knows the residents (the base under its model id, each adapter by name), routes `auto`, and
loads/unloads adapters at runtime. `ServingChat` and `ServingCompletion` turn a validated request into a
response model, or into the server-sent events of a stream. Failures are `ServeError`s carrying the HTTP
status and OpenAI's error fields; `api_router` turns them into `ErrorResponse` JSON.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapters import METRICS
from ..errors import LorachatError
from ..files import read_json_object
from ..runtime import BASE, Completion, Delta, Request, Sampling
from ..runtime.router import Decision, Router
from ..runtime.scheduler import Aborted, QueueFull
from .batcher import Batcher, Job
from .protocol import (DEFAULT_MAX_TOKENS, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                       ChatCompletionResponse, ChatResponseMessage, CompletionChoice, CompletionRequest,
                       CompletionResponse, CompletionStreamResponse, DeltaMessage, ErrorInfo, ErrorResponse,
                       LoadLoRAAdapterRequest, ModelCard, ModelList, SamplingFields, UnloadLoRAAdapterRequest,
                       UsageInfo)

AUTO = "auto"  # the `model` that asks the router


class ServeError(Exception):
    """A request the server refuses or could not answer, as OpenAI reports it."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers  # e.g. Retry-After on a 429 or 503
        self.response = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))


def not_found(name: str, known: list[str]) -> ServeError:
    return ServeError(404, f"The model `{name}` does not exist; served: {', '.join(known)}", param="model",
                      code="model_not_found")


@dataclass(frozen=True)
class Target:
    """Who answers a request: the resident's runtime name, the name the response shows, the routing decision."""

    resident: str
    shown: str
    decision: Decision

    def headers(self) -> dict[str, str]:
        return {"x-lorachat-route": self.decision.header()}


class ServingModels:
    """The residents as the API names them, routing, and adapters loaded or unloaded while serving."""

    def __init__(self, rt: Any, *, allow_runtime_loading: bool = False):
        self.rt = rt
        self.base_name = rt.base.model_id
        self.allow_runtime_loading = allow_runtime_loading
        self._lock = threading.Lock()  # load/unload against each other; the runtime guards its model itself
        self.router = Router.from_residents(rt.adapters)

    def names(self) -> list[str]:
        return [self.base_name, *(r.name for r in self.rt.adapters)]

    def list(self) -> ModelList:
        context = self.rt.context_length
        cards = [ModelCard(id=self.base_name, root=str(self.rt.base.path), kind="base", max_model_len=context)]
        for r in self.rt.adapters:
            config = read_json_object(r.path / "adapter_config.json")
            metrics = read_json_object(r.path / METRICS)
            cards.append(ModelCard(id=r.name, root=str(r.path), parent=self.base_name, max_model_len=context,
                                   domain=r.domain, language=r.language, rank=config.get("r"),
                                   eval=metrics.get("eval") if isinstance(metrics.get("eval"), dict) else None))
        return ModelList(data=cards)

    def target(self, model: str, route_text: str) -> Target:
        """The resident that answers `model` (an adapter, the base by its id or as "base", or `auto`)."""
        if model == AUTO:
            try:
                decision = self.router.route(route_text)
            except LorachatError as err:
                raise ServeError(400, err.reason, param="model", code="routing_unavailable") from None
            name = decision.adapter or BASE
        else:
            name = BASE if model in (self.base_name, BASE) else model
            if name not in self.rt.names:
                raise not_found(model, self.names())
            decision = Decision(None if name == BASE else name, "named in the request")
        return Target(name, self.base_name if name == BASE else name, decision)

    def load(self, request: LoadLoRAAdapterRequest) -> str:
        self._check_allowed()
        with self._lock:
            if request.lora_name in self.rt.names or request.lora_name in (self.base_name, AUTO):
                raise ServeError(400, f"an adapter named `{request.lora_name}` is already served", param="lora_name")
            try:
                self.rt.load(Path(request.lora_path), request.lora_name)
            except LorachatError as err:
                raise ServeError(400, str(err), param="lora_path") from None
            self.router = Router.from_residents(self.rt.adapters)
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    def unload(self, request: UnloadLoRAAdapterRequest) -> str:
        self._check_allowed()
        with self._lock:
            if request.lora_name not in self.rt.names or request.lora_name == BASE:
                raise not_found(request.lora_name, self.names())
            self.rt.unload(request.lora_name)
            self.router = Router.from_residents(self.rt.adapters)
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."

    def _check_allowed(self) -> None:
        if not self.allow_runtime_loading:
            raise ServeError(403, "loading adapters at runtime is off; start the server with "
                                  "--allow-runtime-loading", type="permission_error")


class _Prompts:
    """Prompt -> token ids, checked against the context, with a tokenizer of its own.

    The worker thread decodes with the runtime's tokenizer while handlers encode here; a fast tokenizer is
    not safe to share between threads, so this side works on a copy.
    """

    def __init__(self, rt: Any):
        self.tokenizer = copy.deepcopy(rt.tokenizer)
        self.context = rt.context_length

    def encode(self, text: str, param: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ServeError(400, "the prompt is empty", param=param)
        if self.context is not None and len(ids) >= self.context:
            raise ServeError(400, f"This model's maximum context length is {self.context} tokens; the prompt "
                                  f"has {len(ids)}, leaving no room for a reply", param=param,
                             code="context_length_exceeded")
        return ids

    def check_room(self, prompts: list[list[int]], max_tokens: int | None) -> None:
        """A `max_tokens` the context cannot hold with the longest prompt is a 400 naming the limit (as vLLM)."""
        if self.context is None or max_tokens is None:
            return
        longest = max(len(ids) for ids in prompts)
        if longest + max_tokens > self.context:
            raise ServeError(400, f"This model's maximum context length is {self.context} tokens; max_tokens "
                                  f"{max_tokens} with a prompt of {longest} tokens asks for {longest + max_tokens}: "
                                  f"use max_tokens <= {self.context - longest}", param="max_tokens",
                             code="context_length_exceeded")


def submit(batcher: Any, request: Request) -> Job:
    """`request` handed to the batcher; a full queue is a 429 with Retry-After (before any byte of a stream)."""
    try:
        return batcher.submit(request)
    except QueueFull as full:
        raise ServeError(429, f"The server is busy: {full}", type="rate_limit_error", code="queue_full",
                         headers={"Retry-After": str(full.retry_after)}) from None


SHUTTING_DOWN = {"Retry-After": "5"}  # a restart under a process manager takes seconds


async def _next(job: Job) -> Delta | Completion | BaseException:
    """The job's next result; past its deadline (--request-timeout) the job is cancelled and this is a 504."""
    if job.deadline is None:
        return await job.results.get()
    try:
        return await asyncio.wait_for(job.results.get(), job.deadline - job.loop.time())
    except TimeoutError:
        job.cancel()
        raise ServeError(504, "the request took longer than the server's --request-timeout of "
                              f"{job.timeout:g} s", type="timeout_error", code="timeout") from None


def _failed(item: BaseException) -> ServeError:
    if isinstance(item, ServeError):
        return item
    if isinstance(item, Aborted):
        return ServeError(503, f"the server is shutting down: {item}", type="server_error", code="shutting_down",
                          headers=SHUTTING_DOWN)
    return ServeError(500, f"{type(item).__name__}: {item}", type="server_error")


def sampling(request: SamplingFields) -> Sampling:
    return Sampling(max_tokens=request.max_tokens or DEFAULT_MAX_TOKENS, temperature=request.temperature,
                    top_p=request.top_p, seed=request.seed, stop=request.stop_strings())


def _finish(reason: str) -> str | None:
    return reason if reason in ("stop", "length") else None


def _sse(model: Any) -> str:
    return f"data: {model.model_dump_json()}\n\n"


def _sse_error(err: BaseException) -> str:
    return f"data: {_failed(err).response.model_dump_json()}\n\n"


DONE = "data: [DONE]\n\n"


async def _wait(job: Job) -> Completion:
    """The job's completion (its deltas are skipped); re-raises what failed its batch."""
    while True:
        item = await _next(job)
        if isinstance(item, Completion):
            return item
        if isinstance(item, BaseException):
            raise _failed(item)


class ServingChat:
    def __init__(self, models: ServingModels, batcher: Batcher, recorder: Any = None):
        self.models, self.batcher = models, batcher
        self.prompts = _Prompts(models.rt)
        self.recorder = recorder  # serve/recording.py's Recording with --record: each answered exchange is stored

    def prepare(self, request: ChatCompletionRequest) -> tuple[Target, list[int]]:
        messages = [m.as_dict() for m in request.messages]
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
        target = self.models.target(request.model, last_user)
        try:
            text = self.models.rt.render(target.resident, messages)
        except LorachatError as err:
            raise ServeError(400, err.reason, param="messages") from None
        ids = self.prompts.encode(text, "messages")
        self.prompts.check_room([ids], request.max_tokens)
        return target, ids

    async def create(self, request: ChatCompletionRequest, target: Target, ids: list[int]) -> ChatCompletionResponse:
        job = submit(self.batcher, Request(target.resident, ids, sampling(request)))
        try:
            done = await _wait(job)
        finally:
            job.cancel()  # a no-op once finished; frees the row if the handler was cancelled
        response = ChatCompletionResponse(
            model=target.shown, usage=_usage(done),
            choices=[ChatChoice(index=0, message=ChatResponseMessage(content=done.text),
                                finish_reason=_finish(done.finish_reason))])
        if self.recorder:
            self.recorder.exchange(response.id, target, request, done)
        return response

    def stream(self, request: ChatCompletionRequest, target: Target, ids: list[int]) -> AsyncIterator[str]:
        """The request submitted now (a full queue is a 429, not a broken stream), then its events."""
        return self._events(request, target, submit(self.batcher, Request(target.resident, ids, sampling(request))))

    async def _events(self, request: ChatCompletionRequest, target: Target, job: Job) -> AsyncIterator[str]:
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: DeltaMessage, finish: str | None = None, usage: UsageInfo | None = None) -> str:
            choices = [] if usage else [ChatChunkChoice(delta=delta, finish_reason=finish)]
            return _sse(ChatCompletionChunk(id=chunk_id, created=created, model=target.shown, choices=choices,
                                            usage=usage))

        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        try:
            yield chunk(DeltaMessage(role="assistant", content=""))
            while True:
                try:
                    item = await _next(job)
                except ServeError as err:  # timed out
                    item = err
                if isinstance(item, Delta):
                    if item.text or item.finish_reason:
                        yield chunk(DeltaMessage(content=item.text or None), _finish(item.finish_reason or ""))
                elif isinstance(item, Completion):
                    if self.recorder:
                        self.recorder.exchange(chunk_id, target, request, item)
                    if include_usage:
                        yield chunk(DeltaMessage(), usage=_usage(item))
                    break
                else:
                    yield _sse_error(item)
                    break
            yield DONE
        finally:
            job.cancel()  # the client went away mid-stream: its row leaves the batch at the next token


class ServingCompletion:
    def __init__(self, models: ServingModels, batcher: Batcher):
        self.models, self.batcher = models, batcher
        self.prompts = _Prompts(models.rt)

    def prepare(self, request: CompletionRequest) -> tuple[Target, list[list[int]]]:
        prompts = request.prompts()
        # With several prompts, `auto` routes on the first: one response names one model.
        target = self.models.target(request.model, prompts[0])
        ids = [self.prompts.encode(p, "prompt") for p in prompts]
        self.prompts.check_room(ids, request.max_tokens)
        return target, ids

    def _submit(self, request: CompletionRequest, target: Target, ids: list[list[int]]) -> list[Job]:
        """One job per prompt; when the queue fills part-way, those already queued are withdrawn."""
        jobs: list[Job] = []
        try:
            for p in ids:
                jobs.append(submit(self.batcher, Request(target.resident, p, sampling(request))))
        except ServeError:
            for job in jobs:
                job.cancel()
            raise
        return jobs

    async def create(self, request: CompletionRequest, target: Target, ids: list[list[int]]) -> CompletionResponse:
        jobs = self._submit(request, target, ids)
        try:
            done = [await _wait(job) for job in jobs]
        finally:
            for job in jobs:
                job.cancel()
        usage = UsageInfo(prompt_tokens=sum(d.prompt_tokens for d in done),
                          completion_tokens=sum(d.completion_tokens for d in done))
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        return CompletionResponse(model=target.shown, usage=usage,
                                  choices=[CompletionChoice(index=i, text=d.text,
                                                            finish_reason=_finish(d.finish_reason))
                                           for i, d in enumerate(done)])

    def stream(self, request: CompletionRequest, target: Target, ids: list[list[int]]) -> AsyncIterator[str]:
        """Every prompt submitted now (a full queue is a 429, not a broken stream), then their events."""
        return self._events(request, target, self._submit(request, target, ids))

    async def _events(self, request: CompletionRequest, target: Target, jobs: list[Job]) -> AsyncIterator[str]:
        chunk_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        merged: asyncio.Queue = asyncio.Queue()

        async def forward(index: int, job: Job) -> None:
            while True:
                try:
                    item = await _next(job)
                except ServeError as err:  # timed out
                    item = err
                await merged.put((index, item))
                if not isinstance(item, Delta):
                    return

        tasks = [asyncio.create_task(forward(i, job)) for i, job in enumerate(jobs)]
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        usage = UsageInfo()
        try:
            open_rows = len(jobs)
            while open_rows:
                index, item = await merged.get()
                if isinstance(item, Delta):
                    if item.text or item.finish_reason:
                        yield _sse(CompletionStreamResponse(
                            id=chunk_id, created=created, model=target.shown,
                            choices=[CompletionChoice(index=index, text=item.text,
                                                      finish_reason=_finish(item.finish_reason or ""))]))
                    continue
                open_rows -= 1
                if isinstance(item, Completion):
                    usage.prompt_tokens += item.prompt_tokens
                    usage.completion_tokens += item.completion_tokens
                else:
                    yield _sse_error(item)
                    return
            if include_usage:
                usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
                yield _sse(CompletionStreamResponse(id=chunk_id, created=created, model=target.shown, choices=[],
                                                    usage=usage))
            yield DONE
        finally:
            for job, task in zip(jobs, tasks):
                job.cancel()
                task.cancel()


def _usage(done: Completion) -> UsageInfo:
    return UsageInfo(prompt_tokens=done.prompt_tokens, completion_tokens=done.completion_tokens,
                     total_tokens=done.prompt_tokens + done.completion_tokens)
