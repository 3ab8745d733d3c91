"""Server-sent events as an upstream sends them: `event:` and `data:` lines, a blank line ends one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerEvent:
    event: str | None  # Anthropic names its events; OpenAI's chunks have none
    data: str


async def server_events(lines: AsyncIterator[str]) -> AsyncIterator[ServerEvent]:
    """The events of a stream of lines; comments (`: keepalive`) and other fields are skipped."""
    block: list[str] = []
    async for line in lines:
        if line:
            block.append(line)
            continue
        if (event := server_event(block)) is not None:
            yield event
        block = []
    if (event := server_event(block)) is not None:
        yield event


def server_event(lines: Iterable[str]) -> ServerEvent | None:
    """One event from its lines (None without data: a comment, a keepalive)."""
    event: str | None = None
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
        elif line.startswith("event:"):
            event = line[6:].strip()
    return ServerEvent(event, "\n".join(data)) if data else None
