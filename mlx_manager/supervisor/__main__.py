"""`python -m mlx_manager.supervisor`: the supervisor process that `mlx-manager start` launches.

    python -m mlx_manager.supervisor --port 8080 --model ./my-model
    python -m mlx_manager.supervisor --backoff-initial 0.1 -- python -c 'raise SystemExit(1)'

Everything after `--` replaces the daemon's command line (tests supervise small scripts that way).
Exit codes: 0 stopped, 1 gave up (crash loop, or failed before ready), 3 another supervisor runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlx_manager.private_log import PrivateRotatingFileHandler
from mlx_manager.supervisor.options import SupervisorOptions
from mlx_manager.supervisor.service import serve_command
from mlx_manager.supervisor.state import supervisor_log

LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 3
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Formatter(logging.Formatter):
    """The daemon's lines go in as it printed them (they carry their own timestamps)."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "raw", False):
            return record.getMessage()
        return super().format(record)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    command: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    defaults = SupervisorOptions()
    parser = argparse.ArgumentParser(prog="python -m mlx_manager.supervisor", description=__doc__.split("\n")[0])
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--model")
    parser.add_argument("--insecure-no-auth", action="store_true", help="passed on to `serve`")
    parser.add_argument("--health-interval", type=float, default=defaults.health_interval)
    parser.add_argument("--hang-timeout", type=float, default=defaults.hang_timeout)
    parser.add_argument("--start-timeout", type=float, default=defaults.start_timeout)
    parser.add_argument("--stop-timeout", type=float, default=defaults.stop_timeout)
    parser.add_argument("--backoff-initial", type=float, default=defaults.backoff_initial)
    parser.add_argument("--backoff-max", type=float, default=defaults.backoff_max)
    parser.add_argument("--crash-limit", type=int, default=defaults.crash_limit)
    parser.add_argument("--crash-window", type=float, default=defaults.crash_window)
    parser.add_argument(
        "--no-retry-before-ready",
        dest="retry_before_ready",
        action="store_false",
        help="give up at once when the daemon exits before it was ever ready",
    )
    return parser.parse_args(argv), command


def configure_logging() -> None:
    path = supervisor_log()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Private, like the daemon's log: it holds what the daemon printed.
    handlers: list[logging.Handler] = [
        PrivateRotatingFileHandler(path, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS, encoding="utf-8")
    ]
    if sys.stderr.isatty():  # run by hand in a terminal; when detached, stderr is this same file
        handlers.append(logging.StreamHandler(sys.stderr))
    logger = logging.getLogger("mlx_manager.supervisor")
    for handler in handlers:
        handler.setFormatter(_Formatter(FORMAT))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    from mlx_manager.supervisor.supervisor import Supervisor

    args, command = parse_args(sys.argv[1:] if argv is None else argv)
    options = SupervisorOptions(
        health_interval=args.health_interval,
        hang_timeout=args.hang_timeout,
        start_timeout=args.start_timeout,
        stop_timeout=args.stop_timeout,
        backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max,
        crash_limit=args.crash_limit,
        crash_window=args.crash_window,
        retry_before_ready=args.retry_before_ready,
    )
    configure_logging()
    flags = {
        "host": args.host,
        "port": args.port,
        "model": args.model,
        "insecure_no_auth": args.insecure_no_auth or None,
    }
    command = command or serve_command(
        # This interpreter, so the daemon runs the same install as the supervisor.
        args.host,
        args.port,
        args.model,
        args.insecure_no_auth,
        program=[sys.executable, "-m", "mlx_manager.cli"],
    )
    return Supervisor(command, options, flags).run()


if __name__ == "__main__":
    sys.exit(main())
