"""A stream relayed in its own dialect: a streamed Chat Completions request routed to an `openai`
backend gets the upstream's server-sent events as they came, not decoded into engine events and
written again chunk by chunk (JSON in, JSON out, and an event hand-off per token).

Only what must change is changed: each chunk's `id` (ours, from the client's request id) and
`model` (the name the client asked for). A plain delta chunk is rewritten by replacing those two
fields as the upstream wrote them (bytes, no JSON). A chunk that matters to us, or that the quick
check cannot vouch for, is parsed, read by the stream's decoder and written again: those before
the answer's first piece (the fallback decision needs it), a finish reason, usage, a tool call, an
error, or one whose `id` or `model` is not the one seen first. The decoder so learns the finish
reason, the usage and the tool calls for the audit row. The usage chunk is held until the audit
row is durable (it goes out with [DONE]); without `include_usage` it is dropped.

`EventRelay` is what the dialects' relays share: the split of the upstream's bytes into events,
the stream's end, and the tail held until the outcome is final. Anthropic's Messages stream is
relayed by `message_relay.MessageRelay`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from mlx_manager.engine.types import Event, Finished
from mlx_manager.routing.openai_wire import ChunkDecoder
from mlx_manager.routing.sse import server_event
from mlx_manager.routing.wire import StreamDecoder

_NULL_FINISH = re.compile(rb'"finish_reason"\s*:\s*null')
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')
_ID = re.compile(rb'"id"\s*:\s*"(?:[^"\\]|\\.)*"')
_MODEL = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
# A chunk holding one of these keys is parsed (a key's quotes cannot occur inside a JSON string).
_PARSED_KEYS = re.compile(rb'"(?:tool_calls|function_call|error)"')


@dataclass(frozen=True)
class Relay:
    """What the client's stream says that the upstream's does not: the chunk (or message) id and
    model name, and whether the client asked for the usage chunk (chat). `dialect`: the client's,
    the type of backend whose stream may be relayed to it as it is."""

    id: str
    model: str
    include_usage: bool
    dialect: Literal["openai", "anthropic"] = "openai"


@dataclass(frozen=True)
class RelayEnd:
    """The relayed answer's end: how it finished, its tool calls, and the stream's last bytes
    (the relay's `ending()`), to send once the outcome is final."""

    finished: Finished
    tool_calls: int
    tail: bytes


class EventRelay:
    """An upstream's stream, bytes in, relayable bytes and engine events out; a dialect's relay
    says what one event becomes (`_event`)."""

    def __init__(self, relay: Relay, decoder: StreamDecoder) -> None:
        self.relay = relay
        self.decoder = decoder
        self.tail: list[bytes] = []  # what goes out once the outcome is final
        self._buffer = b""  # an event not complete yet

    def feed(self, data: bytes) -> tuple[list[bytes], list[Event]]:
        """The complete events of what came so far: their bytes to relay, and the engine events
        the parsed ones mean. Raises the decoder's errors (an upstream error event)."""
        buffer = self._buffer + data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *complete, self._buffer = buffer.split(b"\n\n")
        out: list[bytes] = []
        events: list[Event] = []
        for text in complete:
            self._event(text, out, events)
        return out, events

    def end(self) -> tuple[list[bytes], list[Event]]:
        """The stream closed: an event that lacked its blank line, then what the end means."""
        out: list[bytes] = []
        events: list[Event] = []
        if self._buffer.strip():
            self._event(self._buffer, out, events)
            self._buffer = b""
        if not any(isinstance(event, Finished) for event in events):
            events += self.decoder.end()
        return out, events

    def ending(self) -> bytes:
        """The stream's last bytes, sent once the outcome is final: the tail."""
        return b"".join(self.tail)

    def _event(self, text: bytes, out: list[bytes], events: list[Event]) -> None:
        """Relay one complete event (its lines, without the blank line) to `out` or the tail, and
        add the engine events it means to `events`."""
        raise NotImplementedError


class ChunkRelay(EventRelay):
    """An upstream's chat stream (see the module doc)."""

    def __init__(self, relay: Relay, decoder: ChunkDecoder) -> None:
        super().__init__(relay, decoder)
        self.decoder: ChunkDecoder = decoder
        self._ours = (_field("id", relay.id), _field("model", relay.model))
        self._theirs: tuple[bytes, bytes] | None = None  # `"id":"..."`, `"model":"..."` as the upstream writes them

    def ending(self) -> bytes:
        """The usage chunk (if asked for), then [DONE]."""
        return super().ending() + b"data: [DONE]\n\n"

    def _event(self, text: bytes, out: list[bytes], events: list[Event]) -> None:
        name: str | None = None
        if text.startswith(b"data: ") and b"\n" not in text:
            payload = text[6:]
        else:
            event = server_event(text.decode().split("\n"))
            if event is None:
                return  # a comment (keepalive) or an event without data
            name, payload = event.event, event.data.encode()
        if payload == b"[DONE]":
            events += self.decoder.done()
            return
        if name is None and (fast := self._rewritten(payload)) is not None:
            out.append(b"data: " + fast + b"\n\n")
            return
        chunk: Any = json.loads(payload)
        events += self.decoder.decode_chunk(chunk, name)  # an error event raises here
        if self._theirs is None:
            self._learn(payload, chunk)
        # The usage chunk (no choices) is held for the end, or dropped; usage riding on a chunk
        # of the answer (some servers send it on each) goes on with it, if the client asked for it.
        usage_chunk = bool(chunk.get("usage")) and not chunk.get("choices")
        if usage_chunk and not self.relay.include_usage:
            return
        if chunk.get("usage") and not self.relay.include_usage:
            del chunk["usage"]
        chunk["id"], chunk["model"] = self.relay.id, self.relay.model
        line = b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"
        (self.tail if usage_chunk else out).append(line)

    def _rewritten(self, payload: bytes) -> bytes | None:
        """A plain delta chunk with our id and model, or None if it must be parsed."""
        theirs = self._theirs
        if theirs is None or not self.decoder.started:
            return None
        if _PARSED_KEYS.search(payload):
            return None
        if not _all_null(payload, b'"finish_reason"', _NULL_FINISH) or not _all_null(payload, b'"usage"', _NULL_USAGE):
            return None
        their_id, their_model = theirs
        if payload.count(b'"id"') != 1 or payload.count(b'"model"') != 1:
            return None
        if their_id not in payload or their_model not in payload:
            return None
        our_id, our_model = self._ours
        return payload.replace(their_id, our_id, 1).replace(their_model, our_model, 1)

    def _learn(self, payload: bytes, chunk: Any) -> None:
        """How the upstream writes its id and model fields: found in the first chunk that has both."""
        if not isinstance(chunk, dict):
            return
        their_id = _written(_ID, payload, chunk.get("id"))
        their_model = _written(_MODEL, payload, chunk.get("model"))
        if their_id is not None and their_model is not None:
            self._theirs = (their_id, their_model)


def _all_null(payload: bytes, key: bytes, null: re.Pattern[bytes]) -> bool:
    """Whether every `key` in the payload is followed by null (so, with none, too). The compact
    spelling of a single one is checked without the pattern: this runs for every relayed chunk."""
    count = payload.count(key)
    if count == 0 or (count == 1 and key + b":null" in payload):
        return True
    return count == len(null.findall(payload))


def _field(key: str, value: str) -> bytes:
    return json.dumps({key: value}, separators=(",", ":"), ensure_ascii=False)[1:-1].encode()


def _written(pattern: re.Pattern[bytes], payload: bytes, value: Any) -> bytes | None:
    """The field as it is written in `payload` (its spacing and escapes) with this value, or None."""
    if not isinstance(value, str):
        return None
    for match in pattern.finditer(payload):
        text = match.group(0)
        if json.loads(text[text.index(b":") + 1 :]) == value:
            return text
    return None
