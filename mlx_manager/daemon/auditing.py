"""The daemon's audit log: every request's outcome becomes one row; old rows are pruned.

Started and stopped by the app's lifespan. The writer batches rows on its own thread, so no
response waits for the disk; `stop()` flushes every queued row, which is why a graceful stop
loses none.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from mlx_manager.audit import AuditError, AuditWriter
from mlx_manager.daemon.outcome import RequestOutcome
from mlx_manager.daemon.state import DaemonState

log = logging.getLogger("mlx_manager.daemon")


class Auditing:
    def __init__(self, daemon: DaemonState) -> None:
        self.daemon = daemon
        self.writer = AuditWriter(daemon.settings.audit_path())
        self._pruner: asyncio.Task | None = None

    async def start(self) -> None:
        await self.writer.start()
        self.daemon.audit = self.writer
        self.daemon.outcome_sinks.append(self.record)
        self._pruner = asyncio.create_task(self._prune_forever())

    def record(self, outcome: RequestOutcome) -> None:
        self.writer.record(outcome)

    async def _prune_forever(self) -> None:
        """Prune at start, then every audit.prune_interval (both read from the current settings)."""
        while True:
            audit = self.daemon.settings.audit
            try:
                deleted = await self.writer.prune(timedelta(days=audit.retention_days))
                if deleted:
                    log.info("audit: pruned %d row(s) older than %d days", deleted, audit.retention_days)
            except AuditError as exc:
                log.warning("audit: pruning failed, will try again: %s", exc)
            await asyncio.sleep(audit.prune_interval)

    async def stop(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
        if self.record in self.daemon.outcome_sinks:
            self.daemon.outcome_sinks.remove(self.record)
        await self.writer.stop()
