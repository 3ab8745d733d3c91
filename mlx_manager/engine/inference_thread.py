"""The threads MLX runs on: kept for the life of the process, parked between engines.

A thread that has used MLX must never end. MLX's Python binding keeps per-thread state (the
default random key: `static thread_local PyKeySequence` in mlx/python/src/random.cpp) whose C++
destructor takes the GIL when the thread ends, *after* `Thread.join()` has already returned. If
the interpreter is shutting down by then, taking the GIL ends the thread from inside that
destructor and the process aborts with "terminate called without an active exception" (SIGABRT):
at the exit of any process whose engine thread had just ended, and at the exit of one whose
engine thread was still busy. So an engine's work runs on one of these threads, which then waits,
without a timeout, for the next engine's work; the process exits around it.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("mlx_manager.engine")

_idle: list[_InferenceThread] = []
_lock = threading.Lock()


class _InferenceThread:
    def __init__(self) -> None:
        self._work: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="mlx-inference", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            work, done = self._work.get()  # no timeout: a parked thread never wakes while Python exits
            try:
                work()
            except Exception:
                log.exception("the inference thread's work failed")
            finally:
                with _lock:
                    _idle.append(self)
                done.set()


def run_on_inference_thread(work: Callable[[], None]) -> threading.Event:
    """Run `work` on an idle inference thread (a new one if none is idle); the event is set when it returns."""
    with _lock:
        thread = _idle.pop() if _idle else None
    if thread is None:
        thread = _InferenceThread()
    done = threading.Event()
    thread._work.put((work, done))
    return done
