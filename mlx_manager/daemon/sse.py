"""Server-sent events as the APIs send them: OpenAI's chat chunks as `data: {json}` lines and
`data: [DONE]` at the end; Anthropic's and the Responses API's typed events with their `event:` name."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


def sse_data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_error(document: dict[str, Any]) -> str:
    return f"event: error\ndata: {json.dumps(document, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_event(event: BaseModel) -> str:
    """A typed event (a model with a `type` field): named by its type, its JSON as the data."""
    return f"event: {event.type}\ndata: {event.model_dump_json()}\n\n"  # type: ignore[attr-defined]


def sse_done() -> str:
    return "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that always closes its body and calls `on_close`.

    Starlette stops iterating when the client disconnects but leaves the generator suspended
    until garbage collection; closing it here cancels the engine job right away."""

    media_type = "text/event-stream"

    def __init__(
        self, content: AsyncIterator[str] | AsyncIterator[bytes], on_close: Callable[[], None] | None = None
    ) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # ours: an async generator
            if self.on_close is not None:
                self.on_close()
