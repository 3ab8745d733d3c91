"""The relay of a same-dialect stream (routing/relay.py) on bytes as a foreign server writes them:
spaces after the colons, CRLF line ends, a keepalive comment, an id of its own, a model path with
an escaped slash, a quote in the text; and cut by the network at any byte. The real upstreams (our
daemon, mlx_lm.server) are in tests/test_routing.py and tests/test_routing_processes.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mlx_manager.engine.types import Finished, Started
from mlx_manager.routing.errors import RoutingError
from mlx_manager.routing.openai_wire import ChunkDecoder
from mlx_manager.routing.relay import ChunkRelay, Relay


def chunk(delta: dict, finish: str | None = None, chunk_id: str = "cmpl-theirs") -> str:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    data = json.dumps({"id": chunk_id, "object": "chat.completion.chunk", "model": "org/m", "choices": [choice]})
    return data.replace('"org/m"', '"org\\/m"')  # as some servers escape a slash


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
FOREIGN = (
    "".join(
        f"data: {data}\r\n\r\n"
        for data in (
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": 'say "hi"'}),
            chunk({"content": " there"}),
            chunk({"content": "!"}, chunk_id="cmpl-other"),  # another id: parsed, still ours after
            chunk({}, "length"),
            json.dumps({"id": "cmpl-theirs", "model": "org/m", "choices": [], "usage": USAGE}),
            "[DONE]",
        )
    ).replace("data: " + chunk({"content": " there"}), ": keepalive\r\n\r\ndata: " + chunk({"content": " there"}))
).encode()


def fed(relay: Any, parts: list[bytes]) -> tuple[bytes, list[object]]:
    """What `relay` sends and the events it decodes, fed `parts` one after another."""
    out, events = b"", []
    for part in parts:
        relayed, more = relay.feed(part)
        out += b"".join(relayed)
        events += more
    return out, events


def relay_all(parts: list[bytes], include_usage: bool = True) -> tuple[bytes, list[object], ChunkRelay]:
    relay = ChunkRelay(Relay("chatcmpl-ours", "client-name", include_usage), ChunkDecoder("up"))
    return *fed(relay, parts), relay


def data_of(body: bytes) -> list[dict]:
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    return [json.loads(event.removeprefix("data: ")) for event in events[:-1]]


def test_a_foreign_stream_cut_at_any_byte_is_relayed_with_our_id_and_model_and_its_usage_held():
    whole, events, relay = relay_all([FOREIGN])
    chunks = data_of(whole)
    assert {(c["id"], c["model"]) for c in chunks} == {("chatcmpl-ours", "client-name")}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == 'say "hi" there!'
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # A plain delta goes out as the upstream wrote it, only its id and model replaced.
    plain = chunk({"content": " there"})
    plain = plain.replace('"id": "cmpl-theirs"', '"id":"chatcmpl-ours"')
    plain = plain.replace(r'"model": "org\/m"', '"model":"client-name"')
    assert f"data: {plain}\n\n".encode() in whole
    tail = data_of(b"".join(relay.tail))
    assert [(c["id"], c["model"], c["usage"]) for c in tail] == [("chatcmpl-ours", "client-name", USAGE)]
    assert isinstance(events[0], Started) and events[-1] == Finished("length", 7, 3)
    assert relay.decoder.upstream_usage == (7, 3)
    for cut in range(1, len(FOREIGN)):
        assert relay_all([FOREIGN[:cut], FOREIGN[cut:]])[0] == whole, cut


def test_a_compact_stream_has_its_plain_deltas_rewritten_and_its_finish_and_usage_read():
    """Written without spaces, as our daemon and most servers write it (null fields checked without a pattern)."""

    def compact(delta: dict | None, finish: str | None = None, **fields: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return json.dumps({"id": "c1", "model": "m", "choices": choices, **fields}, separators=(",", ":"))

    plain = compact({"content": "a"}, usage=None)
    parts = [compact({"role": "assistant", "content": ""}), plain, compact({}, "stop", usage=None)]
    parts += [compact(None, usage=USAGE), "[DONE]"]
    whole, events, relay = relay_all(["".join(f"data: {part}\n\n" for part in parts).encode()])

    ours = plain.replace('"id":"c1"', '"id":"chatcmpl-ours"').replace('"model":"m"', '"model":"client-name"')
    assert f"data: {ours}\n\n".encode() in whole
    assert data_of(whole)[-1]["choices"][0]["finish_reason"] == "stop"
    assert [c["usage"] for c in data_of(b"".join(relay.tail))] == [USAGE]
    assert events[-1] == Finished("stop", 7, 3)


def test_without_include_usage_the_usage_chunk_is_dropped():
    whole, events, relay = relay_all([FOREIGN], include_usage=False)
    assert relay.tail == [] and all("usage" not in c or c["usage"] is None for c in data_of(whole))
    assert events[-1] == Finished("length", 7, 3)  # the audit row still has the counts


def test_an_error_event_in_the_stream_is_an_upstream_error():
    relay = ChunkRelay(Relay("chatcmpl-ours", "m", True), ChunkDecoder("up"))
    relay.feed(f"data: {chunk({'content': 'a'})}\n\n".encode())
    with pytest.raises(RoutingError) as error:
        relay.feed(b'event: error\ndata: {"error": {"type": "overloaded_error", "message": "the prompt"}}\n\n')
    assert (error.value.kind, error.value.upstream_type) == ("upstream_unavailable", "overloaded_error")


def test_a_stream_that_ends_before_its_finish_is_an_upstream_error():
    relay = ChunkRelay(Relay("chatcmpl-ours", "m", True), ChunkDecoder("up"))
    relay.feed(f"data: {chunk({'content': 'a'})}\n\ndata: {chunk({'content': 'b'})}".encode())
    with pytest.raises(RoutingError) as error:
        relay.end()
    assert error.value.kind == "upstream_error" and error.value.retryable


def test_usage_on_every_chunk_does_not_hold_the_answer_back():
    """Some servers (vLLM's continuous usage stats) put the running usage on each chunk."""
    relay = ChunkRelay(Relay("chatcmpl-ours", "m", False), ChunkDecoder("up"))
    running = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
    first = json.loads(chunk({"content": "a"}))
    out, events = relay.feed(f"data: {json.dumps({**first, 'usage': running})}\n\n".encode())
    assert [c["choices"][0]["delta"]["content"] for c in data_of(b"".join(out))] == ["a"]
    assert "usage" not in data_of(b"".join(out))[0]  # not asked for
    assert isinstance(events[0], Started) and relay.tail == []
