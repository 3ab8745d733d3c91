"""How `models pull` shows its progress events (see `hub/pull.py`): rich bars on a terminal
(bytes, speed and time left per file and overall), plain lines when stderr is not one, JSON lines
on stdout with `--json`. Progress goes to stderr so that stdout keeps the result."""

from __future__ import annotations

import time
from typing import Any

from mlx_manager.cli.output import err_console, print_json, say
from mlx_manager.hub.pull import format_bytes

Event = dict[str, Any]
PLAIN_EVERY = 5.0  # seconds between the plain progress lines of one file


def display_for(json_output: bool) -> PullDisplay:
    if json_output:
        return JsonDisplay()
    return RichDisplay() if err_console.is_terminal else PlainDisplay()


class PullDisplay:
    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"on_{event['event']}", None)
        if handler is not None:
            handler(event)

    def close(self) -> None:
        return None


class JsonDisplay(PullDisplay):
    def __call__(self, event: Event) -> None:
        print_json(event)


def _plan_line(event: Event) -> str:
    fetch = [f for f in event["files"] if not f["cached"]]
    line = f"Pulling {event['model']} at {event['revision']} (commit {event['commit'][:12]}): "
    if not fetch:
        return line + f"all {len(event['files'])} files are already here"
    line += f"{len(fetch)} of {len(event['files'])} files, {format_bytes(event['total_bytes'])}"
    if event["present_bytes"]:
        line += f" ({format_bytes(event['present_bytes'])} already here from an interrupted pull)"
    return line


class PlainDisplay(PullDisplay):
    """One line per step, and a progress line per file every few seconds: fit for logs and pipes."""

    def __init__(self) -> None:
        self._last = 0.0

    def on_plan(self, event: Event) -> None:
        say(_plan_line(event), err=True)

    def on_file(self, event: Event) -> None:
        resume = f", resuming at {format_bytes(event['resume_from'])}" if event["resume_from"] else ""
        say(f"  {event['name']} ({format_bytes(event['size'])}{resume})", err=True)
        self._last = time.monotonic()

    def on_progress(self, event: Event) -> None:
        if time.monotonic() - self._last < PLAIN_EVERY:
            return
        self._last = time.monotonic()
        size = event["file_size"] or 1
        eta = event["eta_seconds"]
        say(
            f"  {event['name']}: {100 * event['file_bytes'] / size:.0f}% of {format_bytes(size)}, "
            f"{format_bytes(event['bytes_per_second'])}/s, "
            f"{format_bytes(event['bytes'])} of {format_bytes(event['total_bytes'])} in all"
            + (f", {_duration(eta)} left" if eta is not None else ""),
            err=True,
        )

    def on_check(self, event: Event) -> None:
        say("Checking that the model loads...", err=True)


class RichDisplay(PullDisplay):
    """A bar for the whole pull and one per file while it downloads, each with bytes, speed and time left."""

    def __init__(self) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self.overall: Any = None

    def on_plan(self, event: Event) -> None:
        say(_plan_line(event), err=True)
        if event["total_bytes"]:
            self.progress.start()
            self.overall = self.progress.add_task("total", total=event["total_bytes"], completed=event["present_bytes"])

    def on_file(self, event: Event) -> None:
        self.tasks[event["name"]] = self.progress.add_task(
            f"  {event['name']}", total=event["size"], completed=event["resume_from"]
        )

    def on_progress(self, event: Event) -> None:
        task = self.tasks.get(event["name"])
        if task is not None:
            self.progress.update(task, completed=event["file_bytes"])
        if self.overall is not None:
            self.progress.update(self.overall, completed=event["bytes"])

    def on_file_done(self, event: Event) -> None:
        task = self.tasks.pop(event["name"], None)
        if task is not None:  # a finished file makes room for the next: the total bar stays
            self.progress.remove_task(task)

    def on_check(self, event: Event) -> None:
        self.close()
        say("Checking that the model loads...", err=True)

    def close(self) -> None:
        self.progress.stop()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
