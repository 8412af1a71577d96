"""The HTTP routes: each pulls its handler from `app.state`, calls it, returns its model (as vLLM's api_router.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from .protocol import ChatCompletionRequest, CompletionRequest, LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from .metrics import CONTENT_TYPE, ServeMetrics
from .serving import AUTO, ServeError, ServingChat, ServingCompletion, ServingModels

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _models(raw: Request) -> ServingModels:
    return raw.app.state.models


async def _answer(handler: ServingChat | ServingCompletion, request: ChatCompletionRequest | CompletionRequest,
                  raw: Request):
    """Both completion routes: the handler places the request, then streams it (SSE) or answers whole; either
    way the router's decision rides along in the headers, and the request is counted by model and status."""
    metrics: ServeMetrics = raw.app.state.metrics
    model = request.model if request.model == AUTO or request.model in _models(raw).names() else "unknown"
    try:
        target, ids = handler.prepare(request)
        metrics.routed(target.decision.adapter)
        if request.stream:
            response = StreamingResponse(handler.stream(request, target, ids), media_type="text/event-stream",
                                         headers={**SSE_HEADERS, **target.headers()})
        else:
            response = JSONResponse((await handler.create(request, target, ids)).model_dump(),
                                    headers=target.headers())
    except ServeError as err:
        metrics.request(model, err.status)
        raise
    metrics.request(model, response.status_code)
    return response


@router.get("/health")
async def health() -> JSONResponse:
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(raw: Request) -> JSONResponse:
    """503 while draining, so a load balancer stops sending before the process goes."""
    if raw.app.state.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    return JSONResponse({"status": "ready", "models": _models(raw).names()})


@router.get("/metrics")
async def metrics(raw: Request) -> Response:
    return Response(raw.app.state.metrics.exposition(), media_type=CONTENT_TYPE)


@router.get("/v1/models")
async def show_models(raw: Request) -> JSONResponse:
    return JSONResponse(_models(raw).list().model_dump())


@router.post("/v1/chat/completions")
async def create_chat_completion(request: ChatCompletionRequest, raw: Request):
    return await _answer(raw.app.state.chat, request, raw)


@router.post("/v1/completions")
async def create_completion(request: CompletionRequest, raw: Request):
    return await _answer(raw.app.state.completion, request, raw)


# Plain functions, so FastAPI runs them in its thread pool: loading weights must not stall the event loop.
@router.post("/v1/load_lora_adapter")
def load_lora_adapter(request: LoadLoRAAdapterRequest, raw: Request):
    return JSONResponse(_models(raw).load(request))


@router.post("/v1/unload_lora_adapter")
def unload_lora_adapter(request: UnloadLoRAAdapterRequest, raw: Request):
    return JSONResponse(_models(raw).unload(request))
