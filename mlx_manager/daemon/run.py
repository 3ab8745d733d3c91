"""`run_daemon`: the daemon process — settings, logging, socket, daemon.json, uvicorn, graceful stop.

A stop (SIGTERM, Ctrl-C) drains: new requests get 503 draining, in-flight ones may finish for
up to server.drain_timeout, then the engine stops (ending any left with an error, abandoning a
model load) and the process exits 0. A second Ctrl-C stops at once. (The signal handling itself
is in server.py.) What an operator should know about the stop (a load abandoned) is the last
line on stderr, after STOP_NOTE, where the supervisor keeps it for `mlx-manager stop` to show.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mlx_manager import __version__
from mlx_manager.files import write_atomic
from mlx_manager.runtime import daemon_file, ensure_home, read_daemon_info

if TYPE_CHECKING:
    from mlx_manager.daemon.state import DaemonState

log = logging.getLogger("mlx_manager.daemon")

DEFAULT_HOST = "127.0.0.1"
EXIT_ERROR, EXIT_USAGE = 1, 2
STOP_NOTE = "Stopped, but: "


class StartupError(Exception):
    """The daemon cannot start; `serve` prints the message as one line and exits `exit_code`."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message, self.hint, self.exit_code = message, hint, exit_code


def run_daemon(
    host: str | None = None, port: int | None = None, model: str | None = None, insecure_no_auth: bool = False
) -> None:
    """Run the daemon in the foreground until stopped. Raises StartupError when it cannot start,
    which includes a network address without any API key unless `insecure_no_auth`."""
    from mlx_manager.auth import is_loopback_host, load_keyring, unsafe_bind
    from mlx_manager.engine.open_files import raise_open_file_limit
    from mlx_manager.settings import SettingsError, load_settings

    flags = {"server.host": host, "server.port": port}
    try:
        settings = load_settings(flags)
        keyring = load_keyring(settings)
    except SettingsError as exc:
        raise StartupError(str(exc), "Fix the setting (mlx-manager config ...) and start again.", EXIT_USAGE) from None
    refusal = unsafe_bind(settings.server.host, keyring, insecure_no_auth)
    if refusal is not None:
        raise StartupError(refusal, exit_code=EXIT_USAGE)
    on_network = not is_loopback_host(settings.server.host)
    ensure_home()
    running = read_daemon_info()
    if running is not None:
        raise StartupError(
            f"a daemon is already running (pid {running['pid']}, {running.get('url')})",
            "Stop it first, or give this one another MLX_MANAGER_HOME.",
        )
    raise_open_file_limit()  # every connection takes a descriptor: room for them before the first
    missing = [m for m in [model, *settings.models.preload] if m and _missing_folder(m)]
    if missing:  # said before anything listens or logs "serving"
        raise StartupError(
            f"could not preload model '{missing[0]}': no such model folder (or no config.json in it)",
            "Check the model (--model or models.preload).",
        )
    sock = bind(settings.server.host, settings.server.port)
    # Only now the heavy imports (FastAPI, telemetry: seconds on a busy machine): a start that
    # cannot happen (a bad setting, a daemon already there, a port taken) fails fast, and a
    # supervisor's crash loop is counted in crashes, not imports.
    from mlx_manager.daemon.app import create_app
    from mlx_manager.daemon.logs import configure_logging
    from mlx_manager.daemon.server import DrainingServer, server_config
    from mlx_manager.telemetry import configure_telemetry, instrument_httpx

    configure_logging(settings)
    configure_telemetry(settings)  # once, before the app is built
    instrument_httpx()  # outgoing calls (cloud routing, later) are traced like the rest
    app = create_app(
        settings,
        extra_preload=[model] if model else [],
        flag_overrides={key: value for key, value in flags.items() if value is not None},
        require_key=on_network and not insecure_no_auth,
    )
    server = DrainingServer(server_config(app, settings), app.state.daemon)
    app.state.daemon.on_fatal = lambda: setattr(server, "should_exit", True)
    bound_port = sock.getsockname()[1]
    url = f"http://{_client_host(settings.server.host)}:{bound_port}"
    write_daemon_file(settings.server.host, bound_port, url)
    log.info("mlx-manager %s serving the OpenAI API on %s (pid %d)", __version__, url, os.getpid())
    if on_network and not keyring:
        log.warning(
            "listening on %s with no API key (--insecure-no-auth): anyone who can reach it may use it",
            settings.server.host,
        )
    try:
        server.run(sockets=[sock])
    finally:
        remove_daemon_file()
        sock.close()
    last_words(app.state.daemon)
    if app.state.daemon.fatal_error:
        raise StartupError(app.state.daemon.fatal_error, app.state.daemon.fatal_hint)
    log.info("stopped")


def last_words(daemon: DaemonState) -> None:
    """Say what the engine's stop saw, as the last line on stderr. When the inference thread did
    not come back (a step MLX cannot interrupt), exit now: Python's own exit would end that thread
    in the middle of MLX and abort the process (engine/inference_thread.py says why)."""
    report = daemon.engine_stop
    if report is None:
        return
    notes = report.notes()
    if notes:
        print(STOP_NOTE + "; ".join(notes) + ".", file=sys.stderr, flush=True)
    if not report.finished:
        if daemon.fatal_error:
            print(f"Error: {daemon.fatal_error}", file=sys.stderr, flush=True)
        log.info("stopped")
        logging.shutdown()
        os._exit(EXIT_ERROR if daemon.fatal_error else 0)


def _missing_folder(model: str) -> bool:
    """A model named as a path (./m, /m, ~/m) that is not a model folder here."""
    if not model.startswith((".", "/", "~")):
        return False  # a Hugging Face id: the engine looks in the cache when it loads
    folder = Path(model).expanduser()
    return not (folder / "config.json").is_file()


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before anything else, so a busy port is one clear error."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = addresses[0]
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {host!r}: {exc.strerror}", "Check server.host or --host.") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart right after a stop (TIME_WAIT)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(
                f"port {port} on {host} is already in use", "Stop the program using it, or pass --port."
            ) from None
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror}", "Check --host and --port.") from None
    sock.set_inheritable(True)
    return sock


def _client_host(host: str) -> str:
    """The address a local client should use to reach a daemon listening on `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def write_daemon_file(host: str, port: int, url: str) -> None:
    info = {
        "pid": os.getpid(),
        "host": host,
        "port": port,
        "url": url,
        "version": __version__,
        "started_at": datetime.now(UTC).isoformat(),
    }
    write_atomic(daemon_file(), json.dumps(info, indent=2) + "\n")


def remove_daemon_file() -> None:
    """Remove daemon.json if it is still ours (never a successor's)."""
    path = daemon_file()
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
