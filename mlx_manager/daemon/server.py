"""uvicorn's configuration for the daemon, and its Server with a draining stop: the signal handling
of `mlx-manager serve`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import sys
import threading
from typing import Any

import uvicorn

from mlx_manager.daemon.app import stop_engine
from mlx_manager.daemon.connections import ConnectionGuard
from mlx_manager.daemon.state import DaemonState
from mlx_manager.engine.open_files import open_file_limit
from mlx_manager.settings import Settings

log = logging.getLogger("mlx_manager.daemon")

# After the drain timeout the engine is stopped; the requests it ends get this long to say so.
LAST_WORDS_SECONDS = 5.0
# Once drained, uvicorn only closes idle connections; this bounds that last step.
GRACEFUL_SHUTDOWN_SECONDS = 5
# libuv's event loop (a dependency but on Windows): a routed stream costs about a third less CPU a
# chunk than on asyncio's own loop, and a request ~3 ms less (benchmarks/bench_routing.py).
EVENT_LOOP = "asyncio" if sys.platform == "win32" else "uvloop"


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's settings for the daemon: bounded connections (daemon/connections.py), proxy
    headers believed only from server.trusted_proxies, our logging, no Server header."""
    server = settings.server
    # The rest of the open-file limit is for models, the audit log, the logs and connections over the limit.
    limit = min(server.max_connections, max(16, open_file_limit() // 2))
    if limit < server.max_connections:
        log.warning(
            "server.max_connections is %d but the open-file limit is %d: at most %d connections",
            server.max_connections,
            open_file_limit(),
            limit,
        )
    guard = ConnectionGuard(limit, server.idle_timeout, server.read_timeout)
    return uvicorn.Config(
        app,
        http=guard.protocol(),
        loop=EVENT_LOOP,
        log_config=None,  # ours (configure_logging): file + stderr
        access_log=False,  # the middleware logs each API request with its id and outcome
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=max(1, math.ceil(server.idle_timeout)),
        server_header=False,
        # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: anyone local could pose as
        # any address (past the rate limit, into the logs). Only a named proxy is believed.
        proxy_headers=bool(server.trusted_proxies),
        forwarded_allow_ips=list(server.trusted_proxies) or None,
    )


class DrainingServer(uvicorn.Server):
    """A stop signal drains first, and the process then ends with code 0.

    uvicorn's own handler stops taking work at once and re-raises the signal once it is done,
    which would make the exit status say "killed" after a clean stop."""

    def __init__(self, config: uvicorn.Config, daemon: DaemonState) -> None:
        super().__init__(config)
        self.daemon = daemon
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig, frame) -> None:
        if self.daemon.draining or not self.started or self._loop is None:
            # A second signal, or one before the server is up: stop without waiting.
            self.should_exit = True
            self.force_exit = self.daemon.draining
            return
        self.daemon.draining = True  # from now on new requests get 503 draining
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        daemon = self.daemon
        timeout = daemon.settings.server.drain_timeout
        log.info("stopping: letting %d request(s) finish, for up to %g s", daemon.in_flight, timeout)
        if not await daemon.wait_idle(timeout):
            log.warning("drain timeout: ending the %d request(s) still running", daemon.in_flight)
            await stop_engine(daemon)  # their jobs end with EngineStopped: a 503 or an SSE error event
            await daemon.wait_idle(LAST_WORDS_SECONDS)
        self.should_exit = True
