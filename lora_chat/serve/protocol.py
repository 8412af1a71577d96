"""The OpenAI API's shapes, in one place: requests, responses, stream chunks, errors (as vLLM's protocol.py).

Requests accept fields this server does not use (clients send `user`, `frequency_penalty`, ...) and ignore
them, as OpenAI-compatible servers do; the ones that would change the answer if ignored (`n` > 1,
`logprobs`, tools) are refused with a 400 naming the field. Every error is an `ErrorResponse`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MAX_TOKENS = 256  # a reply's length when the request names none (the context caps it too)


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- errors


class ErrorInfo(OpenAIBaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIBaseModel):
    error: ErrorInfo


# ---------------------------------------------------------------- models


class ModelCard(OpenAIBaseModel):
    """One entry of GET /v1/models. Beyond OpenAI's fields: vLLM's `root`/`parent`/`max_model_len`, and what a
    page listing adapters shows (kind, domain, language, rank, the adapter's eval summary)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lorachat"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None
    kind: Literal["base", "adapter"] = "adapter"
    domain: str | None = None
    language: str | None = None
    rank: int | None = None
    eval: dict[str, Any] | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class LoadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(OpenAIBaseModel):
    lora_name: str = Field(min_length=1)


# ---------------------------------------------------------------- shared request fields


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class SamplingFields(OpenAIBaseModel):
    """What both completion endpoints take. temperature defaults to 0: greedy, the same question gets the same
    answer (and, batch-invariant, whatever else the server is answering)."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | int | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is served; send the request again for another sample")
        return n

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("logprobs are not served")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# ---------------------------------------------------------------- chat completions


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, str]:
        """As chat templates take it ("developer" is OpenAI's newer name for the system role)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name for max_tokens
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[Any] | None) -> list[Any] | None:
        if tools:
            raise ValueError("tool calls are not served")
        return tools

    @model_validator(mode="after")
    def _one_length(self) -> ChatCompletionRequest:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class ChatResponseMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(OpenAIBaseModel):
    index: int
    message: ChatResponseMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


def _chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=_chat_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(OpenAIBaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(OpenAIBaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- completions


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt: str | list[str]) -> str | list[str]:
        if not prompt or (isinstance(prompt, list) and not all(prompt)):
            raise ValueError("the prompt is empty")
        return prompt

    @field_validator("echo", "suffix")
    @classmethod
    def _unsupported(cls, value: Any, info: Any) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not served")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


def _completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---------------------------------------------------------------- feedback (lorachat's own, with --record)


class FeedbackRequest(OpenAIBaseModel):
    """POST /v1/feedback: a rating, an edit, or a side-by-side verdict on a response this server gave (its id is
    the `id` of the chat completion, streamed or not)."""

    response_id: str = Field(min_length=1)
    model: str | None = None  # who answered, as the client knows it; checked against the record when given
    rating: Literal["up", "down", "none"] | None = None  # "none" takes an earlier rating back
    edit: str | None = None  # what the reply should have said
    other_response_id: str | None = None  # the other reply to the same prompt, for `winner`
    winner: Literal["a", "b", "tie"] | None = None  # a: response_id's reply is better, b: other_response_id's

    @model_validator(mode="after")
    def _one_kind(self) -> FeedbackRequest:
        if self.rating is None and self.edit is None and self.winner is None:
            raise ValueError("give a rating (up, down, none), an edit, or a winner with other_response_id")
        if (self.winner is None) != (self.other_response_id is None):
            raise ValueError("winner and other_response_id go together: which of the two replies is better")
        if self.edit is not None and not self.edit.strip():
            raise ValueError("the edit is empty: write what the reply should have said")
        if self.other_response_id == self.response_id:
            raise ValueError("a reply cannot be compared with itself")
        return self


class FeedbackResponse(OpenAIBaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created: int = Field(default_factory=lambda: int(time.time()))
    response_id: str
    model: str


class RecordingStatus(OpenAIBaseModel):
    """GET /v1/feedback: whether this server records exchanges (the page shows a badge when it does)."""

    object: Literal["recording"] = "recording"
    recording: bool
    server: str | None = None
