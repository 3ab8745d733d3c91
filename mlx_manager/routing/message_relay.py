"""Anthropic's Messages stream relayed as it is: a streamed Messages request routed to an
`anthropic` backend gets the upstream's events as they came (relay.py's machinery), not decoded
into engine events and written again.

Anthropic names each event, so the relay reads the name of most, not their JSON: once the answer
has begun, a `content_block_delta` (text, thinking, a tool call's input) goes on as the upstream
wrote it. The other events are few and are read by the stream's decoder: those before the answer's
first piece (the fallback decision needs it), block starts and stops (tool calls are counted), the
stop reason and usage (for the audit row), an `error` (it raises; the daemon sends its own error
event). `message_start` is written again with our id and the client's model name; `message_delta`
and `message_stop` are held until the audit row is durable. `ping` and events the decoder does not
know go on as they are.
"""

from __future__ import annotations

import json

from mlx_manager.engine.types import Event
from mlx_manager.routing.relay import EventRelay
from mlx_manager.routing.sse import server_event

_DELTA = b"event: content_block_delta\n"
_HELD = ("message_delta", "message_stop")  # the answer's end: sent once the outcome is final


class MessageRelay(EventRelay):
    """An upstream's Messages stream, read by an `anthropic_wire.EventDecoder` (see the module doc)."""

    def _event(self, text: bytes, out: list[bytes], events: list[Event]) -> None:
        if self.decoder.started and text.startswith(_DELTA):
            out.append(text + b"\n\n")
            return
        event = server_event(text.decode().split("\n"))
        if event is None:
            return  # a comment or an event without data
        events += self.decoder.decode(event)  # an error event raises here
        kind = event.event
        if kind is None:  # unnamed: its type says what it is
            document = json.loads(event.data)
            kind = document.get("type") if isinstance(document, dict) else None
        if kind == "message_start":
            document = json.loads(event.data)
            document["message"]["id"], document["message"]["model"] = self.relay.id, self.relay.model
            data = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
            text = f"event: message_start\ndata: {data}".encode()
        (self.tail if kind in _HELD else out).append(text + b"\n\n")
