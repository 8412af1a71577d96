"""The HTTP routes: each pulls its handler from `app.state`, calls it, returns its model (as vLLM's api_router.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .protocol import ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .serving import ServingChat, ServingCompletion, ServingModels

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _models(raw: Request) -> ServingModels:
    return raw.app.state.models


async def _answer(handler: ServingChat | ServingCompletion, request: ChatCompletionRequest | CompletionRequest):
    """Both completion routes: the handler places the request, then streams it (SSE) or answers whole; either
    way the router's decision rides along in the headers."""
    target, ids = handler.prepare(request)
    if request.stream:
        return StreamingResponse(handler.stream(request, target, ids), media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **target.headers()})
    return JSONResponse((await handler.create(request, target, ids)).model_dump(), headers=target.headers())


@router.get("/v1/models")
async def show_models(raw: Request) -> JSONResponse:
    return JSONResponse(_models(raw).list().model_dump())


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw: Request):
    return await _answer(raw.app.state.chat, request)


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw: Request):
    return await _answer(raw.app.state.completion, request)


# Plain functions, so FastAPI runs them in its thread pool: loading weights must not stall the event loop.
@router.post("/v1/load_lora_adapter")
def load_lora_adapter(request: LoadLoRAAdapterRequest, raw: Request):
    return JSONResponse(_models(raw).load(request))


@router.post("/v1/unload_lora_adapter")
def unload_lora_adapter(request: UnloadLoRAAdapterRequest, raw: Request):
    return JSONResponse(_models(raw).unload(request))
