"""`serve --record DIR`: each answered chat exchange, and the feedback given on it, appended to DIR.

`ServingChat` calls `exchange` where a reply completes (streamed or not), with the id the client got; the
feedback route calls `feedback`. The files and their crash safety are `feedback.store`'s. Each server process
has its own id, stored with every record, so a vote meant for another server's reply (DIR shared, or a page
left open across a restart) is refused rather than joined to the wrong exchange.

Lookups: the last `REMEMBERED` replies of this server are kept in memory; an older or foreign id is looked
for in DIR's files (only lines holding the id are parsed), which only a rare vote pays for.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..feedback.store import RecordWriter, Skipped, iter_lines, prompt_key
from ..runtime import BASE, Completion
from .protocol import ChatCompletionRequest, FeedbackRequest, FeedbackResponse, RecordingStatus
from .serving import ServeError, ServingModels, Target, not_found, sampling

log = logging.getLogger("lora_chat.serve")
REMEMBERED = 100_000  # replies whose model and prompt stay in memory for votes (~200 bytes each)


def recording_off() -> ServeError:
    return ServeError(400, "this server does not record feedback; start it with --record DIR",
                      code="recording_off")


class Recording:
    def __init__(self, folder: Path, models: ServingModels):
        self.server = secrets.token_hex(6)
        self.models = models
        self.writer = RecordWriter(Path(folder), self.server)
        self._recent: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (model, prompt_key)
        self._lock = threading.Lock()  # exchanges arrive on the event loop, votes in the thread pool

    def status(self) -> RecordingStatus:
        return RecordingStatus(recording=True, server=self.server)

    def exchange(self, response_id: str, target: Target, request: ChatCompletionRequest, done: Completion) -> None:
        """Store one answered exchange. A write that fails is logged, not raised: the reply has been given."""
        messages = [m.as_dict() for m in request.messages]
        s = sampling(request)
        record = {"kind": "exchange", "id": response_id, "server": self.server, "time": round(time.time(), 3),
                  "model": target.shown, "adapter": None if target.resident == BASE else target.resident,
                  "base": self.models.base_name, "messages": messages, "reply": done.text,
                  "finish_reason": done.finish_reason,
                  "sampling": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                               "seed": s.seed, "stop": list(s.stop)},
                  "route": asdict(target.decision),
                  "usage": {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens}}
        try:
            self.writer.append(record)
        except OSError as err:
            log.error("recording failed for %s: %s", response_id, err)
            return
        with self._lock:
            self._recent[response_id] = (target.shown, prompt_key(messages))
            if len(self._recent) > REMEMBERED:
                self._recent.popitem(last=False)

    def feedback(self, request: FeedbackRequest) -> FeedbackResponse:
        model, prompt = self._find(request.response_id, "response_id")
        if request.model is not None and request.model != model:
            if request.model not in self.models.names():
                raise not_found(request.model, self.models.names())
            raise ServeError(400, f"response `{request.response_id}` was answered by `{model}`, not "
                                  f"`{request.model}`", param="model")
        record: dict[str, Any] = {"id": f"fb-{secrets.token_hex(12)}", "server": self.server,
                                  "time": round(time.time(), 3)}
        if request.winner is not None:
            other_model, other_prompt = self._find(request.other_response_id, "other_response_id")
            if other_prompt != prompt:
                raise ServeError(400, "the two replies answer different prompts: compare replies to the same "
                                      "messages", param="other_response_id", code="different_prompts")
            record.update(kind="comparison", responses=[request.response_id, request.other_response_id],
                          models=[model, other_model], winner=request.winner)
        else:
            record.update(kind="feedback", response=request.response_id, model=model)
            if request.rating is not None:
                record["rating"] = None if request.rating == "none" else request.rating
            if request.edit is not None:
                record["edit"] = request.edit
        try:
            self.writer.append(record)
        except OSError as err:
            raise ServeError(500, f"the feedback could not be stored: {err}", type="server_error") from None
        return FeedbackResponse(id=record["id"], response_id=request.response_id, model=model)

    def _find(self, response_id: str, param: str) -> tuple[str, str]:
        """(model, prompt) of a reply this server gave and still holds the model of; else an OpenAI error."""
        with self._lock:
            found = self._recent.get(response_id)
        if found is None:
            found = self._look_up(response_id, param)
        model = found[0]
        if model not in self.models.names():
            raise ServeError(404, f"response `{response_id}` was answered by `{model}`, which this server no "
                                  f"longer serves; served: {', '.join(self.models.names())}", param="model",
                             code="model_not_found")
        return found

    def _look_up(self, response_id: str, param: str) -> tuple[str, str]:
        for item in iter_lines(self.writer.folder, needle=response_id):
            if isinstance(item, Skipped) or item["kind"] != "exchange" or item["id"] != response_id:
                continue
            if item.get("server") != self.server:
                raise ServeError(409, f"response `{response_id}` was given by another server "
                                      f"({item.get('server')}), not this one ({self.server}): send its feedback "
                                      "there", param=param, code="response_from_another_server")
            return item["model"], prompt_key(item["messages"])
        raise ServeError(404, f"no response `{response_id}` recorded here (ids are the `id` of a chat "
                              "completion from this server)", param=param, code="response_not_found")

    def close(self) -> None:
        self.writer.close()

