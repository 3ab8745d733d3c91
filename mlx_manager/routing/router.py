"""Which backend serves a generation: routes, groups, fallbacks, and `RoutedJob`.

A route maps model names (exact, or a glob) to a backend or a group, then its fallbacks; a model no
route matches stays on the local engine. A group hands each request to the member with the fewest
requests outstanding (in turn among equals) and skips members that are cooling down after a
failure. A `RoutedJob` tries the candidates in that order and gives an attempt up for the next one
only while nothing of it was handed on (so nothing reached the client): a model that cannot load,
a full queue, 429 / 503 / 5xx, a refused connection, no first token within routing.read_timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from typing import Protocol

from mlx_manager.engine.errors import (
    EngineError,
    EngineStopped,
    GenerationFailed,
    ModelLoadFailed,
    ModelNotFound,
    ModelUnloaded,
    Overloaded,
)
from mlx_manager.engine.types import Event, Finished, GenerationRequest, ReasoningDelta, TextDelta
from mlx_manager.routing.backend import Backend, upstream
from mlx_manager.routing.errors import RoutingError
from mlx_manager.routing.keyref import resolve_key
from mlx_manager.routing.relay import Relay, RelayEnd
from mlx_manager.routing.upstream import UpstreamJob
from mlx_manager.settings import SettingsError
from mlx_manager.settings.schema import LOCAL_BACKEND, Settings

log = logging.getLogger("mlx_manager.routing")

# The local engine's failures another backend may not share: the model is missing or broken
# here, the queue is full, the engine is stopping. Errors about the request itself are final.
LOCAL_RETRYABLE = (ModelNotFound, ModelLoadFailed, Overloaded, EngineStopped, ModelUnloaded, GenerationFailed)


class LocalJob(Protocol):
    """What the router needs of the engine's Job (engine/jobs.py)."""

    cancelled: bool
    prompt_tokens: int
    completion_tokens: int

    def __aiter__(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...

    def take_ready_text(self, kind: type[TextDelta | ReasoningDelta] = TextDelta) -> str: ...


@dataclass(frozen=True)
class Target:
    name: str  # a backend, a group, or local
    model: str | None = None  # the model to ask it for; None: the one requested

    @classmethod
    def parse(cls, text: str) -> Target:
        name, _, model = text.partition(":")
        return cls(name, model or None)


@dataclass(frozen=True)
class Route:
    pattern: str
    targets: tuple[Target, ...]  # where it goes, then its fallbacks

    def matches(self, model: str) -> bool:
        return fnmatchcase(model, self.pattern)


def retryable(error: BaseException) -> bool:
    """Whether another backend may serve what this error ended."""
    if isinstance(error, RoutingError):
        return error.retryable
    return isinstance(error, LOCAL_RETRYABLE)


def error_kind(error: BaseException) -> str:
    """A short name for an attempt's failure (metrics, logs): the problem kind, or the engine error's."""
    if isinstance(error, RoutingError):
        return error.kind
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(error).__name__).lower()


class Router:
    """The backends, groups and routes of the settings, and the local engine's `submit`."""

    def __init__(
        self,
        settings: Settings,
        submit_local: Callable[[GenerationRequest], LocalJob],
        local_load: Callable[[], int] = lambda: 0,
    ) -> None:
        self.submit_local = submit_local
        self.local_load = local_load  # the engine's waiting + running jobs, for groups with local in them
        self.local = Backend(LOCAL_BACKEND, "local")
        self.backends: dict[str, Backend] = {}
        self.groups: dict[str, tuple[str, ...]] = {}
        self.routes: tuple[Route, ...] = ()
        # Called with (backend name, error kind) for each attempt given up or failed: the metrics.
        self.failure_listeners: list[Callable[[str, str], None]] = []
        self._turn = itertools.count()
        self.configure(settings)

    def configure(self, settings: Settings) -> None:
        """Take the routing settings (at start and on reload). Backends left as they were keep
        their client and its open connections; the others are closed once idle. Raises
        SettingsError, changing nothing, when a backend's key cannot be read."""
        routing = settings.routing
        problem = routing.unresolved()
        if problem is not None:
            raise SettingsError(key="routing", problem=problem)
        keys = {entry.name: resolve_key(entry.api_key, entry.name) for entry in routing.backends}
        backends: dict[str, Backend] = {}
        for entry in routing.backends:
            kept = self.backends.get(entry.name)
            if kept is not None and kept.same_as(entry, keys[entry.name], routing):
                kept.cooldown = routing.cooldown
                backends[entry.name] = kept
            else:
                backends[entry.name] = upstream(entry, keys[entry.name], routing)
        for name, old in self.backends.items():
            if backends.get(name) is not old:
                _retire(old)
        self.backends = backends
        self.groups = {group.name: tuple(group.members) for group in routing.groups}
        self.routes = tuple(
            Route(route.model, tuple(Target.parse(t) for t in (route.to, *route.fallback))) for route in routing.routes
        )

    def backend(self, name: str) -> Backend:
        return self.local if name == LOCAL_BACKEND else self.backends[name]

    def route_for(self, model: str) -> Route | None:
        return next((route for route in self.routes if route.matches(model)), None)

    def is_local(self, model: str) -> bool:
        """Whether requests for `model` go to the local engine only (no route sends them elsewhere)."""
        route = self.route_for(model)
        return route is None or all(t.name == LOCAL_BACKEND for t in route.targets)

    def first_choice(self, model: str) -> Backend:
        """The backend a route names first (a group's first member): what a request is said to have
        gone to when every backend was skipped."""
        route = self.route_for(model)
        if route is None:
            return self.local
        name = route.targets[0].name
        return self.backend(self.groups[name][0] if name in self.groups else name)

    def backends_of(self, model: str) -> list[Backend]:
        """Every backend a request for `model` may go to: its route's targets, groups' members included."""
        route = self.route_for(model)
        names = [t.name for t in route.targets] if route is not None else [LOCAL_BACKEND]
        return [self.backend(member) for name in names for member in self.groups.get(name, (name,))]

    def candidates(self, model: str) -> Iterator[tuple[Backend, str]]:
        """(backend, model to ask it for) in the order a request tries them. Lazy: a group's
        member is picked when its turn comes, by the load of that moment."""
        route = self.route_for(model)
        for target in route.targets if route is not None else (Target(LOCAL_BACKEND),):
            ask = target.model or model
            members = self.groups.get(target.name)
            if members is None:
                backend = self.backend(target.name)
                if backend.available():  # else it is cooling down after a failure: skipped
                    yield backend, ask
                continue
            tried: set[str] = set()
            while (pick := self._pick(members, tried)) is not None:
                tried.add(pick.name)
                yield pick, ask

    def _pick(self, members: tuple[str, ...], tried: set[str]) -> Backend | None:
        """The available member not tried yet with the fewest outstanding requests (in turn among equals)."""
        turn = next(self._turn)
        ready = [(i, self.backend(m)) for i, m in enumerate(members) if m not in tried and self.backend(m).available()]
        if not ready:
            return None
        return min(ready, key=lambda item: (self.load(item[1]), (item[0] - turn) % len(members)))[1]

    def load(self, backend: Backend) -> int:
        return self.local_load() if backend is self.local else backend.outstanding

    def submit(self, request: GenerationRequest, *, hold: bool = False, relay: Relay | None = None) -> RoutedJob:
        """Start the request on its first candidate that takes it; raises when none does.
        `hold`: the answer is not streamed to the client, so an upstream's events wait until it
        is whole (until then it can still be left for the next backend). `relay`: a streamed chat
        request, which an `openai` backend's stream may be relayed to as it is (relay.py)."""
        return RoutedJob(self, request, hold=hold, relay=relay)

    def status(self) -> list[dict[str, object]]:
        """Each backend as the metrics show it: name, type, up, outstanding requests."""
        backends = [self.local, *self.backends.values()]
        return [{"name": b.name, "type": b.type, "up": b.available(), "outstanding": self.load(b)} for b in backends]

    async def aclose(self) -> None:
        for backend in self.backends.values():
            await backend.close()
        self.backends = {}


def _retire(backend: Backend) -> None:
    backend.retired = True
    if backend.outstanding == 0:
        try:
            asyncio.get_running_loop().create_task(backend.close())
        except RuntimeError:  # no loop (a reload outside the server): nothing is open on it yet
            pass


class RoutedJob:
    """A generation on whichever backend takes it, iterated like an engine Job (see the module doc)."""

    def __init__(self, router: Router, request: GenerationRequest, *, hold: bool, relay: Relay | None = None) -> None:
        self.router = router
        self.request = request
        self.hold = hold
        self.relay = relay
        self.job: LocalJob | UpstreamJob | None = None
        self.backend: Backend = router.first_choice(request.model)  # of the current (or last) attempt
        self.committed = False  # an event was handed on: no other backend may take over now
        self.cancelled = False
        self.failures: list[tuple[str, str]] = []  # (backend, error kind) of the attempts given up
        self._candidates = router.candidates(request.model)
        # Why no backend took it: raised at the first event, like every other failure of a job.
        self._refused: BaseException | None = None
        try:
            self._next(None)
        except (EngineError, RoutingError) as error:
            self._refused = error

    @property
    def prompt_tokens(self) -> int:
        return self.job.prompt_tokens if self.job is not None else 0

    @property
    def completion_tokens(self) -> int:
        return self.job.completion_tokens if self.job is not None else 0

    @property
    def upstream_usage(self) -> tuple[int, int] | None:
        return self.job.upstream_usage if isinstance(self.job, UpstreamJob) else None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        if self._refused is not None:
            raise self._refused
        assert self.job is not None
        events = aiter(self.job)
        while True:
            try:
                event = await anext(events)
            except StopAsyncIteration:
                return
            except Exception as error:
                if self.committed or self.cancelled or not retryable(error):
                    raise
                self._failed(error)
                self._next(error)
                events = aiter(self.job)
                continue
            self.committed = True
            yield event
            if isinstance(event, Finished):
                return

    @property
    def relaying(self) -> bool:
        """Whether the backend that took it relays its stream as it is: read it with `relayed()`
        once `Started` came (before, another backend could still take over)."""
        return isinstance(self.job, UpstreamJob) and self.job.relay is not None

    def relayed(self) -> AsyncIterator[bytes | RelayEnd]:
        assert isinstance(self.job, UpstreamJob) and self.committed
        return self.job.relayed()

    def take_ready_text(self, kind: type[TextDelta | ReasoningDelta] = TextDelta) -> str:
        return self.job.take_ready_text(kind) if self.job is not None else ""

    def cancel(self) -> None:
        self.cancelled = True
        if self.job is not None:
            self.job.cancel()

    def _next(self, error: BaseException | None) -> None:
        """Start the next candidate that takes the request; raise `error` (or say why none
        would) when no candidate is left."""
        for backend, model in self._candidates:
            self.backend = backend
            try:
                if backend.type == "local":
                    local = self.request if model == self.request.model else replace(self.request, model=model)
                    self.job = self.router.submit_local(local)  # Overloaded / EngineStopped at once
                else:
                    self.job = UpstreamJob(backend, self.request, model, hold=self.hold, relay=self.relay)
                return
            except (EngineError, RoutingError) as refused:
                if not retryable(refused):
                    raise
                self._failed(refused)
                error = refused
        if error is not None:
            raise error
        # When the first of this route's own backends is back (another route's tell nothing).
        waits = [
            b.down_until - time.monotonic() for b in self.router.backends_of(self.request.model) if not b.available()
        ]
        raise RoutingError(
            "upstream_unavailable",
            f"no backend can take model {self.request.model!r} now: each is skipped after a failure (routing.cooldown)",
            retry_after=max(1.0, min(waits, default=1.0)),
        )

    def _failed(self, error: BaseException) -> None:
        kind = error_kind(error)
        self.failures.append((self.backend.name, kind))
        log.warning(
            "request %s: backend %s failed before its first byte (%s); trying the next one if any",
            self.request.request_id,
            self.backend.name,
            kind,
        )
        for listener in self.router.failure_listeners:
            try:
                listener(self.backend.name, kind)
            except Exception:
                log.exception("routing failure listener failed")
