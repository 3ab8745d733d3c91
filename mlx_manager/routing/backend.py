"""One upstream server: its shared HTTP client (pooled, kept alive), how busy it is, and whether it
is up. A backend that fails is skipped for `routing.cooldown` seconds; then a health check (its
model list) puts it back, or keeps it out for another cooldown."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from mlx_manager.routing import anthropic_wire, network
from mlx_manager.settings.schema import BackendEntry, RoutingSettings

log = logging.getLogger("mlx_manager.routing")

# A connection idle this long is closed (servers close theirs after 5-75 s).
KEEPALIVE_EXPIRY = 30.0


@dataclass(frozen=True)
class Health:
    """What a health check saw: reachable or not, how fast, which models it lists."""

    ok: bool
    latency_ms: float | None = None
    status: int | None = None
    models: tuple[str, ...] = ()
    error: str | None = None  # ours, never the server's text


def auth_headers(kind: str, key: str) -> dict[str, str]:
    """How each dialect presents its key (and Anthropic its API version)."""
    if kind == "anthropic":
        return {"anthropic-version": anthropic_wire.VERSION, **({"x-api-key": key} if key else {})}
    return {"Authorization": f"Bearer {key}"} if key else {}


def models_path(kind: str) -> str:
    return "/v1/models" if kind == "anthropic" else "/models"


def make_client(entry: BackendEntry, key: str, settings: RoutingSettings) -> httpx.AsyncClient:
    """The one client every request to this backend shares: its pool keeps connections alive
    (on asyncio's sockets: network.py)."""
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    return httpx.AsyncClient(
        base_url=entry.base_url,
        headers=auth_headers(entry.type, key),
        timeout=httpx.Timeout(
            connect=settings.connect_timeout,
            read=settings.read_timeout,
            write=settings.read_timeout,
            pool=settings.connect_timeout,
        ),
        transport=network.transport(limits),
        follow_redirects=False,
        trust_env=False,  # a proxy from the environment is not ours to send keys through
    )


async def check(client: httpx.AsyncClient, kind: str) -> Health:
    """GET the model list: reachable, latency, models. Never raises."""
    started = time.perf_counter()
    try:
        response = await client.get(models_path(kind))
    except httpx.TimeoutException:
        return Health(False, error="timed out")
    except httpx.HTTPError as exc:
        return Health(False, error=f"unreachable ({type(exc).__name__})")
    latency = (time.perf_counter() - started) * 1000
    if response.status_code >= 400:
        return Health(False, latency, response.status_code, error=f"answered {response.status_code}")
    try:
        data = response.json().get("data") or []
        models = tuple(str(m["id"]) for m in data if isinstance(m, dict) and "id" in m)
    except (ValueError, AttributeError):
        return Health(False, latency, response.status_code, error="its model list is not JSON")
    return Health(True, latency, response.status_code, models)


@dataclass(eq=False)
class Backend:
    """A backend as the router uses it. `local` is the engine here: no client, never cooling down."""

    name: str
    type: str  # "local", "openai", "anthropic"
    entry: BackendEntry | None = None
    client: httpx.AsyncClient | None = None
    cooldown: float = 30.0
    outstanding: int = 0  # requests it is serving for this router now
    down_until: float = 0.0  # monotonic time before which it is skipped
    retired: bool = False  # replaced by a reload: closed once its last request ends
    _check: asyncio.Task[None] | None = field(default=None, repr=False)

    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self, kind: str, retry_after: float | None = None) -> None:
        """Skip it for a cooldown (or the Retry-After it asked for); a health check then decides."""
        if self.type == "local":
            return  # the engine here is always worth asking (its errors are per model)
        wait = min(retry_after, self.cooldown) if retry_after else self.cooldown
        self.down_until = time.monotonic() + wait
        log.warning("backend %s failed (%s): skipped for %.0f s", self.name, kind, wait)
        if self._check is None or self._check.done():
            self._check = asyncio.get_running_loop().create_task(self._recover())

    def succeeded(self) -> None:
        self.down_until = 0.0

    async def _recover(self) -> None:
        """After each cooldown, a health check: up again, or skipped for another cooldown."""
        assert self.client is not None
        while not self.retired:
            await asyncio.sleep(max(0.0, self.down_until - time.monotonic()))
            if self.retired:
                return
            health = await check(self.client, self.type)
            if health.ok:
                log.info("backend %s is back (health check in %.0f ms)", self.name, health.latency_ms or 0)
                self.down_until = 0.0
                return
            self.down_until = time.monotonic() + self.cooldown

    def ended(self) -> None:
        """One request it served is over."""
        self.outstanding -= 1
        if self.retired and self.outstanding == 0:
            asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        self.retired = True
        if self._check is not None:
            self._check.cancel()
        if self.client is not None:
            await self.client.aclose()

    def same_as(self, entry: BackendEntry, key: str, settings: RoutingSettings) -> bool:
        """Whether a reload leaves this backend as it is (same entry, key and client settings)."""
        return self.entry == entry and self._key == key and self._client_settings == _client_settings(settings)

    _key: str = field(default="", repr=False)  # kept to tell a changed key on reload; never shown
    _client_settings: tuple[Any, ...] = field(default=(), repr=False)


def upstream(entry: BackendEntry, key: str, settings: RoutingSettings) -> Backend:
    return Backend(
        entry.name,
        entry.type,
        entry,
        make_client(entry, key, settings),
        settings.cooldown,
        _key=key,
        _client_settings=_client_settings(settings),
    )


def _client_settings(settings: RoutingSettings) -> tuple[Any, ...]:
    return (settings.connect_timeout, settings.read_timeout, settings.max_connections)
