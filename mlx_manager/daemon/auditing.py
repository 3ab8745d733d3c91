"""The daemon's audit log: every request's outcome becomes one row; old rows are pruned.

Started and stopped by the app's lifespan. The writer batches rows on its own thread. With
`audit.durability = "acknowledged"` (the default) an answer's last byte waits for its row's
commit (many requests share one commit), so even a crash loses no row of an answered request;
with "batched" nothing waits and a crash loses up to the writer's flush interval of rows.
`stop()` flushes every queued row, which is why a graceful stop loses none either way.
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
        self.writer = AuditWriter(daemon.settings.audit_path(), fsync=daemon.settings.audit.fsync)
        self._pruner: asyncio.Task | None = None

    async def start(self) -> None:
        await self.writer.start()
        self.daemon.audit = self.writer
        self.daemon.outcome_sinks.append(self.record)
        self.daemon.durable = self.committed
        self._pruner = asyncio.create_task(self._prune_forever())

    def record(self, outcome: RequestOutcome) -> None:
        outcome.audit_ticket = self.writer.record(outcome)

    async def committed(self, outcome: RequestOutcome) -> None:
        """Under audit.durability = "acknowledged" (read per request: a reload applies), wait for the row's commit."""
        if self.daemon.settings.audit.durability == "acknowledged" and outcome.audit_ticket is not None:
            await self.writer.committed(outcome.audit_ticket)

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
        self.daemon.durable = None
        await self.writer.stop()
