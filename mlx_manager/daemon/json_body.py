"""Request bodies read as strict JSON (RFC 8259's UTF-8, I-JSON's whole characters).

Python's `json` takes `"\\ud800"`, half of a UTF-16 surrogate pair, and makes a string that no
UTF-8 encoder (the tokenizer's, SQLite's, the log's) will take: a 500 deep in the engine. Here
such a body is refused at once as malformed JSON (422), whatever field holds it.

Routers whose routes take a JSON body use `StrictJsonRoute` (FastAPI's way to swap the Request).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# Every escape in a JSON text, in order: a whole pair, a surrogate alone, any other escape.
_ESCAPES = re.compile(
    r"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}|u[dD][89a-fA-F][0-9a-fA-F]{2}|.)", re.DOTALL
)


def loads(body: bytes) -> Any:
    """The JSON value of `body`; json.JSONDecodeError (which FastAPI answers with 422 invalid_json)
    when it is not UTF-8, not JSON, or has an unpaired surrogate escape."""
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        doc = body.decode("utf-8", "replace")
        raise json.JSONDecodeError(f"the body is not UTF-8 (byte 0x{body[exc.start]:02x})", doc, exc.start) from None
    value = json.loads(text)
    if _SURROGATE_ESCAPE.search(text):  # rare: only then look at each escape
        for match in _ESCAPES.finditer(text):
            escape = match.group()
            if len(escape) == 6 and escape[1] == "u" and 0xD800 <= int(escape[2:], 16) <= 0xDFFF:
                raise json.JSONDecodeError(
                    f"{escape} is half of a UTF-16 surrogate pair, without its other half", text, match.start()
                )
    return value


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict
