"""The rotating log file the daemon and the supervisor write, created 0600 like every file they keep.

Apart from `runtime` so that the CLI, which reads the runtime files, does not import logging.handlers.
"""

from __future__ import annotations

import logging.handlers
import os
from io import TextIOWrapper


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating log whose files are created 0600: logs hold request ids, model names and client
    addresses, and the file a rotation opens would otherwise follow the umask (often 0644)."""

    def _open(self) -> TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
