"""The dashboard's figures over time, read in a process of their own: a heavy read never holds the
daemon's GIL.

    figures = ReaderProcess(path)
    summary = await figures.series(WINDOWS["day"])   # what AuditReader.series answers
    await figures.close()

An AuditReader runs its SQL off the event loop, but folding a day's rows into the charts' buckets
(parsing every duration, exact percentiles over a million values) is Python and numpy holding the
GIL for much of a cold read. In the daemon that competed with the inference thread (Python at every
decode step) and the event loop: reading the day over a million rows back to back raised chat's
time to first token by a third (benchmarks/bench_dashboard.py). So the daemon hands the read to a
child, `python -m mlx_manager.audit.reader_process PATH`, at the lowest CPU priority: started on the
first read, stopped after IDLE_SECONDS without one. It keeps an AuditReader (and its buckets, so a
refresh reads only the buckets that changed) and answers each request, a JSON line on its stdin,
with one on its stdout. The daemon's share is a line written and a summary of a few kB parsed: a
cold read of the day over a million rows costs the daemon's process about 0.01 s of CPU instead
of 1.2-1.6 s; the child's first start adds about half a second to the first read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from mlx_manager.audit import errors
from mlx_manager.audit.errors import AuditError, AuditLogUnavailable
from mlx_manager.audit.reader import BACKGROUND_NICE, AuditReader
from mlx_manager.audit.series import Window

# How the daemon starts the child (with the audit log's path after it); a benchmark may swap it.
PROGRAM = [sys.executable, "-m", "mlx_manager.audit.reader_process"]
# A child nobody asked anything of for this long is stopped: its memory goes back.
IDLE_SECONDS = 600.0
# Longest answer line (a summary is a few kB; many models and keys make it longer).
ANSWER_LIMIT = 64 * 1024 * 1024
STOP_SECONDS = 5.0


class ReaderProcess:
    """The daemon's side: one request at a time to the child, which is (re)started as needed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._process: asyncio.subprocess.Process | None = None
        self._asking = asyncio.Lock()
        self._idle: asyncio.TimerHandle | None = None
        self._stopping: set[asyncio.Task[None]] = set()

    async def series(self, window: Window) -> dict[str, Any]:
        """`AuditReader.series` of the window ending now, read by the child."""
        # Shielded: a caller that goes away leaves the exchange to finish, so the child's answer
        # to it is never taken for the next caller's.
        exchange = asyncio.ensure_future(self._ask({"name": window.name, "span": window.span, "step": window.step}))
        answer = await asyncio.shield(exchange)
        if "figures" in answer:
            return answer["figures"]
        kind = getattr(errors, answer["error"], AuditError)  # AuditError's kinds: the child answers no other
        raise kind(self.path, answer["message"])

    async def close(self) -> None:
        self._cancel_idle()
        await self._stop()
        for task in list(self._stopping):
            await task

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        async with self._asking:
            self._cancel_idle()
            process = await self._running()
            assert process.stdin is not None and process.stdout is not None
            line = b""
            with contextlib.suppress(ConnectionError):
                process.stdin.write(json.dumps(request).encode() + b"\n")
                await process.stdin.drain()
                line = await process.stdout.readline()
            if not line.endswith(b"\n"):
                await self._stop()
                raise AuditLogUnavailable(self.path, "the dashboard's audit reader stopped (see the daemon's log)")
            self._idle = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._on_idle)
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def _running(self) -> asyncio.subprocess.Process:
        if self._process is not None and self._process.returncode is None:
            return self._process
        await self._stop()  # one that exited by itself: reaped
        self._process = await asyncio.create_subprocess_exec(
            *PROGRAM,
            str(self.path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=ANSWER_LIMIT,
        )
        return self._process

    async def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()  # the child's cue to exit
        try:
            await asyncio.wait_for(process.wait(), STOP_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    def _on_idle(self) -> None:
        self._idle = None
        task = asyncio.ensure_future(self._stop_if_idle())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop_if_idle(self) -> None:
        async with self._asking:
            if self._idle is None:  # nothing was asked meanwhile
                await self._stop()

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None


async def _answer(reader: AuditReader, request: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"figures": await reader.series(Window(request["name"], request["span"], request["step"]))}
    except AuditError as exc:
        return {"error": type(exc).__name__, "message": str(exc)}


def main(argv: list[str] | None = None) -> None:
    """The child: answer each request line on stdin until it closes."""
    (path,) = sys.argv[1:] if argv is None else argv
    answers = os.fdopen(os.dup(1), "wb")  # the answers go on a copy of stdout ...
    os.dup2(2, 1)  # ... and anything else printed goes to stderr (the daemon's log)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the daemon, which closes stdin
    with contextlib.suppress(OSError):
        os.nice(BACKGROUND_NICE)  # serving first, on every thread of this process
    reader = AuditReader(Path(path))
    loop = asyncio.new_event_loop()
    try:
        while line := sys.stdin.buffer.readline():
            answer = loop.run_until_complete(_answer(reader, json.loads(line)))
            answers.write(json.dumps(answer).encode() + b"\n")
            answers.flush()
    except BrokenPipeError:
        pass  # the daemon went away mid-read
    finally:
        loop.run_until_complete(reader.close())
        loop.close()


if __name__ == "__main__":
    main()
