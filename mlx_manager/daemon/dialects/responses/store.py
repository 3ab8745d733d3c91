"""Stored responses (`store`, `previous_response_id`, GET and DELETE /v1/responses/{id}), in
memory only.

A stored response holds prompt and completion text, which never go to disk here: so responses
live in this process, at most `max_responses` of them (the oldest go first) and for `ttl`
seconds, and are lost on restart. Each keeps the conversation it continued by reference, so a
long chain costs the new turns of each response, not the whole history again. A response is
only found with the API key that created it (or, with no keys, by anyone).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from mlx_manager.daemon.dialects.responses.protocol import ResponseObject

MAX_RESPONSES = 1000
TTL_SECONDS = 3600.0


@dataclass
class StoredResponse:
    response: ResponseObject
    turns: list[dict[str, Any]]  # the messages it added to the conversation: its input, then its output
    owner: str | None  # the name of the API key that made it
    parent: StoredResponse | None = None  # the response it continued (previous_response_id)
    stored_at: float = field(default_factory=time.monotonic)

    def conversation(self) -> list[dict[str, Any]]:
        """Every message up to and including this response's output (instructions excluded, as
        OpenAI does: each request gives its own)."""
        chain: list[StoredResponse] = []
        node: StoredResponse | None = self
        while node is not None:
            chain.append(node)
            node = node.parent
        return [turn for node in reversed(chain) for turn in node.turns]


class ResponseStore:
    def __init__(self, max_responses: int = MAX_RESPONSES, ttl: float = TTL_SECONDS) -> None:
        self.max_responses = max_responses
        self.ttl = ttl
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._responses)

    def put(self, stored: StoredResponse) -> None:
        stored.stored_at = time.monotonic()
        self._responses[stored.response.id] = stored
        self._responses.move_to_end(stored.response.id)
        self._expire()
        while len(self._responses) > self.max_responses:
            self._responses.popitem(last=False)

    def get(self, response_id: str, owner: str | None) -> StoredResponse | None:
        """The stored response, if it is there, not expired and `owner`'s."""
        self._expire()
        stored = self._responses.get(response_id)
        return stored if stored is not None and stored.owner == owner else None

    def delete(self, response_id: str, owner: str | None) -> bool:
        if self.get(response_id, owner) is None:
            return False
        del self._responses[response_id]
        return True

    def _expire(self) -> None:
        """Drop responses older than the TTL: the oldest come first, so stop at the first young one."""
        limit = time.monotonic() - self.ttl
        while self._responses:
            oldest = next(iter(self._responses.values()))
            if oldest.stored_at > limit:
                return
            self._responses.popitem(last=False)
