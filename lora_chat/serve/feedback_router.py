"""The feedback routes (`serve --record DIR`): whether this server records, and feedback on one of its replies."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from .protocol import FeedbackRequest, RecordingStatus
from .recording import Recording, recording_off

router = APIRouter()


def _recording(raw: Request) -> Recording | None:
    return raw.app.state.recording


@router.get("/v1/feedback")
async def recording_status(raw: Request) -> JSONResponse:
    recording = _recording(raw)
    return JSONResponse((recording.status() if recording else RecordingStatus(recording=False)).model_dump())


# A plain function, so FastAPI runs it in its thread pool: looking up an old reply reads the record files.
@router.post("/v1/feedback")
def create_feedback(request: FeedbackRequest, raw: Request) -> JSONResponse:
    recording = _recording(raw)
    if recording is None:
        raise recording_off()
    return JSONResponse(recording.feedback(request).model_dump())
