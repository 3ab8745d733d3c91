"""GET the daemon's /health and /ready with the standard library: cheap enough to run every few
seconds, and never routed through a proxy from the environment (it is always a local call)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return self.status == 200


def fetch(url: str, path: str, timeout: float) -> tuple[int, bytes] | None:
    """Status and body of GET `path`, or None when the daemon did not answer in time (or at all)."""
    import http.client  # with ssl, ~10 % of a CLI start: paid only when there is a daemon to ask

    from mlx_manager.runtime import admin_token

    parts = urlsplit(url)
    headers = {"User-Agent": "mlx-manager-supervisor"}
    try:  # /ready and /metrics need it once the API has keys
        token = admin_token() if path != "/health" else None
    except OSError:
        token = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def get(url: str, path: str, timeout: float) -> Answer | None:
    """The daemon's JSON answer to GET `path`, or None when it did not answer in time (or at all)."""
    answer = fetch(url, path, timeout)
    if answer is None:
        return None
    status, raw = answer
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    return Answer(status, body if isinstance(body, dict) else {})


def healthy(url: str, timeout: float) -> bool:
    answer = get(url, "/health", timeout)
    return answer is not None and answer.ok


def ready(url: str, timeout: float) -> bool:
    answer = get(url, "/ready", timeout)
    return answer is not None and answer.ok
