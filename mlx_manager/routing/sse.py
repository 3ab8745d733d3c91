"""Server-sent events as an upstream sends them: `event:` and `data:` lines, a blank line ends one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerEvent:
    event: str | None  # Anthropic names its events; OpenAI's chunks have none
    data: str


async def server_events(lines: AsyncIterator[str]) -> AsyncIterator[ServerEvent]:
    """The events of a stream of lines; comments (`: keepalive`) and other fields are skipped."""
    event: str | None = None
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield ServerEvent(event, "\n".join(data))
            event, data = None, []
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield ServerEvent(event, "\n".join(data))
