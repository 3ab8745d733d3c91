"""The one error the settings layer raises: it never prints, the CLI and the daemon say it."""

from __future__ import annotations

from pathlib import Path


class SettingsError(ValueError):
    """A setting that does not parse or validate: where it came from, which key, what is wrong."""

    def __init__(
        self,
        *,
        problem: str,
        key: str | None = None,
        file: Path | None = None,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        self.problem, self.key, self.file, self.line = problem, key, file, line
        self.source = source  # e.g. "MLX_MANAGER_TIMEOUTS__CHAT" or "--port", when not the file
        super().__init__(str(self))

    def __str__(self) -> str:
        where = str(self.file) if self.file else (self.source or "")
        if self.file and self.line:
            where += f":{self.line}"
        parts = [where] if where else []
        if self.key and self.key not in self.problem:
            parts.append(self.key)
        parts.append(self.problem)
        return ": ".join(parts)
