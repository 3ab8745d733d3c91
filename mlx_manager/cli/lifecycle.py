"""`mlx-manager start | stop | restart | status | logs`: run the daemon in the background under a supervisor.

The work is done in `mlx_manager.supervisor` (control, status), imported inside each command (it
brings psutil) so that `mlx-manager --help` stays fast.
"""

# Annotations stay objects here, without `from __future__ import annotations`: Typer reads every
# command's annotations at each start, and a string annotation costs a compile and an eval.

import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from mlx_manager.cli.output import EXIT_USAGE, JsonOption, console, err_console, fail, print_json, say
from mlx_manager.cli.serve import InsecureOption, ModelOption

if TYPE_CHECKING:
    from mlx_manager.supervisor.control import Running
    from mlx_manager.supervisor.options import SupervisorOptions
    from mlx_manager.supervisor.status import Status

HostOption = Annotated[
    str | None, typer.Option("--host", help="Address the daemon listens on (default from settings: 127.0.0.1).")
]
PortOption = Annotated[
    int | None, typer.Option("--port", help="Port the daemon listens on (default from settings: 10242).")
]
WaitOption = Annotated[
    float, typer.Option("--wait", min=1, metavar="SECONDS", help="How long to wait for the daemon to be ready.")
]
TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=0,
        metavar="SECONDS",
        help="How long to wait before the daemon is killed (default: server.drain_timeout + 30 s, at least"
        " supervisor.stop_timeout: requests still running when the drain ends get the `draining` problem).",
    ),
]
ForceOption = Annotated[bool, typer.Option("--force", help="Kill at once, without letting running requests finish.")]

START_EPILOG = (
    "Examples:\n\n  mlx-manager start\n\n  mlx-manager start --port 8080 --model ./models/my-model\n\n"
    "  mlx-manager keys add laptop && mlx-manager start --host 0.0.0.0 --wait 300"
)
STOP_EPILOG = "Examples:\n\n  mlx-manager stop\n\n  mlx-manager stop --timeout 120\n\n  mlx-manager stop --force"
RESTART_EPILOG = "Examples:\n\n  mlx-manager restart\n\n  mlx-manager restart --model ./models/other-model"
STATUS_EPILOG = (
    "Examples:\n\n  mlx-manager status\n\n  mlx-manager status --json | jq .rss_bytes\n\n"
    "  mlx-manager status >/dev/null || mlx-manager restart"
)
LOGS_EPILOG = (
    "Examples:\n\n  mlx-manager logs\n\n  mlx-manager logs -n 200\n\n  mlx-manager logs --follow"
    "\n\n  mlx-manager logs --supervisor"
)


def register(app: typer.Typer) -> None:
    app.command(epilog=START_EPILOG)(start)
    app.command(epilog=STOP_EPILOG)(stop)
    app.command(epilog=RESTART_EPILOG)(restart)
    app.command(epilog=STATUS_EPILOG)(status)
    app.command(epilog=LOGS_EPILOG)(logs)


# -- start / stop / restart ---------------------------------------------------------------------------


def start(
    host: HostOption = None,
    port: PortOption = None,
    model: ModelOption = None,
    wait: WaitOption = 120,
    insecure_no_auth: InsecureOption = False,
) -> None:
    """Start the daemon in the background under a supervisor that restarts it if it crashes or hangs.

    Returns once the daemon is ready (prints its URL and pid), or prints why it could not start.
    On an address other than loopback it needs an API key (`mlx-manager keys add NAME`).

    When it already runs, says so and does nothing; exits 1 if it runs with another --model, --host
    or --port than those given (`restart` replaces them).
    """
    flags = {"host": host, "port": port, "model": model_argument(model), "insecure_no_auth": insecure_no_auth or None}
    _check_bind(flags)
    _start(flags, wait)


def _check_bind(flags: dict[str, Any]) -> None:
    """Refuse settings the daemon could not start with (a broken config.toml, a bad MLX_MANAGER_
    variable or flag, a network address without an API key) here, before any process is started
    or stopped: a `restart` that cannot start again leaves the running daemon alone."""
    from mlx_manager.auth import load_keyring, unsafe_bind
    from mlx_manager.settings import SettingsError, load_settings

    try:
        settings = load_settings({"server.host": flags.get("host"), "server.port": flags.get("port")})
        keyring = load_keyring(settings)
    except SettingsError as exc:
        hint = "Fix them (mlx-manager config ...); nothing was started or stopped."
        fail(f"the settings cannot be read: {exc}.", hint, code=EXIT_USAGE)
    refusal = unsafe_bind(settings.server.host, keyring, bool(flags.get("insecure_no_auth")))
    if refusal is not None:
        fail(refusal, code=EXIT_USAGE)


def _start(flags: dict[str, Any], wait: float) -> None:
    from mlx_manager.supervisor.control import StartFailed
    from mlx_manager.supervisor.control import start as start_supervised

    try:
        running = start_supervised(flags, _options(), wait)
    except KeyboardInterrupt:
        fail(
            "stopped waiting; the daemon may still be starting in the background.",
            "See `mlx-manager status`, or `mlx-manager stop` it.",
            code=130,
        )
    except StartFailed as failure:
        if failure.log_lines:
            err_console.print("Last lines of the log:")
            for line in failure.log_lines:
                say(f"  {line}", err=True)
        fail(f"the daemon did not start: {failure.message}", failure.hint)
    _report_started(running)
    if running.already and (differences := _differences(flags, running)):
        hint = "Run `mlx-manager restart` with the options you want; it replaces them."
        fail(f"it runs with {'; '.join(differences)}: what you asked for was not applied.", hint)


def _differences(flags: dict[str, Any], running: "Running") -> list[str]:
    """What a `start` asked for that the daemon already running does not have (so it was not applied)."""
    from mlx_manager.runtime import read_daemon_info
    from mlx_manager.supervisor.state import read_state

    info = read_daemon_info() or {}
    started_with = ((read_state() or {}).get("flags") or {}) if running.supervised else {}
    has = {"host": info.get("host"), "port": info.get("port"), "model": started_with.get("model")}
    said = []
    for name in ("model", "host", "port"):
        asked = flags.get(name)
        if asked is None or (name != "model" and has[name] is None):
            continue  # not asked for, or not known
        if has[name] is None:
            said.append(f"no --model (not {asked})")
        elif str(has[name]) != str(asked):
            said.append(f"{'--' + name} {has[name]} (not {asked})")
    return said


def _report_started(running: "Running") -> None:
    where = running.url or "(address not known yet)"
    daemon = f"daemon pid {running.daemon_pid}" if running.daemon_pid else "daemon restarting"
    if not running.already:
        say(f"Started: {where} ({daemon}, supervisor pid {running.supervisor_pid}).")
    elif running.adopted:
        say(
            f"Already running: {where} ({daemon}); its supervisor was gone, so a new one (pid "
            f"{running.supervisor_pid}) took it over: it is restarted if it crashes or hangs."
        )
    elif running.supervised:
        say(f"Already running: {where} ({daemon}, supervisor pid {running.supervisor_pid}).")
    else:
        say(f"Already running: {where} ({daemon}, not supervised: started outside `mlx-manager start`).")


def model_argument(model: str | None) -> str | None:
    """A model given as a folder that exists here is made absolute: the supervisor may restart the
    daemon long after, and `restart` may be run from another directory."""
    if model and Path(model).expanduser().exists():
        return str(Path(model).expanduser().resolve())
    return model


def _options() -> "SupervisorOptions":
    from mlx_manager.settings import SettingsError, load_settings
    from mlx_manager.supervisor.options import SupervisorOptions

    try:
        settings = load_settings()
    except SettingsError:
        settings = None  # the daemon will refuse to start and say why; `start` reports that
    return SupervisorOptions.from_settings(settings, retry_before_ready=False)


def _stop_wait() -> float:
    """`stop`'s default wait: the supervisor's own (it kills the daemon then), and a moment more for it to report."""
    from mlx_manager.settings import SettingsError, load_settings
    from mlx_manager.supervisor.options import stop_wait

    try:
        settings = load_settings()
    except SettingsError:
        settings = None
    return stop_wait(settings) + 5


def stop(timeout: TimeoutOption = None, force: ForceOption = False) -> None:
    """Stop the daemon: running requests may finish (server.drain_timeout), those still running then
    get the `draining` problem, a model load in progress is abandoned, every audit row is written,
    and it exits; killed after the timeout. Says how the daemon ended (a crash is not a clean stop).

    When nothing runs, says so and exits 0.
    """
    from mlx_manager.supervisor.control import stop as stop_supervised

    if timeout is None:
        timeout = _stop_wait()
    stopped = stop_supervised(timeout, force)
    if not stopped.was_running:
        say("Not running." + (f" (The last supervisor {stopped.note}.)" if stopped.note else ""))
        return
    pids = ", ".join(
        f"{what} pid {pid}"
        for what, pid in (("daemon", stopped.daemon_pid), ("supervisor", stopped.supervisor_pid))
        if pid
    )
    if force:
        say(f"Killed ({pids}).")
    elif not stopped.graceful:
        say(f"Stopped ({pids}): it did not finish within {timeout:g} s, so it was killed.")
    else:
        say(f"Stopped ({pids}) in {stopped.seconds:.1f} s{_how_it_ended(stopped.daemon_exit)}")


def _how_it_ended(daemon_exit: dict[str, Any] | None) -> str:
    """The rest of `stop`'s sentence: what the daemon's exit says of the requests it had."""
    from mlx_manager.daemon.run import STOP_NOTE

    if daemon_exit is None:  # not our child (no supervisor, or adopted): its exit status is unknown
        return "."
    if daemon_exit.get("code") != 0:
        reason = str(daemon_exit.get("reason"))
        reason = f"was {reason}" if reason.startswith("killed by") else reason
        return f", but the daemon {reason}: requests it was running may have been cut off. See `mlx-manager logs`."
    said = (daemon_exit.get("last_output") or "").strip()
    note = f" Note: {said.removeprefix(STOP_NOTE)}" if said.startswith(STOP_NOTE) else ""
    return f"; running requests were allowed to finish.{note}"


def restart(
    host: HostOption = None,
    port: PortOption = None,
    model: ModelOption = None,
    timeout: TimeoutOption = None,
    wait: WaitOption = 120,
    insecure_no_auth: InsecureOption = False,
) -> None:
    """Stop the daemon, then start it again with the same options (those given here replace them).

    --insecure-no-auth, once given, is kept; `stop` then `start` drops it.
    """
    from mlx_manager.supervisor.state import read_state

    previous = (read_state() or {}).get("flags") or {}
    given = {"host": host, "port": port, "model": model_argument(model), "insecure_no_auth": insecure_no_auth or None}
    flags = {name: given[name] if given[name] is not None else previous.get(name) for name in given}
    _check_bind(flags)  # before the stop: a refused restart leaves the running daemon alone
    stop(timeout=timeout, force=False)
    _start(flags, wait)


# -- status ---------------------------------------------------------------------------------------------


def status(json_output: JsonOption = False) -> None:
    """Show whether the daemon runs and is healthy: pids, URL, uptime, models, queue, memory, CPU, restarts.

    Exit codes: 0 running and healthy; 1 unhealthy or given up after a crash loop; 3 not running.
    """
    from mlx_manager.supervisor.status import status as read_status

    result = read_status()
    if json_output:
        print_json({**asdict(result), "exit_code": result.exit_code})
    else:
        _show_status(result)
    raise typer.Exit(result.exit_code)


def _show_status(s: "Status") -> None:
    from rich.table import Table

    if not s.running:
        say(f"Not running: gave up ({s.reason})." if s.given_up else "Not running.")
        if s.stale:
            say("(A supervisor died without cleaning up; its state file is stale. `mlx-manager start` replaces it.)")
        if s.last_exit:
            say(f"Last exit: {_exit_line(s.last_exit)}")
        return
    health = "healthy" if s.healthy else f"unhealthy: {s.problem}"
    say(f"Running, {health}.")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, str | None]] = [
        ("URL", s.url),
        ("State", s.state),
        ("Daemon", f"pid {s.daemon_pid}" if s.daemon_pid else None),
        ("Supervisor", f"pid {s.supervisor_pid}" if s.supervised else "none: nothing restarts it if it crashes"),
        ("Uptime", _duration(s.uptime_seconds) if s.uptime_seconds is not None else None),
        ("Version", s.version),
        ("Models", ", ".join(s.models_loaded) or "none loaded" if s.version else None),
        ("Loading", s.loading),
        ("Queue", f"{s.queue_depth} waiting, {s.active_jobs or 0} running" if s.queue_depth is not None else None),
        ("BLAS", "MLX's bundled reference BLAS" if s.blas == "bundled" else s.blas),
        ("Memory", f"{s.rss_bytes / 1024**2:.0f} MiB RSS" if s.rss_bytes is not None else None),
        ("CPU", f"{s.cpu_percent:.0f} %" if s.cpu_percent is not None else None),
        ("Requests", _requests_line(s.figures) if s.figures else None),
        ("Tokens", _tokens_line(s.figures) if s.figures else None),
        ("Prompt cache", _cache_line(s.figures) if s.figures else None),
        ("Restarts", str(s.restarts) if s.supervised else None),
        ("Last exit", _exit_line(s.last_exit) if s.last_exit else None),
    ]
    for label, value in rows:
        if value:
            grid.add_row(label, value)
    console.print(grid)


def _requests_line(figures: dict[str, Any]) -> str:
    by_status = ", ".join(f"{n} {status}" for status, n in sorted(figures["requests_by_status"].items()))
    line = f"{figures['requests']} served" + (f" ({by_status})" if by_status else "")
    ttft = figures.get("time_to_first_token_seconds_mean")
    if ttft is not None:
        line += f"; mean time to first token {ttft * 1000:.0f} ms"
    return line


def _tokens_line(figures: dict[str, Any]) -> str:
    line = f"{figures['prompt_tokens']} prompt, {figures['completion_tokens']} completion"
    if figures.get("audit_backlog"):
        line += f"; {figures['audit_backlog']} audit rows waiting to be written"
    return line


def _cache_line(figures: dict[str, Any]) -> str | None:
    """Its size and hit rate: how much of the prompts it saved recomputing."""
    hits, misses = figures.get("prompt_cache_hits", 0), figures.get("prompt_cache_misses", 0)
    size = figures.get("prompt_cache_bytes")
    if not hits and not misses and not size:
        return None
    rate = f"{100 * hits / (hits + misses):.0f}% of prompts hit" if hits + misses else "no prompt yet"
    return (
        f"{(size or 0) / 1024**2:.0f} MiB; {rate}; "
        f"{figures.get('prompt_cache_cached_tokens', 0)} prompt tokens not computed again"
    )


def _exit_line(last_exit: dict[str, Any]) -> str:
    line = f"{last_exit.get('reason')} at {last_exit.get('at')}"
    output = last_exit.get("last_output")
    code = last_exit.get("code")
    if output and isinstance(code, int) and code > 0:  # a crash's last words; a kill has none worth showing
        line += f" ({output.strip()})"
    return line


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


# -- logs -------------------------------------------------------------------------------------------------


def logs(
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many of the last lines to show.")] = 50,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines as they are written (Ctrl-C ends).")
    ] = False,
    supervisor: Annotated[
        bool,
        typer.Option(
            "--supervisor",
            help="Show the supervisor's log (restarts, watchdog, the daemon's crash output) instead.",
        ),
    ] = False,
) -> None:
    """Show the end of the daemon's log file (rotated by size), or follow it."""
    from mlx_manager.supervisor.logfile import follow as follow_file
    from mlx_manager.supervisor.logfile import tail
    from mlx_manager.supervisor.state import supervisor_log

    path = supervisor_log() if supervisor else _daemon_log()
    if not path.exists() and not follow:
        say(f"No log yet: {path} does not exist.", err=True)
        return
    from mlx_manager.escape import printable

    # A line may hold what a crashing daemon printed raw: nothing in it reaches the terminal as a control.
    out = sys.stdout
    for line in tail(path, lines):
        out.write(printable(line) + "\n")
    out.flush()
    if not follow:
        return
    try:
        for line in follow_file(path):
            out.write(printable(line) + "\n")
            out.flush()
    except KeyboardInterrupt:
        pass


def _daemon_log() -> Path:
    from mlx_manager.settings import SettingsError, home, load_settings

    try:
        return load_settings().log_path()
    except SettingsError:
        return home() / "logs" / "daemon.log"
