"""The relay of an Anthropic Messages stream (routing/message_relay.py) on bytes as Anthropic's API
writes them: CRLF line ends, a ping, a thinking block with its signature, text, a tool call's input
in pieces, the usage in message_delta; and cut by the network at any byte. The real upstream (our
daemon's /v1/messages, as an `anthropic` backend) is in tests/test_routing.py."""

from __future__ import annotations

import json

import pytest

from mlx_manager.engine.types import Finished, Started
from mlx_manager.routing.anthropic_wire import EventDecoder
from mlx_manager.routing.errors import RoutingError
from mlx_manager.routing.message_relay import MessageRelay
from mlx_manager.routing.relay import Relay
from tests.test_routing_relay import fed


def event(name: str, data: dict) -> str:
    return f"event: {name}\r\ndata: {json.dumps(data)}\r\n\r\n"


def delta(index: int, **fields: str) -> str:
    kind = next(iter(fields))
    typed = {"text": "text_delta", "thinking": "thinking_delta", "partial_json": "input_json_delta"}
    typed["signature"] = "signature_delta"
    return event(
        "content_block_delta",
        {"type": "content_block_delta", "index": index, "delta": {"type": typed[kind], **fields}},
    )


START = {
    "type": "message_start",
    "message": {
        "id": "msg_theirs",
        "type": "message",
        "role": "assistant",
        "model": "claude-upstream",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 2, "output_tokens": 1},
    },
}
THEIRS = [
    event("message_start", START),
    event("ping", {"type": "ping"}),
    event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking"}}),
    delta(0, thinking="let me see"),
    delta(0, signature="c2lnbmVk"),
    event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "text"}}),
    delta(1, text='say "hi"'),
    delta(1, text=" there"),
    event("content_block_stop", {"type": "content_block_stop", "index": 1}),
    event(
        "content_block_start",
        {
            "type": "content_block_start",
            "index": 2,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
        },
    ),
    delta(2, partial_json='{"city": '),
    delta(2, partial_json='"Paris"}'),
    event("content_block_stop", {"type": "content_block_stop", "index": 2}),
    event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 9},
        },
    ),
    event("message_stop", {"type": "message_stop"}),
]
STREAM = "".join(THEIRS).encode()


def relay_all(parts: list[bytes]) -> tuple[bytes, list[object], MessageRelay]:
    relay = MessageRelay(Relay("msg_ours", "client-name", True, "anthropic"), EventDecoder("up"))
    return *fed(relay, parts), relay


def named(body: bytes) -> list[tuple[str, dict]]:
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    pairs = [event.split("\n") for event in events[:-1]]
    return [(name.removeprefix("event: "), json.loads(data.removeprefix("data: "))) for name, data in pairs]


def test_an_anthropic_stream_cut_at_any_byte_is_relayed_with_our_id_and_model_and_its_end_held():
    whole, events, relay = relay_all([STREAM])
    sent = named(whole)
    start = sent[0][1]["message"]
    assert (start["id"], start["model"], start["usage"]) == ("msg_ours", "client-name", START["message"]["usage"])
    # Every other event goes on as the upstream wrote it (line ends aside), the answer's end held back.
    assert whole.split(b"\n\n", 1)[1] == "".join(THEIRS[1:-2]).replace("\r\n", "\n").encode()
    assert [name for name, _ in named(relay.ending())] == ["message_delta", "message_stop"]
    assert named(relay.ending())[0][1]["usage"] == {"output_tokens": 9}
    assert isinstance(events[0], Started) and events[0].prompt_tokens == 7
    assert events[-1] == Finished("tool_calls", 7, 9, cached_tokens=2)
    assert relay.decoder.upstream_usage == (7, 9) and relay.decoder.calls == 1
    for cut in range(1, len(STREAM)):
        assert relay_all([STREAM[:cut], STREAM[cut:]])[0] == whole, cut


def test_an_error_event_in_the_stream_is_an_upstream_error():
    relay = MessageRelay(Relay("msg_ours", "m", True, "anthropic"), EventDecoder("up"))
    relay.feed("".join(THEIRS[:8]).encode())
    with pytest.raises(RoutingError) as error:
        relay.feed(
            event("error", {"type": "error", "error": {"type": "overloaded_error", "message": "the prompt"}}).encode()
        )
    assert (error.value.kind, error.value.upstream_type) == ("upstream_unavailable", "overloaded_error")


def test_a_stream_that_ends_before_message_stop_is_an_upstream_error():
    relay = MessageRelay(Relay("msg_ours", "m", True, "anthropic"), EventDecoder("up"))
    relay.feed("".join(THEIRS[:-1]).encode())
    with pytest.raises(RoutingError) as error:
        relay.end()
    assert error.value.kind == "upstream_error" and error.value.retryable
