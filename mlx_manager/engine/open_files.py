"""The process's open-file limit: as high as the system lets it be, whatever mlx-lm sets.

Every client connection takes a file descriptor. A soft limit of 256 (macOS) or 1024 (Linux)
runs out under a few hundred idle sockets, and then accept() fails and /health goes unanswered.
`mlx_lm.utils` also sets the limit to (2048, 4096) when it is imported, lowering the hard limit
for good (an unprivileged process cannot raise it again): it is imported here with that call
kept from lowering anything.
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mlx_manager.engine")

# Tried in turn when the hard limit itself is refused (macOS caps the soft limit at
# kern.maxfilesperproc, below an unlimited hard limit).
_FALLBACKS = (1 << 20, 1 << 16, 24576, 10240, 4096)
_import_lock = threading.Lock()


def open_file_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_file_limit() -> int:
    """Raise the soft limit to the hard one (or the highest the system takes); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = hard if hard != resource.RLIM_INFINITY else _FALLBACKS[0]
    for target in (top, *(f for f in _FALLBACKS if f < top)):
        if target <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        log.debug("open-file limit raised from %d to %d", soft, target)
        return target
    return soft


def import_mlx_lm() -> None:
    """Import mlx_lm (once per process) without letting it lower the open-file limit."""
    with _import_lock:
        if "mlx_lm.utils" in sys.modules:
            return
        original = resource.setrlimit
        resource.setrlimit = _never_lower(original)
        try:
            import mlx_lm.utils  # noqa: F401
        finally:
            resource.setrlimit = original


def _never_lower(setrlimit: Callable[[int, tuple[int, int]], None]) -> Callable[[int, tuple[int, int]], None]:
    def keep_higher(which: int, limits: Any) -> None:
        if which != resource.RLIMIT_NOFILE:
            setrlimit(which, limits)
            return
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = min(limits[0], hard) if hard != resource.RLIM_INFINITY else limits[0]
        if wanted > soft:
            setrlimit(which, (wanted, hard))

    return keep_higher
