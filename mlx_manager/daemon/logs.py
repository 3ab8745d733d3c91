"""The daemon's logging: a rotating file under the home folder, and stderr. One record is one line:
control characters a client put in a model id or a path are escaped, so they cannot forge lines
or reach the terminal of whoever reads the log."""

from __future__ import annotations

import logging
import os
import sys

from mlx_manager.escape import printable
from mlx_manager.private_log import PrivateRotatingFileHandler
from mlx_manager.settings import Settings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 5


class OneLineFormatter(logging.Formatter):
    """The message with its control characters escaped; a traceback after it keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def configure_logging(settings: Settings) -> None:
    path = settings.log_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    formatter = OneLineFormatter(FORMAT)
    handlers: list[logging.Handler] = [
        PrivateRotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS, encoding="utf-8")
    ]
    # Under the supervisor, stderr already goes to its log: writing both would double every line.
    if os.environ.get("MLX_MANAGER_SUPERVISED") != "1":
        handlers.append(logging.StreamHandler(sys.stderr))
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)  # uvicorn and libraries: info and up
    # httpx says each request to an upstream backend: two synchronous writes per request on the
    # event loop, for what the request's own line says (backend=).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # Ours follow log.level, which a reload may change.
    logging.getLogger("mlx_manager").setLevel(settings.log.level.upper())
