"""`mlx-manager serve` whose model loads take as long as a big model's on a slow disk.

    python -m tests.slow_load STEP_SECONDS STEP_BYTES ENGINE_STOP_TIMEOUT serve --port 8080 --model ./m

The daemon is the real one; only time is added: every read of weights on the inference thread
(`mx.eval` there, which nothing else calls while a test only loads) first sleeps STEP_SECONDS, and
the weights are read STEP_BYTES at a time (1: one tensor per step). ENGINE_STOP_TIMEOUT is how
long a stop waits for the inference thread.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


def main() -> None:
    step_seconds, step_bytes, stop_timeout = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    import mlx.core as mx

    from mlx_manager.daemon import app
    from mlx_manager.engine import pool

    read = mx.eval

    def slow_read(*arrays: Any) -> None:
        if threading.current_thread().name == "mlx-inference":
            until = time.monotonic() + step_seconds
            while time.monotonic() < until:  # short sleeps: the thread takes the GIL often, as MLX's work does
                time.sleep(0.01)
        read(*arrays)

    mx.eval = slow_read
    pool.LOAD_STEP_BYTES = step_bytes
    app.ENGINE_STOP_TIMEOUT = stop_timeout
    sys.argv = ["mlx-manager", *sys.argv[4:]]
    from mlx_manager.cli import main as cli

    cli()


if __name__ == "__main__":
    main()
